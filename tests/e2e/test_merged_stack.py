"""A hot tenant on a merged pool, through the whole local stack (kubectl apply -> operator -> Deployments
run by kube-controller-manager -> pods of the pod runner, real sidecars and runtimes -> the local
ingress), with no gateway: the ingress sends the tenant's requests to the merged pool while it has
Ready pods and to the shared pool otherwise, under load, while the merged pool scales to 0 and back and
while a new adapter version rolls its pods. Every answer is checked: the merged pool's against PEFT's
merged model (``merge_and_unload``), the shared pool's against PEFT's unmerged adapter, each for the
version the answer names. A merged adapter whose digest does not match says so on both objects."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
import yaml

from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import wait_for
from support.models import PeftOracle, make_generation_adapter, make_tiny_llama
from support.tenants import key_entry

NS, SHARED, HOT, HOST = "merged-e2e", "chat", "chat-hot", "chat.merged.local"
KEY = "acme-merged-e2e-key"
ADAPTER = "acme-chat"
PROMPTS = ["hello world , how are", "please refund me , the invoice"]
NEW = 6


@torch.inference_mode()
def merged_texts(base, adapter_dir) -> dict[str, str]:
    """PEFT's merged model (``merge_and_unload``): the oracle of a merged pool's answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter_dir)).merge_and_unload()
    out = {}
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        gen = m.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=0)
        out[prompt] = tok.decode(gen[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merged-e2e")
    base = make_tiny_llama(root / "base", seed=5)
    adapters = {v: make_generation_adapter(base, root / f"v{v}", seed=60 + int(v), r=4, alpha=16) for v in ("1", "2", "3")}
    oracle = PeftOracle(base, "text-generation")
    expected = {(v, role): (merged_texts(base, d) if role == "merged" else oracle.greedy_texts(d, PROMPTS, NEW))
                for v, d in adapters.items() for role in ("merged", "shared")}
    for p in PROMPTS:  # the versions answer differently: a wrong version cannot pass as the right one
        assert len({expected[(v, "merged")][p] for v in adapters}) == len(adapters)
    return base, adapters, expected


def pool_doc(e2e, base, name: str, replicas: int, **model) -> dict:
    spec = {"model": {"uri": "s3://models/merged-tiny/", "sha256": directory_digest(base), "task": "text-generation",
                      **model},
            "replicas": replicas, "runtime": {"maxBatchDelayMs": 2},
            "cache": {"deviceSlots": 2, "hostAdapters": 4, "diskBytes": "1Gi"},
            "storage": {"endpoint": e2e.s3env["S3_ENDPOINT"], "secretRef": {"name": "storage-creds"}}}
    if name == SHARED:
        spec["ingress"] = {"host": HOST}
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": name, "namespace": NS},
            "spec": spec}


@pytest.fixture(scope="module")
def pools(e2e, models):
    base, adapters, _ = models
    s3 = e2e.s3()
    for f in sorted(base.rglob("*")):
        if f.is_file():
            s3.fput_object("models", f"merged-tiny/{f.relative_to(base).as_posix()}", str(f))
    e2e.kubectl("create", "namespace", NS)
    e2e.kubectl("create", "secret", "generic", "storage-creds", "-n", NS,
                f"--from-literal=AWS_ACCESS_KEY_ID={e2e.s3env['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={e2e.s3env['AWS_SECRET_ACCESS_KEY']}")
    e2e.kubectl("apply", "-f", "-", input=json.dumps(pool_doc(e2e, base, SHARED, 1)))
    e2e.kubectl("apply", "-f", "-", input=json.dumps(pool_doc(e2e, base, HOT, 1, mergedAdapter={"name": ADAPTER})))
    e2e.kubectl("apply", "-f", "-", input=e2e.push(adapters["1"], f"s3://adapters/acme/{ADAPTER}/1/", pool=SHARED,
                                                   tenant="acme", version="1", name=ADAPTER, ns=NS))
    return e2e


def status(e2e, kind: str, name: str) -> dict:
    return e2e.get(kind, name, NS).get("status") or {}


def merged_entry(e2e, name: str = ADAPTER) -> dict:
    pools = status(e2e, "lora", name).get("pools") or []
    return next((p for p in pools if p["role"] == "merged"), {})


class Load:
    """Clients asking for the tenant's adapter through ``url`` (as host HOST) until stopped, each answer
    kept: (prompt, status, X-Lorafleet-Pool, body)."""

    def __init__(self, url: str, headers: dict | None = None, clients: int = 3):
        self.url, self.headers = url, {"Host": HOST, **(headers or {})}
        self.answers: list[tuple[str, int, str | None, object]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(n,)) for n in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _loop(self, n: int) -> None:
        with httpx.Client() as c:
            i = n
            while not self._stop.is_set():
                prompt = PROMPTS[i % 2]
                i += 1
                try:
                    r = c.post(f"{self.url}/v1/completions", headers=self.headers, timeout=60,
                               json={"model": ADAPTER, "prompt": prompt, "max_tokens": NEW, "temperature": 0})
                    self.answers.append((prompt, r.status_code, r.headers.get("x-lorafleet-pool"),
                                         r.json() if r.status_code == 200 else r.text))
                except httpx.HTTPError as e:
                    self.answers.append((prompt, -1, None, repr(e)))

    def answered_by(self, pool: str, after: int, model: str | None = None) -> bool:
        return any(a[2] == pool and a[1] == 200 and (model is None or a[3]["model"] == model)
                   for a in self.answers[after:])

    def check(self, expected: dict, versions: tuple[str, ...]) -> dict[tuple[str, str], int]:
        """No request failed, and each answer is PEFT's for the pool that answered (merged model or
        adapter) and the version it names: (pool, version) -> answers."""
        failed = [a for a in self.answers if a[1] != 200]
        assert not failed, f"{len(failed)} of {len(self.answers)} requests failed: {failed[:3]}"
        counts: dict[tuple[str, str], int] = {}
        for prompt, _, pool, body in self.answers:
            served, text = body["model"], body["choices"][0]["text"]
            name, version = served.split("@")
            assert name == ADAPTER and version in versions, served
            assert pool in (HOT, SHARED), pool
            role = "merged" if pool == HOT else "shared"
            assert text == expected[(version, role)][prompt], (pool, served, prompt, text)
            counts[(pool, version)] = counts.get((pool, version), 0) + 1
        return counts


def test_the_ingress_sends_the_tenant_to_the_merged_pool_while_ready_through_scale_to_zero_and_a_roll(
        pools, models):
    e2e = pools
    _, adapters, expected = models
    e2e.wait_adapter(ADAPTER, NS, "Ready", "1/1", timeout=300)
    wait_for(lambda: merged_entry(e2e).get("readyReplicas") == 1, timeout=300, interval=0.5,
             what="the merged pool Ready in the adapter's status")
    assert [(p["pool"], p["role"]) for p in status(e2e, "lora", ADAPTER)["pools"]] == [(SHARED, "shared"), (HOT, "merged")]
    first_pods = {p["metadata"]["name"] for p in json.loads(e2e.kubectl(
        "get", "pods", "-n", NS, "-l", f"lorafleet.io/pool={HOT}", "-o", "json"))["items"]}

    load = Load(e2e.url).start()
    answers, answered_by = load.answers, load.answered_by
    t0 = time.monotonic()
    marks = {}
    try:
        wait_for(lambda: answered_by(HOT, 0), timeout=60, what="the merged pool answering through the ingress")
        # Scale to zero: the merged pool's pod goes (unready, then its processes end); the shared pool covers.
        e2e.kubectl("patch", "lfpool", HOT, "-n", NS, "--type", "merge", "-p", '{"spec": {"replicas": 0}}')
        wait_for(lambda: not json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l", f"lorafleet.io/pool={HOT}",
                                                    "-o", "json"))["items"], timeout=120, what="the merged pod gone")
        marks["zero"] = n = len(answers)
        wait_for(lambda: len(answers) >= n + 10, timeout=120, what="load with the merged pool at 0")
        assert {a[2] for a in answers[n:]} == {SHARED}
        # And back: the merged pool takes the requests again once its new pod is Ready.
        e2e.kubectl("patch", "lfpool", HOT, "-n", NS, "--type", "merge", "-p", '{"spec": {"replicas": 1}}')
        n = len(answers)
        wait_for(lambda: answered_by(HOT, n), timeout=300, interval=0.5, what="the merged pool answering again")
        # A new version: the shared pool rolls the adapter, the merged pool's Deployment rolls its pod.
        marks["roll"] = n = len(answers)
        e2e.kubectl("apply", "-f", "-", input=e2e.push(adapters["2"], f"s3://adapters/acme/{ADAPTER}/2/", pool=SHARED,
                                                       tenant="acme", version="2", name=ADAPTER, ns=NS))
        rolling: list[dict] = []

        def rolled() -> bool:
            st = status(e2e, "lora", ADAPTER)
            if "still merge another version" in st.get("message", ""):
                rolling.append(st)  # the old pod answers while the new one loads: the status says so
            return answered_by(HOT, n, f"{ADAPTER}@2")
        wait_for(rolled, timeout=300, interval=0.2, what="the merged pool's new pod answering as version 2")
        assert rolling, "the adapter's status never said the merged pool was rolling"
        assert rolling[0]["pools"][1]["version"] == "2" and rolling[0]["pools"][1]["readyReplicas"] == 0
        marks["rolled"] = n = len(answers)
        wait_for(lambda: len(answers) >= n + 10, timeout=120, what="load after the roll")
    finally:
        load.stop()
    took = time.monotonic() - t0
    counts = load.check(expected, ("1", "2"))
    assert counts.get((HOT, "1")) and counts.get((HOT, "2")) and counts.get((SHARED, "1")), counts
    print(f"merged pool through the ingress: {len(answers)} answers in {took:.0f} s, 0 failed, "
          f"by (pool, version): {counts}, marks {marks}")

    # The roll replaced the merged pool's pod (a new template: version 2), and the status names both pools.
    dep = e2e.get("deployment", f"lorafleet-{HOT}", NS)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LORAFLEET_MERGED_ADAPTER_VERSION"] == "2"
    pods = {p["metadata"]["name"] for p in json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l",
                                                                  f"lorafleet.io/pool={HOT}", "-o", "json"))["items"]}
    assert pods and not pods & first_pods
    st = wait_for(lambda: (s := status(e2e, "lora", ADAPTER)).get("servedVersion") == "2"
                  and (s.get("pools") or [{}, {}])[1].get("readyReplicas") == 1 and s, timeout=60,
                  what="the adapter's status at version 2 on both pools")
    assert st["pools"] == [{"pool": SHARED, "role": "shared", "readyReplicas": 1, "replicas": 1},
                           {"pool": HOT, "role": "merged", "version": "2", "readyReplicas": 1, "replicas": 1}]
    assert status(e2e, "lfpool", HOT)["mergedAdapter"] == f"{ADAPTER}@2"

    metrics = httpx.get(f"http://127.0.0.1:{e2e.state['ingress_metrics_port']}/metrics").text
    by_role = {}
    for line in metrics.splitlines():
        if line.startswith("lorafleet_ingress_pool_choice_total{") and f'adapter="{ADAPTER}"' in line:
            by_role[line.split('role="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    assert by_role.get("merged", 0) == sum(n for (p, _), n in counts.items() if p == HOT)
    assert by_role.get("shared", 0) == sum(n for (p, _), n in counts.items() if p == SHARED)


def test_a_merged_adapter_whose_digest_does_not_match_says_so_on_the_pool_and_the_adapter(pools, models):
    e2e = pools
    base, adapters, expected = models
    # The adapter's manifest names another content's digest: the objects in storage do not match it.
    manifest = yaml.safe_load(e2e.push(adapters["1"], "s3://adapters/acme/acme-bad/1/", pool=SHARED, tenant="acme",
                                       version="1", name="acme-bad", ns=NS))
    wrong = directory_digest(adapters["2"])
    manifest["spec"]["source"]["sha256"] = wrong
    e2e.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    e2e.kubectl("apply", "-f", "-", input=json.dumps(pool_doc(e2e, base, "chat-bad", 1,
                                                              mergedAdapter={"name": "acme-bad"})))
    try:
        def refused():
            conds = {c["type"]: c for c in status(e2e, "lfpool", "chat-bad").get("conditions") or []}
            c = conds.get("ModelReady") or {}
            return c.get("reason") == "MergedAdapterRefused" and c
        cond = wait_for(refused, timeout=240, interval=0.5, what="chat-bad ModelReady=False MergedAdapterRefused")
        assert cond["status"] == "False"
        msg = cond["message"]
        assert "merged adapter acme-bad@1 (LoRAAdapter 'acme-bad', sha256 " + wrong in msg, msg
        assert "digest mismatch" in msg and "s3://adapters/acme/acme-bad/1/" in msg, msg
        st = status(e2e, "lfpool", "chat-bad")
        assert st["phase"] == "Failed" and st["readyReplicas"] == 0 and "digest mismatch" in st["message"]
        entry = wait_for(lambda: (m := merged_entry(e2e, "acme-bad")).get("message") and m, timeout=60,
                         what="the adapter's status naming the merged pool's refusal")
        assert entry["pool"] == "chat-bad" and entry["readyReplicas"] == 0 and "digest mismatch" in entry["message"]
        assert "digest mismatch" in status(e2e, "lora", "acme-bad")["message"]
        # Nothing else is disturbed: the merged pool keeps its Deployment, the other tenant's pools serve.
        assert e2e.get("deployment", "lorafleet-chat-bad", NS)["spec"]["replicas"] == 1
        assert status(e2e, "lfpool", HOT).get("phase") == "Ready"
        r = httpx.post(f"{e2e.url}/v1/completions", headers={"Host": HOST}, timeout=60,
                       json={"model": ADAPTER, "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0})
        assert r.status_code == 200 and r.headers["x-lorafleet-pool"] == HOT
        version = r.json()["model"].split("@")[1]
        assert r.json()["choices"][0]["text"] == expected[(version, "merged")][PROMPTS[0]]
    finally:
        e2e.kubectl("delete", "lfpool", "chat-bad", "-n", NS, "--wait=false")
        e2e.kubectl("delete", "lora", "acme-bad", "-n", NS, "--wait=false")


def test_through_the_shared_pools_gateway_a_roll_and_a_scale_to_zero_fail_nothing(pools, models):
    """The production path: the Ingress to the shared pool's gateway, which sends the tenant (by its API
    key) to the merged pool's Ready pods first. A v2 -> v3 roll of the merged pool's pod and a scale
    to 0 under load: no request fails, each answer PEFT's for the pool and version."""
    e2e = pools
    base, adapters, expected = models
    e2e.allow_sources("acme", NS, apiKeys=[key_entry(KEY)])
    e2e.kubectl("patch", "lfpool", SHARED, "-n", NS, "--type", "merge", "-p", '{"spec": {"gateway": {"enabled": true}}}')
    wait_for(lambda: any(c["type"] == "GatewayReady" and c["status"] == "True"
                         for c in status(e2e, "lfpool", SHARED).get("conditions") or []),
             timeout=180, interval=0.5, what="the shared pool's gateway Ready")
    auth = {"Authorization": f"Bearer {KEY}"}

    def through_gateway() -> bool:
        r = httpx.post(f"{e2e.url}/v1/completions", headers={"Host": HOST, **auth}, timeout=60,
                       json={"model": ADAPTER, "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0})
        return r.status_code == 200 and r.headers.get("x-lorafleet-replica") is not None \
            and r.headers.get("x-lorafleet-pool") == HOT
    wait_for(through_gateway, timeout=120, interval=0.5, what="the gateway sending acme-chat to the merged pool")
    r = httpx.post(f"{e2e.url}/v1/completions", headers={"Host": HOST}, timeout=60,
                   json={"model": ADAPTER, "prompt": PROMPTS[0], "max_tokens": NEW})
    assert r.status_code == 401, r.text  # the gateway's keys, not the pool's Service directly

    load = Load(e2e.url, auth).start()
    t0 = time.monotonic()
    try:
        wait_for(lambda: load.answered_by(HOT, 0), timeout=60, what="load on the merged pool")
        n = len(load.answers)
        e2e.kubectl("apply", "-f", "-", input=e2e.push(adapters["3"], f"s3://adapters/acme/{ADAPTER}/3/", pool=SHARED,
                                                       tenant="acme", version="3", name=ADAPTER, ns=NS,
                                                       apiKeys=[key_entry(KEY)]))
        wait_for(lambda: load.answered_by(HOT, n, f"{ADAPTER}@3"), timeout=300, interval=0.5,
                 what="the merged pool's new pod answering as version 3 through the gateway")
        e2e.wait_adapter(ADAPTER, NS, "Ready", "1/1")
        wait_for(lambda: status(e2e, "lora", ADAPTER).get("servedVersion") == "3", timeout=120,
                 what="the shared pool serving version 3")
        e2e.kubectl("patch", "lfpool", HOT, "-n", NS, "--type", "merge", "-p", '{"spec": {"replicas": 0}}')
        wait_for(lambda: not json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l", f"lorafleet.io/pool={HOT}",
                                                    "-o", "json"))["items"], timeout=120, what="the merged pod gone")
        n = len(load.answers)
        wait_for(lambda: len(load.answers) >= n + 10, timeout=120, what="load with the merged pool at 0")
        assert {a[2] for a in load.answers[n:]} == {SHARED}
    finally:
        load.stop()
    counts = load.check(expected, ("1", "2", "3"))  # 2 before the roll when the tests above ran
    assert counts.get((HOT, "3")) and counts.get((SHARED, "3")), counts
    assert any(n for (pool, v), n in counts.items() if pool == HOT and v != "3"), counts
    print(f"merged pool through the gateway: {len(load.answers)} answers in {time.monotonic() - t0:.0f} s, "
          f"0 failed, by (pool, version): {counts}")

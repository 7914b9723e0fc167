"""End to end through the local stack: kubectl apply -> operator -> pod (sidecar + runtime) -> ingress.

Every classification answer is checked against PEFT's answer for that tenant's adapter version, so a
wrong tenant or a wrong version cannot pass unnoticed."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import wait_for


NS = "e2e"
POOL = "minilm"
HOST = "minilm.e2e.local"
PROBES = ["where is my parcel", "I forgot my password", "the invoice is wrong again"]


def oracle_scores(minilm_dir: Path, adapter_dir: Path) -> list[dict[str, float]]:
    import torch

    from support.models import PeftOracle

    labels = json.loads((adapter_dir / "labels.json").read_text())
    probs = torch.softmax(PeftOracle(minilm_dir, "sequence-classification").logits(adapter_dir, PROBES), -1)
    return [dict(zip(labels, row.tolist())) for row in probs]


def scores_of(answer: dict) -> list[dict[str, float]]:
    out = []
    for item in answer["data"]:
        out.append({s["label"]: s["score"] for s in item["labels"]})
    return out


def matches(got: list[dict[str, float]], want: list[dict[str, float]], tol: float = 2e-3) -> bool:
    return len(got) == len(want) and all(
        g.keys() == w.keys() and all(abs(g[k] - w[k]) <= tol for k in w) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def adapters(minilm_dir, tmp_path_factory):
    """name -> (dir, oracle) for the tenants' adapter versions used below (different label sets, so a
    wrong tenant or version is visible in the labels alone)."""
    from support.models import make_classification_adapter

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "acme-v1": (["acme-billing", "acme-shipping"], 11),
        "acme-v2": (["acme-billing-2", "acme-shipping-2", "acme-refund-2"], 12),
        "globex-v1": (["globex-urgent", "globex-routine", "globex-spam", "globex-other"], 13),
    }
    out = {}
    for key, (labels, seed) in specs.items():
        d = make_classification_adapter(minilm_dir, root / key, labels=labels, seed=seed, b_std=0.2)
        out[key] = (d, oracle_scores(minilm_dir, d))
    return out


@pytest.fixture(scope="module")
def pool(e2e, minilm_dir):
    s3 = e2e.s3()
    for f in sorted(minilm_dir.rglob("*")):
        if f.is_file():
            s3.fput_object("models", f"minilm/{f.relative_to(minilm_dir).as_posix()}", str(f))
    e2e.kubectl("create", "namespace", NS)
    e2e.kubectl("create", "secret", "generic", "storage-creds", "-n", NS,
                f"--from-literal=AWS_ACCESS_KEY_ID={e2e.s3env['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={e2e.s3env['AWS_SECRET_ACCESS_KEY']}")
    doc = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": POOL, "namespace": NS},
           "spec": {"model": {"uri": "s3://models/minilm/", "sha256": directory_digest(minilm_dir),
                              "task": "sequence-classification"},
                    "replicas": 1, "runtime": {"maxBatchDelayMs": 2},
                    "cache": {"deviceSlots": 4, "hostAdapters": 16, "diskBytes": "1Gi"},
                    "storage": {"endpoint": e2e.s3env["S3_ENDPOINT"], "secretRef": {"name": "storage-creds"}},
                    "ingress": {"host": HOST}}}
    e2e.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return doc


def classify(client: httpx.Client, url: str, model: str) -> httpx.Response:
    return client.post(f"{url}/v1/classify", json={"model": model, "input": PROBES}, headers={"Host": HOST},
                       timeout=30)


def apply_adapter(e2e, adapters, key: str, name: str, tenant: str, version: str) -> None:
    d = adapters[key][0]
    e2e.kubectl("apply", "-f", "-", input=e2e.push(d, f"s3://adapters/{tenant}/{name}/{version}/", pool=POOL,
                                                   tenant=tenant, version=version, name=name, ns=NS))


def test_apply_then_classify_through_the_ingress(e2e, pool, adapters):
    apply_adapter(e2e, adapters, "acme-v1", "acme-support", "acme", "1")
    apply_adapter(e2e, adapters, "globex-v1", "globex-triage", "globex", "1")
    e2e.wait_adapter("acme-support", NS, "Ready", "1/1", timeout=240)
    e2e.wait_adapter("globex-triage", NS, "Ready", "1/1")
    table = e2e.kubectl("get", "lora", "-n", NS).splitlines()
    assert table[0].split() == ["NAME", "POOL", "TENANT", "VERSION", "WANTED", "PHASE", "READY", "PLACED", "AGE"]
    assert {tuple(line.split()[:8]) for line in table[1:]} == {
        ("acme-support", POOL, "acme", "1", "1", "Ready", "1/1", "1"),
        ("globex-triage", POOL, "globex", "1", "1", "Ready", "1/1", "1")}
    with httpx.Client() as c:
        for name, key in (("acme-support", "acme-v1"), ("globex-triage", "globex-v1")):
            r = classify(c, e2e.url, name)
            assert r.status_code == 200, r.text
            assert matches(scores_of(r.json()), adapters[key][1]), (name, r.json())
        r = c.post(f"{e2e.url}/v1/classify", json={"model": "nobody", "input": "x"}, headers={"Host": HOST})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_rollout_under_load_fails_no_request_and_drains_the_old_version(e2e, pool, adapters):
    e2e.wait_adapter("acme-support", NS, "Ready", "1/1")
    answers: list[tuple[str, int, list]] = []
    stop = threading.Event()

    def client_loop():
        with httpx.Client() as c:
            while not stop.is_set():
                for name in ("acme-support", "globex-triage"):
                    try:
                        r = classify(c, e2e.url, name)
                        answers.append((name, r.status_code, scores_of(r.json()) if r.status_code == 200 else r.text))
                    except httpx.HTTPError as e:
                        answers.append((name, -1, repr(e)))

    threads = [threading.Thread(target=client_loop) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # load before the change
        apply_adapter(e2e, adapters, "acme-v2", "acme-support", "acme", "2")

        def rolled_out():
            st = e2e.get("lora", "acme-support", NS).get("status") or {}
            routes = _routes(e2e)
            versions = [v["version"] for v in routes["adapters"]["acme-support"]["versions"]]
            return st.get("phase") == "Ready" and st.get("servedVersion") == "2" and versions == ["2"]

        wait_for(rolled_out, timeout=180, interval=0.5, what="acme-support rolled out to v2 with v1 dropped")
        time.sleep(1.0)  # load after the change
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failed = [a for a in answers if a[1] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the rollout: {failed[:3]}"
    v1, v2 = adapters["acme-v1"][1], adapters["acme-v2"][1]
    seen = {"v1": 0, "v2": 0}
    for name, _, got in answers:
        if name == "globex-triage":
            assert matches(got, adapters["globex-v1"][1]), f"globex got someone else's answer: {got}"
        else:
            which = "v1" if matches(got, v1) else "v2" if matches(got, v2) else None
            assert which, f"acme-support answered with neither v1 nor v2: {got}"
            seen[which] += 1
    assert seen["v1"] and seen["v2"], seen  # the load really spanned the change
    with httpx.Client() as c:
        assert matches(scores_of(classify(c, e2e.url, "acme-support").json()), v2)


def _routes(e2e) -> dict:
    cms = json.loads(e2e.kubectl("get", "configmap", "-n", NS, "-l", f"lorafleet.io/routes-for={POOL}", "-o",
                                 "json"))["items"]
    merged: dict = {"adapters": {}}
    for cm in cms:
        merged["adapters"].update(json.loads(cm["data"]["routes.json"])["adapters"])
    return merged


def test_hostile_version_is_refused_and_nothing_else_is_disturbed(e2e, pool, adapters, tmp_path):
    e2e.wait_adapter("globex-triage", NS, "Ready", "1/1")
    hostile = tmp_path / "hostile"
    shutil.copytree(adapters["globex-v1"][0], hostile)
    (hostile / "adapter_model.bin").write_bytes(b"\x80\x04\x95 pickle payload")  # pickled weights: code on load
    s3 = e2e.s3()
    for f in hostile.iterdir():
        s3.fput_object("adapters", f"globex/triage/9/{f.name}", str(f))
    doc = e2e.get("lora", "globex-triage", NS)
    doc["spec"].update(version="9", source={"uri": "s3://adapters/globex/triage/9/", "sha256": directory_digest(hostile)})
    e2e.kubectl("apply", "-f", "-", input=yaml.safe_dump({k: doc[k] for k in ("apiVersion", "kind", "spec")} |
                                                        {"metadata": {"name": "globex-triage", "namespace": NS}}))
    st = e2e.wait_adapter("globex-triage", NS, "Degraded", timeout=120)
    assert "pickle" in (st.get("message") or "").lower() or ".bin" in (st.get("message") or ""), st
    with httpx.Client() as c:
        # the tenant keeps its working version; the other tenant is untouched
        assert matches(scores_of(classify(c, e2e.url, "globex-triage").json()), adapters["globex-v1"][1])
        assert classify(c, e2e.url, "acme-support").status_code == 200
    assert (e2e.get("lora", "acme-support", NS)["status"]["phase"]) == "Ready"


def test_delete_is_404_and_a_second_replica_serves(e2e, pool, adapters):
    e2e.kubectl("delete", "lora", "globex-triage", "-n", NS)
    with httpx.Client() as c:
        wait_for(lambda: classify(c, e2e.url, "globex-triage").status_code == 404, timeout=60,
                 what="globex-triage answering 404 after delete")
    e2e.kubectl("patch", "lfpool", POOL, "-n", NS, "--type=merge", "-p", '{"spec": {"replicas": 2}}')
    e2e.wait_adapter("acme-support", NS, "Ready", "2/2", timeout=240)
    pods = json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l", f"lorafleet.io/pool={POOL}", "-o", "json"))["items"]
    assert len(pods) == 2
    with httpx.Client() as c:
        for p in pods:  # each replica, directly, serves the adapter with the right answer
            port = json.loads(p["metadata"]["annotations"]["lorafleet.io/local-ports"])["8000"]
            r = c.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "acme-support", "input": PROBES})
            assert r.status_code == 200 and matches(scores_of(r.json()), adapters["acme-v2"][1]), r.text


def test_tenant_keys_through_the_ingress_and_the_operators_gateway(e2e, pool, adapters):
    """``spec.gateway.enabled``: the operator deploys the gateway, the pod runner runs it, and the pool's
    Ingress sends its host's requests through it. A tenant's key reaches its own adapter (the right
    answer), not another tenant's (403); no key is 401. Turned off, the Ingress goes straight to the pool."""
    apply_adapter(e2e, adapters, "acme-v1", "acme-gw", "acme", "1")
    apply_adapter(e2e, adapters, "globex-v1", "globex-gw", "globex", "1")
    keys = {"acme": "lf-e2e-acme-3c9f0e1d5b7a", "globex": "lf-e2e-globex-8d2b6a4f1e0c"}
    for tenant, key in keys.items():  # the cluster holds only each key's sha256
        e2e.allow_sources(tenant, NS, apiKeys=[{"name": "e2e", "sha256": hashlib.sha256(key.encode()).hexdigest()}])
    e2e.kubectl("patch", "lfpool", POOL, "-n", NS, "--type=merge", "-p",
                '{"spec": {"gateway": {"enabled": true, "spillInflight": 3}}}')
    e2e.wait_adapter("acme-gw", NS, "Ready", timeout=240)
    e2e.wait_adapter("globex-gw", NS, "Ready")

    def call(c: httpx.Client, model: str, key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return c.post(f"{e2e.gateway_url}/v1/classify", json={"model": model, "input": PROBES}, headers=headers,
                      timeout=30)

    try:
        with httpx.Client() as c:
            # Until the operator switched the Ingress and the gateway pod is Ready, the pool answers
            # directly; the gateway's answers name the pool pod that served them.
            r = wait_for(lambda: (r := call(c, "acme-gw", keys["acme"])).status_code == 200
                         and "x-lorafleet-replica" in r.headers and r, timeout=120, interval=0.5,
                         what="acme-gw answering through the ingress and the gateway")
            assert matches(scores_of(r.json()), adapters["acme-v1"][1]), r.json()
            assert r.headers["x-lorafleet-replica"].startswith(f"lorafleet-{POOL}-")
            r = call(c, "globex-gw", keys["globex"])
            assert r.status_code == 200 and matches(scores_of(r.json()), adapters["globex-v1"][1]), r.text
            r = call(c, "globex-gw", keys["acme"])
            assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_forbidden", r.text
            r = call(c, "acme-gw")
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key", r.text
        # The gateway is a pod of its own, not one of the pool's replicas.
        gw_pods = json.loads(e2e.kubectl("get", "pods", "-n", NS, "-l", f"lorafleet.io/gateway-for={POOL}",
                                         "-o", "json"))["items"]
        assert len(gw_pods) == 1 and "lorafleet.io/pool" not in gw_pods[0]["metadata"]["labels"]
    finally:
        e2e.kubectl("patch", "lfpool", POOL, "-n", NS, "--type=merge", "-p",
                    '{"spec": {"gateway": {"enabled": false}}}')
    with httpx.Client() as c:
        wait_for(lambda: (r := call(c, "acme-gw")).status_code == 200 and "x-lorafleet-replica" not in r.headers,
                 timeout=60, interval=0.5, what="the Ingress back to the pool's Service (no key needed)")
    wait_for(lambda: not e2e.kubectl("get", "pods", "-n", NS, "-l", f"lorafleet.io/gateway-for={POOL}",
                                     "-o", "name").strip(), timeout=60, what="the gateway's pod to be deleted")

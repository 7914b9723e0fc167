"""Placement through the whole local stack, real runtimes: 60 MiniLM classifiers on a pool of 3
replicas whose per-replica disk budget holds a third of their total size. The operator's Deployment,
the real ReplicaSet controller, the pod runner's processes (real sidecars, real runtimes) and the
local ingress: every adapter answers through the ingress with its own labels; no replica's cache
goes past its budget; ``spec.replicas`` 3 -> 4 -> 2 under load fails no request of an adapter that
stays served (the scale down drains the pods it removes first); a killed pod's adapters answer from
the others within the time stated below.

Each adapter has labels of its own (``<name>-yes``, ``<name>-no``), so an answer from the wrong
adapter cannot pass as right."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest

from lorafleet.contracts.names import split_versioned
from lorafleet.contracts.digest import directory_digest
from lorafleet.contracts.routes import RoutesTable
from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.tools import require_tool

NS = "placement"
POOL = "placed"
HOST = "placed.e2e.local"
N = 60
TENANTS = 6
KILLED_ANSWER_S = 60  # a killed pod's adapters answer from the others within this


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


@pytest.fixture(scope="module")
def sixty(minilm_dir, tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """name -> (folder, labels): one PEFT adapter of MiniLM, then 60 of its shape with their own seeded
    weights and labels (cloned with numpy: training or saving 60 PEFT models would take minutes)."""
    from safetensors.numpy import load_file, save_file

    from support.models import make_classification_adapter

    root = tmp_path_factory.mktemp("sixty")
    seed = make_classification_adapter(minilm_dir, root / "seed", labels=["x-yes", "x-no"], seed=5, b_std=0.2)
    tensors = load_file(str(seed / "adapter_model.safetensors"))
    out = {}
    for i in range(N):
        name = f"t{i % TENANTS}-a{i:02d}"
        d = root / name
        shutil.copytree(seed, d, ignore=shutil.ignore_patterns("adapter_model.safetensors", "labels.json"))
        rng = np.random.default_rng(1000 + i)
        save_file({k: v + rng.normal(0, 0.05, v.shape).astype(v.dtype) for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
        labels = [f"{name}-yes", f"{name}-no"]
        (d / "labels.json").write_text(json.dumps(labels))
        out[name] = (d, labels)
    return out


class Pool:
    """The pool as the test watches it: its routes, adapters' statuses and pods, through kubectl."""

    def __init__(self, e2e):
        self.e2e = e2e

    def get(self, *args: str) -> dict:
        return json.loads(self.e2e.kubectl("get", *args, "-n", NS, "-o", "json"))

    def routes(self) -> RoutesTable:
        cms = self.get("configmap", "-l", f"lorafleet.io/routes-for={POOL}")["items"]
        shards = [RoutesTable.from_json(cm["data"]["routes.json"]) for cm in cms if "routes.json" in cm.get("data", {})]
        return RoutesTable.merge_complete(POOL, shards) or RoutesTable(pool=POOL)

    def statuses(self) -> dict[str, dict]:
        return {o["metadata"]["name"]: o.get("status") or {} for o in self.get("lora")["items"]}

    def pods(self) -> dict[str, dict]:
        return {p["metadata"]["name"]: p for p in self.get("pods", "-l", f"lorafleet.io/pool={POOL}")["items"]}

    def status(self) -> dict:
        return json.loads(self.e2e.kubectl("get", "lfpool", POOL, "-n", NS, "-o", "json")).get("status") or {}

    def scale(self, replicas: int) -> None:
        self.e2e.kubectl("patch", "lfpool", POOL, "-n", NS, "--type=merge", "-p",
                         json.dumps({"spec": {"replicas": replicas}}))

    def settled(self, replicas: int, names: list[str], served: int | None = None):
        """``replicas`` pods placed over, none draining or terminating, nothing moving, and ``served``
        (all by default) of ``names`` Ready 1/1 (the others Unplaced). Not yet settled raises
        ``NotSettled`` saying what is missing, which a timed-out wait reports."""
        def check():
            t = self.routes()
            pods = self.pods()
            alive = sorted(p for p, body in pods.items() if not body["metadata"].get("deletionTimestamp"))
            leaving = sorted(a for a, e in t.adapters.items() if e.leaving)
            if len(t.placed_on or []) != replicas or t.draining or len(alive) != replicas or leaving:
                raise NotSettled(f"placed on {sorted(t.placed_on or [])}, draining {t.draining}, pods alive "
                                 f"{alive}, leaving {leaving[:10]}")
            st = self.statuses()
            ready = [a for a in names if st.get(a, {}).get("ready") == "1/1" and st[a].get("phase") == "Ready"]
            odd = {a: (st.get(a, {}).get("phase"), st.get(a, {}).get("ready"),
                       (st.get(a, {}).get("conditions") or [{}])[0].get("reason")) for a in names if a not in ready}
            if len(ready) != (len(names) if served is None else served) or any(r != "Unplaced" for *_, r in odd.values()):
                raise NotSettled(f"{len(ready)} of {len(names)} Ready 1/1; others (phase, ready, reason): "
                                 f"{dict(list(odd.items())[:12])}; holders per pod "
                                 f"{dict(Counter(p for e in t.adapters.values() for p in e.holders))}")
            return t
        return check


class NotSettled(Exception):
    pass


class Watch:
    """``kubectl get -w`` in the background: every version of the objects it names as the API server
    sent them (a poll can miss a state that lasts less than its interval; a watch cannot)."""

    def __init__(self, e2e, *args: str):
        self.proc = subprocess.Popen([str(require_tool("kubectl")), f"--kubeconfig={e2e.state['kubeconfig']}", "get",
                                      *args, "-n", NS, "-w", "-o", "json"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.seen: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        decoder, buf = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buf += line
            while buf.strip():
                try:
                    obj, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                with self.lock:
                    self.seen.append((time.monotonic(), obj))

    def since(self, t: float) -> list[dict]:
        with self.lock:
            return [o for at, o in self.seen if at >= t]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Load:
    """Clients sending classify requests through the ingress, round robin over the adapters, each
    answer checked for its adapter's own labels; every outcome recorded with the phase it fell in."""

    def __init__(self, url: str, adapters: dict[str, tuple[Path, list[str]]], clients: int = 2):
        self.url, self.adapters = url, adapters
        self.phase = "idle"
        self.outcomes: list[tuple[str, str, int, str]] = []  # (phase, adapter, status, what)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        self.lock = threading.Lock()

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _run(self, offset: int) -> None:
        names = sorted(self.adapters)
        i = offset * 7
        with httpx.Client(base_url=self.url, headers={"Host": HOST}, timeout=30) as c:
            while not self.stop.is_set():
                name = names[i % len(names)]
                i += 1
                phase = self.phase
                code, what = ask(c, name, self.adapters[name][1])
                with self.lock:
                    self.outcomes.append((phase, name, code, what))

    def of(self, phase: str) -> list[tuple[str, int, str]]:
        with self.lock:
            return [(a, code, what) for p, a, code, what in self.outcomes if p == phase]


def ask(c: httpx.Client, name: str, labels: list[str]) -> tuple[int, str]:
    """(status, "ok" or what was wrong)."""
    try:
        r = c.post("/v1/classify", json={"model": name, "input": "where is my parcel"})
    except httpx.HTTPError as e:
        return 0, f"{type(e).__name__}: {e}"
    if r.status_code != 200:
        try:
            return r.status_code, (r.json().get("error") or {}).get("code") or r.text[:200]
        except ValueError:
            return r.status_code, r.text[:200]
    body = r.json()
    got = {s["label"] for s in body["data"][0]["labels"]}
    if split_versioned(body.get("model") or "")[0] != name or got != set(labels):
        return 200, f"wrong adapter: model {body.get('model')!r}, labels {sorted(got)}"
    return 200, "ok"


class CacheWatch:
    """Samples each pool pod's cache volume (model and adapters, on the pod runner's disk) once a
    second: the most each ever held."""

    def __init__(self, node: Path):
        self.node = node
        self.most: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(1.0):
            for d in (self.node / NS).glob(f"lorafleet-{POOL}-*"):
                n = dir_bytes(d / "volumes" / "cache")
                self.most[d.name] = max(self.most.get(d.name, 0), n)


def test_sixty_adapters_on_three_real_replicas_scale_3_4_2_and_a_killed_pod(e2e, minilm_dir, sixty):
    started = time.monotonic()
    s3 = e2e.s3()
    for f in sorted(minilm_dir.rglob("*")):
        if f.is_file():
            s3.fput_object("models", f"minilm/{f.relative_to(minilm_dir).as_posix()}", str(f))
    sizes = {name: dir_bytes(d) for name, (d, _) in sixty.items()}
    assert len(set(sizes.values())) == 1, "the adapters differ in size; the exact-third budget assumes one size"
    total = sum(sizes.values())
    budget = total // 3
    model_bytes = dir_bytes(minilm_dir)
    disk = model_bytes + 2 * budget + 64 * 1024  # the model, the budget and room for the copies a move keeps
    docs: list[dict] = []
    for t in range(TENANTS):
        docs.append({"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant", "metadata": {"name": f"t{t}"},
                     "spec": {"sources": [f"s3://adapters/t{t}/"]}})
    for name, (d, _) in sorted(sixty.items()):
        tenant = name.split("-")[0]
        prefix = f"{tenant}/{name}/1/"
        for f in sorted(d.rglob("*")):
            if f.is_file():
                s3.fput_object("adapters", prefix + f.relative_to(d).as_posix(), str(f))
        docs.append({"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter", "metadata": {"name": name},
                     "spec": {"pool": POOL, "tenant": tenant, "version": "1",
                              "source": {"uri": f"s3://adapters/{prefix}", "sha256": directory_digest(d),
                                         "sizeBytes": sizes[name]}}})
    e2e.kubectl("create", "namespace", NS)
    e2e.kubectl("create", "secret", "generic", "storage-creds", "-n", NS,
                f"--from-literal=AWS_ACCESS_KEY_ID={e2e.s3env['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={e2e.s3env['AWS_SECRET_ACCESS_KEY']}")
    pool_doc = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": POOL},
                "spec": {"model": {"uri": "s3://models/minilm/", "sha256": directory_digest(minilm_dir),
                                   "task": "sequence-classification"},
                         "replicas": 3, "runtime": {"maxBatchDelayMs": 2},
                         "cache": {"deviceSlots": 8, "hostAdapters": 64, "diskBytes": disk},
                         "placement": {"replicasPerAdapter": 1, "adapterBytes": budget},
                         "storage": {"endpoint": e2e.s3env["S3_ENDPOINT"], "secretRef": {"name": "storage-creds"}},
                         "ingress": {"host": HOST}}}
    e2e.kubectl("apply", "-n", NS, "-f", "-",
                input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [pool_doc, *docs]}))
    pool = Pool(e2e)
    names = sorted(sixty)
    caches = CacheWatch(e2e.root / "node")
    caches.thread.start()
    figures: dict[str, object] = {}
    watches: list[Watch] = []
    try:
        t3 = wait_for(pool.settled(3, names), 300, interval=1, what=f"{N} adapters Ready 1/1 on 3 replicas")
        figures["up_s"] = round(time.monotonic() - started, 1)
        per_pod = Counter(p for e in t3.adapters.values() for p in e.holders)
        assert sorted(per_pod.values()) == [N // 3] * 3, per_pod  # a third each: the budget is an exact fit
        use = pool.status()["placement"]
        assert [(u["adapters"], u["bytes"], u["budgetBytes"]) for u in use] == [(N // 3, budget, budget)] * 3
        with httpx.Client(base_url=e2e.url, headers={"Host": HOST}, timeout=30) as c:
            answers = {name: ask(c, name, sixty[name][1]) for name in names}
        assert all(a == (200, "ok") for a in answers.values()), {n: a for n, a in answers.items() if a != (200, "ok")}

        with Load(e2e.url, sixty) as load:
            # 3 -> 4: the new pod takes about a quarter; the old holders serve until it has them.
            load.phase = "3->4"
            pool.scale(4)
            t4 = wait_for(pool.settled(4, names), 240, interval=1, what=f"{N} adapters Ready 1/1 on 4 replicas")
            time.sleep(1)
            moved = sum(1 for a in names if set(t4.adapters[a].holders) != set(t3.adapters[a].holders))
            figures["moved_3_4"] = moved

            # A pod killed (deleted at once, no grace): its adapters answer from the others.
            load.phase = "kill"
            victim = sorted(t4.placed_on)[0]
            lost = sorted(a for a in names if victim in t4.adapters[a].holders)
            killed = time.monotonic()
            e2e.kubectl("delete", "pod", victim, "-n", NS, "--grace-period=0", "--force")
            with httpx.Client(base_url=e2e.url, headers={"Host": HOST}, timeout=30) as c:
                wait_for(lambda: all(ask(c, a, sixty[a][1]) == (200, "ok") for a in lost), KILLED_ANSWER_S,
                         interval=0.2, what=f"the {len(lost)} adapters of the killed pod answering elsewhere")
            figures["killed_answer_s"] = round(time.monotonic() - killed, 1)
            figures["killed_adapters"] = len(lost)
            # The ReplicaSet's replacement joins; then 4 again, nothing moving.
            t4b = wait_for(pool.settled(4, names), 240, interval=1, what="the replacement pod placed over, 4 again")

            # 4 -> 2: the two pods the scale down removes drain first; a third of the adapters has
            # no room on two replicas (the budget wins) and is answered 503 adapter_elsewhere.
            load.phase = "4->2"
            routes_seen = Watch(e2e, "configmap", "-l", f"lorafleet.io/routes-for={POOL}")
            pool_seen = Watch(e2e, "lfpool", POOL)
            watches += [routes_seen, pool_seen]
            scaled = time.monotonic()
            pool.scale(2)
            t2 = wait_for(pool.settled(2, names, served=2 * (N // 3)), 240, interval=0.5,
                          what="2 replicas, two thirds served")
            figures["scale_4_2_s"] = round(time.monotonic() - scaled, 1)
            # Still under load while the removed pods terminate (their preStop sleep, then SIGTERM):
            # no request reaches one that is gone.
            time.sleep(1)  # the watches have the versions written until the pool settled
            drained = [RoutesTable.from_json(cm["data"]["routes.json"]).draining
                       for cm in routes_seen.since(scaled) if "routes.json" in cm.get("data", {})]
            drained = next((sorted(d) for d in drained if d), None)
            wait_for(lambda: not set(drained or []) & set(pool.pods()), 60, interval=0.5, what="the drained pods gone")
            figures["scale_4_2_gone_s"] = round(time.monotonic() - scaled, 1)
            time.sleep(1)
        # The pods removed were the ones drained, and their drain showed on the pool's status while it
        # lasted (the routes table and the status are two writes, the table first).
        assert drained, "the scale down never drained a pod"
        assert sorted(set(t4b.placed_on) - set(t2.placed_on)) == drained
        scalings = [c for o in pool_seen.since(scaled) for c in (o.get("status") or {}).get("conditions", [])
                    if c["type"] == "Scaling" and c.get("reason") == "Draining"]
        assert scalings, "the pool's status never said Draining"
        assert all(c.get("status") == "True" and all(p in c["message"] for p in drained) for c in scalings), scalings
        staying = {a for a in names if t2.adapters[a].holders}
        assert len(staying) == 2 * (N // 3)
        figures["moved_off_drained"] = sum(1 for a in staying if set(t4b.adapters[a].holders) & set(drained))
        for phase, served in (("3->4", set(names)), ("4->2", staying)):
            got = load.of(phase)
            failed = [o for o in got if o[0] in served and o[1:] != (200, "ok")]
            figures[f"requests_{phase}"] = len(got)
            figures[f"failed_{phase}"] = len(failed)
            assert len(got) > N and not failed, (phase, len(got), failed[:10])
            wrong = [o for o in got if o[1] == 200 and o[2] != "ok"]
            assert not wrong, wrong[:5]  # never another adapter's answer, never the base model
        # The adapters left without room: 503 adapter_elsewhere, never a 404 or another's answer.
        left = [o for o in load.of("4->2") if o[0] not in staying and o[1:] != (200, "ok")]
        assert all(o[1:] == (503, "adapter_elsewhere") for o in left), left[:5]
        kill = load.of("kill")
        figures["requests_kill"] = len(kill)
        figures["kill_outcomes"] = dict(Counter(f"{code} {what}" for _, code, what in kill))
        figures["failed_kill_other_adapters"] = sum(1 for o in kill if o[0] not in lost and o[1:] != (200, "ok"))
        figures["failed_kill_its_adapters"] = sum(1 for o in kill if o[0] in lost and o[1:] != (200, "ok"))
        assert figures["failed_kill_other_adapters"] == 0, [o for o in kill if o[0] not in lost and o[1:] != (200, "ok")][:5]
        # No replica's cache ever went past its budget: placed bytes within adapterBytes, the volume
        # (model, adapters, the copies a move keeps) within cache.diskBytes.
        use = pool.status()["placement"]
        assert all(u["bytes"] <= budget for u in use) and len(use) == 2, use
        assert caches.most and max(caches.most.values()) <= disk, (caches.most, disk)
        figures["cache_most_bytes"] = max(caches.most.values())
        figures["disk_bytes"] = disk
        figures["test_s"] = round(time.monotonic() - started, 1)
        print("placement e2e:", json.dumps(figures, sort_keys=True))
    finally:
        caches.stop.set()
        for w in watches:
            w.close()
        # The stack is the session's: the pool's runtimes go, not to weigh on the tests after this one.
        e2e.kubectl("delete", "namespace", NS, "--wait=false")

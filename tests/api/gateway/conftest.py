"""A pool of three real runtime replicas (``lorafleet serve`` processes) played as Ready pods of a
namespace of the real API server, tenants with their keys' digests, and a ``lorafleet gateway`` process in front."""

from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from support.tenants import key_entry

from lorafleet.contracts import names
from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for

POOL = "tiny"
# served name -> tenant; every replica holds every adapter (as the sidecar preloads them)
ADAPTERS = {"acme-support": "acme", "acme-chat": "acme", "globex-bot": "globex", "initech-bot": "initech",
            "umbrella-bot": "umbrella"}
KEYS = {"acme": "acme-key-1", "globex": "globex-key-1", "initech": "initech-key-1", "umbrella": "umbrella-key-1"}
LIMITS = {"initech": {"rateLimit": {"requestsPerSecond": 0.2, "burst": 2}}, "umbrella": {"maxConcurrency": 1}}
DIGEST = "0" * 64


@dataclass
class Pool:
    namespace: str
    gateway: str                                   # the gateway's public URL
    ops: str                                       # its metrics and detailed-readiness URL
    replicas: dict[str, ManagedProcess]            # pod name -> its runtime process
    urls: dict[str, str]                           # pod name -> its runtime's URL
    procs: list[ManagedProcess] = field(default_factory=list)

    def client(self, tenant: str | None = None, key: str | None = None) -> httpx.Client:
        key = key if key is not None else (KEYS[tenant] if tenant else None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.gateway, headers=headers, timeout=60)

    def view(self) -> dict:
        return httpx.get(f"{self.ops}/readyz", timeout=5).json()["replicas"]

    def metrics(self) -> str:
        return httpx.get(f"{self.ops}/metrics", timeout=5).text


@pytest.fixture(scope="module")
def gw_adapters(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from support.models import make_generation_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("gateway-pool")
    model = make_tiny_llama(root / "model")
    base = AutoModelForCausalLM.from_pretrained(str(model))
    for i, name in enumerate(ADAPTERS):
        make_generation_adapter(model, root / "adapters" / name, seed=500 + i, r=4, alpha=8, base_model=base)
    return model, root / "adapters"


@pytest.fixture(scope="module")
def pool(control_plane, kube, gw_adapters, tmp_path_factory):
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace, Pod
    from lightkube.types import PatchType

    from lorafleet.gateway.kube import LoRAAdapterResource, LoRATenantResource

    model, adapters = gw_adapters
    logs = tmp_path_factory.mktemp("gateway-logs")
    ns = f"gw-{uuid.uuid4().hex[:8]}"
    kube.create(Namespace(metadata=ObjectMeta(name=ns)))
    procs: list[ManagedProcess] = []
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    try:
        replicas, urls = {}, {}
        for i in range(3):
            port = free_port()
            name = f"{POOL}-replica-{i}"
            p = ManagedProcess(name, [sys.executable, "-m", "lorafleet", "serve", "--model", str(model),
                                      "--adapters", str(adapters), "--host", "127.0.0.1", "--port", str(port),
                                      "--admin-port", str(free_port()), "--metrics-port", str(free_port()),
                                      "--max-batch-delay-ms", "1",
                                      "--log-level", "warning"], logs / f"{name}.log", env=env)
            procs.append(p)
            replicas[name], urls[name] = p, f"http://127.0.0.1:{port}"
        for name, p in replicas.items():
            p.wait_until(lambda: httpx.get(f"{urls[name]}/readyz", timeout=2).status_code == 200, 120, "ready")
            kube.create(Pod(metadata=ObjectMeta(
                name=name, namespace=ns, labels=names.pod_selector(POOL),
                annotations={"lorafleet.io/local-ports": json.dumps({"8000": int(urls[name].rsplit(":", 1)[1])})}),
                spec=PodSpec(containers=[Container(name="runtime", image="lorafleet/runtime:0.1.0")])))
            kube.patch(Pod.Status, name, {"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True"}]}}, namespace=ns, patch_type=PatchType.MERGE)
        # A pod of another pool and a pod that is not Ready: the gateway must ignore both.
        kube.create(Pod(metadata=ObjectMeta(name="other-pool-pod", namespace=ns, labels=names.pod_selector("other")),
                        spec=PodSpec(containers=[Container(name="runtime", image="x")])))
        for served, tenant in ADAPTERS.items():
            kube.create(LoRAAdapterResource(metadata=ObjectMeta(name=f"{served}-cr", namespace=ns), spec={
                "pool": POOL, "tenant": tenant, "servedName": served, "version": "1",
                "source": {"uri": f"s3://adapters/{served}/1/", "sha256": DIGEST}}))
        # Another pool's adapter of tenant acme: not this gateway's.
        kube.create(LoRAAdapterResource(metadata=ObjectMeta(name="elsewhere", namespace=ns), spec={
            "pool": "other", "tenant": "acme", "version": "1",
            "source": {"uri": "s3://adapters/elsewhere/1/", "sha256": DIGEST}}))
        for tenant, key in KEYS.items():
            kube.create(LoRATenantResource(metadata=ObjectMeta(name=tenant, namespace=ns), spec={
                "apiKeys": [key_entry(key)], **LIMITS.get(tenant, {})}))

        gw_port, ops_port = free_port(), free_port()
        gw = ManagedProcess("gateway", [sys.executable, "-m", "lorafleet", "gateway", "--namespace", ns, "--pool", POOL,
                                        "--host", "127.0.0.1", "--port", str(gw_port),
                                        "--metrics-port", str(ops_port), "--spill-inflight", "2",
                                        "--poll-s", "0.3", "--replica-poll-s", "0.2", "--log-level", "warning"],
                            logs / "gateway.log", env={"KUBECONFIG": str(control_plane.kubeconfig)})
        procs.append(gw)
        url, ops = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{ops_port}"

        def all_up():
            r = httpx.get(f"{ops}/readyz", timeout=2)
            view = r.json().get("replicas", {})
            return r.status_code == 200 and sorted(view) == sorted(replicas) and \
                all(v["healthy"] and v["adapters"] == len(ADAPTERS) for v in view.values())
        gw.wait_until(all_up, 60, "routing to 3 replicas")
        yield Pool(ns, url, ops, replicas, urls, procs)
    finally:
        for p in procs:
            p.stop()
        kube.delete(Namespace, ns)


os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

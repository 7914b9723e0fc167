"""The gateway reads the API server by list-then-watch, not by polling: a new tenant key, an adapter
added or removed and a pod turning Ready take effect within a watch event while ``--poll-s`` is ten
minutes, and an idle gateway makes no LIST request at all (counted on the API server's /metrics). Cut
off from the API server it keeps serving its last view; when the server is back having compacted past
its watches (410 Gone), it lists again once per watch and catches up, deletions from the gap included.

The module runs its own API server (watch cache off, no controller manager) so that compaction
expires watches at once and its request counts are the gateway's alone."""

from __future__ import annotations

import json
import sys
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
from support.apiserver_faults import CuttableProxy, compact_etcd, list_requests
from support.tenants import key_entry

from lorafleet.contracts import names
from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for

POOL = "tiny"
WATCHED = ("pods", "loratenants", "loraadapters")
PROMPT = "hello world , how are"


@dataclass
class Watched:
    namespace: str
    gateway: str
    ops: str
    runtime_port: int
    proxy: CuttableProxy
    cp: object
    kube: object

    def complete(self, key: str, model: str) -> httpx.Response:
        return httpx.post(f"{self.gateway}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                          json={"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}, timeout=30)

    def readyz(self) -> httpx.Response:
        return httpx.get(f"{self.ops}/readyz", timeout=5)

    def lists(self) -> dict[str, int]:
        found = list_requests(self.cp)
        return {r: found.get(r, 0) for r in WATCHED}

    def tenant(self, name: str, key: str) -> None:
        from lightkube.models.meta_v1 import ObjectMeta

        from lorafleet.contracts.kubeio import LoRATenantResource

        self.kube.create(LoRATenantResource(metadata=ObjectMeta(name=name, namespace=self.namespace),
                                            spec={"apiKeys": [key_entry(key)]}))

    def adapter(self, served: str, tenant: str) -> None:
        from lightkube.models.meta_v1 import ObjectMeta

        from lorafleet.contracts.kubeio import LoRAAdapterResource

        self.kube.create(LoRAAdapterResource(metadata=ObjectMeta(name=f"{served}-cr", namespace=self.namespace), spec={
            "pool": POOL, "tenant": tenant, "servedName": served, "version": "1",
            "source": {"uri": f"s3://adapters/{served}/1/", "sha256": "0" * 64}}))

    def ready_pod(self, name: str) -> None:
        from lightkube.models.core_v1 import Container, PodSpec
        from lightkube.models.meta_v1 import ObjectMeta
        from lightkube.resources.core_v1 import Pod
        from lightkube.types import PatchType

        self.kube.create(Pod(metadata=ObjectMeta(
            name=name, namespace=self.namespace, labels=names.pod_selector(POOL),
            annotations={"lorafleet.io/local-ports": json.dumps({"8000": self.runtime_port})}),
            spec=PodSpec(containers=[Container(name="runtime", image="lorafleet/runtime:0.1.0")])))
        self.kube.patch(Pod.Status, name, {"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True"}]}}, namespace=self.namespace, patch_type=PatchType.MERGE)


@pytest.fixture(scope="module")
def watched(uncached_control_plane, uncached_kube, gw_adapters, tmp_path_factory):
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace, ServiceAccount

    cp, kube = uncached_control_plane, uncached_kube
    model, adapters = gw_adapters
    logs = tmp_path_factory.mktemp("gateway-watch")
    ns = f"gw-watch-{uuid.uuid4().hex[:6]}"
    kube.create(Namespace(metadata=ObjectMeta(name=ns)))
    # No controller manager here: the ServiceAccount admission wants for pods is made by hand.
    kube.create(ServiceAccount(metadata=ObjectMeta(name="default", namespace=ns)))
    proxy = CuttableProxy(cp.api_port)
    procs: list[ManagedProcess] = []
    try:
        port = free_port()
        runtime = ManagedProcess("runtime", [sys.executable, "-m", "lorafleet", "serve", "--model", str(model),
                                             "--adapters", str(adapters), "--host", "127.0.0.1", "--port", str(port),
                                             "--admin-port", str(free_port()), "--metrics-port", str(free_port()),
                                             "--max-batch-delay-ms", "1", "--log-level", "warning"],
                                 logs / "runtime.log", env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                                                            "OMP_NUM_THREADS": "1"})
        procs.append(runtime)
        runtime.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200,
                           120, "ready")
        w = Watched(ns, "", "", port, proxy, cp, kube)
        w.ready_pod(f"{POOL}-0")
        w.tenant("acme", "acme-key-1")
        w.adapter("acme-support", "acme")

        gw_port, ops_port = free_port(), free_port()
        kubeconfig = proxy.kubeconfig(cp.kubeconfig, logs / "proxied.kubeconfig")
        gw = ManagedProcess("gateway", [sys.executable, "-m", "lorafleet", "gateway", "--namespace", ns,
                                        "--pool", POOL, "--host", "127.0.0.1", "--port", str(gw_port),
                                        "--metrics-port", str(ops_port), "--poll-s", "600",
                                        "--replica-poll-s", "0.2", "--log-level", "info"],
                            logs / "gateway.log", env={"KUBECONFIG": str(kubeconfig)})
        procs.append(gw)
        w.gateway, w.ops = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{ops_port}"
        gw.wait_until(lambda: w.readyz().status_code == 200, 60, "ready")
        yield w
    finally:
        for p in procs:
            p.stop()
        proxy.close()


def test_changes_take_effect_from_watch_events_and_an_idle_gateway_lists_nothing(watched):
    w = watched
    before = w.lists()
    assert w.complete("acme-key-1", "acme-support").status_code == 200

    # --poll-s is 600: only a watch event can bring each change in within seconds.
    w.tenant("globex", "globex-key-1")
    wait_for(lambda: w.complete("globex-key-1", "acme-support").status_code == 403, 5,
             what="the new tenant's key to be known (403: not its adapter, instead of 401)")
    w.adapter("globex-bot", "globex")
    wait_for(lambda: w.complete("globex-key-1", "globex-bot").status_code == 200, 5,
             what="the new adapter to be routed for its tenant")
    from lightkube.resources.core_v1 import Pod

    from lorafleet.contracts.kubeio import LoRAAdapterResource

    w.kube.delete(LoRAAdapterResource, "globex-bot-cr", namespace=w.namespace)
    wait_for(lambda: w.complete("globex-key-1", "globex-bot").status_code == 404, 5,
             what="the deleted adapter to be refused")
    w.ready_pod(f"{POOL}-1")
    wait_for(lambda: sorted(w.readyz().json()["replicas"]) == [f"{POOL}-0", f"{POOL}-1"], 5,
             what="the gateway to route to the new Ready pod")
    w.kube.delete(Pod, f"{POOL}-1", namespace=w.namespace, grace_period=0)
    wait_for(lambda: sorted(w.readyz().json()["replicas"]) == [f"{POOL}-0"], 5,
             what="the gateway to drop the deleted pod")

    time.sleep(3)  # idle: a polling gateway would list pods, tenants and adapters meanwhile
    after = w.lists()
    assert after == before, f"LIST requests while the gateway only watched: {before} -> {after}"


def test_cut_off_it_keeps_serving_its_last_view_and_catches_up_after_410(watched):
    from lightkube.resources.core_v1 import Pod

    from lorafleet.contracts.kubeio import LoRATenantResource

    w = watched
    w.tenant("hooli", "hooli-key-1")
    wait_for(lambda: w.complete("hooli-key-1", "acme-support").status_code == 403, 5, what="tenant hooli known")
    before = w.lists()
    w.proxy.cut()
    try:
        # The API server is unreachable for the gateway; meanwhile the cluster changes ...
        w.tenant("initech", "initech-key-1")
        w.kube.delete(LoRATenantResource, "hooli", namespace=w.namespace)
        w.ready_pod(f"{POOL}-2")
        # ... and the gateway answers from what it saw last, for longer than its informers' first retries.
        deadline = time.monotonic() + 4
        codes = []
        while time.monotonic() < deadline:
            codes.append(w.complete("acme-key-1", "acme-support").status_code)
            codes.append(w.complete("hooli-key-1", "acme-support").status_code)
            time.sleep(0.2)
        assert set(codes) == {200, 403}, codes
        assert w.readyz().status_code == 200
        compact_etcd(w.cp)  # every resourceVersion the gateway holds is gone: its watches get 410
    finally:
        w.proxy.restore()
    wait_for(lambda: w.complete("initech-key-1", "acme-support").status_code == 403, 30,
             what="the tenant made while cut off to be known")
    wait_for(lambda: w.complete("hooli-key-1", "acme-support").status_code == 401, 10,
             what="the tenant deleted while cut off to be gone (only a fresh list can tell)")
    wait_for(lambda: sorted(w.readyz().json()["replicas"]) == [f"{POOL}-0", f"{POOL}-2"], 10,
             what="the pod made Ready while cut off to be routed to")
    assert w.complete("acme-key-1", "acme-support").status_code == 200
    # One list per informer after 410 (pool pods and gateway pods, tenants, adapters), each once its
    # backoff since the cut has passed; then none.
    expected = {"pods": 2, "loratenants": 1, "loraadapters": 1}

    def relists() -> dict[str, int]:
        return {r: n - before[r] for r, n in w.lists().items()}
    try:
        wait_for(lambda: relists() == expected, 30, interval=0.5, what=f"one list per informer: {expected}")
    finally:
        print("LIST requests since the cut:", relists())
    time.sleep(2)
    assert relists() == expected
    w.kube.delete(Pod, f"{POOL}-2", namespace=w.namespace, grace_period=0)

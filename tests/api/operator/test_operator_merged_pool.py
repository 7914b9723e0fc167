"""A hot tenant on a merged, dedicated pool, with the real operator, API server, runtimes and gateway:
the operator writes the shared pool's routes naming the merged pool, the adapter's status with both
pools and the merged pool's Deployment with the adapter version; the gateway sends the tenant's
requests to the merged pool while it has Ready replicas and to the shared pool when it scales to 0,
failing none of them; a new adapter version rolls the merged pool's pod template."""

from __future__ import annotations

import json
import sys
import threading

import httpx
import pytest

from lf_operator_kit import adapter_doc, apply, get_json, make_pod, pool_doc, wait_routes, wait_status
from lorafleet.contracts import names
from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for
from support.models import make_generation_adapter, put_adapter, start_runtime
from support.tenants import key_entry

KEY = "acme-key-merged"
MODEL = {"uri": "s3://models/tiny/", "sha256": "a" * 64, "task": "text-generation"}
PROMPT = "hello world , how are"


def _serve_as_pod(kube, namespace, pool, name, url, ready=True, sync=None, env=None):
    """A pod of ``pool`` whose runtime is ``url`` (the local stack's port annotation), as the test
    plays the node and the sidecar."""
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    make_pod(kube, namespace, pool, name, ready=ready, sync=sync, env=env)
    kube.patch(Pod, name, {"metadata": {"annotations": {
        "lorafleet.io/local-ports": json.dumps({str(names.RUNTIME_PORT): int(url.rsplit(":", 1)[1])})}}},
        namespace=namespace, patch_type=PatchType.MERGE)


def _env(dep, container="containers"):
    return {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"][container][0]["env"]}


@pytest.fixture
def runtimes(tiny_llama, tmp_path):
    hot = make_generation_adapter(tiny_llama, tmp_path / "hot", seed=21, r=4, alpha=16)
    shared = start_runtime(tiny_llama, served_model_name="chat-shared")
    merged = start_runtime(tiny_llama, served_model_name="chat-hot", merged_adapter_dir=str(hot),
                           merged_adapter_name="acme-chat", merged_adapter_version="2", merged_adapter_tenant="acme")
    alive = [shared, merged]
    try:
        with httpx.Client(base_url=shared.admin_url) as admin:
            assert put_adapter(admin, "acme-chat", "2", hot, tenant="acme").status_code == 200
        for srv in (shared, merged):
            httpx.put(f"{srv.admin_url}/admin/sync", json={"routesGeneration": 1, "preloadPending": 0})
        yield hot, shared, merged, alive
    finally:
        for srv in alive:
            srv.stop()


def test_the_merged_pool_takes_the_tenants_requests_while_ready_and_the_shared_pool_covers(
        control_plane, operator, namespace, kube, runtimes, tmp_path):
    hot, shared, merged, alive = runtimes
    sha = directory_digest(hot)
    apply(control_plane, namespace, {"apiVersion": names.API_VERSION, "kind": names.TENANT_KIND,
                                     "metadata": {"name": "acme"},
                                     "spec": {"sources": ["s3://adapters/"], "apiKeys": [key_entry(KEY)]}})
    apply(control_plane, namespace, pool_doc("chat-shared", replicas=1, model=MODEL))
    apply(control_plane, namespace, pool_doc("chat-hot", replicas=1,
                                             model={**MODEL, "mergedAdapter": {"name": "chat"}}))
    apply(control_plane, namespace, adapter_doc("chat", "chat-shared", version="2", sha=sha, servedName="acme-chat"))

    # The operator: the shared pool's routes name the merged pool; the merged pool's pods merge v2.
    t = wait_routes(kube, namespace, "chat-shared", lambda t: "acme-chat" in t.adapters
                    and t.adapters["acme-chat"].merged is not None, "the routes entry naming the merged pool")
    assert t.adapters["acme-chat"].merged.model_dump() == {"pool": "chat-hot", "version": "2"}
    dep = wait_for(lambda: get_json(control_plane, namespace, "deployment", "lorafleet-chat-hot"), 30,
                   what="the merged pool's Deployment")
    env = _env(dep)
    assert (env["LORAFLEET_MERGED_ADAPTER_NAME"], env["LORAFLEET_MERGED_ADAPTER_VERSION"]) == ("acme-chat", "2")
    assert env["LORAFLEET_MERGED_ADAPTER_DIR"].endswith(f"/adapters/{sha}")
    assert _env(dep, "initContainers")["MERGED_ADAPTER_SHA256"] == sha
    st = wait_status(control_plane, namespace, "lfpool", "chat-hot", lambda s: s.get("mergedAdapter"),
                     what="the merged pool's status")
    assert st["mergedAdapter"] == "acme-chat@2"
    # The merged pool's routes hold nothing: it serves its merged adapter only.
    assert wait_routes(kube, namespace, "chat-hot", lambda t: t.generation >= 0, "merged routes").adapters == {}

    # Pods: one of each pool, Ready, each backed by a real runtime.
    gen = t.generation
    _serve_as_pod(kube, namespace, "chat-shared", "chat-shared-0", shared.url, sync={"generation": gen, "loaded": 1})
    _serve_as_pod(kube, namespace, "chat-hot", "chat-hot-0", merged.url, sync={"generation": 0, "loaded": 0},
                  env={"LORAFLEET_MERGED_ADAPTER_DIR": env["LORAFLEET_MERGED_ADAPTER_DIR"]})
    st = wait_status(control_plane, namespace, "lora", "chat",
                     lambda s: [p.get("readyReplicas") for p in s.get("pools") or []] == [1, 1],
                     what="the adapter's status with both pools ready")
    assert [(p["pool"], p["role"]) for p in st["pools"]] == [("chat-shared", "shared"), ("chat-hot", "merged")]
    assert st["pools"][1]["version"] == "2"

    gw_port, ops_port = free_port(), free_port()
    gw = ManagedProcess("gateway", [sys.executable, "-m", "lorafleet", "gateway", "--namespace", namespace,
                                    "--pool", "chat-shared", "--host", "127.0.0.1", "--port", str(gw_port),
                                    "--metrics-port", str(ops_port), "--poll-s", "0.2", "--replica-poll-s", "0.1",
                                    "--log-level", "warning"],
                        tmp_path / "gateway.log", env={"KUBECONFIG": str(control_plane.kubeconfig)})
    try:
        c = httpx.Client(base_url=f"http://127.0.0.1:{gw_port}", headers={"Authorization": f"Bearer {KEY}"},
                         timeout=30)
        body = {"model": "acme-chat", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}

        def pool_answering():
            r = c.post("/v1/completions", json=body)
            return r.headers.get("x-lorafleet-pool") if r.status_code == 200 else None
        gw.wait_until(lambda: pool_answering() == "chat-hot", 60, "the gateway sending acme-chat to the merged pool")
        r = c.post("/v1/completions", json=body)
        assert r.json()["model"] == "acme-chat@2" and r.headers["x-lorafleet-replica"] == "chat-hot-0"
        # A pinned version the merged pool holds goes there too; the base model stays on the shared pool.
        assert c.post("/v1/completions", json={**body, "model": "acme-chat@2"}).headers["x-lorafleet-pool"] == "chat-hot"
        base = c.post("/v1/completions", json={**body, "model": "chat-shared"})
        assert base.status_code == 200 and base.headers["x-lorafleet-pool"] == "chat-shared"
        metrics = httpx.get(f"http://127.0.0.1:{ops_port}/metrics").text
        assert 'lorafleet_gateway_pool_choice_total{pool="chat-hot",role="merged",tenant="acme"}' in metrics

        # The merged pool scales to 0 (its pod leaves, unready first) while requests keep coming: none fails.
        answers: list[tuple[int, str | None]] = []
        stop = threading.Event()

        def traffic():
            with httpx.Client(base_url=c.base_url, headers=dict(c.headers), timeout=30) as tc:
                while not stop.is_set():
                    r = tc.post("/v1/completions", json=body)
                    answers.append((r.status_code, r.headers.get("x-lorafleet-pool")))
        th = threading.Thread(target=traffic)
        th.start()
        try:
            wait_for(lambda: len(answers) >= 3, 30, what="traffic through the gateway")
            apply(control_plane, namespace, pool_doc("chat-hot", replicas=0,
                                                     model={**MODEL, "mergedAdapter": {"name": "chat"}}))
            from lf_operator_kit import set_pod

            set_pod(kube, namespace, "chat-hot-0", ready=False)
            alive.remove(merged)
            merged.stop()  # the pod's runtime is gone too: a request already routed there must be retried
            wait_for(lambda: answers and answers[-1][1] == "chat-shared", 30, what="requests answered by the shared pool")
            n = len(answers)
            wait_for(lambda: len(answers) >= n + 3, 30, what="more traffic on the shared pool")
        finally:
            stop.set()
            th.join(30)
        assert [a for a in answers if a[0] != 200] == [], answers
        assert {p for _, p in answers} == {"chat-hot", "chat-shared"}
        st = wait_status(control_plane, namespace, "lora", "chat",
                         lambda s: (s.get("pools") or [{}, {}])[1].get("readyReplicas") == 0,
                         what="the merged pool's 0 Ready replicas in the adapter's status")
        assert st["pools"][1]["replicas"] == 0
    finally:
        gw.stop()

    # A new version of the adapter rolls the merged pool's pod template.
    apply(control_plane, namespace, adapter_doc("chat", "chat-shared", version="3", sha="c" * 64,
                                                servedName="acme-chat"))
    dep = wait_for(lambda: (d := get_json(control_plane, namespace, "deployment", "lorafleet-chat-hot"))
                   and _env(d)["LORAFLEET_MERGED_ADAPTER_VERSION"] == "3" and d, 30, what="the template at version 3")
    assert _env(dep)["LORAFLEET_MERGED_ADAPTER_DIR"].endswith("/adapters/" + "c" * 64)
    wait_status(control_plane, namespace, "lora", "chat", lambda s: s["pools"][1]["version"] == "3",
                what="the adapter's status naming the merged pool at version 3")

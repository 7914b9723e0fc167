"""A base model the runtime refuses shows on the pool: a real runtime on a tiny seeded Mixtral (routed
experts: refused by the generation engine) stays up to say why on its admin API, the real sidecar puts
that on its pod's sync report, and the operator writes ModelReady=False (ModelRefused, the runtime's
own message) and phase Failed, which `kubectl get lfpool` shows; the runtime's /readyz stays 503
with the same reason, so the pod never turns Ready."""

from __future__ import annotations

import httpx

from lorafleet.contracts import names
from lorafleet.contracts.routes import SyncReport
from lorafleet.localstack.procs import wait_for

from lf_operator_kit import SHA, apply, cond, make_pod, pool_doc, wait_status

POOL, POD = "moe", "lorafleet-moe-runtime-0"


def test_a_refused_base_model_is_the_pools_status_and_the_pod_never_ready(control_plane, operator, namespace,
                                                                          kube, tmp_path):
    from lightkube.resources.core_v1 import Pod

    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.server import RuntimeServer
    from lorafleet.runtime.settings import RuntimeSettings
    from lorafleet.sidecar.app import Sidecar
    from lorafleet.sidecar.cli import parse_args
    from support.models import make_tiny_mixtral

    model = make_tiny_mixtral(tmp_path / "mixtral")
    apply(control_plane, namespace, pool_doc(POOL, replicas=1, model={
        "uri": "s3://models/mixtral/", "sha256": SHA["a"], "task": "text-generation"}))
    make_pod(kube, namespace, POOL, POD, ready=False)

    # As `lorafleet runtime` starts: the servers first, the model loaded in the background.
    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(model)))
    srv = RuntimeServer(rt).start()
    rt.load_in_background()
    sc = None
    try:
        cache = tmp_path / "cache"
        cache.mkdir()
        sc = Sidecar.from_args(parse_args([
            "--pool", POOL, "--namespace", namespace, "--pod", POD, "--cache-dir", str(cache),
            "--runtime-admin-url", srv.admin_url, "--kubeconfig", str(control_plane.kubeconfig),
            "--metrics-port", "0", "--health-port", "0", "--poll-interval", "0.3", "--task", "text-generation"])).start()

        def report():
            ann = kube.get(Pod, POD, namespace=namespace).metadata.annotations or {}
            r = SyncReport.from_annotation(ann.get(names.SYNC_ANNOTATION))
            return r if r is not None and r.runtime_model == "refused" else None

        r = wait_for(report, 60, interval=0.2, what="the sidecar reporting the runtime's refusal")
        assert "MixtralForCausalLM" in r.model_error and "mixture-of-experts" in r.model_error

        st = wait_status(control_plane, namespace, "lfpool", POOL,
                         lambda s: cond(s, "ModelReady").get("reason") == "ModelRefused", timeout=60,
                         what="the pool's ModelReady=False ModelRefused")
        c = cond(st, "ModelReady")
        assert c["status"] == "False"
        # The runtime's own message: the architecture, why, and what to use instead.
        for part in ("MixtralForCausalLM", "mixture-of-experts", "Supported: Llama", POD):
            assert part in c["message"], c["message"]
        assert st["phase"] == "Failed" and "MixtralForCausalLM" in st["message"]
        assert cond(st, "Ready")["status"] == "False"

        table = control_plane.kubectl("get", "lfpool", POOL, "-n", namespace).stdout
        assert "ModelRefused" in table and "Failed" in table, table
        wide = control_plane.kubectl("get", "lfpool", POOL, "-n", namespace, "-o", "wide").stdout
        assert "MixtralForCausalLM" in wide, wide

        # What the kubelet's readiness probe gets: 503 with the same reason, for as long as it runs.
        ready = httpx.get(srv.url + "/readyz")
        assert ready.status_code == 503 and "MixtralForCausalLM" in ready.text
        model_status = httpx.get(srv.admin_url + "/admin/model").json()
        assert model_status["state"] == "refused" and model_status["task"] == "text-generation"
    finally:
        if sc is not None:
            sc.stop()
        srv.stop()

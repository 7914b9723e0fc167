"""A permanent refusal (the content itself is refused, by the sidecar's adapter rules or by the
runtime) reaches the LoRAAdapter's status through the sync report and the real operator, and is not
tried again (no second download, no second load) until the adapter's spec names other content."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "operator"))

from lf_operator_kit import Operator, adapter_doc, apply, cond, make_pod, pool_doc, tenant_doc, wait_status  # noqa: E402
from lorafleet.localstack.procs import wait_for  # noqa: E402
from sidecar_api_support import POOL, digest, sync_report, upload_dir  # noqa: E402
from support.peft_dirs import write_adapter  # noqa: E402


@pytest.fixture(scope="module")
def operator(control_plane, tmp_path_factory):
    op = Operator(control_plane.kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log").start()
    yield op
    op.stop()
    assert "Traceback" not in op.text(), op.text()[-5000:]


@pytest.fixture
def pod(kube, namespace):
    """One Ready pod of the pool, as the operator sees pool pods (the sidecar under test reports on it)."""
    name = f"{POOL}-0"
    make_pod(kube, namespace, POOL, name, ready=True)
    return name


def test_a_permanent_refusal_shows_on_the_adapter_and_is_not_retried(control_plane, operator, kube, namespace, pod,
                                                                     s3, bucket, tmp_path, runtime, start_sidecar):
    apply(control_plane, namespace, tenant_doc("acme", f"s3://{bucket}/acme/"))
    apply(control_plane, namespace, pool_doc(POOL, replicas=1))
    good = write_adapter(tmp_path / "good", seed=1)
    # DoRA: the runtime cannot compute it; the sidecar once let it through and the runtime's refusal
    # was retried for ever. Now the shared rules refuse it in the sidecar, after one download.
    dora = write_adapter(tmp_path / "dora", seed=2, config={"use_dora": True})
    # Content only the runtime can judge (e.g. a module that is not a Linear layer in the loaded
    # model): the stand-in runtime refuses it as the real one does, with errorKind "permanent".
    odd = write_adapter(tmp_path / "odd", seed=3)
    docs = {}
    for name, d in (("good", good), ("dora", dora), ("odd", odd)):
        uri = upload_dir(s3, bucket, d, f"acme/{name}/1/")
        docs[name] = adapter_doc(name, POOL, version="1", sha=digest(d), source={"uri": uri, "sha256": digest(d)})
        apply(control_plane, namespace, docs[name])
    runtime.refuse["odd@1"] = "module bert.pooler.dense: is a Conv1D in the base model; LoRA is served on Linear only"
    runtime.refuse_kind["odd@1"] = "permanent"
    sc = start_sidecar()

    st = wait_status(control_plane, namespace, "lora", "dora", lambda s: s.get("phase") == "Failed", timeout=60,
                     what="the DoRA adapter Failed on its CR")
    assert "DoRA is not supported" in st["message"] and cond(st, "Ready")["reason"] == "LoadFailed"
    st = wait_status(control_plane, namespace, "lora", "odd", lambda s: s.get("phase") == "Failed", timeout=60,
                     what="the runtime-refused adapter Failed on its CR")
    assert "is a Conv1D in the base model" in st["message"] and "attempt" not in st["message"]
    wait_status(control_plane, namespace, "lora", "good", lambda s: s.get("phase") == "Ready", timeout=60,
                what="the good adapter Ready")

    def downloaded_bytes() -> float:
        return sc.metrics.registry.get_sample_value("lorafleet_sidecar_download_bytes_total")

    downloaded = downloaded_bytes()
    sizes = sum(p.stat().st_size for d in (good, dora, odd) for p in d.iterdir())
    assert downloaded == sizes, "each adapter downloaded once"
    time.sleep(5)  # retries back off from 0.2 s to at most 2 s here (--retry-base/--retry-max)
    assert downloaded_bytes() == downloaded, "a refused adapter is never downloaded again"
    assert runtime.puts.count("odd@1") == 1 and "dora@1" not in runtime.puts, runtime.puts
    report = sync_report(kube, namespace, pod)
    assert "(attempt" not in report.failure("dora", "1") and "(attempt" not in report.failure("odd", "1")

    # A new spec (other content) is tried afresh.
    fixed = write_adapter(tmp_path / "dora2", seed=4)
    uri = upload_dir(s3, bucket, fixed, "acme/dora/2/")
    apply(control_plane, namespace, adapter_doc("dora", POOL, version="2", sha=digest(fixed),
                                                source={"uri": uri, "sha256": digest(fixed)}))
    wait_status(control_plane, namespace, "lora", "dora", lambda s: s.get("phase") == "Ready"
                and s.get("servedVersion") == "2", timeout=60, what="dora@2 Ready")
    assert wait_for(lambda: "dora@2" in runtime.loaded(), 10, what="dora@2 loaded")

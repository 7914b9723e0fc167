"""Tenant sources end to end: the real operator plans the routes from LoRAAdapters and LoRATenants, a
real sidecar syncs them from MinIO. An adapter whose source lies in another tenant's folder (the
object exists, the sidecar could read it) is refused on its status and never downloaded: not in the
cache, not loaded, not even pending in the sidecar's report."""

from __future__ import annotations

import json
import sys

from lorafleet.contracts import names
from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for

from sidecar_api_support import POOL, digest, sync_report, upload_dir
from support.peft_dirs import write_adapter


def test_an_adapter_outside_its_tenants_sources_is_never_downloaded(control_plane, kube, namespace, pod, s3, bucket,
                                                                     minio_server, tmp_path, cache_dir, runtime,
                                                                     start_sidecar):
    import urllib.request

    own = write_adapter(tmp_path / "own", seed=1)
    other = write_adapter(tmp_path / "other", seed=2)
    own_uri, own_sha = upload_dir(s3, bucket, own, "acme/own/1/"), digest(own)
    other_uri, other_sha = upload_dir(s3, bucket, other, "beta/secret/1/"), digest(other)

    def apply(doc: dict) -> None:
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))

    apply({"apiVersion": names.API_VERSION, "kind": names.TENANT_KIND, "metadata": {"name": "acme"},
           "spec": {"sources": [f"s3://{bucket}/acme/"]}})
    apply({"apiVersion": names.API_VERSION, "kind": names.POOL_KIND, "metadata": {"name": POOL}, "spec": {
        "model": {"uri": "s3://models/m/", "sha256": "a" * 64, "task": "sequence-classification"}, "replicas": 1,
        "storage": {"endpoint": minio_server.endpoint}}})
    for name, uri, sha in (("own", own_uri, own_sha), ("steal", other_uri, other_sha)):
        apply({"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND, "metadata": {"name": name},
               "spec": {"pool": POOL, "tenant": "acme", "version": "1", "source": {"uri": uri, "sha256": sha}}})

    port = free_port()
    op = ManagedProcess("lorafleet-operator", [
        sys.executable, "-m", "lorafleet", "operator", f"--namespace={namespace}",
        f"--liveness=http://127.0.0.1:{port}/healthz"], tmp_path / "operator.log",
        env={"KUBECONFIG": str(control_plane.kubeconfig)})
    try:
        op.wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).status == 200,
                      60, "live")

        def steal_refused():
            got = json.loads(control_plane.kubectl("get", "lora", "steal", "-n", namespace, "-o", "json").stdout)
            valid = next((c for c in (got.get("status") or {}).get("conditions") or [] if c["type"] == "Valid"), {})
            return valid if valid.get("status") == "False" else None

        valid = wait_for(steal_refused, 30, what="steal Valid=False")
        assert valid["message"].startswith("spec.source.uri: ") and other_uri in valid["message"]

        start_sidecar()

        def own_loaded():
            r = sync_report(kube, namespace, pod)
            return r if r and r.loaded >= 1 and r.has_loaded("own", "1", since=0) else None

        report = wait_for(own_loaded, 60, what="acme's own adapter loaded by the sidecar")
        # One more pass of the sync loop cannot add it: it is not in the routes at all.
        assert report.loaded == 1 and report.pending == [] and report.failed == {}
        assert {p.name for p in (cache_dir / "adapters").iterdir()} == {own_sha}
        assert other_sha not in runtime.loaded().values() and list(runtime.loaded()) == ["own@1"]
    finally:
        op.stop()
    assert "Traceback" not in op.log.read_text()

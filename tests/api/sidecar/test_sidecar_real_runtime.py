"""The sidecar with the real runtime (``lorafleet runtime``, MiniLM): the runtime waits for the model
directory the sidecar pulls, a real PEFT adapter passes validation and is loaded, and the pod turns
ready and classifies with it."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from lorafleet.localstack.procs import free_port, wait_for

from sidecar_api_support import digest, sync_report, upload_dir


def test_sidecar_feeds_the_real_runtime(kube, namespace, pod, s3, bucket, tmp_path, cache_dir, routes,
                                        control_plane, minio_server, monkeypatch):
    from support.models import make_classification_adapter, minilm_path

    model = minilm_path()
    model_uri, model_sha = upload_dir(s3, bucket, model, "models/minilm/"), digest(model)
    ad = make_classification_adapter(model, tmp_path / "support", labels=["billing", "bug", "praise"], seed=3)
    routes.set("acme-support", [("1", upload_dir(s3, bucket, ad, "acme/support/1/"), digest(ad), 100)])
    g = routes.write()

    port, admin = free_port(), free_port()
    log = open(tmp_path / "runtime.log", "ab")
    runtime = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "runtime", "--port", str(port), "--admin-port", str(admin),
         "--metrics-port", str(free_port()), "--log-level", "warning"],
        env={**os.environ, "LORAFLEET_MODEL_DIR": str(cache_dir / "models" / model_sha),
             "LORAFLEET_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        stdout=log, stderr=subprocess.STDOUT)
    try:
        from lorafleet.sidecar.app import Sidecar
        from lorafleet.sidecar.cli import parse_args
        from sidecar_api_support import sidecar_argv

        class _Url:
            url = f"http://127.0.0.1:{admin}"

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_server.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_server.secret_key)
        args = parse_args(sidecar_argv(control_plane, minio_server, namespace, pod, cache_dir, _Url,
                                       "--model-uri", model_uri, "--model-sha256", model_sha))
        sc = Sidecar.from_args(args).start()
        try:
            r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.loaded == 1
                         and r, 180, interval=0.2, what="the adapter loaded into the real runtime")
            assert r.model_ready is True and r.failed == {}
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                wait_for(lambda: c.get("/readyz").status_code == 200, 60, what="runtime ready")
                res = c.post("/v1/classify", json={"model": "acme-support", "input": "the invoice is wrong"})
                assert res.status_code == 200, res.text
                assert "billing" in res.text
                assert c.post("/v1/classify", json={"model": "nobody", "input": "x"}).status_code == 404
        finally:
            sc.stop()
    finally:
        runtime.terminate()
        runtime.wait(30)
        log.close()

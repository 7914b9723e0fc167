"""A merged pool's pod: the sidecar fetches and verifies the merged adapter next to the base model
before the model counts as ready, never collects it, and the real runtime (``lorafleet runtime``)
merges it at load and answers as it with PEFT's merged model's tokens."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import torch

from lorafleet.localstack.procs import free_port, wait_for

from sidecar_api_support import digest, sync_report, upload_dir

PROMPT = "hello world , how are"
NEW = 6


@torch.inference_mode()
def _peft_merged_text(base, adapter) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = m.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            pad_token_id=0)
    return tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def test_sidecar_fetches_the_merged_adapter_before_the_runtime_merges_it(kube, namespace, pod, s3, bucket, tmp_path,
                                                                         cache_dir, routes, control_plane,
                                                                         minio_server, monkeypatch, tiny_llama):
    from support.models import make_generation_adapter

    adapter = make_generation_adapter(tiny_llama, tmp_path / "hot", seed=5, r=4, alpha=16)
    model_uri, model_sha = upload_dir(s3, bucket, tiny_llama, "models/tiny/"), digest(tiny_llama)
    ad_uri, ad_sha = upload_dir(s3, bucket, adapter, "acme/hot/3/"), digest(adapter)
    g = routes.write()  # a merged pool's routes name no adapter

    port, admin = free_port(), free_port()
    log = open(tmp_path / "runtime.log", "ab")
    runtime = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "runtime", "--port", str(port), "--admin-port", str(admin),
         "--metrics-port", str(free_port()), "--log-level", "warning"],
        env={**os.environ, "LORAFLEET_MODEL_DIR": str(cache_dir / "models" / model_sha),
             "LORAFLEET_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1",
             "LORAFLEET_MERGED_ADAPTER_DIR": str(cache_dir / "adapters" / ad_sha),
             "LORAFLEET_MERGED_ADAPTER_NAME": "acme-chat", "LORAFLEET_MERGED_ADAPTER_VERSION": "3",
             "LORAFLEET_MERGED_ADAPTER_TENANT": "acme"},
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
                                       "--model-uri", model_uri, "--model-sha256", model_sha,
                                       "--merged-adapter-uri", ad_uri, "--merged-adapter-sha256", ad_sha,
                                       "--collect-after", "0"))
        sc = Sidecar.from_args(args).start()
        try:
            r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g
                         and r.runtime_model == "loaded" and r, 180, interval=0.2, what="the merged model loaded")
            assert r.model_ready is True and r.failed == {}
            assert (cache_dir / "adapters" / ad_sha).is_dir()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                wait_for(lambda: c.get("/readyz").status_code == 200, 60, what="runtime ready")
                res = c.post("/v1/completions", json={"model": "acme-chat", "prompt": PROMPT, "max_tokens": NEW,
                                                      "temperature": 0})
                assert res.status_code == 200, res.text
                assert res.json()["model"] == "acme-chat@3"
                assert res.json()["choices"][0]["text"] == _peft_merged_text(tiny_llama, adapter)
            # No route names it, and it stays: collecting it would take the pod's model away on restart.
            routes.write()
            wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation > g, 30,
                     what="another sync pass")
            assert (cache_dir / "adapters" / ad_sha).is_dir()
        finally:
            sc.stop()
    finally:
        runtime.terminate()
        runtime.wait(30)
        log.close()


def test_a_merged_adapter_whose_digest_does_not_match_is_reported_until_storage_holds_it(
        kube, namespace, pod, s3, bucket, tmp_path, cache_dir, routes, start_sidecar, tiny_llama):
    """The sync report says why the merged adapter is not ready (a merged pool's routes name no
    adapter whose failure would): the digest mismatch, naming the URI; the model is not ready and the
    content is not installed. Once storage holds the content of that digest, the retry installs it and
    the report is clear."""
    from support.models import make_generation_adapter

    wanted = make_generation_adapter(tiny_llama, tmp_path / "wanted", seed=5, r=4, alpha=16)
    other = make_generation_adapter(tiny_llama, tmp_path / "other", seed=6, r=4, alpha=16)
    model_uri, model_sha = upload_dir(s3, bucket, tiny_llama, "models/tiny/"), digest(tiny_llama)
    ad_uri, ad_sha = upload_dir(s3, bucket, other, "acme/hot/3/"), digest(wanted)  # not what the digest says
    routes.write()
    start_sidecar("--model-uri", model_uri, "--model-sha256", model_sha,
                  "--merged-adapter-uri", ad_uri, "--merged-adapter-sha256", ad_sha)
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.merged_adapter_failure and r, 60,
                 interval=0.2, what="the report naming the merged adapter's failure")
    assert r.merged_adapter_failure.startswith(f"merged adapter {ad_uri}: digest mismatch: {ad_uri} has "
                                               f"{digest(other)}, the route says {ad_sha}"), r.merged_adapter_failure
    assert r.model_ready is False and not (cache_dir / "adapters" / ad_sha).exists()
    upload_dir(s3, bucket, wanted, "acme/hot/3/")  # the same names, now the content of that digest
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.model_ready and r, 60, interval=0.2,
                 what="the merged adapter installed on a retry")
    assert r.merged_adapter_failure is None and digest(cache_dir / "adapters" / ad_sha) == ad_sha


def test_a_base_model_whose_digest_does_not_match_is_reported_until_storage_holds_it(
        kube, namespace, pod, s3, bucket, tmp_path, cache_dir, routes, start_sidecar, tiny_llama):
    """The sync report's modelFailure says why the base model is not ready (the pod never turns Ready):
    the digest mismatch, naming the URI; nothing is installed. Once storage holds that digest's content,
    the retry installs it and the report is clear."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama, other)
    (other / "README.md").write_text("not the model the digest names\n")
    model_uri, model_sha = upload_dir(s3, bucket, other, "models/tiny/"), digest(tiny_llama)
    routes.write()
    start_sidecar("--model-uri", model_uri, "--model-sha256", model_sha)
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.model_failure and r, 60,
                 interval=0.2, what="the report naming the base model's failure")
    assert r.model_failure.startswith(f"base model {model_uri}: digest mismatch: {model_uri} has {digest(other)}"), \
        r.model_failure
    assert r.model_ready is False and r.merged_adapter_failure is None
    assert not (cache_dir / "models" / model_sha).exists()
    s3.remove_object(bucket, "models/tiny/README.md")
    upload_dir(s3, bucket, tiny_llama, "models/tiny/")
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.model_ready and r, 90, interval=0.2,
                 what="the base model installed on a retry")
    assert r.model_failure is None

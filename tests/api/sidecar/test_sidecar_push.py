"""``lorafleet push`` validates, uploads with progress on stderr, and prints only the LoRAAdapter YAML,
which kubectl applies as is; the sidecar then syncs exactly what was pushed."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import yaml

from lorafleet.contracts.digest import directory_digest
from lorafleet.contracts.resources import LoRAAdapter
from lorafleet.localstack.procs import wait_for

from sidecar_api_support import sync_report
from support.peft_dirs import write_adapter, write_base


def push(args, minio_server, **env):
    return subprocess.run([sys.executable, "-m", "lorafleet", "push", *args], capture_output=True, text=True,
                          env={**os.environ, **minio_server.env, **env}, timeout=60)


def test_push_uploads_and_prints_yaml_kubectl_applies(s3, minio_server, control_plane, namespace, tmp_path, kube,
                                                      pod, cache_dir, runtime, routes, start_sidecar):
    d = write_adapter(tmp_path / "support", pad_bytes=3 << 20)
    bucket = f"push-{secrets.token_hex(4)}"  # does not exist yet: push creates it
    r = push([str(d), f"s3://{bucket}/acme/support/3", "--pool", "tiny", "--tenant", "acme", "--version", "3",
              "--namespace", namespace], minio_server)
    assert r.returncode == 0, r.stderr
    assert "upload [" in r.stderr and "100.0%" in r.stderr
    doc = yaml.safe_load(r.stdout)  # stdout is the YAML and nothing else
    adapter = LoRAAdapter.model_validate(doc)
    assert adapter.metadata == {"name": "acme-support", "namespace": namespace}
    assert adapter.spec.source.uri == f"s3://{bucket}/acme/support/3/"
    assert adapter.spec.source.sha256 == directory_digest(d)
    keys = sorted(o.object_name for o in s3.list_objects(bucket, prefix="acme/", recursive=True))
    assert keys == ["acme/support/3/adapter_config.json", "acme/support/3/adapter_model.safetensors"]

    control_plane.kubectl("apply", "-f", "-", input=r.stdout)
    got = control_plane.kubectl("get", "lora", "acme-support", "-n", namespace, "-o", "jsonpath={.spec.source.sha256}")
    assert got.stdout == adapter.spec.source.sha256

    routes.set("acme-support", [("3", adapter.spec.source.uri, adapter.spec.source.sha256, 100)])
    g = routes.write()
    start_sidecar()
    wait_for(lambda: (rep := sync_report(kube, namespace, pod)) and rep.generation >= g and rep.loaded == 1, 60,
             what="the pushed adapter loaded")


def test_push_refuses_an_invalid_adapter_and_prints_no_yaml(minio_server, tmp_path):
    d = write_adapter(tmp_path / "bad", r=128)
    (d / "adapter_model.bin").write_bytes(b"\x80\x04")
    r = push([str(d), "s3://never-created/x/", "--pool", "tiny", "--tenant", "acme", "--version", "1"], minio_server)
    assert r.returncode == 1 and r.stdout == ""
    assert "pickle weights are refused" in r.stderr and "above maxRank (64)" in r.stderr
    # The same rules as the sidecar and the runtime: DoRA is refused; with --base-model, shapes too.
    d = write_adapter(tmp_path / "dora", config={"use_dora": True})
    r = push([str(d), "s3://never-created/x/", "--pool", "tiny", "--tenant", "acme", "--version", "1"], minio_server)
    assert r.returncode == 1 and "DoRA is not supported" in r.stderr
    d = write_adapter(tmp_path / "shapes", in_features=32)
    args = [str(d), "s3://never-created/x/", "--pool", "tiny", "--tenant", "acme", "--version", "1"]
    r = push(args + ["--base-model", str(write_base(tmp_path / "base"))], minio_server)
    assert r.returncode == 1 and "do not fit the base weight [16, 16]" in r.stderr

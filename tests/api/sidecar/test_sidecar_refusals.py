"""Hostile or broken adapters are refused with the reason in the pod's sync report, and everything
else is still served. The base model is pulled first (adapters are checked against it)."""

from __future__ import annotations

import io
import json
import os

from lorafleet.localstack.procs import wait_for

from sidecar_api_support import digest, sync_report, upload_dir
from support.peft_dirs import write_adapter, write_base


def test_each_hostile_or_invalid_adapter_is_refused_with_its_reason(kube, namespace, pod, s3, bucket, tmp_path,
                                                                     cache_dir, runtime, routes, start_sidecar):
    base = write_base(tmp_path / "base")
    model_uri, model_sha = upload_dir(s3, bucket, base, "models/tiny/"), digest(base)

    def push(name, **kw):  # a distinct seed per case: distinct content, distinct digests
        return write_adapter(tmp_path / name, seed=len(cases) + 10, **kw)

    cases = {}  # served name -> (uri, sha256, expected reason fragment)

    def add(name, d, expect, uri=None, sha=None):
        uri = uri or upload_dir(s3, bucket, d, f"t/{name}/")
        cases[name] = (uri, sha or digest(d), expect)

    add("good", push("good"), None)
    d = push("pickle")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")
    add("pickle", d, "adapter_model.bin: pickle weights are refused")
    d = push("symlink")
    os.symlink("/etc/passwd", d / "passwd")
    add("symlink", d, "passwd: symlinks are refused", uri=d.as_uri())
    add("wrong-base", push("wrong-base", base_name="meta-llama/Llama-2-7b-hf"),
        "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' does not match the pool's model")
    add("rank", push("rank", r=16), "rank r=16 is above maxRank (8)")
    add("big", push("big", pad_bytes=300_000), "above maxAdapterBytes (204800)")
    add("targets", push("targets", targets=("query", "gate_proj")), "target_modules ['gate_proj'] are not modules")
    d = push("malformed")
    (d / "adapter_config.json").write_text("{'r': 4")
    add("malformed", d, "adapter_config.json is malformed")
    d = push("noconfig")
    (d / "adapter_config.json").unlink()
    add("noconfig", d, "adapter_config.json is missing")
    add("shapes", push("shapes", in_features=32), "do not fit the base weight [16, 16]")
    # The object changed in storage after its digest was published.
    d = push("changed")
    sha = digest(d)
    (d / "adapter_config.json").write_text(json.dumps({**json.loads((d / "adapter_config.json").read_text()),
                                                       "lora_alpha": 99}))
    add("changed", d, "digest mismatch", sha=sha)
    add("hub", d, "hf:// sources are not supported", uri="hf://acme/adapter", sha="c" * 64)

    for name, (uri, sha, _) in cases.items():
        routes.set(name, [("1", uri, sha, 100)])
    g = routes.write()
    start_sidecar("--max-rank", "8", "--max-adapter-bytes", "200Ki", "--model-uri", model_uri,
                  "--model-sha256", model_sha)

    def all_settled():
        r = sync_report(kube, namespace, pod)
        return r if r and r.generation >= g and r.loaded == 1 and len(r.failed) == len(cases) - 1 else None

    report = wait_for(all_settled, 60, what="every bad adapter refused and the good one loaded")
    assert report.model_ready is True
    assert (cache_dir / "models" / model_sha / "model.safetensors").is_file()
    for name, (_, _, expect) in cases.items():
        if expect is None:
            assert report.has_loaded(name, "1", since=g)
        else:
            assert expect in report.failure(name, "1"), (name, report.failure(name, "1"))
    assert set(runtime.loaded()) == {"good@1"}
    # Nothing refused ever reached the cache, and no download was left behind.
    assert [p.name for p in (cache_dir / "adapters").iterdir()] == [cases["good"][1]]
    assert not list((cache_dir / "tmp").iterdir())


def test_a_changed_object_never_replaces_the_good_cached_copy(kube, namespace, pod, s3, bucket, tmp_path,
                                                              cache_dir, runtime, routes, start_sidecar):
    d = write_adapter(tmp_path / "a")
    uri, sha = upload_dir(s3, bucket, d, "acme/a/1/"), digest(d)
    routes.set("a", [("1", uri, sha, 100)])
    g = routes.write()
    start_sidecar()
    wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.loaded == 1, 60,
             what="a@1 loaded")
    # Someone overwrites the published version in storage.
    evil = b'{"r": 4, "target_modules": ["query"], "peft_type": "LORA"}'
    s3.put_object(bucket, "acme/a/1/adapter_config.json", io.BytesIO(evil), len(evil))
    # A second served name for the same version must use the verified cached copy; a runtime restart
    # reloads from the cache too.
    routes.set("a-alias", [("1", uri, sha, 100)])
    g = routes.write()
    runtime.restart()
    wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.loaded == 2
             and set(runtime.loaded()) == {"a@1", "a-alias@1"}, 60, what="both loaded from the cache")
    assert digest(cache_dir / "adapters" / sha) == sha
    # Content not cached yet is downloaded and refused: the digest no longer matches.
    routes.set("b", [("1", "s3://" + bucket + "/acme/a/1/", "e" * 64, 100)])
    g = routes.write()
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.failure("b", "1"),
                 60, what="b@1 refused")
    assert "digest mismatch" in sync_report(kube, namespace, pod).failure("b", "1")
    assert set(runtime.loaded()) == {"a@1", "a-alias@1"}


def test_report_lists_are_capped_with_totals(kube, namespace, pod, runtime, routes, start_sidecar):
    for i in range(250):  # hf:// is refused at once: 250 failures without a download
        routes.set(f"t{i:03d}", [("1", f"hf://acme/a{i}", f"{i:064x}", 100)])
    g = routes.write()
    start_sidecar()
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.failed_total == 250
                 and r, 60, what="250 failures reported")
    assert len(r.failed) == 200 and r.loaded == 0 and r.pending == []
    # The lists name the first 200 keys and say so: the 50 after them are unknown, never loaded.
    assert not r.has_loaded("t249", "1", since=g) and not r.has_loaded("t199", "1", since=g)
    assert r.covered_through == "t199@1"
    assert "hf:// sources are not supported" in r.failure("t000", "1")


def test_adapters_for_another_task_are_refused_by_the_sidecar(kube, namespace, pod, s3, bucket, tmp_path,
                                                             runtime, routes, start_sidecar):
    """The pool's task (LORAFLEET_TASK, set by the operator) reaches the sidecar: the rules' task check
    refuses there, before the runtime ever sees the adapter."""
    cases = {"cls": (write_adapter(tmp_path / "cls", seed=1, pad_bytes=3 * 4 * 16), None),
             "gen": (write_adapter(tmp_path / "gen", seed=2, pad_bytes=3 * 4 * 16, config={"task_type": "CAUSAL_LM"}),
                     "trained for text-generation but this pool serves sequence-classification"),
             "headless": (write_adapter(tmp_path / "headless", seed=3), "no classifier head")}
    for name, (d, _) in cases.items():
        routes.set(name, [("1", upload_dir(s3, bucket, d, f"t/{name}/"), digest(d), 100)])
    g = routes.write()
    start_sidecar("--task", "sequence-classification")
    r = wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.generation >= g and r.loaded == 1
                 and len(r.failed) == 2 and r, 60, what="cls loaded, the other two refused")
    for name, (_, reason) in cases.items():
        assert reason is None or reason in r.failure(name, "1"), (name, r.failure(name, "1"))
    assert set(runtime.loaded()) == {"cls@1"}

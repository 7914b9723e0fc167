"""``lorafleet serve`` with broken and hostile adapters beside good ones, from a folder and from a
TGI-style ``LORA_ADAPTERS`` list: the server starts, every good adapter answers, and each bad one is
listed with its reason (admin listing, ``/v1/models`` state, a 503 naming it) instead of taking the
server down."""

from __future__ import annotations

import json
import os
import shutil
import struct

import httpx
from safetensors.torch import load_file, save_file

from lorafleet.localstack.procs import wait_for
from lorafleet.runtime.serve import StaticAdapter, parse_lora_adapters
from test_runtime_cli import _free_port, _start, _stop

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _config(d, **changes):
    cfg = json.loads((d / CONFIG).read_text())
    (d / CONFIG).write_text(json.dumps(cfg | changes))


def hostile_folder(folder, gen_adapters):
    """name -> a fragment of the reason it must be refused with (None: it serves)."""
    g0, g1 = gen_adapters["gen0"], gen_adapters["gen1"]
    expect = {"tenant-a": None, "tenant-b": None}
    _copy(g0, folder / "tenant-a")
    _copy(g1, folder / "tenant-b")

    (_copy(g0, folder / "bad-json") / CONFIG).write_text("{'r': 8,")
    expect["bad-json"] = "adapter_config.json is malformed"
    (_copy(g0, folder / "json-bomb") / CONFIG).write_text("[" * 200_000 + "]" * 200_000)
    expect["json-bomb"] = "nested too deeply to parse"

    d = _copy(g0, folder / "wrong-shapes")
    t = load_file(str(d / WEIGHTS))
    key = next(k for k in t if k.endswith("q_proj.lora_A.weight"))
    t[key] = t[key].repeat(1, 2).contiguous()  # [r, 2*hidden]: trained on another base
    save_file(t, str(d / WEIGHTS))
    expect["wrong-shapes"] = "do not fit the base weight"

    d = _copy(g0, folder / "pickle")
    (d / WEIGHTS).unlink()
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n")
    expect["pickle"] = "adapter_model.bin: pickle weights are refused"

    os.symlink(_copy(g1, folder.parent / "elsewhere"), folder / "symlinked")
    expect["symlinked"] = "the adapter directory is a symlink"
    os.symlink("/etc/passwd", _copy(g0, folder / "symlink-inside") / "notes.txt")
    expect["symlink-inside"] = "notes.txt: symlinks are refused"

    d = _copy(g0, folder / "huge-header")
    header = json.dumps({"__metadata__": {"pad": "x" * (9 << 20)}}).encode()
    (d / WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    expect["huge-header"] = "is above the limit of"

    d = _copy(g0, folder / "unknown-target")
    t = load_file(str(d / WEIGHTS))
    save_file({k.replace("q_proj", "qq_proj"): v for k, v in t.items()}, str(d / WEIGHTS))
    _config(d, target_modules=["qq_proj", "k_proj", "v_proj", "o_proj"])
    expect["unknown-target"] = "target_modules ['qq_proj'] are not modules of the base model"

    d = _copy(g0, folder / "truncated")
    (d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:-100])
    expect["truncated"] = "truncated"

    _config(_copy(g0, folder / "dora"), use_dora=True)
    expect["dora"] = "DoRA is not supported"
    (folder / "no-config").mkdir()
    (folder / "no-config" / "README.md").write_text("notes")
    expect["no-config"] = "adapter_config.json is missing"
    return expect


def test_serve_refuses_each_bad_adapter_and_serves_the_rest(tiny_llama, gen_adapters, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    expect = hostile_folder(folder, gen_adapters)
    listed = _copy(gen_adapters["gen2"], tmp_path / "listed")
    bare = _copy(gen_adapters["gen3"], tmp_path / "bare")
    lora_adapters = f"from-list={listed},acme/support-adapter,gone=/nonexistent/adapter,{bare},tenant-a={listed}"
    expect |= {"from-list": None, str(bare): None,
               "acme/support-adapter": "serves only local adapter directories (it never downloads from a hub)",
               "gone": "does not exist"}

    port, admin = _free_port(), _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        p = _start(["serve", "--model", str(tiny_llama), "--adapters", str(folder), "--port", str(port),
                    "--admin-port", str(admin), "--metrics-port", str(_free_port()),
                    "--host", "127.0.0.1"], env={"LORA_ADAPTERS": lora_adapters},
                   log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: p.poll() is None and httpx.get(url + "/readyz").status_code == 200, timeout=180,
                 what="lorafleet serve ready")
        for name in ("tenant-a", "tenant-b", str(bare)):
            r = httpx.post(url + "/v1/completions", json={"model": name, "prompt": "hello", "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, (name, r.text)
        r = httpx.post(url + "/generate", json={"inputs": "hello", "parameters": {"adapter_id": "from-list",
                                                                                 "max_new_tokens": 3}})
        assert r.status_code == 200, r.text

        listing = {a["name"]: a for a in httpx.get(f"http://127.0.0.1:{admin}/admin/adapters").json()["adapters"]}
        assert set(listing) == set(expect)
        for name, reason in expect.items():
            a = listing[name]
            if reason is None:
                assert a["state"] != "failed" and a["error"] is None, (name, a)
            else:
                assert a["state"] == "failed" and reason in a["error"], (name, a["error"])
                assert a["errorKind"] == "permanent", (name, a)
        # The later entry of a duplicate name is refused; the first one keeps serving.
        text = (tmp_path / "serve.log").read_text()
        assert "adapter name 'tenant-a' is already served from" in text
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert [v["state"] for v in models["dora"]["versions"]] == ["failed"]
        r = httpx.post(url + "/v1/completions", json={"model": "dora", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and "DoRA is not supported" in r.json()["error"]["message"]
        for name, reason in expect.items():
            if reason is not None:
                assert f"adapter {name} " in text and "is refused" in text, name
        # The admin API refuses the same way: a 422 with the reason and its kind, nothing else disturbed.
        for name in ("json-bomb", "huge-header", "truncated"):
            r = httpx.put(f"http://127.0.0.1:{admin}/admin/adapters/put-{name}/1",
                          json={"path": str(folder / name), "sha256": "0" * 64, "tenant": "t"})
            assert r.status_code == 422 and expect[name] in r.json()["error"]["message"], r.text
            assert r.json()["adapter"]["errorKind"] == "permanent", r.text
        r = httpx.post(url + "/v1/completions", json={"model": "tenant-b", "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert p.poll() is None, "still serving"
    finally:
        assert _stop(p) == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_lora_adapters_parse_as_tgi_writes_them(tmp_path):
    (tmp_path / "a").mkdir()
    got = parse_lora_adapters(f" one={tmp_path / 'a'}, org/name ,{tmp_path / 'a'},,rel=./x ")
    assert got == [StaticAdapter("one", tmp_path / "a", f"one={tmp_path / 'a'}"),
                   StaticAdapter("org/name", None, "org/name"),
                   StaticAdapter(str(tmp_path / "a"), tmp_path / "a", str(tmp_path / "a")),
                   StaticAdapter("rel", tmp_path.__class__("./x"), "rel=./x")]

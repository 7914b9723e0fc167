"""Validation refuses hostile or broken adapters with a reason a tenant can act on."""

from __future__ import annotations

import json
import os
import struct

import pytest

from lorafleet.contracts.digest import directory_digest
from lorafleet.sidecar.storage import FileStorage, split_s3
from lorafleet.sidecar.store import digest_of_hashes
from lorafleet.sidecar.validate import (BaseModelInfo, Limits, Refused, adapter_problems, listing_problems,
                                        path_problem, read_safetensors_header)
from sidecar_peft_dirs import BASE_NAME, write_adapter, write_base

LIMITS = Limits(max_rank=8, max_adapter_bytes=1 << 20)


@pytest.fixture
def base(tmp_path):
    return BaseModelInfo.from_dir(write_base(tmp_path / "base"), "s3://models/tiny/", "f" * 64)


def problems(d, base=None, limits=LIMITS):
    return " | ".join(adapter_problems(d, limits, base))


def test_a_good_adapter_passes_with_and_without_the_base(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    assert adapter_problems(d, LIMITS, base) == []
    assert adapter_problems(d, LIMITS, None) == []


def test_pickle_weights_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_model.bin").write_bytes(b"\x80\x04evil")
    assert "adapter_model.bin: pickle weights are refused" in problems(d, base)


def test_symlinks_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    os.symlink("/etc/passwd", d / "notes.txt")
    assert "notes.txt: symlinks are refused" in problems(d, base)


@pytest.mark.parametrize("key", ["../evil", "a/../../evil", "/etc/passwd", "a//b", "./x"])
def test_paths_leaving_the_directory_are_refused(key):
    assert "leaves the adapter directory" in path_problem(key)
    assert listing_problems([(key, 1)], LIMITS)


def test_base_model_mismatch_is_refused_and_matches_are_documented(tmp_path, base):
    d = write_adapter(tmp_path / "a", base_name="meta-llama/Llama-2-7b-hf")
    assert "base_model_name_or_path 'meta-llama/Llama-2-7b-hf' does not match the pool's model" in problems(d, base)
    for ok in (BASE_NAME, "s3://models/tiny/", "s3://models/tiny", "f" * 64, "tiny-bert",
               "/home/me/checkpoints/anything", None):
        assert base.accepts_name(ok or ""), ok
    nameless = BaseModelInfo.build("", "s3://m/x/", "f" * 64, base.weights)
    assert nameless.accepts_name("meta-llama/Llama-2-7b-hf")  # a base without a name: shapes decide


def test_rank_above_max_rank_is_refused(tmp_path, base):
    assert "rank r=16 is above maxRank (8)" in problems(write_adapter(tmp_path / "a", r=16), base)


def test_size_above_max_adapter_bytes_is_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", pad_bytes=2 << 20)
    assert "above maxAdapterBytes (1048576)" in problems(d, base)


def test_target_modules_the_base_lacks_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", targets=("query", "gate_proj"))
    text = problems(d, base)
    assert "target_modules ['gate_proj'] are not modules of the base model" in text
    assert "gate_proj: the base model has no such module" in text


def test_shapes_that_do_not_fit_the_base_are_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a", in_features=32)
    assert "do not fit the base weight [16, 16]" in problems(d, base)


def test_missing_or_malformed_config_is_refused(tmp_path, base):
    d = write_adapter(tmp_path / "a")
    (d / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is malformed" in problems(d, base)
    (d / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in problems(d, base)
    d2 = write_adapter(tmp_path / "b", config={"r": "four", "target_modules": []})
    text = problems(d2, base)
    assert "r must be a positive integer" in text and "target_modules must be a non-empty list" in text


def test_every_problem_is_reported_together(tmp_path, base):
    d = write_adapter(tmp_path / "a", r=16, base_name="other/model")
    (d / "w.pt").write_bytes(b"x")
    assert len(adapter_problems(d, LIMITS, base)) >= 3


def test_truncated_or_lying_safetensors_headers_are_refused(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(Refused, match="does not fit the file"):
        read_safetensors_header(p)
    header = json.dumps({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 999]}}).encode()
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(Refused, match="malformed entry"):
        read_safetensors_header(p)


def test_file_fetch_hashes_as_it_copies_and_matches_the_directory_digest(tmp_path):
    src = write_adapter(tmp_path / "src")
    (src / "sub").mkdir()
    (src / "sub" / "readme.md").write_text("hi")
    dest = tmp_path / "dest"
    dest.mkdir()
    hashes = FileStorage().fetch(src.as_uri(), dest)
    assert digest_of_hashes(hashes) == directory_digest(src) == directory_digest(dest)


def test_file_source_with_a_symlink_is_refused_before_copying(tmp_path):
    src = write_adapter(tmp_path / "src")
    os.symlink("/etc", src / "etc")
    with pytest.raises(Refused, match="symlinks are refused"):
        FileStorage().listing(src.as_uri())


def test_s3_uris_name_a_folder():
    assert split_s3("s3://b/acme/support/3") == ("b", "acme/support/3/")
    assert split_s3("s3://b/") == ("b", "")
    with pytest.raises(Refused):
        split_s3("s3:///nobucket")

"""Storage sources: file:// copies hash as they go, refuse symlinks before copying; s3 URIs name a
folder; a body longer than its listing is refused without writing past it."""

from __future__ import annotations

import os

import pytest

from lorafleet.contracts.adapter_rules import Refused
from lorafleet.contracts.digest import directory_digest
from lorafleet.sidecar.storage import FileStorage, ObjectEntry, split_s3
from lorafleet.sidecar.store import digest_of_hashes
from support.peft_dirs import write_adapter


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


def test_a_file_longer_than_listed_is_refused_without_writing_past_the_listing(tmp_path):
    src = write_adapter(tmp_path / "src")
    dest = tmp_path / "dest"
    dest.mkdir()
    size = (src / "adapter_model.safetensors").stat().st_size
    with pytest.raises(Refused, match="longer than the 100 bytes its listing says") as e:
        FileStorage().fetch(src.as_uri(), dest, entries=[ObjectEntry("adapter_model.safetensors", 100)])
    assert e.value.permanent and size > 100
    assert (dest / "adapter_model.safetensors").stat().st_size <= 100

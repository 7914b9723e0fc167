"""`lorafleet digest` is the digest of DESIGN §2: what the shell pipeline prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.contracts.digest import directory_digest

PIPELINE = "find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs sha256sum | sha256sum"


def shell_digest(d: Path) -> str:
    out = subprocess.run(["bash", "-c", PIPELINE], cwd=d, capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "adapter_config.json").write_text('{"r": 8}')
    (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    (d / "sub" / "b.txt").write_text("b")
    (d / "sub" / "B.txt").write_text("upper sorts first in C locale")
    (d / "sub" / "deeper" / "z").write_bytes(b"")
    (d / "a-b.txt").write_text("dash")
    (d / "a_b.txt").write_text("underscore")
    return d


def test_digest_equals_shell_pipeline(adapter_dir: Path):
    assert directory_digest(adapter_dir) == shell_digest(adapter_dir)


def test_cli_prints_the_same_digest(adapter_dir: Path):
    out = subprocess.run([sys.executable, "-m", "lorafleet", "digest", str(adapter_dir)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == shell_digest(adapter_dir)


def test_digest_changes_with_content_and_name(adapter_dir: Path):
    before = directory_digest(adapter_dir)
    (adapter_dir / "sub" / "b.txt").write_text("c")
    changed = directory_digest(adapter_dir)
    assert changed != before
    (adapter_dir / "sub" / "b.txt").rename(adapter_dir / "sub" / "c.txt")
    assert directory_digest(adapter_dir) != changed


def test_symlinks_are_not_part_of_the_digest(adapter_dir: Path):
    # find -type f skips symlinks; the sidecar refuses adapters containing them anyway.
    before = directory_digest(adapter_dir)
    (adapter_dir / "link").symlink_to(adapter_dir / "a-b.txt")
    assert directory_digest(adapter_dir) == before == shell_digest(adapter_dir)


def test_digest_of_missing_dir_is_a_clear_error(tmp_path: Path):
    r = subprocess.run([sys.executable, "-m", "lorafleet", "digest", str(tmp_path / "nope")], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert "not a directory" in r.stderr

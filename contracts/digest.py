"""Content digest of an adapter or model directory (DESIGN §2).

sha256 of the text made of one line ``<sha256 hex of file>  <relative path>\\n`` per regular file,
sorted by relative path as bytes: what ``find . -type f | sed 's|^\\./||' | LC_ALL=C sort | xargs
sha256sum | sha256sum`` prints.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def regular_files(root: str | os.PathLike[str]) -> list[str]:
    """Relative paths (with ``/``) of the regular files under ``root``, sorted as bytes.

    Symlinks are not followed and not listed, as ``find -type f`` does not list them.
    """
    root = os.fspath(root)
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    out.sort(key=lambda p: p.encode("utf-8", "surrogateescape"))
    return out


def manifest_lines(root: str | os.PathLike[str]) -> list[str]:
    """The ``sha256sum`` lines the digest is computed over."""
    return [f"{file_sha256(Path(root) / rel)}  {rel}\n" for rel in regular_files(root)]


def directory_digest(root: str | os.PathLike[str]) -> str:
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{root}: not a directory")
    h = hashlib.sha256()
    for line in manifest_lines(root):
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def is_digest(value: str) -> bool:
    return bool(DIGEST_RE.match(value or ""))

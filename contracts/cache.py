"""Layout of the content-addressed cache the sidecar fills and the runtime reads (DESIGN §4).

``models/<digest>/`` and ``adapters/<digest>/`` exist only once complete and verified: downloads go
to ``tmp/`` and are renamed into place, so a crash never leaves a half-written directory that looks
complete.

``durable/<digest>`` marks an entry whose files and directory entries are known to be on disk. The
sidecar makes entries servable as soon as they are verified and renamed, and makes them durable (fsync)
in the background; after a restart, an entry without its marker (a crash came first) is verified again
before it is trusted.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .digest import is_digest


@dataclass(frozen=True)
class CacheLayout:
    root: Path

    def __init__(self, root: str | os.PathLike[str]):
        object.__setattr__(self, "root", Path(root))

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def durable(self) -> Path:
        return self.root / "durable"

    def durable_marker(self, digest: str) -> Path:
        _check(digest)
        return self.durable / digest

    def ensure(self) -> "CacheLayout":
        for d in (self.models, self.adapters, self.tmp, self.durable):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def model_dir(self, digest: str) -> Path:
        _check(digest)
        return self.models / digest

    def adapter_dir(self, digest: str) -> Path:
        _check(digest)
        return self.adapters / digest

    def new_tmp_dir(self, prefix: str) -> Path:
        self.tmp.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{prefix}.", dir=self.tmp))

    def cached_adapters(self) -> set[str]:
        """Digests of the complete adapter directories."""
        if not self.adapters.is_dir():
            return set()
        return {p.name for p in self.adapters.iterdir() if p.is_dir() and is_digest(p.name)}

    def cached_models(self) -> set[str]:
        if not self.models.is_dir():
            return set()
        return {p.name for p in self.models.iterdir() if p.is_dir() and is_digest(p.name)}


def _check(digest: str) -> None:
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest (64 lowercase hex): {digest!r}")

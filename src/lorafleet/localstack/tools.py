"""Where the Go-built binaries (etcd, kube-apiserver, kubectl, MinIO, helm) are found."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

TOOLS = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "minio", "helm")


class ToolMissing(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLEET_CACHE", Path.home() / ".cache" / "lorafleet"))


def bin_dir() -> Path:
    return cache_dir() / "bin"


def find_tool(name: str) -> Path | None:
    """The tool in the cache's bin folder, else on PATH."""
    p = bin_dir() / name
    if p.is_file() and os.access(p, os.X_OK):
        return p
    found = shutil.which(name)
    return Path(found) if found else None


def require_tool(name: str) -> Path:
    p = find_tool(name)
    if p is None:
        raise ToolMissing(
            f"{name} not found in {bin_dir()} or on PATH: run tools/install-test-tools "
            f"(builds etcd, kube-apiserver, kubectl, MinIO and helm from the Go module proxy)"
        )
    return p

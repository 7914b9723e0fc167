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


# The Gateway API's CRDs (sigs.k8s.io/gateway-api, its standard channel): tools/install-test-tools
# fetches this version (GATEWAY_API_VERSION there; a unit test holds the two equal).
GATEWAY_API_VERSION = "v1.6.3"


def gateway_api_crds() -> Path:
    """The folder of the Gateway API's standard-channel CRD files, as tools/install-test-tools left it."""
    d = cache_dir() / "crds" / f"gateway-api-{GATEWAY_API_VERSION}"
    if not (d / ".complete").is_file() or not any(d.glob("*httproutes.yaml")):
        raise ToolMissing(
            f"the Gateway API CRDs {GATEWAY_API_VERSION} are not in {d}: run tools/install-test-tools "
            f"(fetches the sigs.k8s.io/gateway-api module's config/crd/standard from the Go module proxy)")
    return d

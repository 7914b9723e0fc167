"""Where a tenant's adapters may come from: the one rule the operator (which routes an adapter only
when it holds) and the sidecar (which downloads only what holds) both apply.

A prefix is a folder (``s3://bucket/acme/``, ending in ``/``); a URI lies within it when it names
that folder or one below it. URIs with ``.`` or ``..`` segments (also percent-encoded) are refused
outright: ``file://`` paths resolve them, so ``s3://b/acme/../beta/`` must never pass as acme's.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlparse

PREFIX_RE = re.compile(r"^(s3://[^/]+|file://|hf://[^/]+)/(.*/)?$")  # the CRD's CEL rule, the same


def _dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in unquote(path).replace("\\", "/").split("/"))


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` cannot be a tenant's source prefix, or None."""
    if not PREFIX_RE.match(prefix):
        return (f"sources[]: {prefix!r} must be a folder: s3://bucket/prefix/, file:///path/ or hf://org/ "
                f"(ending in '/')")
    if _dot_segment(urlparse(prefix).path):
        return f"sources[]: {prefix!r} has a '.' or '..' segment"
    return None


def uri_within(uri: str, prefix: str) -> bool:
    """True when ``uri`` names the folder ``prefix`` or one below it (both as written: no
    normalization beyond the trailing ``/`` the sidecar adds to a folder URI)."""
    if prefix_problem(prefix) or _dot_segment(urlparse(uri).path) or "?" in uri or "#" in uri:
        return False
    folder = uri if uri.endswith("/") else uri + "/"
    return folder.startswith(prefix)


def source_problem(field: str, uri: str, tenant: str, prefixes: list[str] | None) -> str | None:
    """The refusal of ``uri`` (at ``field``, e.g. ``spec.source.uri``) for ``tenant`` whose LoRATenant
    declares ``prefixes`` (None: there is no such LoRATenant), or None when it lies within one."""
    if prefixes is None:
        return (f"{field}: tenant {tenant!r} has no LoRATenant in this namespace; create it with spec.sources "
                f"listing the storage prefixes its adapters may come from (spec.tenant names it)")
    if any(uri_within(uri, p) for p in prefixes):
        return None
    if not prefixes:
        return (f"{field}: {uri!r} is not allowed: LoRATenant {tenant!r} declares no spec.sources; add the "
                f"storage prefix its adapters come from")
    return (f"{field}: {uri!r} lies outside LoRATenant {tenant!r}'s spec.sources "
            f"({', '.join(sorted(prefixes))}); push the adapter below one of them or ask the platform team to "
            f"add the prefix")

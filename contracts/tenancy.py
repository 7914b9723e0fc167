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


def accepted_keys(tenants: dict[str, list[tuple[str, str]]]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Which API key digests the gateway accepts, the one rule the gateway (which admits requests by
    them) and the operator (which writes each LoRATenant's ``status.keys``) both apply.

    ``tenants``: tenant name -> its ``spec.apiKeys`` as (key name, sha256), for one namespace. A digest
    that two tenants list would let one reach the other's adapters: it is refused for both. Returns
    (digest -> tenant, for the accepted ones; tenant -> its problems, for tenants with any)."""
    owners: dict[str, set[str]] = {}
    for tenant, keys in tenants.items():
        for _, digest in keys:
            owners.setdefault(digest, set()).add(tenant)
    accepted: dict[str, str] = {}
    problems: dict[str, list[str]] = {}
    for tenant in sorted(tenants):
        keys = tenants[tenant]
        if not keys:
            problems.setdefault(tenant, []).append(
                "spec.apiKeys is empty; add the sha256 of an API key (lorafleet api-key prints a new key and its "
                "digest)")
        for key_name, digest in keys:
            others = sorted(owners[digest] - {tenant})
            if others:
                problems.setdefault(tenant, []).append(
                    f"spec.apiKeys[{key_name}] is also a key of tenant {', '.join(others)}; the key is refused "
                    f"until each tenant has its own")
            else:
                accepted[digest] = tenant
    return accepted, problems


def accepted_count(tenant: str, accepted: dict[str, str]) -> int:
    """Distinct key digests of ``tenant`` that ``accepted_keys`` accepted."""
    return sum(1 for t in accepted.values() if t == tenant)

"""What one sync pass must do, as a pure function of the desired routes, the cache's contents and what
the runtime reports loaded (``plan_sync``). The sync loop executes the plan; tests check it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from lorafleet.contracts import names
from lorafleet.contracts.routes import RoutesTable


@dataclass(frozen=True)
class DesiredVersion:
    """One version of one served name that the routes want on this replica."""

    name: str
    version: str
    tenant: str
    uri: str
    sha256: str
    weight: int = 100
    pinned: bool = False
    preload: bool = True
    since: int = 0
    verified: int | None = None  # its size as a sidecar verified it, per the routes (RouteVersion.verified)

    @property
    def key(self) -> str:
        return names.versioned_name(self.name, self.version)


def desired_versions(table: RoutesTable, pod: str | None = None) -> list[DesiredVersion]:
    """Every version the routes want on this replica: with ``pod``, only the adapters placed on it
    (``RouteEntry.holders``), each from the later of its version's and its placement's generation
    (what the sync report's ``since`` means to the operator)."""
    out = []
    for name, e in sorted(table.adapters.items()):
        placed = e.placed_since(pod) if pod is not None else 0
        if placed is None:
            continue
        out += [DesiredVersion(name=name, version=v.version, tenant=e.tenant, uri=v.uri, sha256=v.sha256,
                               weight=v.weight, pinned=e.pinned, preload=e.preload, since=max(v.since, placed),
                               verified=v.verified)
                for v in e.versions]
    return out


def pool_adapters(table: RoutesTable, pod: str | None) -> list[str]:
    """With placement, every served name of the pool's routes: the runtime answers one it does not
    hold 503 (the gateway retries a holder), not 404. Without placement (every replica holds
    everything) none: an adapter a replica lacks is one the pool lacks."""
    if pod is None or table.placed_on is None:
        return []
    return sorted(table.adapters)


@dataclass(frozen=True)
class CachedContent:
    """A complete directory under ``adapters/``."""

    digest: str
    size: int
    last_used: float  # when a route last referenced it (seconds, the caller's clock)


@dataclass(frozen=True)
class LoadedAdapter:
    """One entry the runtime reports (``GET /admin/adapters``)."""

    name: str
    version: str
    sha256: str
    weight: int = 100
    pinned: bool = False
    failed: bool = False

    @property
    def key(self) -> str:
        return names.versioned_name(self.name, self.version)


@dataclass(frozen=True)
class Download:
    digest: str
    uri: str
    keys: tuple[str, ...]  # name@version of every route waiting for this content


@dataclass
class SyncPlan:
    downloads: list[Download] = field(default_factory=list)
    loads: list[DesiredVersion] = field(default_factory=list)
    unloads: list[tuple[str, str]] = field(default_factory=list)
    collect: list[str] = field(default_factory=list)  # digests to remove from the cache

    def empty(self) -> bool:
        return not (self.downloads or self.loads or self.unloads or self.collect)


def plan_sync(
    desired: Iterable[DesiredVersion],
    cached: Mapping[str, CachedContent],
    loaded: Mapping[str, LoadedAdapter] | None,
    *,
    busy: Iterable[str] = (),
    hold: Iterable[str] = (),
    linger: Iterable[str] = (),
    disk_bytes: int | None = None,
    other_bytes: int = 0,
    now: float = 0.0,
    collect_after: float | None = None,
    keep: Iterable[str] = (),
) -> SyncPlan:
    """The actions that bring the cache and the runtime to ``desired``.

    ``loaded`` is keyed by ``name@version``; ``None`` means the runtime is unreachable (nothing is
    loaded or unloaded, downloads go on). ``busy``: digests not to download now (in flight, backing
    off, refused). ``hold``: ``name@version`` not to load now (the runtime refused it recently).
    ``linger``: ``name@version`` not to unload now although not desired (moved to other replicas
    moments ago).

    Content is collected only when no route wants it and the runtime does not hold it: after
    ``collect_after`` seconds unreferenced, or sooner, least recently used first, while the cache
    (plus ``other_bytes``, e.g. the base model) is above ``disk_bytes``. ``keep``: digests never
    collected (a merged pool's adapter, which no route names).
    """
    desired = list(desired)
    busy, hold = set(busy), set(hold)
    plan = SyncPlan()

    waiting: dict[str, list[DesiredVersion]] = {}
    for d in desired:
        if d.sha256 not in cached:
            waiting.setdefault(d.sha256, []).append(d)
    for digest, ds in waiting.items():
        if digest not in busy:
            plan.downloads.append(Download(digest, ds[0].uri, tuple(d.key for d in ds)))

    if loaded is not None:
        wanted = {d.key for d in desired}
        for d in desired:
            if d.sha256 not in cached or d.key in hold:
                continue
            have = loaded.get(d.key)
            if (have is None or have.failed or have.sha256 != d.sha256 or have.weight != d.weight
                    or have.pinned != d.pinned):
                plan.loads.append(d)
        lingering = set(linger)
        plan.unloads = sorted((a.name, a.version) for k, a in loaded.items()
                              if k not in wanted and k not in lingering)

    referenced = {d.sha256 for d in desired} | set(keep)
    if loaded is None:
        # Without the runtime's word, anything may still be in use.
        return plan
    referenced |= {a.sha256 for a in loaded.values()}
    candidates = sorted((c for c in cached.values() if c.digest not in referenced),
                        key=lambda c: (c.last_used, c.digest))
    used = other_bytes + sum(c.size for c in cached.values())
    for c in candidates:
        expired = collect_after is not None and now - c.last_used >= collect_after
        over = disk_bytes is not None and used > disk_bytes
        if expired or over:
            plan.collect.append(c.digest)
            used -= c.size
    return plan

"""The routes table the operator writes per pool and the sidecar reads (DESIGN §3), and the sync
report the sidecar writes back on its pod (DESIGN §4).

A pool may hold 10,000 adapters, more than one ConfigMap (1 MiB) can: the table is split into a
power-of-two number of shards, each adapter placed by a stable hash of its served name, so the same
table always produces the same ConfigMaps, and doubling the shard count only splits shards.
"""

from __future__ import annotations

import json
import zlib
from typing import ClassVar, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, Field

from . import names

# Room left for metadata and for entries that grow between two splits.
SHARD_BUDGET_BYTES = 512 * 1024
MAX_SHARDS = 1024


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class RouteVersion(_Wire):
    version: str
    uri: str
    sha256: str
    weight: int = Field(100, ge=0, le=100)
    draining: bool = False
    # Routes generation at which this version entered the table: a replica whose sync report has
    # reached this generation, and does not list the version as failed or pending, has it loaded.
    since: int = 0
    # Bytes of its directory as a sidecar verified them (SyncReport.sizes): placement counts the
    # larger of this and its source's sizeBytes (the pool's cache.maxAdapterBytes when neither is known).
    verified: int | None = None


class RouteEntry(_Wire):
    tenant: str
    pinned: bool = False
    preload: bool = True
    versions: list[RouteVersion]
    # "base": requests a replica cannot serve with this adapter are answered by the base model
    # (LoRAAdapter spec.fallback); unset: 503/404 as for any adapter.
    fallback: str | None = None
    # Set when a BaseModelPool merges this adapter (spec.model.mergedAdapter): that pool and the version
    # its pods merge. Requests for the name (or name@that version) go there while it has Ready
    # replicas; this pool serves them otherwise.
    merged: "MergedRoute | None" = None
    # Placement (contracts/placement.py): pod name -> the routes generation at which the adapter was
    # placed on it. Unset: every replica holds it. ``leaving``: pods it was placed on before, kept
    # holding it until every pod in ``holders`` has every version loaded (make before break).
    holders: dict[str, int] | None = None
    leaving: dict[str, int] | None = None
    # Replicas its measured request rate gave it (spec.placement.requestsPerReplica), when more than
    # its spec asks for: kept here so the next plan lowers it only with the margin (no flapping).
    hot: int | None = None

    def serving(self) -> list[RouteVersion]:
        """Versions that take traffic (weight > 0), heaviest first."""
        return sorted((v for v in self.versions if v.weight > 0), key=lambda v: -v.weight)

    def placed_since(self, pod: str) -> int | None:
        """The generation from which ``pod`` is to hold this adapter (0: always, no placement), or
        None when it is not to hold it."""
        if self.holders is None:
            return 0
        got = self.holders.get(pod)
        if got is None and self.leaving:
            got = self.leaving.get(pod)
        return got

    def held_by(self, pod: str) -> bool:
        return self.placed_since(pod) is not None


class MergedRoute(_Wire):
    pool: str
    version: str


RouteEntry.model_rebuild()


class RoutesTable(_Wire):
    pool: str
    generation: int = 0
    adapters: dict[str, RouteEntry] = Field(default_factory=dict)
    # Set on shards only: which shard of how many this table is, and the generation every shard of
    # the table had when this one was written (a shard keeps the generation of its last write), so a
    # reader can tell a complete, consistent set of shards from one caught mid-write.
    shard: int | None = None
    shards: int | None = None
    shard_generations: list[int] | None = Field(None, alias="shardGenerations")
    # The pods placement considered when the table was written (unset: no adapter is placed on
    # some replicas only). A pod not named has not been given its placements yet: it stays unready.
    placed_on: list[str] | None = Field(None, alias="placedOn")
    # Pods the pool scales down by (``spec.replicas`` lowered): placed over no more, they keep what
    # they hold (``RouteEntry.leaving``) until its new holders have it, and their sidecars mark them
    # first for deletion (``names.POD_DELETION_COST_ANNOTATION``) before the Deployment's replicas drop.
    draining: list[str] | None = None

    def awaits_placement(self, pod: str) -> bool:
        """Whether ``pod`` is new to the placement (its share of the adapters is not in this table)."""
        return self.placed_on is not None and pod not in self.placed_on and pod not in (self.draining or ())

    def drains(self, pod: str) -> bool:
        """Whether the pool is scaling down by ``pod``."""
        return pod in (self.draining or ())

    # -------------------------------------------------------------------------- serialization

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, compact, so that equal tables give equal ConfigMaps."""
        return _canonical(self.model_dump(mode="json", by_alias=True, exclude_none=True))

    @classmethod
    def from_json(cls, text: str) -> "RoutesTable":
        return cls.model_validate_json(text)

    # ------------------------------------------------------------------------------- sharding

    def _parts(self) -> list[tuple[str, str]]:
        """(name, ``"name":{entry}``) in canonical form, sorted as ``json.dumps(sort_keys=True)`` sorts."""
        return [(name, json.dumps(name) + ":" + _canonical(self.adapters[name].model_dump(mode="json", exclude_none=True)))
                for name in sorted(self.adapters)]

    def _shard_text(self, parts: list[str], shard: int | None, shards: int | None) -> str:
        """Exactly ``RoutesTable(..., shard=shard, shards=shards, shard_generations=[generation] * shards)
        .to_json()``, without re-serializing entries."""
        return shard_text(self.pool, self.generation, parts, shard, shards,
                          [self.generation] * shards if shards else None, self.placed_on, self.draining)

    def shard_count(self, budget: int = SHARD_BUDGET_BYTES) -> int:
        """Smallest power of two such that every shard's JSON fits ``budget`` bytes.

        Sizes are summed from each entry's serialized length (computed once), so choosing the count
        for 10,000 adapters costs one serialization, not one per candidate count."""
        parts = self._parts()
        crcs = [zlib.crc32(name.encode("utf-8")) for name, _ in parts]
        lengths = [len(text.encode("utf-8")) for _, text in parts]
        n = 1
        while n <= MAX_SHARDS:
            fixed = len(self._shard_text([], n - 1 if n > 1 else None, n if n > 1 else None).encode("utf-8"))
            sizes = [fixed] * n
            counts = [0] * n
            for crc, length in zip(crcs, lengths):
                sizes[crc % n] += length
                counts[crc % n] += 1
            if all(size + max(count - 1, 0) <= budget for size, count in zip(sizes, counts)):
                return n
            n *= 2
        raise ValueError(f"pool {self.pool}: routes do not fit {MAX_SHARDS} ConfigMaps")

    def to_configmap_data(self, budget: int = SHARD_BUDGET_BYTES) -> dict[str, str]:
        """ConfigMap name -> routes.json for every shard of this table."""
        n = self.shard_count(budget)
        buckets: list[list[str]] = [[] for _ in range(n)]
        for name, text in self._parts():
            buckets[shard_of(name, n)].append(text)
        return {
            names.routes_configmap_name(self.pool, i if n > 1 else None):
                self._shard_text(b, i if n > 1 else None, n if n > 1 else None)
            for i, b in enumerate(buckets)
        }

    @classmethod
    def merge_complete(cls, pool: str, shards: Iterable["RoutesTable"]) -> "RoutesTable | None":
        """The whole table from a complete, consistent set of shards, or None when there is none.

        A set is every shard ``0..N-1`` of one count N, each at the generation the newest of them
        names for it (``shardGenerations``): a reshard half written, or two shards of one
        generation of which one has arrived, is no set. Of several sets (old and new counts both
        present while the operator re-shards) the newest wins; its generation is the table's.
        """
        by_count: dict[int, dict[int | None, RoutesTable]] = {}
        for s in shards:
            if s.pool == pool and s.generation >= 0:
                by_count.setdefault(s.shards or 1, {})[s.shard if s.shards else None] = s
        best: RoutesTable | None = None
        for count, group in by_count.items():
            newest = max(group.values(), key=lambda s: s.generation)
            if count == 1:
                complete = None in group
            else:
                gens = newest.shard_generations
                complete = all(i in group for i in range(count)) and (
                    gens is None  # written before shards named their generations: presence only
                    or len(gens) == count and all(group[i].generation == g for i, g in enumerate(gens)))
            if complete and (best is None or newest.generation > best.generation):
                best = cls(pool=pool, generation=newest.generation, placed_on=newest.placed_on,
                           draining=newest.draining)
                for s in group.values():
                    best.adapters.update(s.adapters)
        return best

    @classmethod
    def merge(cls, pool: str, shards: Iterable["RoutesTable"]) -> "RoutesTable":
        """Best effort: the whole table from the shards at hand, at the newest generation any of them
        has; the complete set when there is one (``merge_complete``), else the shards of the newest
        count as they are. For readers that rewrite the table anyway (the operator after a restart).
        """
        shards = list(shards)
        complete = cls.merge_complete(pool, shards)
        if complete is not None:
            complete.generation = max([complete.generation] + [s.generation for s in shards if s.pool == pool])
            return complete
        shards = [s for s in shards if s.pool == pool]
        if not shards:
            return cls(pool=pool)
        newest = max(shards, key=lambda s: s.generation)
        count = newest.shards
        out = cls(pool=pool, generation=max(s.generation for s in shards), placed_on=newest.placed_on,
                  draining=newest.draining)
        for s in shards:
            if s.shards != count:
                continue
            out.adapters.update(s.adapters)
        return out


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def shard_text(pool: str, generation: int, parts: list[str], shard: int | None, shards: int | None,
               shard_generations: list[int] | None, placed_on: list[str] | None = None,
               draining: list[str] | None = None) -> str:
    """A shard's canonical JSON (``RoutesTable.to_json``) from its entries already serialized
    (``"name":{entry}``, sorted by name)."""
    placed = "" if placed_on is None else ',"placedOn":' + json.dumps(placed_on, separators=(",", ":"))
    drain = "" if draining is None else ',"draining":' + json.dumps(draining, separators=(",", ":"))
    tail = ""
    if shards:
        tail = (f',"shard":{shard},"shardGenerations":[{",".join(str(g) for g in shard_generations or [])}]'
                f',"shards":{shards}')
    return ('{"adapters":{' + ",".join(parts) + "}" + drain + ',"generation":' + str(generation) + placed
            + ',"pool":' + json.dumps(pool) + tail + "}")


def shard_of(name: str, shards: int) -> int:
    """Shard of a served name: stable across processes and Python versions (crc32, not hash())."""
    return zlib.crc32(name.encode("utf-8")) % shards


class SyncReport(_Wire):
    """What a sidecar writes to its pod's ``lorafleet.io/sync`` annotation.

    ``generation`` is the newest routes generation the sidecar has worked through: every version in
    the routes at that generation is loaded into the runtime, except the ones named in ``failed``
    (with the reason) or ``pending`` (still downloading). The lists are capped so the annotation stays
    small with 10,000 adapters: then they name the first ``MAX_LISTED`` not-loaded keys in key order,
    ``coveredThrough`` is the last key they cover completely, ``cutSince`` the lowest ``since`` of
    the not-loaded versions they leave out, and ``failedTotal``/``pendingTotal`` count everything. A
    key after ``coveredThrough`` is loaded only if its version entered the routes before
    ``cutSince`` (the versions a bulk rollout adds are cut, the ones it leaves alone are not);
    otherwise it is unknown, never counted as loaded.
    """

    generation: int = 0
    loaded: int = 0
    failed: dict[str, str] = Field(default_factory=dict)
    pending: list[str] = Field(default_factory=list)
    failed_total: int | None = Field(None, alias="failedTotal")
    pending_total: int | None = Field(None, alias="pendingTotal")
    covered_through: str | None = Field(None, alias="coveredThrough")
    cut_since: int | None = Field(None, alias="cutSince")
    model_ready: bool | None = Field(None, alias="modelReady")
    # What the runtime says of its base model (``GET /admin/model``): loading, loaded, refused or
    # failed, with ``modelError`` its reason for the last two; unset while the runtime is unreachable.
    runtime_model: str | None = Field(None, alias="runtimeModel")
    model_error: str | None = Field(None, alias="modelError")
    # A merged pool's pod: why the sidecar has not readied the adapter its runtime merges (fetch
    # failed, digest mismatch, content refused by the adapter rules), retried with backoff. Its
    # routes name no adapter, so no adapter's failure would say why the pod never turns Ready.
    merged_adapter_failure: str | None = Field(None, alias="mergedAdapterFailure")
    # Why the sidecar has not readied the pool's base model (fetch failed, digest mismatch, content
    # refused), retried with backoff: the pod never turns Ready, and a pool without adapters would
    # show nothing else.
    model_failure: str | None = Field(None, alias="modelFailure")
    # Set while the sidecar keeps its last complete routes table because the ConfigMaps are gone or
    # not a complete set of shards: why, and which generation it serves.
    routes_stale: str | None = Field(None, alias="routesStale")
    # With placement: served name -> requests per second the runtime answered for it over the last
    # ``RATE_WINDOW_S`` (two significant digits; the ``MAX_RATES`` busiest, none below
    # ``MIN_RATE``), which raise an adapter's replica count (spec.placement.requestsPerReplica);
    # and the bytes in the pod's cache volume (base model and adapters), for the pool's status.
    rates: dict[str, float] | None = None
    cache_bytes: int | None = Field(None, alias="cacheBytes")
    # With placement: content digest -> the bytes of its verified directory in this pod's cache, for
    # versions placed here whose route has no ``verified`` size (the first ``MAX_SIZES`` by digest);
    # the operator puts them in the routes, and then they are no longer reported.
    sizes: dict[str, int] | None = None

    MAX_LISTED: ClassVar[int] = 200
    MAX_RATES: ClassVar[int] = 100
    MAX_SIZES: ClassVar[int] = 200
    MIN_RATE: ClassVar[float] = 0.01
    RATE_WINDOW_S: ClassVar[float] = 30.0

    @classmethod
    def build(cls, generation: int, loaded: int, failed: dict[str, str], pending: list[str],
              model_ready: bool | None = None, cap: int | None = None,
              since: Mapping[str, int] | None = None) -> "SyncReport":
        """The report of everything not loaded, its lists cut to the first ``cap`` keys in key order.
        ``since``: key -> the routes generation its version entered at (for ``cutSince``)."""
        cap = cls.MAX_LISTED if cap is None else cap
        keys = sorted(set(failed) | set(pending))
        listed = set(keys[:cap])
        cut = len(keys) > cap
        cut_since = None
        if cut and since is not None and all(k in since for k in keys[cap:]):
            cut_since = min(since[k] for k in keys[cap:])
        return cls(generation=generation, loaded=loaded,
                   failed={k: failed[k] for k in sorted(failed) if k in listed},
                   pending=[k for k in sorted(pending) if k in listed and k not in failed],
                   failed_total=len(failed) if cut else None,
                   pending_total=len(set(pending) - set(failed)) if cut else None,
                   covered_through=keys[cap - 1] if cut and cap > 0 else ("" if cut else None),
                   cut_since=cut_since, model_ready=model_ready)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True, exclude_none=True),
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def rates_of(cls, rates: Mapping[str, float]) -> dict[str, float]:
        """What a report carries of measured rates: the ``MAX_RATES`` busiest at ``MIN_RATE`` or
        more, two significant digits (a rate that wobbles does not rewrite the annotation)."""
        top = sorted(((r, n) for n, r in rates.items() if r >= cls.MIN_RATE), key=lambda x: (-x[0], x[1]))
        return {n: float(f"{r:.2g}") for r, n in top[:cls.MAX_RATES]}

    @classmethod
    def from_annotation(cls, value: str | None) -> "SyncReport | None":
        if not value:
            return None
        try:
            return cls.model_validate_json(value)
        except ValueError:
            return None

    @property
    def truncated(self) -> bool:
        return (self.covered_through is not None
                or (self.failed_total or 0) > len(self.failed) or (self.pending_total or 0) > len(self.pending))

    def covers(self, key: str, since: int | None = None) -> bool:
        """Whether the report says positively if ``key`` (whose version entered the routes at
        ``since``) is loaded: always, unless the lists were cut."""
        if self.covered_through is not None:
            return key <= self.covered_through or (
                since is not None and self.cut_since is not None and since < self.cut_since)
        # A report without coveredThrough (an older sidecar) cut each sorted list on its own: it
        # covers the keys up to the last one listed in every list that was cut.
        bounds = [max(self.failed, default="") for _ in [0] if (self.failed_total or 0) > len(self.failed)]
        bounds += [max(self.pending, default="") for _ in [0] if (self.pending_total or 0) > len(self.pending)]
        return not bounds or key <= min(bounds)

    def has_loaded(self, name: str, version: str, since: int) -> bool:
        key = names.versioned_name(name, version)
        return (self.generation >= since and key not in self.failed and key not in self.pending
                and self.covers(key, since))

    def failure(self, name: str, version: str) -> str | None:
        return self.failed.get(names.versioned_name(name, version))

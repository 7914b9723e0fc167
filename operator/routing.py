"""Pure planning for one pool: its adapters, its pods' sync reports and the routes last written ->
the next routes table, which shards to write or delete, and every adapter's and the pool's status.

No API calls here: ``lorafleet.operator.fleet`` feeds it views of the objects and writes what it
returns. DESIGN §3 (routes, rollout rule) and §4 (sync report) are implemented here.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from pydantic import ValidationError

from lorafleet.contracts import names, placement
from lorafleet.contracts.kubeio import pod_ready
from lorafleet.contracts.resources import (AdapterPhase, BaseModelPoolSpec, BaseModelPoolStatus, Condition,
                                           LoRAAdapterSpec, PoolPhase, ReplicaPlacement, condition)
from lorafleet.contracts.quantity import parse_quantity
from lorafleet.contracts.tenancy import source_problem, uri_within
from lorafleet.contracts.routes import (MAX_SHARDS, SHARD_BUDGET_BYTES, MergedRoute, RouteEntry, RoutesTable, RouteVersion, SyncReport,
                                       shard_text)

NEW = -1  # `since` of a version not yet in the table: filled with the generation that adds it


# ------------------------------------------------------------------------------------- views


@dataclass(frozen=True)
class AdapterView:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    spec: LoRAAdapterSpec | None
    spec_error: str | None
    pool: str
    status: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def served_name(self) -> str:
        return (self.spec.served_name if self.spec is not None else None) or self.name

    def ref(self) -> dict[str, Any]:
        """Enough of the object for a Kubernetes Event."""
        return {"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND,
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


@dataclass(frozen=True)
class PoolView:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: BaseModelPoolSpec | None
    spec_error: str | None
    status: dict[str, Any] = field(default_factory=dict, compare=False)

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": names.API_VERSION, "kind": names.POOL_KIND,
                "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}


@dataclass(frozen=True)
class PodView:
    name: str
    ready: bool
    report: SyncReport | None
    terminating: bool = False  # deletionTimestamp set: placement no longer counts on it
    merged: str | None = None  # a merged pool's pod: the digest of the adapter its runtime merges
    deletion_cost: str | None = None  # its controller.kubernetes.io/pod-deletion-cost annotation
    created: str = ""  # creationTimestamp


@dataclass(frozen=True)
class WorkloadView:
    """An owned Deployment as far as the pool's status and drift repair need it."""

    name: str
    generation: int
    problem: str | None  # why its pods are not being created or rolled out, from its conditions
    reason: str | None = None  # that condition's reason (FailedCreate, ProgressDeadlineExceeded)
    replicas: int | None = None  # its spec.replicas (what the ReplicaSet keeps running)


@dataclass(frozen=True)
class MergedRef:
    """What a merged pool's pods merge (``spec.model.mergedAdapter`` resolved against its LoRAAdapter):
    the content goes into the pod template, so a new version rolls the pool's pods."""

    adapter: str  # the LoRAAdapter's name
    served_name: str
    version: str
    uri: str
    sha256: str
    tenant: str
    shared_pool: str  # the adapter's spec.pool, which serves it while this pool has no Ready replica


@dataclass(frozen=True)
class MergedInfo:
    """A merged pool as its adapter's shared pool sees it: for the routes entry and the adapter's status."""

    pool: str
    version: str
    ready: int
    replicas: int
    refused: str | None = None  # why its pods' sidecars cannot ready that version (``merged_refusal``)
    other_ready: int = 0  # Ready pods still merging another version (rolling), not in ``ready``


def resolve_merged(pool: PoolView, adapter: AdapterView | None,
                   tenants: "Tenants | SourceCheck | None" = None) -> tuple[MergedRef | None, str | None]:
    """The merged pool's adapter version, or why it cannot be merged (naming the field to fix)."""
    assert pool.spec is not None and pool.spec.model.merged_adapter is not None
    want = pool.spec.model.merged_adapter
    field_ = "spec.model.mergedAdapter"
    if pool.spec.model.task.value != "text-generation":
        return None, f"{field_}: merged pools are text-generation only (spec.model.task is {pool.spec.model.task.value})"
    if adapter is None or adapter.spec is None:
        why = "does not exist" if adapter is None else f"has an invalid spec ({adapter.spec_error})"
        return None, f"{field_}.name: LoRAAdapter {want.name!r} {why} in namespace {pool.namespace!r}"
    spec = adapter.spec
    if spec.pool == pool.name:
        return None, (f"{field_}.name: LoRAAdapter {want.name!r} names this pool as its spec.pool; it must name a "
                      f"shared pool, which serves it while this one has no Ready replica")
    check = source_check(tenants)
    problems = spec.problems() + (check.problems(spec) if check is not None else [])
    if problems:
        return None, f"{field_}.name: LoRAAdapter {want.name!r} is invalid: {'; '.join(problems)}"
    version = want.version or spec.version
    if version == spec.version:
        source = spec.source
    elif spec.canary is not None and version == spec.canary.version:
        source = spec.canary.source
    else:
        have = [spec.version] + ([spec.canary.version] if spec.canary else [])
        return None, (f"{field_}.version: {version!r} is not a version of LoRAAdapter {want.name!r} (it has "
                      f"{', '.join(have)}); set it to one, or leave it out to follow spec.version")
    return MergedRef(adapter=adapter.name, served_name=adapter.served_name, version=version, uri=source.uri,
                     sha256=source.sha256, tenant=spec.tenant, shared_pool=spec.pool), None


def pods_named(who: list[str]) -> str:
    """The first three of ``who`` by name, ", ..." after them when there are more (a condition's message)."""
    return ", ".join(sorted(who)[:3]) + (", ..." if len(who) > 3 else "")


def merged_refusal(ref: MergedRef, pods: list["PodView"]) -> str | None:
    """Why a merged pool's pods do not load ``ref``: their sidecars' ``mergedAdapterFailure`` (a digest
    mismatch, a fetch failing, content the adapter rules refuse), naming the adapter, its version and
    digest and the pods; None while no pod reports one. The pool's ModelReady condition and the
    adapter's status both say this."""
    why: dict[str, list[str]] = {}
    for p in pods:
        if p.report is not None and p.report.merged_adapter_failure:
            why.setdefault(p.report.merged_adapter_failure, []).append(p.name)
    if not why:
        return None
    parts = []
    for reason, who in sorted(why.items()):
        named = pods_named(who)
        parts.append(f"on {len(who)}/{len(pods)} pods ({named}): {reason}")
    return (f"the sidecar cannot ready merged adapter {names.versioned_name(ref.served_name, ref.version)} "
            f"(LoRAAdapter {ref.adapter!r}, sha256 {ref.sha256}) " + "; ".join(parts))


def workload_view(body: dict[str, Any]) -> WorkloadView:
    """The Deployment's ``ReplicaFailure`` (the ReplicaSet could not create pods: a quota, an
    admission refusal; the ReplicaSet's message names it) or a ``Progressing=False`` rollout."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    name = meta.get("name", "")
    problem = reason = None
    conds = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    for type_, bad in (("ReplicaFailure", "True"), ("Progressing", "False")):
        c = next((c for c in conds if c.get("type") == type_ and c.get("status") == bad), None)
        if c is not None:
            reason = str(c.get("reason") or type_)
            problem = f"Deployment {name}: {reason}: {c.get('message') or ''}".rstrip(": ")
            break
    replicas = (body.get("spec") or {}).get("replicas")
    return WorkloadView(name=name, generation=int(meta.get("generation") or 0), problem=problem, reason=reason,
                        replicas=int(replicas) if replicas is not None else None)


def holds(obj: Any, applied: Any) -> bool:
    """Whether an object as the API server has it still carries every field the operator applied,
    with its value: dicts by key, lists item by item in any order (what others add to a list, or to
    an object, is theirs, not drift), scalars equal or equal as text (``80`` and ``"80"``)."""
    if isinstance(applied, dict):
        return isinstance(obj, dict) and all(k in obj and holds(obj[k], v) for k, v in applied.items())
    if isinstance(applied, list):
        return isinstance(obj, list) and all(any(holds(o, a) for o in obj) for a in applied)
    return obj == applied or (not isinstance(obj, (dict, list)) and str(obj) == str(applied))


def _spec_error(e: ValidationError, prefix: str) -> str:
    return "; ".join(f"{prefix}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())


def _parse_adapter_spec(raw: dict[str, Any]) -> tuple[LoRAAdapterSpec | None, str | None]:
    try:
        return LoRAAdapterSpec.model_validate(raw), None
    except ValidationError as e:
        return None, _spec_error(e, "spec")


class SpecCache:
    """Parsed LoRAAdapter specs by (uid, generation), for whoever sees an adapter many times (the
    operator's store: each status write comes back as an event); a spec only changes with the
    generation. Holds at most ``limit`` (then starts afresh)."""

    def __init__(self, limit: int = 200_000):
        self.limit = limit
        self.parsed: dict[tuple[str, int], tuple[LoRAAdapterSpec | None, str | None]] = {}

    def parse(self, uid: str, generation: int, raw: dict[str, Any]) -> tuple[LoRAAdapterSpec | None, str | None]:
        key = (uid, generation)
        hit = self.parsed.get(key)
        if hit is not None and uid:
            return hit
        out = _parse_adapter_spec(raw)
        if len(self.parsed) >= self.limit:
            self.parsed.clear()
        self.parsed[key] = out
        return out


def adapter_view(body: dict[str, Any], specs: SpecCache | None = None) -> AdapterView:
    meta, raw = body.get("metadata", {}), body.get("spec") or {}
    spec, error = (specs.parse(meta.get("uid", ""), int(meta.get("generation") or 0), raw) if specs is not None
                   else _parse_adapter_spec(raw))
    return AdapterView(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
                       generation=int(meta.get("generation") or 0), created=meta.get("creationTimestamp") or "",
                       spec=spec, spec_error=error, pool=str(raw.get("pool", "")),
                       status=dict(body.get("status") or {}))


def pool_view(body: dict[str, Any]) -> PoolView:
    meta = body.get("metadata", {})
    try:
        spec, error = BaseModelPoolSpec.model_validate(body.get("spec") or {}), None
    except ValidationError as e:
        spec, error = None, _spec_error(e, "spec")
    return PoolView(namespace=meta.get("namespace", ""), name=meta.get("name", ""), uid=meta.get("uid", ""),
                    generation=int(meta.get("generation") or 0), spec=spec, spec_error=error,
                    status=dict(body.get("status") or {}))


def tenant_sources(body: dict[str, Any]) -> list[str]:
    """A LoRATenant's spec.sources; one that does not parse allows no source (its adapters say why)."""
    from lorafleet.contracts.resources import LoRATenantSpec

    try:
        return list(LoRATenantSpec.model_validate(body.get("spec") or {}).sources)
    except ValidationError:
        return []


TenantKeys = list[tuple[str, str]] | str  # a LoRATenant's spec.apiKeys as (name, sha256), or why it does not parse


def tenant_keys(body: dict[str, Any]) -> TenantKeys:
    """A LoRATenant's API key digests, as ``tenancy.accepted_keys`` takes them; the parse error instead
    when its spec does not parse (the gateway then accepts none of its keys)."""
    from lorafleet.contracts.resources import LoRATenantSpec

    try:
        spec = LoRATenantSpec.model_validate(body.get("spec") or {})
    except ValidationError as e:
        return _spec_error(e, "spec")
    return [(k.name, k.sha256) for k in spec.api_keys]


def tenant_statuses(tenants: dict[str, TenantKeys]) -> dict[str, dict[str, Any]]:
    """Every LoRATenant's status in one namespace: ``keys``, the API key digests the gateway accepts for
    it (by the gateway's own rule, ``tenancy.accepted_keys``), and a message saying why any is refused."""
    from lorafleet.contracts.tenancy import accepted_count, accepted_keys

    parsed = {n: k for n, k in tenants.items() if not isinstance(k, str)}
    accepted, problems = accepted_keys(parsed)
    out: dict[str, dict[str, Any]] = {}
    for name, keys in tenants.items():
        if isinstance(keys, str):
            out[name] = {"keys": 0, "message": f"no API key is accepted: {keys}"}
            continue
        n = accepted_count(name, accepted)
        found = problems.get(name)
        message = f"{n} API key{'' if n == 1 else 's'} accepted"
        out[name] = {"keys": n, "message": f"{message}; {'; '.join(found)}" if found else message}
    return out


def pod_view(body: dict[str, Any]) -> PodView:
    meta = body.get("metadata", {})
    ready = pod_ready(body)
    report = SyncReport.from_annotation((meta.get("annotations") or {}).get(names.SYNC_ANNOTATION))
    merged = None
    for c in (body.get("spec") or {}).get("containers") or []:
        for e in c.get("env") or []:
            if e.get("name") == names.RuntimeEnv.MERGED_ADAPTER_DIR and e.get("value"):
                merged = e["value"].rstrip("/").rsplit("/", 1)[-1]
    return PodView(name=meta.get("name", ""), ready=bool(ready), report=report,
                   terminating=bool(meta.get("deletionTimestamp")), merged=merged,
                   deletion_cost=(meta.get("annotations") or {}).get(names.POD_DELETION_COST_ANNOTATION),
                   created=meta.get("creationTimestamp") or "")


def merged_ready(ref: MergedRef, pods: list[PodView]) -> tuple[int, int]:
    """A merged pool's Ready pods that merge ``ref`` (its digest in their template), and those still
    merging another version (a roll under way: they answer as that version)."""
    ready = [p for p in pods if p.ready]
    current = sum(1 for p in ready if p.merged == ref.sha256)
    return current, len(ready) - current


# ------------------------------------------------------------------------------------- plan


@dataclass
class PoolPlan:
    table: RoutesTable  # the whole table (generation = the pool-wide generation after this plan)
    changed: bool  # routes differ from the previous table
    adapter_status: dict[str, dict[str, Any]]  # adapter name -> status (wire form)
    pool_status: dict[str, Any] | None
    # The Deployment's replicas to apply: spec.replicas, or while a scale down drains pods the
    # replicas it has until every adapter that stays served is loaded where it goes.
    deployment_replicas: int | None = None
    drain: "Drain | None" = None


Tenants = dict[str, list[str]]  # tenant (LoRATenant name) -> its spec.sources, in one namespace


class SourceCheck:
    """Which (tenant, URI) pairs the tenants' sources allow, remembered: a pool of 10,000 adapters
    asks for every version on every plan, and the answer only moves when a tenant does. ``tenants``
    is a snapshot, so a caller's dict edited in place later reads as a change (``matches``)."""

    def __init__(self, tenants: Tenants):
        self.tenants: Tenants = {t: list(p) for t, p in tenants.items()}
        self.seen: dict[tuple[str, str], bool] = {}

    def matches(self, tenants: Tenants) -> bool:
        return self.tenants == tenants

    def allows(self, tenant: str, uri: str) -> bool:
        key = (tenant, uri)
        hit = self.seen.get(key)
        if hit is None:
            prefixes = self.tenants.get(tenant)
            hit = prefixes is not None and any(uri_within(uri, p) for p in prefixes)
            if len(self.seen) > 200_000:
                self.seen.clear()
            self.seen[key] = hit
        return hit

    def problems(self, spec: LoRAAdapterSpec) -> list[str]:
        """The adapter's source and canary URIs outside its tenant's storage prefixes, each naming its
        field (one problem naming spec.tenant when the tenant has no LoRATenant)."""
        uris = [("spec.source.uri", spec.source.uri)]
        if spec.canary is not None:
            uris.append(("spec.canary.source.uri", spec.canary.source.uri))
        if all(self.allows(spec.tenant, uri) for _, uri in uris):
            return []
        prefixes = self.tenants.get(spec.tenant)
        if prefixes is None:
            return [p for p in [source_problem("spec.tenant", spec.tenant, spec.tenant, None)] if p]
        return [p for field_, uri in uris if (p := source_problem(field_, uri, spec.tenant, prefixes))]

    def within(self, entry: RouteEntry) -> RouteEntry | None:
        """``entry`` without the versions that lie outside its tenant's prefixes (a tenant whose
        spec.sources shrank, or that is gone: what it no longer allows is not served, draining or
        not); None when nothing is left."""
        kept = [v for v in entry.versions if self.allows(entry.tenant, v.uri)]
        if len(kept) == len(entry.versions):
            return entry
        return entry.model_copy(update={"versions": kept}) if kept else None


def source_check(tenants: Tenants | SourceCheck | None) -> SourceCheck | None:
    return tenants if tenants is None or isinstance(tenants, SourceCheck) else SourceCheck(tenants)


def validity(adapters: list[AdapterView], pool: str, tenants: Tenants | SourceCheck | None = None
             ) -> dict[str, list[str]]:
    """Adapter name -> problems (empty when valid). Of two adapters claiming one servedName, the
    older keeps it. ``tenants``: the namespace's LoRATenants' sources; an adapter whose tenant is
    missing, or whose source lies outside its tenant's, is invalid (None: not checked, for planner
    tests that are about something else; the operator always passes them)."""
    problems: dict[str, list[str]] = {}
    claims: dict[str, AdapterView] = {}
    check = source_check(tenants)
    for a in sorted(adapters, key=lambda a: (a.created, a.name)):
        if a.spec is None:
            problems[a.name] = [a.spec_error or "spec: does not parse"]
            continue
        found = a.spec.problems() + (check.problems(a.spec) if check is not None else [])
        holder = claims.get(a.served_name)
        if a.served_name == pool:
            found.append(f"spec.servedName: {pool!r} is the pool's base model id (requests naming it reach the "
                         f"base model); set another spec.servedName")
        elif holder is not None:
            found.append(f"spec.servedName: {a.served_name!r} is already served by LoRAAdapter {holder.name!r} "
                         f"in pool {pool!r}; choose another servedName")
        elif not found:
            claims[a.served_name] = a
        problems[a.name] = found
    return problems


def desired_versions(spec: LoRAAdapterSpec) -> list[RouteVersion]:
    if spec.canary is None:
        return [RouteVersion(version=spec.version, uri=spec.source.uri, sha256=spec.source.sha256, weight=100,
                             since=NEW)]
    w = spec.canary.weight
    return [RouteVersion(version=spec.version, uri=spec.source.uri, sha256=spec.source.sha256, weight=100 - w,
                         since=NEW),
            RouteVersion(version=spec.canary.version, uri=spec.canary.source.uri,
                         sha256=spec.canary.source.sha256, weight=w, since=NEW)]


def holds_all(pod: PodView, served: str, versions: list[RouteVersion], placed_since: int) -> bool:
    """Whether the pod's report shows every one of ``versions`` loaded, the adapter placed on it
    since generation ``placed_since`` (a report older than its placement says nothing of it)."""
    return pod.report is not None and placed_since != NEW and all(
        v.since != NEW and pod.report.has_loaded(served, v.version, max(v.since, placed_since)) for v in versions)


def merge_entry(served: str, spec: LoRAAdapterSpec, previous: RouteEntry | None,
                ready_pods: list[PodView], merged: MergedInfo | None = None,
                holders: dict[str, int] | None = None) -> RouteEntry:
    """The rollout rule: a version that leaves the spec stays, draining (weight 0), until every
    ready replica that holds the adapter (``holders``: pod -> generation placed; None: every
    replica) has loaded every version the spec wants, and there is at least one; then it is
    dropped. With no ready holder nobody has shown the new version: the old one stays, so replicas
    that come back (all unready at once, a restart of the pool) still have something to serve."""
    if holders is not None:
        ready_pods = [p for p in ready_pods if p.name in holders]
    want = desired_versions(spec)
    old = {v.version: v for v in (previous.versions if previous else [])}
    for v in want:
        p = old.get(v.version)
        if p is not None and p.sha256 == v.sha256 and p.uri == v.uri:
            v.since = p.since
    wanted = {v.version for v in want}
    leaving = [p for p in old.values() if p.version not in wanted]
    if leaving:
        everyone_has_new = bool(ready_pods) and all(
            holds_all(pod, served, want, holders[pod.name] if holders is not None else 0) for pod in ready_pods)
        if not everyone_has_new:
            want += [p.model_copy(update={"weight": 0, "draining": True}) for p in leaving]
    return RouteEntry(tenant=spec.tenant, pinned=spec.pinned, preload=spec.preload, versions=want,
                      fallback="base" if spec.fallback == "base" else None,
                      merged=MergedRoute(pool=merged.pool, version=merged.version) if merged else None,
                      holders=dict(holders) if holders is not None else None)


def _route_of(m: MergedInfo | None) -> tuple[str, str] | None:
    """What of a merged pool the routes hold (readiness is the status's, not the routes')."""
    return (m.pool, m.version) if m is not None else None


@dataclass
class PoolPlacement:
    """What placement decided for one pool, for the routes and the statuses."""

    targets: dict[str, list[str]] = field(default_factory=dict)  # served name -> pods to hold it
    wanted: dict[str, int] = field(default_factory=dict)  # served name -> holders wanted (popularity included)
    base: dict[str, int] = field(default_factory=dict)  # served name -> holders its spec asks for
    short: dict[str, int] = field(default_factory=dict)  # served name -> base holders without room
    blocked: dict[str, list[str]] = field(default_factory=dict)  # served name -> budgets that refused it
    extra_short: dict[str, int] = field(default_factory=dict)  # served name -> popularity holders without room
    rates: dict[str, float] = field(default_factory=dict)  # served name -> requests/s its holders measured
    live: list[str] = field(default_factory=list)  # the pods placed over
    popularity: bool = False  # spec.placement.requestsPerReplica is set

    def info(self, served: str) -> tuple | None:
        """The part of it one adapter's status depends on."""
        if served not in self.wanted:
            return None
        # The rate only where it gives the adapter more replicas than its spec (two significant
        # digits): a cold adapter's status does not move, nor get rewritten, with every rate window.
        hot = self.popularity and self.wanted[served] > self.base.get(served, 0)
        return (self.wanted[served], self.short.get(served, 0), tuple(self.blocked.get(served, ())),
                self.extra_short.get(served, 0), float(f"{self.rates.get(served, 0.0):.2g}") if hot else None)


BUDGET_FIELDS = {placement.DISK: "spec.placement.adapterBytes (disk)",
                 placement.MEMORY: "spec.placement.hostMemoryBytes (host memory)"}


def budget_words(blocked: list[str] | tuple[str, ...]) -> str:
    return " and ".join(BUDGET_FIELDS[b] for b in blocked) or BUDGET_FIELDS[placement.DISK]


def measured_rates(pods: list[PodView]) -> dict[str, float]:
    """Served name -> requests/s, summed over the pods' sync reports (each pod's runtime counts what
    it answered)."""
    out: dict[str, float] = {}
    for p in pods:
        if p.terminating or p.report is None or not p.report.rates:
            continue
        for served, r in p.report.rates.items():
            out[served] = out.get(served, 0.0) + r
    return out


def known_sizes(previous: RoutesTable | None, pods: list[PodView]) -> dict[str, int]:
    """Content digest -> its bytes as a sidecar verified them: what the routes last said, and what
    the pods' sync reports say since."""
    out: dict[str, int] = {}
    for e in (previous.adapters.values() if previous is not None else ()):
        for v in e.versions:
            if v.verified is not None:
                out[v.sha256] = v.verified
    for p in pods:
        for sha, n in ((p.report.sizes or {}) if p.report is not None else {}).items():
            out[sha] = int(n)
    return out


def adapter_bytes(spec: LoRAAdapterSpec, known: dict[str, int], default: int) -> int:
    """What the adapter's versions take on a replica that holds it: per version the larger of its
    source's sizeBytes and its verified size, ``default`` when neither is known (a declared size
    too small is raised by the verified one)."""
    total = 0
    for src in [spec.source] + ([spec.canary.source] if spec.canary else []):
        declared = parse_quantity(src.size_bytes) if src.size_bytes is not None else 0
        total += max(declared, known.get(src.sha256, 0)) or default
    return total


def _with_verified(entry: RouteEntry, known: dict[str, int]) -> RouteEntry:
    for v in entry.versions:
        if v.sha256 in known:
            v.verified = known[v.sha256]
    return entry


def _verified_current(entry: RouteEntry, known: dict[str, int]) -> bool:
    return all(v.verified == known.get(v.sha256) for v in entry.versions)


def place_adapters(adapters: list[AdapterView], problems: dict[str, list[str]], pool_spec: BaseModelPoolSpec | None,
                   pods: list[PodView], previous: RoutesTable | None = None,
                   known: dict[str, int] | None = None, draining: Iterable[str] = ()) -> PoolPlacement:
    """Where every valid adapter placed on some replicas (not "all") goes: its spec's count, raised
    by its measured request rate (``spec.placement.requestsPerReplica``, with ``previous``'s counts
    for the hysteresis), within each pod's disk and host-memory budgets. ``draining``: pods the pool
    scales down by, placed over no more."""
    out = PoolPlacement()
    if pool_spec is None:
        return out
    default_size = pool_spec.cache.max_adapter_bytes_int
    # A pod is placed over once its sidecar reports (it runs: scheduled, started), Ready or not, so
    # it has its share before it turns Ready; a pod that never started (unschedulable) gets none.
    drained = set(draining)
    live = sorted(p.name for p in pods
                  if not p.terminating and (p.ready or p.report is not None) and p.name not in drained)
    per_replica = pool_spec.placement.requests_per_replica
    out.popularity = per_replica is not None
    rates = measured_rates(pods) if per_replica is not None else {}
    known = known_sizes(previous, pods) if known is None else known
    demands = []
    for a in adapters:
        if a.spec is None or problems.get(a.name):
            continue
        k = placement.replicas_wanted(a.spec.replicas, pool_spec.placement.replicas_per_adapter, pool_spec.replicas)
        if k is None:
            continue
        served = a.served_name
        rate = rates.get(served, 0.0)
        prev = previous.adapters.get(served) if previous is not None else None
        total = placement.popular_replicas(rate, per_replica, k, prev.hot if prev is not None else None,
                                           max(len(live), k))
        out.base[served], out.wanted[served], out.rates[served] = k, total, rate
        size = adapter_bytes(a.spec, known, default_size)
        demands.append(placement.Demand(served, total, size, base=k, rate=rate))
    if not demands:
        return out
    got = placement.place(demands, live, pool_spec.placement_budget(), pool_spec.placement_memory_budget())
    out.targets, out.short, out.blocked, out.extra_short = got.holders, got.short, got.blocked, got.extra_short
    out.live = live
    return out


@dataclass
class Drain:
    """A scale down in progress: ``spec.replicas`` (``wanted``) below the pods running. The pods to
    remove (``pods``) are placed over no more and keep what they hold until its new holders have it;
    the Deployment keeps ``deployed`` replicas until ``done``."""

    wanted: int
    deployed: int
    running: int  # pods alive (not terminating)
    pods: list[str]
    moving: int = 0  # adapters still on a drained pod (its new holders have not loaded them)
    unmarked: list[str] = field(default_factory=list)  # drained pods whose sidecar has not marked them yet

    @property
    def done(self) -> bool:
        return not self.moving and not self.unmarked

    def words(self) -> str:
        why = (f"{self.moving} adapters still moving to the replicas that stay" if self.moving else
               f"waiting for the sidecar of {', '.join(self.unmarked)} to set {names.POD_DELETION_COST_ANNOTATION}"
               if self.unmarked else "replicas lowered")
        return f"scaling down from {self.running} to {self.wanted} replicas: draining {', '.join(self.pods)}; {why}"


def plan_drain(pool_spec: BaseModelPoolSpec | None, pods: list[PodView], previous: RoutesTable,
               deployed: int | None) -> Drain | None:
    """Which pods a scale down removes, while ``spec.replicas`` is below the Deployment's replicas
    (``deployed``) and more pods are alive than wanted, in a pool whose routes place adapters on some
    replicas (without placement every replica holds everything: nothing to move first). Chosen as the
    ReplicaSet controller would delete them before deletion costs count (a pod that never started,
    then one not Ready), then the pods already draining, then those holding the fewest adapters (least
    to move), then by name; once a drain began, its pods stay chosen (the routes name them). None
    when nothing drains: the Deployment gets ``spec.replicas`` at once."""
    if pool_spec is None or previous.placed_on is None:
        return None
    wanted = pool_spec.replicas
    alive = [p for p in pods if not p.terminating]
    before = set(previous.draining or ())
    if deployed is None and before:
        deployed = len(alive)  # the operator restarted mid-drain and has not seen the Deployment yet
    if deployed is None or len(alive) <= wanted:
        return None
    if deployed <= wanted:
        # Lowered already (the drain was done): the pods it drained until the ReplicaSet deletes them.
        candidates = [p for p in alive if p.name in before]
        if not candidates:
            return None  # more pods than wanted for another reason (a rollout's surge): not ours to pick
    else:
        candidates = alive
    held: dict[str, int] = {}
    for e in previous.adapters.values():
        for pod in e.holders or {}:
            held[pod] = held.get(pod, 0) + 1

    def order(p: PodView) -> tuple:
        started = p.ready or p.report is not None
        return (0 if not started else 1 if not p.ready else 2, p.name not in before, held.get(p.name, 0), p.name)

    chosen = sorted(sorted(candidates, key=order)[:len(alive) - wanted], key=lambda p: p.name)
    unmarked = [p.name for p in chosen if p.report is not None and p.deletion_cost != names.DRAIN_DELETION_COST]
    return Drain(wanted=wanted, deployed=max(deployed, wanted), running=len(alive), pods=[p.name for p in chosen],
                 unmarked=unmarked)


def with_leaving(served: str, entry: RouteEntry, previous: RouteEntry | None, pods: list[PodView]) -> RouteEntry:
    """Make before break: pods that held the adapter and are no longer placed to keep holding it
    while they are alive and some pod it is placed on now lacks a version it routes."""
    if entry.holders is None or previous is None:
        return entry
    alive = {p.name: p for p in pods if not p.terminating}
    if previous.holders is None:  # it was on every replica
        before = {pod: 0 for pod in alive}
    else:
        before = dict(previous.leaving or {})
        before.update(previous.holders)
    serving = [v for v in entry.versions if not v.draining]
    # Only a pod that has the adapter loaded keeps it: one placed it moments ago that has not loaded
    # it serves nothing of it, and fetching it now would only take room from what it is to hold
    # (pods joining one after another moved adapters on before any had loaded: a pod was asked for
    # holders and old copies past its cache, and downloads failed "cache full").
    gone = {pod: since for pod, since in before.items() if pod not in entry.holders and pod in alive
            and any(holds_all(alive[pod], served, [v], since) for v in serving)}
    if not gone:
        return entry
    # Placed nowhere now (no pod has room within the budget): the budget wins, the old copies go.
    if all(pod in alive and alive[pod].ready and holds_all(alive[pod], served, serving, since)
           for pod, since in entry.holders.items()):
        return entry
    return entry.model_copy(update={"leaving": gone})


def _cap_leaving(entries: dict[str, RouteEntry], adapters: list[AdapterView], pool_spec: BaseModelPoolSpec,
                 known: dict[str, int]) -> None:
    """Old copies kept on a pod (``leaving``) take at most one placement budget of bytes there (the
    room the cache keeps for a move beside what the pod holds, ``placement_budget``); past it, the
    copies of the adapters later in name order are let go at once (their new holders serve them once
    loaded). Chained moves (pods joining or leaving before the last move finished) would otherwise
    ask one pod for its holders and several moves' old copies together, past its cache."""
    moving = sorted(served for served, e in entries.items() if e.leaving)
    if not moving:
        return
    room = pool_spec.placement_budget()
    default = pool_spec.cache.max_adapter_bytes_int
    specs = {a.served_name: a.spec for a in adapters if a.spec is not None}
    kept: dict[str, int] = {}
    for served in moving:
        e = entries[served]
        size = adapter_bytes(specs[served], known, default) if served in specs else default
        stay = {}
        for pod, since in e.leaving.items():
            if kept.get(pod, 0) + size <= room:
                kept[pod] = kept.get(pod, 0) + size
                stay[pod] = since
        if len(stay) != len(e.leaving):
            entries[served] = e.model_copy(update={"leaving": stay or None})


def _fill_since(entries: dict[str, RouteEntry], generation: int) -> None:
    for e in entries.values():
        for v in e.versions:
            if v.since == NEW:
                v.since = generation
        for placed in (e.holders, e.leaving):
            for pod, since in (placed or {}).items():
                if since == NEW:
                    placed[pod] = generation


def plan_routes(pool: str, adapters: list[AdapterView], problems: dict[str, list[str]], previous: RoutesTable,
                pods: list[PodView], entry_memo: dict[str, tuple[tuple[str, int], RouteEntry]] | None = None,
                tenants: Tenants | SourceCheck | None = None,
                merged: dict[str, MergedInfo] | None = None,
                pool_spec: BaseModelPoolSpec | None = None,
                outcome: dict[str, Any] | None = None, deployed: int | None = None) -> tuple[RoutesTable, bool]:
    """``pool_spec``: the pool's spec, for placement (None: every replica holds every adapter).
    ``deployed``: the Deployment's replicas as last seen (a scale down drains pods first: ``plan_drain``).
    ``outcome`` gets the ``PoolPlacement`` under "placement" and the ``Drain`` (or None) under "drain"."""
    ready = [p for p in pods if p.ready]
    known = known_sizes(previous, pods)
    drain = plan_drain(pool_spec, pods, previous, deployed)
    decided = place_adapters(adapters, problems, pool_spec, pods, previous, known,
                             draining=drain.pods if drain is not None else ())
    if outcome is not None:
        outcome["placement"] = decided
        outcome["drain"] = drain
    targets, placed_on = decided.targets, decided.live
    entries: dict[str, RouteEntry] = {}
    for a in adapters:
        if a.spec is None:
            continue
        if problems.get(a.name):
            # An invalid update leaves the last good routes of this adapter alone (if it still
            # holds its name): nothing else in the pool is disturbed, and neither is its traffic.
            prev = previous.adapters.get(a.served_name)
            if prev is not None and not any(a.served_name == b.served_name and not problems.get(b.name)
                                            for b in adapters):
                entries[a.served_name] = prev
            continue
        prev = previous.adapters.get(a.served_name)
        m = (merged or {}).get(a.name)
        target = targets.get(a.served_name)
        holders: dict[str, int] | None = None
        hot = None
        if target is not None:
            before = dict((prev.leaving or {}) if prev is not None else {})
            before.update((prev.holders or {}) if prev is not None else {})
            holders = {pod: before.get(pod, NEW) for pod in target}
            want = decided.wanted.get(a.served_name, 0)
            hot = want if want > decided.base.get(a.served_name, want) else None
        made = entry_memo.get(a.name) if entry_memo is not None else None
        if (made is not None and prev is not None and made[0] == (a.uid, a.generation, _route_of(m)) and made[1] is prev
                and not any(v.draining for v in prev.versions) and prev.holders == holders and not prev.leaving
                and prev.hot == hot and (holders is None or _verified_current(prev, known))):
            # Same spec and placement, and the entry is the very one built from it: nothing to redo.
            entries[a.served_name] = prev
            continue
        entry = merge_entry(a.served_name, a.spec, prev, ready, m, holders)
        if hot is not None:
            entry.hot = hot
        if holders is not None:
            _with_verified(entry, known)
        entries[a.served_name] = with_leaving(a.served_name, entry, prev, pods)
    if pool_spec is not None and targets:
        _cap_leaving(entries, adapters, pool_spec, known)
    check = source_check(tenants)
    for served, entry in list(entries.items()) if check is not None else ():
        kept = check.within(entry)
        if kept is None:
            del entries[served]
        elif kept is not entry:
            entries[served] = kept
    placed = placed_on if targets else None
    draining = drain.pods if drain is not None and placed is not None else None
    if draining is not None:
        assert drain is not None
        def on_drained(table: dict[str, RouteEntry]) -> int:
            return sum(1 for e in table.values()
                       if any(p in (e.leaving or {}) or p in (e.holders or {}) for p in draining))

        # Counted in the routes written before too: the replicas drop only once routes that no
        # longer need the drained pods are out (this plan's are written after the Deployment).
        drain.moving = max(on_drained(entries), on_drained(previous.adapters))
    changed = entries != previous.adapters or placed != previous.placed_on or draining != previous.draining
    generation = previous.generation + 1 if changed else previous.generation
    _fill_since(entries, generation)
    if entry_memo is not None:
        entry_memo.clear()
        entry_memo.update({a.name: ((a.uid, a.generation, _route_of((merged or {}).get(a.name))),
                                    entries[a.served_name]) for a in adapters
                           if a.spec is not None and not problems.get(a.name) and a.served_name in entries})
    return RoutesTable(pool=pool, generation=generation, adapters=entries, placed_on=placed, draining=draining), changed


# Serialized entries, (id(entry), served name) -> (entry, '"name":{entry}'), kept by the caller per
# pool (PoolState.parts): entries are immutable once planned and the planner reuses unchanged ones,
# so each is serialized once, not on every change of its pool.
Parts = dict[tuple[int, str], tuple[RouteEntry, str]]


def _part(served: str, entry: RouteEntry, parts: Parts) -> str:
    hit = parts.get((id(entry), served))
    if hit is not None and hit[0] is entry:
        return hit[1]
    text = json.dumps(served) + ":" + json.dumps(entry.model_dump(mode="json", exclude_none=True), sort_keys=True,
                                                 separators=(",", ":"))
    parts[(id(entry), served)] = (entry, text)
    return text


def _shard_text(table: RoutesTable, parts: list[str], shard: int | None, shards: int | None,
                generations: list[int] | None = None) -> str:
    """``RoutesTable(..., shard=shard, shards=shards, shard_generations=...).to_json()`` from entries
    already serialized; every shard at the table's generation unless ``generations`` says otherwise."""
    if shards and generations is None:
        generations = [table.generation] * shards
    return shard_text(table.pool, table.generation, parts, shard, shards, generations if shards else None,
                      table.placed_on, table.draining)


def shard_layout(table: RoutesTable, budget: int = SHARD_BUDGET_BYTES,
                 cache: Parts | None = None) -> tuple[int, list[list[tuple[str, str]]]]:
    """``RoutesTable.shard_count`` and the entries of each shard (served name, serialized part),
    serialized once per entry object while ``cache`` (the pool's) holds it."""
    cache = {} if cache is None else cache
    parts = [(served, _part(served, table.adapters[served], cache)) for served in sorted(table.adapters)]
    if len(cache) > 2 * len(parts) + 64:  # entries replaced since: keep only this table's
        current = {(id(e), s) for s, e in table.adapters.items()}
        for key in [k for k in cache if k not in current]:
            del cache[key]
    crcs = [zlib.crc32(served.encode("utf-8")) for served, _ in parts]
    lengths = [len(text.encode("utf-8")) for _, text in parts]
    n = 1
    while n <= MAX_SHARDS:
        fixed = len(_shard_text(table, [], n - 1 if n > 1 else None, n if n > 1 else None).encode("utf-8"))
        sizes, counts = [fixed] * n, [0] * n
        for crc, length in zip(crcs, lengths):
            sizes[crc % n] += length
            counts[crc % n] += 1
        if all(size + max(count - 1, 0) <= budget for size, count in zip(sizes, counts)):
            buckets: list[list[tuple[str, str]]] = [[] for _ in range(n)]
            for (served, text), crc in zip(parts, crcs):
                buckets[crc % n].append((served, text))
            return n, buckets
        n *= 2
    raise ValueError(f"pool {table.pool}: routes do not fit {MAX_SHARDS} ConfigMaps; split the pool")


def plan_shards(table: RoutesTable, existing: dict[str, RoutesTable], budget: int = SHARD_BUDGET_BYTES,
                parsed: dict[str, RoutesTable] | None = None,
                parts: Parts | None = None) -> tuple[dict[str, str], list[str], int]:
    """ConfigMap name -> routes.json to write (shards whose content changed, at the table's
    generation), the names of ConfigMaps to delete (shards no longer used), and the shard count.
    A shard whose adapters did not change is not rewritten: it keeps the generation of its last
    write. Every shard written names the generation each shard of the table has after this write
    (``shardGenerations``), so a reader merges only a consistent set. The texts are what
    ``RoutesTable.to_configmap_data`` gives when every shard is written (a unit test holds them equal)."""
    parsed = {} if parsed is None else parsed  # filled with the tables of the shards to write
    n, buckets = shard_layout(table, budget, parts)
    changed: list[tuple[int, str, dict[str, RouteEntry]]] = []
    generations: list[int] = []
    wanted = []
    for i, bucket in enumerate(buckets):
        index, count = (i, n) if n > 1 else (None, None)
        name = names.routes_configmap_name(table.pool, index)
        wanted.append(name)
        adapters = {served: table.adapters[served] for served, _ in bucket}
        old = existing.get(name)
        if (old is not None and old.pool == table.pool and old.shards == count and old.adapters == adapters
                and old.generation >= 0 and old.placed_on == table.placed_on and old.draining == table.draining):
            generations.append(old.generation)
            continue
        generations.append(table.generation)
        changed.append((i, name, adapters))
    write: dict[str, str] = {}
    for i, name, adapters in changed:
        index, count = (i, n) if n > 1 else (None, None)
        write[name] = _shard_text(table, [text for _, text in buckets[i]], index, count, generations)
        parsed[name] = RoutesTable.model_construct(pool=table.pool, generation=table.generation, adapters=adapters,
                                                   shard=index, shards=count,
                                                   shard_generations=list(generations) if count else None,
                                                   placed_on=table.placed_on, draining=table.draining)
    delete = sorted(set(existing) - set(wanted))
    return write, delete, n


# ----------------------------------------------------------------------------------- status


def _conditions(previous: dict[str, Any]) -> list[Condition]:
    out = []
    for c in previous.get("conditions") or []:
        try:
            out.append(Condition.model_validate(c))
        except ValidationError:
            continue
    return out


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int,
               previous: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    """A condition in wire form (as ``contracts.resources.condition`` makes it, without building a
    model: 10,000 adapters each have three) whose lastTransitionTime only moves with its status."""
    status = "True" if ok else "False"
    prev = previous.get(type_)
    since = prev["lastTransitionTime"] if prev and prev.get("status") == status and prev.get(
        "lastTransitionTime") else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def adapter_status(a: AdapterView, pool: PoolView | None, problems: list[str], table: RoutesTable,
                   pods: list[PodView], previous: dict[str, Any], now: str | None = None,
                   merged: MergedInfo | None = None, placed_info: tuple | None = None,
                   planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """The adapter's status in wire form (``LoRAAdapterStatus`` fields, camelCase, unset left out).
    ``placed_info``: ``PoolPlacement.info`` of the adapter (None: from its spec alone).
    ``previous``: the status written (or read); ``planned``: one planned since and not written yet.
    A condition keeps the transition time of ``previous`` where its status is the same there, else
    of ``planned``: a change planned and undone before it was written is no transition."""
    prev = {c.get("type"): c for c in previous.get("conditions") or [] if isinstance(c, dict)}
    alt = {c.get("type"): c for c in (planned or {}).get("conditions") or [] if isinstance(c, dict)}
    gen = a.generation
    now = now or _now()

    def cond(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
        same = (prev.get(type_) or {}).get("status") == ("True" if ok else "False")
        return _condition(type_, ok, reason, message, gen, prev if same else alt, now)

    valid = cond("Valid", not problems, "Invalid" if problems else "Valid", "; ".join(problems))
    st: dict[str, Any] = {"observedGeneration": gen}
    pool_ok = pool is not None and pool.spec is not None
    if problems:
        msg = f"invalid spec: {'; '.join(problems)}"
        st.update(phase=AdapterPhase.failed.value, message=msg,
                  conditions=[cond("Ready", False, "Invalid", msg), cond("Synced", False, "Invalid", msg), valid])
        return st
    if not pool_ok:
        msg = (f"BaseModelPool {a.pool!r} not found in namespace {a.namespace!r}; the adapter is routed once "
               f"it exists (check spec.pool)")
        if pool is not None and pool.spec_error:
            msg = f"BaseModelPool {a.pool!r} has an invalid spec: {pool.spec_error}"
        st.update(phase=AdapterPhase.pending.value, message=msg,
                  conditions=[cond("Ready", False, "PoolNotFound", msg), cond("Synced", False, "PoolNotFound", msg),
                              valid])
        return st

    assert a.spec is not None and pool is not None and pool.spec is not None
    entry = table.adapters.get(a.served_name)
    since = {v.version: v.since for v in entry.versions} if entry else {}
    holders = entry.holders if entry is not None else None
    ready = [p for p in pods if p.ready]
    if holders is not None:
        # Placed on some replicas: only those count (an adapter on 2 of 6 is Ready 2/2).
        ready = [p for p in ready if p.name in holders]

    def placed(p: PodView) -> int:
        return holders.get(p.name, 0) if holders is not None else 0

    def has(p: PodView, version: str, at: int) -> bool:
        return (p.report is not None and placed(p) != NEW
                and p.report.has_loaded(a.served_name, version, max(at, placed(p))))

    version = a.spec.version
    loaded = [p for p in ready if has(p, version, since.get(version, 0))]
    failures = []
    for p in ready:
        if p.report is None or not p.report.failed:
            continue
        for v in [version] + ([a.spec.canary.version] if a.spec.canary else []):
            reason = p.report.failure(a.served_name, v)
            if reason:
                failures.append(f"{p.name}: {names.versioned_name(a.served_name, v)}: {reason}")
    replicas = pool.spec.replicas
    wanted = placement.replicas_wanted(a.spec.replicas, pool.spec.placement.replicas_per_adapter, replicas)
    short = ""
    blocked: tuple[str, ...] = ()
    if wanted is not None and replicas > 0:
        extra_short = 0
        if placed_info is not None:
            total, _, blocked, extra_short, rate = placed_info
            if rate is not None:
                st["requestRate"] = rate
            if total > wanted:
                short = f"; request rate {rate:g}/s: {total} replicas wanted (spec.placement.requestsPerReplica)"
                if extra_short:
                    short += (f", {total - extra_short} have room within {budget_words(blocked) if blocked else 'the budgets'}")
                # The popularity holders that have room count; those that do not are in the message.
                wanted = total - extra_short
        replicas = wanted
        st["placed"] = len(holders or {})
        st["placement"] = sorted(holders or {})
        if entry is not None and len(holders or {}) < wanted:
            running = len(table.placed_on or [])
            why = (f"pool {a.pool!r} has {running} running replicas" if running < wanted else
                   f"no other replica has room for it within {budget_words(blocked)} of pool {a.pool!r}")
            short += f"; placed on {len(holders or {})} of the {wanted} replicas wanted: {why}"
    else:
        st["placed"] = replicas
    st["replicas"] = replicas
    st["readyReplicas"] = len(loaded)
    st["ready"] = f"{len(loaded)}/{replicas}"
    if loaded:
        st["servedVersion"], st["digest"] = version, a.spec.source.sha256
    elif entry is not None:
        for v in entry.versions:
            if v.draining and any(has(p, v.version, v.since) for p in ready):
                st["servedVersion"], st["digest"] = v.version, v.sha256
                break
    synced = cond("Synced", True, "Routed", f"in the routes of pool {a.pool!r}")
    # Failed only when nothing answers for the adapter: a bad new version while the old one keeps
    # serving (draining) is Degraded, which is what the user needs to see.
    if failures and len(failures) >= len(ready) and not loaded and "servedVersion" not in st:
        phase, reason, msg = AdapterPhase.failed, "LoadFailed", "; ".join(failures[:5])
    elif failures:
        phase, reason, msg = AdapterPhase.degraded, "LoadFailed", "; ".join(failures[:5])
    elif replicas > 0 and len(loaded) >= replicas:
        phase, reason, msg = AdapterPhase.ready, "Loaded", f"version {version} loaded on {len(loaded)}/{replicas} replicas"
    elif wanted is not None and entry is not None and not holders:
        phase, reason, msg = (AdapterPhase.pending, "Unplaced",
                              f"no replica of pool {a.pool!r} has room for it within {budget_words(blocked)}"
                              if pods else f"pool {a.pool!r} has no replicas to place it on")
    elif not ready:
        phase, reason, msg = AdapterPhase.pending, "NoReadyReplicas", (
            f"pool {a.pool!r} has no ready replicas" if holders is None else
            f"none of the replicas it is placed on ({', '.join(sorted(holders))}) is ready")
    else:
        phase, reason, msg = (AdapterPhase.syncing, "Syncing",
                              f"version {version} loaded on {len(loaded)}/{replicas} replicas")
    msg += short
    st["pools"] = [{"pool": a.pool, "role": "shared", "readyReplicas": len(loaded), "replicas": replicas}]
    if merged is not None:
        st["pools"].append({"pool": merged.pool, "role": "merged", "version": merged.version,
                            "readyReplicas": merged.ready, "replicas": merged.replicas})
        msg += (f"; merged into pool {merged.pool!r} (version {merged.version}, {merged.ready}/{merged.replicas} "
                f"ready), which takes its requests while it has Ready replicas")
        if merged.other_ready:
            msg += (f"; {merged.other_ready} Ready pods of pool {merged.pool!r} still merge another version "
                    f"(rolling to {merged.version})")
        if merged.refused:
            st["pools"][-1]["message"] = merged.refused
            msg += f"; pool {merged.pool!r}: {merged.refused}"
    st["phase"] = phase.value
    st["message"] = msg
    st["conditions"] = [cond("Ready", phase == AdapterPhase.ready, reason, msg), synced, valid]
    return st


def model_readiness(pods: list[PodView], merged: MergedRef | None = None) -> tuple[bool | None, str, str]:
    """The pool's ModelReady condition from its pods' sync reports (what each runtime says of its base
    model): False ``ModelRefused`` / ``ModelLoadFailed`` with the runtime's own message when a pod's
    runtime cannot serve it, True ``ModelLoaded`` once one has it (a Ready pod has), else Unknown.
    A merged pool (``merged``) whose adapter a pod's sidecar cannot ready (``merged_refusal``) is
    False ``MergedAdapterRefused`` unless another pod has loaded the model; a pod whose sidecar cannot
    fetch or verify the base model (its report's ``modelFailure``) makes it False ``ModelFetchFailed``."""
    refused = merged_refusal(merged, pods) if merged is not None else None
    if refused is not None and not any(p.ready for p in pods):
        return False, "MergedAdapterRefused", refused
    refusals: dict[tuple[str, str], list[str]] = {}
    loaded = 0
    for p in pods:
        r = p.report
        if r is not None and r.runtime_model in ("refused", "failed"):
            refusals.setdefault((r.runtime_model, r.model_error or "no reason given"), []).append(p.name)
        elif p.ready or (r is not None and r.runtime_model == "loaded"):
            loaded += 1
    if refusals:
        reason = "ModelRefused" if any(state == "refused" for state, _ in refusals) else "ModelLoadFailed"
        parts = []
        for (state, why), who in sorted(refusals.items()):
            verb = "refused" if state == "refused" else "failed to load"
            named = pods_named(who)
            parts.append(f"the runtime {verb} the base model on {len(who)}/{len(pods)} pods ({named}): {why}")
        return False, reason, "; ".join(parts)
    fetch: dict[str, list[str]] = {}
    for p in pods:  # the sidecar could not ready the base model (spec.model.uri / sha256): retried
        if p.report is not None and p.report.model_failure and not p.ready:
            fetch.setdefault(p.report.model_failure, []).append(p.name)
    if fetch:
        parts = []
        for why, who in sorted(fetch.items()):
            named = pods_named(who)
            parts.append(f"the sidecar cannot ready the base model on {len(who)}/{len(pods)} pods ({named}), "
                         f"retrying: {why}")
        return False, "ModelFetchFailed", "; ".join(parts)
    if loaded:
        return True, "ModelLoaded", f"the base model is loaded on {loaded}/{len(pods)} pods"
    return None, "ModelLoading", "no pod's runtime has loaded the base model yet"


def placement_use(spec: BaseModelPoolSpec, adapters: list[AdapterView], table: RoutesTable,
                  pods: list[PodView] | None = None) -> list[ReplicaPlacement]:
    """Per pod placed over: the adapters placed on it (leaving ones included: they are still there)
    and their bytes, against the disk and host-memory budgets; and its cache volume's bytes as its
    sidecar last reported them."""
    known = known_sizes(table, [])
    size = {a.served_name: adapter_bytes(a.spec, known, spec.cache.max_adapter_bytes_int)
            for a in adapters if a.spec is not None}
    use = {pod: [0, 0] for pod in table.placed_on or []}
    for served, e in table.adapters.items():
        if e.holders is None:
            continue
        for pod in set(e.holders) | set(e.leaving or {}):
            u = use.setdefault(pod, [0, 0])
            u[0] += 1
            u[1] += size.get(served, spec.cache.max_adapter_bytes_int)
    budget, memory = spec.placement_budget(), spec.placement_memory_budget()
    cache = {p.name: p.report.cache_bytes for p in pods or [] if p.report is not None}
    return [ReplicaPlacement(pod=pod, adapters=n, bytes=b, budget_bytes=budget, memory_budget_bytes=memory,
                             cache_bytes=cache.get(pod)) for pod, (n, b) in sorted(use.items())]


def placement_condition(decided: PoolPlacement) -> tuple[bool, str, str]:
    """The pool's Placed condition: every placed adapter has the holders it wants, or which ones
    lack them for want of room, and within which budget (never dropped or over-committed silently)."""
    short = sorted(decided.short)
    extra = sorted(n for n in decided.extra_short if n not in decided.short)
    if decided.wanted and not decided.live:
        return False, "NoReplicas", f"no running pod to place {len(decided.wanted)} adapters on"
    if not short and not extra:
        n = len(decided.wanted)
        return True, "Placed", f"{n} adapters placed on the replicas they want" if n else "no adapter is placed"
    parts = []
    budgets = sorted({b for n in short + extra for b in decided.blocked.get(n, ())})
    reason = ("DiskAndMemoryBudget" if len(budgets) == 2 else
              "MemoryBudget" if budgets == [placement.MEMORY] else "DiskBudget")

    def names_(xs: list[str]) -> str:
        return ", ".join(xs[:5]) + (f", ... ({len(xs)} in all)" if len(xs) > 5 else "")

    if short:
        lacking = sum(decided.short.values())
        unplaced = [n for n in short if not decided.targets.get(n)]
        parts.append(f"{len(short)} adapters lack {lacking} of the replicas their spec asks for "
                     f"({len(unplaced)} placed nowhere): {names_(short)}")
    if extra:
        parts.append(f"{len(extra)} adapters lack replicas their request rate asks for: {names_(extra)}")
    return False, reason, "; ".join(parts) + f": no replica has room within {budget_words(budgets)}"


def http_route_readiness(spec: BaseModelPoolSpec, parents: list[dict[str, Any]] | None,
                         missing: bool = False) -> tuple[bool | None, str, str]:
    """The pool's HTTPRouteAccepted condition from its HTTPRoute's ``status.parents`` (what each Gateway's
    controller says of the route): True once every Gateway in ``spec.httpRoute.parentRefs`` has accepted
    it with its references resolved; False naming each Gateway that refused it, with its controller's
    reason and message, or when the API server has no Gateway API (``missing``); Unknown while a Gateway
    has not said (no controller for it yet)."""
    route = spec.http_route
    assert route is not None
    if missing:
        return False, "GatewayAPIMissing", (f"the API server has no {names.HTTPROUTE_KIND} "
                                            f"({names.GATEWAY_API_GROUP}/{names.GATEWAY_API_VERSION})")
    said: dict[tuple[str, str | None, str | None], dict[str, dict[str, Any]]] = {}
    for ps in parents or []:
        ref = ps.get("parentRef") or {}
        if (ref.get("kind") or "Gateway") != "Gateway" or not ref.get("name"):
            continue
        conds = {c.get("type"): c for c in ps.get("conditions") or [] if isinstance(c, dict)}
        said[ref["name"], ref.get("namespace"), ref.get("sectionName")] = conds
    refused, pending, accepted = [], [], 0
    for want in route.parent_refs:
        label = want.name if want.namespace is None else f"{want.namespace}/{want.name}"
        conds = None
        for (name, ns, section), c in said.items():
            if name == want.name and ns in (None, want.namespace) and section in (None, want.section_name):
                conds = c
                break
        if conds is None:
            pending.append(label)
            continue
        bad = [c for t, c in conds.items() if t in ("Accepted", "ResolvedRefs") and c.get("status") == "False"]
        if bad:
            refused.append(f"Gateway {label}: " + "; ".join(
                f"{c.get('type')}=False {c.get('reason') or ''}: {c.get('message') or 'no message'}".replace(" :", ":")
                for c in bad))
        elif (conds.get("Accepted") or {}).get("status") == "True":
            accepted += 1
        else:
            pending.append(label)
    if refused:
        return False, "NotAccepted", "; ".join(refused)
    if pending:
        return None, "Pending", (f"no word yet from the controller of Gateway {', '.join(pending)} (is a Gateway "
                                 f"controller running, and does the Gateway exist?)")
    return True, "Accepted", f"accepted by {accepted} Gateway{'s' if accepted != 1 else ''}"


def pool_status(pool: PoolView, adapters: list[AdapterView], statuses: dict[str, dict[str, Any]],
                table: RoutesTable, pods: list[PodView], gateway_ready: int = 0,
                workload_problems: list[tuple[str, str]] | None = None,
                merged: tuple[MergedRef | None, str | None] | None = None,
                decided: PoolPlacement | None = None,
                http_route: tuple[bool | None, str, str] | None = None,
                drain: "Drain | None" = None) -> dict[str, Any]:
    """``workload_problems``: (reason, message) of each owned Deployment that cannot make or roll out
    its pods. ``decided``: what placement decided (its shortfalls make the Placed condition).
    ``http_route``: the HTTPRouteAccepted condition (``http_route_readiness``), when the pool has one.
    ``drain``: a scale down in progress (the Scaling condition)."""
    prev = _conditions(pool.status)
    if pool.spec is None:
        st = BaseModelPoolStatus(phase=PoolPhase.failed, observed_generation=pool.generation,
                                 message=f"invalid spec: {pool.spec_error}")
        return st.wire()
    replicas = pool.spec.replicas
    ready = sum(1 for p in pods if p.ready)
    phases = [statuses.get(a.name, {}).get("phase") for a in adapters]
    bad = sum(1 for p in phases if p in (AdapterPhase.failed.value, AdapterPhase.degraded.value))
    if ready >= replicas:
        phase = PoolPhase.degraded if bad else PoolPhase.ready
    elif ready == 0:
        phase = PoolPhase.pending
    else:
        phase = PoolPhase.progressing
    failing = sorted(workload_problems or [], key=lambda p: p[1])
    if merged is not None and merged[1]:
        # Nothing to merge: the operator holds the Deployment back rather than serve the plain base.
        failing.insert(0, ("MergedAdapterInvalid", merged[1]))
        phase = PoolPhase.failed if ready == 0 else PoolPhase.degraded
    problems = [m for _, m in failing]
    if problems and phase == PoolPhase.ready:
        phase = PoolPhase.degraded
    model_ok, model_reason, model_msg = model_readiness(pods, merged[0] if merged is not None else None)
    if model_ok is False:
        # The runtime refused the base model (or failed to load it): no pod of this spec turns Ready.
        phase = PoolPhase.failed if ready == 0 else PoolPhase.degraded
    msg = f"{ready}/{replicas} replicas ready"
    if model_ok is False:
        msg += f"; {model_msg}"
    elif merged is not None and merged[0] is not None and (refused := merged_refusal(merged[0], pods)):
        msg += f"; {refused}"  # a new version some pods refuse while others serve the old one
    if bad:
        msg += f"; {bad} adapters failed or degraded"
    if problems:
        msg += "; " + "; ".join(problems)
    st = BaseModelPoolStatus(
        phase=phase, observed_generation=pool.generation, replicas=replicas, ready_replicas=ready,
        ready=f"{ready}/{replicas}", adapters=len(adapters),
        adapters_ready=sum(1 for p in phases if p == AdapterPhase.ready.value),
        routes_generation=table.generation, message=msg,
        merged_adapter=(names.versioned_name(merged[0].served_name, merged[0].version)
                        if merged is not None and merged[0] is not None else None),
        conditions=[condition("Ready", phase == PoolPhase.ready, phase.value, msg, pool.generation, prev),
                    # What the owned Deployments say when pods cannot be made (a quota, an admission
                    # policy): the ReplicaSet's own message, which `kubectl get lfpool` never shows.
                    condition("ReplicaFailure", bool(problems), failing[0][0] if failing else "NoFailure",
                              "; ".join(problems), pool.generation, prev),
                    condition("ModelReady", model_ok, model_reason, model_msg, pool.generation, prev)],
    )
    if table.placed_on is not None:
        st.placement = placement_use(pool.spec, adapters, table, pods)
        if decided is not None:
            ok, reason, text = placement_condition(decided)
            assert st.conditions is not None
            st.conditions.append(condition("Placed", ok, reason, text, pool.generation, prev))
            if not ok:
                st.message = f"{st.message}; {text}"
        # A scale down moves the drained pods' adapters before the Deployment's replicas drop.
        scaling = drain.words() if drain is not None else f"{replicas} replicas, none draining"
        assert st.conditions is not None
        st.conditions.append(condition("Scaling", drain is not None, "Draining" if drain is not None else "Steady",
                                       scaling, pool.generation, prev))
        if drain is not None:
            st.message = f"{st.message}; {scaling}"
    if http_route is not None and pool.spec.http_route is not None:
        ok, reason, text = http_route
        assert st.conditions is not None
        st.conditions.append(condition("HTTPRouteAccepted", ok, reason, text, pool.generation, prev))
        if ok is False:
            st.message = f"{st.message}; HTTPRoute {names.http_route_name(pool.name)} not accepted: {text}"
    gw = pool.spec.gateway
    if gw is not None and gw.enabled:
        # The Ingress answers while one gateway pod is Ready; the pool's own readiness is separate.
        gw_msg = f"{gateway_ready}/{gw.replicas} gateway replicas ready"
        st.gateway_ready_replicas = gateway_ready
        assert st.conditions is not None
        st.conditions.append(condition("GatewayReady", gateway_ready > 0,
                                       "GatewayReady" if gateway_ready else "NoGatewayReady", gw_msg,
                                       pool.generation, prev))
    return st.wire()


def _load_state(report: SyncReport | None) -> str | None:
    if report is None:
        return None
    if report.rates is None and report.sizes is None and report.cache_bytes is None:
        return report.to_json()
    return report.model_copy(update={"rates": None, "sizes": None, "cache_bytes": None}).to_json()


def plan_pool(pool_name: str, pool: PoolView | None, adapters: list[AdapterView], pods: list[PodView],
              previous: RoutesTable, previous_status: dict[str, dict[str, Any]],
              memo: dict[str, tuple[tuple, dict[str, Any]]] | None = None, gateway_ready: int = 0,
              workload_problems: list[tuple[str, str]] | None = None, tenants: Tenants | None = None,
              merged: dict[str, MergedInfo] | None = None,
              merged_self: tuple[MergedRef | None, str | None] | None = None,
              planned_status: dict[str, dict[str, Any]] | None = None,
              http_route: tuple[bool | None, str, str] | None = None,
              deployed_replicas: int | None = None) -> PoolPlan:
    """Everything one reconcile of a pool decides. ``previous_status`` maps adapter name -> the
    status last written (or read), so conditions keep their transition times; ``planned_status``
    the statuses planned and not written yet (``adapter_status``'s ``planned``). ``memo`` (kept by the
    caller between reconciles of this pool) skips recomputing the status of adapters whose inputs
    did not move: one change in a pool of 1,000 adapters recomputes one status. ``tenants``: the
    namespace's LoRATenants and their sources (``Tenants``). ``merged``: adapter name -> the merged
    pool that takes its requests while Ready (this pool is the adapter's shared pool); ``merged_self``:
    when this pool is a merged pool, what it merges, or why it cannot (``resolve_merged``). ``http_route``:
    its HTTPRoute's acceptance (``http_route_readiness``). ``deployed_replicas``: the pool's
    Deployment's spec.replicas as last seen (None: not seen)."""
    check = None
    if tenants is not None:
        held = memo.get("\0sources") if memo is not None else None
        check = held if held is not None and held.matches(tenants) else SourceCheck(tenants)
        if memo is not None:
            memo["\0sources"] = check
    problems = validity(adapters, pool_name, check)
    if pool is not None and pool.spec is not None and pool.spec.model.merged_adapter is not None:
        merged_name = pool.spec.model.merged_adapter.name
        for a in adapters:
            # An unmerged LoRA over merged weights computes merged + it, not what it was trained over.
            problems.setdefault(a.name, []).append(
                f"spec.pool: pool {pool_name!r} merges LoRAAdapter {merged_name!r} into its base "
                f"(spec.model.mergedAdapter) and serves no other adapter; name a shared pool")
    pool_ok = pool is not None and pool.spec is not None
    outcome: dict[str, Any] = {}
    if pool_ok:
        assert pool is not None
        table, changed = plan_routes(pool_name, adapters, problems, previous, pods,
                                     memo.setdefault("\0entries", {}) if memo is not None else None, check,
                                     merged, pool.spec, outcome, deployed_replicas)
    else:
        table, changed = RoutesTable(pool=pool_name, generation=previous.generation), False
    decided: PoolPlacement = outcome.get("placement") or PoolPlacement()
    drain: Drain | None = outcome.get("drain") if table.draining else None
    memo = {} if memo is None else memo
    statuses_memo = memo.setdefault("\0statuses", {})
    common = (pool.uid, pool.generation, pool.spec is None) if pool is not None else None
    # An adapter's status reads the reports' load state, not their rates, sizes or cache bytes (which
    # move every rate window; what placement made of them is in each adapter's own inputs below).
    common = (common, tuple((p.name, p.ready, _load_state(p.report)) for p in pods))
    statuses: dict[str, dict[str, Any]] = {}
    now = _now()
    for a in adapters:
        found = problems.get(a.name, [])
        prev = previous_status.get(a.name, a.status)
        planned = planned_status.get(a.name) if planned_status else None
        m = (merged or {}).get(a.name)
        info = decided.info(a.served_name)
        inputs = (common, a.uid, a.generation, tuple(found), table.adapters.get(a.served_name), m, info)
        hit = statuses_memo.get(a.name)
        if hit is not None and hit[0] == inputs and (prev is hit[1] or prev == hit[1]
                                                     or (planned is not None and (planned is hit[1]
                                                                                  or planned == hit[1]))):
            statuses[a.name] = hit[1]
            continue
        statuses[a.name] = adapter_status(a, pool, found, table, pods, prev, now, m, info, planned)
        statuses_memo[a.name] = (inputs, statuses[a.name])
    for gone in set(statuses_memo) - set(statuses):
        del statuses_memo[gone]
    pstatus = (pool_status(pool, adapters, statuses, table, pods, gateway_ready, workload_problems, merged_self,
                           decided, http_route, drain)
               if pool is not None else None)
    replicas = None
    if pool_ok:
        assert pool is not None and pool.spec is not None
        replicas = drain.deployed if drain is not None and not drain.done else pool.spec.replicas
    return PoolPlan(table=table, changed=changed, adapter_status=statuses, pool_status=pstatus,
                    deployment_replicas=replicas, drain=drain)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON merge patch turning ``old`` into ``new`` (None when equal): keys gone become null."""
    if old == new:
        return None
    patch: dict[str, Any] = dict(new)
    for k in old:
        if k not in new:
            patch[k] = None
    return patch

"""Per-pool reconciliation: coalesces the events of a pool (its adapters, pods and itself) for a few
tens of milliseconds, plans with ``routing`` and writes only what changed through ``kube``.

One reconcile per pool at a time; 10,000 adapter creates become a handful of ConfigMap writes.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import kopf
from lightkube.core.exceptions import ApiError

from lorafleet.contracts import names
from lorafleet.contracts.resources import AdapterPhase
from lorafleet.contracts.routes import RoutesTable

from . import manifests, routing
from .kube import DRIFT_CHECKED, HTTPStatusError, Kube, TransportError, not_found
from .routing import AdapterView, PodView, PoolView, WorkloadView

log = logging.getLogger("lorafleet.operator")

PoolKey = tuple[str, str]  # (namespace, pool)
ObjKey = tuple[str, str]  # (namespace, name)

DEBOUNCE_S = 0.05
MAX_STATUS_WRITERS = 32
RETRY_S = 2.0
RESYNC_S = 300.0
ROUTE_RETRY_S = 30.0  # a pool's HTTPRoute on an API server without the Gateway API: tried again this often


@dataclass
class PoolState:
    """Everything the operator holds about one pool, by (namespace, name): what the watches told it
    (the pool, its adapters, pods, gateway pods and Deployments) and what it last wrote or checked.
    A pool's state exists while any of that does; a pool that is gone starts afresh when it is back."""

    view: PoolView | None = None  # the BaseModelPool (None: not there)
    adapters: dict[str, AdapterView] = field(default_factory=dict)  # by name
    pods: dict[str, PodView] = field(default_factory=dict)
    gateway_pods: dict[str, bool] = field(default_factory=dict)  # name -> Ready
    workloads: dict[str, WorkloadView] = field(default_factory=dict)  # owned Deployments by name
    # Routes: what the ConfigMaps hold (None: unknown, list them), the whole table last written, its
    # shard count once checked, and the routes.json last written per ConfigMap.
    shards: dict[str, RoutesTable] | None = None
    table: RoutesTable | None = None
    shard_count: int | None = None
    texts: dict[str, str] = field(default_factory=dict)
    applied: str | None = None  # children manifests last applied (canonical JSON)
    applying: bool = False  # an apply of the children is in flight
    # The children last applied whose drift the events check (Services, ServiceAccounts, Ingresses:
    # no generation to compare), by (kind, name); and whether one of them moved while applying.
    children: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    moved_while_applying: bool = False
    route_missing: bool = False  # its HTTPRoute was refused: the API server has no Gateway API (tried again)
    route_parents: list[dict[str, Any]] | None = None  # its HTTPRoute's status.parents (the Gateways' word)
    status_written: tuple[str, dict[str, Any]] | None = None  # (pool uid, status) last written
    memo: dict = field(default_factory=dict)  # routing.plan_pool's memo: entries and statuses of the last plan
    parts: routing.Parts = field(default_factory=dict)  # routing.plan_shards' serialized entries
    dirty: bool = False  # to reconcile
    task: asyncio.Task | None = None  # the reconcile loop running for it

    def reapply(self) -> None:
        """Someone else changed or deleted a child: the next reconcile applies them all, and one in
        the middle of applying them does not take what it applied for what is there."""
        self.applied = None
        self.moved_while_applying = True

    def forget_routes(self) -> None:
        """What the ConfigMaps hold is unknown now: the next reconcile lists them."""
        self.shards = self.table = self.shard_count = None

    def unused(self) -> bool:
        return (self.view is None and not self.adapters and not self.pods and not self.gateway_pods
                and not self.workloads and self.task is None and not self.dirty)


class Fleet:
    def __init__(self, debounce: float = DEBOUNCE_S):
        self.debounce = debounce
        self.kube: Kube | None = None
        self.state: dict[PoolKey, PoolState] = {}
        self.specs = routing.SpecCache()  # adapters' parsed specs: each status write comes back as an event
        self.adapter_pool: dict[ObjKey, str] = {}  # adapter -> the pool it is filed under
        self.pending: set[PoolKey] = set()  # primed before the event loop could run reconciles
        self.priming = False
        self.namespaces: list[str] = []  # watched namespaces or glob patterns (all when empty)
        self.sidecar_cluster_role: str | None = None  # sidecars' pod rights come from this ClusterRole, else their Role
        self.runtime_images = manifests.RuntimeImages()  # for pools whose spec names no runtime image
        self.written: dict[ObjKey, dict[str, Any]] = {}  # adapter status last written
        self.desired: dict[ObjKey, dict[str, Any]] = {}  # adapter status last planned
        self.ready_digest: dict[ObjKey, str | None] = {}  # the digest each adapter was last Ready at
        self.status_queue: OrderedDict[ObjKey, AdapterView] = OrderedDict()
        self.status_inflight: set[ObjKey] = set()
        self.status_ready = asyncio.Event()
        self.status_workers: list[asyncio.Task] = []
        self.seen: dict[tuple[str, ObjKey], tuple[Any, ...]] = {}  # kind, object -> what a reconcile depends on
        self.reconciles = 0
        # The generation each owned Deployment had after our last apply: a higher one is someone
        # else's edit (`kubectl scale`, `kubectl edit`), applied over again.
        self.applied_generations: dict[ObjKey, int] = {}
        self.own_deletes: set[ObjKey] = set()  # Deployments we delete ourselves (a gateway turned off)
        # The store's event clock: which objects an event mentioned since a full listing began.
        self.resync_interval = RESYNC_S
        self.resync_task: asyncio.Task | None = None
        self.event_seq = 0
        self.last_event: dict[tuple[str, str, str], int] = {}
        self.swept = 0
        # The context of a kopf event handler: tasks that may post Kubernetes Events (kopf.info/warn
        # read kopf's event queue from it) start in it, also when the full listing starts them.
        self.kopf_context: contextvars.Context | None = None
        # LoRATenants' spec.sources by namespace, then tenant: an adapter is routed only from its
        # tenant's storage prefixes. A tenant that does not parse allows nothing.
        self.tenants: dict[str, routing.Tenants] = {}
        # LoRATenants' API key digests by namespace, then tenant, and each tenant's status as last read or
        # written: the operator writes status.keys (the digests the gateway accepts, by its rule).
        self.tenant_keys: dict[str, dict[str, routing.TenantKeys]] = {}
        self.tenant_status: dict[ObjKey, dict[str, Any]] = {}
        self.tenants_dirty: set[str] = set()
        self.tenant_task: asyncio.Task | None = None

    def in_handler(self) -> None:
        """Called by every kopf event handler: the first one's context is kept for ``_spawn``."""
        if self.kopf_context is None:
            self.kopf_context = contextvars.copy_context()

    def _spawn(self, coro: Any) -> asyncio.Task:
        context = self.kopf_context.copy() if self.kopf_context is not None else None
        return asyncio.get_running_loop().create_task(coro, context=context)

    def pool(self, key: PoolKey) -> PoolState:
        found = self.state.get(key)
        if found is None:
            found = self.state[key] = PoolState()
        return found

    def _release(self, key: PoolKey) -> None:
        found = self.state.get(key)
        if found is not None and found.unused():
            del self.state[key]

    # ------------------------------------------------------------------------------ events
    # The store of adapters and pods by pool and of pools by name is ours, fed by kopf's event
    # handlers: kopf's own indexes wake every waiting object on each index update while they are
    # pre-populated, quadratic in the number of objects (about 2 minutes for 10,000 adapters).

    def prime(self, adapters: Iterable[dict[str, Any]], pools: Iterable[dict[str, Any]],
              pods: Iterable[dict[str, Any]]) -> None:
        """Fill the store from one listing before kopf starts, so the first reconcile of a pool sees
        all of it: a partial table would rewrite routes that did not change."""
        self.priming = True
        for body in pools:
            self.pool_event(None, routing.pool_view(body))
        for body in adapters:
            self.adapter_event(None, routing.adapter_view(body, self.specs))
        for body in pods:
            self.pod_event(None, body)
        for key, st in self.state.items():
            if st.dirty:
                self.pending.add(key)
                st.dirty = False
        self.priming = False

    def _flush_pending(self) -> None:
        if self.pending:
            pending, self.pending = self.pending, set()
            for key in pending:
                self.touch(key)

    def adapter_unchanged(self, kind_event: str | None, namespace: str, name: str, uid: str, generation: int,
                          pool: str) -> bool:
        """True for an event that moves nothing a reconcile reads (its status: our own write, or the
        listing kopf starts with, which the store already holds): the handler skips even building
        the view. Statuses are compared with what was written, else with the status primed."""
        return kind_event != "DELETED" and self.seen.get(("a", (namespace, name))) == (generation, pool, uid)

    def _mark(self, kind: str, namespace: str, name: str, deleted: bool = False) -> None:
        self.event_seq += 1
        if deleted:
            self.last_event.pop((kind, namespace, name), None)
        else:
            self.last_event[(kind, namespace, name)] = self.event_seq

    def adapter_event(self, kind_event: str | None, view: AdapterView) -> None:
        key = (view.namespace, view.name)
        self._flush_pending()
        self._mark("a", *key, deleted=kind_event == "DELETED")
        old_pool = self.adapter_pool.get(key)
        if old_pool is not None and (kind_event == "DELETED" or old_pool != view.pool):
            self.pool((view.namespace, old_pool)).adapters.pop(view.name, None)
            self.adapter_pool.pop(key, None)
            self.touch((view.namespace, old_pool))
        if kind_event == "DELETED":
            self.seen.pop(("a", key), None)
            self.written.pop(key, None)
            self.desired.pop(key, None)
            self.ready_digest.pop(key, None)
            self.status_queue.pop(key, None)
            self._touch_merging(view.namespace, view.name)
            return
        self.pool((view.namespace, view.pool)).adapters[view.name] = view
        self.adapter_pool[key] = view.pool
        now = (view.generation, view.pool, view.uid)
        if self.seen.get(("a", key)) == now:
            return  # only its status moved (our own write): nothing to reconcile
        self.seen[("a", key)] = now
        self.touch((view.namespace, view.pool))
        self._touch_merging(view.namespace, view.name)

    # --- merged pools: a pool whose pods merge one adapter (spec.model.mergedAdapter) depends on that
    # adapter (its version is the pod template's), and the adapter's shared pool on the merged pool
    # (the routes name it, the adapter's status counts its Ready pods).
    def find_adapter(self, namespace: str, name: str) -> AdapterView | None:
        pool = self.adapter_pool.get((namespace, name))
        st = self.state.get((namespace, pool)) if pool is not None else None
        return st.adapters.get(name) if st is not None else None

    def merged_pools(self, namespace: str) -> list[tuple[PoolView, PoolState]]:
        return [(st.view, st) for (ns, _), st in list(self.state.items())
                if ns == namespace and st.view is not None and st.view.spec is not None
                and st.view.spec.model.merged_adapter is not None]

    def _touch_merging(self, namespace: str, adapter: str) -> None:
        for view, _ in self.merged_pools(namespace):
            assert view.spec is not None and view.spec.model.merged_adapter is not None
            if view.spec.model.merged_adapter.name == adapter:
                self.touch((namespace, view.name))

    def _touch_shared_of(self, view: PoolView | None) -> None:
        """``view`` is a merged pool: its adapter's shared pool re-plans (routes, the adapter's status)."""
        if view is None or view.spec is None or view.spec.model.merged_adapter is None:
            return
        shared = self.adapter_pool.get((view.namespace, view.spec.model.merged_adapter.name))
        if shared is not None:
            self.touch((view.namespace, shared))

    def pool_event(self, kind_event: str | None, view: PoolView) -> None:
        key = (view.namespace, view.name)
        self._flush_pending()
        self._mark("p", *key, deleted=kind_event == "DELETED")
        if kind_event == "DELETED":
            self._touch_shared_of(self.pool(key).view)
            self.pool(key).view = None
            self.seen.pop(("p", key), None)
            self.touch(key)
            return
        before = self.pool(key).view
        self.pool(key).view = view
        now = (view.generation, view.uid)
        if self.seen.get(("p", key)) == now:
            return
        self.seen[("p", key)] = now
        self.touch(key)
        self._touch_shared_of(before)
        self._touch_shared_of(view)

    def pod_event(self, kind_event: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(names.LABEL_POOL)
        if not pool:
            self._gateway_pod_event(kind_event, body)
            return
        key, name = (meta.get("namespace", ""), pool), meta.get("name", "")
        self._flush_pending()
        self._mark("pod", key[0], name, deleted=kind_event == "DELETED")
        pods = self.pool(key).pods
        if kind_event == "DELETED":
            if pods.pop(name, None) is not None:
                self.touch(key)
                self._touch_shared_of(self.pool(key).view)
            return
        view = routing.pod_view(body)
        if pods.get(name) == view:
            return  # neither readiness nor the sync report moved
        before = pods.get(name)
        pods[name] = view
        self.touch(key)
        if (before is None or before.ready != view.ready
                or _merged_failure(before) != _merged_failure(view)):
            # The adapter's status counts the merged pool's Ready pods and says why none loads it.
            self._touch_shared_of(self.pool(key).view)

    def _gateway_pod_event(self, kind_event: str | None, body: dict[str, Any]) -> None:
        """A pool's gateway pod: only its readiness matters (the pool's status counts ready gateways)."""
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(names.LABEL_GATEWAY_FOR)
        if not pool:
            return
        key, name = (meta.get("namespace", ""), pool), meta.get("name", "")
        self._flush_pending()
        self._mark("pod", key[0], name, deleted=kind_event == "DELETED")
        pods = self.pool(key).gateway_pods
        if kind_event == "DELETED":
            if pods.pop(name, None) is not None:
                self.touch(key)
                self._touch_shared_of(self.pool(key).view)
            return
        ready = routing.pod_view(body).ready
        if pods.get(name) == ready:
            return
        pods[name] = ready
        self.touch(key)

    def tenant_event(self, kind_event: str | None, body: dict[str, Any]) -> None:
        """A LoRATenant changed: the pools of its namespace whose adapters name it plan again (their
        adapters may have become valid, or invalid, and unrouted)."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        self._mark("t", namespace, name, deleted=kind_event == "DELETED")
        self._tenant_keys_event(kind_event, namespace, name, body)
        known = self.tenants.setdefault(namespace, {})
        if kind_event == "DELETED":
            now = None
        else:
            now = routing.tenant_sources(body)
        if known.get(name) == now and (now is not None or name not in known):
            return
        if now is None:
            known.pop(name, None)
        else:
            known[name] = now
        if not known:
            self.tenants.pop(namespace, None)
        self._flush_pending()
        for (ns, pool), st in list(self.state.items()):
            mine = [a for a in st.adapters.values() if a.spec is not None and a.spec.tenant == name] \
                if ns == namespace else []
            if mine:
                self.touch((ns, pool))
            for a in mine:  # a merged pool's adapter may have become valid or invalid with its tenant
                self._touch_merging(ns, a.name)

    def _tenant_keys_event(self, kind_event: str | None, namespace: str, name: str, body: dict[str, Any]) -> None:
        keys = self.tenant_keys.setdefault(namespace, {})
        if kind_event == "DELETED":
            keys.pop(name, None)
            self.tenant_status.pop((namespace, name), None)
            if not keys:
                self.tenant_keys.pop(namespace, None)
        else:
            keys[name] = routing.tenant_keys(body)
            self.tenant_status[(namespace, name)] = dict(body.get("status") or {})
        # One tenant's keys can change another's count (a digest two tenants list is refused for both).
        self.tenants_dirty.add(namespace)
        if self.tenant_task is None:
            self.tenant_task = asyncio.get_running_loop().create_task(self._write_tenant_statuses())

    async def _write_tenant_statuses(self) -> None:
        """Write each LoRATenant's status (``keys``, ``message``) where it differs from what is there."""
        try:
            while self.tenants_dirty:
                await asyncio.sleep(self.debounce)
                if self.kube is None:
                    self.kube = Kube()
                dirty, self.tenants_dirty = self.tenants_dirty, set()
                for namespace in sorted(dirty):
                    for name, want in routing.tenant_statuses(self.tenant_keys.get(namespace, {})).items():
                        key = (namespace, name)
                        have = self.tenant_status.get(key)
                        if have is None or all(have.get(k) == v for k, v in want.items()):
                            continue
                        try:
                            if await self.kube.patch_status(names.TENANT_KIND, name, namespace, want):
                                have.update(want)
                        except asyncio.CancelledError:
                            raise
                        except (ApiError, TransportError) as e:
                            log.warning("LoRATenant %s/%s: status write failed: %s; retrying in %.0f s", namespace,
                                        name, e.status.message if isinstance(e, ApiError) else e, RETRY_S)
                            self.tenants_dirty.add(namespace)
                            await asyncio.sleep(RETRY_S)
        finally:
            self.tenant_task = None

    def workload_event(self, kind_event: str | None, body: dict[str, Any]) -> None:
        """An owned Deployment changed: repair an edit that is not ours (its generation passed the
        one our apply left), or one deleted by hand; carry its failures into the pool's status."""
        meta = body.get("metadata") or {}
        owner = _pool_owner(meta)
        if owner is None:
            return
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        key = (namespace, owner.get("name", ""))
        self._flush_pending()
        self._mark("d", namespace, name, deleted=kind_event == "DELETED")
        st = self.pool(key)
        if kind_event == "DELETED":
            st.workloads.pop(name, None)
            self.applied_generations.pop((namespace, name), None)
            if (namespace, name) in self.own_deletes:
                self.own_deletes.discard((namespace, name))
                self._release(key)
                return
            if st.view is not None and st.view.uid == owner.get("uid"):
                log.info("Deployment %s/%s was deleted outside the operator; applying it again", namespace, name)
                st.reapply()
                self.touch(key)
            self._release(key)
            return
        view = routing.workload_view(body)
        old = st.workloads.get(name)
        st.workloads[name] = view
        known = self.applied_generations.get((namespace, name))
        if known is not None and view.generation > known and not st.applying:
            log.info("Deployment %s/%s was changed outside the operator (generation %d, ours %d); applying "
                     "the pool's spec again", namespace, name, view.generation, known)
            st.reapply()
            self.touch(key)
        elif old is None or old.problem != view.problem or old.replicas != view.replicas:
            pool = st.view
            if view.problem and pool is not None and (old is None or old.problem != view.problem):
                kopf.warn(pool.ref(), reason="ReplicaFailure", message=view.problem)
            self.touch(key)  # its replicas: a scale down drains against them

    def owned_event(self, kind: str, kind_event: str | None, body: dict[str, Any]) -> None:
        """An owned Service, ServiceAccount or Ingress changed: one that lost a field the operator
        applied (``kubectl edit``, another controller) or was deleted by someone else is applied again.
        Fields others added are theirs."""
        meta = body.get("metadata") or {}
        owner = _pool_owner(meta)
        if owner is None:
            return
        namespace, name = meta.get("namespace", ""), meta.get("name", "")
        key = (namespace, owner.get("name", ""))
        self._mark(kind, namespace, name, deleted=kind_event == "DELETED")
        st = self.state.get(key)
        if st is None or st.view is None or st.view.uid != owner.get("uid"):
            return
        if kind == names.HTTPROUTE_KIND and name == names.http_route_name(key[1]):
            parents = None if kind_event == "DELETED" else (body.get("status") or {}).get("parents")
            if parents != st.route_parents:  # a Gateway's controller accepted or refused it: the pool says so
                st.route_parents = parents
                self.touch(key)
        applied = st.children.get((kind, name))
        if applied is None:
            return  # not one of the pool's children now (one the operator deletes)
        if kind_event == "DELETED":
            how = "deleted"
        elif not routing.holds(body, applied):
            how = "changed"
        else:
            return  # what was applied (our own writes' events among them)
        if st.applying:
            st.moved_while_applying = True  # perhaps a write of ours not yet made: checked once it is
            return
        log.info("%s %s/%s was %s outside the operator; applying the pool's spec again", kind, namespace, name,
                 how)
        st.reapply()
        self.touch(key)

    # ------------------------------------------------------------------------------ resync

    def start_resync(self) -> None:
        if self.resync_interval > 0 and self.resync_task is None:
            self.resync_task = asyncio.get_running_loop().create_task(self._resync_forever())

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            try:
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("full resync failed; trying again in %.0f s", self.resync_interval)

    async def resync(self) -> int:
        """List everything once and sweep what the store holds but the API server no longer has.

        kopf re-lists after a watch expires (410 Gone) but reports no deletions from the gap, so a
        pod deleted meanwhile would stay in the store for ever (counted Ready, holding rollouts
        back), an owned Deployment or a routes ConfigMap deleted meanwhile would never be made
        again. An object is swept only if no event mentioned it since the listing began: one made
        or deleted meanwhile is the events' to handle. Returns how many were swept."""
        if self.kube is None:
            self.kube = Kube()
        since = self.event_seq
        (adapters, pools, pods), (deployments, configmaps, others) = await asyncio.gather(
            self.kube.list_bodies(self.namespaces), self.kube.list_owned(self.namespaces))

        def ids(kind: str, bodies: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
            return {(kind, (b.get("metadata") or {}).get("namespace", ""), (b.get("metadata") or {}).get("name", ""))
                    for b in bodies}

        alive = (ids("a", adapters) | ids("p", pools) | ids("pod", pods) | ids("d", deployments)
                 | ids("cm", configmaps) | {k for kind, bodies in others.items() for k in ids(kind, bodies)})

        def gone(kind: str, namespace: str, name: str) -> bool:
            k = (kind, namespace, name)
            return k not in alive and self.last_event.get(k, 0) <= since

        swept = 0
        for (namespace, pool), st in list(self.state.items()):
            for view in list(st.adapters.values()):
                if gone("a", namespace, view.name):
                    log.info("LoRAAdapter %s/%s is gone (its deletion was missed): removed", namespace, view.name)
                    self.adapter_event("DELETED", view)
                    swept += 1
            if st.view is not None and gone("p", namespace, pool):
                log.info("BaseModelPool %s/%s is gone (its deletion was missed): removed", namespace, pool)
                self.pool_event("DELETED", st.view)
                swept += 1
            for label, members in ((names.LABEL_POOL, st.pods), (names.LABEL_GATEWAY_FOR, st.gateway_pods)):
                for name in list(members):
                    if gone("pod", namespace, name):
                        log.info("pod %s/%s of pool %s is gone (its deletion was missed): removed", namespace,
                                 name, pool)
                        self.pod_event("DELETED", {"metadata": {"name": name, "namespace": namespace,
                                                                "labels": {label: pool}}})
                        swept += 1
            for name in list(st.workloads):
                if gone("d", namespace, name):
                    log.info("Deployment %s/%s of pool %s is gone (its deletion was missed): removed", namespace,
                             name, pool)
                    owner = {"kind": names.POOL_KIND, "controller": True, "name": pool,
                             "uid": st.view.uid if st.view is not None else ""}
                    self.workload_event("DELETED", {"metadata": {"name": name, "namespace": namespace,
                                                                 "ownerReferences": [owner]}})
                    swept += 1
            lost = sorted(f"{kind} {name}" for kind, name in st.children
                          if st.view is not None and gone(kind, namespace, name))
            if lost:
                log.info("%s of pool %s/%s: gone (their deletion was missed): applying the pool's spec again",
                         ", ".join(lost), namespace, pool)
                st.reapply()
                self.touch((namespace, pool))
                swept += len(lost)
            missing = [name for name in st.shards or {} if gone("cm", namespace, name)]
            if missing:
                log.info("routes ConfigMaps %s of pool %s/%s are gone (their deletion was missed): writing them "
                         "again", ", ".join(sorted(missing)), namespace, pool)
                st.forget_routes()
                self.touch((namespace, pool))
                swept += len(missing)
        # A LoRATenant deleted in the gap would go on allowing its sources.
        alive_tenants = ids("t", await self.kube.list_tenants(self.namespaces))
        for namespace, known in list(self.tenants.items()):
            for name in list(known):
                k = ("t", namespace, name)
                if k not in alive_tenants and self.last_event.get(k, 0) <= since:
                    log.info("LoRATenant %s/%s is gone (its deletion was missed): removed", namespace, name)
                    self.tenant_event("DELETED", {"metadata": {"namespace": namespace, "name": name}})
                    swept += 1
        self.swept += swept
        log.debug("full listing done: %d objects, %d swept", len(alive), swept)
        return swept

    def routes_event(self, kind_event: str | None, body: dict[str, Any]) -> None:
        """A routes ConfigMap changed: our own writes are known and ignored; one deleted or edited
        by someone else is written again."""
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(names.LABEL_ROUTES_FOR)
        key, name = (meta.get("namespace", ""), pool or ""), meta.get("name", "")
        self._mark("cm", key[0], name, deleted=kind_event == "DELETED")
        st = self.state.get(key)
        if not pool or st is None or st.shards is None or self.priming:
            return
        known = st.shards.get(name)
        if kind_event == "DELETED":
            if known is None:
                return
        elif st.texts.get(name) == (body.get("data") or {}).get(names.ROUTES_KEY):
            return  # our own write (a string comparison, not a parse of up to 512 KB)
        else:
            try:
                now = RoutesTable.from_json((body.get("data") or {}).get(names.ROUTES_KEY) or "")
            except ValueError:
                now = None
            if known is None or now == known:
                return
        log.info("routes ConfigMap %s/%s was %s outside the operator; writing it again", key[0], name,
                 "deleted" if kind_event == "DELETED" else "changed")
        st.forget_routes()
        self.touch(key)

    def touch(self, key: PoolKey) -> None:
        """Reconcile this pool soon; events arriving meanwhile join the same reconcile."""
        st = self.pool(key)
        st.dirty = True
        if self.priming:
            return
        if st.task is None:
            # In a handler's context (kopf.info/warn work), also when the full listing touched it.
            st.task = self._spawn(self._run(key, st))

    @property
    def tasks(self) -> list[asyncio.Task]:
        return [st.task for st in self.state.values() if st.task is not None]

    async def _run(self, key: PoolKey, st: PoolState) -> None:
        try:
            while st.dirty:
                await asyncio.sleep(self.debounce)
                st.dirty = False
                try:
                    await self.reconcile(key)
                except asyncio.CancelledError:
                    raise
                except ApiError as e:
                    # Refusals the API server explains (a namespace being deleted, a quota, RBAC):
                    # one line with its reason, and try again.
                    log.warning("pool %s/%s: reconcile failed: %s; retrying in %.0f s", *key, e.status.message,
                                RETRY_S)
                    st.dirty = True
                    await asyncio.sleep(RETRY_S)
                except TransportError as e:
                    # The API server unreachable or the connection cut: no bug of ours, one line.
                    log.warning("pool %s/%s: reconcile failed: the API server did not answer (%s: %s); retrying "
                                "in %.0f s", *key, type(e).__name__, e, RETRY_S)
                    st.dirty = True
                    await asyncio.sleep(RETRY_S)
                except Exception:
                    log.exception("pool %s/%s: reconcile failed; retrying in %.0f s", *key, RETRY_S)
                    st.dirty = True
                    await asyncio.sleep(RETRY_S)
        finally:
            st.task = None
            self._release(key)

    async def stop(self, grace: float = 2.0) -> None:
        """On shutdown: let running work finish for ``grace`` seconds, then cancel the rest (what is
        left is recomputed by the next start, which compares before writing)."""
        try:
            await asyncio.wait_for(self.idle(), grace)
        except asyncio.TimeoutError:
            pass
        resync = [t for t in (self.resync_task, self.tenant_task) if t is not None]
        tasks = self.tasks
        for t in [*tasks, *self.status_workers, *resync]:
            t.cancel()
        await asyncio.gather(*tasks, *self.status_workers, *resync, return_exceptions=True)
        self.status_workers.clear()
        self.resync_task = self.tenant_task = None
        if self.kube is not None:
            await self.kube.close()

    async def idle(self) -> None:
        """Wait until no reconcile runs and no status waits to be written."""
        while self.tasks or self.status_queue or self.status_inflight:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            else:
                await asyncio.sleep(0.05)

    # --------------------------------------------------------------------------- reconcile

    async def reconcile(self, key: PoolKey) -> None:
        namespace, pool_name = key
        started = asyncio.get_running_loop().time()
        if self.kube is None:
            self.kube = Kube()
        kube = self.kube
        self.reconciles += 1
        st = self.pool(key)
        pool = st.view
        adapters = sorted(st.adapters.values(), key=lambda a: a.name)
        pods = sorted(st.pods.values(), key=lambda p: p.name)
        pool_ok = pool is not None and pool.spec is not None
        if not pool_ok:
            # The pool is gone (its ConfigMaps go with it) or unusable: start afresh when it is back.
            st.forget_routes()
            st.applied = None
        elif st.shards is None:
            assert pool is not None
            st.shards = await kube.routes_shards(namespace, pool_name, pool.uid)
            st.table = RoutesTable.merge(pool_name, st.shards.values())
        previous = st.table or RoutesTable(pool=pool_name)
        # Transition times come from what was written: a status planned and undone before its write
        # (a replica unready for a moment, with thousands of statuses queued) is no transition, and
        # rewriting every adapter for a new time would be the write storm the queue exists to avoid.
        previous_status = {a.name: s for a in adapters if (s := self.written.get((namespace, a.name)))}
        planned_status = {a.name: s for a in adapters if (s := self.desired.get((namespace, a.name)))
                          and s is not self.written.get((namespace, a.name))}
        gateway_ready = sum(st.gateway_pods.values())
        deployed = st.workloads.get(names.deployment_name(pool_name))
        problems = [(w.reason or "ReplicaFailure", w.problem) for w in st.workloads.values() if w.problem]
        tenants = self.tenants.get(namespace, {})
        merged_self = None
        if pool_ok and pool.spec.model.merged_adapter is not None:
            merged_self = routing.resolve_merged(pool, self.find_adapter(namespace, pool.spec.model.merged_adapter.name),
                                                 tenants)
        merged: dict[str, routing.MergedInfo] = {}
        for mview, mst in self.merged_pools(namespace):
            assert mview.spec is not None and mview.spec.model.merged_adapter is not None
            a = st.adapters.get(mview.spec.model.merged_adapter.name)
            if a is None or mview.name == pool_name:
                continue
            ref, _ = routing.resolve_merged(mview, a, tenants)
            if ref is not None:
                mpods = list(mst.pods.values())
                serving, other = routing.merged_ready(ref, mpods)
                merged[a.name] = routing.MergedInfo(mview.name, ref.version, serving, mview.spec.replicas,
                                                    routing.merged_refusal(ref, mpods), other)
        route = (routing.http_route_readiness(pool.spec, st.route_parents, st.route_missing)
                 if pool_ok and pool is not None and pool.spec is not None and pool.spec.http_route is not None
                 else None)
        plan = routing.plan_pool(pool_name, pool, adapters, pods, previous, previous_status, st.memo,
                                 gateway_ready=gateway_ready, workload_problems=problems,
                                 tenants=tenants, merged=merged, merged_self=merged_self,
                                 planned_status=planned_status, http_route=route,
                                 deployed_replicas=deployed.replicas if deployed is not None else None)

        if pool_ok:
            assert pool is not None
            current = st.shards
            assert current is not None
            if plan.changed or st.shard_count is None:
                parsed: dict[str, RoutesTable] = {}
                write, delete, count = routing.plan_shards(plan.table, current, parsed=parsed, parts=st.parts)
            else:  # the ConfigMaps were checked against this same table already
                write, delete, count, parsed = {}, [], st.shard_count, {}
            st.shard_count = count
            # Routes first when a scale down drains pods (below): the Deployment's replicas drop only
            # once the routes no longer need the pods it removes.
            await self._apply_children(st, pool, count, merged_self[0] if merged_self else None,
                                       plan.deployment_replicas)
            if st.shards is not current:
                # A routes ConfigMap was deleted or edited while the children were applied (a
                # namespace being deleted does that): routes_event forgot what the ConfigMaps hold and
                # marked the pool dirty; the next pass lists them again and plans from there.
                st.dirty = True
                return
            # Recorded before writing, so the watch events of our own writes are recognised.
            shards = {n: t for n, t in current.items() if n not in delete}
            shards.update({n: parsed[n] for n in write})
            st.texts.update(write)
            st.shards = shards
            try:
                await asyncio.gather(*(kube.apply(manifests.routes_configmap(pool_name, namespace, pool.uid, n,
                                                                             text))
                                       for n, text in write.items()))
                for n in write:  # written: a full listing that began before this does not sweep them
                    self._mark("cm", namespace, n)
                for n in delete:
                    await kube.delete("ConfigMap", n, namespace)
                    st.texts.pop(n, None)
            except BaseException:
                st.forget_routes()  # unknown now: list again
                raise
            st.table = plan.table
            if write or delete:
                log.info("pool %s/%s: routes generation %d, %d adapters, wrote %d and deleted %d ConfigMaps",
                         namespace, pool_name, plan.table.generation, len(plan.table.adapters), len(write),
                         len(delete))

        self._queue_statuses(namespace, adapters, plan.adapter_status)
        if pool is not None and plan.pool_status is not None:
            uid, old = st.status_written or ("", {})
            if uid != pool.uid:  # a pool of the same name as a deleted one starts from its own status
                old = pool.status
            patch = routing.status_patch(old, plan.pool_status)
            if patch and await kube.patch_status(names.POOL_KIND, pool_name, namespace, patch):
                st.status_written = (pool.uid, plan.pool_status)
        log.debug("pool %s/%s reconciled: %d adapters, %d pods, generation %d, %.0f ms", namespace, pool_name,
                  len(adapters), len(pods), plan.table.generation,
                  1000 * (asyncio.get_running_loop().time() - started))

    async def _apply_children(self, st: PoolState, pool: PoolView, shards: int,
                              merged: routing.MergedRef | None = None, replicas: int | None = None) -> None:
        """``replicas``: the Deployment's (None: spec.replicas), held above it while a scale down drains."""
        assert self.kube is not None and pool.spec is not None
        children = manifests.pool_children(pool.name, pool.namespace, pool.uid, pool.spec, shards,
                                           self.sidecar_cluster_role, merged, self.runtime_images, replicas)
        canonical = json.dumps(children, sort_keys=True)
        if st.applied == canonical:
            return
        # Unchanged fields make server-side apply a no-op: a restart rewrites nothing.
        st.applying = True
        st.moved_while_applying = False
        # Known before the writes, so their own events are recognised as what was applied.
        st.children = {(m["kind"], m["metadata"]["name"]): m for m in children if m["kind"] in DRIFT_CHECKED}
        missing_kind = None
        try:
            for m in children:
                try:
                    generation = await self.kube.apply(m)
                except (ApiError, HTTPStatusError) as e:
                    if m["kind"] != names.HTTPROUTE_KIND or not not_found(e):
                        raise
                    # No Gateway API on this API server: the rest of the pool is still applied.
                    missing_kind = m
                    st.children.pop((m["kind"], m["metadata"]["name"]), None)
                    continue
                if m["kind"] == "Deployment" and generation is not None:
                    self.applied_generations[(pool.namespace, m["metadata"]["name"])] = generation
        finally:
            st.applying = False
        for kind, name in st.children:  # applied: a full listing that began before this does not sweep them
            self._mark(kind, pool.namespace, name)
        if st.moved_while_applying or any(w.generation > self.applied_generations.get((pool.namespace, n),
                                                                                      w.generation)
                                          for n, w in st.workloads.items()):
            # Edited by someone else while we applied (or an event of a write of ours caught before
            # it was made): apply once more; unchanged fields make it a no-op.
            st.moved_while_applying = False
            st.dirty = True
            return
        # After the applies: the Ingress points back at the pool's Service before the gateway goes.
        for kind, name in manifests.stale_children(pool.name, pool.spec, self.sidecar_cluster_role):
            if kind == "Deployment":
                self.own_deletes.add((pool.namespace, name))
            if not await self.kube.delete(kind, name, pool.namespace):
                self.own_deletes.discard((pool.namespace, name))
        if st.moved_while_applying:  # a child changed or went meanwhile: apply once more
            st.moved_while_applying = False
            st.dirty = True
            return
        if missing_kind is not None:
            message = (f"spec.httpRoute: the API server has no {names.HTTPROUTE_KIND} "
                       f"({names.GATEWAY_API_GROUP}/{names.GATEWAY_API_VERSION}): install the Gateway API CRDs "
                       f"(sigs.k8s.io/gateway-api, config/crd/standard) and a Gateway controller; HTTPRoute "
                       f"{missing_kind['metadata']['name']} is made once they are there (tried again every "
                       f"{ROUTE_RETRY_S:.0f} s)")
            if not st.route_missing:  # said once, not on every try
                log.warning("pool %s/%s: %s", pool.namespace, pool.name, message)
                kopf.warn(pool.ref(), reason="HTTPRouteUnavailable", message=message)
            self._spawn(self._apply_later((pool.namespace, pool.name), ROUTE_RETRY_S))
        elif st.route_missing:
            log.info("pool %s/%s: HTTPRoute applied (the Gateway API is there now)", pool.namespace, pool.name)
        if st.route_missing != (missing_kind is not None):
            st.route_missing = missing_kind is not None
            st.dirty = True  # the pool's HTTPRouteAccepted condition says it
        if st.applied is not None or pool.status.get("observedGeneration") != pool.generation:
            gateway = (f"; gateway {names.gateway_name(pool.name)} ({pool.spec.gateway.replicas} replicas)"
                       if pool.spec.gateway is not None and pool.spec.gateway.enabled else "")
            kopf.info(pool.ref(), reason="Applied",
                      message=f"Deployment {names.deployment_name(pool.name)} and its Service, ServiceAccount, "
                              f"Role and RoleBinding applied ({pool.spec.replicas} replicas){gateway}")
        st.applied = canonical

    async def _apply_later(self, key: PoolKey, delay: float) -> None:
        """Apply the pool's children again after ``delay`` (an HTTPRoute the API server could not take)."""
        await asyncio.sleep(delay)
        st = self.state.get(key)
        if st is not None and st.route_missing:
            st.applied = None
            self.touch(key)

    def _queue_statuses(self, namespace: str, adapters: list[AdapterView],
                        statuses: dict[str, dict[str, Any]]) -> None:
        """Hand changed statuses to the status writers; the reconcile does not wait for them, so a
        routes change never queues behind thousands of status writes."""
        for a in adapters:
            key = (namespace, a.name)
            new = statuses[a.name]
            if new == self.desired.get(key, self.written.get(key, a.status)):
                continue
            self.desired[key] = new
            self.status_queue[key] = a
            self.status_queue.move_to_end(key)
        if self.status_queue:
            self.status_ready.set()
            while len(self.status_workers) < MAX_STATUS_WRITERS:
                self.status_workers.append(self._spawn(self._status_writer()))

    async def _status_writer(self) -> None:
        assert self.kube is not None
        while True:
            key = next((k for k in self.status_queue if k not in self.status_inflight), None)
            if key is None:
                self.status_ready.clear()
                await self.status_ready.wait()
                continue
            a = self.status_queue.pop(key)
            new = self.desired.get(key)
            if new is None:  # deleted meanwhile
                continue
            self.status_inflight.add(key)
            try:
                old = self.written.get(key, a.status)
                patch = routing.status_patch(old, new)
                if patch is not None:
                    await self._write_status(a, old, new, patch)
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                log.warning("LoRAAdapter %s/%s: status write failed: %s; retrying", *key, e.status.message)
                self.status_queue[key] = a
                await asyncio.sleep(RETRY_S)
            except Exception:
                log.exception("LoRAAdapter %s/%s: status write failed; retrying", *key)
                self.status_queue[key] = a
                await asyncio.sleep(RETRY_S)
            finally:
                self.status_inflight.discard(key)
                if key in self.status_queue:
                    self.status_ready.set()

    async def _write_status(self, a: AdapterView, old: dict[str, Any], new: dict[str, Any],
                            patch: dict[str, Any]) -> None:
        assert self.kube is not None
        if not await self.kube.patch_status(names.ADAPTER_KIND, a.name, a.namespace, patch):
            return
        key = (a.namespace, a.name)
        self.written[key] = new
        before, after = old.get("phase"), new.get("phase")
        ready = AdapterPhase.ready.value
        if before == ready:
            self.ready_digest[key] = old.get("digest")
        if after in (AdapterPhase.failed.value, AdapterPhase.degraded.value, AdapterPhase.pending.value):
            self.ready_digest.pop(key, None)  # Ready again after a failure, or after no replica served it, is news
        if before == after and old.get("message") == new.get("message"):
            return
        msg = new.get("message") or ""
        if after in (AdapterPhase.failed.value, AdapterPhase.degraded.value):
            kopf.warn(a.ref(), reason=after, message=msg)
        elif after == ready and before != after:
            # Once per version, and again after a failure or a time no replica served it: one replica
            # that goes unready and comes back while another serves (every adapter of the pool
            # Syncing, then Ready again) is no news of the adapter's, and would post one Event per
            # adapter of the pool on every flip.
            if self.ready_digest.get(key) != new.get("digest"):
                kopf.info(a.ref(), reason="Ready", message=msg)
            self.ready_digest[key] = new.get("digest")
        elif after == AdapterPhase.pending.value and "not found" in msg and before != after:
            kopf.warn(a.ref(), reason="PoolNotFound", message=msg)


FLEET = Fleet()


def _pool_owner(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The BaseModelPool owner reference that controls an object, if any."""
    return next((o for o in meta.get("ownerReferences") or []
                 if o.get("kind") == names.POOL_KIND and o.get("controller")), None)


def _merged_failure(view: routing.PodView) -> str | None:
    return view.report.merged_adapter_failure if view.report is not None else None

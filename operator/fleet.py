"""Per-pool reconciliation: coalesces the events of a pool (its adapters, pods and itself) for a few
tens of milliseconds, plans with ``routing`` and writes only what changed through ``kube``.

One reconcile per pool at a time; 10,000 adapter creates become a handful of ConfigMap writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import kopf

from lorafleet.contracts import names
from lorafleet.contracts.resources import AdapterPhase
from lorafleet.contracts.routes import RoutesTable

from . import manifests, routing
from .kube import Kube
from .routing import AdapterView, PodView, PoolView

log = logging.getLogger("lorafleet.operator")

PoolKey = tuple[str, str]  # (namespace, pool)
ObjKey = tuple[str, str]  # (namespace, name)

DEBOUNCE_S = 0.05
RETRY_S = 2.0


class Fleet:
    def __init__(self, debounce: float = DEBOUNCE_S):
        self.debounce = debounce
        self.kube: Kube | None = None
        self.adapters: Mapping[PoolKey, Iterable[AdapterView]] = {}
        self.pods: Mapping[PoolKey, Iterable[PodView]] = {}
        self.pools: Mapping[PoolKey, Iterable[PoolView]] = {}
        self.tasks: dict[PoolKey, asyncio.Task] = {}
        self.dirty: set[PoolKey] = set()
        self.shards: dict[PoolKey, dict[str, RoutesTable]] = {}  # what the ConfigMaps hold
        self.tables: dict[PoolKey, RoutesTable] = {}  # the whole table last written
        self.applied: dict[PoolKey, str] = {}  # children manifests last applied (canonical JSON)
        self.written: dict[ObjKey, dict[str, Any]] = {}  # adapter status last written
        self.pool_written: dict[PoolKey, dict[str, Any]] = {}
        self.seen: dict[tuple[str, ObjKey], tuple[Any, ...]] = {}  # kind, object -> what a reconcile depends on
        self.reconciles = 0

    # ------------------------------------------------------------------------------ events

    def bind(self, adapters: Mapping, pods: Mapping, pools: Mapping) -> None:
        """Hold kopf's indexes (they are passed to handlers only)."""
        self.adapters, self.pods, self.pools = adapters, pods, pools

    def adapter_event(self, kind_event: str | None, view: AdapterView) -> None:
        key = (view.namespace, view.name)
        before = self.seen.get(("a", key))
        now = (view.generation, view.pool, view.uid)
        if kind_event == "DELETED":
            self.seen.pop(("a", key), None)
            self.written.pop(key, None)
        elif before == now:
            return  # only its status moved (our own write): nothing to reconcile
        else:
            self.seen[("a", key)] = now
        if before is not None and before[1] != view.pool:
            self.touch((view.namespace, before[1]))
        self.touch((view.namespace, view.pool))

    def pool_event(self, kind_event: str | None, view: PoolView) -> None:
        key = (view.namespace, view.name)
        now = (view.generation, view.uid)
        if kind_event == "DELETED":
            self.seen.pop(("p", key), None)
        elif self.seen.get(("p", key)) == now:
            return
        else:
            self.seen[("p", key)] = now
        self.touch(key)

    def touch(self, key: PoolKey) -> None:
        """Reconcile this pool soon; events arriving meanwhile join the same reconcile."""
        self.dirty.add(key)
        if key not in self.tasks:
            # Created from a handler, so the task inherits kopf's context (kopf.info/warn work).
            self.tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    async def _run(self, key: PoolKey) -> None:
        try:
            while key in self.dirty:
                await asyncio.sleep(self.debounce)
                self.dirty.discard(key)
                try:
                    await self.reconcile(key)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("pool %s/%s: reconcile failed; retrying in %.0f s", *key, RETRY_S)
                    self.dirty.add(key)
                    await asyncio.sleep(RETRY_S)
        finally:
            self.tasks.pop(key, None)

    async def idle(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks.values()), return_exceptions=True)

    # --------------------------------------------------------------------------- reconcile

    async def reconcile(self, key: PoolKey) -> None:
        namespace, pool_name = key
        if self.kube is None:
            self.kube = Kube()
        kube = self.kube
        self.reconciles += 1
        pool = next(iter(self.pools.get(key, ())), None)
        adapters = sorted(self.adapters.get(key, ()), key=lambda a: a.name)
        pods = sorted(self.pods.get(key, ()), key=lambda p: p.name)
        pool_ok = pool is not None and pool.spec is not None
        if not pool_ok:
            # The pool is gone (its ConfigMaps go with it) or unusable: start afresh when it is back.
            for d in (self.shards, self.tables, self.applied):
                d.pop(key, None)
        elif key not in self.shards:
            self.shards[key] = await kube.routes_shards(namespace, pool_name)
            self.tables[key] = RoutesTable.merge(pool_name, self.shards[key].values())
        previous = self.tables.get(key) or RoutesTable(pool=pool_name)
        previous_status = {a.name: self.written[(namespace, a.name)] for a in adapters
                           if (namespace, a.name) in self.written}
        plan = routing.plan_pool(pool_name, pool, adapters, pods, previous, previous_status)

        if pool_ok:
            assert pool is not None
            write, delete, count = routing.plan_shards(plan.table, self.shards[key])
            await self._apply_children(pool, count)
            await asyncio.gather(*(kube.apply(manifests.routes_configmap(pool_name, namespace, pool.uid, n, text))
                                   for n, text in write.items()))
            for n in delete:
                await kube.delete("ConfigMap", n, namespace)
            shards = {n: t for n, t in self.shards[key].items() if n not in delete}
            shards.update({n: RoutesTable.from_json(t) for n, t in write.items()})
            self.shards[key] = shards
            self.tables[key] = plan.table
            if write or delete:
                log.info("pool %s/%s: routes generation %d, %d adapters, wrote %d and deleted %d ConfigMaps",
                         namespace, pool_name, plan.table.generation, len(plan.table.adapters), len(write),
                         len(delete))

        await self._write_statuses(namespace, adapters, plan.adapter_status)
        if pool is not None and plan.pool_status is not None:
            old = self.pool_written.get(key, pool.status)
            patch = routing.status_patch(old, plan.pool_status)
            if patch and await kube.patch_status(names.POOL_KIND, pool_name, namespace, patch):
                self.pool_written[key] = plan.pool_status
        log.debug("pool %s/%s reconciled: %d adapters, %d pods, generation %d", namespace, pool_name,
                  len(adapters), len(pods), plan.table.generation)

    async def _apply_children(self, pool: PoolView, shards: int) -> None:
        assert self.kube is not None and pool.spec is not None
        key = (pool.namespace, pool.name)
        children = manifests.pool_children(pool.name, pool.namespace, pool.uid, pool.spec, shards)
        canonical = json.dumps(children, sort_keys=True)
        if self.applied.get(key) == canonical:
            return
        # Unchanged fields make server-side apply a no-op: a restart rewrites nothing.
        for m in children:
            await self.kube.apply(m)
        if pool.spec.ingress is None:
            await self.kube.delete("Ingress", names.ingress_name(pool.name), pool.namespace)
        if key in self.applied or pool.status.get("observedGeneration") != pool.generation:
            kopf.info(pool.ref(), reason="Applied",
                      message=f"Deployment {names.deployment_name(pool.name)} and its Service, ServiceAccount, "
                              f"Role and RoleBinding applied ({pool.spec.replicas} replicas)")
        self.applied[key] = canonical

    async def _write_statuses(self, namespace: str, adapters: list[AdapterView],
                              statuses: dict[str, dict[str, Any]]) -> None:
        assert self.kube is not None
        jobs = []
        for a in adapters:
            new = statuses[a.name]
            old = self.written.get((namespace, a.name), a.status)
            patch = routing.status_patch(old, new)
            if patch is None:
                continue
            jobs.append(self._write_status(a, old, new, patch))
        if jobs:
            await asyncio.gather(*jobs)

    async def _write_status(self, a: AdapterView, old: dict[str, Any], new: dict[str, Any],
                            patch: dict[str, Any]) -> None:
        assert self.kube is not None
        if not await self.kube.patch_status(names.ADAPTER_KIND, a.name, a.namespace, patch):
            return
        self.written[(a.namespace, a.name)] = new
        before, after = old.get("phase"), new.get("phase")
        if before == after and old.get("message") == new.get("message"):
            return
        msg = new.get("message") or ""
        if after in (AdapterPhase.failed.value, AdapterPhase.degraded.value):
            kopf.warn(a.ref(), reason=after, message=msg)
        elif after == AdapterPhase.ready.value and before != after:
            kopf.info(a.ref(), reason="Ready", message=msg)
        elif after == AdapterPhase.pending.value and "not found" in msg and before != after:
            kopf.warn(a.ref(), reason="PoolNotFound", message=msg)


FLEET = Fleet()

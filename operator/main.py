"""The lorafleet operator's kopf handlers (all of them, in one place).

Adapters, pools and pool pods are indexed by pool; every event only marks its pool for the
coalesced reconcile in ``fleet``. Event handlers (not create/update handlers) keep kopf from
writing its own state onto 10,000 adapters, and no finalizers are used: pool children go with the
pool through ownerReferences, and an adapter leaves the routes on its DELETED event.
"""

from __future__ import annotations

from typing import Any

import kopf

from lorafleet.contracts import names

from .fleet import FLEET
from .routing import AdapterView, PodView, PoolView, adapter_view, pod_view, pool_view

ADAPTERS = f"{names.ADAPTER_PLURAL}.{names.GROUP}"
POOLS = f"{names.POOL_PLURAL}.{names.GROUP}"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{names.GROUP}/operator"
    settings.posting.level = 20  # INFO and above become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.batching.idle_timeout = 30
    settings.networking.connect_timeout = 10


@kopf.index(ADAPTERS)
async def adapters_by_pool(body: kopf.Body, **_: Any) -> dict[tuple[str, str], AdapterView]:
    view = adapter_view(dict(body))
    return {(view.namespace, view.pool): view}


@kopf.index(POOLS)
async def pools_by_name(body: kopf.Body, **_: Any) -> dict[tuple[str, str], PoolView]:
    view = pool_view(dict(body))
    return {(view.namespace, view.name): view}


@kopf.index("pods", labels={names.LABEL_POOL: kopf.PRESENT})
async def pods_by_pool(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[tuple[str, str], PodView]:
    return {(namespace, labels[names.LABEL_POOL]): pod_view(dict(body))}


@kopf.on.event(ADAPTERS)
async def adapter_changed(type: str | None, body: kopf.Body, adapters_by_pool: kopf.Index, pods_by_pool: kopf.Index,
                    pools_by_name: kopf.Index, **_: Any) -> None:
    FLEET.bind(adapters_by_pool, pods_by_pool, pools_by_name)
    FLEET.adapter_event(type, adapter_view(dict(body)))


@kopf.on.event(POOLS)
async def pool_changed(type: str | None, body: kopf.Body, adapters_by_pool: kopf.Index, pods_by_pool: kopf.Index,
                 pools_by_name: kopf.Index, **_: Any) -> None:
    FLEET.bind(adapters_by_pool, pods_by_pool, pools_by_name)
    FLEET.pool_event(type, pool_view(dict(body)))


@kopf.on.event("pods", labels={names.LABEL_POOL: kopf.PRESENT})
async def pod_changed(namespace: str, labels: kopf.Labels, adapters_by_pool: kopf.Index, pods_by_pool: kopf.Index,
                pools_by_name: kopf.Index, **_: Any) -> None:
    FLEET.bind(adapters_by_pool, pods_by_pool, pools_by_name)
    FLEET.touch((namespace, labels[names.LABEL_POOL]))


@kopf.on.cleanup()
async def close(**_: Any) -> None:
    await FLEET.idle()
    if FLEET.kube is not None:
        await FLEET.kube.close()

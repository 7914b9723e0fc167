"""The lorafleet operator's kopf handlers (all of them, in one place).

Every event only updates the operator's store of adapters and pods by pool (``fleet``) and marks
the pool for a coalesced reconcile. Event handlers (not create/update handlers) keep kopf from
writing its own state onto 10,000 adapters, and no finalizers are used: pool children go with the
pool through ownerReferences, and an adapter leaves the routes on its DELETED event. Handlers are
async: sync ones would run in threads, 10,000 times at startup.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import kopf

from lorafleet.contracts import names

from .fleet import FLEET
from .kube import Kube
from .routing import adapter_view, pool_view

ADAPTERS = f"{names.ADAPTER_PLURAL}.{names.GROUP}"
POOLS = f"{names.POOL_PLURAL}.{names.GROUP}"
TENANTS = f"{names.TENANT_PLURAL}.{names.GROUP}"
POOL_PODS = {names.LABEL_POOL: kopf.PRESENT}
GATEWAY_PODS = {names.LABEL_GATEWAY_FOR: kopf.PRESENT}
MANAGED = {names.LABEL_MANAGED_BY: "lorafleet"}

log = logging.getLogger("lorafleet.operator")


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    settings.posting.level = logging.INFO  # kopf.info/warn become Kubernetes Events
    settings.watching.server_timeout = 300
    settings.batching.idle_timeout = 30
    FLEET.kube = Kube()
    adapters, pools, pods = await FLEET.kube.list_bodies_when_ready(FLEET.namespaces, logger)
    # Tenants first: the first plan of a pool must not route an adapter its tenant does not allow.
    for body in await FLEET.kube.list_tenants_when_ready(FLEET.namespaces, logger):
        FLEET.tenant_event(None, body)
    FLEET.prime(adapters, pools, pods)
    FLEET.start_resync()
    # The store lives as long as the operator: keep the collector from walking it again and again.
    gc.collect()
    gc.freeze()
    log.info("store primed: %d adapters, %d pools, %d pool pods", len(adapters), len(pools), len(pods))


@kopf.on.event(ADAPTERS)
async def adapter_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    meta = body.metadata
    if FLEET.adapter_unchanged(type, meta.namespace or "", meta.name or "", meta.uid or "",
                               int(meta.get("generation") or 0), str(body.spec.get("pool", ""))):
        return
    FLEET.adapter_event(type, adapter_view(dict(body), FLEET.specs))


@kopf.on.event(TENANTS)
async def tenant_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.tenant_event(type, dict(body))


@kopf.on.event(POOLS)
async def pool_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.pool_event(type, pool_view(dict(body)))


@kopf.on.event("pods", labels=POOL_PODS)
@kopf.on.event("pods", labels=GATEWAY_PODS, id="gateway_pod_changed")
async def pod_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.pod_event(type, dict(body))


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.workload_event(type, dict(body))


@kopf.on.event("services", labels=MANAGED)
async def service_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.owned_event("Service", type, dict(body))


@kopf.on.event("serviceaccounts", labels=MANAGED)
async def service_account_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.owned_event("ServiceAccount", type, dict(body))


@kopf.on.event("networking.k8s.io", "v1", "ingresses", labels=MANAGED)
async def ingress_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.owned_event("Ingress", type, dict(body))


# The Gateway API is a set of CRDs a cluster may not have: kopf watches HTTPRoutes once they exist.
@kopf.on.event(names.GATEWAY_API_GROUP, names.GATEWAY_API_VERSION, names.HTTPROUTE_PLURAL, labels=MANAGED)
async def http_route_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.owned_event(names.HTTPROUTE_KIND, type, dict(body))


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
async def pdb_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.owned_event("PodDisruptionBudget", type, dict(body))


@kopf.on.event("configmaps", labels={names.LABEL_ROUTES_FOR: kopf.PRESENT})
async def routes_changed(type: str | None, body: kopf.Body, **_: Any) -> None:
    FLEET.in_handler()
    FLEET.routes_event(type, dict(body))


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    await FLEET.stop()

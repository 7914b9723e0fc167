"""The operator's only module that calls the Kubernetes API (besides kopf's own watching):
server-side apply with field manager ``lorafleet``, status patches, routes ConfigMaps."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lightkube import AsyncClient, Client
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Service, ServiceAccount
from lightkube.resources.networking_v1 import Ingress
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding
from lightkube.types import PatchType

from lorafleet.contracts import names
from lorafleet.contracts.routes import RoutesTable

log = logging.getLogger("lorafleet.operator.kube")

LoRAAdapterResource = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND,
                                                 names.ADAPTER_PLURAL)
BaseModelPoolResource = create_namespaced_resource(names.GROUP, names.VERSION, names.POOL_KIND, names.POOL_PLURAL)

KINDS = {"Deployment": Deployment, "ConfigMap": ConfigMap, "Service": Service, "ServiceAccount": ServiceAccount,
         "Ingress": Ingress, "Role": Role, "RoleBinding": RoleBinding}

# Writes in flight at once: enough to keep the API server busy at startup with 10,000 adapters,
# few enough not to starve its other clients.
MAX_INFLIGHT = 24


class Kube:
    def __init__(self, client: AsyncClient | None = None):
        self.client = client or AsyncClient(field_manager=names.FIELD_MANAGER)
        self.inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self.writes = 0  # counted, so tests and the bench can see that an idle restart writes nothing

    async def apply(self, manifest: dict[str, Any]) -> None:
        """Server-side apply; we own every field we set, so conflicts are forced."""
        res = KINDS[manifest["kind"]]
        meta = manifest["metadata"]
        async with self.inflight:
            await self.client.patch(res, meta["name"], manifest, namespace=meta["namespace"],
                                    patch_type=PatchType.APPLY, field_manager=names.FIELD_MANAGER, force=True)
        self.writes += 1

    async def delete(self, kind: str, name: str, namespace: str) -> None:
        try:
            async with self.inflight:
                await self.client.delete(KINDS[kind], name, namespace=namespace)
            self.writes += 1
        except ApiError as e:
            if e.status.code != 404:
                raise

    async def patch_status(self, kind: str, name: str, namespace: str, patch: dict[str, Any]) -> bool:
        """Merge-patch ``status``; False when the object is gone (deleted meanwhile)."""
        res = LoRAAdapterResource if kind == names.ADAPTER_KIND else BaseModelPoolResource
        try:
            async with self.inflight:
                await self.client.patch(res.Status, name, {"status": patch}, namespace=namespace,
                                        patch_type=PatchType.MERGE)
            self.writes += 1
            return True
        except ApiError as e:
            if e.status.code == 404:
                return False
            raise

    async def routes_shards(self, namespace: str, pool: str) -> dict[str, RoutesTable]:
        """The routes ConfigMaps of a pool as they are now: name -> table."""
        out: dict[str, RoutesTable] = {}
        async for cm in self.client.list(ConfigMap, namespace=namespace, labels={names.LABEL_ROUTES_FOR: pool}):
            text = (cm.data or {}).get(names.ROUTES_KEY)
            if cm.metadata.deletionTimestamp or not text:
                continue
            try:
                out[cm.metadata.name] = RoutesTable.from_json(text)
            except ValueError:
                log.warning("ConfigMap %s/%s: routes.json does not parse; it will be rewritten",
                            namespace, cm.metadata.name)
                out[cm.metadata.name] = RoutesTable(pool=pool, generation=-1)
        return out

    async def close(self) -> None:
        await self.client.close()


def sync_client() -> Client:
    """A blocking client for tools and tests that read what the operator wrote."""
    return Client(field_manager=names.FIELD_MANAGER)

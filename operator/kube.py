"""The operator's only module that calls the Kubernetes API (besides kopf's own watching):
server-side apply with field manager ``lorafleet``, status patches, routes ConfigMaps."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from typing import Any

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Service, ServiceAccount
from lightkube.resources.networking_v1 import Ingress, NetworkPolicy
from lightkube.resources.policy_v1 import PodDisruptionBudget
from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding
from lightkube.types import PatchType

from lorafleet.contracts import names
from lorafleet.contracts.kubeio import BaseModelPoolResource, LoRAAdapterResource, LoRATenantResource

try:  # lightkube 1.x speaks through httpx2, earlier ones through httpx
    from httpx2 import HTTPStatusError, TransportError
except ImportError:  # pragma: no cover
    from httpx import HTTPStatusError, TransportError
from lorafleet.contracts.routes import RoutesTable

log = logging.getLogger("lorafleet.operator.kube")

# Not ours, so not in contracts/kubeio.py: the Gateway API's route.
HTTPRouteResource = create_namespaced_resource(names.GATEWAY_API_GROUP, names.GATEWAY_API_VERSION,
                                               names.HTTPROUTE_KIND, names.HTTPROUTE_PLURAL)

KINDS = {"Deployment": Deployment, "ConfigMap": ConfigMap, "Service": Service, "ServiceAccount": ServiceAccount,
         "Ingress": Ingress, "NetworkPolicy": NetworkPolicy, "Role": Role, "RoleBinding": RoleBinding,
         "PodDisruptionBudget": PodDisruptionBudget, names.HTTPROUTE_KIND: HTTPRouteResource}
# Owned kinds watched for drift field by field: what the operator applied must still hold (Deployments
# go by generation, routes ConfigMaps by their text).
DRIFT_CHECKED = frozenset({"Service", "ServiceAccount", "Ingress", "PodDisruptionBudget", names.HTTPROUTE_KIND})
# Kinds an API server may not serve (the Gateway API's CRDs are installed separately): listing them
# there finds nothing rather than failing.
OPTIONAL_KINDS = frozenset({names.HTTPROUTE_KIND})

# Status writes in flight at once: enough to keep the API server busy at startup with 10,000
# adapters, few enough not to starve its other clients. Routes and pool objects have their own
# lane, so a burst of status writes never delays a routes change.
MAX_STATUS_INFLIGHT = 32
MAX_INFLIGHT = 8


def not_found(e: Exception) -> bool:
    """A 404: the object is not there, or the API server does not serve its kind at all (then the answer
    has no Status body, and lightkube raises httpx's error rather than an ApiError)."""
    if isinstance(e, ApiError):
        return e.status.code == 404
    return isinstance(e, HTTPStatusError) and e.response.status_code == 404


class Kube:
    def __init__(self, client: AsyncClient | None = None):
        self.client = client or AsyncClient(field_manager=names.FIELD_MANAGER)
        self.inflight = asyncio.Semaphore(MAX_INFLIGHT)
        self.status_inflight = asyncio.Semaphore(MAX_STATUS_INFLIGHT)
        self.writes = 0  # counted, so tests and the bench can see that an idle restart writes nothing

    async def apply(self, manifest: dict[str, Any]) -> int | None:
        """Server-side apply; we own every field we set, so conflicts are forced (an edit of one of
        them by someone else is put back). Returns the object's generation after the apply."""
        res = KINDS[manifest["kind"]]
        meta = manifest["metadata"]

        async def apply() -> Any:
            async with self.inflight:
                return await self.client.patch(res, meta["name"], manifest, namespace=meta["namespace"],
                                               patch_type=PatchType.APPLY, field_manager=names.FIELD_MANAGER,
                                               force=True)

        try:
            obj = await apply()
        except ApiError as e:
            if manifest["kind"] == "RoleBinding" and e.status.code == 422 and "roleRef" in str(e.status.message):
                # A RoleBinding's roleRef cannot change (one made by an earlier version, bound to a
                # ClusterRole that is gone now): replace the binding.
                log.info("RoleBinding %s/%s: roleRef changed; replacing it", meta["namespace"], meta["name"])
                async with self.inflight:
                    await self.client.delete(RoleBinding, meta["name"], namespace=meta["namespace"])
                self.writes += 1
                obj = await apply()
            elif e.status.code != 422 or "spec" not in manifest:
                raise
            else:
                obj = await self._apply_spec_whole(res, manifest, e, apply)
        self.writes += 1
        return getattr(getattr(obj, "metadata", None), "generation", None)

    async def _apply_spec_whole(self, res: Any, manifest: dict[str, Any], e: ApiError, apply: Any) -> Any:
        meta = manifest["metadata"]
        # Refused as invalid: someone else's item in a keyed list collides with ours (a Service
        # port renumbered by hand keeps its name, so ours comes back as a duplicate). Lists are
        # written whole by a merge patch, then applied again; an invalid spec of our own fails
        # the same way twice and is reported as before.
        log.warning("%s %s/%s: apply refused (%s); writing its spec whole, then applying again",
                    manifest["kind"], meta["namespace"], meta["name"], e.status.message)
        async with self.inflight:
            await self.client.patch(res, meta["name"], {"spec": manifest["spec"]}, namespace=meta["namespace"],
                                    patch_type=PatchType.MERGE, field_manager=names.FIELD_MANAGER)
        self.writes += 1
        return await apply()

    async def delete(self, kind: str, name: str, namespace: str) -> bool:
        """Delete; False when it was not there."""
        try:
            async with self.inflight:
                await self.client.delete(KINDS[kind], name, namespace=namespace)
            self.writes += 1
            return True
        except (ApiError, HTTPStatusError) as e:
            if not not_found(e):
                raise
            return False

    async def patch_status(self, kind: str, name: str, namespace: str, patch: dict[str, Any]) -> bool:
        """Merge-patch ``status``; False when the object is gone (deleted meanwhile)."""
        res = {names.ADAPTER_KIND: LoRAAdapterResource, names.POOL_KIND: BaseModelPoolResource,
               names.TENANT_KIND: LoRATenantResource}[kind]
        try:
            async with self.status_inflight:
                await self.client.patch(res.Status, name, {"status": patch}, namespace=namespace,
                                        patch_type=PatchType.MERGE)
            self.writes += 1
            return True
        except ApiError as e:
            if e.status.code == 404:
                return False
            raise

    async def routes_shards(self, namespace: str, pool: str, uid: str) -> dict[str, RoutesTable]:
        """The routes ConfigMaps of a pool as they are now: name -> table. ConfigMaps left by an
        earlier pool of the same name (another uid, about to be garbage collected) do not count."""
        out: dict[str, RoutesTable] = {}
        async for cm in self.client.list(ConfigMap, namespace=namespace, labels={names.LABEL_ROUTES_FOR: pool}):
            text = (cm.data or {}).get(names.ROUTES_KEY)
            owners = {o.uid for o in cm.metadata.ownerReferences or []}
            if cm.metadata.deletionTimestamp or not text or uid not in owners:
                continue
            try:
                out[cm.metadata.name] = RoutesTable.from_json(text)
            except ValueError:
                log.warning("ConfigMap %s/%s: routes.json does not parse; it will be rewritten",
                            namespace, cm.metadata.name)
                out[cm.metadata.name] = RoutesTable(pool=pool, generation=-1)
        return out

    async def _bodies(self, namespaces: list[str], res: Any, labels: dict | None = None,
                      optional: bool = False) -> list[dict]:
        """Every object of ``res`` (with these labels) in the given namespaces (all when empty; glob
        patterns list everything once and keep the matching namespaces), as raw bodies. ``optional``:
        a kind the API server does not serve (404) has none."""
        try:
            return await self._bodies_of(namespaces, res, labels)
        except (ApiError, HTTPStatusError) as e:
            if optional and not_found(e):
                return []
            raise

    async def _bodies_of(self, namespaces: list[str], res: Any, labels: dict | None) -> list[dict]:
        patterns = any(set(ns) & set("*?[!") for ns in namespaces)
        scopes = ["*"] if patterns or not namespaces else namespaces

        def watched(ns: str) -> bool:
            return not patterns or any(fnmatch.fnmatchcase(ns, p) for p in namespaces)

        out: list[dict] = []
        for scope in scopes:
            async for obj in self.client.list(res, namespace=scope, labels=labels):
                body = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
                if watched(body.get("metadata", {}).get("namespace", "")):
                    out.append(body)
        return out

    async def list_bodies(self, namespaces: list[str]) -> tuple[list[dict], list[dict], list[dict]]:
        """Adapters, pools and pool pods (runtime and gateway) as raw bodies, in the given namespaces (all
        when empty)."""
        from lightkube.operators import exists
        from lightkube.resources.core_v1 import Pod

        adapters, pools, pods, gateways = await asyncio.gather(
            self._bodies(namespaces, LoRAAdapterResource), self._bodies(namespaces, BaseModelPoolResource),
            self._bodies(namespaces, Pod, {names.LABEL_POOL: exists()}),
            self._bodies(namespaces, Pod, {names.LABEL_GATEWAY_FOR: exists()}))
        return adapters, pools, pods + gateways

    async def list_owned(self, namespaces: list[str]) -> tuple[list[dict], list[dict], dict[str, list[dict]]]:
        """What the operator writes and watches besides the pools' own objects: the Deployments it
        manages, the routes ConfigMaps, and its Services, ServiceAccounts, Ingresses,
        PodDisruptionBudgets and HTTPRoutes by kind, as raw bodies."""
        from lightkube.operators import exists

        managed = {names.LABEL_MANAGED_BY: "lorafleet"}
        kinds = sorted(DRIFT_CHECKED)
        deployments, configmaps, *others = await asyncio.gather(
            self._bodies(namespaces, Deployment, managed),
            self._bodies(namespaces, ConfigMap, {names.LABEL_ROUTES_FOR: exists()}),
            *(self._bodies(namespaces, KINDS[k], managed, optional=k in OPTIONAL_KINDS) for k in kinds))
        return deployments, configmaps, dict(zip(kinds, others))

    async def list_tenants(self, namespaces: list[str]) -> list[dict]:
        """LoRATenants as raw bodies, in the given namespaces (all when empty)."""
        return await self._bodies(namespaces, LoRATenantResource)

    async def list_bodies_when_ready(self, namespaces: list[str], logger: logging.Logger,
                                     timeout: float = 300) -> tuple[list[dict], list[dict], list[dict]]:
        """``list_bodies``, retried while the API server is starting (CRD storage initializing,
        connection refused): kopf would otherwise wait a minute before its next attempt."""
        return await self._while_starting(lambda: self.list_bodies(namespaces), "adapters, pools and pods",
                                          logger, timeout)

    async def list_tenants_when_ready(self, namespaces: list[str], logger: logging.Logger,
                                      timeout: float = 300) -> list[dict]:
        """``list_tenants``, retried like ``list_bodies_when_ready``."""
        return await self._while_starting(lambda: self.list_tenants(namespaces), "tenants", logger, timeout)

    @staticmethod
    async def _while_starting(call: Any, what: str, logger: logging.Logger, timeout: float) -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        delay = 0.2
        while True:
            try:
                return await call()
            except (ApiError, TransportError) as e:
                if isinstance(e, ApiError) and e.status.code not in (429, 500, 503, 504):
                    raise
                if asyncio.get_running_loop().time() > deadline:
                    raise
                logger.warning("listing %s failed (%s); retrying in %.1f s", what, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        await self.client.close()



"""The admin API (127.0.0.1 only): what the sidecar calls to register and drop adapter versions, to
report its sync state and to learn where the base model stands (loaded, or refused and why)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from lorafleet.contracts.runtime_api import AdapterLoadRequest, SyncState, error_body
from lorafleet.runtime.lifecycle import Runtime
from lorafleet.runtime.protocol import ApiError
from lorafleet.runtime.tiers import AdapterEntry, AdapterManager


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    def manager() -> AdapterManager:
        if rt.manager is None:
            if rt.model_state in ("refused", "failed"):  # for good: GET /admin/model says so too
                raise ApiError(503, f"the base model cannot be served: {rt.model_error}", "service_unavailable",
                               f"model_{rt.model_state}")
            raise ApiError(503, "the base model is still loading; retry shortly", "service_unavailable",
                           "model_loading", {"Retry-After": "5"})
        return rt.manager

    def state(e: AdapterEntry) -> dict:
        return manager().state_of(e).model_dump(by_alias=True)

    @r.put("/admin/adapters/{name}/{version}")
    async def put_adapter(name: str, version: str, body: AdapterLoadRequest):
        if name == rt.base_name:
            # Requests naming it would reach the base model: the adapter could never be used.
            raise ApiError(409, f"adapter name {name!r} is the base model's served name; give the adapter "
                                f"another name", "invalid_request_error", "name_conflict")
        if rt.merged is not None:
            # A LoRA over the merged weights would compute merged + it, which is not what that adapter
            # was trained over: a merged pool serves its merged adapter only.
            raise ApiError(409, f"this pool serves only {rt.merged}, merged into its base model; load {name}@{version} "
                                "on a shared pool", "invalid_request_error", "merged_pool")
        m = manager()
        entry, changed = await asyncio.to_thread(m.register, name, version, body)
        if entry.error:
            return JSONResponse(error_body(f"adapter {entry.served}: {entry.error}", "invalid_request_error",
                                           "adapter_load_failed") | {"adapter": state(entry)}, 422)
        return state(entry) | {"changed": changed}

    @r.delete("/admin/adapters/{name}/{version}")
    async def delete_adapter(name: str, version: str):
        entry = manager().unregister(name, version)
        if entry is None:
            raise ApiError(404, f"adapter {name}@{version} is not registered", "invalid_request_error",
                           "model_not_found")
        return {"name": name, "version": version, "deleted": True}

    @r.get("/admin/adapters")
    async def list_adapters():
        if rt.manager is None:
            return {"adapters": [], "instance": rt.instance}
        return rt.manager.listing(rt.instance).model_dump(by_alias=True)

    @r.get("/admin/model")
    async def model():
        return rt.model_status().model_dump(by_alias=True)

    @r.put("/admin/sync")
    async def put_sync(body: SyncState):
        rt.sync = body
        rt.pool_adapters = frozenset(body.pool_adapters)
        ok, why = rt.ready()
        return {"ready": ok, "reason": why, "instance": rt.instance}

    return r

"""Bodies of the runtime's admin API (127.0.0.1:8001), spoken by the sidecar (DESIGN §5), and the
OpenAI-shaped error body every HTTP server of lorafleet answers with (runtime, gateway, local ingress)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")


class AdapterLoadRequest(_Wire):
    """``PUT /admin/adapters/{name}/{version}``: load a verified adapter directory from the cache."""

    path: str = Field(description="Directory under the cache's adapters/ folder")
    sha256: str
    tenant: str
    weight: int = Field(100, ge=0, le=100, description="Share of requests for `name` this version takes")
    pinned: bool = False
    preload: bool = True


class AdapterState(_Wire):
    """One entry of ``GET /admin/adapters``."""

    name: str
    version: str
    sha256: str
    tenant: str
    weight: int
    pinned: bool = False
    state: Literal["registered", "host", "device", "failed"]
    error: str | None = None
    # With ``error``: "permanent" (the content is refused, loading it again cannot help; the sidecar
    # waits for another digest) or "transient" (e.g. the files could not be read; retried).
    error_kind: Literal["permanent", "transient"] | None = Field(None, alias="errorKind")
    # Requests resolved to this version since it was registered (a version registered again starts
    # at 0): the sidecar reports the adapters' request rates from it (placement by popularity).
    requests: int = 0


class AdapterList(_Wire):
    adapters: list[AdapterState]
    # Changes every time the runtime process starts: a sidecar that sees a new one loads again.
    instance: str


class ModelStatus(_Wire):
    """``GET /admin/model``: where the runtime is with its base model.

    ``refused``: the engine cannot serve this model exactly (an architecture or option it does not
    implement); ``message`` names it and what to use instead. ``failed``: loading it raised
    (``message``). Both last as long as the process: the runtime keeps answering its admin API and
    ``/readyz`` (503, with the message) rather than exiting, so the sidecar can report the reason.
    """

    state: Literal["loading", "loaded", "refused", "failed"]
    message: str = ""
    task: str | None = None
    instance: str


class SyncState(_Wire):
    """``PUT /admin/sync``: the sidecar tells the runtime how far it has got.

    The runtime's ``/readyz`` stays 503 until it has received a state with ``preload_pending == 0``
    (and its base model is loaded): a pod takes traffic only once its preload adapters are in.
    """

    routes_generation: int = Field(0, alias="routesGeneration")
    preload_pending: int = Field(0, alias="preloadPending")
    # Served name -> tenant of every adapter in the routes that opted into the base-model fallback
    # (LoRAAdapter spec.fallback: base): a request for one the runtime cannot serve (failed to load,
    # not loaded here) is answered by the base model, saying so, instead of 503/404.
    fallback: dict[str, str] = Field(default_factory=dict)
    # With placement: every served name in the pool's routes. A request for one this replica does
    # not hold now (placed on other replicas, still loading here, or just moved away) is answered
    # 503 ``adapter_elsewhere`` (retry another replica), never 404 and never the base model. The
    # list moves with the routes only, not with each load, so no unload races it.
    pool_adapters: list[str] = Field(default_factory=list, alias="poolAdapters")


def error_body(message: str, type_: str, code: str) -> dict:
    """``{"error": {"message", "type", "code"}}``, as OpenAI's API (and vLLM's) answer errors."""
    return {"error": {"message": message, "type": type_, "code": code}}

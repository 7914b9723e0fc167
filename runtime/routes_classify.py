"""The classification route: ``/v1/classify`` (each tenant's own classifier head over the base)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lorafleet.runtime.lifecycle import Runtime
from lorafleet.runtime.engine_api import Overloaded
from lorafleet.runtime.protocol import ApiError, ClassifyRequest, too_busy
from lorafleet.runtime.routes_common import unless_disconnected


async def classify(rt: Runtime, request: Request, body: ClassifyRequest) -> JSONResponse:
    """One validated ``/v1/classify`` request, answered (``ApiError`` for the documented errors). The
    route below and the admission gate's direct path (admission.py) both answer with this."""
    rt.need_task("sequence-classification")
    # No fallback here: the base model has no classifier head to answer with.
    entry = rt.resolve_request(request, body.model, fallback=False)
    if entry is None:
        raise ApiError(400, f"the base model {rt.base_name} has no classifier head; name a tenant's adapter",
                       "invalid_request_error", "no_classifier_head")
    texts = [body.input] if isinstance(body.input, str) else body.input
    limit = rt.engine.max_input_tokens()
    for i, t in enumerate(texts):
        n = rt.engine.count_tokens(t)
        if n > limit:
            raise ApiError(400, f"input[{i}] has {n} tokens; this model accepts at most {limit}. Shorten it.",
                           "invalid_request_error", "input_too_long")
    works = rt.submit(entry, texts, request=request)

    def cancel_all() -> None:
        for w in works:
            rt.engine.cancel(w)

    async def answers():
        out = []
        for w in works:
            try:
                kind, value = await w.events.get()
            except asyncio.CancelledError:
                cancel_all()
                raise
            if kind == "error" and isinstance(value, Overloaded):  # shed at the queue-delay bound
                cancel_all()
                raise too_busy(value)
            out.append((kind, value))
        return out

    results = await unless_disconnected(request, answers(), cancel_all)
    labels = entry.labels or []
    data = []
    for i, (kind, value) in enumerate(results):
        if kind == "error":
            raise ApiError(500, f"classification failed: {value}", "server_error", "internal_error")
        scores = [{"label": labels[j], "score": p} for j, p in enumerate(value)]
        top = max(scores, key=lambda s: s["score"])
        data.append({"index": i, "label": top["label"], "score": top["score"], "labels": scores})
    # A response, not a dict: FastAPI would walk the dict through jsonable_encoder first (same bytes).
    return JSONResponse({"object": "list", "model": entry.served, "data": data})


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/classify")
    async def classify_route(request: Request, body: ClassifyRequest):
        return await classify(rt, request, body)

    return r

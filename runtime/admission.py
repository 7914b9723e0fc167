"""Admission in front of the public app: a request the engine would refuse now is answered 429 before
FastAPI routes, validates or tokenises it.

Under overload most requests are refused, and on a CPU the event loop that refuses them shares the
machine (and the interpreter lock) with the model worker: a refusal that costs a full pass through the
framework (middleware, body validation, adapter resolution, tokenisation, an exception handler) takes
time from the forward passes it protects. This gate reads the body's ``model`` (one ``json.loads``),
tells the tenant without side effects (``Runtime.tenant_of``) and asks the engine
(``ServingEngine.precheck``: the scheduler's own admission rule, per tenant) whether the request's
work would be refused; if so it answers the same 429 (body, ``Retry-After``, shed and request
counters) as a refused submission. Anything it cannot tell (another route, a body it cannot read,
an unknown model, an engine without a precheck) goes on unchanged, and ``submit`` still decides.

A valid single-route request the gate has read anyway is answered by the route's own handler from
here (``DIRECT``: ``/v1/classify`` by ``routes_classify.classify``, a ``/v1/completions`` that is not
streamed by ``routes_openai.completions``), without FastAPI's routing, body validation (the same
pydantic model validates it), middleware stack and exception handlers: about two thirds of the loop's
time for each answered classification. What that handler raises as
``ApiError`` is answered as the app's handler answers it, and the request is counted as
``RequestMetrics`` counts it; a body the model refuses, or another content type, goes to the app.

It also stamps when the request reached the app (``lifecycle.ARRIVED``): the queue-delay bound counts
the time a request spent between there and the queue (waiting for the loop between steps, being
parsed, tokenised) as well. (Subtracting the loop's measured lag as well was tried: with the loop far
behind under 5x overload it refused nearly everything while the model idled.)"""

from __future__ import annotations

import json
import time

from pydantic import ValidationError
from starlette.requests import Request

from lorafleet.runtime.lifecycle import ARRIVED, Runtime, marked_start
from lorafleet.runtime.protocol import ApiError, ClassifyRequest, CompletionRequest, error_response
from lorafleet.runtime.routes_classify import classify
from lorafleet.runtime.routes_openai import completions

# Routes whose JSON body names the adapter in ``model`` (how many work items a body makes: ``_items``),
# and the pool task that serves each.
GATED = {"/v1/classify": "sequence-classification", "/v1/completions": "text-generation",
         "/v1/chat/completions": "text-generation"}
MAX_PEEK_BYTES = 1 << 20  # larger bodies are left to the route
# Answered from the gate when valid (the module's docstring): route -> (body model, handler).
DIRECT = {"/v1/classify": (ClassifyRequest, classify), "/v1/completions": (CompletionRequest, completions)}


def _json_object(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _items(path: str, body: dict) -> int:
    if path == "/v1/classify":
        inp = body.get("input")
        return len(inp) if isinstance(inp, list) and inp else 1
    return 1


class AdmissionGate:
    """Pure ASGI middleware around the public app (see the module's docstring)."""

    def __init__(self, app, rt: Runtime):
        self.app, self.rt = app, rt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.monotonic()
        path = scope["path"]
        if scope["method"] != "POST" or path not in GATED or self.rt.engine is None:
            return await self.app(scope, receive, send)
        chunks, more, first = [], True, None
        size = 0
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: the app sees it
                first = message
                break
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replay = [first] if first is not None else [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        if first is None and size <= MAX_PEEK_BYTES:
            parsed = _json_object(body)
            refusal = self._refusal(path, parsed, scope[ARRIVED]) if parsed is not None else None
            if refusal is not None:
                tenant, e = refusal
                await self._answer_429(send, e)
                m = self.rt.metrics
                m.admission_refused.labels(e.code).inc()
                m.requests.labels(tenant, path, "429").inc()
                m.latency.labels(tenant, path).observe(time.monotonic() - scope[ARRIVED])
                return
            if parsed is not None and path in DIRECT and self._direct(scope, path, parsed):
                if await self._answer(scope, path, parsed, replayed, send):
                    return
        return await self.app(scope, replayed, send)

    def _direct(self, scope, path: str, parsed: dict) -> bool:
        """Whether the gate may answer this request itself: a loaded pool of the route's task, a JSON
        body (what FastAPI reads as one: ``application/json``), a completion that is not streamed."""
        if self.rt.task != GATED[path] or not self.rt.loaded.is_set():
            return False
        if path == "/v1/completions" and parsed.get("stream"):
            return False
        for name, value in scope["headers"]:
            if name == b"content-type":
                return value.split(b";", 1)[0].strip().lower() == b"application/json"
        return False

    async def _answer(self, scope, path: str, parsed: dict, receive, send) -> bool:
        """The route's handler without the framework; False: the app answers it."""
        model, handler = DIRECT[path]
        try:
            body = model.model_validate(parsed)
        except ValidationError:
            return False  # the app's 400 names every problem
        t0 = time.perf_counter()
        status = 500

        async def marked(message):
            await send(marked_start(scope, message))

        try:
            try:
                response = await handler(self.rt, Request(scope, receive), body)
            except ApiError as e:
                response = error_response(e.status, e.message, e.type, e.code, e.headers)
            status = response.status_code
            await response(scope, receive, marked)
        finally:
            # As RequestMetrics counts a request that went through the app.
            tenant = scope.get("lorafleet_tenant", "")
            m = self.rt.metrics
            m.requests.labels(tenant, path, str(status)).inc()
            if tenant:
                m.latency.labels(tenant, path).observe(time.perf_counter() - t0)
            m.direct.labels(path).inc()
        return True

    def _refusal(self, path: str, body: dict, arrived: float):
        tenant = self.rt.tenant_of(body.get("model"))
        if tenant is None or self.rt.task != GATED[path]:
            return None
        e = self.rt.engine.precheck(tenant, _items(path, body), arrived)
        return None if e is None else (tenant, e)

    @staticmethod
    async def _answer_429(send, e) -> None:
        # What protocol.too_busy and error_response give a refused submission, without the framework.
        content = json.dumps({"error": {"message": str(e), "type": "rate_limit_exceeded", "code": e.code}},
                             ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json"),
                                (b"retry-after", str(e.retry_after).encode())]})
        await send({"type": "http.response.body", "body": content})

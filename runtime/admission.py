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

import time

from pydantic import ValidationError
from starlette.requests import Request

from lorafleet.runtime.admission_rule import GATED, MAX_PEEK_BYTES, items_of, json_object, refusal_body
from lorafleet.runtime.front import ARRIVED_HEADER, SEQ_HEADER
from lorafleet.runtime.lifecycle import ARRIVED, FRONT_SEQ, Runtime, marked_start
from lorafleet.runtime.protocol import ApiError, ClassifyRequest, CompletionRequest, error_response
from lorafleet.runtime.routes_classify import classify
from lorafleet.runtime.routes_openai import completions

# Answered from the gate when valid (the module's docstring): route -> (body model, handler).
DIRECT = {"/v1/classify": (ClassifyRequest, classify), "/v1/completions": (CompletionRequest, completions)}


def from_front(scope) -> None:
    """Read the HTTP front's private headers: when it began reading the request (CLOCK_MONOTONIC is
    one clock for every process on Linux, so the queue-delay bound counts from the front's read), and
    its number for the request (acknowledged once the work is queued: ``Runtime.submit``)."""
    for name, value in scope["headers"]:
        if name == ARRIVED_HEADER:
            try:
                scope[ARRIVED] = min(scope[ARRIVED], float(value))
            except ValueError:
                pass
        elif name == SEQ_HEADER:
            try:
                scope[FRONT_SEQ] = int(value)
            except ValueError:
                pass


class AdmissionGate:
    """Pure ASGI middleware around the public app (see the module's docstring)."""

    def __init__(self, app, rt: Runtime, behind_front: bool = False):
        # behind_front: served on the private listener of the HTTP front (front.py), whose headers are
        # trusted; on a public listener they are ignored (a client could send them).
        self.app, self.rt, self.behind_front = app, rt, behind_front

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope[ARRIVED] = time.monotonic()
        if self.behind_front:
            from_front(scope)
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
            parsed = json_object(body)
            refusal = self._refusal(path, parsed, scope[ARRIVED]) if parsed is not None else None
            if refusal is not None:
                tenant, e = refusal
                await self._answer_429(send, e)
                self.rt.metrics.refused_at_admission(tenant, path, e.code, time.monotonic() - scope[ARRIVED])
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
        e = self.rt.engine.precheck(tenant, items_of(path, body), arrived)
        return None if e is None else (tenant, e)

    @staticmethod
    async def _answer_429(send, e) -> None:
        # What protocol.too_busy and error_response give a refused submission, without the framework.
        content = refusal_body(e)
        await send({"type": "http.response.start", "status": 429,
                    "headers": [(b"content-length", str(len(content)).encode()),
                                (b"content-type", b"application/json"),
                                (b"retry-after", str(e.retry_after).encode())]})
        await send({"type": "http.response.body", "body": content})

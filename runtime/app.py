"""The runtime's three ASGI apps: the public one (OpenAI, TGI and classification routers, health,
readiness), the metrics one (Prometheus ``/metrics`` alone, on its own port) and the admin one
(127.0.0.1 only). Handlers live in the ``routes_*`` modules;
the ``Runtime`` they serve is in lifecycle.py, the servers in server.py."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.runtime import routes_admin, routes_classify, routes_images, routes_openai, routes_tgi
from lorafleet.runtime.lifecycle import Runtime, marked_start
from lorafleet.runtime.protocol import ApiError, error_response

UNMETERED = ("/healthz", "/readyz")


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return error_response(e.status, e.message, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError):
        # 400, as the OpenAI API and vLLM answer a body they cannot take; every problem named.
        problems, unknown = [], []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            if err.get("type") == "extra_forbidden":
                unknown.append(loc)
            else:
                problems.append(f"{loc or 'body'}: {err.get('msg')}")
        if unknown:
            problems.insert(0, "unknown field" + ("s " if len(unknown) > 1 else " ")
                            + ", ".join(f"`{u}`" for u in unknown) + " (not part of the API this route implements)")
        code = "unknown_field" if unknown and len(problems) == 1 else "invalid_body"
        return error_response(400, f"invalid request body: {'; '.join(problems)}", "invalid_request_error", code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error",
                              "not_found" if e.status_code == 404 else "http_error")


class RequestMetrics:
    """Counts requests and their latency by tenant, route template and status. A pure ASGI middleware:
    it never buffers a body, and a path nobody routes is counted as ``unmatched`` (a raw path would
    grow a label per URL anyone sends)."""

    def __init__(self, app, rt: Runtime):
        self.app, self.rt = app, rt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(marked_start(scope, message))

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            if endpoint not in UNMETERED:
                tenant = scope.get("lorafleet_tenant", "")
                m = self.rt.metrics
                m.requests.labels(tenant, endpoint, str(status[0])).inc()
                if tenant:
                    m.latency.labels(tenant, endpoint).observe(time.perf_counter() - t0)


def public_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="lorafleet runtime", docs_url=None, redoc_url=None)
    install_errors(app)
    app.add_middleware(RequestMetrics, rt=rt)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "instance": rt.instance}

    @app.get("/readyz")
    async def readyz():
        ok, why = rt.ready()
        if not ok:
            return error_response(503, f"not ready: {why}", "service_unavailable", "not_ready")
        return {"status": "ready"}

    app.include_router(routes_openai.router(rt))
    app.include_router(routes_tgi.router(rt))
    app.include_router(routes_classify.router(rt))
    app.include_router(routes_images.router(rt))
    return app


def metrics_app(rt: Runtime) -> FastAPI:
    """``/metrics`` on a port of its own: scrapers reach it on the pod IP, while the public port (which the
    gateway and the ingress reach) answers 404 for it, as tenants' names are labels there."""
    app = FastAPI(title="lorafleet runtime metrics", docs_url=None, redoc_url=None, openapi_url=None)
    install_errors(app)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def admin_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="lorafleet runtime admin", docs_url=None, redoc_url=None)
    install_errors(app)
    app.include_router(routes_admin.router(rt))
    return app

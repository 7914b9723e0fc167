"""The gateway's HTTP server: authenticate the tenant, check the adapter is its own, admit it within its
limits, pick a replica (``routing``) and stream the replica's answer through, retrying another replica
when one fails before it answered."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import aiohttp
from aiohttp import web

from lorafleet.contracts.kubeio import NotSynced
from lorafleet.contracts.runtime_api import error_body

from .metrics import GatewayMetrics
from .routing import Choice, AffinityRouter, Replica, RoundRobinRouter
from .tenants import Admission, Directory, TenantLimits

log = logging.getLogger("lorafleet.gateway")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length", "authorization"}
# Inference endpoints and where each names its adapter.
MODEL_IN_BODY = {"/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/images/generations"}
TGI_PATHS = {"/generate", "/generate_stream", "/"}
HOSTED_PREFIX = "/models/"  # text-to-image pools: the hosted API's /models/{name}, adapter also in `lora`
ANONYMOUS = "_anonymous"
REFUSAL_MEMORY_S = 5.0  # the longest a pod's 429 steers a tenant's requests to other pods first


class Refusals:
    """Which pods answered a tenant 429 (overloaded, or the tenant over its share there) and until when
    (their ``Retry-After``, at most ``REFUSAL_MEMORY_S``): such a pod is tried after the others."""

    def __init__(self):
        self.until: dict[tuple[str, str], float] = {}

    def refused(self, replica: str, tenant: str, retry_after: str | None, now: float) -> None:
        try:
            seconds = float(retry_after) if retry_after is not None else 1.0
        except ValueError:
            seconds = 1.0
        self.until[(replica, tenant)] = now + min(max(seconds, 0.0), REFUSAL_MEMORY_S)
        if len(self.until) > 10_000:  # forget what has passed
            self.until = {k: t for k, t in self.until.items() if t > now}

    def refusing(self, replica: str, tenant: str, now: float) -> bool:
        t = self.until.get((replica, tenant))
        if t is None:
            return False
        if t <= now:
            del self.until[(replica, tenant)]
            return False
        return True

    def order(self, replicas: list, tenant: str, now: float) -> list:
        """``replicas`` with those refusing ``tenant`` moved to the end (each group in its order)."""
        refusing = [r for r in replicas if self.refusing(r.name, tenant, now)]
        return [r for r in replicas if r not in refusing] + refusing if refusing else replicas


def error(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> web.Response:
    """OpenAI-shaped, like the runtime's errors."""
    return web.json_response(error_body(message, type_, code), status=status, headers=headers)


async def send(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> aiohttp.ClientResponse:
    """``session.request``, sent once more where a kept-alive connection turned out closed before any
    answer: the pod's server dropped it as idle just as it was reused (uvicorn's keep-alive timeout
    against the client's pool). The pod is there; treating it as failed would send the request to a
    pod that may not hold the adapter, or mark a healthy replica down. No connection at all (refused,
    unreachable) is raised as it came."""
    try:
        return await session.request(method, url, **kwargs)
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
        if isinstance(e, aiohttp.ClientConnectorError):
            raise
        log.info("%s %s: a kept-alive connection closed before answering (%s); sending again",
                 method, url, type(e).__name__)
        return await session.request(method, url, **kwargs)


def requested_adapter(path: str, body: dict) -> str | None:
    """The adapter a request names: ``model`` (OpenAI, classify) or ``parameters.adapter_id`` (TGI)."""
    if path in MODEL_IN_BODY:
        model = body.get("model")
        return model if isinstance(model, str) and model else None
    params = body.get("parameters")
    adapter = params.get("adapter_id") if isinstance(params, dict) else None
    return adapter if isinstance(adapter, str) and adapter else None


def requested_adapters(path: str, body: dict, headers) -> list[str]:
    """Every adapter name a request carries. A text-to-image pool answers ``/`` and ``/models/{name}``
    with the adapter of the ``lora`` header (or of the path), a text pool ``/`` with
    ``parameters.adapter_id``: the tenant must own each name given, whichever the pool reads."""
    names = [a] if (a := requested_adapter(path, body)) else []
    if path == "/" or path.startswith(HOSTED_PREFIX):
        lora = headers.get("lora")
        if lora:
            names.append(lora)
        if path.startswith(HOSTED_PREFIX) and len(path) > len(HOSTED_PREFIX):
            names.append(path[len(HOSTED_PREFIX):])
    return names


def bearer(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gateway:
    """``pods``: returns pod name -> address of the pool's ready pods (blocking; run in a thread).
    ``directory``: returns the current tenant ``Directory`` (blocking), or None to run without tenant
    keys (benchmarks and single-tenant development only: every caller is one anonymous tenant).
    ``gateways``: returns how many gateway replicas of the pool are Ready (blocking); each replica
    enforces 1/N of every tenant's limits. None: this gateway alone (N = 1).
    ``changes``: subscribes a listener ``(what)`` that the sources call (from any thread) when
    ``pods``, ``gateways`` or the ``directory`` changed (``kube.KubeView.subscribe``): the view is read
    again at once, and otherwise every ``poll_s``. Sources that are not ready yet raise
    ``kubeio.NotSynced``: the gateway stays unready until they answer."""

    def __init__(self, pods: Callable[[], dict[str, str]], directory: Callable[[], Directory] | None,
                 policy: str = "affinity", spill_inflight: int = 8, retries: int = 2, poll_s: float = 1.0,
                 replica_poll_s: float = 0.5, metrics: GatewayMetrics | None = None,
                 gateways: Callable[[], int] | None = None, pool: str = "",
                 pool_pods: Callable[[str], dict[str, str]] | None = None,
                 changes: Callable[[Callable[[str], None]], None] | None = None):
        self.pods_source, self.directory_source, self.gateways_source = pods, directory, gateways
        self.changes = changes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: dict[str, asyncio.Event] = {}
        self.router = AffinityRouter(spill_inflight) if policy == "affinity" else RoundRobinRouter()
        self.retries, self.poll_s, self.replica_poll_s = retries, poll_s, replica_poll_s
        self.metrics = metrics or GatewayMetrics()
        self.replicas: dict[str, Replica] = {}
        # Merged pools of this pool's adapters (``Directory.merged``): pool -> its Ready replicas,
        # listed with ``pool_pods(pool)``; an adapter's requests go there while one is healthy.
        self.pool, self.pool_pods_source = pool, pool_pods
        self.merged_replicas: dict[str, dict[str, Replica]] = {}
        self.directory = Directory()
        self.directory_loaded = directory is None
        self.admission = Admission()
        self.refusals = Refusals()
        self.gateways = 1  # Ready gateway replicas of the pool, at least 1: limits are divided by it
        self.gateways_loaded = gateways is None
        self.session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._kube_lock = asyncio.Lock()

    # ------------------------------------------------------------------------------ fleet view

    async def refresh_pods(self) -> None:
        async with self._kube_lock:  # one API thread at a time (lightkube decoders, see kube.py)
            pods = await asyncio.to_thread(self.pods_source)
        new = self._update(self.replicas, pods, self.pool)
        wanted = {p for p, _ in self.directory.merged.values()} if self.pool_pods_source else set()
        for gone in set(self.merged_replicas) - wanted:
            del self.merged_replicas[gone]
        for pool in sorted(wanted):
            async with self._kube_lock:
                found = await asyncio.to_thread(self.pool_pods_source, pool)
            new += self._update(self.merged_replicas.setdefault(pool, {}), found, pool)
        if new and self.session is not None:  # what a new replica holds, before the next round
            await asyncio.gather(*(self.poll_replica(r) for r in new))

    @staticmethod
    def _update(replicas: dict[str, Replica], pods: dict[str, str], pool: str) -> list[Replica]:
        """Replicas as ``pods`` says; returns those new or at a new address."""
        new = []
        for name in list(replicas):
            if name not in pods:  # requests still open on it finish on their own Replica object
                del replicas[name]
        for name, url in pods.items():
            r = replicas.get(name)
            if r is None:
                r = replicas[name] = Replica(name, url, pool=pool)
                new.append(r)
            elif r.url != url:  # same pod, new address (the local stack restarted it): forget what it held
                r.url, r.adapters = url, {}
                new.append(r)
        return new

    async def poll_replica(self, r: Replica) -> None:
        """What the replica holds, from its ``GET /v1/models`` (entries' versions carry their tier)."""
        try:
            async with self.session.get(f"{r.url}/v1/models", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status)
                body = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            if r.healthy:
                log.warning("replica %s (%s) did not answer GET /v1/models: %s", r.name, r.url, e)
            r.healthy = False
            return
        held: dict[str, str] = {}
        for m in body.get("data", []):
            if "parent" not in m:
                r.base, r.task = m.get("id"), m.get("task")
                continue
            states = [v.get("state", "registered") for v in m.get("versions", [])] or ["registered"]
            held[m["id"]] = min(states, key=lambda s: {"device": 0, "host": 1, "registered": 2}.get(s, 3))
        r.adapters, r.healthy = held, True

    async def refresh_directory(self) -> None:
        async with self._kube_lock:
            d = await asyncio.to_thread(self.directory_source)
        if d is self.directory:
            return
        for p in set(d.problems) - set(self.directory.problems):
            log.warning("%s", p)
        if d.merged != self.directory.merged and "pods" in self._wake:
            self._wake["pods"].set()  # another merged pool to find the pods of
        self.directory, self.directory_loaded = d, True

    async def refresh_gateways(self) -> None:
        async with self._kube_lock:
            # No Ready gateway pod visible (run by hand, or this pod not Ready yet and no peer): itself.
            n = max(1, await asyncio.to_thread(self.gateways_source))
        if n != self.gateways:
            log.info("the pool has %d Ready gateway replicas (was %d): this one now admits 1/%d of each "
                     "tenant's rate limit and burst and ceil(1/%d) of its maxConcurrency", n, self.gateways, n, n)
            self.gateways = n
            self.metrics.gateways.set(n)
        self.gateways_loaded = True

    def _changed(self, what: str) -> None:
        """A source's change listener (any thread): wake the loop that reads it."""
        loop, wake = self._loop, self._wake.get(what)
        if loop is None or wake is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop closed meanwhile (shutting down)
            pass

    async def _every(self, seconds: float, step, what: str, wake: asyncio.Event | None = None) -> None:
        """``step`` now, then whenever ``wake`` is set, and every ``seconds`` at the latest."""
        while True:
            if wake is not None:
                wake.clear()  # before the step: a change during it runs the step again
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except NotSynced as e:
                log.debug("gateway: %s not read yet: %s", what, e)
            except Exception:
                log.exception("gateway: refreshing %s failed; keeping the last view", what)
            if wake is None:
                await asyncio.sleep(seconds)
            else:
                try:
                    await asyncio.wait_for(wake.wait(), seconds)
                except asyncio.TimeoutError:
                    pass

    async def _replica_loop(self) -> None:
        while True:
            try:
                merged = [r for reps in self.merged_replicas.values() for r in reps.values()]
                await asyncio.gather(*(self.poll_replica(r) for r in list(self.replicas.values()) + merged))
                healthy = sum(r.healthy for r in self.replicas.values())
                self.metrics.replicas.labels("true").set(healthy)
                self.metrics.replicas.labels("false").set(len(self.replicas) - healthy)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway: refreshing the pool's replicas failed; keeping the last view")
            await asyncio.sleep(self.replica_poll_s)

    # ------------------------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        """The public API (what the Service and Ingress expose). It says nothing about other tenants or
        the pods: metrics and the detailed view are on ``ops_app``, a port of their own."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz_public)
        app.router.add_get("/v1/models", self.models)
        for path in sorted(MODEL_IN_BODY | TGI_PATHS):
            app.router.add_post(path, self.infer)
        app.router.add_post(HOSTED_PREFIX + "{name:.+}", self.infer)
        app.router.add_route("*", "/{tail:.*}", self.not_found)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    def ops_app(self) -> web.Application:
        """Prometheus ``/metrics`` and ``/readyz`` with each pod's view and tenant problems, for the
        cluster's scrapers and operators (tenant names are labels there: keep this port internal)."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_endpoint)
        return app

    async def _startup(self, _app) -> None:
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=3),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
        self._loop = asyncio.get_running_loop()
        self._wake = {w: asyncio.Event() for w in ("pods", "directory", "gateways")}
        if self.changes is not None:
            self.changes(self._changed)
        self._tasks.append(asyncio.create_task(self._every(self.poll_s, self.refresh_pods, "the pool's pods",
                                                           self._wake["pods"])))
        self._tasks.append(asyncio.create_task(self._replica_loop()))
        if self.directory_source is not None:
            self._tasks.append(asyncio.create_task(self._every(self.poll_s, self.refresh_directory, "tenants",
                                                               self._wake["directory"])))
        if self.gateways_source is not None:
            self._tasks.append(asyncio.create_task(self._every(self.poll_s, self.refresh_gateways,
                                                               "the pool's gateway replicas",
                                                               self._wake["gateways"])))

    async def _cleanup(self, _app) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.session.close()

    async def healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        view = {r.name: {"url": r.url, "healthy": r.healthy, "inflight": r.inflight, "adapters": len(r.adapters),
                         "device": sorted(a for a, s in r.adapters.items() if s == "device")}
                for r in self.replicas.values()}
        why = self.not_ready_because()
        if why:
            return web.json_response(error_body(f"not ready: {why}", "service_unavailable", "not_ready")
                                     | {"replicas": view, "gatewayReplicas": self.gateways}, status=503)
        return web.json_response({"status": "ready", "replicas": view, "gatewayReplicas": self.gateways,
                                  "tenants": len(self.directory.limits), "problems": self.directory.problems})

    def not_ready_because(self) -> str | None:
        if not self.directory_loaded:
            return "tenants not read yet"
        if not self.gateways_loaded:
            # Until then it would admit each tenant's whole limit on top of its peers' shares.
            return "the pool's gateway replicas not counted yet"
        if not any(r.healthy for r in self.replicas.values()):
            return "no ready replica answered yet"
        return None

    async def readyz_public(self, _request: web.Request) -> web.Response:
        why = self.not_ready_because()
        if why is None:
            return web.json_response({"status": "ready"})
        return error(503, f"not ready: {why}", "service_unavailable", "not_ready", {"Retry-After": "1"})

    async def metrics_endpoint(self, _request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(self, request: web.Request) -> web.Response:
        return error(404, f"{request.method} {request.path} is not an endpoint of the lorafleet gateway",
                     "invalid_request_error", "not_found")

    def authenticate(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        if self.directory_source is None:
            return ANONYMOUS, None
        key = bearer(request)
        if key is None:
            self.metrics.rejected.labels("", "missing_api_key").inc()
            return None, error(401, "send your tenant's API key as `Authorization: Bearer <key>`",
                               "authentication_error", "missing_api_key", {"WWW-Authenticate": "Bearer"})
        tenant = self.directory.tenant_of_key(key)
        if tenant is None:
            self.metrics.rejected.labels("", "invalid_api_key").inc()
            return None, error(401, "the API key is not valid (unknown, or rotated out of its tenant's Secret)",
                               "authentication_error", "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        return tenant, None

    def base_names(self) -> set[str]:
        return {r.base for r in self.replicas.values() if r.base}

    async def models(self, request: web.Request) -> web.Response:
        tenant, refused = self.authenticate(request)
        if refused is not None:
            return refused
        mine = None if tenant == ANONYMOUS else self.directory.adapters_of(tenant)
        created = int(time.time())
        data, seen = [], set()
        for r in sorted(self.replicas.values(), key=lambda r: r.name):
            if r.base and r.base not in seen:
                seen.add(r.base)
                data.append({"id": r.base, "object": "model", "created": created, "owned_by": "lorafleet",
                             "task": r.task})
        adapters: dict[str, dict] = {}
        for r in self.replicas.values():
            if not r.healthy:
                continue
            for name in r.adapters:
                if mine is None or name in mine:
                    adapters.setdefault(name, {"id": name, "object": "model", "created": created,
                                               "owned_by": tenant if mine is not None else
                                               self.directory.adapters.get(name, "lorafleet"),
                                               "parent": r.base, "task": r.task, "replicas": 0})["replicas"] += 1
        data.extend(adapters[n] for n in sorted(adapters))
        return web.json_response({"object": "list", "data": data})

    async def infer(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        tenant, refused = self.authenticate(request)
        if refused is not None:
            return refused
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as e:
            return error(422, f"the request body is not valid JSON: {e}", "invalid_request_error", "invalid_json")
        names = requested_adapters(request.path, body, request.headers)
        bases = self.base_names()
        adapters = [n for n in names if n not in bases]
        adapter = adapters[0] if adapters else (names[0] if names else None)
        for name in adapters if tenant != ANONYMOUS else ():
            owner = self.directory.owner(name)
            if owner is None:
                self.metrics.rejected.labels(tenant, "model_not_found").inc()
                return error(404, f"The model '{name}' does not exist in this pool; GET /v1/models lists "
                             "the adapters your key can use", "invalid_request_error", "model_not_found")
            if owner != tenant:
                self.metrics.rejected.labels(tenant, "adapter_forbidden").inc()
                return error(403, f"the API key of tenant {tenant} may not use model '{name}': it is not one "
                             f"of tenant {tenant}'s adapters", "permission_error", "adapter_forbidden")
        limits = self.directory.limits.get(tenant, TenantLimits())
        refusal = self.admission.admit(tenant, limits, replicas=self.gateways)
        if refusal is not None:
            code, message, retry_after = refusal
            self.metrics.rejected.labels(tenant, code).inc()
            return error(429, message, "rate_limit_exceeded", code, {"Retry-After": str(retry_after)})
        try:
            stream = request.path == "/generate_stream" or body.get("stream") is True
            return await self.forward(request, raw, tenant, adapter, stream, t0)
        finally:
            self.admission.release(tenant)

    async def forward(self, request: web.Request, raw: bytes, tenant: str, adapter: str | None, stream: bool,
                      t0: float) -> web.StreamResponse:
        from lorafleet.contracts.names import split_versioned

        choice = self.router.choose(split_versioned(adapter)[0] if adapter else None, list(self.replicas.values()))
        target = self.directory.merged_target(adapter) if adapter else None
        merged = [r for r in self.merged_replicas.get(target[0], {}).values() if r.healthy] if target else []
        if merged:
            # The merged pool answers at the base's speed; the shared pool's replicas stay behind it as
            # the retries (a merged pod failing or rolling costs the request nothing).
            choice = Choice(sorted(merged, key=lambda r: (r.inflight, r.name)) + choice.order, "merged")
        if choice.order:
            first = choice.order[0]
            self.metrics.pool_choice.labels(tenant, first.pool or self.pool,
                                            "merged" if first.pool in self.merged_replicas else "shared").inc()
        if not choice.order:
            self.metrics.requests.labels(tenant, "", "503").inc()
            return error(503, "the pool has no ready replica; retry shortly", "service_unavailable",
                         "no_ready_replicas", {"Retry-After": "1"})
        # accept-encoding stays behind: the client session decompresses, so bodies pass on as identity.
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP | {"accept-encoding"}}
        headers["X-Lorafleet-Tenant"] = tenant
        last = "no replica tried"
        # A pod that answered this tenant 429 moments ago goes last; a 429 spills the request to the next
        # pod with room, and only when none has room does the client get the 429 (with its Retry-After).
        order = self.refusals.order(choice.order, tenant, time.monotonic())
        overloaded: tuple[Replica, bytes, dict] | None = None
        attempt, prev = -1, None
        for r in order:
            if attempt >= self.retries:
                break
            if overloaded is not None and not self.has_room(r, tenant):
                continue
            attempt += 1
            if attempt:
                if overloaded is None:
                    self.metrics.retries.labels(prev.name).inc()
            reason = choice.reason if attempt == 0 else ("overloaded" if overloaded is not None else "retry")
            self.metrics.routed.labels(r.name, reason).inc()
            prev = r
            r.inflight += 1
            self.metrics.inflight.labels(r.name).set(r.inflight)
            try:
                upstream = await send(self.session, request.method, r.url + str(request.rel_url), data=raw,
                                      headers=headers)
                try:
                    out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                    out_headers["X-Lorafleet-Replica"] = r.name
                    out_headers["X-Lorafleet-Pool"] = r.pool or self.pool
                    if not stream or upstream.status != 200:
                        # Read it all before answering: a replica dying mid-body is retried elsewhere.
                        data = await upstream.read()
                        retry_here = upstream.status in (502, 503, 504) or (
                            # A merged pod of another version (rolling) does not hold a pinned one.
                            upstream.status == 404 and r.pool in self.merged_replicas)
                        if retry_here and attempt < min(self.retries, len(order) - 1):
                            last = f"{r.name} answered {upstream.status}"
                            continue
                        if upstream.status == 429:
                            self.refusals.refused(r.name, tenant, upstream.headers.get("Retry-After"),
                                                  time.monotonic())
                            self.metrics.overloaded.labels(r.name).inc()
                            overloaded = (r, data, out_headers)
                            continue
                        self.metrics.requests.labels(tenant, r.name, str(upstream.status)).inc()
                        self.metrics.latency.labels(tenant).observe(time.perf_counter() - t0)
                        return web.Response(body=data, status=upstream.status, headers=out_headers)
                    # A stream: the first chunk still may be retried; after it, bytes are the client's.
                    first = await upstream.content.readany()
                    resp = web.StreamResponse(status=upstream.status, headers=out_headers)
                    await resp.prepare(request)
                    await resp.write(first)
                    try:
                        async for chunk in upstream.content.iter_any():
                            await resp.write(chunk)
                    except ConnectionResetError:  # the client went away: nothing left to send it
                        self.metrics.requests.labels(tenant, r.name, "499").inc()
                        return resp
                    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                        # Never replay a stream that reached the client: end it with an error event.
                        log.warning("replica %s broke a stream of tenant %s: %s", r.name, tenant, e)
                        r.healthy = False
                        msg = error_body(f"the replica serving this stream failed: {e}", "server_error",
                                         "upstream_failed")
                        await resp.write(f"data: {json.dumps(msg)}\n\n".encode())
                        self.metrics.requests.labels(tenant, r.name, "502").inc()
                        return resp
                    await resp.write_eof()
                    self.metrics.requests.labels(tenant, r.name, "200").inc()
                    self.metrics.latency.labels(tenant).observe(time.perf_counter() - t0)
                    return resp
                finally:
                    upstream.release()
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                # It failed before the client saw a byte: mark it down until its next poll, try the next.
                log.warning("replica %s failed a request of tenant %s before answering (%s); trying another",
                            r.name, tenant, e or type(e).__name__)
                r.healthy = False
                last = f"{r.name}: {e or type(e).__name__}"
            finally:
                r.inflight -= 1
                self.metrics.inflight.labels(r.name).set(r.inflight)
        if overloaded is not None:  # every pod with room was tried: the last 429 goes to the client as it came
            r, data, out_headers = overloaded
            self.metrics.requests.labels(tenant, r.name, "429").inc()
            self.metrics.latency.labels(tenant).observe(time.perf_counter() - t0)
            return web.Response(body=data, status=429, headers=out_headers)
        self.metrics.requests.labels(tenant, "", "502").inc()
        return error(502, f"no replica of the pool answered ({last}); retry shortly", "service_unavailable",
                     "upstream_unreachable", {"Retry-After": "1"})

    def has_room(self, r: Replica, tenant: str) -> bool:
        """Whether ``r`` may take a request another pod refused with 429: healthy, below the spill
        threshold, and not itself refusing this tenant."""
        limit = getattr(self.router, "spill_inflight", None)
        return r.healthy and (limit is None or r.inflight < limit) and \
            not self.refusals.refusing(r.name, tenant, time.monotonic())

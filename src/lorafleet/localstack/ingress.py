"""The local stack's ingress: an HTTP reverse proxy on a localhost port that routes by the cluster's
Ingress objects (host, path prefix) to the Service's ready pods, which the pod runner runs as local
processes (their ports are in the pods' ``lorafleet.io/local-ports`` annotation). A request without a
matching host goes to the default backend (the demo pool), so ``curl $LORAFLEET_URL/...`` works.
A virtual-host port treats every request as sent to one host (``--vhost-port 8081=pool.example``), so a
client reaches that host's Ingress rules without setting a Host header. Responses stream through (SSE).
A request for an adapter that the pool's routes place on some replicas only goes to those replicas
(those whose sync report shows it loaded first), as the gateway's choice does. A request for an
adapter that a merged pool serves (its routes entry's ``merged``) goes to that pool's Ready pods while
it has any, the shared pool's behind them as retries; every answer from a pool names it in
``X-Lorafleet-Pool``, and ``lorafleet_ingress_pool_choice_total`` (on the metrics port) counts them."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from lightkube import Client
from lightkube.resources.core_v1 import ConfigMap, Pod, Service
from lightkube.resources.networking_v1 import Ingress
from prometheus_client import CollectorRegistry, Counter, generate_latest

from lorafleet.contracts import names
from lorafleet.contracts.kubeio import pod_ready
from lorafleet.contracts.routes import RouteEntry, RoutesTable, SyncReport
from lorafleet.contracts.runtime_api import error_body
from lorafleet.gateway.server import requested_adapters, send

from .podrunner import LOCAL_PORTS_ANNOTATION, warm_decoders

log = logging.getLogger("lorafleet.ingress")
RESNAPSHOT_AFTER_S = 0.05  # the soonest a request looks at the pods again itself (handle)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


@dataclass(frozen=True)
class Endpoint:
    pod: str
    port: int
    report: SyncReport | None
    pool: str | None = None  # the pool whose pod it is (None: another Service's, e.g. a gateway)


@dataclass(frozen=True)
class Rule:
    host: str | None
    path: str
    namespace: str
    service: str
    port: int | str


class LocalIngress:
    def __init__(self, client: Client, default_backend: tuple[str, str] | None = None, refresh: float = 0.5):
        self.client = client
        self.default_backend = default_backend
        self.refresh = refresh
        self.rules: list[Rule] = []
        self.endpoints: dict[tuple[str, str], list[Endpoint]] = {}  # (ns, service) -> its ready pods
        self.routes: dict[tuple[str, str], RoutesTable] = {}  # (ns, service) -> its pool's routes
        # (ns, service) -> served name -> (merged pool's Service, the version it merges)
        self.merged: dict[tuple[str, str], dict[str, tuple[tuple[str, str], str]]] = {}
        self.pools: dict[tuple[str, str], str] = {}  # (ns, service) -> the pool it selects
        self._rr = itertools.count()
        self._snapshot_at = float("-inf")  # when the last completed routing snapshot began (time.monotonic)
        self.registry = CollectorRegistry()
        self.pool_choice = Counter(
            "lorafleet_ingress_pool_choice", "Answers to requests for an adapter a merged pool serves, by the pool "
            "that answered: role merged (while it has Ready pods) or shared (the adapter's spec.pool)",
            ["namespace", "adapter", "pool", "role"], registry=self.registry)
        warm_decoders(Ingress, Service, Pod, ConfigMap)

    # --------------------------------------------------------------------------- routing table

    def _snapshot(self) -> tuple[list[Rule], dict[tuple[str, str], list[Endpoint]]]:
        began = time.monotonic()
        rules: list[Rule] = []
        for ing in self.client.list(Ingress, namespace="*"):
            for r in ing.spec.rules or []:
                for p in (r.http.paths if r.http else []) or []:
                    svc = p.backend.service
                    if svc is None:
                        continue
                    rules.append(Rule(r.host, p.path or "/", ing.metadata.namespace, svc.name,
                                      svc.port.number or svc.port.name))
        rules.sort(key=lambda r: (r.host is None, -len(r.path)))
        wanted = {(r.namespace, r.service) for r in rules}
        if self.default_backend:
            wanted.add(self.default_backend)
        endpoints: dict[tuple[str, str], list[Endpoint]] = {}
        routes: dict[tuple[str, str], RoutesTable] = {}
        merged: dict[tuple[str, str], dict[str, tuple[tuple[str, str], str]]] = {}
        pools: dict[tuple[str, str], str] = {}
        pending = sorted(wanted)
        while pending:
            ns, name = pending.pop()
            if (ns, name) in endpoints:
                continue
            try:
                svc = self.client.get(Service, name, namespace=ns)
            except Exception:
                continue
            pool = (svc.spec.selector or {}).get(names.LABEL_POOL)
            if pool:
                pools[(ns, name)] = pool
            target = (svc.spec.ports or [None])[0]
            target_port = str(target.targetPort if target and target.targetPort is not None else 8000)
            ports = []
            for pod in self.client.list(Pod, namespace=ns, labels=svc.spec.selector or {}):
                local = json.loads((pod.metadata.annotations or {}).get(LOCAL_PORTS_ANNOTATION, "{}"))
                number = target_port if target_port.isdigit() else _named_port(pod, target_port)
                if pod_ready(pod) and number in local:
                    report = SyncReport.from_annotation((pod.metadata.annotations or {}).get(names.SYNC_ANNOTATION))
                    ports.append(Endpoint(pod.metadata.name, int(local[number]), report, pool))
            endpoints[(ns, name)] = sorted(ports, key=lambda e: e.port)
            if pool:  # a pool's own Service: where its routes place each adapter, which merged pools serve
                cms = self.client.list(ConfigMap, namespace=ns, labels={names.LABEL_ROUTES_FOR: pool})
                table = RoutesTable.merge_complete(pool, [RoutesTable.from_json(cm.data["routes.json"])
                                                          for cm in cms if (cm.data or {}).get("routes.json")])
                if table is not None and table.placed_on is not None:
                    routes[(ns, name)] = table
                for served, entry in (table.adapters.items() if table is not None else ()):
                    if entry.merged is not None:
                        key = (ns, names.service_name(entry.merged.pool))
                        merged.setdefault((ns, name), {})[served] = (key, entry.merged.version)
                        pending.append(key)  # its Ready pods are looked up too
        self.routes, self.merged, self.pools = routes, merged, pools
        self._snapshot_at = began
        return rules, endpoints

    def merged_first(self, backend: tuple[str, str], endpoints: list[Endpoint], wanted: str | None) -> list[Endpoint]:
        """``endpoints`` (the shared pool's, in order) behind the Ready pods of the merged pool serving
        ``wanted`` (``name``, or ``name@`` the version it merges), if any: the gateway's rule."""
        if not wanted:
            return endpoints
        name, version = names.split_versioned(wanted)
        found = self.merged.get(backend, {}).get(name)
        if found is None or version not in (None, found[1]):
            return endpoints
        pods = list(self.endpoints.get(found[0]) or [])
        if not pods:
            return endpoints
        start = next(self._rr) % len(pods)
        return pods[start:] + pods[:start] + endpoints

    def _order(self, backend: tuple[str, str], wanted: str | None) -> list[Endpoint]:
        """The pods to try, in order: round robin over the Service's ready pods, the holders of a
        placed adapter first, a merged pool's Ready pods before all of them."""
        ports = self.endpoints.get(backend) or []
        if ports:
            start = next(self._rr) % len(ports)
            ports = self.holders_first(backend, ports[start:] + ports[:start], wanted)
        return self.merged_first(backend, ports, wanted)

    def requested(self, backend: tuple[str, str], body: bytes, path: str, headers) -> str | None:
        """The adapter (``name`` or ``name@version``) a request for a pool's Service names, if any."""
        if not body or (backend not in self.routes and backend not in self.merged):
            return None
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        wanted = requested_adapters(path, doc if isinstance(doc, dict) else {}, headers)
        return wanted[0] if wanted else None

    def _placed(self, backend: tuple[str, str], wanted: str | None) -> RouteEntry | None:
        """The routes entry of ``wanted`` where the routes place it on some replicas (None: on all, or
        not an adapter of a pool with placement)."""
        table = self.routes.get(backend)
        if table is None or not wanted:
            return None
        entry = table.adapters.get(names.split_versioned(wanted)[0])
        return entry if entry is not None and entry.holders is not None else None

    def _holders_not_ready(self, backend: tuple[str, str], wanted: str | None) -> bool:
        """Whether ``wanted`` is placed on some replicas of which none is among the ready pods seen."""
        entry = self._placed(backend, wanted)
        return bool(entry is not None and entry.holders
                    and not any(entry.held_by(e.pod) for e in self.endpoints.get(backend) or []))

    def holders_first(self, backend: tuple[str, str], endpoints: list[Endpoint], wanted: str | None) -> list[Endpoint]:
        """The pods to try for this request, in order: for an adapter placed on some replicas, those
        replicas (the ones that report it loaded first), then the others, which answer 503 unless this
        table is a refresh behind a move; otherwise every ready pod."""
        entry = self._placed(backend, wanted)
        if entry is None or wanted is None:
            return endpoints
        served = names.split_versioned(wanted)[0]
        held = [e for e in endpoints if entry.held_by(e.pod)]
        loaded = [e for e in held if e.report is not None and any(
            e.report.has_loaded(served, v.version, max(v.since, entry.placed_since(e.pod) or 0))
            for v in entry.serving())]
        return loaded + [e for e in held if e not in loaded] + [e for e in endpoints if e not in held]

    async def _look(self) -> None:
        """A routing snapshot taken now (a failure is logged; the last one stays)."""
        try:
            self.rules, self.endpoints = await asyncio.to_thread(self._snapshot)
        except Exception:
            log.exception("ingress refresh failed")

    async def refresh_forever(self) -> None:
        while True:
            await self._look()
            await asyncio.sleep(self.refresh)

    def backend_for(self, host: str | None, path: str, default: bool = True) -> tuple[str, str] | None:
        host = (host or "").split(":")[0] or None
        for r in self.rules:
            if r.host is not None and r.host == host and path.startswith(r.path):
                return (r.namespace, r.service)
        return self.default_backend if default else None

    # ---------------------------------------------------------------------------------- proxy

    async def handle(self, request: web.Request, host: str | None = None) -> web.StreamResponse:
        # A virtual-host port never falls back to the default backend: with its host's Ingress gone,
        # a request must not reach the pool by another way (past the gateway's API keys).
        backend = self.backend_for(host or request.headers.get("Host"), request.path, default=host is None)
        if backend is None:
            where = f"{host or request.host}{request.path}"
            return web.json_response(error_body(f"no Ingress rule matches {where}", "not_found", "no_route"),
                                     status=404)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        wanted = self.requested(backend, body, request.path, request.headers)
        ports = self._order(backend, wanted)
        if not ports or (self._holders_not_ready(backend, wanted)
                         and time.monotonic() - self._snapshot_at >= RESNAPSHOT_AFTER_S):
            # The table is polled every `refresh` s, where a real controller watches endpoints and
            # sees a pod turn Ready within milliseconds: look again before answering 503 (no pod), or
            # before sending a placed adapter only to pods that do not hold it (its holder may have
            # turned Ready since; at most once per RESNAPSHOT_AFTER_S after the last snapshot began,
            # so a holder that stays unready costs the API server no more than that).
            await self._look()
            ports = self._order(backend, wanted)
        if not ports:
            return web.json_response(error_body(f"service {backend[0]}/{backend[1]} has no ready pods",
                                                "unavailable", "no_ready_endpoints"), status=503,
                                     headers={"Retry-After": "1"})
        shared_pool = self.pools.get(backend)
        last_error: Exception | None = None
        for i, endpoint in enumerate(ports):  # a connection refused (pod just went away) tries the next pod
            url = f"http://127.0.0.1:{endpoint.port}{request.rel_url}"
            merged_pod = endpoint.pool is not None and endpoint.pool != shared_pool
            try:
                # A kept-alive connection the pod closed as idle is sent again to the same pod (send).
                upstream = await send(self.session, request.method, url, data=body, headers=headers,
                                      allow_redirects=False)
            except aiohttp.ClientConnectionError as e:
                log.warning("pod %s failed %s %s before answering (%s: %s); trying the next pod",
                            endpoint.pod, request.method, request.path, type(e).__name__, e)
                last_error = e
                continue
            if i + 1 < len(ports) and (upstream.status == 503 or (upstream.status == 404 and merged_pod)):
                # Not served there (a stale placement: 503 adapter_elsewhere) or not able now: the next pod.
                # A merged pod rolling to another version 404s a version pinned to the new one.
                upstream.release()
                last_error = Exception(f"pod {endpoint.pod} answered {upstream.status}")
                continue
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if endpoint.pool is not None:
                out_headers.setdefault("X-Lorafleet-Pool", endpoint.pool)
            if not upstream.headers.get("content-type", "").startswith("text/event-stream"):
                # A whole answer is read before anything is sent: its framing is the proxy's own
                # (Content-Length), and an upstream that fails midway becomes a clean 502.
                try:
                    answer = await upstream.read()
                except aiohttp.ClientError as e:
                    last_error = e
                    continue
                finally:
                    upstream.release()
                self._count_choice(backend, wanted, endpoint, merged_pod)
                return web.Response(status=upstream.status, body=answer, headers=out_headers)
            self._count_choice(backend, wanted, endpoint, merged_pod)
            resp = web.StreamResponse(status=upstream.status, headers=out_headers)
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
            except aiohttp.ClientError:
                # Headers are out: no error response can follow on this connection, so end it.
                if request.transport is not None:
                    request.transport.close()
                return resp
            finally:
                upstream.release()
            await resp.write_eof()
            return resp
        return web.json_response(error_body(f"no pod of {backend[0]}/{backend[1]} answered: {last_error}",
                                            "unavailable", "upstream_unreachable"), status=502)

    def _count_choice(self, backend: tuple[str, str], wanted: str | None, endpoint: Endpoint, merged_pod: bool) -> None:
        name = names.split_versioned(wanted)[0] if wanted else None
        if name is not None and endpoint.pool is not None and name in self.merged.get(backend, {}):
            self.pool_choice.labels(backend[0], name, endpoint.pool, "merged" if merged_pod else "shared").inc()

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), content_type="text/plain")

    async def serve(self, port: int, host: str = "127.0.0.1", vhosts: dict[int, str] | None = None,
                    metrics_port: int | None = None) -> web.AppRunner:
        """Listen on ``port`` (routing by the Host header) and on each port of ``vhosts`` (as if every
        request there were sent to that host), and serve ``GET /metrics`` on ``metrics_port``.
        Cleaning up the runner returned stops them all."""
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
        self._vhost_runners: list[web.AppRunner] = []
        main: web.AppRunner | None = None
        listeners: list[tuple[int, str | None, bool]] = [(port, None, False),
                                                         *((p, h, False) for p, h in (vhosts or {}).items())]
        if metrics_port is not None:
            listeners.append((metrics_port, None, True))
        for listen, forced, ops in listeners:
            app = web.Application(client_max_size=64 * 1024 * 1024)

            async def handler(request: web.Request, forced: str | None = forced) -> web.StreamResponse:
                return await self.handle(request, forced)

            if ops:
                app.router.add_get("/metrics", self.metrics)
            else:
                app.router.add_route("*", "/{tail:.*}", handler)
            if main is None:
                app.on_cleanup.append(self._close)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host, listen).start()
            if main is None:
                main = runner
            else:
                self._vhost_runners.append(runner)
        self._refresher = asyncio.create_task(self.refresh_forever())
        assert main is not None
        return main

    async def _close(self, _app) -> None:
        for r in self._vhost_runners:
            await r.cleanup()
        self._refresher.cancel()
        await self.session.close()


def _named_port(pod, name: str) -> str:
    """The container port a Service's named targetPort means in this pod ("" when none has it)."""
    for c in list(pod.spec.initContainers or []) + list(pod.spec.containers or []):
        for p in c.ports or []:
            if p.name == name:
                return str(p.containerPort)
    return ""

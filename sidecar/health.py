"""The sidecar's probe endpoint: ``GET /healthz`` (liveness) and ``GET /readyz`` (readiness) on a port of
their own, reachable on the pod IP for the kubelet, answering nothing else (every other path 404).

Liveness is the sync loop and the routes watches being alive: the sync thread runs and ended a pass
within ``stall_s`` (a pass ends every ``poll_interval`` seconds when idle, downloads run in their own
threads), and every routes watch thread runs (each retries forever; one that ended is a bug a restart
cures). Readiness adds that a complete routes table was received and a pass worked through it. Neither
depends on the API server or the runtime being reachable: the sidecar fails static on its last
complete table (a restart or an unready pod would cure nothing there), so those show only as
``routesStale`` / ``watchRetrying`` in the answer. The answer names no adapter, tenant or pool.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("lorafleet.sidecar.health")

STALL_S = 120.0  # a pass not ended for this long: the sync loop is stuck


class Health:
    def __init__(self, syncer, watcher, sync_alive: Callable[[], bool], stall_s: float = STALL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.syncer, self.watcher, self.sync_alive = syncer, watcher, sync_alive
        self.stall_s, self.clock = stall_s, clock

    def problem(self, ready: bool) -> str | None:
        """Why the sidecar is not live (``ready=False``) or not ready (``ready=True``), or None."""
        if not self.sync_alive():
            return "the sync loop is not running"
        last = self.syncer.last_pass
        if last is not None and self.clock() - last > self.stall_s:
            return f"the sync loop ended no pass for {self.clock() - last:.0f} s (more than {self.stall_s:.0f} s)"
        if self.watcher is not None and not self.watcher.alive():
            return "a routes watch thread ended"
        if ready:
            if last is None:
                return "the sync loop has not ended its first pass"
            if not self.syncer.synced:
                return "waiting for the first complete routes table"
        return None

    def answer(self, ready: bool) -> tuple[int, dict]:
        problem = self.problem(ready)
        body: dict = {"status": "ok" if problem is None else "failing"}
        if problem is not None:
            body["reason"] = problem
        body["routesStale"] = bool(self.syncer.routes_stale)
        body["watchRetrying"] = bool(self.watcher is not None and self.watcher.retrying())
        return (200 if problem is None else 503), body

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        health = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "lorafleet-sidecar"
            sys_version = ""

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                path = self.path.split("?", 1)[0]
                if path not in ("/healthz", "/readyz"):
                    self._send(404, {"status": "not found"})
                    return
                code, body = health.answer(ready=path == "/readyz")
                self._send(code, body)

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: object) -> None:  # probes every few seconds: not news
                pass

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        log.info("health endpoint on %s:%d (/healthz, /readyz)", host, server.server_address[1])
        return server

"""Wires the sidecar's parts together (storage, cache, runtime client, routes watch, reporter, metrics);
used by ``lorafleet sidecar`` and by tests that run a sidecar in-process."""

from __future__ import annotations

import logging
import threading

from pydantic import SecretStr

from lorafleet.contracts.cache import CacheLayout
from lorafleet.contracts.settings import SidecarSettings

from .health import Health
from .kube import PodReporter, RoutesWatcher, make_client
from .metrics import Metrics
from .runtime_client import RuntimeAdmin
from .storage import S3Storage, Storages
from .store import ContentStore
from .sync import RetryPolicy, Syncer
from lorafleet.contracts.adapter_rules import Limits

log = logging.getLogger("lorafleet.sidecar")


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class Sidecar:
    def __init__(self, syncer: Syncer, watcher: RoutesWatcher | None, metrics: Metrics, metrics_port: int = 0,
                 health_port: int = 0, health_host: str = "0.0.0.0"):
        self.syncer, self.watcher, self.metrics = syncer, watcher, metrics
        self.metrics_port = metrics_port
        self.health_port, self.health_host = health_port, health_host
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._server = None
        self.health = Health(syncer, watcher, lambda: self._thread is not None and self._thread.is_alive())
        self._health_server = None

    @classmethod
    def from_args(cls, a: SidecarSettings, client=None) -> "Sidecar":
        metrics = Metrics()
        s3 = None
        if a.s3_endpoint:
            s3 = S3Storage(a.s3_endpoint, _secret(a.access_key), _secret(a.secret_key), a.s3_region,
                           max_connections=a.concurrency + 4)
        store = ContentStore(CacheLayout(a.cache_dir), Storages(s3),
                             Limits(max_rank=a.max_rank, max_adapter_bytes=a.max_adapter_bytes), metrics,
                             disk_bytes=a.disk_bytes)
        store.scan()
        client = client or make_client(a.kubeconfig)
        syncer = Syncer(store, RuntimeAdmin(a.runtime_admin_url), metrics,
                        reporter=PodReporter(client, a.namespace, a.pod),
                        model_uri=a.model_uri or "", model_sha256=a.model_sha256 or "", task=a.task or "",
                        merged_uri=a.merged_adapter_uri or "", merged_sha256=a.merged_adapter_sha256 or "",
                        concurrency=a.concurrency, collect_after=a.collect_after, poll_interval=a.poll_interval,
                        retry=RetryPolicy(a.retry_base, a.retry_max))
        syncer.rate_window = a.rate_window
        # The watch gets its own client: stopping it closes that client's connection.
        watcher = RoutesWatcher(lambda: make_client(a.kubeconfig), a.namespace, a.pool, syncer.set_routes,
                                on_stale=syncer.set_routes_stale)
        return cls(syncer, watcher, metrics, a.metrics_port, a.health_port, a.health_host)

    def start(self, stop: threading.Event | None = None) -> "Sidecar":
        if stop is not None:
            self._stop = stop
        if self.metrics_port:
            self._server = self.metrics.serve(self.metrics_port)
        if self.health_port:
            self._health_server = self.health.serve(self.health_port, self.health_host)
        if self.watcher is not None:
            self.watcher.start()
        self._thread = threading.Thread(target=self.syncer.run, args=(self._stop,), name="sync", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.syncer.wake.set()
        if self.watcher is not None:
            self.watcher.stop()
        if self._thread is not None:
            self._thread.join(30)
        # What is still only in the page cache would be verified again after a restart; finish it now.
        self.syncer.store.wait_durable(20)
        self.syncer.runtime.close()
        if self._health_server is not None:
            self._health_server.shutdown()
            self._health_server.server_close()
        if self._server is not None:
            try:
                self._server[0].shutdown()
            except Exception:  # noqa: BLE001 - older prometheus_client returns no server handle
                pass

"""Prometheus metrics of the sidecar, on their own registry (served on LORAFLEET_METRICS_PORT)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.downloaded_bytes = Counter("lorafleet_sidecar_download_bytes", "Bytes downloaded from storage",
                                        registry=r)
        self.download_seconds = Histogram("lorafleet_sidecar_download_seconds",
                                          "Time to download one adapter or model directory", buckets=_BUCKETS,
                                          registry=r)
        self.verify_seconds = Histogram("lorafleet_sidecar_verify_seconds", "Time to verify a directory's digest",
                                        buckets=_BUCKETS, registry=r)
        self.durable_seconds = Histogram("lorafleet_sidecar_durable_seconds",
                                         "Time to fsync one installed directory (in the background, after it "
                                         "is servable)", buckets=_BUCKETS, registry=r)
        self.failures = Counter("lorafleet_sidecar_failures", "Failed sync attempts by reason", ["reason"],
                                registry=r)
        self.cache_bytes = Gauge("lorafleet_sidecar_cache_bytes", "Bytes in the cache (models and adapters)",
                                 registry=r)
        self.adapters = Gauge("lorafleet_sidecar_adapters",
                              "Adapter versions by state (loaded, pending, failed; cached = directories)",
                              ["state"], registry=r)
        self.generation = Gauge("lorafleet_sidecar_routes_generation", "Routes generation worked through",
                                registry=r)
        self.routes_stale = Gauge("lorafleet_sidecar_routes_stale",
                                  "1 while the routes ConfigMaps are missing or not a complete set and the "
                                  "last complete table is kept", registry=r)
        self.runtime_restarts = Counter("lorafleet_sidecar_runtime_restarts",
                                        "Runtime restarts noticed (everything desired loaded again)", registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)

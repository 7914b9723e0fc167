"""Prometheus metrics of one runtime: requests, latency and batch sizes by tenant, adapters per tier,
loads, evictions and queue depth. Each runtime owns its registry (tests run several in one process)."""

from __future__ import annotations

import bisect
import gc
import time

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class GCPauses:
    """How long this process's garbage collector ran, per pass and generation (``gc.callbacks``). A pass
    holds the interpreter lock: the event loop and the model worker stop for its length. One per process
    (``gc_pauses()``), shared by every registry in it; the callback only counts (no lock, no allocation
    beyond a float), so it cannot deadlock with a scrape that a collection interrupts."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

    def __init__(self) -> None:
        self.counts = [[0] * (len(self.BUCKETS) + 1) for _ in range(3)]  # per generation, per bucket (+Inf)
        self.sums = [0.0, 0.0, 0.0]
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        g = min(int(info.get("generation", 2)), 2)
        d = time.perf_counter() - self._start
        self.sums[g] += d
        self.counts[g][bisect.bisect_left(self.BUCKETS, d)] += 1

    def collect(self):
        h = HistogramMetricFamily("lorafleet_runtime_gc_pause_seconds",
                                  "Garbage-collector passes of the runtime's server process by generation, and how "
                                  "long each held the interpreter lock (the event loop and the model worker wait "
                                  "meanwhile); generation 2 is a full collection", labels=["generation"])
        for g in range(3):
            acc, buckets = 0, []
            for le, n in zip(self.BUCKETS + (float("inf"),), list(self.counts[g])):  # a copy: passes go on
                acc += n
                buckets.append((floatToGoString(le), acc))
            h.add_metric([str(g)], buckets, self.sums[g])
        yield h


_GC_PAUSES: GCPauses | None = None


def gc_pauses() -> GCPauses:
    """This process's ``GCPauses``, installed on first use."""
    global _GC_PAUSES
    if _GC_PAUSES is None:
        _GC_PAUSES = GCPauses()
    return _GC_PAUSES


class RuntimeMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorafleet_runtime_requests", "Requests by tenant, endpoint and HTTP status",
                                ["tenant", "endpoint", "status"], registry=r)
        self.latency = Histogram("lorafleet_runtime_request_seconds", "Request latency by tenant",
                                 ["tenant", "endpoint"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tokens = Counter("lorafleet_runtime_generated_tokens",
                              "Tokens the model generated, by tenant (counted when the sequence leaves its row; "
                              "with a request's client gone, what it generated until then)", ["tenant"], registry=r)
        self.cancelled = Counter("lorafleet_runtime_cancelled",
                                 "Work nobody waited for any more, dropped: stage queued (it never reached the model) "
                                 "or running (its row freed); reason client_left or stop_sequence",
                                 ["stage", "reason"], registry=r)
        self.cancelled_steps = Counter("lorafleet_runtime_cancelled_row_steps",
                                       "Model steps begun for work already cancelled (the step under way when the "
                                       "cancel came is not counted): 0 or 1 per running cancellation", registry=r)
        self.denoising_steps = Counter("lorafleet_runtime_denoising_steps",
                                       "Denoising steps done by tenant (text-to-image; one per image job per step)",
                                       ["tenant"], registry=r)
        self.batch_size = Histogram("lorafleet_runtime_batch_size", "Rows per model forward", ["task"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_seconds = Histogram("lorafleet_runtime_batch_seconds", "Model forward time", ["task"],
                                       registry=r)
        self.batch_cpu = Counter("lorafleet_runtime_batch_cpu_seconds",
                                 "CPU time of the model worker's own thread inside model forwards (torch's "
                                 "intra-op helper threads not counted); with one torch thread on CPU, its ratio to "
                                 "lorafleet_runtime_batch_seconds below 1 is time the forwards waited for a core or "
                                 "for the interpreter lock", ["task"], registry=r)
        self.adapter_events = Counter("lorafleet_runtime_adapter_events",
                                      "Adapter admin events (loaded, failed, unloaded)", ["event"], registry=r)
        self._runtime = None
        GCCollector(registry=r)  # python_gc_collections_total by generation: full collections show here
        r.register(gc_pauses())  # and how long they held the interpreter lock
        # Overload: work refused or dropped from the queue unserved, answered 429 with Retry-After.
        self.shed_work = Counter("lorafleet_runtime_shed",
                                 "Work items answered 429 by reason: queue_full, tenant_over_share, queue_delay "
                                 "(would wait over maxQueueDelayMs), queue_timeout (waited maxQueueDelayMs), "
                                 "shutting_down", ["tenant", "reason"], registry=r)

        self.admission_refused = Counter("lorafleet_runtime_admission_refused",
                                         "Requests answered 429 before they were parsed (admission.py: the engine would "
                                         "have refused their work), by reason; also counted in lorafleet_runtime_shed",
                                         ["reason"], registry=r)
        self.direct = Counter("lorafleet_runtime_direct_requests",
                              "Requests the admission gate answered through the route's own handler without the "
                              "framework's routing, validation and middleware (admission.py), by endpoint",
                              ["endpoint"], registry=r)

        self.front_errors = Counter("lorafleet_runtime_front_errors",
                                    "Requests the HTTP front process (--front process) answered with an error of "
                                    "its own, by code: backend_unavailable (503: the model server did not take the "
                                    "connection) or backend_closed (502: it closed it without an answer); also in "
                                    "lorafleet_runtime_requests_total", ["code"], registry=r)
        self.fallback = Counter("lorafleet_runtime_fallback",
                                "Requests for an adapter that opted into spec.fallback: base, answered by the base "
                                "model because this replica could not serve the adapter: reason load_failed or "
                                "not_loaded", ["tenant", "reason"], registry=r)

    def bind(self, runtime) -> None:
        """Gauges read at scrape time from the runtime's tiers and queue."""
        self._runtime = runtime
        self.registry.register(_TierCollector(runtime))

    def batch(self, task: str, size: int, seconds: float, cpu_seconds: float) -> None:
        self.batch_size.labels(task).observe(size)
        self.batch_seconds.labels(task).observe(seconds)
        self.batch_cpu.labels(task).inc(cpu_seconds)

    def front_error(self, tenant: str, endpoint: str, status: int, code: str, n: int = 1) -> None:
        self.front_errors.labels(code).inc(n)
        self.requests.labels(tenant, endpoint, str(status)).inc(n)

    def cancelled_work(self, stage: str, work) -> None:
        """``work`` (an engine_api.Work) was dropped because it was cancelled: from the queue (stage
        "queued") or from a row it ran in ("running")."""
        self.cancelled.labels(stage, work.cancel_reason or "client_left").inc()
        if stage == "running":
            self.cancelled_steps.inc(max(0, work.steps - work.steps_at_cancel))

    def denoise_step(self, tenant: str) -> None:
        self.denoising_steps.labels(tenant).inc()

    def shed(self, tenant: str, reason: str, n: int = 1) -> None:
        """``n`` work items of ``tenant`` answered 429 for ``reason`` (called from any thread)."""
        self.shed_work.labels(tenant, reason).inc(n)

    def refused_at_admission(self, tenant: str, endpoint: str, reason: str, seconds: float) -> None:
        """One request answered 429 before it was parsed (the admission gate, or the HTTP front), as a
        refused request is counted; the shed work items are counted apart (``shed``)."""
        self.admission_refused.labels(reason).inc()
        self.requests.labels(tenant, endpoint, "429").inc()
        self.latency.labels(tenant, endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TierCollector:
    def __init__(self, runtime):
        self.rt = runtime

    def collect(self):
        rt = self.rt
        g = GaugeMetricFamily("lorafleet_runtime_adapters", "Adapters by tier", labels=["tier"])
        for tier, n in rt.manager.counts().items():
            g.add_metric([tier], n)
        yield g
        q = GaugeMetricFamily("lorafleet_runtime_queue_depth", "Work items waiting for the model worker")
        cap = rt.engine.capacity()
        q.add_metric([], cap.get("queued", 0))
        yield q
        loads = CounterMetricFamily("lorafleet_runtime_adapter_loads", "Adapter reads from disk into host memory")
        loads.add_metric([], rt.manager.loads)
        yield loads
        ev = CounterMetricFamily("lorafleet_runtime_adapter_evictions", "Evictions by tier", labels=["tier"])
        ev.add_metric(["host"], rt.manager.host_evictions)
        ev.add_metric(["device"], cap.get("device_evictions", 0))
        yield ev
        mem = GaugeMetricFamily("lorafleet_runtime_engine_memory_bytes",
                                "Memory the model engine holds: base weights, KV cache, adapter slots", labels=["part"])
        for key, n in cap.items():
            if key.endswith("_bytes"):
                mem.add_metric([key.removesuffix("_bytes")], n)
        yield mem
        base = rt.engine.base_weights()
        if base is not None:
            quantization, loaded, unquantized = base
            bw = GaugeMetricFamily("lorafleet_runtime_base_weights_bytes",
                                   "The base model's weights: as loaded (quantized or not) and unquantized in the "
                                   "pool's dtype", labels=["quantization", "form"])
            bw.add_metric([quantization, "loaded"], loaded)
            bw.add_metric([quantization, "unquantized"], unquantized)
            yield bw
        fz = GaugeMetricFamily("lorafleet_runtime_gc_frozen_objects",
                               "Python objects moved out of the garbage collector's reach after the model loaded")
        fz.add_metric([], gc.get_freeze_count())
        yield fz

"""The sync loop: routes -> ``plan_sync`` -> downloads (bounded, retried with backoff and jitter) ->
runtime admin calls -> sync report. One adapter failing never holds up the others.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lorafleet.contracts.kubeio import backoff
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.contracts.runtime_api import AdapterLoadRequest, ModelStatus, SyncState

from .kube import PodReporter
from .metrics import Metrics
from .plan import DesiredVersion, Download, LoadedAdapter, desired_versions, plan_sync, pool_adapters
from .runtime_client import RuntimeAdmin, RuntimeRefused, RuntimeUnavailable
from .store import ContentStore, DiskFull
from lorafleet.contracts.adapter_rules import BaseModelInfo, Refused

log = logging.getLogger("lorafleet.sidecar")
LOAD_CONCURRENCY = 4
# An adapter the placement moved to other replicas stays loaded here this long after the routes
# take it away: the gateway (0.5 s polls) and ingresses need a moment to see its new holder.
UNLOAD_GRACE_S = 5.0


@dataclass
class Failure:
    reason: str
    category: str
    attempts: int = 1
    next_try: float = float("inf")  # monotonic; inf = not retried (the content itself is refused)
    spec: tuple[str, str] = ("", "")  # (sha256, uri) it is about: another spec is tried afresh

    @property
    def permanent(self) -> bool:
        return self.next_try == float("inf")


class _MergedAdapterFailed(Exception):
    """A merged pool's adapter could not be fetched or was refused (the base model itself is there)."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


@dataclass
class RetryPolicy:
    base: float = 0.5
    cap: float = 60.0

    def delay(self, attempts: int) -> float:
        """Exponential backoff with jitter (half fixed, half random), so replicas do not retry in step."""
        return backoff(attempts, self.base, self.cap)


class Syncer:
    def __init__(self, store: ContentStore, runtime: RuntimeAdmin, metrics: Metrics, *,
                 reporter: PodReporter | None = None, model_uri: str = "", model_sha256: str = "", task: str = "",
                 merged_uri: str = "", merged_sha256: str = "",
                 concurrency: int = 4, collect_after: float | None = 600.0, poll_interval: float = 2.0,
                 retry: RetryPolicy | None = None, pod: str | None = None):
        self.store, self.runtime, self.metrics, self.reporter = store, runtime, metrics, reporter
        # This replica's pod: it syncs only the adapters the routes place on it (None: every adapter).
        self.pod = pod if pod is not None else (reporter.pod if reporter is not None else None)
        self.unload_grace = UNLOAD_GRACE_S
        self._releasing: dict[str, float] = {}  # name@version moved away -> when to unload it (monotonic)
        self.model_uri, self.model_sha256 = model_uri, model_sha256
        # A merged pool: this adapter is verified into the cache before the model counts as ready
        # (the runtime merges it at load) and is never collected.
        self.merged_uri, self.merged_sha256 = merged_uri, merged_sha256
        self.task = task  # the pool's: the rules refuse adapters trained for another one
        self.collect_after = collect_after
        self.poll_interval = poll_interval
        self.retry = retry or RetryPolicy()
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch")
        self.loader = ThreadPoolExecutor(max_workers=LOAD_CONCURRENCY, thread_name_prefix="load")
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self.routes: RoutesTable | None = None
        self.routes_stale: str | None = None  # why the routes in force are not what the ConfigMaps hold
        self.base: BaseModelInfo | None = None
        self.model_ready = not model_sha256
        self.model_failure: Failure | None = None
        self._model_busy = False
        self.in_flight: set[str] = set()
        self.digest_failures: dict[str, Failure] = {}
        self.load_failures: dict[str, Failure] = {}
        self.instance: str | None = None
        self.runtime_up = False
        self.runtime_model: ModelStatus | None = None  # what the runtime said of its base model
        self._sent_state: SyncState | None = None
        self._referenced: set[str] = set()
        self._runtime_digests: set[str] = set()
        self.last_report: SyncReport | None = None
        # Request rates (placement by popularity): the runtime's per-version request counts now and
        # at the start of the current window, and the rates of the last complete window.
        self.rate_window = SyncReport.RATE_WINDOW_S
        self._requests: dict[str, tuple[str, int]] = {}  # name@version -> (served name, count)
        self._window: tuple[float, dict[str, tuple[str, int]]] | None = None
        self.rates: dict[str, float] = {}
        self._seen_generation: int | None = None
        self._told_waiting = False
        # For the health endpoint: when the last pass ended (monotonic), and whether a pass worked
        # through a complete routes table yet.
        self.last_pass: float | None = None
        self.synced = False
        store.make_room = self._make_room

    # ------------------------------------------------------------------------------ inputs

    def set_routes(self, table: RoutesTable) -> None:
        with self._lock:
            self.routes = table
        self.wake.set()

    def set_routes_stale(self, reason: str | None) -> None:
        with self._lock:
            self.routes_stale = reason
        self.metrics.routes_stale.set(1 if reason else 0)
        self.wake.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.wake.clear()
            t0 = time.monotonic()
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug in one pass must not end the loop
                log.exception("sync pass failed; trying again")
            self.last_pass = time.monotonic()
            # A pass costs O(routes): while downloads finish back to back, let a few of them
            # accumulate instead of spending a core on passes (at most 1/4 of the time in passes).
            stop.wait(min(0.5, 3 * (time.monotonic() - t0)))
            self.wake.wait(self.poll_interval)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.loader.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------------------- one pass

    def step(self) -> SyncReport | None:
        self._ensure_model()
        with self._lock:
            table = self.routes
        if table is None:  # the first list of the routes has not come back yet
            return None
        desired = desired_versions(table, self.pod)
        now, mono = time.time(), time.monotonic()
        if table.generation != self._seen_generation:
            log.info("routes generation %d: %d versions of %d adapters", table.generation, len(desired),
                     len(table.adapters))
            self._seen_generation = table.generation

        # Downloads first: they need nothing from the runtime, which may be slow or away.
        self._start_downloads(plan_sync(desired, self.store.entries(), None, busy=self._busy(desired)).downloads)
        loaded = self._runtime_state(desired)
        with self._lock:
            # Forget failures of versions the routes no longer name (bounded memory with churn).
            wanted_digests, wanted_keys = {d.sha256 for d in desired}, {d.key for d in desired}
            for k in [k for k in self.digest_failures if k not in wanted_digests]:
                del self.digest_failures[k]
            for k in [k for k in self.load_failures if k not in wanted_keys]:
                del self.load_failures[k]
            # A permanent refusal holds until the spec names other content or another place.
            uris = {d.sha256: d.uri for d in desired}
            specs = {d.key: (d.sha256, d.uri) for d in desired}
            for k in [k for k, f in self.digest_failures.items() if f.spec[1] and f.spec[1] != uris[k]]:
                del self.digest_failures[k]
            for k in [k for k, f in self.load_failures.items() if f.spec[0] and f.spec != specs[k]]:
                del self.load_failures[k]
            hold = {k for k, f in self.load_failures.items() if f.next_try > mono}

        keep = {self.merged_sha256} if self.merged_sha256 else set()
        plan = plan_sync(desired, self.store.entries(), loaded, busy=self._busy(desired), hold=hold,
                         linger=self._moved_away(table, desired, loaded, mono),
                         disk_bytes=self.store.disk_bytes, other_bytes=self.store.model_bytes, now=now,
                         collect_after=self.collect_after, keep=keep)
        self._start_downloads(plan.downloads)

        if loaded is not None:
            loaded = self._apply_runtime(plan.unloads, plan.loads, loaded)
        for digest in plan.collect:
            self.store.remove(digest)

        referenced = {d.sha256 for d in desired} | keep
        for gone in self._referenced - referenced:
            self.store.mark_unreferenced(gone)
        self._referenced = referenced
        self.store.touch(referenced, now)
        report = self._report(table, desired, loaded)
        self.synced = True
        return report

    def _moved_away(self, table: RoutesTable, desired: list[DesiredVersion],
                    loaded: dict[str, LoadedAdapter] | None, mono: float) -> set[str]:
        """Loaded versions of adapters the routes now place on other replicas only, kept loaded for
        ``unload_grace`` seconds from when this sidecar first saw them go (make before break, to the
        end: whoever routes requests has seen the new holder by then). An adapter gone from the
        routes, or a version gone from its entry, is unloaded at once as always."""
        if loaded is None or self.pod is None:
            self._releasing.clear()
            return set()
        wanted = {d.key for d in desired}
        keep = set()
        for key, a in loaded.items():
            entry = table.adapters.get(a.name)
            if key in wanted or entry is None or entry.held_by(self.pod) or \
                    not any(v.version == a.version for v in entry.versions):
                continue
            if mono < self._releasing.setdefault(key, mono + self.unload_grace):
                keep.add(key)
        for key in [k for k in self._releasing if k not in loaded or k in wanted]:
            del self._releasing[key]
        return keep

    def _busy(self, desired: list[DesiredVersion]) -> set[str]:
        """Digests not to download now: in flight, backing off, refused, or waiting for the model
        (adapters are validated against it)."""
        if not self.model_ready:
            return {d.sha256 for d in desired}
        mono = time.monotonic()
        with self._lock:
            return set(self.in_flight) | {d for d, f in self.digest_failures.items() if f.next_try > mono}

    def _start_downloads(self, downloads: list[Download]) -> None:
        for dl in downloads:
            with self._lock:
                if dl.digest in self.in_flight:
                    continue
                self.in_flight.add(dl.digest)
            self.pool.submit(self._download, dl)

    def _runtime_state(self, desired: list[DesiredVersion]) -> dict[str, LoadedAdapter] | None:
        try:
            listing = self.runtime.adapters()
        except RuntimeUnavailable as e:
            if self.runtime_up or self.instance is None and not self._told_waiting:
                log.warning("runtime unreachable (%s); will load everything desired when it is back", e)
                self._told_waiting = True
            self.runtime_up = False
            return None
        if listing.instance != self.instance or not self.runtime_up:
            if self.instance is not None:
                log.info("runtime %s (instance %s -> %s): loading every desired adapter again",
                         "restarted" if listing.instance != self.instance else "reachable again",
                         self.instance, listing.instance)
                self.metrics.runtime_restarts.inc()
            self.instance = listing.instance
            self._sent_state = None
            with self._lock:
                self.load_failures.clear()
        self.runtime_up = True
        if not self._runtime_model_loaded(listing.instance):
            return None  # nothing can be loaded into it (yet, or ever: the report says why)
        self._runtime_digests = {a.sha256 for a in listing.adapters}
        out = {}
        mono = time.monotonic()
        failed = any(a.state == "failed" for a in listing.adapters)
        specs = {d.key: (d.sha256, d.uri) for d in desired} if failed else {}
        self._requests = {}
        for a in listing.adapters:
            la = LoadedAdapter(a.name, a.version, a.sha256, a.weight, a.pinned, a.state == "failed")
            out[la.key] = la
            self._requests[la.key] = (a.name, a.requests)
            if la.failed:
                permanent = a.error_kind == "permanent"
                with self._lock:
                    f = self.load_failures.get(la.key)
                    if f is None or (f.next_try <= mono or permanent) and not f.permanent:
                        self._fail(self.load_failures, la.key, f"runtime refused it: {a.error}", "runtime",
                                   transient=not permanent, spec=specs.get(la.key, (a.sha256, "")))
        return out

    def _runtime_model_loaded(self, instance: str) -> bool:
        """Whether the runtime has its base model (asked until it has, once per runtime instance). A
        runtime that refused it stays up to say why; the report carries that to the operator."""
        m = self.runtime_model
        if m is None or m.instance != instance or m.state == "loading":
            try:
                m = self.runtime.model()
            except RuntimeUnavailable as e:
                log.warning("%s", e)
                self.runtime_up = False
                return False
            if m is None:  # a runtime without GET /admin/model: its loads answer for it
                return True
            if m.state in ("refused", "failed") and (self.runtime_model is None or self.runtime_model != m):
                log.error("the runtime cannot serve the base model (%s): %s", m.state, m.message)
            self.runtime_model = m
        return m.state == "loaded"

    def _apply_runtime(self, unloads, loads: list[DesiredVersion],
                       loaded: dict[str, LoadedAdapter]) -> dict[str, LoadedAdapter] | None:
        try:
            for name, version in unloads:
                self.runtime.unload(name, version)
                loaded.pop(f"{name}@{version}", None)
                log.info("unloaded %s@%s", name, version)
            # The runtime reads the adapter's weights on PUT: a few at once keeps a big sync short.
            for d, ok in zip(loads, self.loader.map(self._load_one, loads)):
                if ok:
                    loaded[d.key] = LoadedAdapter(d.name, d.version, d.sha256, d.weight, d.pinned)
        except RuntimeUnavailable as e:
            log.warning("%s", e)
            self.runtime_up = False
            return None
        return loaded

    def _load_one(self, d: DesiredVersion) -> bool:
        req = AdapterLoadRequest(path=str(self.store.layout.adapter_dir(d.sha256)), sha256=d.sha256,
                                 tenant=d.tenant, weight=d.weight, pinned=d.pinned, preload=d.preload)
        try:
            self.runtime.load(d.name, d.version, req)
        except RuntimeRefused as e:
            with self._lock:
                self._fail(self.load_failures, d.key, str(e), "runtime", transient=not e.permanent,
                           spec=(d.sha256, d.uri))
            return False
        with self._lock:
            self.load_failures.pop(d.key, None)
        return True

    # ---------------------------------------------------------------------------- downloads

    def _fail(self, table: dict[str, Failure], key: str, reason: str, category: str, transient: bool,
              spec: tuple[str, str] = ("", "")) -> None:
        prev = table.get(key)
        attempts = prev.attempts + 1 if prev else 1
        next_try = time.monotonic() + self.retry.delay(attempts) if transient else float("inf")
        table[key] = Failure(reason, category, attempts, next_try, spec)
        self.metrics.failures.labels(category).inc()

    def _download(self, dl: Download) -> None:
        try:
            base = self.base if self.base is not None else BaseModelInfo(task=self.task) if self.task else None
            self.store.install_adapter(dl.digest, dl.uri, base)
            with self._lock:
                self.digest_failures.pop(dl.digest, None)
        except Exception as e:  # noqa: BLE001 - every failure is recorded for this digest only
            self._record_failure(dl, e)
        finally:
            with self._lock:
                self.in_flight.discard(dl.digest)
            self.wake.set()

    def _record_failure(self, dl: Download, e: Exception) -> None:
        if isinstance(e, Refused):
            # Refused content never changes (permanent); a changed object may be fixed in storage
            # (digest mismatch: transient, retried with backoff).
            transient, category, reason = not e.permanent, e.category, e.reason
        elif isinstance(e, DiskFull):
            transient, category, reason = True, "disk_full", str(e)
        else:
            transient, category, reason = True, "storage", f"download failed, retrying: {e}"
        with self._lock:
            self._fail(self.digest_failures, dl.digest, reason, category, transient, spec=(dl.digest, dl.uri))
        log.warning("%s (%s): %s", ",".join(dl.keys), dl.uri, reason)

    def _ensure_model(self) -> None:
        if self.model_ready and (self.base is not None or not self.model_sha256):
            return
        d = self.store.layout.model_dir(self.model_sha256)
        merged_here = not self.merged_sha256 or self.store.layout.adapter_dir(self.merged_sha256).is_dir()
        if d.is_dir() and merged_here:
            try:
                self.base = BaseModelInfo.from_dir(d, self.model_uri, self.model_sha256)
                self.base.task = self.task or self.base.task
            except Refused as e:  # unreadable headers: validate what can be without the base
                log.error("base model %s: %s; adapters are checked without it", d, e.reason)
                self.base = None
            self.model_ready = True
            log.info("base model ready at %s", d)
            self.wake.set()
            return
        with self._lock:
            if self._model_busy or (self.model_failure and self.model_failure.next_try > time.monotonic()):
                return
            self._model_busy = True
        self.pool.submit(self._download_model)

    def _download_model(self) -> None:
        try:
            model_dir = self.store.layout.model_dir(self.model_sha256)
            if not model_dir.is_dir():
                self.store.install_model(self.model_sha256, self.model_uri)
            if self.merged_sha256 and not self.store.layout.adapter_dir(self.merged_sha256).is_dir():
                # Verified and checked against this base like any adapter, before the runtime merges it.
                base = BaseModelInfo.from_dir(model_dir, self.model_uri, self.model_sha256)
                base.task = self.task or base.task
                try:
                    self.store.install_adapter(self.merged_sha256, self.merged_uri, base)
                except Exception as e:  # noqa: BLE001 - reported as the merged adapter's, not the model's
                    raise _MergedAdapterFailed(e) from None
            self.model_failure = None
        except Exception as e:  # noqa: BLE001
            prev = self.model_failure
            attempts = prev.attempts + 1 if prev else 1
            merged = isinstance(e, _MergedAdapterFailed)
            cause = e.cause if isinstance(e, _MergedAdapterFailed) else e
            reason = cause.reason if isinstance(cause, Refused) else str(cause)
            # The sync report carries a merged adapter's (mergedAdapterFailure): a merged pool's routes
            # name no adapter, so no adapter's failure would say why its pods never turn Ready.
            self.model_failure = Failure(f"merged adapter {self.merged_uri}: {reason}" if merged
                                         else f"base model {self.model_uri}: {reason}",
                                         "merged" if merged else "model", attempts,
                                         time.monotonic() + self.retry.delay(attempts))
            self.metrics.failures.labels("model").inc()
            log.error("%s", self.model_failure.reason)
        finally:
            with self._lock:
                self._model_busy = False
            self.wake.set()

    def _make_room(self, needed: int) -> int:
        """Evict unreferenced content, least recently used first, to fit a download."""
        with self._lock:
            table = self.routes
        keep = ({d.sha256 for d in desired_versions(table, self.pod)} if table else set()) | self._runtime_digests
        freed = 0
        for c in sorted(self.store.entries().values(), key=lambda c: c.last_used):
            if freed >= needed:
                break
            if c.digest in keep:
                continue
            self.store.remove(c.digest)
            freed += c.size
        return freed

    # ------------------------------------------------------------------------------ report

    def _runtime_refusal(self) -> str | None:
        m = self.runtime_model
        if self.runtime_up and m is not None and m.state in ("refused", "failed"):
            return f"the runtime cannot serve the base model: {m.message}"
        return None

    def _measure_rates(self, mono: float) -> dict[str, float]:
        """Served name -> requests/s the runtime answered over the last complete window of
        ``rate_window`` seconds (each version's count since the window began; a count that went
        down was reset by a new registration or runtime, so it counts from 0)."""
        if self._window is None:
            self._window = (mono, dict(self._requests))
            return self.rates
        start, then = self._window
        if mono - start < self.rate_window:
            return self.rates
        counts: dict[str, int] = {}
        for key, (name, n) in self._requests.items():
            before = then.get(key, (name, 0))[1]
            counts[name] = counts.get(name, 0) + (n - before if n >= before else n)
        self.rates = SyncReport.rates_of({name: n / (mono - start) for name, n in counts.items()})
        self._window = (mono, dict(self._requests))
        return self.rates

    def _report(self, table: RoutesTable, desired: list[DesiredVersion],
                loaded: dict[str, LoadedAdapter] | None) -> SyncReport:
        failed: dict[str, str] = {}
        pending: list[str] = []
        n_loaded = 0
        preload_pending = 0
        cached = self.store.entries()
        with self._lock:
            for d in desired:
                have = loaded.get(d.key) if loaded else None
                if have is not None and have.sha256 == d.sha256 and not have.failed:
                    n_loaded += 1
                    continue
                f = self.load_failures.get(d.key) if d.sha256 in cached else self.digest_failures.get(d.sha256)
                if f is not None and d.key not in failed:
                    failed[d.key] = f.reason if f.permanent else f"{f.reason} (attempt {f.attempts})"
                else:
                    pending.append(d.key)
                    preload_pending += d.preload
            if not self.model_ready and self.model_failure is not None:
                for d in desired:
                    if d.key in pending:
                        failed[d.key] = self.model_failure.reason
                pending = [k for k in pending if k not in failed]
            refused = self._runtime_refusal()
            if refused:
                for k in pending:
                    failed[k] = refused
                pending = []
        # Capped lists name the first not-loaded keys in key order and say how far they reach
        # (coveredThrough): the operator counts nothing after that as loaded.
        report = SyncReport.build(table.generation, n_loaded, failed, pending,
                                  model_ready=self.model_ready if self.model_sha256 else None,
                                  since={d.key: d.since for d in desired})
        report.routes_stale = self.routes_stale
        f = self.model_failure if not self.model_ready else None
        if f is not None and f.category == "merged":
            # No attempt count: the report (a pod annotation) changes only when the reason does.
            report.merged_adapter_failure = f.reason
        elif f is not None and f.category == "model":
            report.model_failure = f.reason
        if self.pod is not None and table.placed_on is not None:
            report.rates = self._measure_rates(time.monotonic()) if loaded is not None else self.rates
            report.cache_bytes = self.store.used_bytes()
            # Verified sizes the routes do not have yet: placement counts them.
            sizes = sorted({d.sha256: cached[d.sha256].size for d in desired
                            if d.sha256 in cached and d.verified is None}.items())
            report.sizes = dict(sizes[:SyncReport.MAX_SIZES]) or None
        rm = self.runtime_model if self.runtime_up else None
        if rm is not None:
            report.runtime_model = rm.state
            report.model_error = rm.message or None
        self.last_report = report
        m = self.metrics
        m.adapters.labels("loaded").set(n_loaded)
        m.adapters.labels("pending").set(len(pending))
        m.adapters.labels("failed").set(len(failed))
        m.generation.set(table.generation)

        if loaded is not None and self.model_ready:
            # A pod the placement has not counted yet is not ready: its share is not in the routes.
            waiting = 1 if self.pod is not None and table.awaits_placement(self.pod) else 0
            state = SyncState(routes_generation=table.generation, preload_pending=preload_pending + waiting,
                              fallback={name: e.tenant for name, e in sorted(table.adapters.items())
                                        if e.fallback == "base"},
                              pool_adapters=pool_adapters(table, self.pod))
            if state != self._sent_state:
                try:
                    self.runtime.sync(state)
                    self._sent_state = state
                except RuntimeUnavailable as e:
                    log.warning("%s", e)
        if self.reporter is not None:
            try:
                self.reporter.report(report, draining=self.pod is not None and table.drains(self.pod))
            except Exception as e:  # noqa: BLE001 - API server away: report on the next pass
                log.warning("could not patch the sync report onto pod %s: %s", self.reporter.pod, e)
        return report

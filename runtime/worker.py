"""The model-worker thread and its scheduler: per-tenant queues served round-robin with a cap on each
tenant's queued + in-flight work, dynamic batching for classification and iteration-level continuous
batching for generation. The asyncio loop only submits work and receives events."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from lorafleet.runtime.engine_api import Overloaded, Work
from lorafleet.runtime.engines import ClassificationEngine, Engine, GenerationEngine, Sequence

log = logging.getLogger("lorafleet.runtime")


def slot_acceptor(slots, held: set) -> Callable[[Work], bool]:
    """A ``Scheduler.take`` filter: admits work whose adapter can hold a device slot together with
    ``held`` and everything admitted before it (base-model work always)."""
    chosen = set(held)

    def accept(w: Work) -> bool:
        if w.key is None or w.key in chosen:
            return True
        if slots.can_acquire(chosen | {w.key}):
            chosen.add(w.key)
            return True
        return False

    return accept


class Scheduler:
    def __init__(self, max_queue: int, per_tenant_max_inflight: int):
        self.max_queue = max_queue
        self.per_tenant = per_tenant_max_inflight
        self.cv = threading.Condition()
        self.queues: dict[str, deque[Work]] = {}
        self.order: deque[str] = deque()  # tenants with queued work, in round-robin order
        self.load: dict[str, int] = {}  # queued + in flight, per tenant
        self.queued = 0
        self.control: deque[Callable[[], None]] = deque()
        self.closed = False

    def submit(self, works: list[Work]) -> None:
        """Queue all of ``works`` (one request) or none of them."""
        if not works:
            return
        tenant = works[0].tenant
        with self.cv:
            if self.closed:
                raise Overloaded("the runtime is shutting down", "shutting_down", 5)
            if self.queued + len(works) > self.max_queue:
                raise Overloaded(f"the runtime's queue is full ({self.queued} waiting, maxQueue {self.max_queue}); "
                                 "retry later", "queue_full")
            if self.load.get(tenant, 0) + len(works) > self.per_tenant:
                raise Overloaded(f"tenant {tenant!r} already has {self.load.get(tenant, 0)} requests queued or "
                                 f"running (perTenantMaxInflight {self.per_tenant}); retry later", "tenant_over_share")
            q = self.queues.get(tenant)
            if q is None:
                q = self.queues[tenant] = deque()
                self.order.append(tenant)
            q.extend(works)
            self.queued += len(works)
            self.load[tenant] = self.load.get(tenant, 0) + len(works)
            self.cv.notify_all()

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the model-worker thread between batches."""
        with self.cv:
            self.control.append(fn)
            self.cv.notify_all()

    def oldest(self) -> float | None:
        return min((q[0].enqueued for q in self.queues.values() if q), default=None)

    def take(self, n: int, accept: Callable[[Work], bool]) -> list[Work]:
        """Up to ``n`` works, one tenant at a time in rotation, skipping heads ``accept`` refuses."""
        out: list[Work] = []
        with self.cv:
            skipped: list[str] = []
            while len(out) < n and self.order:
                tenant = self.order.popleft()
                q = self.queues[tenant]
                if q[0].cancelled or accept(q[0]):
                    w = q.popleft()
                    self.queued -= 1
                    if w.cancelled:
                        self._finished(w)
                    else:
                        out.append(w)
                    if q:
                        self.order.append(tenant)
                    else:
                        del self.queues[tenant]
                else:
                    skipped.append(tenant)
            self.order.extendleft(reversed(skipped))
        return out

    def finished(self, work: Work) -> None:
        with self.cv:
            self._finished(work)

    def _finished(self, work: Work) -> None:
        left = self.load.get(work.tenant, 1) - 1
        if left <= 0:
            self.load.pop(work.tenant, None)
        else:
            self.load[work.tenant] = left

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()


class ModelWorker(threading.Thread):
    """Owns the engine: the only thread that runs the model or writes device slots."""

    def __init__(self, engine: Engine, scheduler: Scheduler, max_batch_size: int, max_batch_delay_ms: float,
                 metrics=None):
        super().__init__(name="lorafleet-model-worker", daemon=True)
        self.engine = engine
        self.sched = scheduler
        self.max_batch = max_batch_size
        self.delay = max_batch_delay_ms / 1000.0
        self.metrics = metrics
        self.active: list[Work] = []

    def run(self) -> None:
        while not self.sched.closed:
            try:
                self._control()
                if isinstance(self.engine, GenerationEngine):
                    self._generation_step()
                else:
                    self._classification_step()
            except Exception:  # never let one bad batch kill the worker
                log.exception("model worker step failed")
        for w in self.active:
            w.send("error", RuntimeError("the runtime is shutting down"))

    def _control(self) -> None:
        while True:
            with self.sched.cv:
                if not self.sched.control:
                    return
                fn = self.sched.control.popleft()
            try:
                fn()
            except Exception:
                log.exception("control operation failed")

    def _wait_for_batch(self, idle: bool) -> None:
        """Block until work arrives; then give a partial batch up to maxBatchDelayMs to fill."""
        with self.sched.cv:
            if idle:
                self.sched.cv.wait_for(lambda: self.sched.queued or self.sched.control or self.sched.closed,
                                       timeout=0.5)
            oldest = self.sched.oldest()
            while (oldest is not None and self.sched.queued < self.max_batch and not self.sched.control
                   and not self.sched.closed):
                left = oldest + self.delay - time.monotonic()
                if left <= 0:
                    break
                self.sched.cv.wait(timeout=left)

    def _acceptor(self, held: set) -> Callable[[Work], bool]:
        return slot_acceptor(self.engine.slots, held)

    def _acquire(self, works: list[Work]) -> list[Work]:
        ok = []
        for w in works:
            try:
                w.payload_slot = self.engine.acquire(w.entry)
                ok.append(w)
            except Exception as e:
                w.send("error", e)
                self.sched.finished(w)
        return ok

    def _release(self, w: Work) -> None:
        self.engine.release(w.entry)
        self.sched.finished(w)

    def _classification_step(self) -> None:
        engine: ClassificationEngine = self.engine  # type: ignore[assignment]
        self._wait_for_batch(idle=True)
        batch = self.sched.take(self.max_batch, self._acceptor(set()))
        if not batch:
            return
        batch = self._acquire(batch)
        if not batch:
            return
        t0 = time.perf_counter()
        try:
            probs = engine.classify([w.payload for w in batch], [w.payload_slot for w in batch],
                                    [len(w.entry.labels or []) for w in batch])
            for w, p in zip(batch, probs):
                w.send("result", p)
        except Exception as e:
            log.exception("classification batch failed")
            for w in batch:
                w.send("error", e)
        finally:
            for w in batch:
                self._release(w)
        if self.metrics:
            self.metrics.batch(engine.task, len(batch), time.perf_counter() - t0)

    def _generation_step(self) -> None:
        engine: GenerationEngine = self.engine  # type: ignore[assignment]
        if not self.active:
            self._wait_for_batch(idle=True)
        room = min(self.max_batch - len(self.active), len(engine.free_rows))
        new: list[Work] = []
        if room > 0 and self.sched.queued:
            held = {w.key for w in self.active if w.key is not None}
            new = self._acquire(self.sched.take(room, self._acceptor(held)))
        t0 = time.perf_counter()
        if new:
            seqs = [w.payload for w in new]
            for w in new:
                w.payload.slot = w.payload_slot
            try:
                toks = engine.prefill(seqs)
            except Exception as e:
                log.exception("prefill failed")
                for w in new:
                    engine.finish(w.payload)
                    w.send("error", e)
                    self._release(w)
                new = []
                toks = []
            for w, tok in zip(new, toks):
                w.send("token", tok)
            self.active.extend(new)
            self._retire()
        # Sequences admitted above already have their first token; all running ones step together.
        if self.active:
            step = [w for w in self.active if w not in new] if new else list(self.active)
            if step:
                try:
                    toks = engine.decode([w.payload for w in step])
                except Exception as e:
                    log.exception("decode step failed")
                    for w in step:
                        w.cancelled = True
                        w.send("error", e)
                    self._retire()
                    return
                for w, tok in zip(step, toks):
                    w.send("token", tok)
                self._retire()
            if self.metrics:
                self.metrics.batch(engine.task, len(self.active) + len(new), time.perf_counter() - t0)

    def _retire(self) -> None:
        engine: GenerationEngine = self.engine  # type: ignore[assignment]
        keep = []
        for w in self.active:
            seq: Sequence = w.payload
            if w.cancelled or engine.is_done(seq):
                engine.finish(seq)
                if not w.cancelled:
                    reason = "length" if len(seq.generated) >= seq.max_new_tokens or seq.pos >= engine.max_len \
                        else "stop"
                    w.send("done", reason)
                self._release(w)
            else:
                keep.append(w)
        self.active = keep

"""The model-worker thread and its scheduler: per-tenant queues served round-robin with a cap on each
tenant's queued + in-flight work, dynamic batching for classification and iteration-level continuous
batching for generation. The asyncio loop only submits work and receives events."""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from collections import deque
from typing import Callable

from lorafleet.runtime.admission_rule import AdmissionState, admit, waiting_add
from lorafleet.runtime.engine_api import QUEUED, TAKEN, WITHDRAWN, Overloaded, Work, send_all
from lorafleet.runtime.engines import ClassificationEngine, Engine, GenerationEngine, Sequence

log = logging.getLogger("lorafleet.runtime")


def slot_acceptor(slots, held: set) -> Callable[[Work], bool]:
    """A ``Scheduler.take`` filter: admits work whose adapter can hold a device slot together with
    ``held`` and everything admitted before it (base-model work always). The same rule as
    ``slots.can_acquire(chosen)``, kept as running counts so each check is O(1): the keys chosen that
    hold no slot yet must fit in the free slots plus the unreferenced residents not chosen."""
    chosen = set(held)
    by_key, lru = slots.by_key, slots.lru
    state = [sum(1 for k in chosen if k not in by_key), sum(1 for k in chosen if k in lru)]  # new, chosen in lru

    def accept(w: Work) -> bool:
        k = w.key
        if k is None or k in chosen:
            return True
        new = state[0] + (k not in by_key)
        in_lru = state[1] + (k in lru)
        if new <= len(slots.free) + len(lru) - in_lru:
            chosen.add(k)
            state[0], state[1] = new, in_lru
            return True
        return False

    return accept


class ServiceRate:
    """Work items the worker starts per second while work is waiting (an exponentially weighted mean
    over about ``tau`` seconds). Only intervals that began with work left in the queue count: the rate
    of an idle worker says how fast work arrives, not how fast it can be served. Nor does the interval
    after a take that started work with nothing in flight (``fresh``): a generation worker takes its
    next work when a row frees, so that interval is the whole service time of the first rows and says
    nothing of the rate at which rows free once they run (counted, a fresh server's first burst of 64
    requests read as one item per generation time, and the queue-delay bound refused most of the next
    requests)."""

    def __init__(self, tau: float = 2.0):
        self.tau = tau
        self.items = 0.0
        self.seconds = 0.0
        self.last: float | None = None
        self.backlogged = False

    def took(self, n: int, left: int, now: float, fresh: bool = False) -> None:
        """``n`` items taken at ``now``, ``left`` still queued; ``fresh``: nothing was in flight before
        (a continuous-batching worker starting from idle)."""
        if self.last is not None and self.backlogged and n:
            dt = now - self.last
            if dt > 0:
                decay = math.exp(-dt / self.tau)
                self.items = self.items * decay + n
                self.seconds = self.seconds * decay + dt
        self.last, self.backlogged = now, left > 0 and not (fresh and n)

    def per_second(self) -> float | None:
        return self.items / self.seconds if self.seconds > 0.05 else None


class Scheduler:
    """Per-tenant FIFO queues served round-robin. Refuses (``Overloaded``) work over ``max_queue`` or a
    tenant's ``per_tenant_max_inflight``; with ``max_queue_delay_ms`` it also refuses at once work that
    would wait longer than that (round-robin order at the measured service rate: a tenant with more
    queued than others is refused first), and answers 429 for work still queued when the bound passes.
    ``on_shed(tenant, reason, n)`` counts what it refused; ``on_cancelled("queued", work)`` what left
    the queue cancelled."""

    def __init__(self, max_queue: int, per_tenant_max_inflight: int, max_queue_delay_ms: float = 0.0,
                 on_shed: Callable[[str, str, int], None] | None = None,
                 on_cancelled: Callable[[str, Work], None] | None = None):
        self.max_queue = max_queue
        self.per_tenant = per_tenant_max_inflight
        self.max_delay = max_queue_delay_ms / 1000.0
        # Work of an adapter with the base-model fallback that no device slot has taken after this
        # long runs on the base model (half the queue-delay bound, so it falls back before a 429).
        self.fallback_after = self.max_delay / 2 if self.max_delay > 0 else 1.0
        self.on_shed = on_shed
        self.on_cancelled = on_cancelled
        lock = threading.RLock()
        self.cv = threading.Condition(lock)
        self.queues: dict[str, deque[Work]] = {}  # may still hold withdrawn work (skipped by take)
        self.order: deque[str] = deque()  # tenants with queued work, in round-robin order
        self.load: dict[str, int] = {}  # queued + in flight, per tenant
        self.waiting: dict[str, int] = {}  # queued (not withdrawn), per tenant
        self.depth = [0]  # depth[k]: tenants with at least k items waiting (k >= 1)
        self.queued = 0
        self.control: deque[Callable[[], None]] = deque()
        self.closed = False
        self.rate = ServiceRate()
        # Queued work in submission order (so, by deadline), held weakly: work handed out and answered is
        # freed at once, not kept (with its sequence, queue and the request's objects) until its bound passes.
        self.deadlines: deque[weakref.ref[Work]] = deque()
        self._last_deadline = 0.0  # the ``enqueued`` of the last work put on ``deadlines``
        self._reaper_cv = threading.Condition(lock)  # the same lock, woken apart from the worker
        self._reaper: threading.Thread | None = None

    # --- admission ----------------------------------------------------------------------------------
    def submit(self, works: list[Work]) -> None:
        """Queue all of ``works`` (one request) or none of them. Their ``enqueued`` is when the request
        arrived (``Runtime.submit``): the time it spent before the queue counts against the bound."""
        if not works:
            return
        tenant = works[0].tenant
        try:
            with self.cv:
                now = time.monotonic()
                self._admit(tenant, len(works), now - works[0].enqueued)
                q = self.queues.get(tenant)
                if q is None:
                    q = self.queues[tenant] = deque()
                    self.order.append(tenant)
                q.extend(works)
                self.queued += len(works)
                self.load[tenant] = self.load.get(tenant, 0) + len(works)
                self._waiting_add(tenant, len(works))
                if self.max_delay > 0:
                    if self._deadline_head() is None:
                        self._reaper_cv.notify()
                    else:  # the reaper reads the deadlines in order: never earlier than the last one queued
                        for w in works:
                            w.enqueued = max(w.enqueued, self._last_deadline)
                    self.deadlines.extend(weakref.ref(w) for w in works)
                    self._last_deadline = works[-1].enqueued
                self.cv.notify_all()
        except Overloaded as e:
            self._count(tenant, e.code, len(works))
            raise

    def precheck(self, tenant: str, n: int, arrived: float) -> Overloaded | None:
        """Whether ``n`` items of ``tenant`` that arrived at ``arrived`` (time.monotonic) would be refused
        now (the refusal, counted as ``submit`` counts it), before anything is parsed or tokenised for
        them; None: submit them (``submit`` checks again)."""
        try:
            with self.cv:
                self._admit(tenant, n, time.monotonic() - arrived)
        except Overloaded as e:
            self._count(tenant, e.code, n)
            return e
        return None

    def admission_state(self) -> AdmissionState:
        """The fields the admission rule reads (the live dicts, not copies: read it under ``cv``)."""
        return AdmissionState(self.max_queue, self.per_tenant, self.max_delay, self.closed, self.queued,
                              self.rate.per_second(), self.load, self.waiting, self.depth)

    def _admit(self, tenant: str, n: int, waited: float = 0.0) -> None:
        admit(self.admission_state(), tenant, n, waited)

    def _waiting_add(self, tenant: str, n: int) -> None:
        waiting_add(self.waiting, self.depth, tenant, n)

    def _withdraw(self, w: Work) -> bool:
        """Take queued ``w`` out of every count (its deque entry is skipped later); False if not queued."""
        if w.state != QUEUED:
            return False
        w.state = WITHDRAWN
        self.queued -= 1
        self._waiting_add(w.tenant, -1)
        self._finished(w)
        return True

    def cancel(self, w: Work, reason: str = "client_left") -> None:
        """Nobody waits for ``w``: queued, it leaves the queue now; running, the worker frees it."""
        with self.cv:
            w.cancel(reason)
            if self._withdraw(w):
                self._cancelled(w)

    def _cancelled(self, w: Work) -> None:
        if self.on_cancelled is not None:
            try:
                self.on_cancelled("queued", w)
            except Exception:
                log.exception("counting cancelled work failed")

    def _count(self, tenant: str, reason: str, n: int) -> None:
        if self.on_shed is not None:
            try:
                self.on_shed(tenant, reason, n)
            except Exception:
                log.exception("counting shed work failed")

    # --- the queue-delay bound --------------------------------------------------------------------
    def start(self) -> None:
        if self.max_delay > 0 and self._reaper is None:
            self._reaper = threading.Thread(target=self._reap, name="lorafleet-queue-reaper", daemon=True)
            self._reaper.start()

    def _reap(self) -> None:
        """Answer 429 for work still queued when its bound passes (its own thread: the worker may be in
        the middle of a forward pass, and the answer must not wait for it)."""
        while True:
            expired: list[Work] = []
            with self.cv:
                if self.closed:
                    return
                now = time.monotonic()
                while (w := self._deadline_head()) is not None and w.enqueued + self.max_delay <= now:
                    self.deadlines.popleft()
                    if self._withdraw(w):
                        expired.append(w)
                if not expired:
                    wait = w.enqueued + self.max_delay - now if w is not None else None
                    del w
                    self._reaper_cv.wait(timeout=wait)
                    continue
            ms = self.max_delay * 1000
            for w in expired:
                w.send("error", Overloaded(f"the request waited maxQueueDelayMs ({ms:.0f} ms) in the queue of "
                                           f"tenant {w.tenant!r} without reaching the model: the runtime is "
                                           "overloaded; retry later", "queue_timeout"))
            by_tenant: dict[str, int] = {}
            for w in expired:
                by_tenant[w.tenant] = by_tenant.get(w.tenant, 0) + 1
            for tenant, n in by_tenant.items():
                self._count(tenant, "queue_timeout", n)

    # --- the worker's side ------------------------------------------------------------------------
    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the model-worker thread between batches."""
        with self.cv:
            self.control.append(fn)
            self.cv.notify_all()

    def oldest(self) -> float | None:
        return min((q[0].enqueued for q in self.queues.values() if q), default=None)

    def take(self, n: int, accept: Callable[[Work], bool], in_flight: int | None = None) -> list[Work]:
        """Up to ``n`` works, one tenant at a time in rotation, skipping heads ``accept`` refuses.
        ``in_flight``: what a continuous-batching worker (generation, diffusion) runs already, which
        tells the service rate whether this take starts from idle (``ServiceRate``); None for a worker
        that serves one batch at a time."""
        out: list[Work] = []
        now = time.monotonic()
        with self.cv:
            skipped: list[str] = []
            while len(out) < n and self.order:
                tenant = self.order.popleft()
                q = self.queues[tenant]
                self._skip_withdrawn(q)
                took = bool(q) and accept(q[0])
                if not took and q and q[0].fallback and q[0].entry is not None \
                        and now - q[0].enqueued >= self.fallback_after:
                    # No slot for this adapter within the deadline, and it opted in: the base answers.
                    q[0].entry, q[0].fell_back = None, "slot_timeout"
                    took = accept(q[0])
                if took:
                    w = q.popleft()
                    w.state = TAKEN
                    self.queued -= 1
                    self._waiting_add(tenant, -1)
                    out.append(w)
                    self._skip_withdrawn(q)
                if not q:
                    del self.queues[tenant]
                elif took:
                    self.order.append(tenant)
                else:
                    skipped.append(tenant)
            self.order.extendleft(reversed(skipped))
            self._deadline_head()  # what was handed out from the head needs no deadline
            self.rate.took(len(out), self.queued, time.monotonic(), fresh=in_flight == 0)
        return out

    def _deadline_head(self) -> Work | None:
        """The first work on ``deadlines`` still queued, dropping the heads handed out, gone or freed before
        it (call under the lock). Held strongly, a 2 s bound kept 1,800 requests' work alive for 950 in
        flight at 1,000 clients, and the garbage collector walked all of it (docs/benchmarks.md)."""
        dl = self.deadlines
        while dl:
            w = dl[0]()
            if w is not None and w.state == QUEUED:
                return w
            dl.popleft()
        return None

    def _skip_withdrawn(self, q: deque[Work]) -> None:
        """Drop the heads that left the queue unserved (cancelled without ``cancel``: withdrawn here)."""
        while q and (q[0].state != QUEUED or q[0].cancelled):
            w = q.popleft()
            if self._withdraw(w):  # cancelled without ``cancel``
                self._cancelled(w)

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
            self._reaper_cv.notify_all()


class _Flight:
    """A pipelined step sent to the engine and not yet read: its new and running work, when it was sent."""

    __slots__ = ("handle", "new", "running", "sent")

    def __init__(self, handle, new: list[Work], running: list[Work], sent: float):
        self.handle, self.new, self.running, self.sent = handle, new, running, sent


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
        self._out: list[tuple[Work, str, object]] = []  # events not yet handed to the loop (``_flush``)
        self._flight: _Flight | None = None  # the pipelined step sent and not yet read (``_pipelined_step``)
        self._last_read = 0.0  # when the last pipelined step's answer was read

    def run(self) -> None:
        while not self.sched.closed:
            try:
                self._control()
                if getattr(self.engine, "pipelined", False):
                    self._pipelined_step()
                elif isinstance(self.engine, GenerationEngine):
                    self._generation_step()
                else:
                    self._classification_step()
            except Exception:  # never let one bad batch kill the worker
                log.exception("model worker step failed")
            finally:
                self._flush()
        for w in self.active:
            w.send("error", RuntimeError("the runtime is shutting down"))

    def _cpu(self) -> float:
        """CPU seconds of this thread, or of the model process that computes for it (model_process.py)."""
        cpu = getattr(self.engine, "cpu_time", None)
        return cpu() if cpu is not None else time.thread_time()

    def _send(self, w: Work, kind: str, value=None) -> None:
        """``w.send`` from this thread: events wait in order for ``_flush`` (after a step's forward
        pass), so a batch wakes the event loop once, not once per row."""
        self._out.append((w, kind, value))

    def _flush(self) -> None:
        if self._out:
            out, self._out = self._out, []
            send_all(out)

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
            if w.cancelled:  # between the queue and the model: it never runs
                self.sched.finished(w)
                if self.metrics:
                    self.metrics.cancelled_work("queued", w)
                continue
            try:
                w.payload_slot = self.engine.acquire(w.entry)
                ok.append(w)
            except Exception as e:
                self._send(w, "error", e)
                self.sched.finished(w)
        return ok

    def _release(self, w: Work) -> None:
        self.engine.release(w.entry)
        self.sched.finished(w)
        if w.cancelled and self.metrics:
            self.metrics.cancelled_work("running", w)

    def _classification_step(self) -> None:
        engine: ClassificationEngine = self.engine  # type: ignore[assignment]
        self._wait_for_batch(idle=True)
        batch = self.sched.take(self.max_batch, self._acceptor(set()))
        if not batch:
            return
        batch = self._acquire(batch)
        if not batch:
            return
        t0, c0 = time.perf_counter(), self._cpu()
        for w in batch:
            w.steps += 1
        try:
            probs = engine.classify([w.payload for w in batch], [w.payload_slot for w in batch],
                                    [len(w.entry.labels or []) for w in batch])
            for w, p in zip(batch, probs):
                self._send(w, "result", p)
        except Exception as e:
            log.exception("classification batch failed")
            for w in batch:
                self._send(w, "error", e)
        finally:
            for w in batch:
                self._release(w)
        if self.metrics:
            self.metrics.batch(engine.task, len(batch), time.perf_counter() - t0, self._cpu() - c0)

    def _generation_step(self, new: list[Work] | None = None, pack: bool = True) -> None:
        """One step: new work's prefill and the running rows' decode, packed into one forward where the
        engine can undo a failure (else, or with ``pack`` False, the two apart). ``new``: work already
        taken and holding its slots (the pipeline's rows to run again after a failed step)."""
        engine: GenerationEngine = self.engine  # type: ignore[assignment]
        if new is None:
            if not self.active:
                self._wait_for_batch(idle=True)
            elif any(w.cancelled for w in self.active):
                self._retire(cancelled_only=True)  # rows nobody reads any more are freed before this step
            room = min(self.max_batch - len(self.active), len(engine.free_rows))
            new = []
            if room > 0 and self.sched.queued:
                held = {w.key for w in self.active if w.key is not None}
                new = self._acquire(self.sched.take(room, self._acceptor(held), in_flight=len(self.active)))
        t0, c0 = time.perf_counter(), self._cpu()
        if new:
            for w in new:
                w.payload.slot = w.payload_slot
        rows = len(self.active) + len(new)
        # Packed only where a failed step can be retried apart (``packs``: the engine undoes the new rows).
        if pack and engine.packs([w.payload for w in new], [w.payload for w in self.active]) and \
                self._packed_step(engine, new):
            if self.metrics:
                self.metrics.batch(engine.task, rows, time.perf_counter() - t0, self._cpu() - c0)
            return
        if new:
            seqs = [w.payload for w in new]
            for w in new:
                w.steps += 1
            try:
                toks = engine.prefill(seqs)
            except Exception as e:
                log.exception("prefill failed")
                for w in new:
                    self._fail(w, e)
                new = []
                toks = []
            for w, tok in zip(new, toks):
                self._send(w, "token", tok)
            self.active.extend(new)
            self._retire()
            self._flush()  # first tokens go out before the decode step of the others
        # Sequences admitted above already have their first token; all running ones step together.
        if self.active:
            step = [w for w in self.active if w not in new] if new else list(self.active)
            if step:
                for w in step:
                    w.steps += 1
                try:
                    toks = engine.decode([w.payload for w in step])
                except Exception as e:
                    log.exception("decode step failed")
                    for w in step:
                        self._fail(w, e)
                    failed = set(map(id, step))
                    self.active = [w for w in self.active if id(w) not in failed]
                    return
                for w, tok in zip(step, toks):
                    self._send(w, "token", tok)
                self._retire()
            if self.metrics:  # the rows this step ran (``new`` are in ``active`` by now)
                self.metrics.batch(engine.task, rows, time.perf_counter() - t0, self._cpu() - c0)

    def _pipelined_step(self) -> None:
        """One turn of the pipeline (an engine with ``send_step`` / ``collect_step``: the model process). The
        next step goes out before the answer to the one in flight is read, so the model computes while this
        thread hands that answer's tokens out, retires rows and takes work (the model waited for that
        between steps, and longest while the event loop held the interpreter lock: docs/benchmarks.md).
        The next step runs every active row except those the step in flight ends for certain (their last
        token), so batches stay full; a row the step in flight ends otherwise (an end-of-sequence or stop
        token) the model process skips. New work therefore starts one step later than it would otherwise.
        Work a step cannot pack (prompt logprobs) waits for the pipeline to drain and runs as before."""
        engine = self.engine
        flight = self._flight
        if flight is None and not self.active:
            self._wait_for_batch(idle=True)
        if any(w.cancelled for w in self.active):
            self._retire(cancelled_only=True)
        running = [w for w in self.active if flight is None or not self._ends_in_flight(w)]
        room = min(self.max_batch, engine.max_seqs) - len(running)
        new: list[Work] = []
        if room > 0 and self.sched.queued:
            held = {w.key for w in self.active if w.key is not None}
            new = self._acquire(self.sched.take(room, self._acceptor(held), in_flight=len(self.active)))
        if any(w.payload.prompt_logprobs is not None for w in new):
            if flight is not None:
                self._flight = None
                self._read(flight, None)
            self._generation_step(new)
            return
        sent = None
        if new or running:
            for w in new:
                w.payload.slot = w.payload_slot
            try:
                handle = engine.send_step([w.payload for w in new], [w.payload for w in running])
            except Exception as e:  # the channel is gone (ModelProcessDied): nothing can run
                for w in list(self.active) + new:
                    self._fail(w, e)
                self.active, self._flight = [], None
                return
            self.active.extend(new)
            sent = _Flight(handle, new, running, time.perf_counter())
        self._flight = sent
        if flight is None:
            self._last_read = time.perf_counter()
        else:
            self._read(flight, sent)

    @staticmethod
    def _ends_in_flight(w: Work) -> bool:
        seq: Sequence = w.payload
        return len(seq.generated) + 1 >= seq.max_new_tokens

    def _read(self, flight: "_Flight", behind: "_Flight | None") -> None:
        """Read ``flight``'s answer and hand out its tokens; ``behind``: the step sent after it."""
        engine = self.engine
        c0 = engine.cpu_time()
        try:
            toks_new, toks_run = engine.collect_step(flight.handle)
        except Exception as e:
            self._step_failed(flight, behind, e)
            return
        now = time.perf_counter()
        for w, tok in zip(flight.new, toks_new):
            if tok is not None:
                w.steps += 1
                self._send(w, "token", tok)
        for w, tok in zip(flight.running, toks_run):
            if tok is not None:
                w.steps += 1
                self._send(w, "token", tok)
        self._retire()
        if self.metrics:  # the model's time on it: from when it could start (sent, and the one before read)
            self.metrics.batch(engine.task, len(flight.new) + len(flight.running),
                               now - max(flight.sent, self._last_read), engine.cpu_time() - c0)
        self._last_read = now

    def _step_failed(self, flight: "_Flight", behind: "_Flight | None", error: Exception) -> None:
        """A pipelined step failed: its new rows are free again and its running rows have not moved, and the
        step sent behind it was skipped. After a resync each of both steps' new prompts is prefilled alone and
        the running rows go on with the next step, so one bad prompt costs the others nothing."""
        engine = self.engine
        self._flight = None
        retry = list(flight.new)
        try:
            if behind is not None:
                try:
                    engine.collect_step(behind.handle)
                except Exception as e:  # StepSkipped, as expected; anything else is the channel gone
                    if type(e).__name__ != "StepSkipped":
                        raise
                retry += behind.new
            if type(error).__name__ == "ModelProcessDied":
                raise error
            log.warning("pipelined generation step failed (%s: %s); running its rows again apart",
                        type(error).__name__, error)
            engine.resync()
        except Exception as e:  # the model process is gone: nothing can run
            for w in self.active:
                self._fail(w, e)
            self.active = []
            return
        active = set(map(id, self.active))
        retry = [w for w in retry if id(w) in active]  # not what was retired meanwhile (cancelled)
        again = set(map(id, retry))
        self.active = [w for w in self.active if id(w) not in again]
        for w in retry:  # each prompt alone: only the one the model cannot run fails
            try:
                tok = engine.prefill([w.payload])[0]
            except Exception as e:
                log.exception("prefill failed")
                self._fail(w, e)
                continue
            w.steps += 1
            self._send(w, "token", tok)
            self.active.append(w)
        self._retire()
        self._last_read = time.perf_counter()

    def _packed_step(self, engine: GenerationEngine, new: list[Work]) -> bool:
        """The new sequences' prefill and the running ones' decode step in one forward
        (``GenerationEngine.step``); False if it failed, after which the caller runs the two apart (the
        engine has undone the new rows), so one bad prompt costs the others nothing."""
        running = list(self.active)
        try:
            toks_new, toks_run = engine.step([w.payload for w in new], [w.payload for w in running])
        except Exception:
            log.exception("packed prefill + decode step failed; running the two apart")
            return False
        for w, tok in zip(new, toks_new):
            w.steps += 1
            self._send(w, "token", tok)
        for w, tok in zip(running, toks_run):
            w.steps += 1
            self._send(w, "token", tok)
        self.active.extend(new)
        self._retire()
        return True

    def _fail(self, w: Work, error: Exception) -> None:
        self.engine.finish(w.payload)
        self._send(w, "error", error)
        self._count_tokens(w)
        self.engine.release(w.entry)
        self.sched.finished(w)

    def _count_tokens(self, w: Work) -> None:
        if self.metrics and w.payload.generated:
            self.metrics.tokens.labels(w.tenant).inc(len(w.payload.generated))

    def _retire(self, cancelled_only: bool = False) -> None:
        engine: GenerationEngine = self.engine  # type: ignore[assignment]
        keep = []
        for w in self.active:
            seq: Sequence = w.payload
            # A row without a token yet (its prefill still in flight: the pipeline) cannot be done.
            if w.cancelled or (not cancelled_only and seq.generated and engine.is_done(seq)):
                engine.finish(seq)
                if not w.cancelled:
                    reason = "length" if len(seq.generated) >= seq.max_new_tokens or seq.pos >= engine.max_len \
                        else "stop"
                    self._send(w, "done", reason)
                self._count_tokens(w)
                self._release(w)
            else:
                keep.append(w)
        self.active = keep

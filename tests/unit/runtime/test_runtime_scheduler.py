"""The scheduler's overload rules without a model: the queue-delay estimate refuses the tenant over its
share first, the reaper answers 429 for work still queued at the bound without the worker, cancelled
work leaves the counts at once, and the service rate is measured only while work waits; the precheck
admission asks before parsing, the wait before the queue counts, the O(1) slot filter, batched events."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from lorafleet.runtime.engine_api import Overloaded, Work, send_all
from lorafleet.runtime.multilora import SlotAllocator
from lorafleet.runtime.worker import Scheduler, ServiceRate, slot_acceptor


class Shed:
    def __init__(self):
        self.counts: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()

    def __call__(self, tenant: str, reason: str, n: int) -> None:
        with self.lock:
            self.counts[(tenant, reason)] = self.counts.get((tenant, reason), 0) + n


def work(loop, tenant: str, payload=None) -> Work:
    return Work(tenant, None, payload, loop, asyncio.Queue())


def measured(sched: Scheduler, per_second: float) -> None:
    """Give ``sched`` a measured rate: two backlogged takes 1/per_second apart, one item each."""
    sched.rate.took(1, 5, 100.0)
    sched.rate.took(1, 5, 100.0 + 1.0 / per_second)
    assert sched.rate.per_second() == pytest.approx(per_second)


def test_the_tenant_over_its_share_is_refused_first():
    loop = asyncio.new_event_loop()
    shed = Shed()
    # 10.2 items/s and a 1 s bound: 10 items can be waiting (0.98 s; the time each spends before the
    # queue counts too, and may use the 20 ms left), an 11th cannot (1.08 s).
    sched = Scheduler(max_queue=1000, per_tenant_max_inflight=1000, max_queue_delay_ms=1000, on_shed=shed)
    measured(sched, 10.2)
    admitted = {"heavy": 0, "light": 0}
    for _ in range(15):
        try:
            sched.submit([work(loop, "heavy")])
            admitted["heavy"] += 1
        except Overloaded as e:
            assert e.code == "queue_delay" and e.retry_after >= 1
            assert "'heavy'" in str(e) and "maxQueueDelayMs 1000" in str(e)
    assert admitted["heavy"] == 10 and shed.counts == {("heavy", "queue_delay"): 5}
    # The queue is full for the heavy tenant, but a light one is taken in turn with it: its first
    # five items are served within ten, so they are admitted (the heavy tenant's later items wait).
    for _ in range(8):
        try:
            sched.submit([work(loop, "light")])
            admitted["light"] += 1
        except Overloaded as e:
            assert e.code == "queue_delay"
    assert admitted["light"] == 5
    assert shed.counts == {("heavy", "queue_delay"): 5, ("light", "queue_delay"): 3}
    # Round-robin order: the light tenant's five are among the first ten taken.
    taken = sched.take(10, lambda w: True)
    assert [w.tenant for w in taken].count("light") == 5
    loop.close()


def test_without_a_measured_rate_or_a_bound_nothing_is_refused_by_delay():
    loop = asyncio.new_event_loop()
    for delay in (1000, 0):
        sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=delay)
        if delay == 0:
            measured(sched, 1.0)
        for _ in range(50):
            sched.submit([work(loop, "t")])
        assert sched.queued == 50
    loop.close()


def test_work_still_queued_at_the_bound_is_answered_429_without_the_worker():
    shed = Shed()
    sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=50, on_shed=shed)
    sched.start()  # the reaper; no model worker runs at all

    async def main():
        loop = asyncio.get_running_loop()
        works = [work(loop, "a") for _ in range(3)] + [work(loop, "b")]
        for w in works[:3]:
            sched.submit([w])
        sched.submit([works[3]])
        got = [await asyncio.wait_for(w.events.get(), 10) for w in works]
        return got

    try:
        got = asyncio.run(main())
    finally:
        sched.close()
    for kind, value in got:
        assert kind == "error" and isinstance(value, Overloaded) and value.code == "queue_timeout"
        assert "maxQueueDelayMs (50 ms)" in str(value)
    assert shed.counts == {("a", "queue_timeout"): 3, ("b", "queue_timeout"): 1}
    assert sched.queued == 0 and sched.load == {} and sched.waiting == {} and sched.depth[1:] == [0] * 3
    assert sched.take(10, lambda w: True) == []


def test_taken_work_is_never_shed_and_cancelled_work_leaves_the_counts_at_once():
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=3, per_tenant_max_inflight=3, max_queue_delay_ms=0)
    ws = [work(loop, "t") for _ in range(3)]
    for w in ws:
        sched.submit([w])
    with pytest.raises(Overloaded) as e:
        sched.submit([work(loop, "t")])
    assert e.value.code == "queue_full"
    sched.cancel(ws[1])
    assert sched.queued == 2 and sched.load == {"t": 2}
    sched.submit([work(loop, "u")])  # room again, before any worker looked at the queue
    taken = sched.take(10, lambda w: True)
    assert ws[1] not in taken and [w.tenant for w in taken] == ["t", "u", "t"]
    assert sched.queued == 0 and sched.load == {"t": 2, "u": 1}
    sched.cancel(taken[0])  # running: the worker frees it; the scheduler's counts wait for finished()
    assert taken[0].cancelled and sched.load["t"] == 2
    loop.close()


def test_refused_requests_are_all_or_nothing_and_counted_per_item():
    loop = asyncio.new_event_loop()
    shed = Shed()
    sched = Scheduler(max_queue=10, per_tenant_max_inflight=4, on_shed=shed)
    sched.submit([work(loop, "t") for _ in range(3)])
    with pytest.raises(Overloaded) as e:
        sched.submit([work(loop, "t") for _ in range(2)])
    assert e.value.code == "tenant_over_share" and "perTenantMaxInflight 4" in str(e.value)
    assert sched.queued == 3 and shed.counts == {("t", "tenant_over_share"): 2}
    loop.close()


def test_the_service_rate_counts_only_backlogged_intervals():
    r = ServiceRate(tau=2.0)
    r.took(4, 0, 10.0)  # the queue ran empty: the next interval is arrival-bound, not counted
    r.took(4, 3, 20.0)
    assert r.per_second() is None
    r.took(8, 3, 20.5)  # backlogged: 8 items in 0.5 s
    assert r.per_second() == pytest.approx(16.0)
    r.took(2, 0, 21.0)  # 2 more in 0.5 s, weighted with the earlier interval
    assert 4.0 < r.per_second() < 16.0


def test_a_generation_batch_started_from_idle_is_no_sample_of_the_service_rate():
    """A fresh generation worker takes 32 rows at once; its next take waits for the first row to end
    (a whole generation, 3 s). Counted, that read as 0.33 items/s and a 10 s bound refused anything
    behind 4 queued requests; the rate comes from the takes as rows free instead."""
    r = ServiceRate(tau=2.0)
    r.took(32, 32, 100.0, fresh=True)
    r.took(1, 31, 103.0)  # the first row done after a whole generation: not a sample
    assert r.per_second() is None
    for i in range(1, 11):  # then rows free every 50 ms, one or two at a time
        r.took(1 + i % 2, 31, 103.0 + 0.05 * i)
    assert 25.0 < r.per_second() < 35.0
    # A take with work already in flight (or a one-batch-at-a-time worker) is an ordinary sample.
    s = ServiceRate(tau=2.0)
    s.took(4, 3, 10.0)
    s.took(4, 3, 10.5)
    assert s.per_second() == pytest.approx(8.0)


def test_the_scheduler_tells_the_rate_whether_a_take_started_from_idle():
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=10_000)
    sched.submit([work(loop, "t") for _ in range(6)])
    assert len(sched.take(2, lambda w: True, in_flight=0)) == 2
    assert sched.rate.backlogged is False  # the interval until the next take is the first rows' service time
    assert len(sched.take(1, lambda w: True, in_flight=1)) == 1
    assert sched.rate.backlogged is True
    assert len(sched.take(1, lambda w: True)) == 1  # one batch at a time: every interval is a service time
    assert sched.rate.backlogged is True
    loop.close()


def test_the_precheck_refuses_and_counts_what_submit_would():
    loop = asyncio.new_event_loop()
    shed = Shed()
    sched = Scheduler(max_queue=1000, per_tenant_max_inflight=12, max_queue_delay_ms=1000, on_shed=shed)
    measured(sched, 10.2)  # 10 fit within the bound, an 11th does not
    for _ in range(10):
        assert sched.precheck("heavy", 1, time.monotonic()) is None
        sched.submit([work(loop, "heavy")])
    e = sched.precheck("heavy", 1, time.monotonic())
    assert isinstance(e, Overloaded) and e.code == "queue_delay" and "'heavy'" in str(e)
    assert sched.precheck("light", 1, time.monotonic()) is None  # taken in turn with the heavy one
    e = sched.precheck("heavy", 3, time.monotonic())
    assert e.code == "tenant_over_share"
    assert shed.counts == {("heavy", "queue_delay"): 1, ("heavy", "tenant_over_share"): 3}
    assert sched.queued == 10  # a precheck queues nothing
    loop.close()


def test_the_time_a_request_spent_before_the_queue_counts_against_the_bound():
    loop = asyncio.new_event_loop()
    shed = Shed()
    sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=1000, on_shed=shed)
    # No measured rate yet: the wait so far alone refuses it.
    late = work(loop, "t")
    late.enqueued = time.monotonic() - 1.5
    with pytest.raises(Overloaded) as e:
        sched.submit([late])
    assert e.value.code == "queue_delay" and "before reaching the queue" in str(e.value)
    assert sched.precheck("t", 1, time.monotonic() - 1.5).code == "queue_delay"
    # A measured rate: round-robin with tenant u puts 2 items ahead (0.2 s at 10/s); with 0.9 s spent
    # before the queue, over 1 s.
    measured(sched, 10.0)
    for _ in range(4):
        sched.submit([work(loop, "u")])
    assert sched.precheck("t", 1, time.monotonic() - 0.3) is None
    e = sched.precheck("t", 1, time.monotonic() - 0.9)
    assert e.code == "queue_delay" and "ms of it before the queue" in str(e)
    assert shed.counts == {("t", "queue_delay"): 3} and sched.queued == 4
    loop.close()


def test_queued_work_keeps_its_deadlines_in_order():
    """The reaper reads deadlines from the head: work that arrived earlier but was queued later is never
    put before what is queued already (its deadline moves later, never earlier)."""
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=60_000)
    first, early = work(loop, "a"), work(loop, "b")
    early.enqueued = first.enqueued - 5.0
    sched.submit([first])
    sched.submit([early])
    assert [r().enqueued for r in sched.deadlines] == [first.enqueued, first.enqueued]
    loop.close()


def test_the_slot_filter_agrees_with_can_acquire():
    """``slot_acceptor`` keeps running counts; it must admit exactly what ``can_acquire`` of everything
    chosen so far would, whatever the slots hold (free, referenced, pinned, unreferenced residents)."""
    rng = random.Random(7)
    for trial in range(300):
        slots = SlotAllocator(rng.randint(1, 6))
        for _ in range(rng.randint(0, 12)):  # a history of acquires and releases
            k = rng.randint(1, 10)
            if rng.random() < 0.6:
                slots.acquire(k, pinned=rng.random() < 0.1)
            else:
                slots.release(k)
        held = {k for k in range(1, 11) if slots.slot_of(k) is not None and rng.random() < 0.3}
        accept = slot_acceptor(slots, held)
        chosen = set(held)
        for _ in range(8):
            k = rng.choice([None, *range(1, 13)])
            entry = None if k is None else type("E", (), {"key": k})()
            want = k is None or k in chosen or slots.can_acquire(chosen | {k})
            assert accept(Work("t", entry, None, None, None)) == want, (trial, k, chosen)
            if want and k is not None:
                chosen.add(k)


def test_a_batch_of_events_wakes_each_loop_once():
    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (wakeups.append(a), real(*a))[1]
        ws = [work(loop, "t") for _ in range(5)]
        events = [(w, "token", i) for i, w in enumerate(ws)] + [(ws[0], "done", "length")]
        threading.Thread(target=send_all, args=(events,)).start()
        got = [await asyncio.wait_for(ws[0].events.get(), 10), await asyncio.wait_for(ws[0].events.get(), 10)]
        got += [await asyncio.wait_for(w.events.get(), 10) for w in ws[1:]]
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    assert wakeups == 1
    assert got == [("token", 0), ("done", "length"), ("token", 1), ("token", 2), ("token", 3), ("token", 4)]


def test_work_handed_out_is_not_kept_alive_by_the_queue_delay_bound():
    """A request's work taken by the model worker and finished is freed at once (by reference counting:
    the collector is off), not held until its queue-delay bound passes; work still queued keeps its
    deadline (its 429 at the bound: test_work_still_queued_at_the_bound_is_answered_429_without_the_worker)."""
    import weakref

    from support.collector import collector_off

    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=100, per_tenant_max_inflight=100, max_queue_delay_ms=60_000)
    with collector_off():
        taken_refs, waiting = [], []
        for i in range(6):
            w = work(loop, f"t{i % 2}", payload=[i] * 8)
            sched.submit([w])
            if i < 4:
                taken_refs.append(weakref.ref(w))
            else:
                waiting.append(w)
            del w
        out = sched.take(4, lambda w: True)
        assert [x.payload[0] for x in out] == [0, 1, 2, 3]
        for x in out:
            sched.finished(x)
        del out, x
        assert [r() for r in taken_refs] == [None] * 4, "taken work still referenced by the scheduler"
        assert [r() for r in sched.deadlines] == waiting and sched.queued == 2
    loop.close()

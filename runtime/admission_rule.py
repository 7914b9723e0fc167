"""The admission rule (queue, per-tenant share, queue-delay bound) as a pure function over a small state
object, so the scheduler (worker.py) and the HTTP front (front.py, another process) refuse the same
work with the same answer; and the 429 a refusal is answered with.

Torch-free and framework-free on purpose: the front imports it and must start in well under a second."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from lorafleet.runtime.engine_api import Overloaded

# Routes whose JSON body names the adapter in ``model`` (how many work items a body makes: ``items_of``),
# and the pool task that serves each.
GATED = {"/v1/classify": "sequence-classification", "/v1/completions": "text-generation",
         "/v1/chat/completions": "text-generation"}
MAX_PEEK_BYTES = 1 << 20  # larger bodies are left to the route


@dataclass
class AdmissionState:
    """What the rule reads: the scheduler's own fields (``Scheduler.admission_state``), or the front's
    copy of them (the backend's last snapshot plus what the front forwarded since)."""

    max_queue: int
    per_tenant: int
    max_delay: float  # seconds; 0: no bound
    closed: bool = False
    queued: int = 0
    rate: float | None = None  # work items started per second while work waits (ServiceRate)
    load: dict[str, int] = field(default_factory=dict)  # queued + in flight, per tenant
    waiting: dict[str, int] = field(default_factory=dict)  # queued, per tenant
    depth: list[int] = field(default_factory=lambda: [0])  # depth[k]: tenants with at least k waiting


def waiting_add(waiting: dict[str, int], depth: list[int], tenant: str, n: int) -> None:
    """``n`` more (or fewer, negative) of ``tenant``'s items wait (``AdmissionState.waiting``); keeps
    ``depth`` in step."""
    before = waiting.get(tenant, 0)
    after = before + n
    if n > 0:
        while len(depth) <= after:
            depth.append(0)
        for k in range(before + 1, after + 1):
            depth[k] += 1
    else:
        for k in range(after + 1, before + 1):
            depth[k] -= 1
    if after:
        waiting[tenant] = after
    else:
        waiting.pop(tenant, None)


def admit(s: AdmissionState, tenant: str, n: int, waited: float = 0.0) -> None:
    """Raise ``Overloaded`` if ``n`` items of ``tenant`` that have waited ``waited`` seconds since they
    arrived must be refused now; return if they may be queued."""
    if s.closed:
        raise Overloaded("the runtime is shutting down", "shutting_down", 5)
    if s.queued + n > s.max_queue:
        raise Overloaded(f"the runtime's queue is full ({s.queued} waiting, maxQueue {s.max_queue}); "
                         "retry later", "queue_full")
    if s.load.get(tenant, 0) + n > s.per_tenant:
        raise Overloaded(f"tenant {tenant!r} already has {s.load.get(tenant, 0)} requests queued or "
                         f"running (perTenantMaxInflight {s.per_tenant}); retry later", "tenant_over_share")
    if s.max_delay <= 0:
        return
    waited = max(0.0, math.floor(waited * 1000) / 1000)  # whole ms: the call's own microseconds do not count
    rate = s.rate
    if rate is None:
        if waited > s.max_delay:
            raise Overloaded(f"the request waited {waited * 1000:.0f} ms before reaching the queue of tenant "
                             f"{tenant!r}, over maxQueueDelayMs {s.max_delay * 1000:.0f}: the runtime is "
                             "overloaded; retry later", "queue_delay")
        return
    # Round-robin: before the last of these n is taken, every tenant gives up to as many as this
    # tenant will have waiting (sum over tenants of min(waiting, mine + n)).
    mine = s.waiting.get(tenant, 0) + n
    depth = s.depth
    ahead = sum(depth[1: mine + 1]) + n
    delay = waited + ahead / rate
    if delay > s.max_delay:
        retry = min(60, max(1, math.ceil(delay - s.max_delay)))
        before = f", {waited * 1000:.0f} ms of it before the queue" if waited else ""
        raise Overloaded(f"tenant {tenant!r} has {mine - n} requests waiting; at this runtime's rate "
                         f"({rate:.0f} items/s) this request would wait about {delay * 1000:.0f} ms{before}, "
                         f"over maxQueueDelayMs {s.max_delay * 1000:.0f}; retry later", "queue_delay", retry)


def items_of(path: str, body: dict) -> int:
    """Work items a gated route's JSON body makes (a classification of a list: one per text)."""
    if path == "/v1/classify":
        inp = body.get("input")
        return len(inp) if isinstance(inp, list) and inp else 1
    return 1


def json_object(raw: bytes) -> dict | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def refusal_body(e: Overloaded) -> bytes:
    """The 429's body: what protocol.too_busy and error_response give a refused submission."""
    return json.dumps({"error": {"message": str(e), "type": "rate_limit_exceeded", "code": e.code}},
                      ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()


def depth_of(waiting: dict[str, int]) -> list[int]:
    """``AdmissionState.depth`` for ``waiting`` (depth[k]: tenants with at least k items waiting)."""
    top = max(waiting.values(), default=0)
    depth = [0] * (top + 1)
    for v in waiting.values():
        depth[v] += 1
    for k in range(top - 1, 0, -1):
        depth[k] += depth[k + 1]
    depth[0] = 0
    return depth

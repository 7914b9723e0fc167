"""Which replica serves a request (pure): adapter affinity first (resident on the device, then in host
memory), load second, a rendezvous hash for adapters held nowhere so they keep landing on one replica."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

# Best tier an adapter reaches on a replica, as the runtime's GET /v1/models reports it.
TIER_RANK = {"device": 0, "host": 1, "registered": 2}


@dataclass
class Replica:
    name: str                      # the pod's name
    url: str                       # http://host:port of its public API
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> best state held
    inflight: int = 0              # requests this gateway has open on it
    healthy: bool = True           # last poll answered; a connection failure clears it until the next one
    base: str | None = None        # the base model's id
    task: str | None = None
    pool: str = ""                 # the pool it belongs to (the gateway's own, or a merged pool)

    def tier(self, adapter: str) -> int:
        return TIER_RANK.get(self.adapters.get(adapter, ""), 3)


@dataclass(frozen=True)
class Choice:
    order: list[Replica]   # first is the pick; the rest are fallbacks for retries on connection failure
    reason: str            # device | host | hash | spill | round-robin | merged | none


def rendezvous_score(adapter: str, replica: str) -> int:
    """Highest-random-weight hashing: each adapter ranks replicas the same way wherever it is computed,
    and removing a replica only moves the adapters that ranked it first."""
    return int.from_bytes(hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest(), "big")


class AffinityRouter:
    """``spill_inflight``: a replica with that many requests open counts as busy; a busy preferred replica
    hands the request to the next one (that holds the adapter if any does, else the least loaded)."""

    def __init__(self, spill_inflight: int = 8):
        self.spill_inflight = max(1, spill_inflight)

    def choose(self, adapter: str | None, replicas: list[Replica]) -> Choice:
        live = [r for r in replicas if r.healthy] or list(replicas)
        if not live:
            return Choice([], "none")
        if not adapter:
            order = sorted(live, key=lambda r: (r.inflight, r.name))
            return Choice(order, "least-loaded")
        # With placement (docs/operator.md) most replicas do not hold a given adapter, and one that
        # does not answers 503: while any replica holds it, only holders are chosen (and spilled
        # to); the others follow them in the order, as retries only.
        holding = [r for r in live if r.tier(adapter) < 3]
        others = [r for r in live if r.tier(adapter) == 3] if holding else []
        others.sort(key=lambda r: rendezvous_score(adapter, r.name), reverse=True)
        live = holding or live
        hashed = sorted(live, key=lambda r: rendezvous_score(adapter, r.name), reverse=True)
        rank = {r.name: i for i, r in enumerate(hashed)}
        on_device = sorted((r for r in live if r.tier(adapter) == 0), key=lambda r: (r.inflight, rank[r.name]))
        # Not on any device: every holder would have to copy it to a slot, so stay on one replica
        # (host copy first, then the hash order) and the next request finds it resident there.
        elsewhere = sorted((r for r in live if r.tier(adapter) != 0),
                           key=lambda r: (min(r.tier(adapter), 2), rank[r.name]))
        preferred = on_device + elsewhere
        for i, r in enumerate(preferred):
            if r.inflight < self.spill_inflight:
                if i == 0:
                    reason = "device" if on_device else ("host" if r.tier(adapter) == 1 else "hash")
                else:
                    reason = "spill"
                return Choice([r] + [x for x in preferred if x is not r] + others, reason)
        # Every holder is busy: the least loaded one, affinity breaking ties. Non-holders come only
        # after every holder, for retries (this gateway's view of who holds what may be a poll old).
        order = sorted(preferred, key=lambda r: (r.inflight, preferred.index(r)))
        return Choice(order + others, "spill")


class RoundRobinRouter:
    """The baseline the benchmark compares against (what a plain Service or ingress does)."""

    def __init__(self):
        self._n = itertools.count()

    def choose(self, adapter: str | None, replicas: list[Replica]) -> Choice:
        live = [r for r in replicas if r.healthy] or list(replicas)
        if not live:
            return Choice([], "none")
        i = next(self._n) % len(live)
        return Choice(live[i:] + live[:i], "round-robin")

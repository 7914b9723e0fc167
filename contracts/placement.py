"""Which replicas of a pool hold each adapter: rendezvous (highest-random-weight) hashing of the
adapter's served name over the pool's pod names, within each replica's disk and host-memory budgets,
with more holders for adapters whose measured request rate asks for them (``popular_replicas``). Pure and
torch-free; the operator places (``operator/routing.py``), the routes carry the result.

Rendezvous hashing ranks every replica for every adapter the same way wherever it is computed, so a
pod that joins takes about 1/N of the placements and one that leaves gives up only its own.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

ALL = "all"


def score(adapter: str, replica: str) -> int:
    """The adapter's weight for the replica (64 bits of blake2b: stable across processes)."""
    return int.from_bytes(hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest(), "big")


def ranking(adapter: str, replicas: Iterable[str]) -> list[str]:
    """Replicas from the most to the least preferred for ``adapter`` (ties, never seen, by name)."""
    return sorted(replicas, key=lambda r: (-score(adapter, r), r))


@dataclass(frozen=True)
class Demand:
    """One adapter to place: its served name, how many replicas should hold it, and the bytes it
    takes on each (every version it routes; the same bytes count against a replica's disk and its
    host memory). ``base``: the holders placed in the first pass (None: all of ``replicas``); the
    rest are the holders its request rate adds, placed in a second pass, hottest (``rate``) first,
    once every adapter has its base: popularity never takes room an adapter's own count needs."""

    name: str
    replicas: int
    size: int
    base: int | None = None
    rate: float = 0.0


DISK, MEMORY = "disk", "memory"


@dataclass
class Placement:
    holders: dict[str, list[str]]  # served name -> replicas holding it, most preferred first
    used: dict[str, int]           # replica -> bytes placed on it
    short: dict[str, int]          # served name -> base holders it lacks because no replica had room
    blocked: dict[str, list[str]] = field(default_factory=dict)  # served name -> budgets that refused it (DISK, MEMORY)
    # (for a shortfall of base or of popularity holders)
    extra_short: dict[str, int] = field(default_factory=dict)  # served name -> popularity holders without room


def place(demands: Iterable[Demand], replicas: Sequence[str], budget: int | None = None,
          memory_budget: int | None = None) -> Placement:
    """Each adapter on its ``replicas`` most preferred replicas that have room for it: ``budget``
    bytes of disk and ``memory_budget`` bytes of host memory per replica (None: unbounded); a
    replica without room in either is passed over. Base holders are placed in name order, then the
    popularity holders hottest first, so the result depends only on the inputs; an adapter with
    fewer base holders than it asked for is named in ``short`` (with the budgets that refused it in
    ``blocked``), one without room for its popularity holders in ``extra_short``."""
    used = {r: 0 for r in replicas}
    limits = [(DISK, budget), (MEMORY, memory_budget)]
    holders: dict[str, list[str]] = {}
    short: dict[str, int] = {}
    blocked: dict[str, list[str]] = {}
    extra_short: dict[str, int] = {}
    ranked: dict[str, list[str]] = {}

    def fill(d: Demand, want: int, into: dict[str, int]) -> None:
        got = holders.setdefault(d.name, [])
        order = ranked.get(d.name)
        if order is None:
            order = ranked[d.name] = ranking(d.name, used)
        refused: set[str] = set()
        for r in order:
            if len(got) >= want:
                break
            if r in got:
                continue
            over = [k for k, b in limits if b is not None and used[r] + d.size > b]
            if over:
                refused.update(over)
                continue
            got.append(r)
            used[r] += d.size
        if len(got) < want:
            into[d.name] = want - len(got)
            blocked[d.name] = sorted(refused)

    ds = sorted(demands, key=lambda d: d.name)
    extras = []
    for d in ds:
        want = min(max(d.replicas, 0), len(used))
        base = want if d.base is None else min(max(d.base, 0), want)
        fill(d, base, short)
        if want > base:
            extras.append((d, want))
    for d, want in sorted(extras, key=lambda x: (-x[0].rate, x[0].name)):
        if d.name not in short:  # an adapter without room for its base has none for more
            fill(d, want, extra_short)
        else:
            extra_short[d.name] = want - len(holders[d.name])
    return Placement(holders=holders, used=used, short=short, blocked=blocked, extra_short=extra_short)


def replicas_wanted(adapter: int | str | None, pool_default: int | str, pool_replicas: int) -> int | None:
    """How many replicas should hold an adapter: its own ``spec.replicas``, else the pool's
    ``spec.placement.replicasPerAdapter``; None for ``"all"`` (every replica, no placement)."""
    value = pool_default if adapter is None else adapter
    if value == ALL:
        return None
    return max(1, min(int(value), max(pool_replicas, 1)))


# A count lowered by popularity must fit the lower count with this much room to spare: a rate
# hovering at a boundary keeps the higher count instead of moving an adapter back and forth.
LOWER_MARGIN = 0.25


def popular_replicas(rate: float, per_replica: float | None, base: int, previous: int | None, most: int) -> int:
    """Holders an adapter's measured request rate (requests/s, the pool's replicas together) asks
    for: one per ``per_replica`` requests/s, at least ``base``, at most ``most``. Raised as soon as
    the rate needs it; lowered from ``previous`` only to a count the rate fits with
    ``LOWER_MARGIN`` to spare (a rate of 1.9 x ``per_replica`` keeps 2 holders, and 3 once it
    had 3 until it falls to 1.5 x)."""
    if not per_replica or per_replica <= 0 or most <= base:
        return base
    up = math.ceil(rate / per_replica - 1e-9)
    prev = max(previous or base, base)
    if up >= prev:
        k = up
    else:
        k = min(prev, math.ceil(rate / (per_replica * (1 - LOWER_MARGIN)) - 1e-9))
    return max(base, min(k, most))

"""Which replicas of a pool hold each adapter: rendezvous (highest-random-weight) hashing of the
adapter's served name over the pool's pod names, within each replica's byte budget. Pure and
torch-free; the operator places (``operator/routing.py``), the routes carry the result.

Rendezvous hashing ranks every replica for every adapter the same way wherever it is computed, so a
pod that joins takes about 1/N of the placements and one that leaves gives up only its own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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
    takes on each (every version it routes)."""

    name: str
    replicas: int
    size: int


@dataclass
class Placement:
    holders: dict[str, list[str]]  # served name -> replicas holding it, most preferred first
    used: dict[str, int]           # replica -> bytes placed on it
    short: dict[str, int]          # served name -> holders it lacks because no replica had room


def place(demands: Iterable[Demand], replicas: Sequence[str], budget: int | None = None) -> Placement:
    """Each adapter on its ``replicas`` most preferred replicas that have room for it (``budget``
    bytes per replica; None: unbounded). Adapters are placed in name order, so the result depends
    only on the inputs; an adapter with fewer holders than it asked for is named in ``short``."""
    used = {r: 0 for r in replicas}
    holders: dict[str, list[str]] = {}
    short: dict[str, int] = {}
    for d in sorted(demands, key=lambda d: d.name):
        want = min(max(d.replicas, 0), len(used))
        got: list[str] = []
        for r in ranking(d.name, used):
            if len(got) >= want:
                break
            if budget is not None and used[r] + d.size > budget:
                continue
            got.append(r)
            used[r] += d.size
        holders[d.name] = got
        if len(got) < want:
            short[d.name] = want - len(got)
    return Placement(holders=holders, used=used, short=short)


def replicas_wanted(adapter: int | str | None, pool_default: int | str, pool_replicas: int) -> int | None:
    """How many replicas should hold an adapter: its own ``spec.replicas``, else the pool's
    ``spec.placement.replicasPerAdapter``; None for ``"all"`` (every replica, no placement)."""
    value = pool_default if adapter is None else adapter
    if value == ALL:
        return None
    return max(1, min(int(value), max(pool_replicas, 1)))

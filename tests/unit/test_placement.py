"""Placement without a cluster: rendezvous hashing of adapters over a pool's pods is deterministic,
moves about 1/N of the placements when one of N pods comes or goes, and keeps every replica within
its byte budget."""

from __future__ import annotations

import random

from lorafleet.contracts.placement import Demand, place, ranking, replicas_wanted

PODS = [f"lorafleet-p-5d8c7b-{s}" for s in ("a1b2c", "d3e4f", "g5h6i", "j7k8l", "m9n0o", "p1q2r", "s3t4u",
                                              "v5w6x")]


def demands(n, replicas=1, size=10):
    return [Demand(f"tenant{i % 37}-adapter-{i}", replicas, size) for i in range(n)]


def moved(before, after):
    """Placements (adapter on a pod) that the change added: what replicas must download."""
    return sum(len(set(after.holders[a]) - set(before.holders[a])) for a in before.holders)


def test_same_inputs_same_placement_in_any_order():
    ds = demands(500, replicas=2)
    a = place(ds, PODS[:5], budget=10_000)
    shuffled = ds[:]
    random.Random(7).shuffle(shuffled)
    b = place(shuffled, list(reversed(PODS[:5])), budget=10_000)
    assert a.holders == b.holders and a.used == b.used
    assert all(len(h) == 2 and len(set(h)) == 2 for h in a.holders.values())
    assert ranking("x", PODS) == ranking("x", list(reversed(PODS)))


def test_adding_or_removing_one_of_n_replicas_moves_about_one_nth():
    ds = demands(4000, replicas=2)
    for n in (3, 4, 6, 8):
        before = place(ds, PODS[:n - 1])
        after = place(ds, PODS[:n])
        total = 2 * len(ds)
        # Ideal: the new pod takes 2/n of the 2 x 4000 placements; every one moved lands on it.
        grew = moved(before, after)
        assert abs(grew / total - 1 / n) < 0.03, (n, grew / total)
        assert all(set(after.holders[a]) - set(before.holders[a]) <= {PODS[n - 1]} for a in before.holders)
        # Removing it again gives back exactly the placement before.
        assert place(ds, PODS[:n - 1]).holders == before.holders
        # Losing another pod (a replica died) moves only what that pod held.
        lost = place(ds, [p for p in PODS[:n] if p != PODS[0]])
        held = sum(1 for h in after.holders.values() if PODS[0] in h)
        assert moved(after, lost) == held


def test_budgets_are_never_exceeded_and_a_shortfall_is_named():
    rng = random.Random(3)
    ds = [Demand(f"a{i}", rng.choice([1, 2]), rng.randint(5, 40)) for i in range(300)]
    budget = sum(d.size * d.replicas for d in ds) // 4 + 200
    got = place(ds, PODS[:4], budget=budget)
    assert max(got.used.values()) <= budget
    assert got.used == {p: sum(d.size for d in ds if p in got.holders[d.name]) for p in PODS[:4]}
    for d in ds:
        assert len(got.holders[d.name]) + got.short.get(d.name, 0) == d.replicas
    # A third of the total per replica, one copy each, equal sizes: everything fits exactly.
    eq = demands(60, size=7)
    tight = place(eq, PODS[:3], budget=60 * 7 // 3)
    assert not tight.short and sorted(tight.used.values()) == [140, 140, 140]
    # One byte less each: three adapters find no room, and say so.
    over = place(eq, PODS[:3], budget=60 * 7 // 3 - 1)
    assert len(over.short) == 3 and max(over.used.values()) <= 139


def test_replicas_wanted_from_the_adapter_else_the_pool():
    assert replicas_wanted(None, "all", 6) is None
    assert replicas_wanted("all", 2, 6) is None
    assert replicas_wanted(None, 2, 6) == 2
    assert replicas_wanted(3, "all", 6) == 3
    assert replicas_wanted(9, "all", 6) == 6  # never more than the pool has

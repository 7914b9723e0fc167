"""Placement without a cluster: rendezvous hashing of adapters over a pool's pods is deterministic,
moves about 1/N of the placements when one of N pods comes or goes, and keeps every replica within
its byte budget."""

from __future__ import annotations

import random

from lorafleet.contracts.placement import DISK, MEMORY, Demand, place, popular_replicas, ranking, replicas_wanted

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


def test_the_host_memory_budget_binds_too_and_the_refusing_budget_is_named():
    eq = demands(60, size=7)
    # Disk room for everything, host memory for 19 adapters per pod: 3 adapters find no room.
    got = place(eq, PODS[:3], budget=10_000, memory_budget=19 * 7)
    assert max(got.used.values()) <= 19 * 7 and len(got.short) == 3
    assert all(got.blocked[n] == [MEMORY] for n in got.short)
    # Both tight: both named; unbounded memory: the disk budget alone decides.
    both = place(eq, PODS[:3], budget=19 * 7, memory_budget=19 * 7)
    assert all(both.blocked[n] == [DISK, MEMORY] for n in both.short)
    disk = place(eq, PODS[:3], budget=19 * 7)
    assert all(disk.blocked[n] == [DISK] for n in disk.short) and disk.holders == got.holders


def test_popularity_holders_come_after_every_base_holder_hottest_first():
    # Room for exactly one copy of each on 3 pods; a hot adapter asking for 3 copies gets only the
    # room left over, never a cold adapter's only copy.
    cold = demands(59, size=7)
    hot = Demand("hot", 3, 7, base=1, rate=50.0)
    got = place(cold + [hot], PODS[:3], budget=60 * 7 // 3)
    assert not got.short and len(got.holders["hot"]) == 1 and got.extra_short == {"hot": 2}
    assert got.blocked["hot"] == [DISK]
    # With room, the hot one gets its 3; two hot ones competing for one slot: the hotter wins it.
    roomy = place(cold + [hot], PODS[:3], budget=10_000)
    assert sorted(roomy.holders["hot"]) == sorted(PODS[:3]) and not roomy.extra_short
    warm = Demand("warm", 2, 7, base=1, rate=5.0)
    duel = place(cold + [hot, warm], PODS[:3], budget=61 * 7 // 3 + 7)
    assert not duel.short and duel.extra_short.get("hot", 0) <= duel.extra_short.get("warm", 0)
    # The base holders of the hot one are its first in rendezvous order: raising the count adds
    # replicas, it never moves the ones it has.
    assert got.holders["hot"] == roomy.holders["hot"][:1] == ranking("hot", PODS[:3])[:1]


def test_popular_replica_counts_rise_at_once_and_fall_only_with_a_margin():
    r = 10.0  # requests/s one replica takes of an adapter
    assert popular_replicas(0, None, 1, None, 8) == 1  # popularity off: the spec's count
    assert popular_replicas(0, r, 2, None, 8) == 2
    assert popular_replicas(25, r, 1, None, 8) == 3
    assert popular_replicas(500, r, 1, None, 8) == 8  # never more than the pool has
    k, seen = 1, []
    for rate in (9, 11, 19, 21, 19, 17, 15.5, 14.9, 11, 8, 7.4, 7.6, 11):
        k = popular_replicas(rate, r, 1, k, 8)
        seen.append(k)
    # 2 at 11/s, 3 at 21/s; back to 2 only below 15/s (3 - 1 = 2 replicas at 75%), 1 only below 7.5/s.
    assert seen == [1, 2, 2, 3, 3, 3, 3, 2, 2, 2, 1, 1, 2]
    assert popular_replicas(40, r, 1, 6, 3) == 3  # the pool shrank under a hot adapter

"""Placement benchmark without processes: 10,000 adapters of LLM size on 8 replicas. Placement time
(``contracts.placement.place`` alone, and the operator's whole pool plan: routes with holders and
every status), placements moved per scale step against the 1/N ideal, max/mean placed bytes per
replica, and the gateway's requests per replica under a Zipf(1.0) load, with one replica per
adapter and with popularity-driven replica counts. Prints one JSON line.

    python bench/placement_bench.py [--adapters 10000] [--replicas 8] [--per-adapter 2] [--headroom 1.25]
                                    [--requests 200000] [--per-replica-share 0.125]

Adapter sizes: a 7B model's q/k/v/o LoRA in bf16 is about 34 MB at rank 16; ranks 8, 16 and 32
(17, 34, 68 MB) are drawn 1:2:1 from a seeded generator. The budget per replica is ``headroom`` x
the even share (total x per-adapter / replicas).

The load part: the gateway's own router (``gateway.routing.AffinityRouter``, spill at 8 open
requests) chooses among the replicas for every request; the replicas are stand-ins, simulated in
one process, not runtimes: each holds what the routes place on it (``sidecar.plan.desired_versions``),
keeps the adapters it served last in ``cache.deviceSlots`` (32) device slots, LRU, as the runtime
does, and holds each request open for an exponential service time (mean 1 time unit) under Poisson
arrivals that keep on average 4 requests open per replica (below the spill threshold). The
gateway sees the replicas' tiers and open requests as they are (the real one polls ``/v1/models``
every 0.5 s). Popularity: the stand-ins count requests per adapter, their sync reports carry the
rates (``SyncReport.rates_of``: each pod's 100 busiest), and the operator's real plan
(``operator.routing.plan_pool`` with ``spec.placement.requestsPerReplica``) turns them into replica
counts; ``--per-replica-share`` sets requestsPerReplica as that share of one replica's mean rate.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time
from collections import OrderedDict

from lorafleet.contracts.placement import Demand, place
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.gateway.routing import AffinityRouter, Replica
from lorafleet.operator import routing
from lorafleet.operator.routing import PodView
from lorafleet.sidecar.plan import desired_versions

MB = 1_000_000


def demands(n: int, per_adapter: int, seed: int = 1) -> list[Demand]:
    rng = random.Random(seed)
    return [Demand(f"tenant{i % 997:03d}-adapter-{i:05d}", per_adapter, rng.choice([17, 34, 34, 68]) * MB)
            for i in range(n)]


def pods(n: int) -> list[str]:
    return [f"lorafleet-llm-7d9f8c6b5-{i:05x}" for i in range(n)]


def moved(before, after) -> int:
    """Placements (adapter on a pod) the change added: downloads it causes."""
    return sum(len(set(after.holders[a]) - set(before.holders[a])) for a in before.holders)


def pool_body(replicas: int, per_adapter: int, budget: int, requests_per_replica: float | None = None) -> dict:
    placement = {"replicasPerAdapter": per_adapter, "adapterBytes": budget}
    if requests_per_replica is not None:
        placement["requestsPerReplica"] = requests_per_replica
    return {"metadata": {"name": "llm", "namespace": "ns", "uid": "pu", "generation": 1},
            "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"},
                     "replicas": replicas, "placement": placement}}


def adapter_views(ds: list[Demand]) -> list:
    return [routing.adapter_view({
        "metadata": {"name": d.name, "namespace": "ns", "uid": f"u{i}", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"pool": "llm", "tenant": "acme", "version": "1",
                 "source": {"uri": f"s3://a/{d.name}/", "sha256": "b" * 64, "sizeBytes": d.size}}})
        for i, d in enumerate(ds)]


def plan_time(n: int, replicas: int, per_adapter: int, budget: int, ds: list[Demand]) -> tuple[float, float]:
    """The operator's plan of the pool (first and a repeat with nothing changed), seconds."""
    pool = routing.pool_view(pool_body(replicas, per_adapter, budget))
    adapters = adapter_views(ds)
    views = [PodView(name=p, ready=True, report=SyncReport(generation=0)) for p in pods(replicas)]
    memo: dict = {}
    t0 = time.perf_counter()
    p1 = routing.plan_pool("llm", pool, adapters, views, RoutesTable(pool="llm"), {}, memo)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    routing.plan_pool("llm", pool, adapters, views, p1.table, p1.adapter_status, memo)
    return first, time.perf_counter() - t0


class Standin:
    """One replica as the gateway sees it: what the routes place on it, its device slots (LRU), the
    requests it has open and the requests per adapter it served (for its sync report's rates)."""

    def __init__(self, pod: str, table: RoutesTable, slots: int):
        self.pod, self.slots = pod, slots
        self.view = Replica(name=pod, url=f"http://{pod}:8000")
        self.view.adapters = {d.name: "host" for d in desired_versions(table, pod)}
        self.device: OrderedDict[str, None] = OrderedDict()
        self.served: dict[str, int] = {}
        self.total = 0

    def serve(self, adapter: str) -> None:
        self.total += 1
        self.served[adapter] = self.served.get(adapter, 0) + 1
        self.device[adapter] = None
        self.device.move_to_end(adapter)
        self.view.adapters[adapter] = "device"
        while len(self.device) > self.slots:
            old, _ = self.device.popitem(last=False)
            self.view.adapters[old] = "host"


def run_load(table: RoutesTable, names_: list[str], weights: list[float], requests: int, replicas: int,
             open_per_replica: float, seed: int, slots: int = 32) -> tuple[list[Standin], float, int]:
    """Poisson arrivals of Zipf-chosen adapters routed by the gateway's router; each request is open
    for an exponential time of mean 1. Returns the stand-ins, the time the load took, and the
    requests the router sent first to a replica that does not hold the adapter (a 503 and a retry
    in a real pool; none expected: the gateway sees who holds what)."""
    rng = random.Random(seed)
    stand = [Standin(p, table, slots) for p in table.placed_on or pods(replicas)]
    views = [s.view for s in stand]
    by_name = {s.pod: s for s in stand}
    router = AffinityRouter(spill_inflight=8)
    rate = open_per_replica * replicas  # arrivals per unit time: Little's law, mean service 1
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    picks = rng.choices(names_, cum_weights=cum, k=requests)
    ends: list[tuple[float, int, str]] = []
    t, misses = 0.0, 0
    for i, adapter in enumerate(picks):
        t += rng.expovariate(rate)
        while ends and ends[0][0] <= t:
            _, _, pod = heapq.heappop(ends)
            by_name[pod].view.inflight -= 1
        order = router.choose(adapter, views).order
        target = next((r for r in order if adapter in r.adapters), None)
        if target is None or target is not order[0]:
            misses += 1
        if target is None:
            continue
        s = by_name[target.name]
        s.serve(adapter)
        target.inflight += 1
        heapq.heappush(ends, (t + rng.expovariate(1.0), i, target.name))
    return stand, t, misses


def reports(stand: list[Standin], seconds: float, generation: int) -> list[PodView]:
    """The pods as the operator sees them: Ready, everything loaded, the rates they measured."""
    return [PodView(name=s.pod, ready=True, report=SyncReport(
        generation=generation, rates=SyncReport.rates_of({a: n / seconds for a, n in s.served.items()})))
        for s in stand]


def spread(stand: list[Standin]) -> dict:
    per = [s.total for s in stand]
    return {"requests_max_over_mean": round(max(per) / statistics.mean(per), 3),
            "requests_min_over_mean": round(min(per) / statistics.mean(per), 3)}


def load_part(a, ds: list[Demand], budget: int) -> dict:
    """The gateway's requests per replica under Zipf(1.0): one replica per adapter, then with the
    counts the operator derives from the rates the stand-ins measured (and once more from the rates
    measured under those counts: how many counts move, the hysteresis at work)."""
    rng = random.Random(11)
    order = [d.name for d in ds]
    rng.shuffle(order)  # popularity rank independent of name and size
    weights = [1.0 / (k + 1) for k in range(len(order))]  # Zipf(1.0)
    mean_rate = 4.0  # open requests per replica = arrivals per replica per unit time (service 1)
    per_replica = a.per_replica_share * mean_rate
    adapters = adapter_views(ds)
    live = [PodView(name=p, ready=True, report=SyncReport(generation=0)) for p in pods(a.replicas)]
    one = routing.plan_pool("llm", routing.pool_view(pool_body(a.replicas, 1, budget)), adapters, live,
                            RoutesTable(pool="llm"), {})
    t_one = one.table
    base_stand, took, miss_one = run_load(t_one, order, weights, a.requests, a.replicas, mean_rate, seed=5)
    out = {"load_requests": a.requests, "open_per_replica": mean_rate, "requests_per_replica_setting": per_replica,
           "one_per_adapter": {**spread(base_stand), "misses": miss_one}}
    # Popularity: the same pool with requestsPerReplica; the first plan sees the rates measured under
    # one replica per adapter.
    pop_pool = routing.pool_view(pool_body(a.replicas, 1, budget, per_replica))
    t0 = time.perf_counter()
    p1 = routing.plan_pool("llm", pop_pool, adapters, reports(base_stand, took, t_one.generation), t_one, {})
    plan_s = time.perf_counter() - t0
    t_pop = p1.table
    counts = {n: len(e.holders or {}) for n, e in t_pop.adapters.items()}
    hot = {n: k for n, k in counts.items() if k > 1}
    pop_stand, took2, miss_pop = run_load(t_pop, order, weights, a.requests, a.replicas, mean_rate, seed=5)
    # Replan from the rates measured under the popular counts: the hysteresis keeps them.
    p2 = routing.plan_pool("llm", pop_pool, adapters, reports(pop_stand, took2, t_pop.generation), t_pop, {})
    changed = sum(1 for n, e in p2.table.adapters.items() if len(e.holders or {}) != counts.get(n))
    decided = routing.place_adapters(adapters, {}, pop_pool.spec, reports(base_stand, took, t_one.generation), t_one)
    per_pod_bytes = {}
    size = {d.name: d.size for d in ds}
    for n, e in t_pop.adapters.items():
        for pod in e.holders or {}:
            per_pod_bytes[pod] = per_pod_bytes.get(pod, 0) + size[n]
    out["popularity"] = {**spread(pop_stand), "misses": miss_pop, "plan_s": round(plan_s, 2),
                         "adapters_on_more_than_one": len(hot), "extra_copies": sum(k - 1 for k in hot.values()),
                         "most_replicas": max(counts.values()), "counts_changed_on_replan": changed,
                         "bytes_max_over_mean": round(max(per_pod_bytes.values())
                                                      / statistics.mean(per_pod_bytes.values()), 3),
                         "short": len(decided.short), "popularity_short": len(decided.extra_short)}
    top = sorted(range(len(order)), key=lambda k: -weights[k])[:5]
    out["popularity"]["top5_replicas"] = [counts[order[k]] for k in top]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--per-adapter", type=int, default=2)
    ap.add_argument("--headroom", type=float, default=1.25)
    ap.add_argument("--requests", type=int, default=200_000, help="requests in each load run")
    ap.add_argument("--per-replica-share", type=float, default=0.125,
                    help="spec.placement.requestsPerReplica as this share of one replica's mean request rate")
    ap.add_argument("--load-only", action="store_true", help="only the load part")
    a = ap.parse_args()

    ds = demands(a.adapters, a.per_adapter)
    total = sum(d.size * d.replicas for d in ds)
    budget = int(total / a.replicas * a.headroom)
    out: dict = {"adapters": a.adapters, "replicas": a.replicas, "per_adapter": a.per_adapter,
                 "total_placed_gb": round(total / 1e9, 1), "budget_gb": round(budget / 1e9, 1)}
    if a.load_only:
        out.update(load_part(a, ds, budget))
        print(json.dumps(out))
        return

    t0 = time.perf_counter()
    base = place(ds, pods(a.replicas), budget)
    out["place_s"] = round(time.perf_counter() - t0, 3)
    used = list(base.used.values())
    out["bytes_max_over_mean"] = round(max(used) / statistics.mean(used), 3)
    out["short"] = len(base.short)

    steps = {}
    for label, n in (("up", a.replicas + 1), ("down", a.replicas - 1)):
        for bounded in (False, True):
            b = budget if bounded else None
            before = place(ds, pods(a.replicas), b)
            after = place(ds, pods(n), b)
            frac = moved(before, after) / (a.adapters * a.per_adapter)
            ideal = 1 / max(n, a.replicas)
            steps[f"{a.replicas}->{n}{' budget' if bounded else ''}"] = {
                "moved_fraction": round(frac, 4), "ideal": round(ideal, 4), "short_after": len(after.short)}
    out["scale_steps"] = steps

    first, again = plan_time(a.adapters, a.replicas, a.per_adapter, budget, ds)
    out["operator_plan_s"] = round(first, 2)
    out["operator_replan_unchanged_s"] = round(again, 2)
    out.update(load_part(a, ds, budget))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

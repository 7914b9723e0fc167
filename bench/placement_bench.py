"""Placement benchmark without processes: 10,000 adapters of LLM size on 8 replicas. Placement time
(``contracts.placement.place`` alone, and the operator's whole pool plan: routes with holders and
every status), placements moved per scale step against the 1/N ideal, and max/mean placed bytes per
replica. Prints one JSON line.

    python bench/placement_bench.py [--adapters 10000] [--replicas 8] [--per-adapter 2] [--headroom 1.25]

Adapter sizes: a 7B model's q/k/v/o LoRA in bf16 is about 34 MB at rank 16; ranks 8, 16 and 32
(17, 34, 68 MB) are drawn 1:2:1 from a seeded generator. The budget per replica is ``headroom`` x
the even share (total x per-adapter / replicas).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from lorafleet.contracts.placement import Demand, place
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.operator import routing
from lorafleet.operator.routing import PodView

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


def plan_time(n: int, replicas: int, per_adapter: int, budget: int, ds: list[Demand]) -> tuple[float, float]:
    """The operator's plan of the pool (first and a repeat with nothing changed), seconds."""
    body = {"metadata": {"name": "llm", "namespace": "ns", "uid": "pu", "generation": 1},
            "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"},
                     "replicas": replicas, "placement": {"replicasPerAdapter": per_adapter, "adapterBytes": budget}}}
    pool = routing.pool_view(body)
    adapters = [routing.adapter_view({
        "metadata": {"name": d.name, "namespace": "ns", "uid": f"u{i}", "generation": 1,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"pool": "llm", "tenant": "acme", "version": "1",
                 "source": {"uri": f"s3://a/{d.name}/", "sha256": "b" * 64, "sizeBytes": d.size}}})
        for i, d in enumerate(ds)]
    views = [PodView(name=p, ready=True, report=SyncReport(generation=0)) for p in pods(replicas)]
    memo: dict = {}
    t0 = time.perf_counter()
    p1 = routing.plan_pool("llm", pool, adapters, views, RoutesTable(pool="llm"), {}, memo)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    routing.plan_pool("llm", pool, adapters, views, p1.table, p1.adapter_status, memo)
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--per-adapter", type=int, default=2)
    ap.add_argument("--headroom", type=float, default=1.25)
    a = ap.parse_args()

    ds = demands(a.adapters, a.per_adapter)
    total = sum(d.size * d.replicas for d in ds)
    budget = int(total / a.replicas * a.headroom)
    out: dict = {"adapters": a.adapters, "replicas": a.replicas, "per_adapter": a.per_adapter,
                 "total_placed_gb": round(total / 1e9, 1), "budget_gb": round(budget / 1e9, 1)}

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
    print(json.dumps(out))


if __name__ == "__main__":
    main()

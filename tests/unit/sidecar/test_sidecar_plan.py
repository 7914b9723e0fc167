"""plan_sync is a pure function: desired routes x cache x runtime -> downloads, loads, unloads, collection."""

from __future__ import annotations

from lorafleet.contracts.routes import RouteEntry, RoutesTable, RouteVersion
from lorafleet.sidecar.plan import CachedContent, LoadedAdapter, desired_versions, plan_sync

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def table(**adapters) -> RoutesTable:
    return RoutesTable(pool="p", generation=3, adapters={
        name: RouteEntry(tenant="t", versions=[RouteVersion(version=v, uri=f"s3://b/{name}/{v}/", sha256=s, weight=w)
                                               for v, s, w in versions])
        for name, versions in adapters.items()})


def cached(*digests, last_used=0.0, size=100):
    return {d: CachedContent(d, size, last_used) for d in digests}


def loaded(*entries):
    return {f"{n}@{v}": LoadedAdapter(n, v, s, w) for n, v, s, w in entries}


def test_downloads_what_is_missing_once_per_digest_and_loads_what_is_cached():
    desired = desired_versions(table(x=[("1", A, 100)], y=[("1", B, 100)], z=[("1", B, 100)]))
    plan = plan_sync(desired, cached(A), loaded())
    assert [(d.digest, d.keys) for d in plan.downloads] == [(B, ("y@1", "z@1"))]
    assert [d.key for d in plan.loads] == ["x@1"]
    assert plan.unloads == [] and plan.collect == []


def test_nothing_to_do_when_in_sync():
    desired = desired_versions(table(x=[("1", A, 100)]))
    assert plan_sync(desired, cached(A), loaded(("x", "1", A, 100))).empty()


def test_rollout_keeps_the_draining_version_and_reloads_on_weight_change():
    desired = desired_versions(table(x=[("2", B, 100), ("1", A, 0)]))
    plan = plan_sync(desired, cached(A, B), loaded(("x", "1", A, 100)))
    assert sorted(d.key for d in plan.loads) == ["x@1", "x@2"]  # x@1 again: its weight went to 0
    assert plan.unloads == []


def test_unloads_what_the_routes_dropped_and_collects_only_after_the_runtime_let_go():
    desired = desired_versions(table(x=[("2", B, 100)]))
    plan = plan_sync(desired, cached(A, B), loaded(("x", "1", A, 0), ("x", "2", B, 100)), now=1000,
                     collect_after=10)
    assert plan.unloads == [("x", "1")]
    assert plan.collect == []  # the runtime still holds A in this pass
    plan = plan_sync(desired, cached(A, B), loaded(("x", "2", B, 100)), now=1000, collect_after=10)
    assert plan.collect == [A]


def test_unreferenced_content_waits_for_collect_after():
    desired = desired_versions(table(x=[("1", A, 100)]))
    assert plan_sync(desired, cached(A, B, last_used=995), loaded(("x", "1", A, 100)), now=1000,
                     collect_after=10).collect == []


def test_over_budget_evicts_least_recently_used_unreferenced_first():
    desired = desired_versions(table(x=[("1", A, 100)]))
    cache = {A: CachedContent(A, 100, 1), B: CachedContent(B, 100, 50), C: CachedContent(C, 100, 20),
             D: CachedContent(D, 100, 90)}
    plan = plan_sync(desired, cache, loaded(("x", "1", A, 100)), disk_bytes=250, now=100, collect_after=None)
    assert plan.collect == [C, B]  # 400 -> 200: the two oldest unreferenced; A is referenced


def test_runtime_unreachable_downloads_but_never_loads_unloads_or_collects():
    desired = desired_versions(table(x=[("1", A, 100)], y=[("1", B, 100)]))
    plan = plan_sync(desired, cached(A, C), None, now=10**9, collect_after=0, disk_bytes=1)
    assert [d.digest for d in plan.downloads] == [B]
    assert plan.loads == [] and plan.unloads == [] and plan.collect == []


def test_busy_digests_and_held_versions_wait():
    desired = desired_versions(table(x=[("1", A, 100)], y=[("1", B, 100)]))
    plan = plan_sync(desired, cached(A), loaded(), busy={B}, hold={"x@1"})
    assert plan.downloads == [] and plan.loads == []


def test_runtime_restart_reports_nothing_loaded_so_everything_is_loaded_again():
    desired = desired_versions(table(x=[("1", A, 100)], y=[("1", B, 100)]))
    assert sorted(d.key for d in plan_sync(desired, cached(A, B), loaded()).loads) == ["x@1", "y@1"]


def test_failed_in_runtime_is_loaded_again():
    desired = desired_versions(table(x=[("1", A, 100)]))
    rt = {"x@1": LoadedAdapter("x", "1", A, 100, failed=True)}
    assert [d.key for d in plan_sync(desired, cached(A), rt).loads] == ["x@1"]


def test_an_adapter_moved_to_another_replica_lingers_then_goes_and_only_its_share_is_desired():
    t = table(x=[("1", A, 100)], y=[("1", B, 100)])
    t.adapters["x"].holders = {"pod-a": 2}
    t.adapters["y"].holders = {"pod-b": 3}
    t.placed_on = ["pod-a", "pod-b"]
    t.adapters["x"].versions[0].since = 1
    mine = desired_versions(t, "pod-a")
    assert [(d.key, d.since) for d in mine] == [("x@1", 2)]  # the later of its version's and its placement's
    rt = loaded(("x", "1", A, 100), ("y", "1", B, 100))  # y was here before it moved to pod-b
    assert plan_sync(mine, cached(A, B), rt, linger=["y@1"]).unloads == []
    assert plan_sync(mine, cached(A, B), rt).unloads == [("y", "1")]
    # A pod that leaves the placement but keeps it until its new holder has it: still desired.
    t.adapters["y"].leaving = {"pod-a": 1}
    assert sorted(d.key for d in desired_versions(t, "pod-a")) == ["x@1", "y@1"]

"""Placement in the operator's plan, without a cluster: routes name each adapter's holders, Ready
N/M counts only them, a new version drains when every holder has it, a pod that joins gets its share
while the pods that gave it up keep serving until it has loaded (make before break), and a sidecar
syncs only its own share."""

from __future__ import annotations

import itertools

from lorafleet.contracts import names
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.operator import routing
from lorafleet.operator.routing import PodView
from lorafleet.sidecar.plan import desired_versions, pool_adapters

_uids = itertools.count()


def adapter(name, version="1", sha="b", **spec):
    body = {"metadata": {"name": name, "namespace": "ns", "uid": f"placement-uid-{next(_uids)}", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"pool": "p", "tenant": "acme", "version": version,
                     "source": {"uri": f"s3://a/{name}/{version}/", "sha256": sha if len(sha) == 64 else sha * 64,
                                "sizeBytes": 100}, **spec}}
    return routing.adapter_view(body)


def pool(replicas=3, per_adapter=1, adapter_bytes=None):
    placement = {"replicasPerAdapter": per_adapter}
    if adapter_bytes is not None:
        placement["adapterBytes"] = adapter_bytes
    return routing.pool_view({"metadata": {"name": "p", "namespace": "ns", "uid": "pu", "generation": 1},
                              "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64,
                                                 "task": "sequence-classification"},
                                       "replicas": replicas, "placement": placement}})


def pod(name, generation=0, ready=True, pending=(), terminating=False):
    return PodView(name=name, ready=ready, terminating=terminating,
                   report=SyncReport(generation=generation, pending=list(pending)))


def plan(adapters, pods, previous=None, p=None):
    return routing.plan_pool("p", p or pool(), list(adapters), list(pods), previous or RoutesTable(pool="p"), {})


ADAPTERS = [adapter(f"a{i}") for i in range(12)]


def test_routes_place_each_adapter_on_its_share_within_the_budget():
    pods = [pod("x"), pod("y"), pod("z")]
    t = plan(ADAPTERS, pods, p=pool(adapter_bytes=400)).table
    assert t.placed_on == ["x", "y", "z"]
    holders = {n: sorted(e.holders) for n, e in t.adapters.items()}
    assert all(len(h) == 1 for h in holders.values())
    per_pod = {p: sum(1 for h in holders.values() if p in h) for p in "xyz"}
    assert per_pod == {"x": 4, "y": 4, "z": 4}  # 400 bytes each: four adapters of 100
    # The ConfigMaps carry the placement, and a complete set reads back as the same table.
    shards = [RoutesTable.from_json(text) for text in t.to_configmap_data().values()]
    back = RoutesTable.merge_complete("p", shards)
    assert back is not None and back.placed_on == t.placed_on and back.adapters == t.adapters
    # A sidecar syncs only its own share, from the generation it was placed at.
    mine = desired_versions(t, "x")
    assert sorted(d.name for d in mine) == sorted(n for n, h in holders.items() if h == ["x"])
    assert all(d.since == t.generation for d in mine)
    assert len(desired_versions(t)) == 12  # no pod given: the whole table
    assert pool_adapters(t, "x") == sorted(t.adapters)  # the runtime answers the others' 503, not 404
    assert not t.awaits_placement("x") and t.awaits_placement("new-pod")


def test_ready_counts_holders_only_and_a_shortfall_says_why():
    pods = [pod("x"), pod("y"), pod("z")]
    p2 = pool(per_adapter=2)
    t = plan(ADAPTERS[:3], pods, p=p2).table
    reported = [pod(n, t.generation) for n in "xyz"]
    st = plan(ADAPTERS[:3], reported, previous=t, p=p2).adapter_status
    for a in ADAPTERS[:3]:
        s = st[a.name]
        assert (s["ready"], s["phase"], s["placed"]) == ("2/2", "Ready", 2), s
        assert s["placement"] == sorted(t.adapters[a.name].holders)
    # A holder still loading it: 1/2 Syncing. A non-holder's report never counts.
    a0 = ADAPTERS[0]
    h1, h2 = sorted(t.adapters[a0.name].holders)
    other = ({"x", "y", "z"} - {h1, h2}).pop()
    reported = [pod(h1, t.generation), pod(h2, t.generation, pending=["a0@1"]), pod(other, t.generation)]
    s = plan([a0], reported, previous=t, p=p2).adapter_status[a0.name]
    assert (s["ready"], s["phase"]) == ("1/2", "Syncing")
    # A budget of one adapter per pod: the second copy of each finds no room, and the status says so.
    short = plan(ADAPTERS[:3], pods, p=pool(per_adapter=2, adapter_bytes=100))
    placed = {a.name: short.adapter_status[a.name]["placed"] for a in ADAPTERS[:3]}
    assert placed == {"a0": 2, "a1": 1, "a2": 0}  # placed in name order while room lasts
    assert "no other replica has room" in short.adapter_status["a1"]["message"]
    assert short.adapter_status["a2"]["conditions"][0]["reason"] == "Unplaced"
    # Fewer pods running than the count wanted: the message says that, not "no room".
    few = plan(ADAPTERS[:1], [pod("x")], p=pool(per_adapter=2))
    assert few.adapter_status["a0"]["placed"] == 1 and "has 1 running replicas" in few.adapter_status["a0"]["message"]
    use = short.pool_status["placement"]
    assert [(u["pod"], u["adapters"], u["bytes"], u["budgetBytes"]) for u in use] == [
        ("x", 1, 100, 100), ("y", 1, 100, 100), ("z", 1, 100, 100)]


def test_a_new_version_drains_when_every_holder_has_it():
    pods = [pod("x"), pod("y"), pod("z")]
    t1 = plan([ADAPTERS[0]], pods).table
    [holder] = t1.adapters["a0"].holders
    others = [n for n in "xyz" if n != holder]
    v2 = adapter("a0", "2", "c")
    t2 = plan([v2], [pod(n, t1.generation) for n in "xyz"], previous=t1).table
    assert [v.version for v in t2.adapters["a0"].versions] == ["2", "1"]
    # The non-holders are at the newest generation and list nothing: they do not count. The holder
    # is still loading version 2: version 1 keeps draining.
    pods3 = [pod(holder, t2.generation, pending=["a0@2"])] + [pod(n, t2.generation) for n in others]
    assert not plan([v2], pods3, previous=t2).changed
    pods4 = [pod(holder, t2.generation)] + [pod(n, 0) for n in others]
    t4 = plan([v2], pods4, previous=t2).table
    assert [v.version for v in t4.adapters["a0"].versions] == ["2"]


def test_a_pod_that_joins_gets_its_share_and_the_previous_holders_serve_until_it_has_loaded():
    three = [pod("x"), pod("y"), pod("z")]
    t1 = plan(ADAPTERS, three).table
    loaded1 = [pod(n, t1.generation) for n in "xyz"]
    # A pod that never started (no sync report: unschedulable, say) is not placed over.
    assert plan(ADAPTERS, loaded1 + [PodView("never", False, None)], previous=t1).table.placed_on == ["x", "y", "z"]
    # A fourth pod, not ready yet but reporting: it is placed over at once (its sidecar keeps it unready until then).
    four = loaded1 + [pod("w", 0, ready=False)]
    t2 = plan(ADAPTERS, four, previous=t1).table
    assert t2.placed_on == ["w", "x", "y", "z"]
    moved = {n for n, e in t2.adapters.items() if "w" in e.holders}
    assert 1 <= len(moved) <= 6  # about a quarter of 12
    for n in moved:
        e = t2.adapters[n]
        assert set(e.leaving) == set(t1.adapters[n].holders)  # the old holder keeps it meanwhile
        assert e.held_by("w") and e.held_by(next(iter(t1.adapters[n].holders)))
    assert all(not e.leaving for n, e in t2.adapters.items() if n not in moved)
    # A report of w from before its placement says nothing of it: still leaving.
    t3 = plan(ADAPTERS, loaded1 + [pod("w", t2.generation - 1)], previous=t2).table
    assert all(t3.adapters[n].leaving for n in moved)
    # w loaded its share but is not Ready: still leaving. Ready and loaded: the old holders let go.
    t4 = plan(ADAPTERS, loaded1 + [pod("w", t2.generation, ready=False)], previous=t3).table
    assert all(t4.adapters[n].leaving for n in moved)
    t5 = plan(ADAPTERS, loaded1 + [pod("w", t2.generation)], previous=t4).table
    assert all(not e.leaving for e in t5.adapters.values())
    assert {n for n, e in t5.adapters.items() if "w" in e.holders} == moved
    # A pod going away (terminating) loses its placements at once: they go to the others.
    t6 = plan(ADAPTERS, [pod(n, t5.generation) for n in "xyz"] + [pod("w", t5.generation, terminating=True)],
              previous=t5).table
    assert t6.placed_on == ["x", "y", "z"] and all("w" not in e.holders for e in t6.adapters.values())


def test_old_copies_stay_only_where_loaded_and_within_one_budget_through_chained_moves():
    # Pods join one after another, each before the moves the last one caused are done: x has loaded
    # what it was given each time; y, z and w have loaded nothing yet.
    many = [adapter(f"a{i:02d}", sha=f"{i:064x}") for i in range(24)]
    p = pool(replicas=3, adapter_bytes=800)  # 8 adapters of 100 bytes per replica
    t = plan(many, [pod("x", 0)], p=p).table
    joined = []
    for new in "yzw":
        joined.append(new)
        t = plan(many, [pod("x", t.generation)] + [pod(n, 0, ready=False) for n in joined], previous=t, p=p).table
        held = {q: {a for a, e in t.adapters.items() if q in (e.holders or {})} for q in ["x", *joined]}
        old = {q: {a for a, e in t.adapters.items() if q in (e.leaving or {})} for q in ["x", *joined]}
        # A pod that never loaded an adapter keeps no copy of it (fetching it now would only take the
        # room of what it is to hold); the one that has them keeps them until their new holders do,
        # within one placement budget beside what it holds (the room the cache keeps for a move).
        assert all(not old[q] for q in joined), old
        assert old["x"] and len(old["x"]) <= 8, old["x"]
        assert all(len(held[q]) + len(old[q]) <= 16 for q in held), (held, old)
        for a in old["x"]:
            assert t.adapters[a].held_by("x") and "x" not in t.adapters[a].holders


def test_all_keeps_todays_behaviour_and_an_adapter_may_ask_for_its_own_count():
    pods = [pod("x"), pod("y"), pod("z")]
    t = plan([ADAPTERS[0], adapter("hot", replicas=3), adapter("one", replicas=1)], pods,
             p=pool(per_adapter="all")).table
    assert t.adapters["a0"].holders is None and t.placed_on == ["x", "y", "z"]
    assert sorted(t.adapters["hot"].holders) == ["x", "y", "z"] and len(t.adapters["one"].holders) == 1
    plain = plan([ADAPTERS[0]], pods, p=pool(per_adapter="all")).table
    assert plain.placed_on is None and plain.adapters["a0"].holders is None
    assert len(desired_versions(plain, "x")) == 1 and pool_adapters(plain, "x") == []


def test_the_default_budget_leaves_half_the_cache_for_the_model_and_moves():
    assert pool().spec.placement_budget() == 20 * 2**30 // 2  # cache.diskBytes 20Gi by default
    assert pool(adapter_bytes="3Gi").spec.placement_budget() == 3 * 2**30


def rpool(replicas=4, per_replica=10.0, **placement):
    return routing.pool_view({"metadata": {"name": "p", "namespace": "ns", "uid": "pu", "generation": 1},
                              "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64,
                                                 "task": "sequence-classification"},
                                       "replicas": replicas,
                                       "placement": {"replicasPerAdapter": 1, "requestsPerReplica": per_replica,
                                                     **placement}}})


def rated(name, generation, rates, **kw):
    return PodView(name=name, ready=True, report=SyncReport(generation=generation, rates=rates), **kw)


def test_a_hot_adapter_is_placed_on_more_replicas_and_a_cold_one_on_one():
    four = [pod(n) for n in "wxyz"]
    t1 = plan(ADAPTERS, four, p=rpool()).table
    assert all(len(e.holders) == 1 and e.hot is None for e in t1.adapters.values())
    # a0's holder measured 25 requests/s, a1's 3/s: a0 wants 3 replicas (10/s each), a1 stays on 1.
    h0, h1 = next(iter(t1.adapters["a0"].holders)), next(iter(t1.adapters["a1"].holders))
    rates = {n: {} for n in "wxyz"}
    rates[h0]["a0"] = 25.0
    rates[h1]["a1"] = 3.0
    reported = [rated(n, t1.generation, rates[n]) for n in "wxyz"]
    p2 = plan(ADAPTERS, reported, previous=t1, p=rpool())
    e0 = p2.table.adapters["a0"]
    assert len(e0.holders) == 3 and e0.hot == 3 and h0 in e0.holders
    assert len(p2.table.adapters["a1"].holders) == 1 and p2.table.adapters["a1"].hot is None
    s0 = p2.adapter_status["a0"]
    assert (s0["replicas"], s0["placed"], s0["requestRate"]) == (3, 3, 25.0)
    assert "request rate 25/s: 3 replicas wanted" in s0["message"]
    assert "requestRate" not in p2.adapter_status["a1"] and p2.adapter_status["a1"]["replicas"] == 1
    # The rate, now spread over three holders, falls to 16/s: the count holds (3 - 1 = 2 replicas
    # would run at 80%, above the 75% a lower count needs) ...
    t2 = p2.table
    spread = [rated(n, t2.generation, {"a0": 16.0 / 3} if n in e0.holders else {}) for n in "wxyz"]
    assert plan(ADAPTERS, spread, previous=t2, p=rpool()).table.adapters["a0"].hot == 3
    # ... and at 14/s it goes to 2, keeping its first holders (rendezvous order).
    lower = [rated(n, t2.generation, {"a0": 14.0 / 3} if n in e0.holders else {}) for n in "wxyz"]
    t3 = plan(ADAPTERS, lower, previous=t2, p=rpool()).table
    assert t3.adapters["a0"].hot == 2 and set(t3.adapters["a0"].holders) <= set(e0.holders)
    # Without requestsPerReplica the rates change nothing.
    plain = plan(ADAPTERS, reported, previous=t1, p=pool(replicas=4)).table
    assert all(len(e.holders) == 1 for e in plain.adapters.values())


def test_budgets_that_refuse_adapters_are_named_on_the_pool_and_use_is_shown_per_replica():
    pods = [PodView(name=n, ready=True, report=SyncReport(generation=0, cache_bytes=1000 + i))
            for i, n in enumerate("xyz")]
    # Disk for 4 adapters of 100 per pod, host memory for 3: memory binds, 3 of 12 are unplaced.
    p = rpool(replicas=3, per_replica=None, adapterBytes=400, hostMemoryBytes=300)
    got = plan(ADAPTERS, pods, p=p)
    unplaced = [n for n, s in got.adapter_status.items() if s["conditions"][0]["reason"] == "Unplaced"]
    assert len(unplaced) == 3
    assert all("spec.placement.hostMemoryBytes (host memory)" in got.adapter_status[n]["message"] for n in unplaced)
    placed = {c["type"]: c for c in got.pool_status["conditions"]}["Placed"]
    assert (placed["status"], placed["reason"]) == ("False", "MemoryBudget")
    assert "3 adapters lack 3 of the replicas their spec asks for (3 placed nowhere)" in placed["message"]
    assert all(n in placed["message"] for n in unplaced)
    assert "hostMemoryBytes" in got.pool_status["message"]
    use = got.pool_status["placement"]
    assert [(u["pod"], u["adapters"], u["bytes"], u["budgetBytes"], u["memoryBudgetBytes"], u["cacheBytes"])
            for u in use] == [("x", 3, 300, 400, 300, 1000), ("y", 3, 300, 400, 300, 1001),
                              ("z", 3, 300, 400, 300, 1002)]
    # Room for all: Placed is True.
    ok = plan(ADAPTERS, pods, p=rpool(replicas=3, per_replica=None, adapterBytes=400))
    placed = {c["type"]: c for c in ok.pool_status["conditions"]}["Placed"]
    assert (placed["status"], placed["reason"]) == ("True", "Placed")
    # No pod running yet: nothing is placed, and the condition says why (not a budget).
    none = plan(ADAPTERS, [], previous=ok.table, p=rpool(replicas=3, per_replica=None, adapterBytes=400))
    placed = {c["type"]: c for c in none.pool_status["conditions"]}["Placed"]
    assert (placed["status"], placed["reason"]) == ("False", "NoReplicas") and "12 adapters" in placed["message"]


def test_a_verified_size_replaces_the_default_and_a_declared_size_too_small_is_raised():
    def unsized(name, sha):
        body = {"metadata": {"name": name, "namespace": "ns", "uid": f"placement-uid-{next(_uids)}",
                             "generation": 1, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"pool": "p", "tenant": "acme", "version": "1",
                         "source": {"uri": f"s3://a/{name}/1/", "sha256": sha * 64}}}
        return routing.adapter_view(body)

    # maxAdapterBytes 300 by default here: an adapter of unknown size counts 300; a budget of 400
    # holds one per pod, so of 4 adapters on 2 pods two are unplaced.
    p = routing.pool_view({"metadata": {"name": "p", "namespace": "ns", "uid": "pu", "generation": 1},
                           "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "sequence-classification"},
                                    "replicas": 2, "cache": {"maxAdapterBytes": 300},
                                    "placement": {"replicasPerAdapter": 1, "adapterBytes": 400}}})
    ads = [unsized(f"u{i}", "cdef"[i]) for i in range(4)]
    two = [pod("x"), pod("y")]
    t1 = plan(ads, two, p=p).table
    assert sorted(len(e.holders) for e in t1.adapters.values()) == [0, 0, 1, 1]
    assert all(v.verified is None for e in t1.adapters.values() for v in e.versions)
    # The holders' sidecars verified 90 bytes each: the routes keep that, and placement counts it.
    placed = {n: next(iter(e.holders)) for n, e in t1.adapters.items() if e.holders}
    reports = [PodView(name=n, ready=True, report=SyncReport(generation=t1.generation, sizes={
        t1.adapters[a].versions[0].sha256: 90 for a, h in placed.items() if h == n})) for n in "xy"]
    t2 = plan(ads, reports, previous=t1, p=p).table
    assert {n: e.versions[0].verified for n, e in t2.adapters.items() if n in placed} == {n: 90 for n in placed}
    # The unplaced ones still count 300 each: one fits beside each 90-byte one (90 + 300 <= 400).
    assert sorted(len(e.holders) for e in t2.adapters.values()) == [1, 1, 1, 1]
    # The size stays in the routes once the reports stop naming it, and the sidecars see it there
    # (so they stop reporting it).
    t3 = plan(ads, two, previous=t2, p=p).table
    assert all(t3.adapters[n].versions[0].verified == 90 for n in placed)
    assert {d.name: d.verified for d in desired_versions(t3, "x")}.get(next(n for n, h in placed.items() if h == "x")) == 90
    # A declared sizeBytes smaller than the verified size: the verified one counts.
    small = adapter("s0")  # declares 100
    p1 = pool(replicas=1)
    t4 = plan([small], [pod("x")], p=p1).table
    sha = t4.adapters["s0"].versions[0].sha256
    got = plan([small], [PodView("x", True, SyncReport(generation=t4.generation, sizes={sha: 250}))],
               previous=t4, p=p1)
    assert got.table.adapters["s0"].versions[0].verified == 250
    assert [u["bytes"] for u in got.pool_status["placement"]] == [250]
    # A declared size larger than the verified one counts as declared.
    big = adapter("s1")
    t6 = plan([big], [PodView("x", True, SyncReport(generation=0, sizes={big.spec.source.sha256: 60}))], p=p1)
    assert [u["bytes"] for u in t6.pool_status["placement"]] == [100]


def test_rates_that_move_do_not_recompute_every_adapters_status():
    four = [pod(n) for n in "wxyz"]
    memo: dict = {}
    p = rpool()
    first = routing.plan_pool("p", p, ADAPTERS, four, RoutesTable(pool="p"), {}, memo)
    t = first.table
    calls = []
    real = routing.adapter_status

    def counting(a, *args, **kw):
        calls.append(a.name)
        return real(a, *args, **kw)

    routing.adapter_status = counting
    try:
        # Same load state, rates of a cold adapter that change nothing about placement: no status
        # is recomputed; a rate that raises a count recomputes that adapter's only.
        quiet = [rated(n, t.generation, {"a1": 0.5 + i / 10}) for i, n in enumerate("wxyz")]
        base = routing.plan_pool("p", p, ADAPTERS, [rated(n, t.generation, {}) for n in "wxyz"], t,
                                 first.adapter_status, memo)
        calls.clear()
        again = routing.plan_pool("p", p, ADAPTERS, quiet, base.table, base.adapter_status, memo)
        assert calls == [] and not again.changed
        # A rate that raises a1's count (11/s: 2 replicas) recomputes a1's status only.
        hot = routing.plan_pool("p", p, ADAPTERS, [rated(n, t.generation, {"a1": 2.75}) for n in "wxyz"],
                                again.table, again.adapter_status, memo)
        assert calls == ["a1"] and hot.adapter_status["a1"]["requestRate"] == 11.0
        assert hot.adapter_status["a1"]["replicas"] == 2
    finally:
        routing.adapter_status = real


def marked(p: PodView) -> PodView:
    """``p`` as its sidecar leaves it while the routes drain it: first in line for deletion."""
    return PodView(name=p.name, ready=p.ready, report=p.report, terminating=p.terminating,
                   deletion_cost=names.DRAIN_DELETION_COST)


def plan_scaled(pods, previous, p, deployed):
    return routing.plan_pool("p", p, ADAPTERS, list(pods), previous, {}, deployed_replicas=deployed)


def test_a_scale_down_moves_the_drained_pods_adapters_before_the_replicas_drop():
    three = [pod("x"), pod("y"), pod("z")]
    t1 = plan(ADAPTERS, three).table
    loaded = [pod(n, t1.generation) for n in "xyz"]
    share = {n: {a for a, e in t1.adapters.items() if n in e.holders} for n in "xyz"}
    # spec.replicas 3 -> 2 while the Deployment still has 3: one pod drains, the one holding the
    # fewest adapters (ties by name); it is placed over no more and keeps what it holds meanwhile.
    two = pool(replicas=2)
    got = plan_scaled(loaded, t1, two, deployed=3)
    t2 = got.table
    [gone] = t2.draining
    assert gone == min("xyz", key=lambda n: (len(share[n]), n))
    stay = sorted(set("xyz") - {gone})
    assert t2.placed_on == stay and not t2.awaits_placement(gone) and t2.drains(gone)
    for a in share[gone]:
        assert set(t2.adapters[a].holders) <= set(stay) and set(t2.adapters[a].leaving) == {gone}
    assert got.deployment_replicas == 3  # the ReplicaSet would delete a pod whose adapters are nowhere else yet
    # The ConfigMaps carry it (the planner's shard texts are the table's own canonical JSON).
    write, _, _ = routing.plan_shards(t2, {})
    assert write == t2.to_configmap_data()
    back = RoutesTable.merge_complete("p", [RoutesTable.from_json(text) for text in write.values()])
    assert back is not None and back.draining == [gone] and back.adapters == t2.adapters
    scaling = {c["type"]: c for c in got.pool_status["conditions"]}["Scaling"]
    assert (scaling["status"], scaling["reason"]) == ("True", "Draining")
    assert f"scaling down from 3 to 2 replicas: draining {gone}; {len(share[gone])} adapters still moving" \
        in scaling["message"] and "scaling down" in got.pool_status["message"]
    # The sidecar of the drained pod is told so (its pod-deletion-cost), a survivor is not.
    assert desired_versions(t2, gone) and not t2.drains(stay[0])
    # The survivors load what moved and are Ready: the drained pod lets go; the replicas still wait
    # for the routes saying so to be out, and for its sidecar to have marked it.
    at2 = [pod(n, t2.generation) for n in "xyz"]
    got3 = plan_scaled(at2, t2, two, deployed=3)
    t3 = got3.table
    assert not any(e.leaving for e in t3.adapters.values()) and t3.draining == [gone]
    assert got3.deployment_replicas == 3
    at3 = [pod(n, t3.generation) for n in "xyz"]
    got4 = plan_scaled(at3, t3, two, deployed=3)
    assert got4.deployment_replicas == 3 and f"waiting for the sidecar of {gone}" in got4.pool_status["message"]
    at3 = [marked(p) if p.name == gone else p for p in at3]
    got5 = plan_scaled(at3, got4.table, two, deployed=3)
    assert got5.deployment_replicas == 2 and got5.table.draining == [gone]
    # Lowered: until the ReplicaSet deletes it, it stays drained (never placed on again), then it is gone.
    got6 = plan_scaled(at3, got5.table, two, deployed=2)
    assert got6.deployment_replicas == 2 and got6.table.draining == [gone] and got6.table.placed_on == stay
    ending = [PodView(p.name, p.ready, p.report, terminating=p.name == gone) for p in at3]
    got7 = plan_scaled(ending, got6.table, two, deployed=2)
    assert got7.table.draining is None and got7.deployment_replicas == 2
    scaling = {c["type"]: c for c in got7.pool_status["conditions"]}["Scaling"]
    assert (scaling["status"], scaling["reason"]) == ("False", "Steady")


def test_a_scale_down_drains_a_pod_that_never_started_first_and_leaves_other_surplus_alone():
    three = [pod("x"), pod("y"), pod("z")]
    t1 = plan(ADAPTERS, three).table
    loaded = [pod(n, t1.generation) for n in "xyz"]
    # A pod that never started holds nothing, and the ReplicaSet deletes it before any Ready pod.
    never = PodView("never", False, None)
    got = plan_scaled(loaded + [never], t1, pool(replicas=3), deployed=4)
    assert got.table.draining == ["never"] and got.deployment_replicas == 3
    assert got.table.adapters == t1.adapters  # nothing moves
    # More pods than wanted while the Deployment has what is wanted (a rollout's surge pod): no drain.
    surge = plan_scaled(loaded + [pod("w", 0, ready=False)], t1, pool(replicas=3), deployed=3)
    assert surge.table.draining is None and surge.deployment_replicas == 3
    # The spec raised back mid-drain: nothing drains any more, and the pod is placed over again.
    t2 = plan_scaled(loaded, t1, pool(replicas=2), deployed=3).table
    back = plan_scaled([pod(n, t2.generation) for n in "xyz"], t2, pool(replicas=3), deployed=3)
    assert back.table.draining is None and back.table.placed_on == ["x", "y", "z"]
    # Without placement every replica holds everything: nothing to move, the replicas drop at once.
    every = pool(replicas=2, per_adapter="all")
    t_all = plan(ADAPTERS, three, p=every).table
    flat = routing.plan_pool("p", every, ADAPTERS, loaded, t_all, {}, deployed_replicas=3)
    assert flat.table.draining is None and flat.deployment_replicas == 2
    # The operator restarted mid-drain and has not seen the Deployment yet: the drain goes on.
    restarted = plan_scaled([pod(n, t2.generation) for n in "xyz"], t2, pool(replicas=2), deployed=None)
    assert restarted.table.draining == t2.draining and restarted.deployment_replicas == 3

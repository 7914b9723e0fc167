"""Routes and status planning without a cluster: the rollout rule, canary weights, servedName
collisions, shards written only when they change, and status from the pods' sync reports."""

from __future__ import annotations

import itertools
import json

from lorafleet.contracts.resources import BaseModelPoolStatus, LoRAAdapterStatus
from lorafleet.contracts.routes import RoutesTable, SyncReport
from lorafleet.operator import routing
from lorafleet.operator.routing import PodView


_uids = itertools.count()


def adapter(name, version="1", sha="b", pool="p", created="2026-01-01T00:00:00Z", generation=1, **spec):
    # A fresh uid each time: views cache the parsed spec by (uid, generation), as the API server
    # bumps the generation on every spec change.
    body = {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{next(_uids)}",
                         "generation": generation, "creationTimestamp": created},
            "spec": {"pool": pool, "tenant": "acme", "version": version,
                     "source": {"uri": f"s3://a/{name}/{version}/", "sha256": sha * 64}, **spec}}
    return routing.adapter_view(body)


POOL = routing.pool_view({"metadata": {"name": "p", "namespace": "ns", "uid": "pu", "generation": 1},
                          "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "sequence-classification"},
                                   "replicas": 2}})


def pod(name, generation, ready=True, failed=None):
    return PodView(name=name, ready=ready, report=SyncReport(generation=generation, failed=failed or {}))


def plan(adapters, pods=(), previous=None):
    return routing.plan_pool("p", POOL, list(adapters), list(pods), previous or RoutesTable(pool="p"), {})


def test_new_adapter_enters_at_the_next_generation():
    p = plan([adapter("a")])
    assert p.changed and p.table.generation == 1
    [v] = p.table.adapters["a"].versions
    assert (v.version, v.weight, v.since, v.draining) == ("1", 100, 1, False)
    # Same inputs again: nothing changes, the generation stays.
    again = plan([adapter("a")], previous=p.table)
    assert not again.changed and again.table.generation == 1


def test_version_change_drains_until_every_ready_pod_has_the_new_one():
    t1 = plan([adapter("a")]).table
    t2 = plan([adapter("a", "2", "c")], [pod("x", 1), pod("y", 1)], previous=t1).table
    assert [(v.version, v.weight, v.draining, v.since) for v in t2.adapters["a"].versions] == [
        ("2", 100, False, 2), ("1", 0, True, 1)]
    # One of two has it: still draining. A pod that is not ready does not count.
    t3 = plan([adapter("a", "2", "c")], [pod("x", 2), pod("y", 1), pod("z", 0, ready=False)], previous=t2)
    assert not t3.changed
    t4 = plan([adapter("a", "2", "c")], [pod("x", 2), pod("y", 2), pod("z", 0, ready=False)], previous=t2)
    assert t4.changed and [v.version for v in t4.table.adapters["a"].versions] == ["2"]
    # No ready replica at all: nobody has shown the new version, the old one stays.
    t5 = plan([adapter("a", "2", "c")], [pod("x", 2, ready=False), pod("y", 2, ready=False)], previous=t2)
    assert not t5.changed and [v.version for v in t5.table.adapters["a"].versions] == ["2", "1"]
    # A replica that failed to load the new version holds the old one in the routes.
    t5 = plan([adapter("a", "2", "c")], [pod("x", 2), pod("y", 2, failed={"a@2": "bad"})], previous=t2)
    assert not t5.changed


def test_canary_splits_weights():
    t = plan([adapter("a", canary={"version": "2", "weight": 25,
                                   "source": {"uri": "s3://a/a/2/", "sha256": "c" * 64}})]).table
    assert [(v.version, v.weight) for v in t.adapters["a"].versions] == [("1", 75), ("2", 25)]


def test_served_name_collision_keeps_the_older_and_names_the_field():
    old = adapter("first", servedName="shared", created="2026-01-01T00:00:00Z")
    new = adapter("second", sha="c", servedName="shared", created="2026-01-02T00:00:00Z")
    p = plan([new, old])
    assert p.table.adapters["shared"].versions[0].sha256 == "b" * 64
    st = p.adapter_status["second"]
    valid = next(c for c in st["conditions"] if c["type"] == "Valid")
    assert valid["status"] == "False" and "spec.servedName" in valid["message"] and "'first'" in valid["message"]
    assert st["phase"] == "Failed"
    assert next(c for c in p.adapter_status["first"]["conditions"] if c["type"] == "Valid")["status"] == "True"


def test_canary_equal_to_version_is_invalid_and_keeps_last_good_routes():
    good = plan([adapter("a")]).table
    bad = adapter("a", generation=2, canary={"version": "1", "weight": 5,
                                              "source": {"uri": "s3://a/a/1/", "sha256": "b" * 64}})
    p = plan([bad, adapter("other")], previous=good)
    assert p.table.adapters["a"] == good.adapters["a"]
    assert "spec.canary.version" in p.adapter_status["a"]["message"]
    assert "other" in p.table.adapters


def test_status_from_sync_reports():
    t = plan([adapter("a"), adapter("b")]).table
    p = plan([adapter("a"), adapter("b")], [pod("x", 1), pod("y", 1, failed={"b@1": "rank 128 above maxRank 64"})],
             previous=t)
    a, b = p.adapter_status["a"], p.adapter_status["b"]
    assert (a["phase"], a["ready"], a["servedVersion"], a["digest"]) == ("Ready", "2/2", "1", "b" * 64)
    assert b["phase"] == "Degraded" and "rank 128" in b["message"] and "y" in b["message"]
    assert b["ready"] == "1/2"
    assert p.pool_status["adaptersReady"] == 1 and p.pool_status["readyReplicas"] == 2
    assert p.pool_status["phase"] == "Degraded"
    # Built as plain dicts for speed, they are exactly what the status model writes.
    for st in (a, b, p.pool_status):
        model = LoRAAdapterStatus if st is not p.pool_status else BaseModelPoolStatus
        assert model.model_validate(st).wire() == st


def test_missing_pool_waits_naming_it():
    p = routing.plan_pool("nope", None, [adapter("a", pool="nope")], [], RoutesTable(pool="nope"), {})
    st = p.adapter_status["a"]
    synced = next(c for c in st["conditions"] if c["type"] == "Synced")
    assert st["phase"] == "Pending" and synced["status"] == "False" and "'nope'" in synced["message"]
    assert not p.changed and p.pool_status is None


def test_shards_are_written_only_when_their_content_changes():
    table = plan([adapter(f"t{i}") for i in range(50)]).table
    write, delete, count = routing.plan_shards(table, {})
    assert count == 1 and list(write) == ["lorafleet-routes-p"] and delete == []
    assert write == table.to_configmap_data()
    existing = {n: RoutesTable.from_json(t) for n, t in write.items()}
    assert routing.plan_shards(table, existing)[:2] == ({}, [])
    # A small budget splits the table; the old single ConfigMap goes away.
    write, delete, count = routing.plan_shards(table, existing, budget=2000)
    assert count > 1 and len(write) == count and delete == ["lorafleet-routes-p"]
    assert write == table.to_configmap_data(budget=2000) and count == table.shard_count(2000)
    merged = RoutesTable.merge("p", [RoutesTable.from_json(t) for t in write.values()])
    assert merged.adapters == table.adapters
    # One adapter changes: only its shard is written, naming the generation every shard has now.
    shards = {n: RoutesTable.from_json(t) for n, t in write.items()}
    changed = plan([adapter(f"t{i}") for i in range(49)] + [adapter("t49", "2", "c")], previous=table).table
    write2, delete2, _ = routing.plan_shards(changed, shards, budget=2000)
    assert len(write2) == 1 and delete2 == []
    [(name, text)] = write2.items()
    written = RoutesTable.from_json(text)
    assert written.shard_generations == [changed.generation if i == written.shard else table.generation
                                         for i in range(count)]
    shards[name] = written
    assert RoutesTable.merge_complete("p", shards.values()).adapters == changed.adapters


def test_status_patch_nulls_what_went_away():
    assert routing.status_patch({"a": 1}, {"a": 1}) is None
    assert routing.status_patch({"a": 1, "servedVersion": "1"}, {"a": 2}) == {"a": 2, "servedVersion": None}


def test_conditions_keep_their_transition_time():
    first = plan([adapter("a")]).adapter_status["a"]
    again = routing.plan_pool("p", POOL, [adapter("a")], [], RoutesTable(pool="p"), {"a": first}).adapter_status["a"]
    assert again == first


def test_a_bad_new_version_while_the_old_one_serves_is_degraded_not_failed():
    t1 = plan([adapter("a")]).table
    t2 = plan([adapter("a", "2", "c")], [pod("x", 1), pod("y", 1)], previous=t1).table
    bad = {"a@2": "adapter_model.bin: pickle weights are refused"}
    p = plan([adapter("a", "2", "c")], [pod("x", 2, failed=bad), pod("y", 2, failed=bad)], previous=t2)
    st = p.adapter_status["a"]
    assert st["phase"] == "Degraded" and "pickle" in st["message"]
    assert st["servedVersion"] == "1"  # still answering with the old version
    # With nothing left to serve, the same failure is Failed.
    fresh = plan([adapter("b")]).table
    p = plan([adapter("b")], [pod("x", 1, failed={"b@1": "bad"}), pod("y", 1, failed={"b@1": "bad"})], previous=fresh)
    assert p.adapter_status["b"]["phase"] == "Failed"


def test_an_adapter_served_under_the_pools_name_is_refused():
    # The runtime serves the base model under the pool's name: an adapter there could never be reached.
    p = plan([adapter("p"), adapter("ok")])
    assert "p" not in p.table.adapters and "ok" in p.table.adapters
    st = p.adapter_status["p"]
    valid = next(c for c in st["conditions"] if c["type"] == "Valid")
    assert st["phase"] == "Failed" and valid["status"] == "False"
    assert "spec.servedName" in valid["message"] and "base model" in valid["message"]
    renamed = plan([adapter("p", servedName="p-support")])
    assert "p-support" in renamed.table.adapters


def test_a_failing_deployment_shows_on_the_pool_with_its_reason():
    body = {"metadata": {"name": "lorafleet-p", "generation": 3}, "status": {"conditions": [
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable"},
        {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
         "message": 'pods "lorafleet-p-x" is forbidden: exceeded quota: pods'}]}}
    w = routing.workload_view(body)
    assert (w.generation, w.reason) == (3, "FailedCreate")
    assert w.problem == 'Deployment lorafleet-p: FailedCreate: pods "lorafleet-p-x" is forbidden: exceeded quota: pods'
    stalled = routing.workload_view({"metadata": {"name": "g"}, "status": {"conditions": [
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"}]}})
    assert (stalled.reason, stalled.problem) == ("ProgressDeadlineExceeded", "Deployment g: ProgressDeadlineExceeded: too slow")
    healthy = routing.workload_view({"metadata": {"name": "h"}, "status": {"conditions": [
        {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}})
    assert (healthy.reason, healthy.problem) == (None, None)

    p = routing.plan_pool("p", POOL, [], [pod("x", 0), pod("y", 0)], RoutesTable(pool="p"), {},
                          workload_problems=[(w.reason, w.problem)])
    st = BaseModelPoolStatus.model_validate(p.pool_status)
    failure = next(c for c in st.conditions if c.type == "ReplicaFailure")
    assert (failure.status, failure.reason, failure.message) == ("True", "FailedCreate", w.problem)
    assert st.phase == "Degraded" and w.problem in st.message  # 2/2 ready, yet pods cannot be made
    ok = routing.plan_pool("p", POOL, [], [pod("x", 0), pod("y", 0)], RoutesTable(pool="p"), {}).pool_status
    failure = next(c for c in BaseModelPoolStatus.model_validate(ok).conditions if c.type == "ReplicaFailure")
    assert (failure.status, failure.reason) == ("False", "NoFailure")


def test_model_readiness_from_what_each_pods_runtime_says():
    def reported(name, state, error=None, ready=False):
        return PodView(name=name, ready=ready, report=SyncReport(runtime_model=state, model_error=error))

    def model_ready(pods):
        st = BaseModelPoolStatus.model_validate(routing.plan_pool("p", POOL, [], pods, RoutesTable(pool="p"),
                                                                  {}).pool_status)
        return st, next(c for c in st.conditions if c.type == "ModelReady")

    st, c = model_ready([reported("x", "loading"), PodView(name="y", ready=False, report=None)])
    assert (c.status, c.reason) == ("Unknown", "ModelLoading") and st.phase == "Pending"
    # A Ready pod has its model loaded, whatever an older sidecar reports.
    st, c = model_ready([PodView(name="x", ready=True, report=None), reported("y", "loaded")])
    assert (c.status, c.reason, c.message) == ("True", "ModelLoaded", "the base model is loaded on 2/2 pods")

    why = "architecture MixtralForCausalLM cannot be served by the text-generation engine: ..."
    st, c = model_ready([reported("x", "refused", why), reported("y", "refused", why)])
    assert (c.status, c.reason) == ("False", "ModelRefused")
    assert c.message == f"the runtime refused the base model on 2/2 pods (x, y): {why}"
    assert st.phase == "Failed" and c.message in st.message
    st, c = model_ready([reported("x", "failed", "out of memory"), reported("y", "loaded", ready=True)])
    assert (c.status, c.reason) == ("False", "ModelLoadFailed") and st.phase == "Degraded"
    assert c.message == "the runtime failed to load the base model on 1/2 pods (x): out of memory"


def test_what_was_applied_holds_unless_a_field_of_ours_moved():
    applied = {"metadata": {"name": "s", "labels": {"a": "1"}},
               "spec": {"selector": {"pool": "p"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}
    live = {"metadata": {"name": "s", "labels": {"a": "1", "theirs": "x"}, "uid": "u"},
            "spec": {"clusterIP": "10.0.0.1", "selector": {"pool": "p"},
                     "ports": [{"name": "metrics", "port": 9090}, {"name": "http", "port": "80", "targetPort": "http",
                                                                   "protocol": "TCP"}]}}
    assert routing.holds(live, applied)  # defaults and what others added are not drift
    for path, value in ((("spec", "selector"), {"pool": "q"}), (("metadata", "labels"), {"theirs": "x"}),
                        (("spec", "ports"), [{"name": "http", "port": 8080, "targetPort": "http"}])):
        moved = json.loads(json.dumps(live))
        moved[path[0]][path[1]] = value
        assert not routing.holds(moved, applied), path
    assert not routing.holds({"metadata": {"name": "s"}}, applied)


def test_fallback_opt_in_reaches_the_routes_and_the_default_leaves_them_as_they_were():
    t = plan([adapter("a", fallback="base"), adapter("b"), adapter("c", fallback="none")]).table
    assert t.adapters["a"].fallback == "base"
    assert t.adapters["b"].fallback is None and t.adapters["c"].fallback is None
    # Without the opt-in the routes JSON has no fallback key at all (older sidecars read it unchanged).
    data = json.loads(t.to_json())
    assert data["adapters"]["a"]["fallback"] == "base" and "fallback" not in data["adapters"]["b"]


GEN_POOL_SPEC = {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"}, "replicas": 2}


def _merged_pool(version=None, name="hot"):
    ma = {"name": "chat"} | ({"version": version} if version else {})
    return routing.pool_view({"metadata": {"name": name, "namespace": "ns", "uid": "hu", "generation": 1},
                              "spec": {**GEN_POOL_SPEC, "model": {**GEN_POOL_SPEC["model"], "mergedAdapter": ma},
                                       "replicas": 1}})


def test_merged_pool_resolves_its_adapters_version_and_refuses_what_cannot_be_merged():
    chat = adapter("chat", "2", "c", canary={"version": "3", "weight": 10,
                                             "source": {"uri": "s3://a/chat/3/", "sha256": "d" * 64}})
    ref, problem = routing.resolve_merged(_merged_pool(), chat)
    assert problem is None and (ref.version, ref.sha256, ref.uri, ref.shared_pool) == ("2", "c" * 64, "s3://a/chat/2/", "p")
    ref, _ = routing.resolve_merged(_merged_pool("3"), chat)
    assert (ref.version, ref.sha256) == ("3", "d" * 64)
    _, problem = routing.resolve_merged(_merged_pool("9"), chat)
    assert problem.startswith("spec.model.mergedAdapter.version: '9' is not a version")
    _, problem = routing.resolve_merged(_merged_pool(), None)
    assert "spec.model.mergedAdapter.name: LoRAAdapter 'chat' does not exist" in problem
    cls = routing.pool_view({"metadata": {"name": "hot", "namespace": "ns"},
                             "spec": {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "sequence-classification",
                                                "mergedAdapter": {"name": "chat"}}}})
    assert "text-generation only" in routing.resolve_merged(cls, chat)[1]


def test_shared_pool_routes_and_status_name_the_merged_pool():
    info = routing.MergedInfo(pool="hot", version="2", ready=1, replicas=1)
    chat = adapter("chat", "2", "c")
    p = routing.plan_pool("p", POOL, [chat, adapter("other")], [pod("x", 1), pod("y", 1)], RoutesTable(pool="p"), {},
                          merged={"chat": info})
    assert p.table.adapters["chat"].merged.model_dump() == {"pool": "hot", "version": "2"}
    assert p.table.adapters["other"].merged is None
    st = p.adapter_status["chat"]
    assert st["pools"] == [{"pool": "p", "role": "shared", "readyReplicas": 2, "replicas": 2},
                           {"pool": "hot", "role": "merged", "version": "2", "readyReplicas": 1, "replicas": 1}]
    LoRAAdapterStatus.model_validate(st)
    # The merged pool scaling to zero changes the status, not the routes (the gateway watches pods).
    q = routing.plan_pool("p", POOL, [chat, adapter("other")], [pod("x", 1), pod("y", 1)], p.table, {},
                          merged={"chat": routing.MergedInfo("hot", "2", 0, 0)})
    assert not q.changed and q.adapter_status["chat"]["pools"][1]["readyReplicas"] == 0


def test_a_merged_pool_serves_no_other_adapter_and_says_what_it_merges():
    hot = _merged_pool()
    ref = routing.resolve_merged(hot, adapter("chat", "2", "c"))
    p = routing.plan_pool("hot", hot, [adapter("stray", pool="hot")], [], RoutesTable(pool="hot"), {}, merged_self=ref)
    assert p.table.adapters == {}
    assert "serves no other adapter" in p.adapter_status["stray"]["message"]
    assert p.pool_status["mergedAdapter"] == "chat@2"
    bad = routing.plan_pool("hot", hot, [], [], RoutesTable(pool="hot"), {}, merged_self=(None, "spec.model.x: why"))
    assert bad.pool_status["phase"] == "Failed" and "spec.model.x: why" in bad.pool_status["message"]


def test_the_pools_serialized_entries_are_its_own_and_only_the_current_ones_stay():
    table = plan([adapter(f"t{i}") for i in range(50)]).table
    parts: routing.Parts = {}
    write, _, _ = routing.plan_shards(table, {}, parts=parts)
    assert write == table.to_configmap_data()
    assert {key[1] for key in parts} == set(table.adapters) and len(parts) == 50
    # A later plan reuses what it serialized (the same entry objects) and gives the same texts.
    assert routing.plan_shards(table, {}, parts=parts)[0] == write and len(parts) == 50
    # Tables with every entry new: the replaced ones go once they outnumber the current ones.
    for round_ in range(4):
        newer = plan([adapter(f"t{i}", str(round_ + 2), "c") for i in range(50)], previous=table).table
        assert routing.plan_shards(newer, {}, parts=parts)[0] == newer.to_configmap_data()
        table = newer
    assert len(parts) <= 2 * 50 + 64
    assert {id(e) for e in table.adapters.values()} <= {key[0] for key in parts}


def test_a_spec_cache_parses_each_generation_once_and_stays_bounded():
    specs = routing.SpecCache(limit=3)
    body = {"metadata": {"name": "a", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": {"pool": "p", "tenant": "acme", "version": "1", "source": {"uri": "s3://a/a/1/", "sha256": "b" * 64}}}
    first = routing.adapter_view(body, specs)
    assert routing.adapter_view(body, specs).spec is first.spec  # a status event: not parsed again
    assert routing.adapter_view(body).spec is not first.spec     # no cache: parsed every time
    edited = {**body, "metadata": {**body["metadata"], "generation": 2}, "spec": {**body["spec"], "version": "2"}}
    assert routing.adapter_view(edited, specs).spec.version == "2"
    for uid in ("u2", "u3", "u4"):
        routing.adapter_view({**body, "metadata": {**body["metadata"], "uid": uid}}, specs)
    assert len(specs.parsed) <= 3


def test_a_merged_adapter_its_sidecars_refuse_is_named_on_the_pool_and_the_adapter():
    hot = _merged_pool()
    chat = adapter("chat", "2", "c")
    ref = routing.resolve_merged(hot, chat)
    why = "merged adapter s3://a/chat/2/: digest mismatch: s3://a/chat/2/ has eeee, the route says cccc"
    refusing = PodView(name="hot-0", ready=False, report=SyncReport(generation=0, merged_adapter_failure=why))
    p = routing.plan_pool("hot", hot, [], [refusing], RoutesTable(pool="hot"), {}, merged_self=ref)
    [model] = [c for c in p.pool_status["conditions"] if c["type"] == "ModelReady"]
    assert (model["status"], model["reason"]) == ("False", "MergedAdapterRefused")
    assert f"merged adapter chat@2 (LoRAAdapter 'chat', sha256 {'c' * 64})" in model["message"]
    assert "on 1/1 pods (hot-0): " + why in model["message"]
    assert p.pool_status["phase"] == "Failed" and why in p.pool_status["message"]
    BaseModelPoolStatus.model_validate(p.pool_status)
    # Its shared pool's view of it: the adapter's status says why the merged pool has 0 Ready.
    info = routing.MergedInfo("hot", "2", 0, 1, routing.merged_refusal(ref[0], [refusing]))
    q = routing.plan_pool("p", POOL, [chat], [pod("x", 1), pod("y", 1)], RoutesTable(pool="p"), {},
                          merged={"chat": info})
    st = q.adapter_status["chat"]
    assert st["phase"] == "Ready"  # the shared pool serves it: nothing else disturbed
    assert why in st["pools"][1]["message"] and why in st["message"]
    LoRAAdapterStatus.model_validate(st)
    # A pod without the failure and a Ready one: no refusal to show.
    assert routing.merged_refusal(ref[0], [pod("hot-1", 0)]) is None
    ok = routing.plan_pool("hot", hot, [], [pod("hot-1", 0)], RoutesTable(pool="hot"), {}, merged_self=ref)
    assert [c["reason"] for c in ok.pool_status["conditions"] if c["type"] == "ModelReady"] == ["ModelLoaded"]


def test_a_merged_pools_ready_pods_count_for_the_version_they_merge_only():
    ref, _ = routing.resolve_merged(_merged_pool(), adapter("chat", "2", "c"))

    def merged_pod(name, digest, ready=True):
        return routing.pod_view({"metadata": {"name": name}, "spec": {"containers": [{"name": "runtime", "env": [
            {"name": "LORAFLEET_MERGED_ADAPTER_DIR", "value": f"/var/cache/lorafleet/adapters/{digest}"}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}})

    old, new = merged_pod("hot-a", "b" * 64), merged_pod("hot-b", "c" * 64, ready=False)
    assert (old.merged, new.merged) == ("b" * 64, "c" * 64)
    # Rolling from version 1 (digest b...) to 2: the Ready pod is the old one's, not version 2's.
    assert routing.merged_ready(ref, [old, new]) == (0, 1)
    info = routing.MergedInfo("hot", "2", 0, 1, None, 1)
    st = routing.plan_pool("p", POOL, [adapter("chat", "2", "c")], [pod("x", 1), pod("y", 1)], RoutesTable(pool="p"),
                           {}, merged={"chat": info}).adapter_status["chat"]
    assert st["pools"][1] == {"pool": "hot", "role": "merged", "version": "2", "readyReplicas": 0, "replicas": 1}
    assert "1 Ready pods of pool 'hot' still merge another version (rolling to 2)" in st["message"]
    assert routing.merged_ready(ref, [old, merged_pod("hot-b", "c" * 64)]) == (1, 1)


def test_a_base_model_its_sidecars_cannot_ready_is_named_on_the_pool():
    """A wrong spec.model.sha256 (or storage down): the pods never turn Ready, and a pool without
    adapters would say nothing else; ModelReady False ModelFetchFailed names the pods and the reason."""
    why = "base model s3://models/tiny/: digest mismatch: s3://models/tiny/ has eeee, the route says aaaa"
    failing = [PodView(name=f"p-{i}", ready=False, report=SyncReport(generation=0, model_failure=why))
               for i in range(2)]
    p = routing.plan_pool("p", POOL, [], failing, RoutesTable(pool="p"), {})
    [model] = [c for c in p.pool_status["conditions"] if c["type"] == "ModelReady"]
    assert (model["status"], model["reason"]) == ("False", "ModelFetchFailed")
    assert f"on 2/2 pods (p-0, p-1), retrying: {why}" in model["message"]
    assert p.pool_status["phase"] == "Failed" and why in p.pool_status["message"]
    BaseModelPoolStatus.model_validate(p.pool_status)
    # One pod got it (Ready), the other still fails: the pool is Degraded and still says why.
    q = routing.plan_pool("p", POOL, [], [pod("p-0", 0), failing[1]], RoutesTable(pool="p"), {})
    [model] = [c for c in q.pool_status["conditions"] if c["type"] == "ModelReady"]
    assert model["reason"] == "ModelFetchFailed" and "on 1/2 pods (p-1)" in model["message"]
    # The failure gone from the reports: nothing left to show.
    ok = routing.plan_pool("p", POOL, [], [pod("p-0", 0), pod("p-1", 0)], RoutesTable(pool="p"), {})
    assert [c["reason"] for c in ok.pool_status["conditions"] if c["type"] == "ModelReady"] == ["ModelLoaded"]

"""LoRAAdapters become entries of their pool's routes, with the rollout rule (draining until every
ready replica reports the new version), canary splits, invalid specs refused on their own, adapters
waiting for a missing pool, and status computed from the pool pods' sync reports."""

from __future__ import annotations

from lf_operator_kit import (SHA, adapter_doc, adapter_status, apply, cond, make_pod, pool_doc, routes, set_pod,
                             wait_routes, wait_status)

from lorafleet.localstack.procs import wait_for


def _versions(table, name):
    return [(v.version, v.weight, v.draining) for v in table.adapters[name].versions]


def test_routes_follow_adapters_create_update_delete_and_canary(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=1))
    apply(control_plane, namespace, adapter_doc("support", "p", servedName="acme-support", pinned=True))
    apply(control_plane, namespace, adapter_doc("billing", "p", version="7", sha=SHA["d"]))
    t = wait_routes(kube, namespace, "p", lambda t: {"acme-support", "billing"} <= set(t.adapters),
                    "both adapters in the routes")
    entry = t.adapters["acme-support"]
    assert entry.tenant == "acme" and entry.pinned is True and entry.preload is True
    [v] = entry.versions
    assert (v.version, v.uri, v.sha256, v.weight, v.draining) == ("1", "s3://adapters/support/1/", SHA["b"], 100,
                                                                  False)
    assert 0 < v.since <= t.generation
    # servedName defaults to the object's name.
    assert _versions(t, "billing") == [("7", 100, False)]

    # A canary splits the traffic: the canary gets its weight, the main version the rest.
    apply(control_plane, namespace, adapter_doc("billing", "p", version="7", sha=SHA["d"], canary={
        "version": "8", "weight": 10, "source": {"uri": "s3://adapters/billing/8/", "sha256": SHA["e"]}}))
    t2 = wait_routes(kube, namespace, "p", lambda t: len(t.adapters["billing"].versions) == 2, "the canary")
    assert _versions(t2, "billing") == [("7", 90, False), ("8", 10, False)]
    assert t2.generation > t.generation
    assert t2.adapters["billing"].versions[1].since == t2.generation
    # The untouched adapter keeps its entry, `since` included.
    assert t2.adapters["acme-support"] == t.adapters["acme-support"]

    control_plane.kubectl("delete", "lora", "billing", "-n", namespace)
    wait_routes(kube, namespace, "p", lambda t: "billing" not in t.adapters and "acme-support" in t.adapters,
                "billing to leave the routes")

    # Routes deleted by hand come back.
    control_plane.kubectl("delete", "configmap", "lorafleet-routes-p", "-n", namespace)
    wait_routes(kube, namespace, "p", lambda t: "acme-support" in t.adapters, "the routes to be written again")

    st = wait_status(control_plane, namespace, "lora", "support", lambda s: s.get("observedGeneration") == 1,
                     what="support's status")
    assert st["phase"] == "Pending" and st["ready"] == "0/1" and st["replicas"] == 1
    assert cond(st, "Synced")["status"] == "True" and cond(st, "Valid")["status"] == "True"
    assert cond(st, "Ready")["status"] == "False"


def test_version_change_drains_until_every_ready_replica_reports_it(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    apply(control_plane, namespace, adapter_doc("a", "p", version="1", sha=SHA["b"]))
    t1 = wait_routes(kube, namespace, "p", lambda t: "a" in t.adapters, "a@1 in the routes")
    g1 = t1.generation
    make_pod(kube, namespace, "p", "p-0", sync={"generation": g1, "loaded": 1, "modelReady": True})
    make_pod(kube, namespace, "p", "p-1", sync={"generation": g1, "loaded": 1, "modelReady": True})
    st = wait_status(control_plane, namespace, "lora", "a", lambda s: s.get("phase") == "Ready",
                     what="a Ready on both replicas")
    assert st["ready"] == "2/2" and st["servedVersion"] == "1" and st["digest"] == SHA["b"]
    assert cond(st, "Ready")["status"] == "True"
    pst = wait_status(control_plane, namespace, "lfpool", "p", lambda s: s.get("adaptersReady") == 1,
                      what="pool status counting a")
    assert pst["readyReplicas"] == 2 and pst["ready"] == "2/2" and pst["adapters"] == 1 and pst["phase"] == "Ready"

    apply(control_plane, namespace, adapter_doc("a", "p", version="2", sha=SHA["c"]))
    t2 = wait_routes(kube, namespace, "p", lambda t: t.adapters["a"].versions[0].version == "2", "a@2")
    assert _versions(t2, "a") == [("2", 100, False), ("1", 0, True)]
    g2 = t2.adapters["a"].versions[0].since
    st = wait_status(control_plane, namespace, "lora", "a", lambda s: s.get("observedGeneration") == 2,
                     what="a's status for generation 2")
    # Nobody has version 2 yet: the replicas still serve version 1.
    assert st["phase"] == "Syncing" and st["ready"] == "0/2" and st["servedVersion"] == "1"

    set_pod(kube, namespace, "p-0", sync={"generation": g2, "loaded": 1})
    wait_status(control_plane, namespace, "lora", "a", lambda s: s.get("readyReplicas") == 1, what="a on 1/2")
    assert _versions(routes(kube, namespace, "p"), "a") == [("2", 100, False), ("1", 0, True)]
    set_pod(kube, namespace, "p-1", sync={"generation": g2, "loaded": 1})
    wait_routes(kube, namespace, "p", lambda t: _versions(t, "a") == [("2", 100, False)],
                "the draining version 1 to be dropped")
    st = wait_status(control_plane, namespace, "lora", "a", lambda s: s.get("phase") == "Ready",
                     what="a@2 Ready")
    assert st["servedVersion"] == "2" and st["digest"] == SHA["c"] and st["ready"] == "2/2"

    # A failure a sidecar reports shows on that adapter only, with its reason.
    apply(control_plane, namespace, adapter_doc("b", "p", version="5", sha=SHA["d"]))
    g3 = wait_routes(kube, namespace, "p", lambda t: "b" in t.adapters, "b in the routes").generation
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, sync={"generation": g3, "loaded": 1, "failed": {"b@5": "digest mismatch"}})
    st = wait_status(control_plane, namespace, "lora", "b", lambda s: s.get("phase") == "Failed",
                     what="b Failed")
    assert "digest mismatch" in st["message"] and cond(st, "Ready")["status"] == "False"
    assert cond(st, "Ready")["reason"] == "LoadFailed"
    assert adapter_status(control_plane, namespace, "a")["phase"] == "Ready"
    set_pod(kube, namespace, "p-1", sync={"generation": g3, "loaded": 2})
    st = wait_status(control_plane, namespace, "lora", "b", lambda s: s.get("phase") == "Degraded",
                     what="b Degraded (fails on one replica of two)")
    assert "p-0" in st["message"] and st["ready"] == "1/2"
    events = control_plane.kubectl("get", "events", "-n", namespace, "--field-selector",
                                   "involvedObject.name=b", "-o", "jsonpath={.items[*].message}").stdout
    assert "digest mismatch" in events

    # A replica that is not ready does not hold a rollout back.
    set_pod(kube, namespace, "p-0", ready=False)
    wait_status(control_plane, namespace, "lfpool", "p", lambda s: s.get("readyReplicas") == 1,
                what="pool with one ready replica")


def test_adapter_for_a_missing_pool_waits_and_is_picked_up(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, adapter_doc("early", "later"))
    st = wait_status(control_plane, namespace, "lora", "early", lambda s: s.get("phase") == "Pending",
                     what="early waiting for its pool")
    synced = cond(st, "Synced")
    assert synced["status"] == "False" and "'later'" in synced["message"] and synced["reason"] == "PoolNotFound"
    apply(control_plane, namespace, pool_doc("later", replicas=1))
    wait_routes(kube, namespace, "later", lambda t: "early" in t.adapters, "early picked up by its new pool")
    wait_status(control_plane, namespace, "lora", "early", lambda s: cond(s, "Synced").get("status") == "True",
                what="early Synced")


def test_invalid_specs_are_refused_alone(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=1))
    apply(control_plane, namespace, adapter_doc("first", "p", servedName="shared", sha=SHA["b"]))
    wait_routes(kube, namespace, "p", lambda t: "shared" in t.adapters, "first serving 'shared'")
    apply(control_plane, namespace, adapter_doc("second", "p", servedName="shared", sha=SHA["c"]))
    apply(control_plane, namespace, adapter_doc("good", "p"))
    # Canary version equal to version passes the schema; the operator refuses it naming the field.
    apply(control_plane, namespace, adapter_doc("twin", "p", version="3", canary={
        "version": "3", "weight": 50, "source": {"uri": "s3://adapters/twin/3/", "sha256": SHA["e"]}}))

    st = wait_status(control_plane, namespace, "lora", "twin", lambda s: cond(s, "Valid").get("status") == "False",
                     what="twin invalid")
    assert "spec.canary.version" in cond(st, "Valid")["message"] and st["phase"] == "Failed"
    st = wait_status(control_plane, namespace, "lora", "second",
                     lambda s: cond(s, "Valid").get("status") == "False", what="second invalid")
    msg = cond(st, "Valid")["message"]
    assert "spec.servedName" in msg and "'first'" in msg

    t = wait_routes(kube, namespace, "p", lambda t: "good" in t.adapters, "good routed")
    # The older adapter keeps the name; nothing else was disturbed.
    assert t.adapters["shared"].versions[0].sha256 == SHA["b"] and "twin" not in t.adapters
    assert cond(adapter_status(control_plane, namespace, "first"), "Valid")["status"] == "True"

    # Fixing the spec makes it valid and routed.
    apply(control_plane, namespace, adapter_doc("twin", "p", version="3", canary={
        "version": "4", "weight": 50, "source": {"uri": "s3://adapters/twin/4/", "sha256": SHA["e"]}}))
    wait_routes(kube, namespace, "p", lambda t: "twin" in t.adapters, "twin routed once fixed")
    wait_status(control_plane, namespace, "lora", "twin", lambda s: cond(s, "Valid").get("status") == "True",
                what="twin valid")
    # An invalid update of a routed adapter keeps its last good routes.
    apply(control_plane, namespace, adapter_doc("twin", "p", version="3", canary={
        "version": "3", "weight": 50, "source": {"uri": "s3://adapters/twin/3/", "sha256": SHA["e"]}}))
    wait_status(control_plane, namespace, "lora", "twin", lambda s: cond(s, "Valid").get("status") == "False",
                what="twin invalid again")
    assert [v.version for v in routes(kube, namespace, "p").adapters["twin"].versions] == ["3", "4"]

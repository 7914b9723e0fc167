"""A rollout commits only on what the replicas positively report: a sync report whose lists were cut
(more than 200 versions not loaded) says nothing about the versions after its last listed key, and a
pool with no ready replica never drops the version it was serving."""

from __future__ import annotations

from lf_operator_kit import SHA, adapter_doc, apply, make_pod, pool_doc, routes, set_pod, wait_routes, wait_status


def _versions(table, name):
    return [(v.version, v.weight, v.draining) for v in table.adapters[name].versions]


def test_a_truncated_report_never_counts_what_it_does_not_list_as_loaded(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    apply(control_plane, namespace, adapter_doc("ab", "p", version="1", sha=SHA["b"]))
    apply(control_plane, namespace, adapter_doc("zz", "p", version="1", sha=SHA["b"]))
    g1 = wait_routes(kube, namespace, "p", lambda t: {"ab", "zz"} <= set(t.adapters), "both in the routes").generation
    for pod in ("p-0", "p-1"):
        make_pod(kube, namespace, "p", pod, sync={"generation": g1, "loaded": 2, "modelReady": True})
    wait_status(control_plane, namespace, "lora", "zz", lambda s: s.get("phase") == "Ready", what="zz@1 Ready")

    apply(control_plane, namespace, adapter_doc("zz", "p", version="2", sha=SHA["c"]))
    t2 = wait_routes(kube, namespace, "p", lambda t: t.adapters["zz"].versions[0].version == "2", "zz@2")
    g2 = t2.generation
    # A bulk rollout: 251 versions not loaded yet on each replica, zz@2 among them. The sidecar lists
    # the first 200 keys (ab@1 failed, m-000..m-198 pending), says where its lists stop, and that
    # every version it left out entered the routes at g2 or later.
    pending = [f"m-{i:03d}@1" for i in range(250)] + ["zz@2"]
    report = {"generation": g2, "loaded": 1, "modelReady": True, "failed": {"ab@1": "digest mismatch"},
              "pending": pending[:199], "failedTotal": 1, "pendingTotal": len(pending),
              "coveredThrough": pending[198], "cutSince": g2}
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, sync=report)
    # The operator has read the reports once ab shows their failure ...
    wait_status(control_plane, namespace, "lora", "ab", lambda s: s.get("phase") == "Failed", what="ab Failed")
    # ... and zz@2, in the part the lists do not reach, is unknown: the version the replicas serve
    # stays in the routes, and zz is not Ready.
    assert _versions(routes(kube, namespace, "p"), "zz") == [("2", 100, False), ("1", 0, True)]
    st = wait_status(control_plane, namespace, "lora", "zz", lambda s: s.get("observedGeneration") == 2,
                     what="zz's status for generation 2")
    # zz@1 entered before g2, so the cut part does not hold it: the replicas still serve it.
    assert st["phase"] == "Syncing" and st["ready"] == "0/2" and st["servedVersion"] == "1", st

    # Once the lists fit, zz@2 (not in them) is loaded: Ready, and version 1 is dropped.
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, sync={"generation": g2, "loaded": 2, "modelReady": True,
                                            "failed": {"ab@1": "digest mismatch"}})
    wait_routes(kube, namespace, "p", lambda t: _versions(t, "zz") == [("2", 100, False)], "zz@1 dropped")
    st = wait_status(control_plane, namespace, "lora", "zz", lambda s: s.get("phase") == "Ready", what="zz@2 Ready")
    assert st["servedVersion"] == "2" and st["ready"] == "2/2"


def test_a_pool_with_no_ready_replica_keeps_the_old_version(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    apply(control_plane, namespace, adapter_doc("a", "p", version="1", sha=SHA["b"]))
    g1 = wait_routes(kube, namespace, "p", lambda t: "a" in t.adapters, "a@1 in the routes").generation
    for pod in ("p-0", "p-1"):
        make_pod(kube, namespace, "p", pod, sync={"generation": g1, "loaded": 1, "modelReady": True})
    wait_status(control_plane, namespace, "lora", "a", lambda s: s.get("phase") == "Ready", what="a@1 Ready")

    # Every replica goes unready at once (a node drain, a crash loop), then the version changes.
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, ready=False)
    wait_status(control_plane, namespace, "lfpool", "p", lambda s: s.get("readyReplicas") == 0,
                what="no ready replica")
    apply(control_plane, namespace, adapter_doc("a", "p", version="2", sha=SHA["c"]))
    t2 = wait_routes(kube, namespace, "p", lambda t: t.adapters["a"].versions[0].version == "2", "a@2")
    # Nobody has shown version 2: version 1 stays (draining) for the replicas that come back.
    assert _versions(t2, "a") == [("2", 100, False), ("1", 0, True)]
    g2 = t2.adapters["a"].versions[0].since

    # One replica comes back with version 2 loaded: every ready replica has it, version 1 goes.
    set_pod(kube, namespace, "p-0", ready=True, sync={"generation": g2, "loaded": 1, "modelReady": True})
    wait_routes(kube, namespace, "p", lambda t: _versions(t, "a") == [("2", 100, False)], "a@1 dropped")

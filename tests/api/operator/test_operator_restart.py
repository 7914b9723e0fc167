"""An operator restart converges without rewriting anything that did not change: every object keeps
its resourceVersion, and what changed while it was down is picked up."""

from __future__ import annotations

from lf_operator_kit import SHA, adapter_doc, apply, get_json, make_pod, pool_doc, wait_routes, wait_status

from lorafleet.localstack.procs import wait_for

KINDS = "configmaps,deployments,services,serviceaccounts,roles,rolebindings,loraadapters,basemodelpools"


def _versions(control_plane, namespace):
    items = get_json(control_plane, namespace, KINDS)["items"]
    return {f"{o['kind']}/{o['metadata']['name']}": o["metadata"]["resourceVersion"] for o in items
            if o["kind"] != "ConfigMap" or o["metadata"]["name"].startswith("lorafleet-")}


def test_restart_rewrites_nothing_unchanged(control_plane, operator, namespace, kube):
    for pool in ("p", "q"):
        apply(control_plane, namespace, pool_doc(pool, replicas=1))
        for i in range(10):
            apply(control_plane, namespace, adapter_doc(f"{pool}-a{i}", pool, sha=SHA["b"]))
    wait_routes(kube, namespace, "p", lambda t: len(t.adapters) == 10, "p's 10 adapters")
    gen = wait_routes(kube, namespace, "q", lambda t: len(t.adapters) == 10, "q's 10 adapters").generation
    make_pod(kube, namespace, "q", "q-0", sync={"generation": gen, "loaded": 10})
    for pool in ("p", "q"):
        for i in range(10):
            wait_status(control_plane, namespace, "lora", f"{pool}-a{i}",
                        lambda s: s.get("phase") == ("Ready" if pool == "q" else "Pending"), what=f"{pool}-a{i}")
        wait_status(control_plane, namespace, "lfpool", pool, lambda s: s.get("adapters") == 10, what=pool)
        wait_for(lambda: (d := get_json(control_plane, namespace, "deployment", f"lorafleet-{pool}")) and
                 d["status"].get("observedGeneration") == d["metadata"]["generation"],
                 what="the deployment controller to settle")
    before = _versions(control_plane, namespace)

    operator.stop()
    # While the operator is down, one adapter goes away.
    control_plane.kubectl("delete", "lora", "p-a0", "-n", namespace)
    mark = len(operator.text())
    operator.start()
    wait_routes(kube, namespace, "p", lambda t: "p-a0" not in t.adapters and len(t.adapters) == 9,
                "p-a0 to leave the routes after the restart")
    wait_status(control_plane, namespace, "lfpool", "p", lambda s: s.get("adapters") == 9, what="p counting 9")
    wait_for(lambda: f"pool {namespace}/q reconciled" in operator.text()[mark:], what="q reconciled after restart")

    after = _versions(control_plane, namespace)
    changed = {k for k in before if before[k] != after.get(k)}
    # Only p's routes, p's status and the deleted adapter moved.
    assert changed == {"ConfigMap/lorafleet-routes-p", "BaseModelPool/p", "LoRAAdapter/p-a0"}, changed

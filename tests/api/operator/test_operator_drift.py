"""What the operator owns stays as the pool says: `kubectl scale` or a deleted Deployment is put
back, and a ReplicaSet that cannot create pods (here a ResourceQuota) shows on the pool's status with
the ReplicaSet's own message. The controller manager runs, so Deployments, ReplicaSets and quota
admission are the real ones."""

from __future__ import annotations

import json

from lf_operator_kit import apply, cond, get_json, pool_doc, wait_status

from lorafleet.contracts import names
from lorafleet.contracts.names import RuntimeEnv
from lorafleet.localstack.procs import wait_for


def _env(control_plane, namespace, var, name="lorafleet-p"):
    d = get_json(control_plane, namespace, "deployment", name) or {}
    c = next(c for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == names.RUNTIME_CONTAINER)
    return next((e.get("value") for e in c.get("env") or [] if e["name"] == var), None)


def _replicas(control_plane, namespace, name="lorafleet-p"):
    d = get_json(control_plane, namespace, "deployment", name)
    return (d or {}).get("spec", {}).get("replicas")


def test_scaled_or_deleted_deployments_are_put_back(control_plane, operator, namespace):
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    wait_for(lambda: _replicas(control_plane, namespace) == 2, timeout=30, what="the pool's Deployment")

    control_plane.kubectl("scale", "deployment", "lorafleet-p", "-n", namespace, "--replicas=5")
    assert _replicas(control_plane, namespace) in (5, 2)
    wait_for(lambda: _replicas(control_plane, namespace) == 2, timeout=30, what="replicas put back to 2")

    def image():
        return get_json(control_plane, namespace, "deployment", "lorafleet-p")["spec"]["template"]["spec"][
            "containers"][0]["image"]

    image_before = image()
    control_plane.kubectl("patch", "deployment", "lorafleet-p", "-n", namespace, "--type=json", "-p",
                          json.dumps([{"op": "replace", "path": "/spec/template/spec/containers/0/image",
                                       "value": "example.invalid/other:1"}]))
    wait_for(lambda: image() == image_before, timeout=30, what="the image put back")

    # An owned env value changed by hand (another field manager takes the field): put back.
    before = _env(control_plane, namespace, RuntimeEnv.MAX_BATCH_SIZE)
    assert before not in (None, "999")
    control_plane.kubectl("patch", "deployment", "lorafleet-p", "-n", namespace, "--type=strategic", "-p",
                          json.dumps({"spec": {"template": {"spec": {"containers": [
                              {"name": names.RUNTIME_CONTAINER,
                               "env": [{"name": RuntimeEnv.MAX_BATCH_SIZE, "value": "999"}]}]}}}}))
    wait_for(lambda: _env(control_plane, namespace, RuntimeEnv.MAX_BATCH_SIZE) == before, timeout=30,
             what="the env value put back")
    assert _replicas(control_plane, namespace) == 2

    control_plane.kubectl("delete", "deployment", "lorafleet-p", "-n", namespace)
    wait_for(lambda: _replicas(control_plane, namespace) == 2, timeout=30, what="the Deployment made again")


def test_edited_or_deleted_services_and_service_accounts_are_put_back(control_plane, operator, namespace):
    """Kinds without a generation: drift is a field the operator applied that no longer holds."""
    apply(control_plane, namespace, pool_doc("p", replicas=1))
    svc, sa = names.service_name("p"), names.sidecar_service_account("p")

    def service():
        return get_json(control_plane, namespace, "service", svc)

    wait_for(lambda: service() and get_json(control_plane, namespace, "serviceaccount", sa), timeout=30,
             what="the pool's Service and ServiceAccount")
    want = service()["spec"]
    # Someone points the Service elsewhere (and adds a label of their own, which is theirs to keep).
    control_plane.kubectl("patch", "service", svc, "-n", namespace, "--type=merge", "-p", json.dumps({
        "metadata": {"labels": {"team": "ops"}},
        "spec": {"selector": {names.LABEL_POOL: "elsewhere"}}}))
    wait_for(lambda: service()["spec"]["selector"] == want["selector"], timeout=30, what="the selector put back")
    assert service()["metadata"]["labels"]["team"] == "ops"
    control_plane.kubectl("patch", "service", svc, "-n", namespace, "--type=json", "-p", json.dumps([
        {"op": "replace", "path": "/spec/ports/0/port", "value": 8080}]))
    wait_for(lambda: [p["port"] for p in service()["spec"]["ports"]] == [p["port"] for p in want["ports"]],
             timeout=30, what="the port put back")

    control_plane.kubectl("delete", "service", svc, "-n", namespace)
    wait_for(lambda: (s := service()) and s["spec"]["selector"] == want["selector"], timeout=30,
             what="the Service made again")
    control_plane.kubectl("delete", "serviceaccount", sa, "-n", namespace)
    wait_for(lambda: get_json(control_plane, namespace, "serviceaccount", sa), timeout=30,
             what="the ServiceAccount made again")


def test_what_the_api_server_stores_holds_what_was_applied(control_plane, operator, namespace):
    """Defaults the API server fills in (clusterIP, a port's protocol, an HTTPRoute's defaults, ...) are no drift: else every
    event of an owned object (an Ingress's status written by its controller) would apply it again."""
    from lorafleet.operator import manifests, routing
    from lorafleet.operator.kube import DRIFT_CHECKED

    mark = len(operator.text())
    apply(control_plane, namespace, pool_doc("p", replicas=2, ingress={"host": "p.example", "tls": [
        {"hosts": ["p.example"], "secretName": "p-tls"}]}, gateway={"enabled": True, "replicas": 1},
        httpRoute={"parentRefs": [{"name": "gw", "sectionName": "http"}], "hostnames": ["p.example"]}))
    wait_for(lambda: get_json(control_plane, namespace, "ingress", names.ingress_name("p")), timeout=30,
             what="the pool's Ingress")
    pool = routing.pool_view(get_json(control_plane, namespace, "lfpool", "p"))
    checked = [m for m in manifests.pool_children("p", namespace, pool.uid, pool.spec) if m["kind"] in DRIFT_CHECKED]
    assert {m["kind"] for m in checked} == DRIFT_CHECKED
    for m in checked:
        live = wait_for(lambda: get_json(control_plane, namespace, m["kind"].lower(), m["metadata"]["name"]),
                        timeout=30, what=f"{m['kind']} {m['metadata']['name']}")
        assert routing.holds(live, m), (m, live)
    drift = [line for line in operator.text()[mark:].splitlines() if f" {namespace}/" in line and "outside" in line]
    assert not drift, drift


def test_a_replicaset_that_cannot_create_pods_shows_on_the_pool(control_plane, operator, namespace):
    # Room for one pod. (The quota controller does not run here: its usage is set by hand, then
    # quota admission counts each pod it lets in.)
    control_plane.kubectl("create", "quota", "pods", "-n", namespace, "--hard=pods=1")
    control_plane.kubectl("patch", "resourcequota", "pods", "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"hard": {"pods": "1"}, "used": {"pods": "0"}}}))
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    st = wait_status(control_plane, namespace, "lfpool", "p",
                     lambda s: cond(s, "ReplicaFailure").get("status") == "True", timeout=60,
                     what="the ReplicaSet's failure on the pool")
    c = cond(st, "ReplicaFailure")
    assert "exceeded quota" in c["message"] and "lorafleet-p" in c["message"], c
    assert c["reason"] == "FailedCreate", c  # the ReplicaSet's own reason
    assert "exceeded quota" in st["message"]

    # Room made: the failure clears.
    control_plane.kubectl("patch", "resourcequota", "pods", "-n", namespace, "--type=merge",
                          "-p", json.dumps({"spec": {"hard": {"pods": "5"}}}))
    control_plane.kubectl("patch", "resourcequota", "pods", "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"hard": {"pods": "5"}, "used": {"pods": "1"}}}))
    wait_status(control_plane, namespace, "lfpool", "p", lambda s: cond(s, "ReplicaFailure").get("status") == "False",
                timeout=90, what="the failure cleared once the ReplicaSet made its pods")

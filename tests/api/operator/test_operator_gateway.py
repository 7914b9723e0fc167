"""``spec.gateway.enabled`` on a BaseModelPool: the real operator creates the gateway's Deployment,
Service, ServiceAccount, Role and RoleBinding, points the pool's Ingress at it, and removes all of it
again when the gateway is turned off."""

from __future__ import annotations

from lorafleet.localstack.procs import wait_for

from lf_operator_kit import apply, cond, get_json, pool_doc, wait_status

GW = "lorafleet-minilm-gateway"
GW_KINDS = ["deployment", "service", "serviceaccount", "role", "rolebinding"]


def _backend(control_plane, namespace: str) -> str | None:
    ing = get_json(control_plane, namespace, "ingress", "lorafleet-minilm")
    return ing and ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"]


def _can(control_plane, namespace: str, verb: str, what: str, where: str) -> bool:
    r = control_plane.kubectl("auth", "can-i", verb, what, "-n", where,
                              f"--as=system:serviceaccount:{namespace}:{GW}", check=False)
    return r.stdout.strip() == "yes"


def _gateway_pod(kube, namespace: str, name: str, ready: bool) -> None:
    """A gateway pod as the test plays the node (the control plane has no kubelet)."""
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    from lorafleet.operator.manifests import gateway_labels

    kube.create(Pod(metadata=ObjectMeta(name=name, namespace=namespace, labels=gateway_labels("minilm")),
                    spec=PodSpec(containers=[Container(name="gateway", image="lorafleet/control:0.1.0")])))
    kube.patch(Pod.Status, name, {"status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}}, namespace=namespace,
        patch_type=PatchType.MERGE)


def test_enabling_the_gateway_deploys_it_behind_the_ingress_and_disabling_removes_it(control_plane, operator,
                                                                                     namespace, kube):
    ingress = {"host": "minilm.example"}
    apply(control_plane, namespace, pool_doc("minilm", replicas=1, ingress=ingress))
    wait_for(lambda: _backend(control_plane, namespace) == "lorafleet-minilm", timeout=30,
             what="the Ingress to the pool's Service")
    assert get_json(control_plane, namespace, "deployment", GW) is None

    apply(control_plane, namespace, pool_doc("minilm", replicas=1, ingress=ingress,
                                             gateway={"enabled": True, "replicas": 2, "spillInflight": 3}))
    wait_for(lambda: _backend(control_plane, namespace) == GW, timeout=30, what="the Ingress to the gateway")
    uid = get_json(control_plane, namespace, "lfpool", "minilm")["metadata"]["uid"]
    for kind in GW_KINDS:
        got = get_json(control_plane, namespace, kind, GW)
        assert got is not None, f"{kind} {GW} missing"
        assert got["metadata"]["ownerReferences"][0]["uid"] == uid, kind
    dep = get_json(control_plane, namespace, "deployment", GW)
    assert dep["spec"]["replicas"] == 2
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["lorafleet", "gateway"] and c["image"] == "lorafleet/control:0.1.0"
    assert f"--namespace={namespace}" in c["args"] and "--pool=minilm" in c["args"]
    assert "--spill-inflight=3" in c["args"]
    svc = get_json(control_plane, namespace, "service", GW)
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # The gateway's rights, as the API server decides them: read its namespace's tenants (their keys'
    # digests), adapters and pods; no Secrets; write nothing; nothing in another namespace.
    assert not _can(control_plane, namespace, "list", "secrets", namespace)
    assert not _can(control_plane, namespace, "get", "secrets", namespace)
    assert _can(control_plane, namespace, "watch", "loratenants.lorafleet.io", namespace)
    assert _can(control_plane, namespace, "list", "pods", namespace)
    assert not _can(control_plane, namespace, "update", "secrets", namespace)
    assert not _can(control_plane, namespace, "patch", "pods", namespace)
    assert not _can(control_plane, namespace, "get", "secrets", "default")
    # The pool's status says how many gateway pods are Ready; they are not counted as pool replicas.
    st = wait_status(control_plane, namespace, "lfpool", "minilm", lambda s: "gatewayReadyReplicas" in s,
                     what="gatewayReadyReplicas in the pool's status")
    assert st["gatewayReadyReplicas"] == 0 and cond(st, "GatewayReady")["status"] == "False"
    _gateway_pod(kube, namespace, "gw-0", ready=True)
    _gateway_pod(kube, namespace, "gw-1", ready=False)
    st = wait_status(control_plane, namespace, "lfpool", "minilm", lambda s: s.get("gatewayReadyReplicas") == 1,
                     what="one ready gateway pod counted")
    assert cond(st, "GatewayReady")["status"] == "True"
    assert cond(st, "GatewayReady")["message"] == "1/2 gateway replicas ready"
    assert st["readyReplicas"] == 0 and st["ready"] == "0/1"

    # Off again: the Ingress goes back to the pool's Service and every gateway object is deleted.
    apply(control_plane, namespace, pool_doc("minilm", replicas=1, ingress=ingress, gateway={"enabled": False}))
    wait_for(lambda: _backend(control_plane, namespace) == "lorafleet-minilm", timeout=30,
             what="the Ingress back to the pool's Service")
    for kind in GW_KINDS:
        wait_for(lambda: get_json(control_plane, namespace, kind, GW) is None, timeout=30,
                 what=f"{kind} {GW} to be deleted")
    assert get_json(control_plane, namespace, "deployment", "lorafleet-minilm") is not None
    st = wait_status(control_plane, namespace, "lfpool", "minilm", lambda s: "gatewayReadyReplicas" not in s,
                     what="the gateway gone from the pool's status")
    assert not cond(st, "GatewayReady")

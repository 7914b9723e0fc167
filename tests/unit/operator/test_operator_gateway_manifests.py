"""The gateway a pool owns when ``spec.gateway.enabled``: its Deployment, Service and read-only RBAC,
the Ingress switching to it, and what is deleted when it is turned off (no cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lorafleet.contracts import names
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.operator import manifests

BASE = {
    "model": {"uri": "s3://models/minilm/", "sha256": "a" * 64, "task": "sequence-classification"},
    "replicas": 2,  # a PodDisruptionBudget of its own (not among what turning the gateway off deletes)
    "sidecar": {"image": "lorafleet/control:9.9"},
    "ingress": {"host": "minilm.example"},
}


def spec(**gateway) -> BaseModelPoolSpec:
    return BaseModelPoolSpec.model_validate({**BASE, "gateway": gateway} if gateway else BASE)


def kinds(children) -> list[tuple[str, str]]:
    return [(m["kind"], m["metadata"]["name"]) for m in children]


def test_no_gateway_unless_enabled():
    for s in (spec(), spec(enabled=False, replicas=3)):
        assert manifests.gateway_children("p", "ns", "u", s) == []
        assert not any(n == "lorafleet-p-gateway" for _, n in kinds(manifests.pool_children("p", "ns", "u", s)))
        backend = manifests.ingress("p", "ns", "u", s)["spec"]["rules"][0]["http"]["paths"][0]["backend"]
        assert backend == {"service": {"name": "lorafleet-p", "port": {"number": 80}}}


def test_enabled_gateway_children_in_apply_order_and_the_ingress_points_at_it():
    s = spec(enabled=True)
    got = kinds(manifests.pool_children("p", "ns", "u", s))
    gw = "lorafleet-p-gateway"
    assert got == [("ServiceAccount", "lorafleet-p-sidecar"), ("Role", "lorafleet-p-sidecar"),
                   ("RoleBinding", "lorafleet-p-sidecar"), ("Service", "lorafleet-p"),
                   ("ServiceAccount", gw), ("Role", gw), ("RoleBinding", gw), ("Service", gw), ("Deployment", gw),
                   ("NetworkPolicy", gw), ("Ingress", "lorafleet-p"), ("PodDisruptionBudget", "lorafleet-p"),
                   ("Deployment", "lorafleet-p")]
    for m in manifests.gateway_children("p", "ns", "u", s):
        assert m["metadata"]["ownerReferences"] == [manifests.owner_reference("p", "u")]
        assert m["metadata"]["namespace"] == "ns"
        assert m["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"
    backend = manifests.ingress("p", "ns", "u", s)["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    assert backend == {"service": {"name": gw, "port": {"number": 80}}}
    # Without spec.ingress there is no Ingress, gateway or not.
    no_ing = BaseModelPoolSpec.model_validate({**BASE, "ingress": None, "gateway": {"enabled": True}})
    assert manifests.ingress("p", "ns", "u", no_ing) is None


def test_gateway_deployment_runs_the_control_image_with_the_pools_settings():
    s = spec(enabled=True, replicas=2, spillInflight=3, retries=1, extraArgs=["--poll-s=0.5"],
             resources={"limits": {"memory": "256Mi"}})
    d = manifests.gateway_deployment("p", "ns", "u", s)
    assert d["spec"]["replicas"] == 2
    pod = d["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["image"] == "lorafleet/control:9.9"  # the sidecar's image, the control image
    assert c["command"] == ["lorafleet", "gateway"]
    assert c["args"] == ["--namespace=ns", "--pool=p", "--port", "8080", "--metrics-port", "9090",
                         "--spill-inflight=3", "--retries=1", "--poll-s=0.5"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8080, "metrics": 9090}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["resources"] == {"limits": {"memory": "256Mi"}}
    assert pod["serviceAccountName"] == "lorafleet-p-gateway"
    labels = d["spec"]["template"]["metadata"]["labels"]
    assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Gateway pods are not pool replicas: the operator, the gateway and the pool's Service select on
    # lorafleet.io/pool.
    assert names.LABEL_POOL not in labels and labels[names.LABEL_GATEWAY_FOR] == "p"
    assert not names.pod_selector("p").items() <= labels.items()
    svc = manifests.gateway_service("p", "ns", "u")
    assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert manifests.gateway_deployment("p", "ns", "u", spec(enabled=True, image="gw:1"))[
        "spec"]["template"]["spec"]["containers"][0]["image"] == "gw:1"


def test_gateway_rbac_is_read_only_in_its_namespace_and_reads_no_secrets():
    sa, role, rb = manifests.gateway_rbac("p", "ns", "u")
    assert (sa["kind"], role["kind"], rb["kind"]) == ("ServiceAccount", "Role", "RoleBinding")
    for rule in role["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"]
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == {("", "pods"), ("lorafleet.io", "loraadapters"), ("lorafleet.io", "loratenants")}
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lorafleet-p-gateway"}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet-p-gateway", "namespace": "ns"}]


def test_sidecar_pod_rights_come_from_the_chart_cluster_role_when_one_is_named():
    own = manifests.pool_children("p", "ns", "u", spec())
    role = next(m for m in own if m["kind"] == "Role")
    assert manifests.SIDECAR_POD_RULE in role["rules"]
    assert [m["metadata"]["name"] for m in own if m["kind"] == "RoleBinding"] == ["lorafleet-p-sidecar"]
    bound = manifests.pool_children("p", "ns", "u", spec(), sidecar_cluster_role="rel-lorafleet-pool-sidecar")
    role = next(m for m in bound if m["kind"] == "Role")
    assert [r["resources"] for r in role["rules"]] == [["configmaps"]]
    pods = next(m for m in bound if m["kind"] == "RoleBinding" and m["metadata"]["name"] == "lorafleet-p-sidecar-pods")
    assert pods["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "rel-lorafleet-pool-sidecar"}
    assert pods["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet-p-sidecar", "namespace": "ns"}]


def test_chart_gateway_role_and_the_operators_grant_the_same_rules():
    text = (Path(__file__).resolve().parents[3] / "charts/lorafleet/templates/gateway-rbac.yaml").read_text()
    rules_block = text.split("rules:\n", 1)[1].split("---", 1)[0]
    assert yaml.safe_load(rules_block) == manifests.GATEWAY_RULES


def test_turning_the_gateway_off_deletes_all_of_it():
    gw = "lorafleet-p-gateway"
    pods_binding = ("RoleBinding", "lorafleet-p-sidecar-pods")
    off = manifests.stale_children("p", spec(enabled=False), "cr")
    route = ("HTTPRoute", "lorafleet-p")  # spec.httpRoute unset
    assert set(off) == {("Deployment", gw), ("Service", gw), ("RoleBinding", gw), ("Role", gw),
                        ("ServiceAccount", gw), ("NetworkPolicy", gw), route}
    assert manifests.stale_children("p", spec(enabled=True), "cr") == [route]
    assert manifests.stale_children("p", spec(enabled=True)) == [route, pods_binding]
    no_ing = BaseModelPoolSpec.model_validate({**BASE, "ingress": None, "gateway": {"enabled": True}})
    assert manifests.stale_children("p", no_ing, "cr") == [("Ingress", "lorafleet-p"), route]
    # Nothing rendered is ever deleted.
    for s, cr in ((spec(), None), (spec(enabled=True), None), (spec(enabled=True), "cr"), (no_ing, None)):
        rendered = set(kinds(manifests.pool_children("p", "ns", "u", s, sidecar_cluster_role=cr)))
        assert not rendered & set(manifests.stale_children("p", s, cr))


def test_gateway_spec_defaults_and_bounds():
    g = spec(enabled=True).gateway
    assert (g.replicas, g.spill_inflight, g.retries, g.image, g.extra_args) == (1, 8, 2, None, None)
    for bad in ({"replicas": -1}, {"spillInflight": 0}, {"retries": 11}, {"unknown": 1}):
        with pytest.raises(ValidationError):
            spec(enabled=True, **bad)


def test_pool_status_counts_ready_gateway_pods_only_when_the_gateway_is_on():
    from lorafleet.contracts.routes import RoutesTable
    from lorafleet.operator import routing

    def status(gateway: dict | None, ready: int) -> dict:
        body = {"metadata": {"name": "p", "namespace": "ns", "uid": "pu", "generation": 3},
                "spec": {**BASE, **({"gateway": gateway} if gateway else {})}}
        plan = routing.plan_pool("p", routing.pool_view(body), [], [], RoutesTable(pool="p"), {}, gateway_ready=ready)
        return plan.pool_status

    off = status(None, 0)
    assert "gatewayReadyReplicas" not in off and [c["type"] for c in off["conditions"]] == ["Ready", "ReplicaFailure", "ModelReady"]
    assert "gatewayReadyReplicas" not in status({"enabled": False}, 0)
    none = status({"enabled": True, "replicas": 2}, 0)
    gw = next(c for c in none["conditions"] if c["type"] == "GatewayReady")
    assert none["gatewayReadyReplicas"] == 0
    assert (gw["status"], gw["reason"], gw["message"]) == ("False", "NoGatewayReady", "0/2 gateway replicas ready")
    one = status({"enabled": True, "replicas": 2}, 1)
    gw = next(c for c in one["conditions"] if c["type"] == "GatewayReady")
    assert one["gatewayReadyReplicas"] == 1 and gw["status"] == "True" and gw["observedGeneration"] == 3
    assert one["phase"] == none["phase"]  # the pool's own phase is about its runtime pods


def test_with_a_gateway_only_its_pods_reach_the_runtime_port():
    children = manifests.pool_children("p", "ns", "u", spec(enabled=True))
    [np] = [m for m in children if m["kind"] == "NetworkPolicy"]
    assert np["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "lorafleet", "lorafleet.io/pool": "p",
                                                         "app.kubernetes.io/component": "runtime"}}
    runtime, metrics = np["spec"]["ingress"]
    assert runtime == {"from": [{"podSelector": {"matchLabels": {"lorafleet.io/gateway-for": "p"}}}],
                       "ports": [{"protocol": "TCP", "port": 8000}]}
    # Scrapers reach both metrics ports (the sidecar's and the runtime's own; /metrics is not on 8000), the
    # kubelet's probes the sidecar's health port.
    assert metrics == {"ports": [{"protocol": "TCP", "port": 9090}, {"protocol": "TCP", "port": 9100},
                                 {"protocol": "TCP", "port": 9091}]}
    # The gateway's pods are not selected (they carry no lorafleet.io/pool label).
    dep = next(m for m in children if m["kind"] == "Deployment" and m["metadata"]["name"] == "lorafleet-p-gateway")
    assert "lorafleet.io/pool" not in dep["spec"]["template"]["metadata"]["labels"]
    assert not [m for m in manifests.pool_children("p", "ns", "u", spec()) if m["kind"] == "NetworkPolicy"]

"""The pool's HTTPRoute (Gateway API), beside or instead of its Ingress: the real API server holds the
Gateway API's standard-channel CRDs (tools/install-test-tools fetches them from the sigs.k8s.io/gateway-api
module), so the route the operator writes passes that CRD's schema and CEL rules. It is owned by the
pool, points at the gateway's Service with the gateway on, is put back when edited or deleted, and goes
when spec.httpRoute is unset."""

from __future__ import annotations

import json

from lf_operator_kit import apply, get_json, pool_doc

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for

ROUTE = names.http_route_name("p")


def route(control_plane, namespace):
    return get_json(control_plane, namespace, "httproutes.gateway.networking.k8s.io", ROUTE)


def backend(r) -> str | None:
    return (r or {}).get("spec", {}).get("rules", [{}])[0].get("backendRefs", [{}])[0].get("name")


def test_the_pool_gets_an_http_route_that_the_operator_keeps_as_the_pool_says(control_plane, operator, namespace):
    http_route = {"parentRefs": [{"name": "shared-gw", "namespace": "infra", "sectionName": "http"}],
                  "hostnames": ["p.example"], "path": "/v1"}
    apply(control_plane, namespace, pool_doc("p", replicas=1, ingress={"host": "p.example"}, httpRoute=http_route))
    wait_for(lambda: route(control_plane, namespace), timeout=30, what="the pool's HTTPRoute")
    r = route(control_plane, namespace)
    pool = get_json(control_plane, namespace, "lfpool", "p")
    (owner,) = r["metadata"]["ownerReferences"]
    assert owner["kind"] == names.POOL_KIND and owner["uid"] == pool["metadata"]["uid"] and owner["controller"]
    assert r["spec"]["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "shared-gw",
                                        "namespace": "infra", "sectionName": "http"}]
    assert r["spec"]["hostnames"] == ["p.example"]
    assert r["spec"]["rules"][0]["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert backend(r) == names.service_name("p")
    # Both kinds at once: the Ingress is still there.
    assert get_json(control_plane, namespace, "ingress", names.ingress_name("p"))

    # Someone points it at another Service: put back. Someone deletes it: made again.
    control_plane.kubectl("patch", "httproutes.gateway.networking.k8s.io", ROUTE, "-n", namespace, "--type=json",
                          "-p", json.dumps([{"op": "replace", "path": "/spec/rules/0/backendRefs/0/name",
                                             "value": "elsewhere"}]))
    wait_for(lambda: backend(route(control_plane, namespace)) == names.service_name("p"), timeout=30,
             what="the backend put back")
    control_plane.kubectl("delete", "httproutes.gateway.networking.k8s.io", ROUTE, "-n", namespace)
    wait_for(lambda: route(control_plane, namespace), timeout=30, what="the HTTPRoute made again")

    # The gateway on: the route leads to it, as the Ingress does.
    apply(control_plane, namespace, pool_doc("p", replicas=1, ingress={"host": "p.example"}, httpRoute=http_route,
                                             gateway={"enabled": True}))
    wait_for(lambda: backend(route(control_plane, namespace)) == names.gateway_name("p"), timeout=30,
             what="the HTTPRoute to the gateway's Service")

    # The HTTPRoute only (no Ingress), then neither.
    apply(control_plane, namespace, pool_doc("p", replicas=1, httpRoute=http_route))
    wait_for(lambda: get_json(control_plane, namespace, "ingress", names.ingress_name("p")) is None, timeout=30,
             what="the Ingress deleted")
    assert backend(route(control_plane, namespace)) == names.service_name("p")
    apply(control_plane, namespace, pool_doc("p", replicas=1))
    wait_for(lambda: route(control_plane, namespace) is None, timeout=30, what="the HTTPRoute deleted")
    assert "HTTPRouteUnavailable" not in operator.text()


def _route_condition(control_plane, namespace):
    pool = get_json(control_plane, namespace, "lfpool", "p") or {}
    for c in (pool.get("status") or {}).get("conditions") or []:
        if c.get("type") == "HTTPRouteAccepted":
            return c, pool["status"].get("message", "")
    return None


def _gateway_says(control_plane, namespace, conditions):
    """Write the route's status as a Gateway's controller does (the status subresource; no controller runs
    here): one parent, the Gateway infra/shared-gw, with these conditions."""
    now = "2026-12-03T00:00:00Z"
    parents = [{"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "shared-gw",
                              "namespace": "infra", "sectionName": "http"},
                "controllerName": "example.com/gateway-controller",
                "conditions": [{"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": now,
                                "observedGeneration": 1} for t, s, r, m in conditions]}]
    control_plane.kubectl("patch", "httproutes.gateway.networking.k8s.io", ROUTE, "-n", namespace,
                          "--subresource=status", "--type=merge", "-p", json.dumps({"status": {"parents": parents}}))


def test_the_pool_says_whether_the_gateways_accepted_its_http_route(control_plane, operator, namespace):
    """Unknown until the Gateway's controller writes the route's status, False with the controller's reason
    and message when it refuses it (also in the pool's message), True once accepted with refs resolved."""
    http_route = {"parentRefs": [{"name": "shared-gw", "namespace": "infra", "sectionName": "http"}]}
    apply(control_plane, namespace, pool_doc("p", replicas=1, httpRoute=http_route))
    wait_for(lambda: route(control_plane, namespace), timeout=30, what="the pool's HTTPRoute")
    cond, _ = wait_for(lambda: _route_condition(control_plane, namespace), timeout=30,
                       what="the pool's HTTPRouteAccepted condition")
    assert (cond["status"], cond["reason"]) == ("Unknown", "Pending") and "infra/shared-gw" in cond["message"], cond

    _gateway_says(control_plane, namespace, [("Accepted", "False", "NotAllowedByListeners",
                                              "no listener of shared-gw allows routes from this namespace"),
                                             ("ResolvedRefs", "True", "ResolvedRefs", "")])
    cond, message = wait_for(lambda: (lambda c: c if c and c[0]["status"] == "False" else None)(
        _route_condition(control_plane, namespace)), timeout=30, what="HTTPRouteAccepted False")
    assert cond["reason"] == "NotAccepted"
    assert "Gateway infra/shared-gw" in cond["message"] and "NotAllowedByListeners" in cond["message"]
    assert "no listener of shared-gw allows routes" in cond["message"]
    assert f"HTTPRoute {ROUTE} not accepted" in message

    _gateway_says(control_plane, namespace, [("Accepted", "True", "Accepted", ""),
                                             ("ResolvedRefs", "False", "BackendNotFound", "service not found")])
    wait_for(lambda: "BackendNotFound" in ((_route_condition(control_plane, namespace) or ({}, ""))[0].get(
        "message") or ""), timeout=30, what="a ResolvedRefs=False named")

    _gateway_says(control_plane, namespace, [("Accepted", "True", "Accepted", "route accepted"),
                                             ("ResolvedRefs", "True", "ResolvedRefs", "")])
    cond, message = wait_for(lambda: (lambda c: c if c and c[0]["status"] == "True" else None)(
        _route_condition(control_plane, namespace)), timeout=30, what="HTTPRouteAccepted True")
    assert cond["reason"] == "Accepted" and "not accepted" not in message

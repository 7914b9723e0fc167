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

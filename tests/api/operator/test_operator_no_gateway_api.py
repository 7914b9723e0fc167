"""A pool asking for an HTTPRoute on an API server without the Gateway API (its CRDs are installed
apart from Kubernetes): the rest of the pool is made, the pool gets a Warning Event saying what to
install, the full listing does not fail, and once the CRDs are applied the route is made. This module
runs its own API server, without the Gateway API's CRDs (the shared one has them)."""

from __future__ import annotations

import pytest

from lf_operator_kit import Operator, apply, get_json, pool_doc

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for


@pytest.fixture(scope="module")
def bare_control_plane(tmp_path_factory, repo):
    from lorafleet.localstack.controlplane import ControlPlane
    from lorafleet.localstack.tools import ToolMissing, require_tool

    for tool in ("etcd", "kube-apiserver", "kubectl"):
        try:
            require_tool(tool)
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)
    cp = ControlPlane(tmp_path_factory.mktemp("no-gateway-api"))
    try:
        cp.start(controller_manager=False)
        cp.kubectl("apply", "--server-side", "-f", str(repo / "crds"))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield cp
    finally:
        cp.stop()


def test_a_pool_with_an_http_route_on_an_api_server_without_the_gateway_api(bare_control_plane, tmp_path):
    from lf_operator_kit import tenant_doc
    from lorafleet.localstack.tools import gateway_api_crds

    cp = bare_control_plane
    cp.kubectl("create", "namespace", "routes")
    op = Operator(cp.kubeconfig, tmp_path / "operator.log", args=("--resync-interval", "2")).start()
    try:
        apply(cp, "routes", tenant_doc())
        apply(cp, "routes", pool_doc("p", replicas=1, ingress={"host": "p.example"},
                                     httpRoute={"parentRefs": [{"name": "gw"}]}))
        # Everything else of the pool is there.
        wait_for(lambda: get_json(cp, "routes", "deployment", names.deployment_name("p")), timeout=30,
                 what="the pool's Deployment")
        assert get_json(cp, "routes", "ingress", names.ingress_name("p"))

        def warned():
            r = cp.kubectl("get", "events", "-n", "routes", "--field-selector", "reason=HTTPRouteUnavailable",
                           "-o", "jsonpath={.items[*].message}", check=False)
            return r.stdout if "install the Gateway API CRDs" in r.stdout else None

        msg = wait_for(warned, timeout=30, what="the pool's HTTPRouteUnavailable Event")
        assert "spec.httpRoute" in msg and "sigs.k8s.io/gateway-api" in msg
        # Full listings (every 2 s here) do not fail for the kind the API server does not serve.
        wait_for(lambda: "full listing done" in op.text(), timeout=30, what="a full listing")
        assert "full resync failed" not in op.text()
        assert op.text().count("spec.httpRoute: the API server has no HTTPRoute") == 1  # said once
        cond = wait_for(lambda: _condition(get_json(cp, "routes", "lfpool", "p"), "HTTPRouteAccepted"), timeout=30,
                        what="the pool's HTTPRouteAccepted condition")
        assert (cond["status"], cond["reason"]) == ("False", "GatewayAPIMissing"), cond

        # The Gateway API arrives: the route is made (tried again every 30 s).
        cp.kubectl("apply", "--server-side", "-f", str(gateway_api_crds()))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd",
                   "httproutes.gateway.networking.k8s.io")
        wait_for(lambda: get_json(cp, "routes", "httproutes.gateway.networking.k8s.io", names.http_route_name("p")),
                 timeout=60, what="the HTTPRoute once the Gateway API is installed")
        # Made, and no Gateway's controller has said a word of it yet (there is none here).
        wait_for(lambda: (_condition(get_json(cp, "routes", "lfpool", "p"), "HTTPRouteAccepted") or {}).get(
            "reason") == "Pending", timeout=30, what="HTTPRouteAccepted Unknown Pending once the route is made")
    finally:
        op.stop()
    assert "Traceback" not in op.text(), op.text()[-5000:]


def _condition(obj, type_):
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None

"""The chart's operator RBAC is enough to deploy a pool's gateway without reading Secrets: as the
chart's operator ServiceAccount, the gateway's children (bound to the chart's pool-gateway ClusterRole)
apply, and the gateway gets read access in the pool's namespace only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from lorafleet.localstack.tools import require_tool

CHART = Path(__file__).resolve().parents[3] / "charts" / "lorafleet"


def test_chart_operator_deploys_a_gateway_through_the_pool_gateway_cluster_role(control_plane, namespace, tmp_path):
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.operator.manifests import pool_children

    release = f"gw{namespace[-8:]}".replace("-", "")  # cluster-scoped names: one per test namespace
    full = f"{release}-lorafleet"
    home = {k: str(tmp_path / k) for k in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME")}
    rendered = subprocess.run(
        [str(require_tool("helm")), "template", release, str(CHART), "--namespace", namespace,
         "--show-only", "templates/clusterrole.yaml", "--show-only", "templates/clusterrolebinding.yaml",
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/operator-deployment.yaml"],
        capture_output=True, text=True, timeout=60, env={**home, "PATH": "/usr/bin:/bin"})
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    operator_args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert f"--gateway-cluster-role={full}-pool-gateway" in operator_args
    control_plane.kubectl("apply", "--server-side", "-f", "-",
                          input=yaml.safe_dump_all([d for d in docs if d["kind"] != "Deployment"]))
    try:
        token = control_plane.kubectl("create", "token", full, "-n", namespace, "--duration=10m").stdout.strip()
        kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig", namespace=namespace)

        def as_operator(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", *args], input=input,
                                  capture_output=True, text=True, timeout=60)

        spec = {"model": {"uri": "s3://models/m/", "sha256": "a" * 64, "task": "sequence-classification"},
                "ingress": {"host": "probe.example"}, "gateway": {"enabled": True}}
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump({
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": "probe"},
            "spec": spec}))
        pool = yaml.safe_load(control_plane.kubectl("get", "lfpool", "probe", "-n", namespace, "-o", "yaml").stdout)
        uid, parsed = pool["metadata"]["uid"], BaseModelPoolSpec.model_validate(pool["spec"])
        children = pool_children("probe", namespace, uid, parsed, gateway_cluster_role=f"{full}-pool-gateway")
        r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                        input=yaml.safe_dump_all(children))
        assert r.returncode == 0, r.stderr
        rb = yaml.safe_load(control_plane.kubectl("get", "rolebinding", "lorafleet-probe-gateway", "-n", namespace,
                                                  "-o", "yaml").stdout)
        assert rb["roleRef"]["kind"] == "ClusterRole" and rb["roleRef"]["name"] == f"{full}-pool-gateway"

        def gateway_can(verb: str, what: str, where: str) -> bool:
            r = control_plane.kubectl("auth", "can-i", verb, what, "-n", where,
                                      f"--as=system:serviceaccount:{namespace}:lorafleet-probe-gateway", check=False)
            return r.stdout.strip() == "yes"

        assert gateway_can("list", "secrets", namespace) and gateway_can("watch", "loratenants.lorafleet.io", namespace)
        assert not gateway_can("get", "secrets", "default") and not gateway_can("patch", "pods", namespace)
        # The operator itself still reads no Secrets, and could not have made the gateway a Role of its own.
        assert as_operator("auth", "can-i", "get", "secrets", "-n", namespace).stdout.strip() == "no"
        own_role = pool_children("probe", namespace, uid, parsed)
        r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                        input=yaml.safe_dump_all([m for m in own_role if m["kind"] == "Role"
                                                  and m["metadata"]["name"] == "lorafleet-probe-gateway"]))
        assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    finally:
        control_plane.kubectl("delete", "clusterrole,clusterrolebinding", "-l",
                              f"app.kubernetes.io/instance={release}", "--ignore-not-found", check=False)

"""The operator running as the chart's ServiceAccount, with nothing but the chart's RBAC: every watch
starts, the full listing that sweeps missed deletions runs, a pool is applied and its drift repaired.
The other operator tests run as cluster admin, so a permission the chart lacks would show only here."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from lf_operator_kit import Operator, apply, get_json, pool_doc

from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.tools import require_tool

CHART = Path(__file__).resolve().parents[3] / "charts" / "lorafleet"


def test_the_chart_rbac_lets_the_operator_watch_list_and_repair(control_plane, namespace, tmp_path):
    release = f"w{namespace[-8:]}".replace("-", "")  # cluster-scoped names: one per test namespace
    full = f"{release}-lorafleet"
    home = {k: str(tmp_path / k) for k in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME")}
    rendered = subprocess.run(
        [str(require_tool("helm")), "template", release, str(CHART), "--namespace", namespace,
         "--show-only", "templates/clusterrole.yaml", "--show-only", "templates/clusterrolebinding.yaml",
         "--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/operator-deployment.yaml",
         "--show-only", "templates/operator-lease-rbac.yaml"],
        capture_output=True, text=True, timeout=60, env={**home, "PATH": "/usr/bin:/bin"})
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    control_plane.kubectl("apply", "--server-side", "-f", "-",
                          input=yaml.safe_dump_all([d for d in docs if d["kind"] != "Deployment"]))
    op = None
    try:
        token = control_plane.kubectl("create", "token", full, "-n", namespace, "--duration=10m").stdout.strip()
        kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig", namespace=namespace)
        op = Operator(kubeconfig, tmp_path / "operator.log",
                      args=(*[a.replace("$(POD_NAMESPACE)", namespace) for a in args  # the pod's env, as the kubelet expands it
                             if a.startswith("--") and not a.startswith(("--liveness", "--namespace"))],
                            "--resync-interval", "1"))
        op.start()
        apply(control_plane, namespace, pool_doc("p", replicas=2))
        wait_for(lambda: (get_json(control_plane, namespace, "deployment", "lorafleet-p") or {}).get("spec", {})
                 .get("replicas") == 2, timeout=30, what="the pool's Deployment")
        mark = len(op.text())
        wait_for(lambda: "full listing done" in op.text()[mark:], timeout=30, what="a full listing after the pool")
        control_plane.kubectl("scale", "deployment", "lorafleet-p", "-n", namespace, "--replicas=4")
        wait_for(lambda: get_json(control_plane, namespace, "deployment", "lorafleet-p")["spec"]["replicas"] == 2,
                 timeout=30, what="replicas put back to 2")
        control_plane.kubectl("delete", "service", "lorafleet-p", "-n", namespace)
        wait_for(lambda: get_json(control_plane, namespace, "service", "lorafleet-p"), timeout=30,
                 what="the Service made again")
    finally:
        if op is not None:
            op.stop()
        control_plane.kubectl("delete", "clusterrole,clusterrolebinding", "-l",
                              f"app.kubernetes.io/instance={release}", "--ignore-not-found", check=False)
    text = op.text()
    # An RBAC refusal names who was refused. (Other tests' namespaces being deleted meanwhile refuse
    # writes too, as "forbidden", for another reason.)
    for bad in (f"system:serviceaccount:{namespace}:{full}", "full resync failed", "Traceback"):
        assert bad not in text, (bad, text[-5000:])

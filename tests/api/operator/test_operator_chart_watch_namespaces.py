"""operator.watchNamespaces naming namespaces exactly: the chart grants the operator Roles in those
namespaces and, cluster-wide, only reads of CRDs and namespaces (``kubectl auth can-i --as`` on the
helm-rendered chart applied to the real API server). The operator, running as the chart's
ServiceAccount with those rights alone, reconciles a pool in a watched namespace (its sidecar's
RoleBinding to the pool-sidecar ClusterRole included, which needs `bind` there) with no permission
refused, and leaves a pool in another namespace alone."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import yaml

from lf_operator_kit import Operator, apply, get_json, pool_doc, tenant_doc

from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.tools import require_tool

CHART = Path(__file__).resolve().parents[3] / "charts" / "lorafleet"
TEMPLATES = ("clusterrole.yaml", "clusterrolebinding.yaml", "serviceaccount.yaml", "operator-deployment.yaml",
             "operator-lease-rbac.yaml", "operator-namespace-rbac.yaml")


def can(control_plane, sa: str, verb: str, what: str, where: str | None, *extra: str) -> bool:
    where_args = ["--all-namespaces"] if where is None else ["-n", where]
    r = control_plane.kubectl("auth", "can-i", verb, what, *where_args, *extra, f"--as={sa}", check=False)
    assert r.stdout.strip() in ("yes", "no"), (verb, what, r.stdout, r.stderr)
    return r.stdout.strip() == "yes"


def test_watch_namespaces_give_the_operator_roles_there_and_nothing_elsewhere(control_plane, tmp_path):
    tag = uuid.uuid4().hex[:6]
    release_ns, team_a, team_b, other = (f"{n}-{tag}" for n in ("rel", "team-a", "team-b", "other"))
    for ns in (release_ns, team_a, team_b, other):
        control_plane.kubectl("create", "namespace", ns)
    release = f"n{tag}"
    full = f"{release}-lorafleet"
    home = {k: str(tmp_path / k) for k in ("HELM_CONFIG_HOME", "HELM_CACHE_HOME", "HELM_DATA_HOME")}
    rendered = subprocess.run(
        [str(require_tool("helm")), "template", release, str(CHART), "--namespace", release_ns,
         "--set", f"operator.watchNamespaces={{{team_a},{team_b}}}",
         *(a for t in TEMPLATES for a in ("--show-only", f"templates/{t}"))],
        capture_output=True, text=True, timeout=60, env={**home, "PATH": "/usr/bin:/bin"})
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    roles = sorted((d["kind"], d["metadata"].get("namespace")) for d in docs
                   if d["kind"] in ("Role", "RoleBinding") and d["metadata"]["name"] == f"{full}-operator")
    assert roles == sorted((k, ns) for k in ("Role", "RoleBinding") for ns in (team_a, team_b))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert {f"--namespace={team_a}", f"--namespace={team_b}"} <= set(args)
    control_plane.kubectl("apply", "--server-side", "-f", "-",
                          input=yaml.safe_dump_all([d for d in docs if d["kind"] != "Deployment"]))
    sa = f"system:serviceaccount:{release_ns}:{full}"
    op = None
    try:
        # Where it works: everything a pool needs.
        for ns in (team_a, team_b):
            for verb, what, extra in (("create", "deployments.apps", ()), ("watch", "basemodelpools.lorafleet.io", ()),
                                      ("patch", "loraadapters.lorafleet.io", ("--subresource=status",)),
                                      ("create", "httproutes.gateway.networking.k8s.io", ()),
                                      ("create", "rolebindings.rbac.authorization.k8s.io", ()),
                                      ("bind", f"clusterroles.rbac.authorization.k8s.io/{full}-pool-sidecar", ()),
                                      ("list", "pods", ()), ("create", "events", ())):
                assert can(control_plane, sa, verb, what, ns, *extra), f"the operator may not {verb} {what} in {ns}"
        # Anywhere else, and cluster-wide: nothing of the kind.
        for where in (other, "default", "kube-system", release_ns, None):
            for verb, what in (("list", "pods"), ("create", "deployments.apps"), ("list", "basemodelpools.lorafleet.io"),
                               ("get", "configmaps"), ("create", "rolebindings.rbac.authorization.k8s.io"),
                               ("create", "events"), ("list", "loratenants.lorafleet.io")):
                assert not can(control_plane, sa, verb, what, where), f"the operator may {verb} {what} in {where or 'all namespaces'}"
            assert not can(control_plane, sa, "bind", f"clusterroles.rbac.authorization.k8s.io/{full}-pool-sidecar",
                           where)
        for where in (team_a, other, None):
            for verb in ("get", "list", "watch", "create"):
                assert not can(control_plane, sa, verb, "secrets", where)
        # What it needs cluster-wide: reads of CRDs (kopf's scan) and namespaces, nothing more.
        assert can(control_plane, sa, "list", "customresourcedefinitions.apiextensions.k8s.io", None)
        assert can(control_plane, sa, "watch", "namespaces", None)
        assert not can(control_plane, sa, "create", "namespaces", None)
        cluster_rules = next(d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == full)["rules"]
        assert [(r["apiGroups"], r["resources"]) for r in cluster_rules] == [
            (["apiextensions.k8s.io"], ["customresourcedefinitions"]), ([""], ["namespaces"])]

        # The operator with those rights alone.
        token = control_plane.kubectl("create", "token", full, "-n", release_ns, "--duration=10m").stdout.strip()
        kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig", namespace=release_ns)
        op = Operator(kubeconfig, tmp_path / "operator.log",
                      args=(*[a.replace("$(POD_NAMESPACE)", release_ns) for a in args
                              if a.startswith("--") and not a.startswith("--liveness")],
                            "--resync-interval", "1"), all_namespaces=False)
        op.start()
        for ns in (team_a, other):
            apply(control_plane, ns, tenant_doc())
            apply(control_plane, ns, pool_doc("p", replicas=1))
        wait_for(lambda: get_json(control_plane, team_a, "deployment", "lorafleet-p"), timeout=30,
                 what="the watched namespace's pool Deployment")
        wait_for(lambda: get_json(control_plane, team_a, "rolebinding", "lorafleet-p-sidecar-pods"), timeout=30,
                 what="the sidecar's RoleBinding to the pool-sidecar ClusterRole")
        mark = len(op.text())
        wait_for(lambda: "full listing done" in op.text()[mark:], timeout=30, what="a full listing")
        assert get_json(control_plane, other, "deployment", "lorafleet-p") is None
    finally:
        if op is not None:
            op.stop()
        control_plane.kubectl("delete", "clusterrole,clusterrolebinding", "-l", f"app.kubernetes.io/instance={release}",
                              "--ignore-not-found", check=False)
        for ns in (release_ns, team_a, team_b, other):
            control_plane.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    text = op.text()
    for bad in (sa, "forbidden", "full resync failed", "Traceback", "Not enough permissions"):
        assert bad not in text, (bad, text[-5000:])


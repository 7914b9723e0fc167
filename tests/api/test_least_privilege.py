"""Least privilege against the real API server's RBAC: the chart installed with everything on, a pool
with a gateway applied *as the chart's operator ServiceAccount* (its own builders, the sidecar's pod
rights through the chart's pool-sidecar ClusterRole), then ``kubectl auth can-i --as`` for every
ServiceAccount the chart and the operator create. None may read Secrets; the operator has no path to
them through RBAC (no `bind` on a role that reads them, no `escalate`, no pod `patch`)."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from lorafleet.localstack.tools import require_tool

CHART = Path(__file__).resolve().parents[2] / "charts" / "lorafleet"

pytestmark = pytest.mark.api


def helm(env: dict, *args: str, kubeconfig: Path, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(require_tool("helm")), *args, f"--kubeconfig={kubeconfig}"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert not check or r.returncode == 0, f"helm {' '.join(args)}: {r.stdout}\n{r.stderr}"
    return r

SECRET_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("helm")
    return {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data")}


@pytest.fixture(scope="module")
def fleet(control_plane, helm_env, tmp_path_factory):
    """The chart (all-on values: MinIO, the example pool, the chart's gateway) in a fresh namespace, and a
    pool ``probe`` with its gateway whose children the operator's ServiceAccount applied."""
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.operator.manifests import pool_children

    ns = f"lp-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", ns)
    release = ns
    full = f"{release}-lorafleet"
    helm(helm_env, "install", release, str(CHART), "--namespace", ns, "-f", str(CHART / "ci" / "all-on-values.yaml"),
         kubeconfig=control_plane.kubeconfig)
    try:
        token = control_plane.kubectl("create", "token", full, "-n", ns, "--duration=10m").stdout.strip()
        kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path_factory.mktemp("op") / "kubeconfig", ns)

        def as_operator(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
            return subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", *args], input=input,
                                  capture_output=True, text=True, timeout=60)

        spec = {"model": {"uri": "s3://models/m/", "sha256": "a" * 64, "task": "sequence-classification"},
                "ingress": {"host": "probe.example"}, "httpRoute": {"parentRefs": [{"name": "shared-gw"}]},
                "gateway": {"enabled": True}}
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": "probe"},
            "spec": spec}))
        pool = yaml.safe_load(control_plane.kubectl("get", "lfpool", "probe", "-n", ns, "-o", "yaml").stdout)
        dep = yaml.safe_load(control_plane.kubectl("get", "deployment", f"{full}-operator", "-n", ns,
                                                   "-o", "yaml").stdout)
        from lorafleet.operator.cli import parse

        args = parse(dep["spec"]["template"]["spec"]["containers"][0]["args"][1:])
        assert args.sidecar_cluster_role == f"{full}-pool-sidecar"
        children = pool_children("probe", ns, pool["metadata"]["uid"], BaseModelPoolSpec.model_validate(pool["spec"]),
                                 sidecar_cluster_role=args.sidecar_cluster_role)
        r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                        input=yaml.safe_dump_all(children))
        assert r.returncode == 0, r.stderr
        yield ns, full, as_operator, children
    finally:
        helm(helm_env, "uninstall", release, "--namespace", ns, kubeconfig=control_plane.kubeconfig, check=False)
        control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def service_accounts(control_plane, ns: str, release: str, children: list[dict]) -> list[str]:
    """Every ServiceAccount the chart made (its instance label) and every one the operator made."""
    listed = json.loads(control_plane.kubectl("get", "serviceaccounts", "-n", ns, "-o", "json").stdout)["items"]
    chart = [sa["metadata"]["name"] for sa in listed
             if (sa["metadata"].get("labels") or {}).get("app.kubernetes.io/instance") == release]
    operator = [m["metadata"]["name"] for m in children if m["kind"] == "ServiceAccount"]
    # The pods that name no ServiceAccount (MinIO) run as `default`.
    return sorted(set(chart) | set(operator) | {"default"})


def can(control_plane, ns: str, sa: str, verb: str, what: str, where: str | None = None, *extra: str) -> bool:
    where_args = ["--all-namespaces"] if where is None else ["-n", where]
    r = control_plane.kubectl("auth", "can-i", verb, what, *where_args, *extra,
                              f"--as=system:serviceaccount:{ns}:{sa}", check=False)
    answer = r.stdout.strip()
    assert answer in ("yes", "no"), f"can-i {verb} {what} as {sa}: {r.stdout} {r.stderr}"
    return answer == "yes"


def test_no_service_account_of_the_chart_or_the_operator_can_touch_secrets(control_plane, fleet):
    ns, full, _, children = fleet
    release = full.removesuffix("-lorafleet")
    accounts = service_accounts(control_plane, ns, release, children)
    # The operator, the chart's gateway, and the pool's sidecar and gateway.
    assert {full, f"{full}-gateway", "lorafleet-probe-sidecar", "lorafleet-probe-gateway"} <= set(accounts)
    granted = []
    for sa in accounts:
        for verb in SECRET_VERBS:
            for where in (ns, "default", None):
                if can(control_plane, ns, sa, verb, "secrets", where):
                    granted.append(f"{sa}: {verb} secrets in {where or 'all namespaces'}")
    assert granted == []


def test_what_each_component_may_read_is_what_it_reads(control_plane, fleet):
    ns, full, _, _ = fleet
    for gw in (f"{full}-gateway", "lorafleet-probe-gateway"):
        assert can(control_plane, ns, gw, "watch", "loratenants.lorafleet.io", ns)
        assert can(control_plane, ns, gw, "list", "pods", ns)
        assert not can(control_plane, ns, gw, "list", "configmaps", ns)
        assert not can(control_plane, ns, gw, "patch", "pods", ns)
        assert not can(control_plane, ns, gw, "list", "pods", "default")
    sidecar = "lorafleet-probe-sidecar"
    assert can(control_plane, ns, sidecar, "patch", "pods", ns)  # its own (narrowed by admission, see docs)
    assert can(control_plane, ns, sidecar, "get", "configmaps/lorafleet-routes-probe", ns)
    assert not can(control_plane, ns, sidecar, "get", "configmaps/other", ns)
    assert not can(control_plane, ns, sidecar, "patch", "pods", "default")
    assert can(control_plane, ns, full, "list", "loratenants.lorafleet.io")  # tenants' spec.sources
    assert can(control_plane, ns, full, "patch", "loratenants.lorafleet.io", ns, "--subresource=status")
    assert not can(control_plane, ns, full, "patch", "loratenants.lorafleet.io", ns)  # never a tenant's spec
    # The pool's HTTPRoute (the fixture applied one as the operator), never the Gateways it attaches to.
    assert {m["kind"] for m in fleet[3]} >= {"HTTPRoute", "Ingress"}
    for verb in ("create", "patch", "delete", "watch"):
        assert can(control_plane, ns, full, verb, "httproutes.gateway.networking.k8s.io", ns)
    # A route's status is its Gateway controller's to write.
    assert not can(control_plane, ns, full, "patch", "httproutes.gateway.networking.k8s.io", ns, "--subresource=status")
    for what in ("gateways", "gatewayclasses", "referencegrants"):
        assert not can(control_plane, ns, full, "create", f"{what}.gateway.networking.k8s.io", ns)
    # Leader election: its own Lease in its namespace, no other Lease anywhere.
    for verb in ("get", "update"):
        assert can(control_plane, ns, full, verb, f"leases.coordination.k8s.io/{full}-operator", ns)
        assert not can(control_plane, ns, full, verb, "leases.coordination.k8s.io/other", ns)
        assert not can(control_plane, ns, full, verb, f"leases.coordination.k8s.io/{full}-operator", "default")
    assert can(control_plane, ns, full, "create", "leases.coordination.k8s.io", ns)
    assert not can(control_plane, ns, full, "create", "leases.coordination.k8s.io", "kube-system")


def test_the_operator_has_no_path_to_secrets_through_rbac(control_plane, fleet):
    ns, full, as_operator, _ = fleet
    # Not directly, and not by changing what a pod runs (patch pods), making pods, impersonating,
    # minting tokens, or granting what it does not hold.
    for verb, what, sub in (("patch", "pods", None), ("update", "pods", None), ("create", "pods", None),
                            ("create", "pods", "exec"), ("create", "pods", "ephemeralcontainers"),
                            ("create", "serviceaccounts", "token"), ("impersonate", "serviceaccounts", None),
                            ("escalate", "roles", None), ("escalate", "clusterroles", None),
                            ("bind", "clusterroles", None), ("bind", "roles", None),
                            ("create", "clusterrolebindings", None)):
        extra = (f"--subresource={sub}",) if sub else ()
        assert not can(control_plane, ns, full, verb, what, None, *extra), f"the operator may {verb} {what} {sub or ''}"
    # `bind` on the one ClusterRole it needs (pods get/patch for sidecars), which reads no Secrets.
    assert can(control_plane, ns, full, "bind", f"clusterroles/{full}-pool-sidecar")
    rules = json.loads(control_plane.kubectl("get", "clusterrole", f"{full}-pool-sidecar", "-o", "json").stdout)["rules"]
    assert rules == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}]
    # A RoleBinding to a role that reads Secrets is refused by the API server. (The test API server
    # runs no aggregation controller, so `edit` and `admin` have no rules here: a role of our own.)
    control_plane.kubectl("create", "clusterrole", f"{ns}-secret-reader", "--verb=get,list", "--resource=secrets")
    control_plane.kubectl("create", "role", "secret-reader", "-n", ns, "--verb=get", "--resource=secrets")
    try:
        for ref in (f"--clusterrole={ns}-secret-reader", "--role=secret-reader"):
            r = as_operator("create", "rolebinding", "steal", ref, "-n", ns,
                            f"--serviceaccount={ns}:lorafleet-probe-sidecar")
            assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
        # Nor can it make such a Role itself.
        r = as_operator("create", "role", "steal", "-n", ns, "--verb=get", "--resource=secrets")
        assert r.returncode != 0 and "forbidden" in r.stderr.lower(), r.stderr
    finally:
        control_plane.kubectl("delete", "clusterrole", f"{ns}-secret-reader", check=False)


def test_a_sidecar_may_patch_only_its_own_pods_sync_annotation(control_plane, fleet, tmp_path):
    """The chart's ValidatingAdmissionPolicy: RBAC lets a pool's sidecar patch any pod of its namespace;
    admission holds it to the pod its token is bound to, and to the sync annotation."""
    ns, _, _, _ = fleet
    sa = "lorafleet-probe-sidecar"
    for name in ("probe-0", "probe-1"):
        control_plane.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"lorafleet.io/pool": "probe"}},
            "spec": {"serviceAccountName": sa, "containers": [{"name": "runtime", "image": "lorafleet/runtime:0.1.0"}]}}))

    def as_sidecar(bound_to: str | None):
        args = ["create", "token", sa, "-n", ns, "--duration=10m"]
        if bound_to:
            args += ["--bound-object-kind=Pod", f"--bound-object-name={bound_to}"]
        token = control_plane.kubectl(*args).stdout.strip()
        kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / f"sidecar-{bound_to}.kubeconfig", ns)

        def patch(pod: str, body: dict, kind: str = "merge") -> subprocess.CompletedProcess:
            return subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", "patch", "pod", pod,
                                   f"--type={kind}", "-p", json.dumps(body)], capture_output=True, text=True,
                                  timeout=60)
        return patch

    sync = {"metadata": {"annotations": {"lorafleet.io/sync": '{"generation": 1}'}}}
    patch = as_sidecar("probe-0")
    r = patch("probe-0", sync)
    assert r.returncode == 0, r.stderr  # what the sidecar does: its own pod's report
    r = patch("probe-1", sync)
    assert r.returncode != 0 and "may patch only its own pod" in r.stderr and "probe-1" in r.stderr, r.stderr
    for body, kind in (({"metadata": {"labels": {"lorafleet.io/pool": "other"}}}, "merge"),
                       ({"metadata": {"annotations": {"prometheus.io/scrape": "true"}}}, "merge"),
                       ({"spec": {"containers": [{"name": "runtime", "image": "attacker/image:1"}]}}, "strategic")):
        r = patch("probe-0", body, kind)
        assert r.returncode != 0 and "only its pod's lorafleet.io/sync annotation" in r.stderr, (body, r.stderr)
    # A scale down drains its pod: it may mark the pod first for deletion (the lowest cost only) and
    # unmark it, never raise its pod's cost above the others'.
    cost = "controller.kubernetes.io/pod-deletion-cost"
    r = patch("probe-0", {"metadata": {"annotations": {cost: "1000"}}})
    assert r.returncode != 0 and "only its pod's lorafleet.io/sync annotation" in r.stderr, r.stderr
    for value in ("-2147483648", None):
        r = patch("probe-0", {"metadata": {"annotations": {cost: value}}})
        assert r.returncode == 0, (value, r.stderr)
    # A token bound to no pod says nothing about which pod is its own: refused.
    r = as_sidecar(None)("probe-0", sync)
    assert r.returncode != 0 and "may patch only its own pod" in r.stderr, r.stderr
    # Anyone else is not a sidecar: the policy does not apply.
    control_plane.kubectl("patch", "pod", "probe-1", "-n", ns, "--type=merge", "-p",
                          json.dumps({"metadata": {"labels": {"checked": "yes"}}}))


def test_the_operators_deployments_cannot_reach_secrets_through_their_pods(control_plane, fleet):
    """Creating Deployments is creating pods, which may mount any Secret of their namespace; the chart's
    policy holds the operator's Deployments to what its builders make. (The fixture applied the
    pool's real Deployments as the operator: they pass.)"""
    ns, _, as_operator, _ = fleet

    def deployment(name: str, pod: dict) -> dict:
        labels = {"app": name}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": ns},
                "spec": {"replicas": 0, "selector": {"matchLabels": labels},
                         "template": {"metadata": {"labels": labels}, "spec": {
                             "serviceAccountName": "lorafleet-probe-sidecar",
                             "containers": [{"name": "c", "image": "attacker/image:1"}], **pod}}}}

    refused = {
        "secret-volume": ({"volumes": [{"name": "s", "secret": {"secretName": "anything"}}]}, "emptyDir volumes only"),
        "projected": ({"volumes": [{"name": "s", "projected": {"sources": [{"secret": {"name": "anything"}}]}}]},
                      "emptyDir volumes only"),
        "env-from": ({"containers": [{"name": "c", "image": "x", "envFrom": [{"secretRef": {"name": "anything"}}]}]},
                     "read no Secret"),
        "other-key": ({"containers": [{"name": "c", "image": "x", "env": [{"name": "K", "valueFrom": {
            "secretKeyRef": {"name": "anything", "key": "password"}}}]}]}, "read no Secret"),
        "other-sa": ({"serviceAccountName": "default"}, "pool's own ServiceAccount"),
        "host": ({"hostPID": True}, "host's namespaces"),
        "privileged": ({"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": True}}]},
                       "not privileged"),
    }
    for name, (pod, why) in refused.items():
        r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                        input=json.dumps(deployment(f"steal-{name}", pod)))
        assert r.returncode != 0 and why in r.stderr, (name, r.stderr)
    # The storage keys of a Secret, as a pool's sidecar gets them, pass.
    ok = {"containers": [{"name": "c", "image": "x", "env": [{"name": "AWS_ACCESS_KEY_ID", "valueFrom": {
        "secretKeyRef": {"name": "storage", "key": "AWS_ACCESS_KEY_ID"}}}]}],
          "volumes": [{"name": "cache", "emptyDir": {}}]}
    r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                    input=json.dumps(deployment("storage-keys", ok)))
    assert r.returncode == 0, r.stderr
    # The example pool's Deployment, with its storage Secret, as the operator writes it.
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.operator.manifests import deployment as pool_deployment

    example = json.loads(control_plane.kubectl("get", "lfpool", "minilm", "-n", ns, "-o", "json").stdout)
    made = pool_deployment("minilm", ns, example["metadata"]["uid"], BaseModelPoolSpec.model_validate(example["spec"]))
    assert any("secretKeyRef" in e.get("valueFrom", {}) for e in made["spec"]["template"]["spec"]["initContainers"][0]["env"])
    r = as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-", input=json.dumps(made))
    assert r.returncode == 0, r.stderr

"""The Helm chart against the real helm, kubectl and kube-apiserver: lint, every ci/ variant accepted
by a server-side dry run, the kind guide's install and an uninstall, a values typo refused, and the
real operator working with nothing but the chart's RBAC (no kubelet: pods stay Pending, so nothing
waits on them)."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lorafleet"
VARIANTS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))

pytestmark = pytest.mark.api


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory) -> dict[str, str]:
    """helm's config, cache and data folders kept out of the user's home."""
    home = tmp_path_factory.mktemp("helm")
    return {**os.environ, "HELM_CONFIG_HOME": str(home / "config"), "HELM_CACHE_HOME": str(home / "cache"),
            "HELM_DATA_HOME": str(home / "data")}


def helm(env: dict, *args: str, kubeconfig: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(require_tool("helm")), *args]
    if kubeconfig is not None:
        cmd.append(f"--kubeconfig={kubeconfig}")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert r.returncode == 0, f"helm {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def new_namespace(control_plane) -> str:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("create", "namespace", name)
    return name


def test_helm_lint_passes_for_the_defaults_and_every_ci_variant(helm_env):
    helm(helm_env, "lint", str(CHART), "--strict")
    for variant in VARIANTS:
        r = helm(helm_env, "lint", str(CHART), "--strict", "-f", str(CHART / "ci" / variant))
        assert "0 chart(s) failed" in r.stdout, f"{variant}: {r.stdout}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_variant_is_accepted_by_the_api_server(control_plane, helm_env, variant):
    ns = new_namespace(control_plane)
    try:
        rendered = helm(helm_env, "template", f"lf-{ns}", str(CHART), "--namespace", ns,
                        "-f", str(CHART / "ci" / variant)).stdout
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        kinds = sorted(d["kind"] for d in docs)
        # The server validates every object: schemas, the CRDs' schema and CEL rules for the pool.
        r = control_plane.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=rendered)
        assert r.stdout.count("(server dry run)") == len(docs), r.stdout
        assert {"ClusterRole", "ClusterRoleBinding", "Deployment", "ServiceAccount"} <= set(kinds)
        if "minio" in variant or "all-on" in variant:
            assert {"Secret", "Service"} <= set(kinds)
        if "example-pool" in variant or "all-on" in variant:
            assert "BaseModelPool" in kinds
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def test_a_values_typo_fails_install_naming_the_key(control_plane, helm_env):
    ns = new_namespace(control_plane)
    try:
        r = helm(helm_env, "install", f"lf-{ns}", str(CHART), "--namespace", ns, "--set", "operator.replicaz=2",
                 kubeconfig=control_plane.kubeconfig, check=False)
        assert r.returncode != 0
        assert "additional properties 'replicaz' not allowed" in r.stderr and "/operator" in r.stderr, r.stderr
        listed = helm(helm_env, "list", "--namespace", ns, "-q", kubeconfig=control_plane.kubeconfig).stdout
        assert listed.strip() == "", "nothing is installed when values are refused"
    finally:
        control_plane.kubectl("delete", "namespace", ns, "--wait=false")


@pytest.fixture(scope="module")
def installed(control_plane, helm_env):
    """The chart with everything on (MinIO and the example pool), installed in a fresh namespace that
    enforces Pod Security ``restricted`` (what the chart's own pods must pass)."""
    ns = new_namespace(control_plane)
    control_plane.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/enforce-version=latest")
    release = f"lf-{ns}"
    r = helm(helm_env, "install", release, str(CHART), "--namespace", ns, "-f", str(CHART / "ci" / "all-on-values.yaml"),
             kubeconfig=control_plane.kubeconfig)
    # The full name is <release>-lorafleet when the release name does not contain "lorafleet".
    yield ns, f"{release}-lorafleet", r.stdout
    helm(helm_env, "uninstall", release, "--namespace", ns, kubeconfig=control_plane.kubeconfig, check=False)
    control_plane.kubectl("delete", "namespace", ns, "--wait=false")


def get(control_plane, *args: str) -> dict:
    return yaml.safe_load(control_plane.kubectl("get", "-o", "yaml", *args).stdout)


def test_install_creates_the_operator_and_tells_the_user_what_to_do_next(control_plane, installed):
    ns, full, out = installed
    dep = get(control_plane, "-n", ns, "deployment", f"{full}-operator")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "lorafleet/control:0.1.0"
    assert container["args"][0] == "operator"
    # The flags the chart passes are ones `lorafleet operator` accepts (argparse exits on others).
    from lorafleet.operator.cli import parse

    args = parse(container["args"][1:])
    # ci/all-on-values.yaml watches team-* and default; the example pool's namespace is added.
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.namespace == ["team-*", "default", ns]
    probe = container["livenessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/healthz", "health")
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == full
    # The controller manager makes the operator's pod; with no kubelet it stays Pending.
    wait_for(lambda: get(control_plane, "-n", ns, "pods", "-l", "app.kubernetes.io/component=operator")["items"],
             timeout=30, interval=0.5, what="the operator's pod to be created")
    pool = get(control_plane, "-n", ns, "basemodelpool", "minilm")
    assert pool["spec"]["storage"] == {"endpoint": f"http://minio.{ns}:9000", "secretRef": {"name": f"{full}-minio"}}
    secret = get(control_plane, "-n", ns, "secret", f"{full}-minio")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"} <= set(secret["data"])
    # NOTES.txt: the next commands.
    assert f"kubectl -n {ns} get lora" in out and "lorafleet push" in out and "/v1/classify" in out


def test_every_deployment_of_the_chart_gets_its_pods_admitted_under_restricted(control_plane, installed):
    """The namespace enforces Pod Security ``restricted``: the real ReplicaSet controller's pods of the
    operator, the gateway and MinIO are admitted (a refusal is the ReplicaSet's ReplicaFailure)."""
    ns, full, _ = installed
    deployments = get(control_plane, "-n", ns, "deployments")["items"]
    assert {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in deployments} >= {
        "operator", "gateway", "minio"}

    def admitted():
        for rs in get(control_plane, "-n", ns, "replicasets")["items"]:
            for c in rs.get("status", {}).get("conditions") or []:
                assert not (c["type"] == "ReplicaFailure" and c["status"] == "True"), c.get("message")
        pods = get(control_plane, "-n", ns, "pods")["items"]
        owners = {p["metadata"]["ownerReferences"][0]["name"].rsplit("-", 1)[0] for p in pods}
        return owners >= {d["metadata"]["name"] for d in deployments}

    wait_for(admitted, timeout=60, interval=0.5, what="a pod of every chart Deployment admitted under restricted")


def test_operator_service_account_can_apply_everything_a_pool_owns(control_plane, installed, tmp_path):
    """The ClusterRole is enough for what the operator really applies (its own builders), including
    the sidecar's Role, which RBAC allows only if the operator holds every permission it grants."""
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.operator.manifests import pool_children, routes_configmap

    ns, full, _ = installed
    token = control_plane.kubectl("create", "token", full, "-n", ns, "--duration=10m").stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig", namespace=ns)

    def as_operator(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", *args], input=input,
                           capture_output=True, text=True, timeout=60)
        if check:
            assert r.returncode == 0, f"as the operator: kubectl {' '.join(args)}: {r.stderr}"
        return r

    # A pool of its own (the example pool is left to the operator in the next test).
    example = get(control_plane, "-n", ns, "basemodelpool", "minilm")
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool",
        "metadata": {"name": "probe", "namespace": ns}, "spec": example["spec"]}))
    pool = get(control_plane, "-n", ns, "basemodelpool", "probe")
    spec = BaseModelPoolSpec.model_validate(pool["spec"])
    uid = pool["metadata"]["uid"]
    manifests = pool_children("probe", ns, uid, spec, sidecar_cluster_role=f"{full}-pool-sidecar") + [
        routes_configmap("probe", ns, uid, "lorafleet-routes-probe", '{"pool": "probe", "generation": 1, "adapters": {}}')]
    as_operator("apply", "--server-side", "--field-manager=lorafleet", "-f", "-",
                input=yaml.safe_dump_all(manifests))
    for m in manifests:
        assert get(control_plane, "-n", ns, m["kind"].lower(), m["metadata"]["name"])["metadata"]["uid"]
    as_operator("patch", "basemodelpool", "probe", "--subresource=status", "--type=merge",
                "-p", '{"status": {"phase": "Pending", "message": "waiting for the model"}}')
    assert get(control_plane, "-n", ns, "basemodelpool", "probe")["status"]["phase"] == "Pending"
    as_operator("get", "pods", "-A")
    as_operator("get", "crd")
    # Least privilege: no Secrets (the storage Secret reaches the sidecar through the pod spec).
    r = as_operator("auth", "can-i", "get", "secrets", "-n", ns, check=False)
    assert r.stdout.strip() == "no"
    r = as_operator("auth", "can-i", "delete", "pods", "-n", ns, check=False)
    assert r.stdout.strip() == "no"


def kind_guide_install_command() -> list[str]:
    """The `helm install` of docs/kind.md, as argv (continuation lines joined)."""
    import re
    import shlex

    text = (REPO / "docs" / "kind.md").read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^helm install lorafleet .*$", text, flags=re.M)
    return shlex.split(line)


def test_the_kind_guides_install_works_on_a_cluster_without_crds_and_uninstall_keeps_them(control_plane, helm_env,
                                                                                         tmp_path):
    """The exact command of docs/kind.md on a fresh API server: Helm installs the CRDs first, then
    the example pool that needs them; an upgrade keeps MinIO's generated password; uninstall removes
    what the chart made and keeps the CRDs."""
    from lorafleet.localstack.controlplane import ControlPlane

    argv = kind_guide_install_command()
    assert argv[:4] == ["helm", "install", "lorafleet", "charts/lorafleet"]
    assert {"minio.enabled=true", "examplePool.enabled=true"} <= set(argv)
    ns = argv[argv.index("--namespace") + 1]
    # A second API server of its own: the session's already has the CRDs. No controller manager:
    # nothing here needs one. Its certificates are the session's (making new keys is slow).
    import shutil

    shutil.copytree(control_plane.pki, tmp_path / "fresh" / "pki")
    cp = ControlPlane(tmp_path / "fresh").start(controller_manager=False)
    try:
        assert "lorafleet.io" not in cp.kubectl("get", "crd").stdout
        r = helm(helm_env, *argv[1:3], str(CHART), *argv[4:], kubeconfig=cp.kubeconfig)
        assert "kubectl -n lorafleet-system get lora" in r.stdout
        cp.kubectl("get", "-n", ns, "basemodelpool", "minilm")
        pool = yaml.safe_load(cp.kubectl("get", "-n", ns, "basemodelpool", "minilm", "-o", "yaml").stdout)
        # In lorafleet-system the bundled MinIO is where every pool looks by default.
        assert pool["spec"]["storage"]["endpoint"] == "http://minio.lorafleet-system:9000"
        # Reached through the guide's Gateway (step 3), not an Ingress.
        assert pool["spec"]["httpRoute"]["parentRefs"] == [{"name": "lorafleet"}] and "ingress" not in pool["spec"]
        for kind, name in [("deployment", "lorafleet-operator"), ("deployment", "lorafleet-minio"),
                           ("service", "minio"), ("secret", "lorafleet-minio"), ("serviceaccount", "lorafleet")]:
            cp.kubectl("get", "-n", ns, kind, name)
        cp.kubectl("get", "clusterrole,clusterrolebinding", "lorafleet")

        # An upgrade keeps the generated MinIO password (pools and users hold it).
        def password() -> str:
            return cp.kubectl("get", "-n", ns, "secret", "lorafleet-minio",
                              "-o", "jsonpath={.data.MINIO_ROOT_PASSWORD}").stdout

        before = password()
        helm(helm_env, "upgrade", "lorafleet", str(CHART), "--namespace", ns, "--reuse-values",
             "--set", "examplePool.replicas=2", kubeconfig=cp.kubeconfig)
        assert password() == before and len(before) > 20
        assert yaml.safe_load(cp.kubectl("get", "-n", ns, "basemodelpool", "minilm", "-o", "yaml").stdout
                              )["spec"]["replicas"] == 2

        helm(helm_env, "uninstall", "lorafleet", "--namespace", ns, kubeconfig=cp.kubeconfig)
        for kind, args in [("clusterrole", ["lorafleet"]), ("clusterrolebinding", ["lorafleet"]),
                           ("deployment", ["-n", ns, "lorafleet-operator"]), ("service", ["-n", ns, "minio"]),
                           ("secret", ["-n", ns, "lorafleet-minio"]), ("basemodelpool", ["-n", ns, "minilm"])]:
            r = cp.kubectl("get", kind, *args, check=False)
            assert r.returncode != 0 and "NotFound" in r.stderr, f"{kind} {args} survived uninstall"
        # Helm never deletes CRDs (that would delete every tenant's adapters).
        cp.kubectl("get", "crd", "loraadapters.lorafleet.io", "basemodelpools.lorafleet.io")
    finally:
        cp.stop()


def test_the_real_operator_with_only_the_charts_permissions_serves_the_example_pool(control_plane, installed, tmp_path):
    """`lorafleet operator` authenticated as the chart's ServiceAccount (so with exactly the chart's
    ClusterRole) answers the chart's liveness probe, reconciles the example pool into its Deployment
    with the chart's images, and takes an adapter into the routes and its status; never a 403."""
    import json
    import sys
    import urllib.request

    from lorafleet.localstack.procs import ManagedProcess, free_port

    ns, full, _ = installed
    token = control_plane.kubectl("create", "token", full, "-n", ns, "--duration=10m").stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "operator.kubeconfig", namespace=ns)
    port = free_port()
    # Only this test's namespace: other tests share the API server.
    # The chart's own flags too: the sidecars' pod rights through its pool-sidecar ClusterRole, and
    # leader election on the Lease the chart's Role allows.
    op = ManagedProcess("operator", [sys.executable, "-m", "lorafleet", "operator", f"--namespace={ns}",
                                     f"--liveness=http://127.0.0.1:{port}/healthz",
                                     f"--sidecar-cluster-role={full}-pool-sidecar",
                                     f"--lease-namespace={ns}", f"--lease-name={full}-operator"],
                        tmp_path / "operator.log", env={"KUBECONFIG": str(kubeconfig)})
    try:
        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                return r.status == 200

        op.wait_until(healthy, 60, "answering the chart's liveness probe path /healthz")
        lease = wait_for(lambda: get(control_plane, "-n", ns, "lease", f"{full}-operator"), timeout=30,
                         interval=0.5, what="the operator's Lease")
        assert lease["spec"]["holderIdentity"], lease
        dep = wait_for(lambda: get(control_plane, "-n", ns, "deployment", "lorafleet-minilm"), timeout=60,
                       interval=0.5, what="the example pool's Deployment")
        pod = dep["spec"]["template"]["spec"]
        images = {c["name"]: c["image"] for c in pod["containers"] + pod.get("initContainers", [])}
        assert images == {"runtime": "lorafleet/runtime:0.1.0", "sidecar": "lorafleet/control:0.1.0"}
        wait_for(lambda: (get(control_plane, "-n", ns, "basemodelpool", "minilm").get("status") or {}).get("phase"),
                 timeout=30, interval=0.5, what="the pool's status")

        # The sidecar's pod rights come from the chart's ClusterRole (the operator holds no pod patch).
        rb = get(control_plane, "-n", ns, "rolebinding", "lorafleet-minilm-sidecar-pods")
        assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                 "name": f"{full}-pool-sidecar"}
        tenant = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant",
                  "metadata": {"name": "acme", "namespace": ns}, "spec": {"sources": ["s3://adapters/acme/"]}}
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(tenant))
        adapter = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter",
                   "metadata": {"name": "acme-support", "namespace": ns},
                   "spec": {"pool": "minilm", "tenant": "acme", "version": "1",
                            "source": {"uri": "s3://adapters/acme/support/1/", "sha256": "a" * 64}}}
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(adapter))

        def routed() -> bool:
            cm = get(control_plane, "-n", ns, "configmap", "lorafleet-routes-minilm")
            return "acme-support" in json.loads(cm["data"]["routes.json"])["adapters"]

        wait_for(routed, timeout=30, interval=0.5, what="the adapter in the pool's routes")
        wait_for(lambda: (get(control_plane, "-n", ns, "loraadapter", "acme-support").get("status") or {}).get("phase"),
                 timeout=30, interval=0.5, what="the adapter's status")
    finally:
        op.stop()
    log = op.log.read_text()
    # A 403 as a word of its own (a status code), not digits of a timestamp's milliseconds or an id.
    lines = [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ", "", line) for line in log.splitlines()]
    denied = [line for line in lines if re.search(r"(?<![\w,.:])403(?!\w)", line) or "orbidden" in line]
    assert not denied, "\n".join(denied[:10]) + "\n...\n" + log[-3000:]


def test_the_kind_guides_gateway_is_valid_for_the_gateway_api_and_takes_the_pools_route(control_plane):
    """Step 3's GatewayClass and Gateway, as the page writes them, accepted by the Gateway API's own CRDs
    (server-side dry run); the Gateway is the one step 4's pool names, in the pool's namespace."""
    import re

    text = (REPO / "docs" / "kind.md").read_text()
    (manifest,) = re.findall(r"kubectl apply -f - <<'EOF'\n(.*?)\nEOF\n", text, flags=re.S)
    docs = list(yaml.safe_load_all(manifest))
    assert [d["kind"] for d in docs] == ["GatewayClass", "Gateway"]
    gateway = docs[1]
    argv = kind_guide_install_command()
    assert f"examplePool.httpRoute.gateway.name={gateway['metadata']['name']}" in argv
    assert gateway["metadata"]["namespace"] == argv[argv.index("--namespace") + 1]
    assert gateway["spec"]["gatewayClassName"] == docs[0]["metadata"]["name"]
    control_plane.kubectl("create", "namespace", gateway["metadata"]["namespace"], check=False)
    r = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert r.returncode == 0, r.stderr

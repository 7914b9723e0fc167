"""The chart's gateway RBAC is enough for the gateway's reads, and no more: the real KubeView,
authenticated as the chart's gateway ServiceAccount, finds the pool's pods, tenants, key digests and
adapters, and cannot read Secrets at all (a tenant's key Secret beside it stays unread)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import yaml

from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.tools import require_tool
from support.tenants import key_entry

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "lorafleet"


def test_the_gateway_service_account_reads_what_the_gateway_needs(control_plane, namespace, tmp_path):
    from lightkube import Client, KubeConfig

    from lorafleet.gateway.kube import KubeView

    rendered = subprocess.run(
        [str(require_tool("helm")), "template", "lf", str(CHART), "--namespace", namespace,
         "--set", "gateway.enabled=true", "--set", "gateway.pool=tiny",
         "--show-only", "templates/gateway-rbac.yaml", "--show-only", "templates/gateway-deployment.yaml"],
        capture_output=True, text=True, timeout=60, env={"HELM_CONFIG_HOME": str(tmp_path / "h"),
                                                          "HELM_CACHE_HOME": str(tmp_path / "c"),
                                                          "HELM_DATA_HOME": str(tmp_path / "d"), "PATH": "/usr/bin:/bin"})
    assert rendered.returncode == 0, rendered.stderr
    docs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Role", "RoleBinding", "Deployment", "Service"}
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["gateway", f"--namespace={namespace}", "--pool=tiny"]
    # What the gateways count to divide tenant limits among themselves.
    assert deployment["spec"]["template"]["metadata"]["labels"]["lorafleet.io/gateway-for"] == "tiny"
    control_plane.kubectl("apply", "--server-side", "-f", "-", input=rendered.stdout)

    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([
        # The tenant keeps its key (here in a Secret of its own); the LoRATenant holds only the digest.
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "acme-keys"},
         "data": {"api-key": base64.b64encode(b"k-acme").decode()}},
        {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant", "metadata": {"name": "acme"},
         "spec": {"apiKeys": [key_entry("k-acme")], "maxConcurrency": 4}},
        {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRAAdapter", "metadata": {"name": "support"},
         "spec": {"pool": "tiny", "tenant": "acme", "version": "1",
                  "source": {"uri": "s3://a/support/1/", "sha256": "1" * 64}}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "tiny-0", "labels": {"lorafleet.io/pool": "tiny"}},
         "spec": {"containers": [{"name": "runtime", "image": "x"}]}},
    ]))
    token = control_plane.kubectl("create", "token", "lf-lorafleet-gateway", "-n", namespace,
                                  "--duration=10m").stdout.strip()
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "gateway.kubeconfig", namespace=namespace)
    config = KubeConfig.from_file(str(kubeconfig))
    # Each of its reads is a list then a watch: a verb RBAC refused would leave an informer unsynced.
    view = KubeView(lambda: Client(config=config), namespace, "tiny", server_timeout=5).start()
    try:
        view.wait_synced(30)
        # ... and watching is allowed too: a tenant added now reaches the view as a watch event.
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(
            {"apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant", "metadata": {"name": "beta"},
             "spec": {"apiKeys": [key_entry("k-beta")]}}))
        wait_for(lambda: view.directory().tenant_of_key("k-beta") == "beta", 10, what="the watched tenant beta")
    finally:
        view.stop()
    d = view.directory()
    assert d.problems == [] and d.tenant_of_key("k-acme") == "acme" and d.owner("support") == "acme"
    assert d.limits["acme"].max_concurrency == 4
    assert view.ready_pods() == {}  # the pod exists but is not Ready
    assert view.ready_gateways() == 0  # it may list the gateway pods too (none Ready here)
    for verb in ("get", "list", "watch"):
        for where in (namespace, "default"):
            can = subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "can-i", verb,
                                  "secrets", "-n", where], capture_output=True, text=True, timeout=30)
            assert can.stdout.strip() == "no", f"the gateway may {verb} secrets in {where}"
    can = subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={kubeconfig}", "auth", "can-i", "patch",
                          "pods", "-n", namespace], capture_output=True, text=True, timeout=30)
    assert can.stdout.strip() == "no"

"""LoRATenant.status.keys: the operator writes how many of a tenant's API key digests the gateway
accepts (a digest two tenants list is refused for both), and why any is refused, and keeps it true as
tenants change. The gateway's own directory, read from the same objects, agrees."""

from __future__ import annotations

from lf_operator_kit import SHA, apply, wait_status

from lorafleet.contracts import names
from lorafleet.gateway.kube import KubeView


def tenant(name: str, *keys: tuple[str, str]) -> dict:
    return {"apiVersion": names.API_VERSION, "kind": names.TENANT_KIND, "metadata": {"name": name},
            "spec": {"sources": [f"s3://adapters/{name}/"],
                     "apiKeys": [{"name": k, "sha256": digest} for k, digest in keys]}}


def keys_are(control_plane, namespace: str, name: str, n: int, *in_message: str) -> dict:
    return wait_status(control_plane, namespace, "lftenant", name,
                       lambda s: s.get("keys") == n and all(m in (s.get("message") or "") for m in in_message),
                       what=f"{name} status.keys={n} with {in_message}")


def gateway_counts(control_plane, namespace: str) -> dict[str, int]:
    from lightkube import Client, KubeConfig

    config = KubeConfig.from_file(str(control_plane.kubeconfig))
    view = KubeView(lambda: Client(config=config), namespace, "p", server_timeout=5).start()
    try:
        accepted = view.wait_synced(30).directory().keys
    finally:
        view.stop()
    return {t: sum(1 for owner in accepted.values() if owner == t) for t in set(accepted.values())}


def test_the_operator_writes_how_many_keys_the_gateway_accepts(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, tenant("beta", ("main", SHA["a"]), ("ci", SHA["b"])))
    st = keys_are(control_plane, namespace, "beta", 2, "2 API keys accepted")
    assert st["message"] == "2 API keys accepted"
    # The tenant the fixture makes lists no key: 0, and the message says what to do.
    keys_are(control_plane, namespace, "acme", 0, "spec.apiKeys is empty", "lorafleet api-key")

    # gamma lists one of beta's digests: refused for both (one would reach the other's adapters).
    apply(control_plane, namespace, tenant("gamma", ("shared", SHA["b"]), ("own", SHA["c"])))
    keys_are(control_plane, namespace, "beta", 1, "spec.apiKeys[ci] is also a key of tenant gamma")
    keys_are(control_plane, namespace, "gamma", 1, "spec.apiKeys[shared] is also a key of tenant beta")
    assert gateway_counts(control_plane, namespace) == {"beta": 1, "gamma": 1}

    # gamma drops it: beta's count comes back without beta being edited.
    apply(control_plane, namespace, tenant("gamma", ("own", SHA["c"])))
    st = keys_are(control_plane, namespace, "beta", 2)
    assert st["message"] == "2 API keys accepted"
    assert keys_are(control_plane, namespace, "gamma", 1)["message"] == "1 API key accepted"
    assert gateway_counts(control_plane, namespace) == {"beta": 2, "gamma": 1}

    # A key removed (rotation) is counted out; a status edited by hand is put back.
    apply(control_plane, namespace, tenant("beta", ("main", SHA["a"])))
    keys_are(control_plane, namespace, "beta", 1, "1 API key accepted")
    control_plane.kubectl("patch", "lftenant", "beta", "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", '{"status": {"keys": 7}}')
    keys_are(control_plane, namespace, "beta", 1, "1 API key accepted")

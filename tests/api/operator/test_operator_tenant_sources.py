"""Tenant sources: a LoRAAdapter is routed only from its LoRATenant's storage prefixes (spec.sources).
One outside them, in its source or its canary, or naming a tenant that does not exist, is Valid=False
with the field named and stays out of the routes (so no sidecar ever downloads it); the tenant's
edits take effect without touching the adapters."""

from __future__ import annotations

from lf_operator_kit import SHA, adapter_doc, apply, cond, pool_doc, tenant_doc, wait_routes, wait_status


def invalid_because(control_plane, namespace: str, name: str, field: str) -> dict:
    st = wait_status(control_plane, namespace, "lora", name,
                     lambda s: cond(s, "Valid").get("status") == "False", what=f"{name} Valid=False")
    assert cond(st, "Valid")["message"].startswith(field + ":"), cond(st, "Valid")["message"]
    assert st["phase"] == "Failed" and field in st["message"]
    return st


def test_adapters_outside_their_tenants_sources_are_refused_and_never_routed(control_plane, operator, namespace,
                                                                              kube):
    apply(control_plane, namespace, tenant_doc("beta", "s3://adapters/beta/"))
    apply(control_plane, namespace, pool_doc("p", replicas=1))
    apply(control_plane, namespace, adapter_doc("own", "p", tenant="beta",
                                                source={"uri": "s3://adapters/beta/own/1/", "sha256": SHA["b"]}))
    # Another tenant's object (acme's), claimed by beta.
    apply(control_plane, namespace, adapter_doc("steal", "p", tenant="beta",
                                                source={"uri": "s3://adapters/acme/secret/1/", "sha256": SHA["c"]}))
    # A sibling folder whose name starts like beta's, and a climb out of beta's folder.
    apply(control_plane, namespace, adapter_doc("sibling", "p", tenant="beta",
                                                source={"uri": "s3://adapters/beta-evil/x/1/", "sha256": SHA["c"]}))
    apply(control_plane, namespace, adapter_doc("climb", "p", tenant="beta",
                                                source={"uri": "s3://adapters/beta/../acme/secret/1/",
                                                        "sha256": SHA["c"]}))
    apply(control_plane, namespace, adapter_doc("canary", "p", tenant="beta",
                                                source={"uri": "s3://adapters/beta/c/1/", "sha256": SHA["d"]},
                                                canary={"version": "2", "weight": 10,
                                                        "source": {"uri": "s3://adapters/acme/c/2/",
                                                                   "sha256": SHA["e"]}}))
    apply(control_plane, namespace, adapter_doc("orphan", "p", tenant="nobody",
                                                source={"uri": "s3://adapters/nobody/o/1/", "sha256": SHA["b"]}))

    t = wait_routes(kube, namespace, "p", lambda t: "own" in t.adapters, "beta's own adapter in the routes")
    for name in ("steal", "sibling", "climb"):
        invalid_because(control_plane, namespace, name, "spec.source.uri")
    st = invalid_because(control_plane, namespace, "canary", "spec.canary.source.uri")
    assert "s3://adapters/acme/c/2/" in st["message"] and "LoRATenant 'beta'" in st["message"]
    st = invalid_because(control_plane, namespace, "orphan", "spec.tenant")
    assert "no LoRATenant" in st["message"]
    assert cond(wait_status(control_plane, namespace, "lora", "own", lambda s: "conditions" in s, what="own's status"),
                "Valid")["status"] == "True"
    t = wait_routes(kube, namespace, "p", lambda t: "own" in t.adapters, "the routes")
    assert set(t.adapters) == {"own"}
    assert all(v.uri.startswith("s3://adapters/beta/") for e in t.adapters.values() for v in e.versions)

    # The tenant allows acme's folder too: the adapter that claimed it is routed, without being edited.
    apply(control_plane, namespace, tenant_doc("beta", "s3://adapters/beta/", "s3://adapters/acme/secret/"))
    wait_routes(kube, namespace, "p", lambda t: {"own", "steal"} <= set(t.adapters), "steal routed once allowed")
    wait_status(control_plane, namespace, "lora", "steal", lambda s: cond(s, "Valid").get("status") == "True",
                what="steal Valid=True")
    # The tenant narrows its sources: what lies outside leaves the routes (it is not kept as the last
    # good routes of an adapter that turned invalid).
    apply(control_plane, namespace, tenant_doc("beta", "s3://adapters/acme/secret/"))
    t = wait_routes(kube, namespace, "p", lambda t: "own" not in t.adapters, "own out of the routes")
    assert set(t.adapters) == {"steal"}
    invalid_because(control_plane, namespace, "own", "spec.source.uri")
    # The tenant deleted: none of its adapters is routed.
    control_plane.kubectl("delete", "lftenant", "beta", "-n", namespace)
    wait_routes(kube, namespace, "p", lambda t: not t.adapters, "nothing routed without the tenant")
    invalid_because(control_plane, namespace, "steal", "spec.tenant")


def test_a_tenants_sources_must_be_folders(control_plane, namespace):
    r = control_plane.kubectl("apply", "-n", namespace, "-f", "-", check=False, input=__import__("json").dumps(
        tenant_doc("bad", "s3://adapters/beta")))
    assert r.returncode != 0 and "sources[] must be a folder" in r.stderr, r.stderr

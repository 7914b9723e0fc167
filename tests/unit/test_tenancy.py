"""The tenant-sources rule (contracts.tenancy) and how the operator's planner applies it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.contracts.resources import LoRATenantSpec
from lorafleet.contracts.tenancy import prefix_problem, source_problem, uri_within

SHA = "b" * 64


@pytest.mark.parametrize("uri, inside", [
    ("s3://adapters/acme/support/1/", True),
    ("s3://adapters/acme/support/1", True),
    ("s3://adapters/acme/", True),
    ("s3://adapters/acme", True),  # the folder itself (the sidecar reads it as acme/)
    ("s3://adapters/acme-evil/x/", False),  # a sibling sharing the name's start
    ("s3://adapters/beta/support/1/", False),
    ("s3://other/acme/support/1/", False),
    ("file:///adapters/acme/x/", False),
    ("s3://adapters/acme/../beta/x/", False),
    ("s3://adapters/acme/%2e%2e/beta/x/", False),
    ("s3://adapters/acme/./x/", False),
    ("s3://adapters/acme/x/?versionId=1", False),
])
def test_a_uri_lies_within_a_prefix_only_below_its_folder(uri, inside):
    assert uri_within(uri, "s3://adapters/acme/") is inside


def test_file_prefixes_and_their_dot_segments():
    assert uri_within("file:///srv/acme/a/1/", "file:///srv/acme/")
    assert not uri_within("file:///srv/acme/../beta/a/", "file:///srv/acme/")


@pytest.mark.parametrize("prefix", ["s3://adapters/acme", "s3://adapters", "s3:///acme/", "http://x/acme/",
                                    "s3://adapters/acme/../", "acme/"])
def test_a_prefix_must_be_a_folder(prefix):
    assert prefix_problem(prefix)
    with pytest.raises(ValidationError, match="sources"):
        LoRATenantSpec.model_validate({"sources": [prefix]})


def test_refusals_name_the_field_and_the_tenant():
    assert source_problem("spec.source.uri", "s3://adapters/acme/x/", "acme", ["s3://adapters/acme/"]) is None
    msg = source_problem("spec.canary.source.uri", "s3://adapters/beta/x/", "acme", ["s3://adapters/acme/"])
    assert msg.startswith("spec.canary.source.uri: 's3://adapters/beta/x/' lies outside LoRATenant 'acme'")
    assert "no LoRATenant" in source_problem("spec.tenant", "acme", "acme", None)
    assert "declares no spec.sources" in source_problem("spec.source.uri", "s3://a/b/", "acme", [])


def test_api_keys_are_digests_with_unique_names():
    LoRATenantSpec.model_validate({"apiKeys": [{"name": "ci", "sha256": SHA}]})
    with pytest.raises(ValidationError, match="sha256"):
        LoRATenantSpec.model_validate({"apiKeys": [{"name": "ci", "sha256": "k-plaintext-key"}]})
    with pytest.raises(ValidationError, match="two keys are named 'ci'"):
        LoRATenantSpec.model_validate({"apiKeys": [{"name": "ci", "sha256": SHA}, {"name": "ci", "sha256": "c" * 64}]})
    with pytest.raises(ValidationError):
        LoRATenantSpec.model_validate({"apiKeySecretRef": {"name": "acme-keys"}})


def _adapter(name, tenant, uri, canary_uri=None, created="2026-01-01T00:00:00Z"):
    from lorafleet.operator.routing import adapter_view

    spec = {"pool": "p", "tenant": tenant, "version": "1", "source": {"uri": uri, "sha256": SHA}}
    if canary_uri:
        spec["canary"] = {"version": "2", "source": {"uri": canary_uri, "sha256": "c" * 64}, "weight": 10}
    return adapter_view({"metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "generation": 1,
                                      "creationTimestamp": created}, "spec": spec})


def test_the_planner_routes_only_what_the_tenant_allows():
    from lorafleet.contracts.routes import RoutesTable
    from lorafleet.operator import routing

    tenants = {"acme": ["s3://adapters/acme/"]}
    adapters = [_adapter("ok", "acme", "s3://adapters/acme/ok/1/"),
                _adapter("steal", "acme", "s3://adapters/beta/secret/1/"),
                _adapter("canary", "acme", "s3://adapters/acme/c/1/", "s3://adapters/beta/c/2/"),
                _adapter("ghost", "nobody", "s3://adapters/acme/g/1/")]
    plan = routing.plan_pool("p", None, adapters, [], RoutesTable(pool="p"), {}, tenants=tenants)
    problems = routing.validity(adapters, "p", tenants)
    assert problems["ok"] == []
    assert problems["steal"] == ["spec.source.uri: 's3://adapters/beta/secret/1/' lies outside LoRATenant 'acme''s "
                                 "spec.sources (s3://adapters/acme/); push the adapter below one of them or ask the "
                                 "platform team to add the prefix"]
    assert [p.split(":")[0] for p in problems["canary"]] == ["spec.canary.source.uri"]
    assert [p.split(":")[0] for p in problems["ghost"]] == ["spec.tenant"]
    for name in ("steal", "canary", "ghost"):
        valid = next(c for c in plan.adapter_status[name]["conditions"] if c["type"] == "Valid")
        assert valid["status"] == "False"


def test_a_tenant_that_narrows_its_sources_takes_routed_versions_away():
    from lorafleet.operator import routing
    from lorafleet.operator.routing import PoolView
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.contracts.routes import RoutesTable

    pool = PoolView("ns", "p", "pu", 1, BaseModelPoolSpec.model_validate(
        {"model": {"uri": "s3://m/m/", "sha256": "a" * 64, "task": "sequence-classification"}}), None)
    a = _adapter("a", "acme", "s3://adapters/acme/a/1/")
    first = routing.plan_pool("p", pool, [a], [], RoutesTable(pool="p"), {}, tenants={"acme": ["s3://adapters/"]})
    assert "a" in first.table.adapters
    # The prefix shrinks to another folder: the adapter is invalid, and its last routes are not kept.
    later = routing.plan_pool("p", pool, [a], [], first.table, first.adapter_status,
                              tenants={"acme": ["s3://adapters/other/"]})
    assert later.changed and "a" not in later.table.adapters


def test_a_key_digest_two_tenants_list_is_refused_for_both_and_counted_for_neither():
    from lorafleet.contracts.tenancy import accepted_count, accepted_keys

    a, b, c = "a" * 64, "b" * 64, "c" * 64
    accepted, problems = accepted_keys({"beta": [("main", a), ("ci", b)], "gamma": [("shared", b), ("own", c)],
                                        "empty": [], "twice": [("x", "d" * 64), ("y", "d" * 64)]})
    assert accepted == {a: "beta", c: "gamma", "d" * 64: "twice"}
    assert [accepted_count(t, accepted) for t in ("beta", "gamma", "empty", "twice")] == [1, 1, 0, 1]
    assert problems["beta"] == ["spec.apiKeys[ci] is also a key of tenant gamma; the key is refused until each "
                                "tenant has its own"]
    assert "spec.apiKeys[shared] is also a key of tenant beta" in problems["gamma"][0]
    assert "spec.apiKeys is empty" in problems["empty"][0] and "twice" not in problems

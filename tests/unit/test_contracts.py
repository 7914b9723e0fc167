"""Contracts: the CRD models, the generated CRDs, the routes table and its sharding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lorafleet.contracts import names
from lorafleet.contracts.crdgen import crd_manifests, render
from lorafleet.contracts.quantity import parse_quantity
from lorafleet.contracts.resources import BaseModelPool, LoRAAdapter
from lorafleet.contracts.routes import RouteEntry, RoutesTable, RouteVersion, SyncReport, shard_of

REPO = Path(__file__).resolve().parents[2]
SHA = "a" * 64


def test_committed_crds_are_current():
    r = subprocess.run([sys.executable, "-m", "lorafleet", "gen-crds", "--check", "--out", str(REPO / "crds")],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"crds/ is stale: run `lorafleet gen-crds`\n{r.stderr}"


def test_gen_crds_check_detects_a_stale_file(tmp_path: Path):
    for name, manifest in crd_manifests().items():
        (tmp_path / name).write_text(render(manifest).replace("lora", "LORA", 1))
    r = subprocess.run([sys.executable, "-m", "lorafleet", "gen-crds", "--check", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr


def test_crds_are_structural_with_columns_and_short_names():
    crds = {m["spec"]["names"]["kind"]: m for m in crd_manifests().values()}
    lora = crds["LoRAAdapter"]["spec"]
    assert lora["names"]["shortNames"] == ["lora"]
    assert crds["BaseModelPool"]["spec"]["names"]["shortNames"] == ["lfpool"]
    version = lora["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = [c["name"] for c in version["additionalPrinterColumns"]]
    assert cols == ["Pool", "Tenant", "Version", "Wanted", "Phase", "Ready", "Placed", "Age", "Pods"]

    def walk(schema, path="$"):
        # structural: every node has a type (or is int-or-string / preserve-unknown), no $ref/anyOf
        assert "$ref" not in schema and "anyOf" not in schema, path
        assert "type" in schema or schema.get("x-kubernetes-int-or-string") \
            or schema.get("x-kubernetes-preserve-unknown-fields"), path
        for k, v in schema.get("properties", {}).items():
            walk(v, f"{path}.{k}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")

    for m in crds.values():
        walk(m["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    rules = json.dumps(version["schema"])
    for needle in ["(s3|file|hf)://", "[0-9a-f]{64}", "self.weight >= 0 && self.weight <= 100", "self.version.matches"]:
        assert needle in rules


def test_examples_parse_with_the_models():
    pool = BaseModelPool.model_validate(yaml.safe_load((REPO / "examples/pool.yaml").read_text()))
    assert pool.spec.cache.disk_bytes_int == 20 * 2**30
    adapter = LoRAAdapter.model_validate(yaml.safe_load((REPO / "examples/adapter.yaml").read_text()))
    assert adapter.served_name == "acme-support"
    images = BaseModelPool.model_validate(yaml.safe_load((REPO / "examples/text-to-image-pool.yaml").read_text()))
    assert images.spec.model.task.value == "text-to-image"
    from lorafleet.contracts.resources import LoRATenant
    from lorafleet.contracts.tenancy import uri_within

    tenant = LoRATenant.model_validate(yaml.safe_load((REPO / "examples/tenant.yaml").read_text()))
    # The example adapter is one the example tenant may serve.
    assert adapter.spec.tenant == tenant.metadata["name"]
    assert any(uri_within(adapter.spec.source.uri, p) for p in tenant.spec.sources)


def adapter_doc(**spec):
    base = {"pool": "minilm", "tenant": "acme", "version": "3",
            "source": {"uri": "s3://adapters/acme/3/", "sha256": SHA}}
    base.update(spec)
    return {"metadata": {"name": "acme-support"}, "spec": base}


@pytest.mark.parametrize("spec, field", [
    ({"source": {"uri": "ftp://x/", "sha256": SHA}}, "source.uri"),
    ({"source": {"uri": "s3://x/", "sha256": "abc"}}, "source.sha256"),
    ({"version": "v@1"}, "version"),
    ({"canary": {"version": "4", "weight": 150, "source": {"uri": "s3://x/", "sha256": SHA}}}, "canary.weight"),
    ({"servedName": "a@b"}, "servedName"),
])
def test_invalid_adapter_specs_name_the_field(spec, field):
    with pytest.raises(ValidationError) as e:
        LoRAAdapter.model_validate(adapter_doc(**spec))
    assert field.split(".")[-1] in str(e.value)


def test_cross_field_problems_are_reported_together():
    doc = adapter_doc(canary={"version": "3", "weight": 10, "source": {"uri": "s3://x/", "sha256": SHA}})
    problems = LoRAAdapter.model_validate(doc).spec.problems()
    assert problems and "spec.canary.version" in problems[0]


@pytest.mark.parametrize("q, n", [("20Gi", 20 * 2**30), ("512Mi", 512 * 2**20), (1000, 1000), ("1e3", 1000),
                                  ("1.5G", 1_500_000_000)])
def test_quantities(q, n):
    assert parse_quantity(q) == n


def table(n: int, pool: str = "p") -> RoutesTable:
    return RoutesTable(pool=pool, generation=7, adapters={
        f"tenant-{i:05d}-support": RouteEntry(tenant=f"tenant-{i:05d}", versions=[
            RouteVersion(version="4", uri=f"s3://adapters/tenant-{i:05d}/support/4/", sha256=f"{i:064x}", weight=100,
                         since=7),
            RouteVersion(version="3", uri=f"s3://adapters/tenant-{i:05d}/support/3/", sha256=f"{i + 1:064x}",
                         weight=0, draining=True, since=3),
        ]) for i in range(n)})


def test_small_pool_is_one_configmap():
    data = table(10).to_configmap_data()
    assert list(data) == [names.routes_configmap_name("p")]
    assert RoutesTable.from_json(data["lorafleet-routes-p"]) == table(10)


def test_ten_thousand_adapters_shard_under_the_configmap_limit_deterministically():
    t = table(10_000)
    data = t.to_configmap_data()
    assert len(data) > 1
    assert all(len(v.encode()) < 1024 * 1024 for v in data.values())
    assert data == table(10_000).to_configmap_data()  # same table, same ConfigMaps, byte for byte
    merged = RoutesTable.merge("p", [RoutesTable.from_json(v) for v in data.values()])
    assert merged.adapters == t.adapters and merged.generation == t.generation
    # each adapter sits in the shard its name hashes to
    n = len(data)
    for name, text in data.items():
        shard = int(name.rsplit("-", 1)[1])
        assert all(shard_of(a, n) == shard for a in RoutesTable.from_json(text).adapters)


def test_shard_text_is_the_canonical_json_of_that_shard():
    t = table(3000)
    data = t.to_configmap_data(budget=200_000)
    assert len(data) > 1
    n = len(data)
    for name, text in data.items():
        shard = int(name.rsplit("-", 1)[1])
        same = RoutesTable(pool="p", generation=t.generation, shard=shard, shards=n, shard_generations=[7] * n,
                           adapters={a: e for a, e in t.adapters.items() if shard_of(a, n) == shard})
        assert text == same.to_json()
        assert len(text.encode()) <= 200_000
    assert t.shard_count(budget=200_000) == n and t.shard_count(budget=100_000) > n


def test_merge_ignores_shards_of_an_old_count_during_resharding():
    new = table(10_000).to_configmap_data()
    old_single = table(3)  # a stale unsharded ConfigMap left from before the pool grew
    old_single.generation = 1
    merged = RoutesTable.merge("p", [old_single] + [RoutesTable.from_json(v) for v in new.values()])
    assert len(merged.adapters) == 10_000


def test_only_a_complete_consistent_set_of_shards_merges():
    t = table(40)
    t.generation = 5
    four = {n: RoutesTable.from_json(v) for n, v in t.to_configmap_data(budget=7000).items()}
    assert len(four) == 4
    single = RoutesTable.from_json(table(40).to_configmap_data()["lorafleet-routes-p"])  # generation 7
    single.generation = 4
    assert RoutesTable.merge_complete("p", four.values()).adapters == t.adapters
    # A reshard half written: the old single table (generation 4) is the newest complete set.
    part = [four["lorafleet-routes-p-0"], four["lorafleet-routes-p-1"], single]
    got = RoutesTable.merge_complete("p", part)
    assert got.generation == 4 and got.adapters == single.adapters
    assert RoutesTable.merge_complete("p", part[:2]) is None and RoutesTable.merge_complete("p", []) is None
    # Two shards written at generation 6, one of them not seen yet: no set until it is.
    six = t.model_copy(deep=True)
    six.generation = 6
    six_shards = {n: RoutesTable.from_json(v) for n, v in six.to_configmap_data(budget=7000).items()}
    mixed = dict(four, **{"lorafleet-routes-p-2": six_shards["lorafleet-routes-p-2"]})
    assert RoutesTable.merge_complete("p", mixed.values()) is None
    # The operator rewrites only changed shards: they name the others' older generations.
    six_shards["lorafleet-routes-p-2"].shard_generations = [5, 5, 6, 5]
    mixed = dict(four, **{"lorafleet-routes-p-2": six_shards["lorafleet-routes-p-2"]})
    assert RoutesTable.merge_complete("p", mixed.values()).generation == 6
    # Best effort (the operator after a restart): the newest complete set, at the newest generation.
    assert RoutesTable.merge("p", part).generation == 5 and RoutesTable.merge("p", part).adapters == single.adapters


def test_sync_report_semantics():
    r = SyncReport(generation=9, loaded=2, failed={"a@2": "digest mismatch"}, pending=["b@5"])
    again = SyncReport.from_annotation(r.to_json())
    assert again == r
    assert again.has_loaded("c", "1", since=9)
    assert not again.has_loaded("c", "1", since=10)  # entered the routes after what the sidecar reached
    assert not again.has_loaded("a", "2", since=1) and again.failure("a", "2") == "digest mismatch"
    assert not again.has_loaded("b", "5", since=1)
    assert SyncReport.from_annotation("{not json") is None


def test_a_cut_sync_report_covers_only_what_it_lists():
    failed = {f"f{i:03d}@1": "refused" for i in range(150)}
    pending = [f"p{i:03d}@1" for i in range(150)]
    r = SyncReport.from_annotation(SyncReport.build(4, 10, failed, pending).to_json())
    assert len(r.failed) + len(r.pending) == SyncReport.MAX_LISTED and r.truncated
    assert r.failed_total == 150 and r.pending_total == 150 and r.covered_through == "p049@1"
    assert not r.has_loaded("p049", "1", since=1) and not r.has_loaded("p050", "1", since=1)  # listed / unknown
    assert not r.has_loaded("z", "1", since=1)  # after the last key covered: unknown, never loaded
    assert r.has_loaded("a", "1", since=1) and r.has_loaded("f150", "1", since=1)  # covered, not listed
    # A bulk rollout: the versions it adds (since 4) are cut; a version that was there before (since
    # 3) and sorts after the lists is loaded, one added with the rollout is unknown.
    since = {**{k: 4 for k in failed}, **{k: 4 for k in pending}}
    bulk = SyncReport.from_annotation(SyncReport.build(4, 10, failed, pending, since=since).to_json())
    assert bulk.cut_since == 4
    assert bulk.has_loaded("z", "1", since=3) and not bulk.has_loaded("z", "2", since=4)
    assert not bulk.has_loaded("p149", "1", since=4)
    untouched = SyncReport.build(4, 10, {"a@1": "x"}, ["b@1"])
    assert not untouched.truncated and untouched.covered_through is None and untouched.has_loaded("z", "1", 1)
    # An older sidecar cut each list on its own and sent only the totals: covered up to the last
    # key of every cut list.
    old = SyncReport(generation=4, pending=[f"p{i:03d}@1" for i in range(200)], pending_total=300)
    assert old.truncated and old.has_loaded("a", "1", 1) and not old.has_loaded("q", "1", 1)

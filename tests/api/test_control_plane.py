"""The test control plane is a real kube-apiserver + etcd with lorafleet's CRDs: it accepts valid
resources, refuses invalid ones naming the field, and kubectl prints our columns."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
POOL = yaml.safe_load((REPO / "examples/pool.yaml").read_text())
ADAPTER = yaml.safe_load((REPO / "examples/adapter.yaml").read_text())


def apply(control_plane, namespace, doc, check=True):
    return control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(doc), check=check)


def test_apiserver_reports_its_version(control_plane):
    out = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    assert out["serverVersion"]["gitVersion"].startswith("v1.37")
    assert out["serverVersion"]["major"] == "1"


def test_rbac_is_enforced(control_plane, tmp_path):
    # A token nobody issued is refused: the server authenticates, it is not wide open.
    cfg = control_plane.kubeconfig_for_token("not-a-real-token", tmp_path / "kubeconfig")
    r = control_plane.kubectl("--kubeconfig", str(cfg), "get", "loraadapters", check=False)
    assert r.returncode != 0 and ("Unauthorized" in r.stderr or "provide credentials" in r.stderr), r.stderr


def test_valid_examples_are_accepted(control_plane, namespace, kube):
    apply(control_plane, namespace, POOL)
    apply(control_plane, namespace, ADAPTER)
    got = json.loads(control_plane.kubectl("get", "lora", "acme-support", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["source"]["sha256"] == ADAPTER["spec"]["source"]["sha256"]
    assert got["spec"]["pinned"] is False
    pool = json.loads(control_plane.kubectl("get", "lfpool", "minilm", "-n", namespace, "-o", "json").stdout)
    assert pool["spec"]["model"]["task"] == "sequence-classification"


def test_server_fills_defaults(control_plane, namespace):
    doc = copy.deepcopy(ADAPTER)
    del doc["spec"]["pinned"], doc["spec"]["preload"]
    apply(control_plane, namespace, doc)
    got = json.loads(control_plane.kubectl("get", "lora", "acme-support", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["preload"] is True and got["spec"]["pinned"] is False


def _with(doc, path, value):
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is None:
        node.pop(last)
    else:
        node[last] = value
    return doc


CANARY = {"version": "4", "weight": 150, "source": {"uri": "s3://adapters/acme/support/4/", "sha256": "b" * 64}}


@pytest.mark.parametrize("path, value, field, words", [
    ("spec.canary", CANARY, "spec.canary.weight", "between 0 and 100"),
    ("spec.source.sha256", "abc", "spec.source.sha256", "64 lowercase hex"),
    ("spec.source.uri", "ftp://adapters/acme/", "spec.source.uri", "s3://, file:// or hf://"),
    ("spec.pool", None, "spec.pool", "Required value"),
    ("spec.version", "3@beta", "spec.version", "letters, digits"),
    ("spec.replicas", 0, "spec.replicas", "1 or more) or \"all\""),
    ("spec.replicas", "most", "spec.replicas", "1 or more) or \"all\""),
])
def test_invalid_adapters_are_refused_naming_the_field(control_plane, namespace, path, value, field, words):
    r = apply(control_plane, namespace, _with(ADAPTER, path, value), check=False)
    assert r.returncode != 0, f"server accepted an adapter with {path}={value!r}"
    assert field in r.stderr and words in r.stderr, r.stderr
    # Nothing was created.
    got = control_plane.kubectl("get", "lora", "-n", namespace, "-o", "name").stdout
    assert got.strip() == ""


def test_placement_fields_are_accepted_and_checked(control_plane, namespace):
    apply(control_plane, namespace, _with(POOL, "spec.placement", {"replicasPerAdapter": 2, "adapterBytes": "40Gi"}))
    apply(control_plane, namespace, _with(_with(ADAPTER, "spec.replicas", "all"), "spec.source.sizeBytes", "34Mi"))
    apply(control_plane, namespace, _with(ADAPTER, "spec.replicas", 3))
    r = apply(control_plane, namespace, _with(POOL, "spec.placement", {"replicasPerAdapter": "half"}), check=False)
    assert r.returncode != 0 and "spec.placement.replicasPerAdapter" in r.stderr, r.stderr
    # The host-memory budget and popularity: accepted as quantities and a rate, refused otherwise.
    apply(control_plane, namespace, _with(POOL, "spec.placement", {"replicasPerAdapter": 1, "adapterBytes": "40Gi",
                                                                 "hostMemoryBytes": "24Gi", "requestsPerReplica": 2.5}))
    for bad, field in (({"requestsPerReplica": 0}, "requestsPerReplica"), ({"requestsPerReplica": "fast"},
                                                                             "requestsPerReplica"),
                       ({"hostMemoryBytes": True}, "hostMemoryBytes")):
        r = apply(control_plane, namespace, _with(POOL, "spec.placement", {"replicasPerAdapter": 1, **bad}),
                  check=False)
        assert r.returncode != 0 and f"spec.placement.{field}" in r.stderr, (bad, r.stderr)


def test_invalid_pool_is_refused(control_plane, namespace):
    r = apply(control_plane, namespace, _with(POOL, "spec.model.sha256", "xyz"), check=False)
    assert r.returncode != 0 and "spec.model.sha256" in r.stderr, r.stderr
    r = apply(control_plane, namespace, _with(POOL, "spec.model.task", "translation"), check=False)
    assert r.returncode != 0 and "spec.model.task" in r.stderr and "sequence-classification" in r.stderr, r.stderr


def test_kubectl_get_lora_prints_the_printer_columns(control_plane, namespace):
    apply(control_plane, namespace, ADAPTER)
    # Status is the operator's to write; here the test plays it to see the column: mid-rollout, the
    # replicas still serve version 2 while the spec wants 3. VERSION is what answers, WANTED the spec.
    control_plane.kubectl("patch", "lora", "acme-support", "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"phase": "Syncing", "ready": "0/2", "servedVersion": "2",
                                                       "placed": 2, "placement": ["pod-a", "pod-b"]}}))
    out = control_plane.kubectl("get", "lora", "-n", namespace).stdout.splitlines()
    assert out[0].split() == ["NAME", "POOL", "TENANT", "VERSION", "WANTED", "PHASE", "READY", "PLACED", "AGE"]
    assert out[1].split()[:8] == ["acme-support", "minilm", "acme", "2", "3", "Syncing", "0/2", "2"]
    # -o wide adds the pods it is placed on.
    wide = control_plane.kubectl("get", "lora", "-n", namespace, "-o", "wide").stdout.splitlines()
    assert wide[0].split()[-1] == "PODS" and '["pod-a","pod-b"]' in wide[1]


def test_garbage_collector_removes_owned_objects(control_plane, namespace, kube):
    """The controller manager runs: deleting an owner deletes what it owns (what pool deletion relies on)."""
    from lightkube.models.meta_v1 import ObjectMeta, OwnerReference
    from lightkube.resources.core_v1 import ConfigMap

    from lorafleet.localstack.procs import wait_for

    owner = kube.create(ConfigMap(metadata=ObjectMeta(name="owner", namespace=namespace), data={}))
    ref = OwnerReference(apiVersion="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    kube.create(ConfigMap(metadata=ObjectMeta(name="owned", namespace=namespace, ownerReferences=[ref]), data={}))
    kube.delete(ConfigMap, "owner", namespace=namespace)

    def gone():
        try:
            kube.get(ConfigMap, "owned", namespace=namespace)
            return False
        except Exception as e:  # lightkube ApiError 404
            return getattr(getattr(e, "status", None), "code", None) == 404

    wait_for(gone, timeout=30, what="the owned ConfigMap to be garbage collected")

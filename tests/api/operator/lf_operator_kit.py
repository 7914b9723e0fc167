"""Helpers for the operator's api tests: the operator process, documents, simulated pool pods."""


from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from lorafleet.contracts import names
from lorafleet.contracts.routes import RoutesTable
from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for
from support.apiserver_faults import CuttableProxy  # noqa: F401 - the operator tests' name for it

SHA = {c: c * 64 for c in "abcdef"}


class Operator:
    """A ``lorafleet operator`` process; restartable."""

    def __init__(self, kubeconfig: Path, log: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 all_namespaces: bool = True):
        """``all_namespaces=False``: ``args`` say which namespaces (``--namespace``)."""
        self.kubeconfig, self.log, self.args, self.env = kubeconfig, log, args, env or {}
        self.scope = ("--all-namespaces",) if all_namespaces else ()
        self.proc: ManagedProcess | None = None

    def start(self) -> "Operator":
        port = free_port()
        url = f"http://127.0.0.1:{port}/healthz"
        self.proc = ManagedProcess("lorafleet-operator", [
            sys.executable, "-m", "lorafleet", "operator", *self.scope, "--verbose", "--liveness", url,
            *self.args,
        ], self.log, env={"KUBECONFIG": str(self.kubeconfig), **self.env})
        self.proc.wait_until(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 60, "live")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def pool_doc(name: str, replicas: int = 2, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": {"uri": "s3://models/minilm/", "sha256": SHA["a"], "task": "sequence-classification"},
        "replicas": replicas,
        "storage": {"endpoint": "http://minio.example:9000", "secretRef": {"name": "storage-creds"}},
    }
    body.update(spec)
    return {"apiVersion": names.API_VERSION, "kind": names.POOL_KIND, "metadata": {"name": name}, "spec": body}


def adapter_doc(name: str, pool: str, version: str = "1", sha: str = SHA["b"], **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"pool": pool, "tenant": "acme", "version": version,
                            "source": {"uri": f"s3://adapters/{name}/{version}/", "sha256": sha}}
    body.update(spec)
    return {"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND, "metadata": {"name": name}, "spec": body}


def tenant_doc(name: str = "acme", *sources: str) -> dict[str, Any]:
    """A LoRATenant; by default acme, allowed every ``s3://adapters/`` source (what ``adapter_doc``
    makes): the operator routes an adapter only from its tenant's spec.sources."""
    return {"apiVersion": names.API_VERSION, "kind": names.TENANT_KIND, "metadata": {"name": name},
            "spec": {"sources": list(sources or ("s3://adapters/",))}}


def apply(control_plane, namespace: str, doc: dict[str, Any]) -> None:
    control_plane.kubectl("apply", "--server-side", "--field-manager=tests", "--force-conflicts", "-n", namespace,
                          "-f", "-", input=json.dumps(doc))


def get_json(control_plane, namespace: str, *what: str) -> dict[str, Any] | None:
    r = control_plane.kubectl("get", *what, "-n", namespace, "-o", "json", check=False)
    if r.returncode != 0:
        if "NotFound" in r.stderr:
            return None
        raise AssertionError(r.stderr)
    return json.loads(r.stdout)


def routes(kube, namespace: str, pool: str) -> RoutesTable:
    from lightkube.resources.core_v1 import ConfigMap

    shards = [RoutesTable.from_json(cm.data[names.ROUTES_KEY])
              for cm in kube.list(ConfigMap, namespace=namespace, labels={names.LABEL_ROUTES_FOR: pool})]
    return RoutesTable.merge(pool, shards)


def wait_routes(kube, namespace: str, pool: str, check, what: str, timeout: float = 30) -> RoutesTable:
    def ok():
        t = routes(kube, namespace, pool)
        return t if check(t) else None
    return wait_for(ok, timeout=timeout, what=what)


def adapter_status(control_plane, namespace: str, name: str) -> dict[str, Any]:
    got = get_json(control_plane, namespace, "lora", name)
    return (got or {}).get("status") or {}


def wait_status(control_plane, namespace: str, kind: str, name: str, check, what: str, timeout: float = 30):
    def ok():
        got = get_json(control_plane, namespace, kind, name)
        st = (got or {}).get("status") or {}
        return st if st and check(st) else None
    return wait_for(ok, timeout=timeout, interval=0.1, what=what)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def make_pod(kube, namespace: str, pool: str, name: str, ready: bool = True, sync: dict | None = None,
             env: dict[str, str] | None = None) -> None:
    """A pod of the pool as the test plays the node and the sidecar: Ready in status, sync annotation;
    ``env``: its runtime container's (a merged pool's pod names the adapter it merges there)."""
    from lightkube.models.core_v1 import Container, EnvVar, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod

    runtime = Container(name="runtime", image="lorafleet/runtime:0.1.0",
                        env=[EnvVar(name=k, value=v) for k, v in (env or {}).items()] or None)
    kube.create(Pod(metadata=ObjectMeta(name=name, namespace=namespace, labels=names.pod_selector(pool)),
                    spec=PodSpec(containers=[runtime])))
    set_pod(kube, namespace, name, ready=ready, sync=sync)


def set_pod(kube, namespace: str, name: str, ready: bool | None = None, sync: dict | None = None) -> None:
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    if sync is not None:
        kube.patch(Pod, name, {"metadata": {"annotations": {names.SYNC_ANNOTATION: json.dumps(sync)}}},
                   namespace=namespace, patch_type=PatchType.MERGE)
    if ready is not None:
        kube.patch(Pod.Status, name, {"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}},
            namespace=namespace, patch_type=PatchType.MERGE)



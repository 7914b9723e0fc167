"""Helpers of the sidecar api tests: upload adapter folders, write routes ConfigMaps as the operator
would, read the pod's sync report."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from lightkube import ApiError
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Pod

from lorafleet.contracts import names
from lorafleet.contracts.digest import directory_digest, regular_files
from lorafleet.contracts.routes import RouteEntry, RoutesTable, RouteVersion, SyncReport

POOL = "tiny"


def upload_dir(s3, bucket: str, src: Path, prefix: str) -> str:
    """Upload a directory's files under ``prefix``; return its s3:// URI."""
    for rel in regular_files(src):
        data = (src / rel).read_bytes()
        s3.put_object(bucket, f"{prefix}{rel}", io.BytesIO(data), len(data))
    return f"s3://{bucket}/{prefix}"


@dataclass
class Routes:
    """The pool's routes as the operator would write them (one ConfigMap, generation +1 per write)."""

    kube: object
    namespace: str
    pool: str = POOL
    table: RoutesTable = field(default=None)
    budget: int | None = None  # bytes per shard: small values force several ConfigMaps
    unwritten: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.table = RoutesTable(pool=self.pool)

    def set(self, name: str, versions: list[tuple[str, str, str, int]], tenant: str = "acme",
            preload: bool = True) -> None:
        """versions: (version, uri, sha256, weight); weight 0 marks it draining."""
        self.table.adapters[name] = RouteEntry(tenant=tenant, preload=preload, versions=[
            RouteVersion(version=v, uri=u, sha256=s, weight=w, draining=w == 0, since=self.table.generation + 1)
            for v, u, s, w in versions])

    def drop(self, name: str) -> None:
        self.table.adapters.pop(name, None)

    def write(self, only: set[str] | None = None) -> int:
        """Write the table at the next generation: every shard, or only the ConfigMaps named in
        ``only`` (the rest wait in ``unwritten`` for ``write_rest``, as if caught mid-write)."""
        self.table.generation += 1
        data = self.table.to_configmap_data(self.budget) if self.budget else self.table.to_configmap_data()
        self.unwritten = {n: t for n, t in data.items() if only is not None and n not in only}
        for cm_name, text in data.items():
            if cm_name not in self.unwritten:
                self._put(cm_name, text)
        return self.table.generation

    def write_rest(self) -> None:
        for cm_name, text in self.unwritten.items():
            self._put(cm_name, text)
        self.unwritten = {}

    def shard_names(self) -> list[str]:
        data = self.table.to_configmap_data(self.budget) if self.budget else self.table.to_configmap_data()
        return sorted(data)

    def _put(self, cm_name: str, text: str) -> None:
        cm = ConfigMap(metadata=ObjectMeta(name=cm_name, namespace=self.namespace,
                                           labels={names.LABEL_ROUTES_FOR: self.pool}),
                       data={names.ROUTES_KEY: text})
        try:
            self.kube.create(cm)
        except ApiError as e:
            if e.status.code != 409:
                raise
            self.kube.replace(cm)

    def delete_all(self) -> None:
        for cm in self.kube.list(ConfigMap, namespace=self.namespace, labels={names.LABEL_ROUTES_FOR: self.pool}):
            self.kube.delete(ConfigMap, cm.metadata.name, namespace=self.namespace)


def sync_report(kube, namespace: str, pod: str) -> SyncReport | None:
    p = kube.get(Pod, pod, namespace=namespace)
    return SyncReport.from_annotation((p.metadata.annotations or {}).get(names.SYNC_ANNOTATION))


def sidecar_argv(control_plane, minio_server, namespace, pod, cache_dir, runtime, *extra) -> list[str]:
    return ["--pool", POOL, "--namespace", namespace, "--pod", pod, "--cache-dir", str(cache_dir),
            "--runtime-admin-url", runtime.url, "--s3-endpoint", minio_server.endpoint,
            "--kubeconfig", str(control_plane.kubeconfig), "--metrics-port", "0", "--health-port", "0",
            "--poll-interval", "0.3",
            "--retry-base", "0.2", "--retry-max", "2", *extra]


def digest(d: Path) -> str:
    return directory_digest(d)

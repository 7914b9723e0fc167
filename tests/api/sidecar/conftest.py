"""Sidecar api-tier fixtures: a real kube-apiserver and MinIO (from tests/conftest.py), a stand-in
runtime admin API, a Pod object for the sidecar to report on, and helpers to push adapters and write
routes ConfigMaps."""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "unit" / "sidecar"))

from lightkube import ApiError  # noqa: E402
from lightkube.models.core_v1 import Container, PodSpec  # noqa: E402
from lightkube.models.meta_v1 import ObjectMeta  # noqa: E402
from lightkube.resources.core_v1 import ConfigMap, Pod  # noqa: E402

from lorafleet.contracts import names  # noqa: E402
from lorafleet.contracts.digest import directory_digest, regular_files  # noqa: E402
from lorafleet.contracts.routes import RouteEntry, RoutesTable, RouteVersion, SyncReport  # noqa: E402
from sidecar_standin_runtime import StandinRuntime  # noqa: E402

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

    def write(self) -> int:
        self.table.generation += 1
        for cm_name, text in self.table.to_configmap_data().items():
            cm = ConfigMap(metadata=ObjectMeta(name=cm_name, namespace=self.namespace,
                                               labels={names.LABEL_ROUTES_FOR: self.pool}),
                           data={names.ROUTES_KEY: text})
            try:
                self.kube.create(cm)
            except ApiError as e:
                if e.status.code != 409:
                    raise
                self.kube.replace(cm)
        return self.table.generation


@pytest.fixture
def pod(kube, namespace):
    """A real Pod object for the sidecar to annotate (no kubelet: it stays Pending)."""
    name = "lorafleet-tiny-0"
    kube.create(Pod(metadata=ObjectMeta(name=name, namespace=namespace),
                    spec=PodSpec(containers=[Container(name="runtime", image="lorafleet:test")])))
    return name


def sync_report(kube, namespace: str, pod: str) -> SyncReport | None:
    p = kube.get(Pod, pod, namespace=namespace)
    return SyncReport.from_annotation((p.metadata.annotations or {}).get(names.SYNC_ANNOTATION))


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture
def runtime(cache_dir):
    rt = StandinRuntime(cache_dir).start()
    yield rt
    rt.stop()


@pytest.fixture
def routes(kube, namespace):
    return Routes(kube, namespace)


def sidecar_argv(control_plane, minio_server, namespace, pod, cache_dir, runtime, *extra) -> list[str]:
    return ["--pool", POOL, "--namespace", namespace, "--pod", pod, "--cache-dir", str(cache_dir),
            "--runtime-admin-url", runtime.url, "--s3-endpoint", minio_server.endpoint,
            "--kubeconfig", str(control_plane.kubeconfig), "--metrics-port", "0", "--poll-interval", "0.3",
            "--retry-base", "0.2", "--retry-max", "2", *extra]


@pytest.fixture
def start_sidecar(control_plane, minio_server, namespace, pod, cache_dir, runtime, monkeypatch):
    """Start an in-process sidecar (the same code ``lorafleet sidecar`` runs) with extra flags."""
    from lorafleet.sidecar.app import Sidecar
    from lorafleet.sidecar.cli import parse_args

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_server.secret_key)
    started = []

    def start(*extra: str) -> Sidecar:
        args = parse_args(sidecar_argv(control_plane, minio_server, namespace, pod, cache_dir, runtime, *extra))
        sc = Sidecar.from_args(args).start()
        started.append(sc)
        return sc

    yield start
    for sc in started:
        sc.stop()


def digest(d: Path) -> str:
    return directory_digest(d)

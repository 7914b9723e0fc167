"""Sidecar api-tier fixtures: a real kube-apiserver and MinIO (from tests/conftest.py), a stand-in
runtime admin API, a Pod object for the sidecar to report on, and an in-process sidecar."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightkube.models.core_v1 import Container, PodSpec  # noqa: E402
from lightkube.models.meta_v1 import ObjectMeta  # noqa: E402
from lightkube.resources.core_v1 import Pod  # noqa: E402

from sidecar_api_support import Routes, sidecar_argv  # noqa: E402
from sidecar_standin_runtime import StandinRuntime  # noqa: E402


@pytest.fixture
def pod(kube, namespace):
    """A real Pod object for the sidecar to annotate (no kubelet: it stays Pending)."""
    name = "lorafleet-tiny-0"
    kube.create(Pod(metadata=ObjectMeta(name=name, namespace=namespace),
                    spec=PodSpec(containers=[Container(name="runtime", image="lorafleet:test")])))
    return name


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



"""Fixtures shared by every tier.

tests/unit  no processes
tests/api   a real etcd + kube-apiserver + kube-controller-manager and a real MinIO, on loopback
tests/e2e   the whole local stack

A test that needs a server binary that is not built fails; it never skips (run
tools/install-test-tools first: the README's test command does).
"""

from __future__ import annotations

import os
import secrets
import uuid
from pathlib import Path

import pytest

from lorafleet.localstack.tools import ToolMissing, require_tool

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"


def need(*tools: str) -> None:
    for t in tools:
        try:
            require_tool(t)
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _control_plane(folder, apiserver_args=(), controller_manager: bool = True, gateway_api: bool = True):
    """A started ControlPlane with lorafleet's CRDs (and the Gateway API's) established; stopped when
    the generator ends."""
    need("etcd", "kube-apiserver", "kubectl", *(["kube-controller-manager"] if controller_manager else []))
    from lorafleet.localstack.controlplane import ControlPlane
    from lorafleet.localstack.tools import gateway_api_crds

    crds = [CRDS]
    if gateway_api:
        try:
            crds.append(gateway_api_crds())
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)
    cp = ControlPlane(folder, apiserver_args=list(apiserver_args))
    try:
        cp.start(controller_manager=controller_manager)
        for folder_or_file in crds:
            cp.kubectl("apply", "--server-side", "-f", str(folder_or_file))
        cp.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager with lorafleet's CRDs and the Gateway API's
    (standard channel: HTTPRoute, Gateway, ...) installed."""
    yield from _control_plane(tmp_path_factory.mktemp("controlplane"))


@pytest.fixture(scope="session")
def kube(control_plane):
    """A lightkube client with the admin kubeconfig."""
    from lightkube import Client, KubeConfig

    return Client(config=KubeConfig.from_file(str(control_plane.kubeconfig)), field_manager="lorafleet-tests")


@pytest.fixture
def namespace(control_plane, kube):
    """A fresh namespace per test, so tests never see each other's objects."""
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.create(Namespace(metadata=ObjectMeta(name=name)))
    yield name
    kube.delete(Namespace, name)


@pytest.fixture(scope="module")
def uncached_control_plane(tmp_path_factory):
    """An API server of the module's own, without a watch cache and without a controller manager:
    compacting its etcd (``support.apiserver_faults.compact_etcd``) expires every watch at once (the
    shared control plane's watch cache would serve them for minutes), and its /metrics counts only
    the module's own requests."""
    yield from _control_plane(tmp_path_factory.mktemp("uncached"), ["--watch-cache=false"], controller_manager=False,
                              gateway_api=False)


@pytest.fixture(scope="module")
def uncached_kube(uncached_control_plane):
    from lightkube import Client, KubeConfig

    return Client(config=KubeConfig.from_file(str(uncached_control_plane.kubeconfig)), field_manager="tests")


@pytest.fixture(scope="session")
def minio_server(tmp_path_factory):
    need("minio")
    from lorafleet.localstack.minio import MinioServer

    server = MinioServer(tmp_path_factory.mktemp("minio")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3(minio_server):
    """A ``minio.Minio`` client for the test server."""
    from minio import Minio

    return Minio(f"127.0.0.1:{minio_server.port}", access_key=minio_server.access_key,
                 secret_key=minio_server.secret_key, secure=False)


@pytest.fixture
def bucket(s3):
    name = f"b-{secrets.token_hex(6)}"
    s3.make_bucket(name)
    return name


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# Real models and tenant adapters, built once per session and shared by the runtime's unit and HTTP
# tests (and anyone else who needs a base model with adapters).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from support.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gen_adapters(tiny_llama, tmp_path_factory):
    from support.models import make_generation_suite

    return make_generation_suite(tiny_llama, tmp_path_factory.mktemp("gen-adapters"), 8)


@pytest.fixture(scope="session")
def minilm():
    from support.models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def cls_adapters(minilm, tmp_path_factory):
    from support.models import make_classification_suite

    return make_classification_suite(minilm, tmp_path_factory.mktemp("cls-adapters"), 8)

"""The vLLM engine in the whole local stack. The tier's own: this process is the main virtualenv (the
operator, the node, the sidecars, the PEFT oracle), and the pod runner runs the containers of the vLLM
runtime image from the vLLM virtualenv (``LORAFLEET_VLLM_VENV``, which make test sets to tools/venv-vllm).
Without it, or without the stack's tools, it fails, never skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

VLLM_VENV_ENV = "LORAFLEET_VLLM_VENV"


@pytest.fixture(scope="session")
def vllm_bin() -> Path:
    venv = os.environ.get(VLLM_VENV_ENV)
    if not venv or not (Path(venv) / "bin" / "lorafleet").exists():
        pytest.fail(f"{VLLM_VENV_ENV} must name the vLLM virtualenv (with lorafleet installed): "
                    f"{VLLM_VENV_ENV}=$(tools/venv-vllm) (make test sets it)", pytrace=False)
    return Path(venv) / "bin"


@pytest.fixture(scope="session")
def stack(tmp_path_factory, vllm_bin):
    from lorafleet.contracts import names
    from lorafleet.localstack.stack import Stack
    from lorafleet.localstack.tools import ToolMissing, require_tool

    for tool in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "minio"):
        try:
            require_tool(tool)
        except ToolMissing as e:
            pytest.fail(str(e), pytrace=False)
    # vLLM's CPU build sizes its KV cache by this (GiB); the pods' processes inherit it.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    repo = names.DEFAULT_RUNTIME_VLLM_IMAGE.rsplit(":", 1)[0]
    root = tmp_path_factory.mktemp("vllm-stack")
    s = Stack(root)
    try:
        state = s.start(ingress_default=None, gateway_host=None, chat_host=None, image_bins={repo: vllm_bin})
        yield s, state
    finally:
        s.down(quiet=True)

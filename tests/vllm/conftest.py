"""The vLLM engine's tier: it runs in its own virtualenv (tools/venv-vllm: vLLM's pins conflict with
requirements.lock), on vLLM's CPU build here and vLLM itself on a GPU. Without vLLM it fails, never skips."""

from __future__ import annotations

import importlib.util
import os

import pytest

# vLLM's CPU build sizes its KV cache by this (GiB); the GPU share is for a GPU run on a shared card.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION", "0.3")


@pytest.fixture(autouse=True, scope="session")
def _needs_vllm():
    spec = importlib.util.find_spec("vllm")
    if spec is None or spec.origin is None:  # None: this folder itself, as a namespace package
        pytest.fail("vLLM is not installed in this virtualenv: run tests/vllm with $(tools/venv-vllm)/bin/python "
                    "(make test does)", pytrace=False)


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """The tiny seeded Llama every test of this tier serves (head_dim 64: a head size vLLM's CPU attention
    kernels take)."""
    from support.models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("vllm-llama"), hidden=256, layers=2, heads=4, kv_heads=2,
                           seed=3)

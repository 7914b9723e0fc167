"""Shared models and tenant adapters for the runtime's HTTP tests (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from lorafleet.runtime.testing_models import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gen_adapters(tiny_llama, tmp_path_factory):
    from lorafleet.runtime.testing_models import make_generation_suite

    return make_generation_suite(tiny_llama, tmp_path_factory.mktemp("gen-adapters"), 8)


@pytest.fixture(scope="session")
def minilm():
    from lorafleet.runtime.testing_models import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def cls_adapters(minilm, tmp_path_factory):
    from lorafleet.runtime.testing_models import make_classification_suite

    return make_classification_suite(minilm, tmp_path_factory.mktemp("cls-adapters"), 8)


@pytest.fixture(scope="session")
def gen_adapters20(tiny_llama, tmp_path_factory):
    """20 tenants' generation adapters plus a second version of gen15 (for a rollout during traffic)."""
    from lorafleet.runtime.testing_models import make_generation_adapter, make_generation_suite

    root = tmp_path_factory.mktemp("gen20")
    out = make_generation_suite(tiny_llama, root, 20)
    out["gen15@2"] = make_generation_adapter(tiny_llama, root / "gen15-v2", seed=999, r=4, alpha=8)
    return out


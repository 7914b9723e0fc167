"""Shared models and tenant adapters for the runtime's unit tests (built once per session)."""

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

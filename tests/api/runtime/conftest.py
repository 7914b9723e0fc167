"""Adapters only the runtime's HTTP tests use (the shared models and suites are in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def gen_adapters20(tiny_llama, tmp_path_factory):
    """20 tenants' generation adapters plus a second version of gen15 (for a rollout during traffic)."""
    from support.models import make_generation_adapter, make_generation_suite

    root = tmp_path_factory.mktemp("gen20")
    out = make_generation_suite(tiny_llama, root, 20)
    out["gen15@2"] = make_generation_adapter(tiny_llama, root / "gen15-v2", seed=999, r=4, alpha=8)
    return out


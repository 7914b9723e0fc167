"""The KV cache is sized by maxModelLen x maxBatchSize, never by the model's full context: a model with
131,072 positions starts small, a request over the length is refused naming both lengths, a length
over the model's is refused at startup, and what the engine holds is reported on /metrics."""

from __future__ import annotations

import pytest

from lorafleet.contracts.names import RuntimeEnv
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.operator import manifests
from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engines import DEFAULT_MAX_MODEL_LEN, GenerationEngine
from lorafleet.runtime.settings import RuntimeSettings
from support.models import make_tiny_llama

LONG = 131_072


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    # 4 layers: the full context at 32 rows would be a 4 GiB cache, over the 3 GiB this must start in.
    return make_tiny_llama(tmp_path_factory.mktemp("long-llama"), max_len=LONG, layers=4)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _kv_bytes(rows: int, positions: int, layers: int = 2) -> int:
    kv_heads, head_dim, fp32 = 2, 16, 4  # make_tiny_llama's shape
    return 2 * layers * rows * kv_heads * positions * head_dim * fp32


def test_a_131072_position_model_starts_small_with_the_default_length(long_llama):
    before = _rss_bytes()
    engine = GenerationEngine.from_dir(long_llama, max_seqs=32)
    grown = _rss_bytes() - before
    assert engine.model_len == LONG and engine.max_len == DEFAULT_MAX_MODEL_LEN
    assert engine.max_input_tokens() == DEFAULT_MAX_MODEL_LEN
    assert engine.kv_cache_bytes == _kv_bytes(32, DEFAULT_MAX_MODEL_LEN, 4)  # 256 MiB; the full context: 4 GiB
    assert grown < 3 * 2**30, f"resident memory grew by {grown / 2**30:.2f} GiB"
    mem = engine.memory_bytes()
    assert mem["kv_cache"] == engine.kv_cache_bytes and 0 < mem["weights"] < 2**20 and mem["adapter_slots"] == 0


def test_max_model_len_sizes_the_cache_and_above_the_models_length_is_refused(long_llama, tiny_llama):
    engine = GenerationEngine.from_dir(long_llama, max_seqs=4, max_len=64)
    assert engine.max_input_tokens() == 64 and engine.kv_cache_bytes == _kv_bytes(4, 64, 4)
    with pytest.raises(UnsupportedModel, match="maxModelLen 257 is above the model's max_position_embeddings 256"):
        GenerationEngine.from_dir(tiny_llama, max_seqs=2, max_len=257)


def test_a_request_over_max_model_len_is_a_400_naming_both_lengths(tiny_llama):
    from lorafleet.runtime.engine_api import SamplingParams
    from lorafleet.runtime.generation import build_sequence
    from lorafleet.runtime.protocol import ApiError
    from lorafleet.runtime.torch_engine import TorchEngine

    settings = RuntimeSettings.from_env({RuntimeEnv.MAX_MODEL_LEN: "32"}, model_dir=str(tiny_llama))
    engine = TorchEngine.from_dir(tiny_llama, "text-generation", settings)
    assert engine.max_input_tokens() == 32
    build_sequence(engine, list(range(3, 23)), SamplingParams(max_new_tokens=12), 16)  # 20 + 12 fits
    with pytest.raises(ApiError) as e:
        build_sequence(engine, list(range(3, 23)), SamplingParams(max_new_tokens=13), 16)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"
    assert "maximum context length is 32 tokens; the prompt has 20 tokens and max_tokens is 13" in e.value.message


def test_the_engines_memory_is_on_metrics(tiny_llama):
    from lorafleet.runtime.lifecycle import Runtime

    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(tiny_llama), max_batch_size=4, max_model_len=100))
    rt.load()
    try:
        text = rt.metrics.render().decode()
    finally:
        rt.close()
    assert f'lorafleet_runtime_engine_memory_bytes{{part="kv_cache"}} {float(_kv_bytes(4, 100))}' in text
    assert 'lorafleet_runtime_engine_memory_bytes{part="weights"}' in text


def test_max_model_len_from_the_pool_spec_env_and_flag():
    spec = BaseModelPoolSpec.model_validate({
        "model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"},
        "runtime": {"maxModelLen": 4096}, "storage": {"endpoint": "http://minio:9000"}})
    env = {e["name"]: e["value"] for e in manifests.runtime_env("gen", spec)}
    assert env[RuntimeEnv.MAX_MODEL_LEN] == "4096"
    unset = spec.model_copy(update={"runtime": spec.runtime.model_copy(update={"max_model_len": None})})
    assert RuntimeEnv.MAX_MODEL_LEN not in {e["name"] for e in manifests.runtime_env("gen", unset)}
    assert RuntimeSettings.from_env(env).max_model_len == 4096

    import argparse

    from lorafleet.contracts.settings import add_flags

    p = argparse.ArgumentParser()
    add_flags(p, RuntimeSettings)
    assert RuntimeSettings.from_args(p.parse_args(["--max-model-len", "2048"])).max_model_len == 2048
    with pytest.raises(ValueError, match="LORAFLEET_MAX_MODEL_LEN='-1': expected an integer of at least 0"):
        RuntimeSettings.from_env({RuntimeEnv.MAX_MODEL_LEN: "-1"})

"""A quantized base (bitsandbytes int8 / NF4): a mixed multi-tenant batch decodes the greedy tokens PEFT
decodes over the same quantized base, one adapter at a time; the base's weight bytes before and after
quantization are logged and on /metrics; what cannot run is refused at startup naming what to use."""

from __future__ import annotations

import argparse
import logging

import bitsandbytes as bnb  # pinned in requirements.lock: a missing package fails here, it is not skipped
import pytest
import torch

from lorafleet.contracts.names import RuntimeEnv
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.operator import manifests
from lorafleet.runtime.engines import GenerationEngine, Sequence
from lorafleet.runtime.quantization import UnsupportedQuantization, quantized_layers
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterManager
from support.models import PeftOracle, make_generation_suite, make_tiny_llama

PROMPTS = ["hello world , how are", "the quick brown fox", "please refund me", "my order has not arrived , please",
           "one two three", "support billing", "great product , thanks !", "the invoice is wrong .", "red green"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def qllama(tmp_path_factory):
    # Every linear's output size a multiple of 32: bitsandbytes' NF4 kernel on AVX512-BF16 CPUs needs it.
    return make_tiny_llama(tmp_path_factory.mktemp("q-llama"), intermediate=192, seed=3)


@pytest.fixture(scope="module")
def qadapters(qllama, tmp_path_factory):
    # Eight tenants: mixed ranks, alphas, rsLoRA, patterns, attention and MLP targets.
    return make_generation_suite(qllama, tmp_path_factory.mktemp("q-adapters"), 8)


def _engine(model_dir, adapters, quantization):
    engine = GenerationEngine.from_dir(model_dir, device_slots=8, max_seqs=16, quantization=quantization)
    manager = AdapterManager("text-generation", 16)
    engine.bind(manager)
    entries = {}
    for name, path in adapters.items():
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert entry.error is None, entry.error
        entries[name] = entry
    return engine, entries


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_a_mixed_batch_over_a_quantized_base_decodes_peft_greedy_tokens(qllama, qadapters, quantization):
    engine, entries = _engine(qllama, qadapters, quantization)
    layers = quantized_layers(engine.model)
    kind = bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit
    assert len(layers) == 2 * 7 and all(isinstance(m, kind) for m in layers.values()), "every decoder linear"
    assert isinstance(engine.model.lm_head, torch.nn.Linear) and "lm_head" not in layers

    oracle = PeftOracle(qllama, "text-generation", quantization=quantization)
    names = list(qadapters) + [None]  # the last row is the quantized base alone (slot 0)
    seqs = []
    for name, prompt in zip(names, PROMPTS):
        slot = engine.acquire(entries[name] if name else None)
        seqs.append(Sequence(prompt=oracle.tok(prompt)["input_ids"], max_new_tokens=NEW_TOKENS, slot=slot))
    assert len({s.slot for s in seqs}) == 9, "every row is a different adapter"
    engine.prefill(seqs)
    for _ in range(NEW_TOKENS - 1):
        engine.decode(seqs)

    for i, (name, s) in enumerate(zip(names, seqs)):
        want = oracle.greedy(qadapters[name] if name else None, PROMPTS[i], NEW_TOKENS)
        assert s.generated == want, f"greedy tokens of row {i} ({name}) over the {quantization} base"

    # The same quantization call: the oracle's quantized weights are the engine's, byte for byte.
    # (After one forward each: NF4 layers on AVX512-BF16 CPUs repack their weights on first use.)
    base = oracle._model(None)
    with torch.inference_mode():
        base(input_ids=torch.zeros((1, 1), dtype=torch.long))
    ref = quantized_layers(base)
    for path, layer in layers.items():
        torch.testing.assert_close(layer.weight.data, ref[path].weight.data, rtol=0, atol=0, msg=path)
        if quantization == "nf4":
            torch.testing.assert_close(layer.weight.quant_state.absmax, ref[path].weight.quant_state.absmax,
                                       rtol=0, atol=0, msg=f"{path} block scales")


def test_the_quantized_base_differs_from_the_unquantized_one(qllama, qadapters):
    """The check above is not vacuous: over NF4 the base's logits move away from the float32 model's."""
    logits = {}
    for q in ("none", "nf4"):
        engine, _ = _engine(qllama, {}, q)
        seq = Sequence(prompt=engine.tokenizer(PROMPTS[0])["input_ids"], max_new_tokens=2)
        engine.prefill([seq])
        logits[q] = engine.last_logits[0]
    assert (logits["none"] - logits["nf4"]).abs().max() > 1e-3


def test_the_base_weights_before_and_after_quantization_are_logged_and_on_metrics(qllama, caplog):
    from lorafleet.runtime.lifecycle import Runtime

    sizes = {}
    for q in ("none", "int8", "nf4"):
        rt = Runtime(RuntimeSettings.from_env({RuntimeEnv.QUANTIZATION: q}, model_dir=str(qllama), max_batch_size=2,
                                              max_model_len=32))
        with caplog.at_level(logging.INFO, logger="lorafleet.runtime"):
            rt.load()
        try:
            text = rt.metrics.render().decode()
        finally:
            rt.close()
        quant, loaded, unquantized = rt.engine.base_weights()
        assert quant == q
        assert f'lorafleet_runtime_base_weights_bytes{{form="loaded",quantization="{q}"}} {float(loaded)}' in text
        assert f'lorafleet_runtime_base_weights_bytes{{form="unquantized",quantization="{q}"}} ' \
               f'{float(unquantized)}' in text
        assert f'lorafleet_runtime_engine_memory_bytes{{part="weights"}} {float(loaded)}' in text
        sizes[q] = loaded, unquantized
    assert sizes["none"][0] == sizes["none"][1] == sizes["int8"][1] == sizes["nf4"][1]
    # 14 linears of the 2 decoder layers hold 2 x (4 x 64 x 64 ... ) floats; embeddings and head stay float32.
    linear = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 192) * 4
    assert sizes["none"][0] - sizes["int8"][0] >= linear * 3 // 4 * 0.95, "int8: a byte per weight (+ row scales)"
    assert sizes["none"][0] - sizes["nf4"][0] >= linear * 7 // 8 * 0.90, "nf4: half a byte per weight (+ scales)"
    logged = [r.getMessage() for r in caplog.records if "unquantized" in r.getMessage()]
    assert any("nf4 weights" in m and f"{sizes['nf4'][1] / 2**20:.1f} MiB unquantized" in m for m in logged), logged


def test_what_cannot_run_quantized_is_refused_at_startup_naming_what_to_use(tmp_path, tiny_llama):
    odd = make_tiny_llama(tmp_path / "odd", intermediate=176, with_tokenizer=True)  # 176 outputs: 32 does not divide
    probe = bnb.nn.Linear4bit(64, 64)
    if getattr(probe, "support_avx512bf16_for_cpu", False):
        with pytest.raises(UnsupportedQuantization, match=r"nf4 on this CPU .* multiple of 32; not: "
                                                          r"model\.layers\.0\.mlp\.gate_proj \(176 outputs\).*"
                                                          r"use quantization int8 or none"):
            GenerationEngine.from_dir(odd, max_seqs=2, quantization="nf4")
    else:  # a CPU without that kernel takes the shape
        assert GenerationEngine.from_dir(odd, max_seqs=2, quantization="nf4").quantization == "nf4"
    with pytest.raises(UnsupportedQuantization, match="not supported for text-to-image pools by the torch engine.*"
                                                      "set quantization none"):
        from lorafleet.runtime.quantization import check_supported

        check_supported("nf4", "text-to-image", "cpu")
    with pytest.raises(UnsupportedQuantization, match="runs on cpu or cuda devices, not 'mps'"):
        GenerationEngine.from_dir(tiny_llama, max_seqs=2, quantization="int8", device="mps")
    with pytest.raises(ValueError, match="LORAFLEET_QUANTIZATION='fp8': expected one of none, int8, nf4"):
        RuntimeSettings.from_env({RuntimeEnv.QUANTIZATION: "fp8"})


def test_quantization_from_the_pool_spec_env_and_flag():
    spec = BaseModelPoolSpec.model_validate({
        "model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation", "quantization": "nf4"},
        "storage": {"endpoint": "http://minio:9000"}})
    env = {e["name"]: e["value"] for e in manifests.runtime_env("gen", spec)}
    assert env[RuntimeEnv.QUANTIZATION] == "nf4"
    assert RuntimeSettings.from_env(env).quantization == "nf4"
    default = BaseModelPoolSpec.model_validate({"model": {"uri": "s3://m/", "sha256": "a" * 64,
                                                          "task": "text-generation"}})
    assert {e["name"]: e["value"] for e in manifests.runtime_env("gen", default)}[RuntimeEnv.QUANTIZATION] == "none"
    with pytest.raises(ValueError, match="quantization"):
        BaseModelPoolSpec.model_validate({"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation",
                                                    "quantization": "int4"}})

    from lorafleet.contracts.settings import add_flags

    p = argparse.ArgumentParser()
    add_flags(p, RuntimeSettings)
    assert RuntimeSettings.from_args(p.parse_args(["--quantization", "int8"])).quantization == "int8"

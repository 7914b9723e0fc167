"""Every architecture the generation engine accepts answers exactly as Hugging Face: greedy tokens of a
batch (rows of different lengths, each its own adapter or the base) equal HF ``generate`` on the base
and PEFT's ``generate`` with that row's adapter alone. What it cannot compute exactly is refused when
the engine is built, with the reason."""

from __future__ import annotations

import pytest
import torch

from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engines import GenerationEngine, Sequence
from support.models import PeftOracle, bind_adapters, build_tokenizer, make_generation_adapter

# 4 to 31 tokens: with a window of 8, the short prompts start inside it and decode past it, the long
# ones are past it from the prefill on.
PROMPTS = ["red green", "one two three four five six seven eight nine ten red green blue cat dog",
           "the quick brown fox", "please refund me , my order has not arrived , the invoice is wrong ."]
NEW_TOKENS = 14
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
COMMON = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=256, initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _configs():
    from transformers import (Gemma2Config, Gemma3TextConfig, GemmaConfig, GraniteConfig, LlamaConfig, MinistralConfig, MistralConfig,
                              Olmo2Config, Olmo3Config, Phi3Config, Qwen2Config, Qwen3Config, Starcoder2Config)

    alternating = ["sliding_attention", "full_attention", "sliding_attention"]

    return {
        "llama": (LlamaConfig(**COMMON, num_hidden_layers=2, tie_word_embeddings=False), ATTN + MLP),
        "llama-rope-llama3": (LlamaConfig(**COMMON, num_hidden_layers=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}), ATTN),
        "mistral-window-8": (MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=8), ATTN + MLP),
        "ministral-window-8": (MinistralConfig(**COMMON, num_hidden_layers=3, sliding_window=8,
                                               layer_types=alternating), ATTN + MLP),
        "qwen2-window-8": (Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                       max_window_layers=1), ATTN),
        "qwen3": (Qwen3Config(**COMMON, num_hidden_layers=2), ATTN + MLP),
        "qwen3-rope-yarn": (Qwen3Config(**COMMON, num_hidden_layers=2, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}), ATTN),
        "gemma": (GemmaConfig(**COMMON, num_hidden_layers=2), ATTN + MLP),
        # Soft caps low enough to bite on a tiny model, query_pre_attn_scalar unlike head_dim.
        "gemma2-window-8": (Gemma2Config(**COMMON, num_hidden_layers=3, tie_word_embeddings=False, sliding_window=8, query_pre_attn_scalar=24,
                                         attn_logit_softcapping=1.5, final_logit_softcapping=2.0), ATTN + MLP),
        "gemma3-window-8": (Gemma3TextConfig(**COMMON, num_hidden_layers=3, tie_word_embeddings=False, sliding_window=8, query_pre_attn_scalar=24,
                                             final_logit_softcapping=2.0,
                                             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                            ATTN + MLP),
        "granite": (GraniteConfig(**COMMON, num_hidden_layers=2, embedding_multiplier=6.0, residual_multiplier=0.5,
                                  attention_multiplier=0.2, logits_scaling=4.0), ATTN + MLP),
        "olmo2": (Olmo2Config(**COMMON, num_hidden_layers=2), ATTN + MLP),
        "olmo3-window-8": (Olmo3Config(**COMMON, num_hidden_layers=3, sliding_window=8, layer_types=alternating),
                           ATTN + MLP),
        "starcoder2-window-8": (Starcoder2Config(**COMMON, num_hidden_layers=2, sliding_window=8), ATTN + ("c_fc", "c_proj")),
        "phi3-window-8": (Phi3Config(**COMMON, num_hidden_layers=2, sliding_window=8,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}),
                          ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    }


CONFIGS = _configs()


def _save(cfg, out):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["apart", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_greedy_equals_hf_and_peft_per_row(name, packed, tmp_path):
    """apart: one prefill of every row, then decode steps; packed: two rows start, and the other three are
    prefilled in the same forward as the first two's decode step (``GenerationEngine.step``)."""
    cfg, targets = CONFIGS[name]
    base = _save(cfg, tmp_path / "base")
    adapters = [make_generation_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=4 + 4 * i, alpha=16,
                                        targets=targets[i::2] if i else targets) for i in range(2)]
    engine = GenerationEngine.from_dir(base, device_slots=4, max_seqs=8)
    entries = list(bind_adapters(engine, "text-generation", {f"a{i}": p for i, p in enumerate(adapters)}).values())
    rows = [(None, PROMPTS[0]), (0, PROMPTS[1]), (1, PROMPTS[2]), (0, PROMPTS[3]), (None, PROMPTS[1])]
    oracle = PeftOracle(base, "text-generation")
    seqs = [Sequence(prompt=oracle.tok(p)["input_ids"], max_new_tokens=NEW_TOKENS,
                     slot=engine.acquire(None if a is None else entries[a])) for a, p in rows]
    assert max(len(s.prompt) for s in seqs) > 8 > min(len(s.prompt) for s in seqs)
    first = 2 if packed else 0  # the rows whose prefill logits are checked start here
    if packed:
        engine.prefill(seqs[:first])
        engine.step(seqs[first:], seqs[:first])
        prefill_logits = engine.last_logits[first:]  # the decode rows first, then the new ones
    else:
        engine.prefill(seqs)
        prefill_logits = engine.last_logits
    # Logits too (sampling sees them; a final soft-cap never changes the argmax): base rows vs HF.
    hf = oracle._model(None)
    for i, (a, _) in enumerate(rows):
        if a is None and i >= first:
            with torch.inference_mode():
                ref = hf(input_ids=torch.tensor([seqs[i].prompt])).logits[0, -1]
            torch.testing.assert_close(prefill_logits[i - first], ref, atol=1e-4, rtol=1e-4,
                                       msg=f"{name}: row {i}")
    for _ in range(NEW_TOKENS - 1):
        engine.decode(seqs)
    refs = []
    for i, ((a, prompt), s) in enumerate(zip(rows, seqs)):
        refs.append(oracle.greedy(None if a is None else adapters[a], prompt, NEW_TOKENS))
        # HF stops at EOS; the engine ran every step here: compare what HF produced.
        assert s.generated[:len(refs[-1])] == refs[-1], f"{name}: row {i} (adapter {a})"
    assert len({t for r in refs for t in r}) > 10, f"a degenerate reference proves nothing: {refs}"


def test_rope_that_rescales_with_length_is_refused(tmp_path):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**COMMON, num_hidden_layers=1, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                      "factor": 2.0})
    with pytest.raises(UnsupportedModel, match="rope_type 'dynamic'"):
        GenerationEngine.from_dir(_save(cfg, tmp_path / "m"), max_seqs=2)


def test_unknown_architecture_is_refused_before_its_weights_load(tmp_path):
    from transformers import GPT2Config

    cfg = GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64)
    with pytest.raises(UnsupportedModel) as e:
        GenerationEngine.from_dir(_save(cfg, tmp_path / "gpt2"), max_seqs=2)
    assert "GPT2LMHeadModel" in str(e.value) and "Supported: Llama, Mistral" in str(e.value)


def test_moe_is_refused_with_its_reason(tmp_path):
    from transformers import MixtralConfig

    cfg = MixtralConfig(**COMMON, num_hidden_layers=1, num_local_experts=2, num_experts_per_tok=1)
    with pytest.raises(UnsupportedModel, match="MixtralForCausalLM .*mixture-of-experts"):
        GenerationEngine.from_dir(_save(cfg, tmp_path / "moe"), max_seqs=2)


def test_a_refused_model_is_the_runtimes_readiness_reason(tmp_path):
    from transformers import GPT2Config

    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.settings import RuntimeSettings

    model = _save(GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64), tmp_path / "gpt2")
    rt = Runtime(RuntimeSettings.from_env({}, model_dir=str(model), task="text-generation"))
    rt.load_in_background().join(timeout=60)
    ok, why = rt.ready()
    assert not ok and "GPT2LMHeadModel cannot be served by the text-generation engine" in why

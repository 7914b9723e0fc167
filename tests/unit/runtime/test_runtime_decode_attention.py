"""A 16-bit pool on CPU decodes with HF's eager attention arithmetic (torch's CPU SDPA kernel is several times
slower for one query per row in bfloat16; docs/benchmarks.md): bit for bit what transformers computes there."""

from __future__ import annotations

import types

import pytest
import torch

from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.engines import GenerationEngine, Sequence, _eager_decode_attention
from lorafleet.runtime.tiers import AdapterManager
from support.models import PeftOracle

PROMPTS = ["hello world , how are", "the quick brown fox", "please refund me", "my order has not arrived , please",
           "one two three", "support billing", "great product , thanks !", "the invoice is wrong .", "red green"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_is_transformers_eager_attention_bit_for_bit(dtype, window):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    g = torch.Generator().manual_seed(0)
    n, heads, kv, d, span = 9, 8, 2, 16, 23  # 4 query heads per key head; rows of different lengths
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in
               ((n, heads, 1, d), (n, kv, span, d), (n, kv, span, d)))
    pos = torch.randint(0, span, (n,), generator=g)
    pos[0] = span - 1
    keys = torch.arange(span)[None, :]
    ok = keys <= pos[:, None]
    if window is not None:
        ok = ok & (keys > pos[:, None] - window)
    mask = ok[:, None, None, :]
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)  # HF's form
    ref, _ = eager_attention_forward(types.SimpleNamespace(num_key_value_groups=heads // kv, training=False),
                                     q, k, v, additive, scaling=d ** -0.5)
    ours = _eager_decode_attention(q, k, v, mask, d ** -0.5, heads // kv)
    assert torch.equal(ours.transpose(1, 2), ref)


def test_a_bfloat16_mixed_batch_follows_peft_within_bfloat16_rounding(tiny_llama, gen_adapters):
    """Teacher-forced (each step's input is the engine's own token), every decode step's logits of every row
    are PEFT's in bfloat16 with HF's eager attention, to bfloat16's rounding of a batched computation
    (logits of magnitude about 2.5, bfloat16 steps of 1/64 there; a wrong mask or head grouping is off by 1
    or more)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_seqs=16, dtype="bfloat16")
    manager = AdapterManager("text-generation", 16, dtype=engine.dtype)
    engine.bind(manager)
    names = list(gen_adapters) + [None]
    tok = PeftOracle(tiny_llama, "text-generation").tok
    seqs = []
    for name, prompt in zip(names, PROMPTS):
        slot = 0
        if name:
            entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(gen_adapters[name]), sha256="0" * 64,
                                                                       tenant=name))
            slot = engine.acquire(entry)
        seqs.append(Sequence(prompt=tok(prompt)["input_ids"], max_new_tokens=8, slot=slot))
    engine.prefill(seqs)
    steps = []
    for _ in range(7):
        engine.decode(seqs)
        steps.append(engine.last_logits.float().clone())
    for i, (name, s) in enumerate(zip(names, seqs)):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.bfloat16, attn_implementation="eager")
        if name:
            model = PeftModel.from_pretrained(model, str(gen_adapters[name]))
        with torch.inference_mode():
            ref = model.eval()(input_ids=torch.tensor([s.prompt + s.generated[:-1]])).logits[0].float()
        for k, logits in enumerate(steps):
            torch.testing.assert_close(logits[i], ref[len(s.prompt) + k], atol=0.3, rtol=0.05,
                                       msg=f"bfloat16 decode step {k}, row {i} ({name})")

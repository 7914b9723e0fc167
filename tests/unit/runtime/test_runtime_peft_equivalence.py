"""PEFT is the oracle: every row of a mixed multi-tenant batch equals PEFT with that row's adapter alone."""

from __future__ import annotations

import random

import torch

from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.engines import ClassificationEngine, GenerationEngine, Sequence
from lorafleet.runtime.tiers import AdapterManager
from support.models import PeftOracle

PROMPTS = ["hello world , how are", "the quick brown fox", "please refund me", "my order has not arrived , please",
           "one two three", "support billing", "great product , thanks !", "the invoice is wrong .", "red green"]


def _register(manager, adapters):
    entries = {}
    for name, path in adapters.items():
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert entry.error is None, entry.error
        entries[name] = entry
    return entries


def test_mixed_generation_batch_matches_peft_per_row(tiny_llama, gen_adapters):
    torch.manual_seed(0)
    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_seqs=16)
    manager = AdapterManager("text-generation", 16)
    engine.bind(manager)
    entries = _register(manager, gen_adapters)
    names = list(gen_adapters) + [None]  # the last row uses the base model (slot 0)
    oracle = PeftOracle(tiny_llama, "text-generation")
    seqs = []
    for name, prompt in zip(names, PROMPTS):
        slot = engine.acquire(entries[name] if name else None)
        seqs.append(Sequence(prompt=oracle.tok(prompt)["input_ids"], max_new_tokens=10, slot=slot))
    assert len({s.slot for s in seqs}) == 9, "every row is a different adapter"

    engine.prefill(seqs)
    prefill_logits = engine.last_logits.clone()
    step_logits = []
    for _ in range(9):
        engine.decode(seqs)
        step_logits.append(engine.last_logits.clone())

    for i, (name, s) in enumerate(zip(names, seqs)):
        adapter = gen_adapters[name] if name else None
        model = oracle._model(adapter)
        full = torch.tensor([s.prompt + s.generated[:-1]])
        with torch.inference_mode():
            ref = model(input_ids=full).logits[0].float()
        p = len(s.prompt)
        torch.testing.assert_close(prefill_logits[i], ref[p - 1], atol=1e-4, rtol=1e-4,
                                   msg=f"prefill logits of row {i} ({name})")
        for k, logits in enumerate(step_logits):
            torch.testing.assert_close(logits[i], ref[p + k], atol=1e-4, rtol=1e-4,
                                       msg=f"decode step {k} logits of row {i} ({name})")
        assert s.generated == oracle.greedy(adapter, PROMPTS[i], 10), f"greedy tokens of row {i} ({name})"


def test_mixed_classification_batch_matches_peft_per_row(minilm, cls_adapters):
    engine = ClassificationEngine.from_dir(minilm, device_slots=8)
    manager = AdapterManager("sequence-classification", 16)
    engine.bind(manager)
    entries = _register(manager, cls_adapters)
    oracle = PeftOracle(minilm, "sequence-classification")
    rng = random.Random(0)
    texts = [f"{rng.choice(PROMPTS)} {i}" for i in range(24)]
    names = [list(cls_adapters)[i % len(cls_adapters)] for i in range(24)]
    rng.shuffle(names)
    slots = [engine.acquire(entries[n]) for n in names]
    got = engine.classify(texts, slots, [len(entries[n].labels) for n in names])
    assert {len(g) for g in got} == {2, 3, 4, 5, 6}, "label counts differ per tenant"
    for name, path in cls_adapters.items():
        rows = [i for i, n in enumerate(names) if n == name]
        ref = torch.softmax(oracle.logits(path, [texts[i] for i in rows]), -1)
        for j, i in enumerate(rows):
            torch.testing.assert_close(torch.tensor(got[i]), ref[j], atol=1e-5, rtol=1e-4,
                                       msg=f"row {i} ({name})")


def test_the_loops_token_ids_and_counts_are_the_tokenizers_own(minilm, tiny_llama):
    """``count_tokens`` (the input_too_long check on the event loop) and ``encode`` (a completion's
    prompt) use the Rust backend of a copy of the tokenizer; every answer equals ``tokenizer(text)``'s
    ids, also past the limit, after the original tokenizer padded and truncated a batch (state a fast
    tokenizer keeps)."""
    from transformers import AutoTokenizer

    from lorafleet.runtime.engines import token_encoder

    texts = PROMPTS + ["", " ", "word " * 600, "héllo wörld ﷺ 日本語 ﬁ", "[SEP] [CLS] <s> </s>", "a\tb\nc  d",
                       "x" * 3000]
    for model in (minilm, tiny_llama):
        tok = AutoTokenizer.from_pretrained(str(model))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok(["a b", "a b c d e f"], padding="max_length", truncation=True, max_length=4)
        encode = token_encoder(tok)
        count = lambda text: len(encode(text))  # noqa: E731 - ClassificationEngine.count_tokens
        assert [count(t) for t in texts] == [len(tok(t)["input_ids"]) for t in texts], model
        assert [encode(t) for t in texts] == [tok(t)["input_ids"] for t in texts], model

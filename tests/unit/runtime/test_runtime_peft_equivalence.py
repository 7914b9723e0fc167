"""PEFT is the oracle: every row of a mixed multi-tenant batch equals PEFT with that row's adapter alone."""

from __future__ import annotations

import random

import pytest
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


def test_prompts_of_very_different_lengths_and_rows_freed_mid_batch_match_peft(tiny_llama, gen_adapters):
    """A prefill of short and long prompts runs as several forwards (less padding) and sequences that
    finish free their cache rows for new ones while the others keep decoding: every answer is still
    PEFT's greedy answer for its own adapter, in the order the sequences were given."""
    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_seqs=16)
    manager = AdapterManager("text-generation", 16)
    engine.bind(manager)
    entries = _register(manager, gen_adapters)
    names = list(gen_adapters)
    oracle = PeftOracle(tiny_llama, "text-generation")
    long_text = " ".join(PROMPTS * 3)
    texts = [PROMPTS[0], long_text, PROMPTS[4], " ".join(PROMPTS[:4]), long_text + " again", PROMPTS[2],
             PROMPTS[6] + " " + long_text, PROMPTS[8]]
    budgets = [3, 9, 5, 12, 2, 7, 4, 10]
    jobs = [(names[i % len(names)], texts[i], budgets[i]) for i in range(len(texts))]
    lengths = [len(oracle.tok(t)["input_ids"]) for _, t, _ in jobs[:5]]
    assert max(lengths) > 4 * min(lengths) + engine.prefill_split_tokens
    assert len(engine.prefill_groups(lengths)) > 1, "the first prefill is split"

    def start(batch):
        seqs = [Sequence(prompt=oracle.tok(t)["input_ids"], max_new_tokens=n, slot=engine.acquire(entries[name]))
                for name, t, n in batch]
        engine.prefill(seqs)
        return seqs

    waiting = list(range(5, len(jobs)))
    active = list(zip(range(5), start(jobs[:5])))
    done: dict[int, list[int]] = {}
    joined_mid_batch = 0
    while active:
        for i, s in [(i, s) for i, s in active if engine.is_done(s)]:
            engine.finish(s)
            done[i] = s.generated
            active.remove((i, s))
        if waiting and len(active) < 5 and active:  # a new sequence takes a freed row while others run
            i = waiting.pop(0)
            active.append((i, start([jobs[i]])[0]))
            joined_mid_batch += 1
        assert sorted(s.row for _, s in active) == list(range(len(active))), "rows in use stay 0..n-1"
        step = [s for _, s in active if len(s.generated) < s.max_new_tokens]
        random.Random(len(done)).shuffle(step)  # any order in, the same order out
        if step:
            engine.decode(step)
    assert joined_mid_batch >= 2 and len(done) == len(jobs)
    for i, (name, text, n) in enumerate(jobs):
        assert done[i] == oracle.greedy(gen_adapters[name], text, n), f"sequence {i} ({name}, {n} tokens)"


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


def test_a_failed_packed_step_frees_its_new_rows_and_the_two_apart_still_answer_peft(tiny_llama, gen_adapters):
    """What the model worker relies on when a packed step raises: the new sequences' rows are free again and
    the running ones have not moved, so prefill and decode apart give every row PEFT's greedy answer."""
    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_seqs=16)
    manager = AdapterManager("text-generation", 16)
    engine.bind(manager)
    entries = _register(manager, gen_adapters)
    oracle = PeftOracle(tiny_llama, "text-generation")
    names = list(gen_adapters)[:4]
    seqs = [Sequence(prompt=oracle.tok(PROMPTS[i])["input_ids"], max_new_tokens=6, slot=engine.acquire(entries[n]))
            for i, n in enumerate(names)]
    running, new = seqs[:2], seqs[2:]
    engine.prefill(running)
    real = engine._layers_forward

    def broken(*a, **k):
        raise RuntimeError("injected")

    engine._layers_forward = broken
    with pytest.raises(RuntimeError, match="injected"):
        engine.step(new, running)
    engine._layers_forward = real
    assert len(engine.free_rows) == 14 and all(s.row == -1 for s in new), "the new rows are free again"
    assert [len(s.generated) for s in running] == [1, 1] and [s.pos for s in running] == [len(s.prompt) for s in running]
    engine.prefill(new)
    engine.decode(running)
    for _ in range(5):
        engine.decode(seqs)
    for i, (name, s) in enumerate(zip(names, seqs)):
        assert s.generated[:6] == oracle.greedy(gen_adapters[name], PROMPTS[i], 6), f"row {i} ({name})"


def test_a_step_packs_only_where_a_failure_can_be_retried_apart(tiny_llama, gen_adapters):
    """The model worker packs a step only where ``GenerationEngine.step`` undoes a failure (``packs``):
    apart, a prefill that failed after taking its rows would have left them taken when the worker retried."""
    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_seqs=4)
    oracle = PeftOracle(tiny_llama, "text-generation")

    def seq(**kw):
        return Sequence(prompt=oracle.tok(PROMPTS[0])["input_ids"], max_new_tokens=4, **kw)

    running = [seq(), seq()]
    engine.prefill(running)
    assert engine.packs([seq()], running)
    assert not engine.packs([seq(prompt_logprobs=1)], running), "prompt logprobs are computed by prefill"
    assert not engine.packs([seq()], running[:1]), "every row in use must step"
    assert not engine.packs([seq(), seq(), seq()], running), "no room for three more rows"
    assert not engine.packs([], running) and not engine.packs([seq()], [])
    engine.finish(running[0])
    assert not engine.packs([seq()], running), "a finished sequence is not running"

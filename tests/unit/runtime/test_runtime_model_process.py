"""A text-generation or classification model in a process of its own (``--model-process process``, runtime/model_process.py)
answers exactly as the engine in this process: the same tokens and logprobs, bit for bit, whatever the
batch does (rows start apart or packed into a decode step, finish and move, adapters are evicted from
too few device slots); what it refuses it refuses with the same message; and a model process that dies
fails what was asked of it with a reason instead of hanging."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engines import GenerationEngine, Sequence
from lorafleet.runtime.model_process import ModelProcessDied, make_remote_engine
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterManager
from support.models import PeftOracle, bind_adapters, make_generation_adapter

PROMPTS = ["hello world , how are", "please refund me , the invoice is wrong", "red green", "one two three four"]
KW = dict(dtype="float32", device="cpu", max_rank=16, max_seqs=8, max_len=None, quantization="none",
          merged_adapter=None)


def _remote(model_dir, device_slots: int, settings: RuntimeSettings | None = None):
    # The child computes with as many threads as this process, so float reductions run alike.
    return make_remote_engine(model_dir, settings or RuntimeSettings(), threads=torch.get_num_threads(),
                              device_slots=device_slots, **KW)


@pytest.fixture(scope="module")
def three_adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("mp-adapters")
    return [make_generation_adapter(tiny_llama, root / f"a{i}", seed=40 + i, r=(4, 8, 16)[i], alpha=16)
            for i in range(3)]


def _script(engine, adapters, tok) -> list[Sequence]:
    """A mixed batch through every kind of call: two rows prefilled, two more packed into their decode
    step, one of them finished early (the last row moves into its cache row), a third adapter that must
    evict one of the two device slots, greedy, seeded sampling and logprob rows side by side."""
    entries = list(bind_adapters(engine, "text-generation", {f"a{i}": p for i, p in enumerate(adapters)}).values())

    def seq(adapter, prompt, **kw):
        return Sequence(prompt=tok(prompt)["input_ids"], max_new_tokens=12,
                        slot=engine.acquire(None if adapter is None else entries[adapter]), **kw)

    first = [seq(0, PROMPTS[0], logprobs=3), seq(None, PROMPTS[1])]
    engine.prefill(first)
    later = [seq(1, PROMPTS[2], temperature=0.8, seed=7), seq(0, PROMPTS[3], logprobs=0)]
    engine.step(later, first)
    rows = first + later
    for _ in range(3):
        engine.decode(rows)
    engine.finish(first[0])  # row 0 frees: the last row's cache moves into it
    engine.release(entries[0])
    rows = rows[1:]
    for _ in range(4):
        engine.decode(rows)
    done = [r for r in rows if r.slot == engine.slots.slot_of(entries[1].key)]
    for r in done:
        engine.finish(r)
    engine.release(entries[1])
    rows = [r for r in rows if r not in done]
    # Two slots, two adapters used so far (a1 unreferenced now): a2 evicts it.
    third = [seq(2, PROMPTS[1]), seq(None, PROMPTS[0], prompt_logprobs=2)]
    engine.prefill(third)
    rows += third
    for _ in range(5):
        engine.decode(rows)
    assert engine.slots.evictions == 1
    return first + later + third


def _state(seqs):
    return [(s.generated, s.pos, s.token_logprobs, s.top_logprobs, s.prompt_token_logprobs) for s in seqs]


def test_the_model_process_answers_bit_for_bit_as_the_engine_in_this_process(tiny_llama, three_adapters):
    oracle = PeftOracle(tiny_llama, "text-generation")
    here = GenerationEngine.from_dir(tiny_llama, device_slots=2, **KW)
    expected = _state(_script(here, three_adapters, oracle.tok))
    remote = _remote(tiny_llama, device_slots=2)
    try:
        got = _state(_script(remote, three_adapters, oracle.tok))
        assert remote.cpu_time() > 0 and remote.memory_bytes() == here.memory_bytes()
        # On CPU the runtime's default front is its front process, and the model then runs at its priority.
        assert os.getpriority(os.PRIO_PROCESS, remote.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        remote.close()
    assert got == expected
    # And both are PEFT's greedy answer (the rows with neither sampling nor a finish before the end).
    ref = oracle.greedy(three_adapters[2], PROMPTS[1], 6)
    assert got[4][0][: len(ref)] == ref
    assert len(got[0][2]) == len(got[0][0]) and all(len(t) == 3 for t in got[0][3])
    assert got[5][4] and len(got[5][4]) == len(oracle.tok(PROMPTS[0])["input_ids"]) - 1


def test_installs_into_existing_slots_go_with_the_next_call_and_answer_bit_for_bit(tiny_llama, three_adapters):
    """The rank-16 adapter first: it wraps the modules (an install call of its own); the rank-4 and rank-8
    ones after it, one evicting, are copies into those slots and travel with the next call (a packed step,
    a prefill)."""
    import pickle

    oracle = PeftOracle(tiny_llama, "text-generation")
    order = [three_adapters[2], three_adapters[0], three_adapters[1]]
    expected = _state(_script(GenerationEngine.from_dir(tiny_llama, device_slots=2, **KW), order, oracle.tok))
    remote = _remote(tiny_llama, device_slots=2)
    sent: list[tuple] = []
    send = remote.conn.send_bytes
    remote.conn.send_bytes = lambda b: (sent.append(pickle.loads(b)), send(b))[1]
    try:
        got = _state(_script(remote, order, oracle.tok))
    finally:
        remote.close()
    assert got == expected
    assert len([m for m in sent if m[0] == "install"]) == 1  # the first adapter only
    carried = [(m[2][0], len(m[1])) for m in sent if m[0] == "installs"]
    assert carried == [("step", 1), ("prefill", 1)], carried  # a0 into the free slot, then a1 evicting one
    assert remote.round_trips == 1 + len(sent)  # the load, then one per call: no install of its own after the first


def test_an_adapter_travels_to_the_model_process_as_its_bytes_once_and_arrives_unchanged(three_adapters):
    """A loaded adapter is one buffer (peft_format.pack): pickled for the channel it is that buffer's bytes
    plus where each tensor lies, not a copy per tensor; one whose tensors are not views of its buffer any
    more goes tensor by tensor, without the buffer. Either way every tensor and field arrives as sent."""
    import dataclasses
    import pickle

    from lorafleet.runtime.model_process import _dumps
    from lorafleet.runtime.peft_format import load_adapter_dir

    host = load_adapter_dir(three_adapters[1], torch.bfloat16)
    assert host.blob is not None and host.blob.numel() * 2 == host.nbytes
    loose = dataclasses.replace(host, modules={p: dataclasses.replace(w, a=w.a.clone()) for p, w in
                                               host.modules.items()})
    for sent, packed in ((host, True), (loose, False)):
        data = _dumps(sent)
        got = pickle.loads(data)
        assert (got.blob is not None) == packed
        assert len(data) < host.nbytes + 16_384  # the factors' bytes once, and a little to say where they go
        assert got.modules.keys() == sent.modules.keys()
        for p, w in sent.modules.items():
            g = got.modules[p]
            assert (g.rank, g.scale) == (w.rank, w.scale)
            assert torch.equal(g.a, w.a) and torch.equal(g.b, w.b) and g.a.dtype == torch.bfloat16
        assert (got.task, got.labels, got.max_rank, got.nbytes, got.settings) == \
            (sent.task, sent.labels, sent.max_rank, sent.nbytes, sent.settings)


def test_an_adapter_that_does_not_fit_is_refused_as_in_this_process(tiny_llama, tmp_path):
    big = make_generation_adapter(tiny_llama, tmp_path / "r32", seed=3, r=32, alpha=16)
    errors = []
    remote = _remote(tiny_llama, device_slots=2)
    try:
        for engine in (GenerationEngine.from_dir(tiny_llama, device_slots=2, **KW), remote):
            manager = AdapterManager("text-generation", 8)
            engine.bind(manager)
            entry, _ = manager.register("big", "1", AdapterLoadRequest(path=str(big), sha256="0" * 64, tenant="t"))
            errors.append(entry.error)
        assert not remote.slots.by_key
    finally:
        remote.close()
    assert errors[0] and "rank" in errors[0].lower() and errors[1] == errors[0]


def test_a_refused_model_is_refused_with_the_same_reason_and_the_process_exits(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config

    from support.models import build_tokenizer

    tok = build_tokenizer()
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tok))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModel) as here:
        GenerationEngine.from_dir(tmp_path / "gpt2", device_slots=2, **KW)
    with pytest.raises(UnsupportedModel) as there:
        _remote(tmp_path / "gpt2", device_slots=2)
    assert str(there.value) == str(here.value) and "GPT2" in str(here.value)


def test_a_dead_model_process_fails_each_call_with_its_reason_and_reports_once(tiny_llama):
    remote = _remote(tiny_llama, device_slots=2, settings=RuntimeSettings(front="inline"))
    deaths = []
    remote.on_death = deaths.append
    try:
        tok = remote.tokenizer
        s = Sequence(prompt=tok("hello world")["input_ids"], max_new_tokens=4)
        remote.prefill([s])
        # The server's own event loop on the public port (admission) goes first under CPU contention: the model
        # is niced (behind the front process it is not: test_the_model_process_answers_bit_for_bit...).
        assert os.getpriority(os.PRIO_PROCESS, remote.pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
        os.kill(remote.pid, signal.SIGKILL)
        with pytest.raises(ModelProcessDied, match=rf"model process {remote.pid} died \(signal 9\)"):
            remote.decode([s])
        with pytest.raises(ModelProcessDied):  # later calls fail at once, not by waiting on the channel
            remote.prefill([Sequence(prompt=s.prompt, max_new_tokens=4)])
        remote._watcher.join(10)
        assert len(deaths) == 1 and "must restart" in deaths[0]
    finally:
        remote.close()


def test_a_classification_model_process_answers_bit_for_bit_with_slots_evicted(minilm, cls_adapters):
    """24 texts of 8 tenants (per-tenant heads of 2-6 labels) through 4 device slots: three batches, so
    adapters are evicted and written again in the child; every probability equals the in-process engine's
    and every row equals PEFT's."""
    from lorafleet.runtime.engines import ClassificationEngine

    kw = dict(dtype="float32", device="cpu", max_rank=16, quantization="none")
    names = list(cls_adapters)
    texts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(24)]
    batches = [names[:4], names[4:], names[2:6]]

    def run(engine):
        entries = bind_adapters(engine, "sequence-classification", cls_adapters)
        out = []
        for b, tenants in enumerate(batches):
            rows = [tenants[i % len(tenants)] for i in range(8)]
            slots = [engine.acquire(entries[n]) for n in rows]
            out.append((rows, engine.classify(texts[8 * b: 8 * b + 8], slots, [len(entries[n].labels) for n in rows])))
            for n in rows:
                engine.release(entries[n])
        assert engine.slots.evictions >= 4
        assert engine.count_tokens(texts[0]) == len(engine.tokenizer(texts[0])["input_ids"])
        return out, engine.max_input_tokens()

    expected = run(ClassificationEngine.from_dir(minilm, device_slots=4, **kw))
    remote = make_remote_engine(minilm, RuntimeSettings(), "sequence-classification",
                                threads=torch.get_num_threads(), device_slots=4, **kw)
    try:
        got = run(remote)
    finally:
        remote.close()
    assert got == expected
    oracle = PeftOracle(minilm, "sequence-classification")
    rows, probs = got[0][2]
    for i, n in enumerate(rows):
        ref = torch.softmax(oracle.logits(cls_adapters[n], [texts[16 + i]]), -1)[0]
        torch.testing.assert_close(torch.tensor(probs[i]), ref, atol=1e-5, rtol=1e-4, msg=f"row {i} ({n})")

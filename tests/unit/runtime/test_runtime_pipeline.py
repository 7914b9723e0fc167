"""The model worker keeps one step in flight to a model process (``ModelWorker._pipelined_step``): the next
step is sent before the last one's tokens are handed out. What a user would notice if that went wrong is a
wrong or an extra token, a request that never ends, or one bad request taking others down; so every answer
here is checked against PEFT's greedy answer for its own adapter, with rows ending at different lengths,
at an end-of-sequence token, cancelled mid-answer, and a prompt the model cannot run."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lorafleet.runtime.engine_api import Work
from lorafleet.runtime.engines import Sequence
from lorafleet.runtime.model_process import make_remote_engine
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.worker import ModelWorker, Scheduler
from support.models import PeftOracle, bind_adapters, make_generation_adapter

PROMPTS = ["hello world , how are", "please refund me , the invoice is wrong", "red green", "one two three four",
           "the quick brown fox", "my order has not"]
KW = dict(dtype="float32", device="cpu", max_rank=16, max_seqs=8, max_len=None, quantization="none",
          merged_adapter=None)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline-adapters")
    return {f"t{i}": make_generation_adapter(tiny_llama, root / f"a{i}", seed=60 + i, r=(4, 8, 16)[i % 3], alpha=16)
            for i in range(3)}


@pytest.fixture(scope="module")
def remote(tiny_llama):
    engine = make_remote_engine(tiny_llama, RuntimeSettings(), threads=torch.get_num_threads(), device_slots=2, **KW)
    yield engine
    engine.close()


def _run(engine, jobs, max_batch: int, cancel_after: dict | None = None):
    """Each job (tenant, entry, Sequence) as its own request through a Scheduler and a ModelWorker on
    ``engine``: per job (tokens received, how it ended). ``cancel_after``: job index -> cancel once it has
    that many tokens (as a client that left would)."""
    loop = asyncio.new_event_loop()
    sched = Scheduler(max_queue=1000, per_tenant_max_inflight=1000)
    worker = ModelWorker(engine, sched, max_batch_size=max_batch, max_batch_delay_ms=0)
    works = [Work(tenant=t, entry=e, payload=s, loop=loop, events=asyncio.Queue()) for t, e, s in jobs]
    cancel_after = cancel_after or {}

    async def answer(i: int, w: Work):
        toks = []
        while True:
            kind, value = await asyncio.wait_for(w.events.get(), 60)
            if kind == "token":
                toks.append(value)
                if cancel_after.get(i) == len(toks):
                    w.cancel("client_left")
                    return toks, "cancelled"
            elif kind == "done":
                return toks, value
            else:
                return toks, f"{kind}: {value}"

    async def main():
        for w in works:
            sched.submit([w])
        return await asyncio.gather(*(answer(i, w) for i, w in enumerate(works)))

    worker.start()
    try:
        return loop.run_until_complete(main())
    finally:
        sched.close()
        worker.join(30)
        loop.close()


def test_pipelined_steps_give_each_row_its_own_adapters_greedy_answer(tiny_llama, adapters, remote):
    """Eighteen requests over three adapters and the base, through two device slots (evictions carried with
    steps) and at most four rows at a time: rows start and end at every step, some after one token, and
    each answer is PEFT's greedy answer for its adapter, no token more or less."""
    oracle = PeftOracle(tiny_llama, "text-generation")
    entries = bind_adapters(remote, "text-generation", adapters)
    names = [None, *adapters]
    jobs, expected = [], []
    for i in range(18):
        name, prompt, n = names[i % 4], PROMPTS[i % len(PROMPTS)], (1, 2, 5, 9, 3)[i % 5]
        jobs.append((name or "base", None if name is None else entries[name],
                     Sequence(prompt=oracle.tok(prompt)["input_ids"], max_new_tokens=n)))
        expected.append(oracle.greedy(None if name is None else adapters[name], prompt, n))
    ahead = []  # steps on their way when one more was sent: 2 means one went before the last was read
    send = remote.send_step
    remote.send_step = lambda *a: (send(*a), ahead.append(remote._in_flight))[0]
    try:
        got = _run(remote, jobs, max_batch=4)
    finally:
        del remote.send_step
    for i, ((toks, how), ref) in enumerate(zip(got, expected)):
        assert toks == ref, f"request {i} ({jobs[i][0]}): {toks} != PEFT {ref}"
        assert how in ("length", "stop"), f"request {i}: {how}"
    assert remote.slots.evictions > 0
    assert max(ahead) == 2, "the next step went out before the answer to the last was read"
    assert len(remote.free_rows) == KW["max_seqs"], "every row is free again"
    # And the model process holds no row either: a request after them all still answers PEFT's tokens.
    after = _run(remote, [("base", None, Sequence(prompt=oracle.tok(PROMPTS[0])["input_ids"], max_new_tokens=3))], 4)
    assert after[0][0] == oracle.greedy(None, PROMPTS[0], 3)


def test_a_request_cancelled_mid_answer_frees_its_row_and_the_others_are_unchanged(tiny_llama, adapters, remote):
    oracle = PeftOracle(tiny_llama, "text-generation")
    entries = bind_adapters(remote, "text-generation", adapters)
    names = list(adapters)
    jobs = [(n, entries[n], Sequence(prompt=oracle.tok(PROMPTS[i])["input_ids"], max_new_tokens=8))
            for i, n in enumerate(names + names)]
    got = _run(remote, jobs, max_batch=6, cancel_after={0: 2, 4: 1})
    for i, (toks, how) in enumerate(got):
        ref = oracle.greedy(adapters[jobs[i][0]], PROMPTS[i], 8)
        if i in (0, 4):
            assert how == "cancelled" and toks == ref[: len(toks)]
        else:
            assert (toks, how) == (ref, "length"), f"request {i}"
    assert len(remote.free_rows) == KW["max_seqs"]


def test_a_prompt_the_model_cannot_run_fails_alone_and_the_rows_beside_it_answer_exactly(tiny_llama, adapters, remote):
    """A prompt with a token id past the vocabulary makes the model process's step raise while other rows
    run beside it and another step is already on its way: that request gets the error, every other request
    PEFT's answer, and the pipeline goes on."""
    oracle = PeftOracle(tiny_llama, "text-generation")
    entries = bind_adapters(remote, "text-generation", adapters)
    vocab = oracle.tok.vocab_size if hasattr(oracle.tok, "vocab_size") else 1000
    names = list(adapters)
    jobs, refs = [], []
    for i in range(7):
        name = names[i % 3]
        ids = oracle.tok(PROMPTS[i % len(PROMPTS)])["input_ids"]
        if i == 3:
            ids = ids + [vocab + 1000]
        jobs.append((name, entries[name], Sequence(prompt=ids, max_new_tokens=6)))
        refs.append(None if i == 3 else oracle.greedy(adapters[name], PROMPTS[i % len(PROMPTS)], 6))
    got = _run(remote, jobs, max_batch=3)
    for i, ((toks, how), ref) in enumerate(zip(got, refs)):
        if i == 3:
            assert how.startswith("error:") and toks == [], how
        else:
            assert (toks, how) == (ref, "length"), f"request {i}: {how}"
    assert len(remote.free_rows) == KW["max_seqs"]

"""spec.runtime.compile: the generation engine's decode forward compiled by torch.compile answers what PEFT
answers, row by row, and never compiles again while rows join and leave or adapters come and go."""

from __future__ import annotations

import pytest
import torch

from lorafleet.contracts.names import RuntimeEnv
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.contracts.runtime_api import AdapterLoadRequest
from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engines import GenerationEngine, Sequence
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterManager
from support.models import PeftOracle

PROMPTS = ["hello world , how are", "the quick brown fox", "please refund me", "my order has not arrived , please",
           "one two three", "support billing", "great product , thanks !", "the invoice is wrong .", "red green"]


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def compiled(tiny_llama):
    torch.manual_seed(0)
    engine = GenerationEngine.from_dir(tiny_llama, device_slots=8, max_rank=16, max_seqs=16, compile=True)
    manager = AdapterManager("text-generation", 16)
    engine.bind(manager)
    return engine, manager


def _register(manager, adapters, names):
    out = {}
    for name in names:
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(adapters[name]), sha256="0" * 64,
                                                                   tenant=name))
        assert entry.error is None, entry.error
        out[name] = entry
    return out


def test_a_compiled_mixed_batch_matches_peft_per_row(compiled, tiny_llama, gen_adapters):
    engine, manager = compiled
    entries = _register(manager, gen_adapters, list(gen_adapters))
    names = list(gen_adapters) + [None]  # the last row is the base model's (slot 0: the LoRA path adds 0)
    oracle = PeftOracle(tiny_llama, "text-generation")
    seqs = [Sequence(prompt=oracle.tok(p)["input_ids"], max_new_tokens=10,
                     slot=engine.acquire(entries[n] if n else None)) for n, p in zip(names, PROMPTS)]
    steps0 = engine.compiled_steps
    engine.prefill(seqs)
    step_logits = []
    for _ in range(9):
        engine.decode(seqs)
        step_logits.append(engine.last_logits.clone())
    assert engine.compiled_steps - steps0 == 9, "every decode step ran the compiled forward"
    for i, (name, s) in enumerate(zip(names, seqs)):
        adapter = gen_adapters[name] if name else None
        with torch.inference_mode():
            ref = oracle._model(adapter)(input_ids=torch.tensor([s.prompt + s.generated[:-1]])).logits[0]
        for k, logits in enumerate(step_logits):
            torch.testing.assert_close(logits[i], ref[len(s.prompt) + k], atol=1e-4, rtol=1e-4,
                                       msg=f"compiled decode step {k}, row {i} ({name})")
        assert s.generated == oracle.greedy(adapter, PROMPTS[i], 10), f"greedy tokens of row {i} ({name})"
    for s, name in zip(seqs, names):
        engine.finish(s)
        engine.release(entries[name] if name else None)


def test_rows_joining_and_leaving_and_new_targets_never_recompile(compiled, tiny_llama, gen_adapters):
    """Batch sizes 1..9 as sequences start and finish, an adapter targeting the MLP (gate/down) first
    seen now: no new graph, and every answer PEFT's greedy."""
    engine, manager = compiled
    names = list(gen_adapters)
    entries = _register(manager, gen_adapters, names)
    oracle = PeftOracle(tiny_llama, "text-generation")
    graphs, steps0 = _graphs(), engine.compiled_steps
    running: list[tuple[Sequence, str, int]] = []
    done: list[tuple[Sequence, str, int]] = []
    plan = [(i % len(PROMPTS), names[(3 * i) % len(names)], 3 + (5 * i) % 9) for i in range(14)]
    step = decodes = 0
    while plan or running:
        if plan and step % 2 == 0:  # one or two new sequences every other step
            new = [plan.pop(0) for _ in range(min(len(plan), 1 + step % 3))]
            seqs = [Sequence(prompt=oracle.tok(PROMPTS[p])["input_ids"], max_new_tokens=m,
                             slot=engine.acquire(entries[n])) for p, n, m in new]
            engine.prefill(seqs)
            running += [(s, n, p) for s, (p, n, _) in zip(seqs, new)]
        if running:
            engine.decode([s for s, _, _ in running])
            decodes += 1
        for item in [r for r in running if len(r[0].generated) >= r[0].max_new_tokens]:
            engine.finish(item[0])
            engine.release(entries[item[1]])
            running.remove(item)
            done.append(item)
        step += 1
    assert _graphs() == graphs, "a batch size, span or adapter seen after start-up compiled a new graph"
    assert engine.compiled_steps - steps0 == decodes, "rows in use stay 0..n-1: every step is the compiled one"
    assert any(n == "gen6" for _, n, _ in done), "the MLP-targeting adapter ran"
    for s, name, p in done:
        assert s.generated == oracle.greedy(gen_adapters[name], PROMPTS[p], s.max_new_tokens), (name, PROMPTS[p])


def test_compile_is_refused_where_it_cannot_apply(minilm):
    from lorafleet.runtime.torch_engine import TorchEngine

    s = RuntimeSettings.from_env({RuntimeEnv.COMPILE: "true"}, model_dir=str(minilm))
    with pytest.raises(UnsupportedModel, match="spec.runtime.compile.*text generation's only.*sequence-classification"):
        TorchEngine.from_dir(minilm, "sequence-classification", s)


def test_the_pool_field_reaches_the_runtime_setting():
    from lorafleet.operator import manifests

    spec = {"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"},
            "storage": {"endpoint": "http://minio:9000"}}
    for field, want in ((None, False), (True, True), (False, False)):
        pool = BaseModelPoolSpec.model_validate(spec if field is None else {**spec, "runtime": {"compile": field}})
        env = {e["name"]: e["value"] for e in manifests.runtime_env("gen", pool) if "value" in e}
        assert (RuntimeEnv.COMPILE in env) is want
        assert RuntimeSettings.from_env(env).compile is want

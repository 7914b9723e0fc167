"""The generation engine's own step costs on serve_bench's model, beside PEFT's batch-1 decoding; one JSON line.

Measures, with one torch thread (no HTTP, no scheduler):
  decode_ms[B]      one decode step of B rows, every row its own adapter (context 100 tokens), and per row
  peft_token_ms     PEFT's ``generate`` with one adapter at batch 1 (the serve_bench baseline's per-token cost)
  prefill           k prompts of seeded lengths 16-128: one padded forward against the split that
                    ``GenerationEngine.prefill_groups`` chooses (same first tokens, logits within 1e-4)

Usage: python bench/engine_step_bench.py [--hidden 256] [--layers 4] [--workdir /tmp/lorafleet-serve-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from benchlib import cpu_model, loadavg

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def median_ms(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/lorafleet-serve-bench")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "bench"))
    from serve_bench import build_adapters, build_model

    from lorafleet.contracts.runtime_api import AdapterLoadRequest
    from lorafleet.runtime.engines import GenerationEngine, Sequence
    from lorafleet.runtime.tiers import AdapterManager

    ns = argparse.Namespace(hidden=args.hidden, layers=args.layers, heads=0, kv_heads=0,
                            max_model_len=args.max_model_len)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(ns, workdir)
    adapters = build_adapters(model, 64)
    eng = GenerationEngine.from_dir(model, device_slots=64, max_seqs=64, max_len=args.max_model_len, max_rank=16)
    man = AdapterManager("text-generation", 512, dtype=eng.dtype)
    eng.bind(man)
    slots = []
    for name, path in adapters:
        e, _ = man.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert e.error is None, e.error
        slots.append(eng.acquire(e))
    g = torch.Generator().manual_seed(0)
    vocab = eng.model.config.vocab_size
    out: dict = {"bench": "engine_step", "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(),
                                                   "load_average": loadavg()},
                 "model": {"hidden": args.hidden, "layers": args.layers}, "decode_ms": {}, "decode_ms_per_row": {}}
    for b in (1, 8, 32, 64):
        seqs = [Sequence(prompt=torch.randint(3, vocab, (100,), generator=g).tolist(), max_new_tokens=10 ** 6,
                         slot=slots[i]) for i in range(b)]
        eng.prefill(seqs)

        def step(seqs=seqs):
            eng.decode(seqs)
            for s in seqs:  # the context stays at 100 tokens
                s.pos -= 1
                s.generated.pop()

        ms = median_ms(step, args.reps)
        out["decode_ms"][b], out["decode_ms_per_row"][b] = round(ms, 2), round(ms / b, 3)
        for s in seqs:
            eng.finish(s)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model)), str(adapters[1][1])).eval()
    ids = torch.randint(3, vocab, (1, 100), generator=g)
    with torch.inference_mode():
        peft.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        peft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                      do_sample=False, pad_token_id=0)
        out["peft_token_ms"] = round((time.perf_counter() - t0) / 64 * 1e3, 2)
    out["decode_per_row_vs_peft_token"] = {b: round(out["peft_token_ms"] / v, 1)
                                           for b, v in out["decode_ms_per_row"].items()}

    rng = random.Random(0)
    out["prefill"] = []
    split = eng.prefill_split_tokens
    for k in (1, 4, 8, 32):
        lengths = [rng.randint(16, 128) for _ in range(k)]
        prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
        res = {}
        for tokens in (0, split):
            eng.prefill_split_tokens = tokens

            def run():
                seqs = [Sequence(prompt=q, max_new_tokens=1, slot=slots[i]) for i, q in enumerate(prompts)]
                toks = eng.prefill(seqs)
                for s in seqs:
                    eng.finish(s)
                return toks

            res[tokens] = (median_ms(run, max(3, args.reps // 2)), run(), eng.last_logits.clone())
        eng.prefill_split_tokens = split
        assert res[0][1] == res[split][1], "the split prefill chose other first tokens"
        torch.testing.assert_close(res[0][2], res[split][2], atol=1e-4, rtol=1e-4)
        out["prefill"].append({"prompts": k, "real_tokens": sum(lengths), "padded_one_forward": k * max(lengths),
                               "forwards": len(eng.prefill_groups(lengths)), "one_forward_ms": round(res[0][0], 1),
                               "split_ms": round(res[split][0], 1), "speedup": round(res[0][0] / res[split][0], 2)})
    out["machine_after"] = {"load_average": loadavg()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The generation engine's own step costs on serve_bench's model, beside PEFT's batch-1 decoding; one JSON line.

Measures, with one torch thread (no HTTP, no scheduler):
  decode_ms[B]      one decode step of B rows, every row its own adapter (context 100 tokens), and per row
                    (16-bit on CPU: also decode_ms_with_sdpa[B], the step with torch's SDPA kernel instead of
                    the eager attention the engine uses there)
  peft_token_ms     PEFT's ``generate`` with one adapter at batch 1 (the serve_bench baseline's per-token cost)
  prefill           k prompts of seeded lengths 16-128: one padded forward against the split that
                    ``GenerationEngine.prefill_groups`` chooses (same first tokens, logits within 1e-4)
  ceiling[B]        serve_bench's workload (its prompts and output lengths, ignore_eos, greedy, Zipf(1.0)
                    over --adapters) run by the engine alone for --ceiling-seconds with B rows: a new
                    sequence takes every freed row at once, as a saturated server's queue would. Output
                    tokens/s with no HTTP, scheduler or event loop: what a server on this one thread can
                    reach at most (served figures: bench/serve_bench.py). New prompts and the decode step
                    run in one forward (``GenerationEngine.step``, as the model worker runs them);
                    ceiling_apart: the same with a prefill forward and a decode forward

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


def ceiling(eng, entries, model: Path, rows: list[int], seconds: float, packed: bool = True) -> dict:
    """serve_bench's workload by the engine alone (see the module's doc); per row count: output tokens/s,
    the shares of time in prefill and in decode forwards (packed: and in packed steps), the mean rows a
    decode step ran."""
    import bisect
    import time

    from serve_bench import build_workload, zipf_cum_weights
    from transformers import AutoTokenizer

    from lorafleet.runtime.engines import Sequence

    wargs = argparse.Namespace(prompt_tokens="16,128", output_tokens="16,64", seed=0)
    tok = AutoTokenizer.from_pretrained(str(model))
    work = [(tok(p)["input_ids"], m) for p, _, m in build_workload(model, wargs)]
    cum = zipf_cum_weights(len(entries))
    out = {}
    for b in rows:
        rng = random.Random(0)

        def new():
            e = entries[bisect.bisect(cum, rng.random() * cum[-1])]
            prompt, m = work[rng.randrange(len(work))]
            s = Sequence(prompt=prompt, max_new_tokens=m, ignore_eos=True, slot=eng.acquire(e))
            return s, e

        active: list = []
        tokens = steps = decode_rows = 0
        pre = dec = both = 0.0
        start = time.perf_counter()
        end = start + seconds + 1.0  # the first second fills the rows and is not counted
        counting = False
        while True:
            now = time.perf_counter()
            if not counting and now >= start + 1.0:
                counting, tokens, steps, decode_rows, pre, dec, both, t0 = True, 0, 0, 0, 0.0, 0.0, 0.0, now
            if now >= end:
                break
            fresh = [new() for _ in range(b - len(active))]
            a = time.perf_counter()
            if fresh and active and packed:  # as the model worker does: one forward for both
                eng.step([s for s, _ in fresh], [s for s, _ in active])
                both += time.perf_counter() - a
            else:
                if fresh:
                    eng.prefill([s for s, _ in fresh])
                m = time.perf_counter()
                if active:
                    eng.decode([s for s, _ in active])
                pre, dec = pre + (m - a), dec + (time.perf_counter() - m)
            tokens += len(fresh) + len(active)
            decode_rows += len(active)
            steps += 1
            active += fresh
            for item in [x for x in active if eng.is_done(x[0])]:
                eng.finish(item[0])
                eng.release(item[1])
                active.remove(item)
        wall = time.perf_counter() - t0
        for s, e in active:
            eng.finish(s)
            eng.release(e)
        out[b] = {"output_tokens_per_s": round(tokens / wall, 1), "prefill_share": round(pre / wall, 2),
                  "decode_share": round(dec / wall, 2), "mean_decode_rows": round(decode_rows / max(1, steps), 1)}
        if packed:  # prefill_share / decode_share: the steps that had only one kind of work
            out[b]["packed_share"] = round(both / wall, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--workdir", default="/tmp/lorafleet-serve-bench")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--adapters", type=int, default=100, help="adapters the ceiling run draws from (Zipf)")
    p.add_argument("--ceiling-rows", default="32,64", help="rows of the ceiling runs (0: none)")
    p.add_argument("--ceiling-seconds", type=float, default=10.0)
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
    adapters = build_adapters(model, max(64, args.adapters))
    eng = GenerationEngine.from_dir(model, device_slots=64, max_seqs=64, max_len=args.max_model_len, max_rank=16,
                                    dtype=args.dtype, device=args.device)
    man = AdapterManager("text-generation", 512, dtype=eng.dtype)
    eng.bind(man)
    slots, entries = [], []
    for name, path in adapters:
        e, _ = man.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert e.error is None, e.error
        entries.append(e)
        if len(slots) < 64:
            slots.append(eng.acquire(e))
    g = torch.Generator().manual_seed(0)
    vocab = eng.model.config.vocab_size
    out: dict = {"bench": "engine_step", "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(),
                                                   "load_average": loadavg()},
                 "model": {"hidden": args.hidden, "layers": args.layers}, "device": args.device, "dtype": args.dtype,
                 "decode_ms": {}, "decode_ms_per_row": {}}
    if eng._eager_decode:  # a 16-bit pool on CPU: also the step with torch's SDPA kernel, for comparison
        out["decode_ms_with_sdpa"] = {}
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
        if "decode_ms_with_sdpa" in out:
            eng._eager_decode = False
            out["decode_ms_with_sdpa"][b] = round(median_ms(step, args.reps), 2)
            eng._eager_decode = True
        for s in seqs:
            eng.finish(s)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, args.dtype)).to(args.device)
    peft = PeftModel.from_pretrained(base, str(adapters[1][1])).eval()
    ids = torch.randint(3, vocab, (1, 100), generator=g).to(args.device)
    with torch.inference_mode():
        peft.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        peft.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                      do_sample=False, pad_token_id=0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
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
        if args.dtype == "float32":  # in 16-bit a different padding rounds differently: not asserted there
            assert res[0][1] == res[split][1], "the split prefill chose other first tokens"
            torch.testing.assert_close(res[0][2], res[split][2], atol=1e-4, rtol=1e-4)
        out["prefill"].append({"prompts": k, "real_tokens": sum(lengths), "padded_one_forward": k * max(lengths),
                               "forwards": len(eng.prefill_groups(lengths)), "one_forward_ms": round(res[0][0], 1),
                               "split_ms": round(res[split][0], 1), "speedup": round(res[0][0] / res[split][0], 2)})
    for e in entries[: len(slots)]:  # the ceiling acquires its own (the resident ones are kept, LRU)
        eng.release(e)
    out["ceiling"] = {}
    rows = [int(x) for x in args.ceiling_rows.split(",") if int(x)]
    if rows:
        out["ceiling"] = ceiling(eng, entries[: args.adapters], model, rows, args.ceiling_seconds)
        out["ceiling_apart"] = ceiling(eng, entries[: args.adapters], model, rows, args.ceiling_seconds, packed=False)
    out["machine_after"] = {"load_average": loadavg()}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

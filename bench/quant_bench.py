"""Quantized base benchmark: the torch engine's decode step and base weight bytes with the base
unquantized, int8 (bitsandbytes LLM.int8) and NF4 (bitsandbytes 4-bit), on one seeded Llama-style
shape, every row of the batch a different adapter. One JSON line.

Decode steps of the engines are timed round-robin (one step of each in turn), so load from other
processes on a shared machine hits them alike; the median and the minimum per engine are reported.

Usage: python bench/quant_bench.py [--device cuda --dtype bfloat16 --hidden 4096 ...] [--threads 2]
       bench/quant_gpu.sh runs the GPU shape (NF4 and int8 vs bfloat16) as one command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# Test support code (tiny seeded models, adapter makers) lives under tests/support, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(args, tmp: Path) -> tuple[Path, dict[str, Path]]:
    from support.models import make_generation_adapter, make_tiny_llama
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    base = make_tiny_llama(tmp / "base", hidden=args.hidden, layers=args.layers, heads=args.heads,
                           kv_heads=args.kv_heads, intermediate=args.intermediate, max_len=args.max_len, seed=0)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    adapters = {f"t{i}": make_generation_adapter(base, tmp / f"t{i}", seed=100 + i, r=args.rank, alpha=2 * args.rank,
                                                 base_model=model, b_std=0.02)
                for i in range(args.rows)}
    del model
    print(f"[quant-bench] model and {args.rows} adapters written in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return base, adapters


def engine(args, base: Path, adapters: dict[str, Path], quantization: str):
    from lorafleet.contracts.runtime_api import AdapterLoadRequest
    from lorafleet.runtime.engines import GenerationEngine, Sequence
    from lorafleet.runtime.tiers import AdapterManager

    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    e = GenerationEngine.from_dir(base, dtype=args.dtype, device=args.device, device_slots=args.rows,
                                  max_rank=args.rank, max_seqs=args.rows, max_len=args.ctx + args.steps + 8,
                                  quantization=quantization)
    load_s = time.perf_counter() - t0
    manager = AdapterManager("text-generation", args.rows)
    e.bind(manager)
    seqs = []
    for i, (name, path) in enumerate(adapters.items()):
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(path), sha256="0" * 64, tenant=name))
        assert entry.error is None, entry.error
        prompt = [3 + (i * 7 + k) % 300 for k in range(args.ctx)]
        seqs.append(Sequence(prompt=prompt, max_new_tokens=args.steps + 8, slot=e.acquire(entry), ignore_eos=True))
    e.prefill(seqs)
    out = {"load_s": round(load_s, 2), "weights_bytes": e.weights_bytes,
           "weights_unquantized_bytes": e.unquantized_weights_bytes}
    if args.device.startswith("cuda"):
        _sync(args.device)
        out["cuda_allocated_bytes"] = torch.cuda.memory_allocated() - before
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() - before
    return e, seqs, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantizations", default="none,int8,nf4")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408, help="a multiple of 32 (NF4 on AVX512-BF16 CPUs)")
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--rows", type=int, default=8, help="decode batch: one adapter per row")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ctx", type=int, default=32, help="prompt tokens per row before the timed steps")
    p.add_argument("--steps", type=int, default=30, help="timed decode steps per engine")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quants = args.quantizations.split(",")

    import bitsandbytes
    import transformers

    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-quant-bench-"))
    base, adapters = build(args, tmp)
    runs = {}
    for q in quants:
        runs[q] = engine(args, base, adapters, q)
        print(f"[quant-bench] {q}: {json.dumps(runs[q][2])}", file=sys.stderr)
    times: dict[str, list[float]] = {q: [] for q in quants}
    for _ in range(3):  # warm-up steps
        for q, (e, seqs, _) in runs.items():
            e.decode(seqs)
    _sync(args.device)
    for _ in range(args.steps):
        for q, (e, seqs, _) in runs.items():
            t0 = time.perf_counter()
            e.decode(seqs)
            _sync(args.device)
            times[q].append(time.perf_counter() - t0)
    result = {
        "bench": "quant", "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                  "intermediate": args.intermediate, "rows": args.rows, "rank": args.rank, "ctx": args.ctx},
        "steps": args.steps,
    }
    ref = quants[0]
    for q in quants:
        info = runs[q][2]
        med, low = statistics.median(times[q]), min(times[q])
        result[q] = {**info, "decode_step_ms_median": round(med * 1e3, 3), "decode_step_ms_min": round(low * 1e3, 3)}
        if q != ref:
            result[q]["decode_vs_" + ref] = round(med / statistics.median(times[ref]), 3)
            result[q]["weights_vs_" + ref] = round(info["weights_bytes"] / runs[ref][2]["weights_bytes"], 3)
    print(json.dumps(result))
    del runs
    gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

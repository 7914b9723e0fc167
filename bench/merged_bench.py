"""Merged-pool benchmark: one tenant's requests on a merged pool (its adapter merged into the base at
load) against the base model alone and against the same adapter unmerged on a shared pool, over real
HTTP (two runtimes on loopback in this process; one request of each contender in turn), one JSON line.

Usage: python bench/merged_bench.py [--quick] [--rounds 5] [--requests 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import torch  # noqa: E402

# Test support code (seeded models, adapter makers) lives under tests/support, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = "please refund me , the invoice is wrong and the order never came"


def machine() -> dict:
    cpu = cpu_model()
    return {"nproc": os.cpu_count(), "cpu": cpu, "load_avg": os.getloadavg()[0], "torch": torch.__version__,
            "python": platform.python_version()}


def one(c: httpx.Client, model: str, new: int) -> float:
    """Seconds of one greedy completion of ``new`` tokens."""
    t0 = time.perf_counter()
    r = c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": new, "temperature": 0,
                                        "ignore_eos": True})
    took = time.perf_counter() - t0
    r.raise_for_status()
    return took


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and counts (a smoke test)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=20, help="sequential requests per contender per round")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from support.models import make_generation_adapter, make_tiny_llama, put_adapter, start_runtime

    hidden, layers, r = (64, 2, 4) if a.quick else (512, 6, 16)
    rounds, n = (1, 3) if a.quick else (a.rounds, a.requests)
    tmp = Path(tempfile.mkdtemp(prefix="lorafleet-merged-bench-"))
    model = make_tiny_llama(tmp / "model", hidden=hidden, layers=layers, heads=8, kv_heads=4, max_len=512)
    adapter = make_generation_adapter(model, tmp / "adapter", seed=1, r=r, alpha=2 * r)
    common = {"max_batch_size": 8, "max_batch_delay_ms": 0}
    shared = start_runtime(model, served_model_name="shared", **common)
    merged = start_runtime(model, served_model_name="hot", merged_adapter_dir=str(adapter),
                           merged_adapter_name="acme-chat", merged_adapter_version="1", merged_adapter_tenant="acme",
                           **common)
    try:
        with httpx.Client(base_url=shared.admin_url) as admin:
            put_adapter(admin, "acme-chat", "1", adapter, tenant="acme").raise_for_status()
        for srv in (shared, merged):
            httpx.put(f"{srv.admin_url}/admin/sync", json={"routesGeneration": 1, "preloadPending": 0})
        contenders = {"base": (shared.url, "shared"), "merged": (merged.url, "acme-chat"),
                      "shared_adapter": (shared.url, "acme-chat")}
        clients = {k: httpx.Client(base_url=url, timeout=120) for k, (url, _) in contenders.items()}
        for k, (_, m) in contenders.items():  # warm up (first slot write, allocator)
            for _ in range(2):
                one(clients[k], m, a.new_tokens)
        # One request of each contender in turn, so load from elsewhere on the machine falls on all
        # three alike; each figure is the median over every request, its spread the quartiles.
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for i in range(rounds * n):
            order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
            for k in order:
                times[k].append(one(clients[k], contenders[k][1], a.new_tokens))
        for c in clients.values():
            c.close()
        best = {k: statistics.median(v) for k, v in times.items()}
        quartiles = {k: [round(q, 5) for q in statistics.quantiles(v, n=4)] if len(v) > 1 else [] for k, v in times.items()}
        out = {
            "bench": "merged_pool", "model": {"hidden": hidden, "layers": layers, "lora_rank": r,
                                              "targets": "q,k,v,o"},
            "new_tokens": a.new_tokens, "requests": rounds * n, "threads": a.threads,
            "latency_s": {k: round(v, 5) for k, v in best.items()}, "quartiles_s": quartiles,
            "merged_over_base": round(best["merged"] / best["base"], 4),
            "shared_adapter_over_base": round(best["shared_adapter"] / best["base"], 4),
            "merged_over_shared_adapter": round(best["merged"] / best["shared_adapter"], 4),
            "target_merged_over_base": 1.02,
            "machine": machine(),
        }
        print(json.dumps(out))
    finally:
        shared.stop()
        merged.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

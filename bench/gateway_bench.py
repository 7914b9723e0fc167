"""Gateway benchmark: adapter-affinity routing vs round-robin in front of the same real runtime replicas
(``lorafleet serve`` processes of a tiny Llama), many adapters spread uniformly at random. Reports adapter
loads into device slots per 1,000 requests and p50/p99 latency through the gateway. Prints one JSON line.

Both policies run against the same replicas (same model, adapters and seeded request sequence) in
alternating rounds; each round starts its own gateway, sends a warm-up, then the measured requests.
Loads are the mean of the rounds, latency the best round (the least disturbed on a shared machine).

    $(tools/venv)/bin/python bench/gateway_bench.py [--replicas 4] [--adapters 400] [--slots 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from lorafleet.localstack.procs import ManagedProcess, free_port, wait_for

# Test support code (tiny seeded models, adapter makers) lives under tests/support, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_adapters(model: Path, out: Path, n: int) -> None:
    """One adapter saved by PEFT, then ``n`` siblings with its config and seeded random factors of the
    same shapes (distinct digests; seconds instead of minutes of PEFT saves)."""
    import torch
    from safetensors.torch import load_file, save_file

    from support.models import make_generation_adapter

    proto = make_generation_adapter(model, out / "_proto", seed=1, r=8, alpha=16)
    tensors = load_file(str(proto / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for i in range(n):
        d = out / f"tenant{i:04d}"
        d.mkdir(parents=True)
        shutil.copy(proto / "adapter_config.json", d / "adapter_config.json")
        save_file({k: torch.randn(v.shape, generator=g) * (0.2 if "lora_B" in k else 1 / v.shape[-1] ** 0.5)
                   for k, v in tensors.items()}, str(d / "adapter_model.safetensors"))
    shutil.rmtree(proto)


METRICS_URLS: dict[str, str] = {}  # a replica's public URL -> its metrics URL


def device_fills(url: str) -> float:
    """Adapters written into device slots so far: evictions plus the slots now occupied (nothing is
    unregistered during the run, so every other fill is still resident)."""
    text = httpx.get(f"{METRICS_URLS[url]}/metrics", timeout=10).text
    ev = float(re.search(r'lorafleet_runtime_adapter_evictions_total\{tier="device"\} (\S+)', text).group(1))
    resident = float(re.search(r'lorafleet_runtime_adapters\{tier="device"\} (\S+)', text).group(1))
    return ev + resident


class GatewayThread:
    """The gateway (no tenant keys: the benchmark measures routing) on its own event loop and thread."""

    def __init__(self, replicas: dict[str, str], policy: str, spill_inflight: int):
        from lorafleet.gateway.server import Gateway

        self.gw = Gateway(lambda: dict(replicas), None, policy=policy, spill_inflight=spill_inflight,
                          replica_poll_s=0.25)
        self.port, self.ops_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ops_url = f"http://127.0.0.1:{self.ops_port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        async def main():
            runner = web.AppRunner(self.gw.app(), access_log=None)
            ops = web.AppRunner(self.gw.ops_app(), access_log=None)
            await runner.setup()
            await ops.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            await web.TCPSite(ops, "127.0.0.1", self.ops_port).start()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()
            await ops.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def start(self) -> "GatewayThread":
        self._thread.start()
        self._ready.wait(30)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


async def drive(url: str, sequence: list[str], concurrency: int, max_tokens: int) -> list[float]:
    latencies: list[float] = []
    failures: list[str] = []
    it = iter(sequence)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker():
            for model in it:
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json={"model": model, "prompt": "hello world , how are",
                                                          "max_tokens": max_tokens, "temperature": 0})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                latencies.append(time.perf_counter() - t0)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    return latencies


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def start_replicas(args, model: Path, adapters: Path, logs: Path) -> tuple[list[ManagedProcess], dict[str, str]]:
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs, urls = [], {}
    for i in range(args.replicas):
        port = free_port()
        name = f"replica-{i}"
        procs.append(ManagedProcess(name, [
            sys.executable, "-m", "lorafleet", "serve", "--model", str(model), "--adapters", str(adapters),
            "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(free_port()),
            "--metrics-port", str(metrics_port := free_port()),
            "--device-slots", str(args.slots), "--host-adapters", str(args.adapters),
            "--max-batch-delay-ms", "1", "--log-level", "warning"], logs / f"{name}.log", env=env))
        urls[name] = f"http://127.0.0.1:{port}"
        METRICS_URLS[urls[name]] = f"http://127.0.0.1:{metrics_port}"
    for p, url in zip(procs, urls.values()):
        p.wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 300, "ready")
    return procs, urls


def served_by(gw, urls) -> list[float]:
    return [gw.gw.metrics.requests.labels("_anonymous", r, "200")._value.get() for r in urls]


def run_round(policy: str, args, urls: dict[str, str], warmup: list[str], measured: list[str]) -> dict:
    """One policy on the running replicas: its own warm-up (which reshuffles whatever the previous
    round left in the device slots), then the measured requests."""
    gw = GatewayThread(urls, policy, args.spill_inflight).start()
    try:
        wait_for(lambda: httpx.get(f"{gw.ops_url}/readyz").status_code == 200 and
                 all(v["healthy"] and v["adapters"] == args.adapters
                     for v in httpx.get(f"{gw.ops_url}/readyz").json()["replicas"].values()),
                 60, what="the gateway to see every replica")
        asyncio.run(drive(gw.url, warmup, args.concurrency, args.max_tokens))
        before, served0 = sum(device_fills(u) for u in urls.values()), served_by(gw, urls)
        t0 = time.perf_counter()
        lat = asyncio.run(drive(gw.url, measured, args.concurrency, args.max_tokens))
        wall = time.perf_counter() - t0
        loads = sum(device_fills(u) for u in urls.values()) - before
        served = [b - a for a, b in zip(served0, served_by(gw, urls))]
    finally:
        gw.stop()
    return {"device_loads_per_1000": round(loads * 1000 / len(measured), 1),
            "p50_ms": round(pct(lat, 50) * 1000, 1), "p99_ms": round(pct(lat, 99) * 1000, 1),
            "requests_per_s": round(len(measured) / wall, 1),
            "busiest_replica_share": round(max(served) / max(1, sum(served)), 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--adapters", type=int, default=400)
    p.add_argument("--slots", type=int, default=100, help="device slots per replica")
    p.add_argument("--requests", type=int, default=1000, help="measured requests per policy")
    p.add_argument("--warmup", type=int, default=1000, help="requests before measuring, per policy")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--spill-inflight", type=int, default=3,
                   help="the gateway's --spill-inflight (docs/benchmarks.md: 3 and 8 compared)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, alternating round-robin and affinity")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from support.models import make_tiny_llama

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    try:
        model = make_tiny_llama(work / "model")
        t0 = time.perf_counter()
        make_adapters(model, work / "adapters", args.adapters)
        made = time.perf_counter() - t0
        names = [f"tenant{i:04d}" for i in range(args.adapters)]
        rnd = random.Random(42)  # the same uniform request sequence for both policies
        warmup = [rnd.choice(names) for _ in range(args.warmup)]
        measured = [rnd.choice(names) for _ in range(args.requests)]
        out = {"replicas": args.replicas, "adapters": args.adapters, "device_slots_per_replica": args.slots,
               "requests": args.requests, "warmup": args.warmup, "rounds": args.rounds, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "adapters_made_s": round(made, 1)}
        procs, urls = start_replicas(args, model, work / "adapters", work / "logs")
        rounds: dict[str, list[dict]] = {"round-robin": [], "affinity": []}
        try:
            for _ in range(args.rounds):
                for policy in rounds:
                    rounds[policy].append(run_round(policy, args, urls, warmup, measured))
        finally:
            for p in procs:
                p.stop()
        for policy, rs in rounds.items():
            # Loads: the mean of the rounds. Latency: the best round (the least disturbed on a shared machine).
            best = min(rs, key=lambda r: r["p50_ms"])
            out[policy] = {"device_loads_per_1000": round(sum(r["device_loads_per_1000"] for r in rs) / len(rs), 1),
                           "p50_ms": best["p50_ms"], "p99_ms": best["p99_ms"],
                           "requests_per_s": best["requests_per_s"],
                           "busiest_replica_share": round(max(r["busiest_replica_share"] for r in rs), 3),
                           "rounds": rs}
        rr, af = out["round-robin"], out["affinity"]
        out["loads_ratio_affinity_vs_rr"] = round(af["device_loads_per_1000"] / max(rr["device_loads_per_1000"], 1e-9), 3)
        print(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

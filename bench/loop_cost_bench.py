"""The runtime's event loop: CPU time per request, one JSON line.

On a CPU the event loop shares the machine (and the interpreter lock) with the model worker, so every
millisecond it spends on a request is taken from the forward passes or from the next refusal. This
measures that cost as the loop thread's own CPU time (``time.thread_time`` read on the loop), which a
busy, shared machine changes far less than it changes throughput:

  refused     classification requests answered 429 by the admission gate (the model worker held by a
              blocking control operation, a cap of 2 per tenant: all but the first 2 of each tenant are
              refused); loop CPU per refusal
  classify    single-text /v1/classify answered by MiniLM (32 clients); loop CPU per answer and the
              model worker's CPU per answer
  generate    /v1/completions of 8 tokens answered by the tiny seeded Llama (32 clients), greedy; the same

The runtime runs in this process (RuntimeServer); the load comes from --procs other processes
(overload_bench's lean HTTP/1.1 client). Answers are checked against PEFT (overload_bench's oracle).

Usage: python bench/loop_cost_bench.py [--requests 4000] [--clients 200] [--scenarios refused,classify,generate]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import overload_bench as ob  # noqa: E402


async def _load(url: str, task: str, tenants: list[str], expected: dict, clients: int, requests: int,
                start: float) -> dict:
    http = ob.Http(url)
    await asyncio.sleep(max(0.0, start - time.time()))
    n_texts = len(ob.TEXTS) if task == "classify" else len(ob.PROMPTS)
    counts = {"200": 0, "429": 0, "other": 0, "wrong": 0}
    left = [requests]

    async def client(c: int):
        i = c
        while left[0] > 0:
            left[0] -= 1
            tenant = tenants[i % len(tenants)]
            path, body = ob._request(task, tenant, i)
            status, _, payload = await http.post(path, json.dumps(body).encode())
            if status == 200:
                counts["200"] += 1
                if ob._wrong(task, json.loads(payload), expected[tenant][i % n_texts]):
                    counts["wrong"] += 1
            elif status == 429:
                counts["429"] += 1
            else:
                counts["other"] += 1
            i += clients

    await asyncio.gather(*(client(c) for c in range(clients)))
    return counts


def _load_main(args, out) -> None:
    out.put(asyncio.run(_load(*args)))


def _thread_cpu(tid: int) -> float:
    fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(scenario: str, args, workdir: Path) -> dict:
    import httpx

    from support.models import put_adapter, start_runtime

    task = "generate" if scenario == "generate" else "classify"
    model, adapters, expected = ob.prepare(task, 4, workdir)
    cap = {"per_tenant_max_inflight": 2} if scenario == "refused" else {}
    srv = start_runtime(model, device_slots=8, max_batch_size=32, max_queue_delay_ms=0, **cap)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in sorted(expected):
                assert put_adapter(admin, name, "1", adapters / name).status_code == 200
            admin.put("/admin/sync", json={"preloadPending": 0})
        loop = srv._loop
        stack = getattr(srv, "stack", None) or ("asyncio", "?")

        async def thread_time():
            return time.thread_time()

        def loop_cpu() -> float:
            return asyncio.run_coroutine_threadsafe(thread_time(), loop).result(30)

        worker = srv.rt.engine.worker
        gate, held = threading.Event(), threading.Event()
        if scenario == "refused":
            def hold():
                held.set()
                gate.wait(600)
            srv.rt.engine.scheduler.post(hold)
            assert held.wait(30)
            # Each tenant's first 2 fill its cap and wait for the held worker; all later ones are refused.
            sched = srv.rt.engine.scheduler
            fillers = [threading.Thread(target=httpx.post, daemon=True, args=(srv.url + "/v1/classify",),
                                        kwargs={"json": {"model": t, "input": "x"}, "timeout": 900})
                       for t in sorted(expected) for _ in range(2)]
            for f in fillers:
                f.start()
            deadline = time.monotonic() + 60
            while sched.queued < len(fillers):
                assert time.monotonic() < deadline, "the cap-filling requests did not queue"
                time.sleep(0.05)
        clients = args.clients if scenario == "refused" else 32
        # Warm-up (first requests pay imports and caches), then the measured requests.
        ctx = mp.get_context("spawn")
        for measured in (False, True):
            n = args.requests if measured else 200
            q = ctx.Queue()
            start = time.time() + 4.0  # the generators import before they send
            per = [n // args.procs + (1 if p < n % args.procs else 0) for p in range(args.procs)]
            procs = [ctx.Process(target=_load_main, daemon=True,
                                 args=((srv.url, task, sorted(expected), expected, max(1, clients // args.procs), k, start), q))
                     for k in per]
            for p in procs:
                p.start()
            time.sleep(max(0.0, start - 0.2 - time.time()))
            c0, w0, t0 = loop_cpu(), _thread_cpu(worker.native_id), time.time()
            results = [q.get(timeout=900) for _ in procs]
            c1, w1, t1 = loop_cpu(), _thread_cpu(worker.native_id), time.time()
            for p in procs:
                p.join(30)
        gate.set()
        total = {k: sum(r[k] for r in results) for k in results[0]}
        handled = total["429"] if scenario == "refused" else total["200"]
        out = {"scenario": scenario, "loop": stack[0], "http": stack[1], "requests": args.requests,
               "answers": total["200"], "refused_429": total["429"], "other": total["other"], "wrong": total["wrong"],
               "wall_s": round(t1 - t0, 1),
               "loop_cpu_ms_per_request": round((c1 - c0) * 1e3 / max(1, handled), 3),
               "worker_cpu_ms_per_answer": (round((w1 - w0) * 1e3 / total["200"], 3) if total["200"] and
                                            scenario != "refused" else None)}
        print(json.dumps(out), file=sys.stderr)
        return out
    finally:
        gate.set()
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenarios", default="refused,classify,generate")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--clients", type=int, default=200, help="concurrent clients of the refused scenario")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/lorafleet-overload-bench")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = {"bench": "loop_cost", "machine": ob.machine(),
           "runs": [run(s, args, workdir) for s in args.scenarios.split(",")]}
    out["machine_after"] = {"load_average": [round(x, 1) for x in os.getloadavg()]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

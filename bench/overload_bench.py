"""Runtime under overload: `lorafleet serve` in its own process, load from other processes, one JSON line.

For each task (classification on MiniLM, generation on the tiny seeded Llama) and each tenant count:
  closed  concurrency sweep (each client sends its next request when the last is answered; a 429 makes
          it wait the Retry-After): answers/s, p50/p99 of the answers, 429s by reason, wrong answers
  open    offered rate sweep at multiples of the best closed-loop rate (Poisson arrivals, no retries):
          the same, the rate the generator really sent (verified against the target) and per-tenant
          share of the answers (min/max over tenants of answers / requests sent)
Every answer is checked against its tenant's PEFT oracle (classification: every label's score within
1e-3, generation: PEFT's greedy text). The generator runs in --procs processes of its own (asyncio +
a lean HTTP/1.1 client of its own on uvloop, keep-alive connections opened as needed); their CPU time, the
connections they opened, the server's CPU and its garbage collector's time (server_gc_share, full_collections)
are reported so a reader can tell which one was the limit.

Usage: python bench/overload_bench.py [--quick] [--tasks classify,generate] [--tenants 1,100]
       [--concurrency 1,8,32,200,1000] [--overload 0.5,1,2,5] [--seconds 8] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import cpu_model, cpu_seconds, tree_cpu_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny seeded models and adapter makers (tests/support)
sys.path.insert(0, str(ROOT / "src"))

TEXTS = ["my order has not arrived", "the invoice is wrong , please refund me", "great product , thanks !",
         "please reset my password", "where is my parcel today ?", "the app shows an error at login"]
PROMPTS = ["hello world , how are", "the quick brown fox", "my order has not", "one two three four"]
NEW_TOKENS = 8


# --- fixtures: adapters and their oracle ------------------------------------------------------------------
def prepare(task: str, tenants: int, workdir: Path) -> tuple[Path, Path, dict]:
    """(model dir, adapters dir, oracle) with ``tenants`` adapters; cached in ``workdir``."""
    import torch

    from support.models import (PeftOracle, make_classification_suite, make_generation_suite, make_tiny_llama,
                                minilm_path)

    root = workdir / f"{task}-{tenants}"
    oracle_file = root / "oracle.json"
    if task == "classify":
        model = minilm_path()
    else:
        model = workdir / "tiny-llama"
        if not (model / "config.json").exists():
            make_tiny_llama(model)
    if oracle_file.exists():
        return model, root / "adapters", json.loads(oracle_file.read_text())
    adapters = root / "adapters"
    if task == "classify":
        paths = make_classification_suite(model, adapters, tenants, prefix="t")
        oracle = PeftOracle(model, "sequence-classification")
        expected = {name: torch.softmax(oracle.logits(p, TEXTS), -1).tolist() for name, p in paths.items()}
    else:
        paths = make_generation_suite(model, adapters, tenants, prefix="t")
        oracle = PeftOracle(model, "text-generation")
        expected = {name: [oracle.tok.decode(oracle.greedy(p, q, NEW_TOKENS), skip_special_tokens=True)
                           for q in PROMPTS] for name, p in paths.items()}
    oracle_file.write_text(json.dumps(expected))
    return model, adapters, expected


# --- the server ---------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model: Path, adapters: Path, args, log: Path):
        from lorafleet.localstack.procs import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}"  # /metrics has a port of its own
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, "-m", "lorafleet", "serve", "--model", str(model), "--adapters", str(adapters),
               "--host", "127.0.0.1", "--port", str(self.port), "--admin-port", str(free_port()), "--metrics-port", str(metrics_port),
               "--device-slots", "128", "--host-adapters", "512", "--max-batch-size", str(args.max_batch_size),
               "--max-queue-delay-ms", str(args.max_queue_delay_ms), "--torch-threads", str(args.threads),
               "--front", args.front, "--model-process", args.model_process, "--log-level", "warning"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorafleet serve exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lorafleet serve not ready in 600 s; see {log}")
            time.sleep(0.5)

    def cpu_split(self) -> tuple[float, float]:
        """CPU seconds of the server process itself and of its children alive now (the HTTP front process
        with --front process, the model process with --model-process process): a child's time counts while it
        runs, not only once reaped."""
        own = cpu_seconds(self.proc.pid)
        return own, tree_cpu_seconds(self.proc.pid) - own

    def batches(self) -> tuple[float, ...] | None:
        """(forward passes, rows, seconds in forward passes, the model thread's CPU seconds in them, seconds the
        server process's garbage collector ran, its full collections) so far,
        from /metrics; None when the metrics port does not answer within 10 s (it shares the overloaded event loop): the run goes on."""
        import httpx

        try:
            text = httpx.get(self.metrics_url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        vals = {}
        # Line prefixes; each sums over the label sets that follow it.
        keys = ("lorafleet_runtime_batch_size_count{", "lorafleet_runtime_batch_size_sum{",
                "lorafleet_runtime_batch_seconds_sum{", "lorafleet_runtime_batch_cpu_seconds_total{",
                "lorafleet_runtime_gc_pause_seconds_sum{", 'lorafleet_runtime_gc_pause_seconds_count{generation="2"')
        for line in text.splitlines():
            for key in keys:
                if line.startswith(key):
                    vals[key] = vals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        return tuple(vals.get(k, 0.0) for k in keys)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# --- the load generator (runs in its own processes) ----------------------------------------------------------
def _request(task: str, tenant: str, i: int) -> tuple[str, dict]:
    if task == "classify":
        return "/v1/classify", {"model": tenant, "input": TEXTS[i % len(TEXTS)]}
    return "/v1/completions", {"model": tenant, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": NEW_TOKENS,
                               "temperature": 0}


def _wrong(task: str, body: dict, want) -> bool:
    try:
        if task == "classify":
            scores = [s["score"] for s in body["data"][0]["labels"]]
            return len(scores) != len(want) or any(abs(a - b) > 1e-3 for a, b in zip(scores, want))
        return body["choices"][0]["text"] != want
    except (KeyError, IndexError, TypeError):
        return True


class Http:
    """A lean HTTP/1.1 client over keep-alive connections (one request at a time on each, new ones opened
    as needed): request bytes are built once per body, and a response's status, Retry-After and body
    are all it reads. aiohttp spent about 0.9 ms of CPU per request here, so the generators took more
    of the 2 cores than the server did under 5x load; this one spends a fraction of that."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.host, self.port = u.hostname, u.port or 80
        self.idle: list = []
        self.opened = 0

    async def post(self, path: str, body: bytes) -> tuple[int, float, bytes]:
        """(status, Retry-After or 0, body); raises OSError / asyncio.IncompleteReadError."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            self.opened += 1
        try:
            writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d"
                         b"\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
            status_line = await reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection")
            status = int(status_line.split(b" ", 2)[1])
            length, retry, close, chunked = 0, 0.0, False, False
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"retry-after":
                    retry = float(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                parts = []
                while True:
                    n = int((await reader.readline()).split(b";")[0], 16)
                    if n == 0:
                        await reader.readline()
                        break
                    parts.append(await reader.readexactly(n))
                    await reader.readline()
                data = b"".join(parts)
            else:
                data = await reader.readexactly(length) if length else b""
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, retry, data


async def _generate(spec: dict) -> dict:
    task, url, tenants, expected = spec["task"], spec["url"], spec["tenants"], spec["expected"]
    rng = random.Random(spec["seed"])
    start, stop = spec["start"], spec["stop"]  # wall-clock window (time.time) measured; load runs until stop
    records: list[tuple] = []  # (t_sent, latency, status, tenant index, wrong, code, lag)
    n_texts = len(TEXTS) if task == "classify" else len(PROMPTS)
    http = Http(url)
    bodies: dict[tuple[int, int], tuple[str, bytes]] = {}

    async def one(k: int, i: int, lag: float) -> float:
        """Send one request; the seconds to wait before the next (closed loop: Retry-After on 429)."""
        tenant = tenants[k]
        key = (k, i % n_texts)
        if key not in bodies:
            path, body = _request(task, tenant, i)
            bodies[key] = (path, json.dumps(body).encode())
        path, raw = bodies[key]
        t0 = time.time()
        wait = 0.0
        try:
            async with asyncio.timeout(spec["client_timeout"]):
                status, retry, payload = await http.post(path, raw)
            try:
                data = json.loads(payload) if payload else None
            except ValueError:
                data = None
            if status == 200:
                wrong = not isinstance(data, dict) or _wrong(task, data, expected[tenant][i % n_texts])
                code = ""
            else:
                wrong = False
                code = (data.get("error") or {}).get("code", "") if isinstance(data, dict) else ""
                if status == 429:
                    wait = retry or 1.0
        except TimeoutError:
            status, wrong, code = 0, False, "client_timeout"
        except (OSError, asyncio.IncompleteReadError, ValueError) as e:
            status, wrong, code = -1, False, type(e).__name__
        records.append((t0, time.time() - t0, status, k, wrong, code, lag))
        return wait

    while time.time() < start - spec["warmup"]:
        await asyncio.sleep(0.01)
    if spec["mode"] == "closed":
        async def client(c: int):
            i = c
            while time.time() < stop:
                wait = await one(rng.randrange(len(tenants)), i, 0.0)
                i += 1
                if wait:
                    await asyncio.sleep(min(wait, max(0.0, stop - time.time())))
        await asyncio.gather(*(client(c) for c in range(spec["clients"])))
    else:
        rate = spec["rate"]
        tasks = set()
        t_next = time.time()
        i = 0
        while t_next < stop:
            now = time.time()
            if t_next > now:
                await asyncio.sleep(t_next - now)
            lag = time.time() - t_next
            t = asyncio.ensure_future(one(rng.randrange(len(tenants)), i, lag))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
            t_next += rng.expovariate(rate)
        if tasks:
            await asyncio.wait(tasks, timeout=spec["client_timeout"] + 5)
    for _, writer in http.idle:
        writer.close()
    return {"records": [r for r in records if start <= r[0] < stop], "cpu_s": time.process_time(),
            "connections": http.opened}


def _generator_main(spec: dict, out) -> None:
    try:
        import uvloop
    except ImportError:
        out.put(asyncio.run(_generate(spec)))
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out.put(runner.run(_generate(spec)))


# --- one measured run ------------------------------------------------------------------------------------
def run(server: Server, task: str, expected: dict, mode: str, level: float, args) -> dict:
    """``level``: concurrent clients (closed) or requests per second (open), split over the processes."""
    tenants = sorted(expected)
    procs = args.procs
    t_start = time.time() + 1.0 + args.warmup  # every generator process is up before the window
    t_stop = t_start + args.seconds
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = []
    for p in range(procs):
        share = level / procs
        spec = {"task": task, "url": server.url, "tenants": tenants, "expected": expected, "seed": 1000 + p,
                "start": t_start, "stop": t_stop, "warmup": args.warmup, "mode": mode,
                "clients": int(level) // procs + (1 if p < int(level) % procs else 0), "rate": share,
                "client_timeout": args.client_timeout}
        if mode == "closed" and spec["clients"] == 0:
            continue
        proc = ctx.Process(target=_generator_main, args=(spec, q), daemon=True)
        proc.start()
        ps.append(proc)
    while time.time() < t_start:
        time.sleep(0.01)
    cpu0, b0 = server.cpu_split(), server.batches()
    while time.time() < t_stop:
        time.sleep(0.05)
    cpu1, b1 = server.cpu_split(), server.batches()
    results = [q.get(timeout=args.client_timeout + 120) for _ in ps]
    for proc in ps:
        proc.join(30)
    recs = [r for res in results for r in res["records"]]
    ok = [r for r in recs if r[2] == 200]
    lat = sorted(r[1] for r in ok)
    by_code: dict[str, int] = {}
    for r in recs:
        if r[2] != 200:
            by_code[r[5] or str(r[2])] = by_code.get(r[5] or str(r[2]), 0) + 1
    sent = [0] * len(tenants)
    served = [0] * len(tenants)
    for r in recs:
        sent[r[3]] += 1
        if r[2] == 200:
            served[r[3]] += 1
    shares = [s / n for s, n in zip(served, sent) if n]
    forwards, rows, busy, busy_cpu = ((b1[0] - b0[0]), (b1[1] - b0[1]), (b1[2] - b0[2]), (b1[3] - b0[3])) \
        if b0 and b1 else (0, 0, None, None)
    out = {"mode": mode, ("clients" if mode == "closed" else "offered_per_s"): round(level, 1),
           "answers_per_s": round(len(ok) / args.seconds, 1),
           "p50_ms": round(_pct(lat, 50) * 1e3, 1) if lat else None,
           "p99_ms": round(_pct(lat, 99) * 1e3, 1) if lat else None,
           "sent": len(recs), "answered": len(ok), "wrong": sum(1 for r in ok if r[4]),
           "refused": by_code,
           "server_cpu": round((sum(cpu1) - sum(cpu0)) / args.seconds, 2),
           "children_cpu": round((cpu1[1] - cpu0[1]) / args.seconds, 2),  # front and model processes
           "generator_cpu_s": round(sum(res["cpu_s"] for res in results), 1),
           "connections": sum(res["connections"] for res in results),
           "mean_batch": round(rows / forwards, 1) if forwards else None,
           "model_busy": round(busy / args.seconds, 2) if busy is not None else None,
           # The model thread's CPU over its wall time in forwards: below 1 it waited (a core, the GIL).
           "model_cpu_share": round(busy_cpu / busy, 2) if busy else None,
           "step_ms": round(busy / forwards * 1e3, 2) if busy and forwards else None,
           # The server process's garbage collector: its passes hold the interpreter lock (loop and worker wait).
           "server_gc_share": round((b1[4] - b0[4]) / args.seconds, 3) if b0 and b1 else None,
           "full_collections": int(b1[5] - b0[5]) if b0 and b1 else None}
    if mode == "open":
        out["sent_per_s"] = round(len(recs) / args.seconds, 1)
        lags = sorted(r[6] for r in recs)
        out["send_lag_p99_ms"] = round(_pct(lags, 99) * 1e3, 1) if lags else None
        out["tenant_share_min_max"] = [round(min(shares), 3), round(max(shares), 3)] if shares else None
    print(json.dumps(out), file=sys.stderr)
    return out


def _pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def machine() -> dict:
    cpu = cpu_model()
    return {"nproc": os.cpu_count(), "cpu": cpu, "load_average": [round(x, 1) for x in os.getloadavg()],
            "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny sweep (a smoke test)")
    p.add_argument("--tasks", default="classify,generate")
    p.add_argument("--tenants", default="1,100")
    p.add_argument("--concurrency", default="1,8,32,200,1000")
    p.add_argument("--overload", default="0.5,1,2,5", help="open-loop rates as multiples of the best closed rate (empty: none)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured window of each run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=1,
                   help="closed-loop sweeps per configuration, one after another on one server: saturated_vs_best "
                        "is the median of the rounds' ratios, each to its own round's best (this machine's speed "
                        "moves from minute to minute); the open-loop rates use the median best")
    p.add_argument("--procs", type=int, default=2, help="load generator processes")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="the server's torch threads (--torch-threads; default the runtime's own: cores - 1)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2000.0)
    p.add_argument("--client-timeout", type=float, default=30.0)
    p.add_argument("--front", choices=("auto", "inline", "process"), default="auto",
                   help="the server's HTTP front (lorafleet serve --front): inline in the engine's process, "
                        "a process of its own, or the runtime's choice (auto)")
    p.add_argument("--model-process", choices=("auto", "inline", "process"), default="auto",
                   help="where the server's model computes (lorafleet serve --model-process)")
    p.add_argument("--workdir", default="/tmp/lorafleet-overload-bench")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be at least 1, not {args.repeat}")
    if args.quick:
        args.tenants, args.concurrency, args.overload, args.seconds, args.warmup = "4", "1,16", "2", 2.0, 0.5
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out: dict = {"bench": "overload", "machine": machine(), "seconds": args.seconds, "procs": args.procs,
                 "threads": args.threads, "front": args.front, "model_process": args.model_process,
                 "max_queue_delay_ms": args.max_queue_delay_ms}
    for task in args.tasks.split(","):
        for n in [int(x) for x in args.tenants.split(",")]:
            model, adapters, expected = prepare(task, n, workdir)
            server = Server(model, adapters, args, workdir / f"serve-{task}-{n}.log")
            rounds: list[list[dict]] = []
            try:
                for k in range(args.repeat):  # the whole sweep again: a round's ratios share its minutes
                    rounds.append([dict(run(server, task, expected, "closed", c, args), round=k + 1)
                                   for c in [int(x) for x in args.concurrency.split(",")]])
                bests = [max(r["answers_per_s"] for r in closed) for closed in rounds]
                best = statistics.median(bests)
                opened = [run(server, task, expected, "open", best * m, args)
                          for m in [float(x) for x in args.overload.split(",") if x]]
            finally:
                server.stop()
            ratios = [{r["clients"]: round(r["answers_per_s"] / b, 2) for r in closed if r["clients"] >= 200}
                      for closed, b in zip(rounds, bests)]
            closed_all = [r for closed in rounds for r in closed]
            out[f"{task}_{n}"] = {"closed": closed_all, "open": opened, "best_answers_per_s": best,
                                  "saturated_vs_best": {c: statistics.median(r[c] for r in ratios) for c in ratios[0]},
                                  "rounds_saturated_vs_best": ratios,
                                  "wrong": sum(r["wrong"] for r in closed_all + opened)}
    out["machine_after"] = {"load_average": [round(x, 1) for x in os.getloadavg()]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving benchmark at the level users feel: engines under open-loop load through HTTP, one JSON line.

Contenders, each a server in its own process, one after another on the same seeded model and adapters:
  torch  lorafleet's torch engine (`lorafleet serve --engine torch`, its default --model-process)
  torch-inline / torch-process  the same with `--model-process inline` / `process` (side by side in one run)
  vllm   lorafleet's vLLM engine (`lorafleet serve --engine vllm`, run by the vLLM virtualenv's python)
  peft   the seed article's baseline: one PEFT model behind an asyncio.Lock, set_adapter per request
         (bench/peft_baseline.py; by default only N <= --peft-max-n: loading 1,000 PEFT adapters is slow)
Workload: a tiny seeded Llama built from a config (nothing downloaded), N seeded LoRA adapters of mixed ranks
(q/k/v/o), N = --n; prompts and output lengths from a fixed seeded distribution (ignore_eos, greedy), each
request's adapter drawn by Zipf(1.0) over the N. Streaming /v1/completions, so TTFT and the gaps between
streamed chunks (inter-token latency) are measured by the client.
For each contender and N:
  closed  --clients concurrent clients (each sends its next request when the last ends): the saturated
          figures (output tokens/s, requests/s)
  open    Poisson arrivals at --rates x the saturated requests/s: TTFT and inter-token latency p50/p99
The load generator runs in --procs processes (asyncio + aiohttp); each run reports the rate it really sent
against the offered one, its send lag, and its CPU time beside the server's (whole process tree).
Every answer's text is compared with the torch engine's for the same adapter and prompt (greedy: equal).

Usage: python bench/serve_bench.py [--quick] [--contenders torch,vllm,peft] [--n 1,100,1000] [--seconds 10]
       [--rates 0.5,0.9] [--repeat 3] [--vllm-python PATH] [--device cuda --dtype bfloat16 --hidden 4096 --layers 32]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import cpu_model, tree_cpu_seconds

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny seeded models (tests/support)
sys.path.insert(0, str(ROOT / "src"))

RANKS = (8, 16, 4)  # adapter i has rank RANKS[i % 3]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
WORKLOAD_SIZE = 256  # distinct (prompt, output length) pairs, drawn uniformly per request


# --- fixtures: model, adapters, workload ---------------------------------------------------------------------
def build_model(args, workdir: Path) -> Path:
    from support.models import make_tiny_llama

    heads = args.heads or max(1, args.hidden // 64)  # head_dim 64: what vLLM's CPU attention takes
    kv = args.kv_heads or max(1, heads // 2)
    out = workdir / f"llama-d{args.hidden}-l{args.layers}-h{heads}-kv{kv}-len{args.max_model_len}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_llama(tmp, hidden=args.hidden, layers=args.layers, heads=heads, kv_heads=kv,
                        max_len=args.max_model_len, seed=0)
        tmp.rename(out)
    return out


def build_adapters(model: Path, n: int) -> list[tuple[str, Path]]:
    """``n`` adapters in PEFT's format, ``t0..t{n-1}``: PEFT saves one per rank, the others are seeded copies
    of its tensors (same keys and config), much faster than n PEFT round trips. Cached beside the model."""
    import torch
    from safetensors.torch import load_file, save_file

    root = model.parent / f"{model.name}-adapters"
    templates = {}
    for r in RANKS:
        t = root / f"_template-r{r}"
        if not t.exists():
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(str(model))
            pm = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r,
                                                 target_modules=list(TARGETS)))
            tmp = t.with_name(t.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            pm.save_pretrained(str(tmp))
            tmp.rename(t)
        templates[r] = (t, load_file(str(t / "adapter_model.safetensors")))
    out = []
    for i in range(n):
        name, p = f"t{i}", root / f"t{i}"
        if not p.exists():
            t, tensors = templates[RANKS[i % len(RANKS)]]
            tmp = root / f".t{i}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            g = torch.Generator().manual_seed(1000 + i)
            save_file({k: (torch.randn(v.shape, generator=g) * (0.05 if "lora_B" in k else v.shape[-1] ** -0.5))
                       .contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
            for f in t.iterdir():
                if f.name != "adapter_model.safetensors":
                    (tmp / f.name).write_bytes(f.read_bytes())
            tmp.rename(p)
        out.append((name, p))
    return out


def build_workload(model: Path, args) -> list[tuple[str, int, int]]:
    """(prompt, prompt tokens, max_tokens) x WORKLOAD_SIZE from a fixed seed: prompt tokens uniform in
    --prompt-tokens, output tokens uniform in --output-tokens."""
    from transformers import AutoTokenizer

    from support.models import CORPUS

    tok = AutoTokenizer.from_pretrained(str(model))
    words = CORPUS.split()
    rng = random.Random(args.seed)
    lo, hi = (int(x) for x in args.prompt_tokens.split(","))
    olo, ohi = (int(x) for x in args.output_tokens.split(","))
    out = []
    for _ in range(WORKLOAD_SIZE):
        want = rng.randint(lo, hi)
        text = " ".join(rng.choice(words) for _ in range(want * 2))
        ids = tok(text, add_special_tokens=False)["input_ids"][: max(1, want - 1)]  # + BOS
        prompt = tok.decode(ids)
        out.append((prompt, len(tok(prompt)["input_ids"]), rng.randint(olo, ohi)))
    return out


def zipf_cum_weights(n: int, s: float = 1.0) -> list[float]:
    acc, out = 0.0, []
    for k in range(1, n + 1):
        acc += 1.0 / k ** s
        out.append(acc)
    return out


# --- the servers ---------------------------------------------------------------------------------------------
class Server:
    """One contender's server process, ready to answer."""

    def __init__(self, contender: str, model: Path, adapters: list[tuple[str, Path]], args, log: Path):
        from lorafleet.localstack.procs import free_port

        self.contender = contender
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url: str | None = None  # the runtime's own /metrics (lorafleet's engines only)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads)}
        listing = log.with_suffix(".adapters")
        listing.write_text("\n".join(f"{n}={p}" for n, p in adapters))
        if contender == "peft":
            cmd = [sys.executable, str(ROOT / "bench" / "peft_baseline.py"), "--model", str(model),
                   "--adapters", f"@{listing}", "--port", str(self.port), "--threads", str(args.threads),
                   "--device", args.device, "--dtype", args.dtype]
            self.ready_path = "/health"
        else:
            python = sys.executable
            if contender == "vllm":
                python = args.vllm_python
                env.pop("OMP_NUM_THREADS")  # vLLM's CPU build binds its own threads: left as it chooses
                env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
                env.setdefault("LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION", "0.3")
            env["LORA_ADAPTERS"] = ",".join(f"{n}={p}" for n, p in adapters)
            engine, _, where = contender.partition("-")
            metrics_port = free_port()
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            cmd = [python, "-m", "lorafleet", "serve", "--engine", engine, "--model", str(model),
                   "--host", "127.0.0.1", "--port", str(self.port), "--admin-port", str(free_port()),
                   "--metrics-port", str(metrics_port), "--device", args.device, "--dtype", args.dtype,
                   "--device-slots", str(args.device_slots), "--host-adapters", str(max(512, len(adapters))),
                   "--max-rank", str(max(RANKS)), "--max-batch-size", str(args.max_batch_size),
                   "--max-model-len", str(args.max_model_len), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
                   "--per-tenant-max-inflight", "1024", "--torch-threads", str(args.threads),
                   "--log-level", "warning"] + (["--model-process", where] if where else [])
            self.ready_path = "/readyz"
        self.log = open(log, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        import httpx

        deadline = t0 + args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{contender} server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{contender} server not ready in {args.start_timeout:.0f} s; see {log}")
            time.sleep(0.25)
        self.start_s = time.monotonic() - t0

    def cpu_s(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def engine_counters(self) -> dict[str, float]:
        """The runtime's own counters where it has them (lorafleet's engines; the PEFT baseline has
        none): model forwards, their rows, seconds and CPU seconds, device-slot evictions."""
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        want = {"lorafleet_runtime_batch_size": "rows", "lorafleet_runtime_batch_seconds": "seconds"}
        totals = {"lorafleet_runtime_batch_cpu_seconds_total": "cpu_seconds"}
        out: dict[str, float] = {}
        if not self.metrics_url:
            return out
        try:
            text = httpx.get(self.metrics_url, timeout=5).text
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    if smp.name.endswith("_sum") and smp.name[:-4] in want:
                        out[want[smp.name[:-4]]] = out.get(want[smp.name[:-4]], 0.0) + smp.value
                    elif smp.name in totals:
                        out[totals[smp.name]] = out.get(totals[smp.name], 0.0) + smp.value
                    elif smp.name == "lorafleet_runtime_batch_size_count":
                        out["forwards"] = out.get("forwards", 0.0) + smp.value
                    elif smp.name.startswith("lorafleet_runtime_adapter_evictions") and smp.labels.get("tier") == "device":
                        out["device_evictions"] = smp.value
        except (httpx.HTTPError, ValueError):
            return {}
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


# --- the load generator (runs in its own processes) ----------------------------------------------------------
async def _generate(spec: dict) -> dict:
    import aiohttp

    rng = random.Random(spec["seed"])
    spec["start"], spec["stop"] = spec.pop("window").get()  # (start, stop) once every process is up
    names, cw, work = spec["names"], spec["cum_weights"], spec["workload"]
    start, stop, url = spec["start"], spec["stop"], spec["url"] + "/v1/completions"
    total_w = cw[-1]
    records: list[dict] = []
    texts: dict[str, str] = {}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=spec["client_timeout"])

    def draw() -> tuple[int, int]:
        return bisect.bisect_left(cw, rng.random() * total_w), rng.randrange(len(work))

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        async def one(k: int, w: int, lag: float) -> float:
            """Send one request; returns its Retry-After (a refused closed-loop client waits that long)."""
            prompt, _, max_tokens = work[w]
            body = {"model": names[k], "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            t0 = time.time()
            chunks: list[float] = []
            text, tokens, status, code, retry = "", 0, 0, "", 0.0
            try:
                async with session.post(url, json=body) as resp:
                    status = resp.status
                    if status != 200:
                        if status == 429:
                            retry = float(resp.headers.get("Retry-After", "1"))
                        try:
                            code = ((await resp.json(content_type=None)).get("error") or {}).get("code") or str(status)
                        except (ValueError, AttributeError, aiohttp.ClientError):
                            code = str(status)
                    else:
                        async for raw in resp.content:
                            line = raw.strip()
                            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                code = "stream_error"
                                continue
                            if ev.get("choices") and ev["choices"][0].get("text"):
                                chunks.append(time.time())
                                text += ev["choices"][0]["text"]
                            if ev.get("usage"):
                                tokens = ev["usage"]["completion_tokens"]
            except asyncio.TimeoutError:
                code = "client_timeout"
            except aiohttp.ClientError as e:
                code = type(e).__name__
            if status == 200 and not code and tokens != max_tokens:
                code = "wrong_length"
            records.append({"t0": t0, "end": time.time(), "ok": status == 200 and not code, "code": code,
                            "ttft": chunks[0] - t0 if chunks else None,
                            "gaps": [b - a for a, b in zip(chunks, chunks[1:])], "tokens": tokens,
                            "chunks": len(chunks), "in_window": sum(1 for c in chunks if start <= c < stop),
                            "lag": lag})
            if status == 200 and not code:
                texts.setdefault(f"{k}/{w}", text)
            return retry

        while time.time() < start - spec["warmup"]:
            await asyncio.sleep(0.005)
        if spec["mode"] == "closed":
            async def client() -> None:
                while time.time() < stop:
                    wait = await one(*draw(), 0.0)
                    if wait:
                        await asyncio.sleep(min(wait, max(0.0, stop - time.time())))
            await asyncio.gather(*(client() for _ in range(spec["clients"])))
        else:
            tasks: set = set()
            t_next = time.time()
            rate = spec["rate"]
            while t_next < stop:
                now = time.time()
                if t_next > now:
                    await asyncio.sleep(t_next - now)
                t = asyncio.ensure_future(one(*draw(), time.time() - t_next))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
                t_next += rng.expovariate(rate)
            if tasks:
                await asyncio.wait(tasks, timeout=spec["client_timeout"] + 5)
    return {"records": records, "texts": texts, "cpu_s": time.process_time()}


def _generator_main(spec: dict, out, window) -> None:
    try:
        import aiohttp  # noqa: F401  (imported before saying ready: under load an import takes seconds)

        out.put("ready")
        out.put(asyncio.run(_generate({**spec, "window": window})))
    except BaseException as e:  # the parent waits for one answer per process: never leave it waiting
        out.put({"error": f"{type(e).__name__}: {e}"})
        raise


def _pct(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


def run(server: Server, names: list[str], cw: list[float], workload: list, mode: str, level: float, args) -> dict:
    """``level``: concurrent clients (closed) or requests per second (open), split over the processes."""
    procs = max(1, min(args.procs, int(level))) if mode == "closed" else args.procs
    ctx = mp.get_context("spawn")
    q, window = ctx.Queue(), ctx.Queue()
    ps = []
    for i in range(procs):
        spec = {"url": server.url, "names": names, "cum_weights": cw, "workload": workload,
                "seed": args.seed * 1000 + i + int(level * 10), "warmup": args.warmup, "mode": mode,
                "rate": level / procs, "clients": int(level) // procs + (1 if i < int(level) % procs else 0),
                "client_timeout": args.client_timeout}
        proc = ctx.Process(target=_generator_main, args=(spec, q, window), daemon=True)
        proc.start()
        ps.append(proc)
    for _ in ps:
        if (msg := q.get(timeout=300)) != "ready":
            raise RuntimeError(f"load generator failed: {msg.get('error') if isinstance(msg, dict) else msg}")
    t_start = time.time() + 0.2 + args.warmup  # the warm-up begins once every generator process is up
    t_stop = t_start + args.seconds
    for _ in ps:
        window.put((t_start, t_stop))
    while time.time() < t_start:
        time.sleep(0.01)
    cpu0, load0, eng0 = server.cpu_s(), os.getloadavg()[0], server.engine_counters()
    while time.time() < t_stop:
        time.sleep(0.05)
    cpu1, load1, eng1 = server.cpu_s(), os.getloadavg()[0], server.engine_counters()
    results = [q.get(timeout=args.client_timeout + 120) for _ in ps]
    for proc in ps:
        proc.join(30)
    errors = [res["error"] for res in results if "error" in res]
    if errors:
        raise RuntimeError(f"load generator failed: {errors[0]}")
    recs = [r for res in results for r in res["records"]]
    sent = [r for r in recs if t_start <= r["t0"] < t_stop]  # sent in the window
    ok = [r for r in sent if r["ok"]]
    tokens_in_window = sum(r["tokens"] * r["in_window"] / r["chunks"] for r in recs if r["ok"] and r["chunks"])
    ended = [r for r in recs if r["ok"] and t_start <= r["end"] < t_stop]
    failed: dict[str, int] = {}
    for r in sent:
        if not r["ok"]:
            failed[r["code"] or "error"] = failed.get(r["code"] or "error", 0) + 1
    gaps = [g for r in ok for g in r["gaps"]]
    tpot = [(r["end"] - r["t0"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["ttft"] is not None and r["tokens"] > 1]
    out = {"mode": mode, ("clients" if mode == "closed" else "offered_per_s"): round(level, 2),
           "output_tokens_per_s": round(tokens_in_window / args.seconds, 1),
           "requests_per_s": round(len(ended) / args.seconds, 2),
           "ttft_p50_ms": _ms(_pct([r["ttft"] for r in ok if r["ttft"] is not None], 50)),
           "ttft_p99_ms": _ms(_pct([r["ttft"] for r in ok if r["ttft"] is not None], 99)),
           "itl_p50_ms": _ms(_pct(gaps, 50)), "itl_p99_ms": _ms(_pct(gaps, 99)),
           "tpot_p50_ms": _ms(_pct(tpot, 50)),
           "sent": len(sent), "answered": len(ok), "failed": sum(failed.values()), "failed_by": failed,
           "tokens_per_chunk": round(sum(r["tokens"] for r in ok) / max(1, sum(r["chunks"] for r in ok)), 2),
           "distinct_adapters": len({k.split("/")[0] for res in results for k in res["texts"]}),
           "server_cpu": round((cpu1 - cpu0) / args.seconds, 2),
           # Throughput per CPU-second the server got: on a machine shared with other work, the figure
           # that says what the server does with the CPU it is given.
           "output_tokens_per_server_cpu_s": round(tokens_in_window / (cpu1 - cpu0), 1) if cpu1 > cpu0 else None,
           "generator_cpu": round(sum(res["cpu_s"] for res in results) / (args.seconds + args.warmup), 2),
           "load_average": [round(load0, 1), round(load1, 1)]}
    if eng0 and eng1 and eng1.get("forwards", 0) > eng0.get("forwards", 0):
        # What the model did in the window: forwards (prefill, decode and packed steps), rows per
        # forward, milliseconds per forward, device-slot evictions (adapter installs over another).
        steps = eng1["forwards"] - eng0["forwards"]
        out["engine"] = {"forwards_per_s": round(steps / args.seconds, 1),
                         "rows_per_forward": round((eng1.get("rows", 0) - eng0.get("rows", 0)) / steps, 2),
                         "ms_per_forward": round(1000 * (eng1.get("seconds", 0) - eng0.get("seconds", 0)) / steps, 2),
                         # the model's own CPU (its thread's time) per forward: below ms_per_forward when
                         # something else on the machine took the core from it
                         "cpu_ms_per_forward": round(1000 * (eng1.get("cpu_seconds", 0) - eng0.get("cpu_seconds", 0))
                                                     / steps, 2),
                         "busy": round((eng1.get("seconds", 0) - eng0.get("seconds", 0)) / args.seconds, 3),
                         "device_evictions_per_s": round((eng1.get("device_evictions", 0)
                                                          - eng0.get("device_evictions", 0)) / args.seconds, 1)}
    if mode == "open":
        out["sent_per_s"] = round(len(sent) / args.seconds, 2)
        out["send_lag_p99_ms"] = _ms(_pct([r["lag"] for r in sent], 99))
    texts: dict[str, str] = {}
    for res in results:
        texts.update(res["texts"])
    print(json.dumps({"contender": server.contender, **out}), file=sys.stderr)
    return {**out, "_texts": texts}


def warm_up(server: Server, names: list[str], workload: list) -> None:
    """A few requests before anything is measured (a fresh server's first forward passes are slow)."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=300) as c:
        for i in range(4):
            prompt, _, max_tokens = workload[i]
            r = c.post("/v1/completions", json={"model": names[i % len(names)], "prompt": prompt,
                                                "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            if r.status_code != 200:
                raise RuntimeError(f"{server.contender}: warm-up request answered {r.status_code}: {r.text[:300]}")


def machine() -> dict:
    cpu = cpu_model()
    return {"nproc": os.cpu_count(), "cpu": cpu, "load_average": [round(x, 1) for x in os.getloadavg()],
            "python": sys.version.split()[0]}


def bench_one(contender: str, n: int, model: Path, adapters, workload, args, workdir: Path) -> dict:
    names = [name for name, _ in adapters]
    cw = zipf_cum_weights(n)
    server = Server(contender, model, adapters, args, workdir / f"serve-{contender}-{n}.log")
    try:
        warm_up(server, names, workload)
        clients = args.clients if contender != "peft" else args.peft_clients
        closed = run(server, names, cw, workload, "closed", clients, args)
        sat_rps = closed["requests_per_s"]
        if not sat_rps:
            raise RuntimeError(f"{contender} answered nothing in the closed-loop run: {closed['failed_by']}; "
                               f"see {server.log.name}")
        opened = [run(server, names, cw, workload, "open", sat_rps * f, args) for f in args.rate_fractions]
    finally:
        server.stop()
    texts = {**closed.pop("_texts")}
    for o in opened:
        texts.update(o.pop("_texts"))
    res = {"start_s": round(server.start_s, 1), "saturated_output_tokens_per_s": closed["output_tokens_per_s"],
           "saturated_output_tokens_per_server_cpu_s": closed["output_tokens_per_server_cpu_s"],
           "saturated_server_cpu": closed["server_cpu"],
           "saturated_requests_per_s": sat_rps, "closed": closed, "open": opened,
           "failed": closed["failed"] + sum(o["failed"] for o in opened)}
    for f, o in zip(args.rate_fractions, opened):
        pct = f"{round(f * 100)}pct"
        res[f"at_{pct}"] = {k: o[k] for k in ("offered_per_s", "sent_per_s", "ttft_p50_ms", "ttft_p99_ms",
                                               "itl_p50_ms", "itl_p99_ms", "failed")}
    return res, texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short smoke run (N=4, 2.5 s windows, short requests)")
    p.add_argument("--contenders", default="torch,vllm,peft")
    p.add_argument("--n", default="1,100,1000", help="registered adapters, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window of each run")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the whole run (every N and contender once per round); each figure is the "
                        "median round's, the N = 1,000 / N = 1 ratio the median of the rounds' own ratios")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--rates", default="0.5,0.9", help="open-loop rates as fractions of the saturated requests/s")
    p.add_argument("--clients", type=int, default=0, help="closed-loop clients (default 2 x --max-batch-size)")
    p.add_argument("--peft-clients", type=int, default=4,
                   help="closed-loop clients for the PEFT baseline (it serves one request at a time)")
    p.add_argument("--peft-max-n", type=int, default=100, help="the PEFT baseline only for N up to this")
    p.add_argument("--procs", type=int, default=3, help="load generator processes")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                   help="torch threads of the torch engine and the PEFT baseline (default: cores - 1)")
    p.add_argument("--max-batch-size", type=int, default=32, help="both engines (vLLM: max_num_seqs)")
    p.add_argument("--device-slots", type=int, default=64, help="both engines (vLLM: max_loras)")
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0,
                   help="both engines; default 0 (no bound): this measures serving, bench/overload_bench.py the "
                        "admission bound")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prompt-tokens", default="16,128", help="prompt length range (tokens, uniform)")
    p.add_argument("--output-tokens", default="16,64", help="output length range (tokens, uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=0, help="default hidden / 64")
    p.add_argument("--kv-heads", type=int, default=0, help="default heads / 2")
    p.add_argument("--vllm-python", default=os.environ.get("LORAFLEET_VLLM_PYTHON", ""),
                   help="the vLLM virtualenv's python ($(tools/venv-vllm)/bin/python; env LORAFLEET_VLLM_PYTHON)")
    p.add_argument("--client-timeout", type=float, default=120.0)
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--workdir", default="/tmp/lorafleet-serve-bench")
    args = p.parse_args(argv)
    import signal

    # A terminated run stops the server it started (the finally blocks run), never leaving one behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.n, args.seconds, args.warmup, args.prompt_tokens, args.output_tokens = "4", 2.5, 0.5, "8,32", "4,12"
        args.procs = min(args.procs, 2)
    args.clients = args.clients or 2 * args.max_batch_size
    args.rate_fractions = [float(x) for x in args.rates.split(",")]
    contenders = [c for c in args.contenders.split(",") if c]
    unknown = set(contenders) - {"torch", "torch-inline", "torch-process", "vllm", "peft"}
    if unknown:
        p.error(f"--contenders: unknown {', '.join(sorted(unknown))} (torch, torch-inline, torch-process, vllm, peft)")
    if "vllm" in contenders and not (args.vllm_python and Path(args.vllm_python).exists()):
        p.error("the vllm contender needs --vllm-python (or LORAFLEET_VLLM_PYTHON): the vLLM virtualenv's python, "
                "$(tools/venv-vllm)/bin/python")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model = build_model(args, workdir)
    workload = build_workload(model, args)
    ns = [int(x) for x in args.n.split(",")]
    all_adapters = build_adapters(model, max(ns))
    out: dict = {"bench": "serve", "quick": args.quick, "machine": machine(), "device": args.device,
                 "dtype": args.dtype,
                 "model": {"hidden": args.hidden, "layers": args.layers, "dir": model.name,
                           "adapter_ranks": list(RANKS), "targets": list(TARGETS)},
                 "workload": {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                              "mean_prompt_tokens": round(sum(w[1] for w in workload) / len(workload), 1),
                              "mean_output_tokens": round(sum(w[2] for w in workload) / len(workload), 1),
                              "adapters": "zipf(1.0)", "greedy": True, "ignore_eos": True},
                 "settings": {"seconds": args.seconds, "warmup": args.warmup, "procs": args.procs,
                              "threads": args.threads, "clients": args.clients, "peft_clients": args.peft_clients,
                              "rates": args.rate_fractions, "max_batch_size": args.max_batch_size,
                              "device_slots": args.device_slots, "max_queue_delay_ms": args.max_queue_delay_ms},
                 "results": {c: {} for c in contenders}, "skipped": {}}
    texts_by: dict[tuple[str, int], dict[str, str]] = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    # Rounds: every (N, contender) once per round, so that a drift of the machine's speed during the run
    # falls on all of them alike; a ratio is then taken within each round (paired) and reported as the median.
    for rnd in range(args.repeat):
        for n in ns:
            for c in contenders:
                if c == "peft" and n > args.peft_max_n:
                    out["skipped"][f"peft_{n}"] = (f"the PEFT baseline loads every adapter into one model "
                                                   f"(load_adapter each); only N <= --peft-max-n {args.peft_max_n} "
                                                   "is run")
                    continue
                try:
                    res, texts = bench_one(c, n, model, all_adapters[:n], workload, args, workdir)
                except RuntimeError as e:  # one contender's failure is reported; the others still run
                    print(f"{c} N={n}: {e}", file=sys.stderr)
                    out["errors"] = {**out.get("errors", {}), f"{c}_{n}" + (f"_round{rnd}" if rnd else ""): str(e)}
                    continue
                texts_by.setdefault((c, n), texts)
                runs.setdefault((c, n), []).append({**res, "round": rnd})
    for (c, n), rs in runs.items():
        # One round's figures stand for the (N, contender): the median round by saturated throughput.
        med = sorted(rs, key=lambda r: r["saturated_output_tokens_per_s"])[(len(rs) - 1) // 2]
        if len(rs) > 1:
            med = {**med, "rounds_saturated_output_tokens_per_s": [r["saturated_output_tokens_per_s"] for r in rs]}
        out["results"][c][str(n)] = med
    for (c, n), texts in texts_by.items():
        # The reference: the torch engine as configured, else its first variant run (torch-inline / -process).
        ref_c = next((t for t in ("torch", "torch-inline", "torch-process") if (t, n) in texts_by), None)
        ref = texts_by.get((ref_c, n))
        if ref is None or c == ref_c:
            continue
        both = set(ref) & set(texts)
        out["results"][c][str(n)][f"same_text_as_{ref_c}"] = [sum(1 for k in both if ref[k] == texts[k]), len(both)]
    tr = out["results"].get("torch", {})
    sat = {n: r["saturated_output_tokens_per_s"] for n, r in tr.items()}
    targets = {}
    if "1" in sat and "1000" in sat:
        pairs = [(a, b) for a in runs[("torch", 1)] for b in runs[("torch", 1000)] if a["round"] == b["round"]]

        def paired(key: str) -> list[float]:
            return [round(b[key] / a[key], 3) if a[key] and b[key] else 0.0 for a, b in pairs]

        by_round = paired("saturated_output_tokens_per_s")
        ratio = statistics.median(by_round) if by_round else 0.0
        per_cpu = paired("saturated_output_tokens_per_server_cpu_s")
        targets["torch_1000_vs_1"] = {"ratio": round(ratio, 2), "target": 0.9, "met": ratio >= 0.9,
                                      "ratio_per_server_cpu_s": round(statistics.median(per_cpu), 2) if per_cpu
                                      else None}
        if len(by_round) > 1:
            targets["torch_1000_vs_1"]["ratio_by_round"] = by_round
    peft100 = out["results"].get("peft", {}).get("100")
    if "100" in sat and peft100:
        ratio = sat["100"] / peft100["saturated_output_tokens_per_s"] if peft100["saturated_output_tokens_per_s"] else 0
        a, b = tr["100"]["saturated_output_tokens_per_server_cpu_s"], peft100["saturated_output_tokens_per_server_cpu_s"]
        targets["torch_vs_peft_100"] = {"ratio": round(ratio, 1), "target": 10, "met": ratio >= 10,
                                        "ratio_per_server_cpu_s": round(a / b, 1) if a and b else None}
    out["targets"] = targets
    out["failed"] = sum(r["failed"] for c in out["results"].values() for r in c.values())
    out["machine_after"] = {"load_average": [round(x, 1) for x in os.getloadavg()]}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Runtime benchmark: lorafleet's batched multi-LoRA engine and PEFT side by side, one JSON line.

Measures (2 CPU threads by default, seeded Llama-style models, LoRA on q/k/v/o):
  decode_*      one decode step where every row uses a different adapter, relative to the base alone
  registered_*  decode latency with 1,000 adapters registered vs 1 (PEFT: N loaded vs 1)
  load_*        load time into the host tier as the number registered grows (PEFT: load_adapter)
  prefill_*     prefill of a mixed batch relative to the base
  classify_*    mixed 100-tenant classification throughput on MiniLM vs PEFT + set_adapter behind a lock

Usage: python bench/runtime_bench.py [--quick] [--device cuda --dtype bfloat16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import cpu_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# Test support code (tiny seeded models, adapter makers) lives under tests/support, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PREFILL_ROWS = 8  # prefill: this many rows (each a different adapter) of 128 tokens
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Bench:
    def __init__(self, device: str, dtype: str):
        self.device = device
        self.dtype_name = dtype
        self.dtype = DTYPES[dtype]
        self.tmp = Path(tempfile.mkdtemp(prefix="lorafleet-bench-"))

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def timeit(self, fn, reps: int, warmup: int = 2) -> float:
        """Median seconds of ``fn()``."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def timepair(self, fa, fb, reps: int, warmup: int = 2) -> tuple[float, float]:
        """Median seconds of ``fa()`` and ``fb()``, run alternately so load from other processes on a
        shared machine hits both alike. Their minimums are kept in ``last_min_ratio`` (b/a): noise from
        other processes only ever adds time, so the fastest rounds are the least disturbed."""
        for _ in range(warmup):
            fa()
            fb()
        self.sync()
        ta, tb = [], []
        for _ in range(reps):
            for fn, acc in ((fa, ta), (fb, tb)):
                t0 = time.perf_counter()
                fn()
                self.sync()
                acc.append(time.perf_counter() - t0)
        self.last_min_ratio = min(tb) / min(ta)
        return statistics.median(ta), statistics.median(tb)

    # --- models ------------------------------------------------------------------------------------
    def llama(self, d: int, layers: int, vocab: int = 512, max_len: int = 512) -> Path:
        from transformers import LlamaConfig, LlamaForCausalLM

        out = self.tmp / f"llama-{d}-{layers}"
        if not out.exists():
            heads = max(1, d // 64)
            inter = (d * 8 // 3 + 127) // 128 * 128
            cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                              num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_len,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
            torch.manual_seed(0)
            LlamaForCausalLM(cfg).save_pretrained(out)
            from support.models import build_tokenizer

            build_tokenizer(vocab).save_pretrained(out)
        return out

    def adapters(self, base_dir: Path, n: int, r: int, tag: str, targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                 task: str = "CAUSAL_LM", num_labels: int = 0) -> list[Path]:
        """``n`` adapters in PEFT's format: PEFT saves one, the others are seeded copies of its tensors
        (same keys, same config), which is much faster than n PEFT round trips."""
        from peft import LoraConfig, get_peft_model
        from safetensors.torch import load_file, save_file

        root = self.tmp / f"adapters-{tag}"
        first = root / "a0"
        if not first.exists():
            if task == "CAUSAL_LM":
                from transformers import AutoModelForCausalLM

                base = AutoModelForCausalLM.from_pretrained(str(base_dir))
            else:
                from transformers import AutoModelForSequenceClassification

                base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
            pm = get_peft_model(base, LoraConfig(task_type=task, r=r, lora_alpha=2 * r, target_modules=list(targets)))
            pm.save_pretrained(str(first))
            if num_labels:
                (first / "labels.json").write_text(json.dumps([f"L{i}" for i in range(num_labels)]))
        tensors = load_file(str(first / "adapter_model.safetensors"))
        out = []
        for i in range(n):
            p = root / f"a{i}"
            if not p.exists():
                p.mkdir(parents=True)
                g = torch.Generator().manual_seed(1000 + i)
                save_file({k: torch.randn(v.shape, generator=g) * (0.05 if "lora_B" in k else 1 / v.shape[-1] ** 0.5)
                           for k, v in tensors.items()}, str(p / "adapter_model.safetensors"))
                for f in first.iterdir():
                    if f.name != "adapter_model.safetensors":
                        (p / f.name).write_bytes(f.read_bytes())
            out.append(p)
        return out

    def engine(self, base_dir: Path, slots: int, max_seqs: int, host: int = 1024):
        from lorafleet.runtime.engines import GenerationEngine
        from lorafleet.runtime.tiers import AdapterManager

        eng = GenerationEngine.from_dir(base_dir, dtype=self.dtype_name, device=self.device, device_slots=slots,
                                        max_seqs=max_seqs, max_len=512)
        man = AdapterManager("text-generation", host, dtype=eng.dtype)
        eng.bind(man)
        return eng, man

    @staticmethod
    def register(man, paths, prefix="t"):
        from lorafleet.contracts.runtime_api import AdapterLoadRequest

        entries = []
        for i, p in enumerate(paths):
            e, _ = man.register(f"{prefix}{i}", "1", AdapterLoadRequest(path=str(p), sha256="0" * 64, tenant=f"{prefix}{i}"))
            assert e.error is None, e.error
            entries.append(e)
        return entries

    # --- ours ----------------------------------------------------------------------------------------
    def ours_decode(self, base_dir: Path, paths: list[Path], batch: int, ctx: int, reps: int,
                    registered_extra: int = 0) -> dict:
        from lorafleet.runtime.engines import Sequence

        eng, man = self.engine(base_dir, slots=batch, max_seqs=batch * 2)
        entries = self.register(man, paths)
        vocab = eng.model.config.vocab_size
        g = torch.Generator().manual_seed(0)

        def start(slots: list[int]):
            seqs = [Sequence(prompt=torch.randint(3, vocab, (ctx,), generator=g).tolist(), max_new_tokens=10 ** 6,
                             slot=s) for s in slots]
            eng.prefill(seqs)
            return seqs

        def step(seqs):
            def run():
                eng.decode(seqs)
                for s in seqs:  # keep the context length fixed across repetitions
                    s.pos -= 1
                    s.generated.pop()
            return run

        base_seqs = start([0] * batch)
        lora_seqs = start([eng.acquire(e) for e in entries[:batch]])
        t_base, t_lora = self.timepair(step(base_seqs), step(lora_seqs), reps)
        for s in base_seqs + lora_seqs:
            eng.finish(s)
        # Prefill of a mixed batch vs the base (one forward over ctx tokens per row).
        pf_ctx = min(128, eng.max_len - 2)
        pf_rows = min(batch, PREFILL_ROWS)
        prompts = [torch.randint(3, vocab, (pf_ctx,), generator=g).tolist() for _ in range(pf_rows)]

        def prefill(slots):
            def run():
                seqs = [Sequence(prompt=p, max_new_tokens=1, slot=s) for p, s in zip(prompts, slots)]
                eng.prefill(seqs)
                for s in seqs:
                    eng.finish(s)
            return run

        pf_base, pf_lora = self.timepair(prefill([0] * pf_rows), prefill([s.slot for s in lora_seqs[:pf_rows]]),
                                         max(3, 2 * reps), 1)
        return {"base_ms": t_base * 1e3, "lora_ms": t_lora * 1e3, "ratio": t_lora / t_base,
                "prefill_base_ms": pf_base * 1e3, "prefill_lora_ms": pf_lora * 1e3, "prefill_ratio": pf_lora / pf_base,
                "prefill_ratio_of_min": self.last_min_ratio}

    def ours_registered(self, base_dir: Path, paths: list[Path], many: int, batch: int, ctx: int, reps: int) -> dict:
        """Decode latency of one tenant's batch with 1 adapter registered vs ``many`` (device slots full of
        other tenants). Both engines are built first and timed alternately."""
        from lorafleet.runtime.engines import Sequence

        runs = []
        for count in (1, many):
            eng, man = self.engine(base_dir, slots=batch, max_seqs=batch, host=256)
            entries = self.register(man, [paths[i % len(paths)] for i in range(count)])
            for e in entries[1: batch]:  # other tenants occupy the remaining device slots
                eng.acquire(e)
                eng.release(e)
            g = torch.Generator().manual_seed(0)
            vocab = eng.model.config.vocab_size
            slot = eng.acquire(entries[0])
            seqs = [Sequence(prompt=torch.randint(3, vocab, (ctx,), generator=g).tolist(), max_new_tokens=10 ** 6,
                             slot=slot) for _ in range(batch)]
            eng.prefill(seqs)

            def run(eng=eng, seqs=seqs):
                eng.decode(seqs)
                for s in seqs:
                    s.pos -= 1
                    s.generated.pop()

            runs.append(run)
        one, lots = self.timepair(runs[0], runs[1], reps)
        return {"one_ms": one * 1e3, "many_ms": lots * 1e3, "ratio": lots / one, "registered": many}

    def ours_load(self, paths: list[Path], base_dir: Path) -> dict:
        eng, man = self.engine(base_dir, slots=4, max_seqs=4, host=len(paths) + 1)
        from lorafleet.contracts.runtime_api import AdapterLoadRequest

        times = []
        for i, p in enumerate(paths):
            t0 = time.perf_counter()
            man.register(f"t{i}", "1", AdapterLoadRequest(path=str(p), sha256="0" * 64, tenant=f"t{i}"))
            times.append(time.perf_counter() - t0)
        return _load_summary(times)

    # --- PEFT ----------------------------------------------------------------------------------------
    def peft_model(self, base_dir: Path, paths: list[Path]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=self.dtype).to(self.device).eval()
        pm = PeftModel.from_pretrained(base, str(paths[0]), adapter_name="t0")
        load_times = []
        for i, p in enumerate(paths[1:], 1):
            t0 = time.perf_counter()
            pm.load_adapter(str(p), adapter_name=f"t{i}")
            load_times.append(time.perf_counter() - t0)
        return pm.eval(), load_times

    def peft_decode(self, base_dir: Path, paths: list[Path], batch: int, ctx: int, reps: int) -> dict:
        from transformers import DynamicCache

        pm, _ = self.peft_model(base_dir, paths[:batch])
        vocab = pm.base_model.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (batch, ctx), generator=g).to(self.device)
        names = [f"t{i}" for i in range(batch)]

        def step(adapter_names):
            with torch.inference_mode():
                if adapter_names is None:
                    with pm.disable_adapter():
                        out = pm(input_ids=ids, use_cache=True)
                else:
                    out = pm(input_ids=ids, use_cache=True, adapter_names=adapter_names)
            cache = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)

            def run():
                with torch.inference_mode():
                    if adapter_names is None:
                        with pm.disable_adapter():
                            pm(input_ids=nxt, past_key_values=cache, use_cache=True)
                    else:
                        pm(input_ids=nxt, past_key_values=cache, use_cache=True, adapter_names=adapter_names)
                    cache.crop(-1)  # keep the context length fixed across repetitions
            return run

        t_base, t_lora = self.timepair(step(None), step(names), reps)

        def prefill(adapter_names):
            def run():
                with torch.inference_mode():
                    if adapter_names is None:
                        with pm.disable_adapter():
                            pm(input_ids=pf_ids, use_cache=True)
                    else:
                        pm(input_ids=pf_ids, use_cache=True, adapter_names=adapter_names)
            return run

        pf_rows = min(batch, PREFILL_ROWS)
        pf_ids = torch.randint(3, vocab, (pf_rows, 128), generator=g).to(self.device)
        pf_base, pf_lora = self.timepair(prefill(None), prefill(names[:pf_rows]), max(3, 2 * reps), 1)
        del DynamicCache
        return {"base_ms": t_base * 1e3, "lora_ms": t_lora * 1e3, "ratio": t_lora / t_base,
                "prefill_base_ms": pf_base * 1e3, "prefill_lora_ms": pf_lora * 1e3, "prefill_ratio": pf_lora / pf_base,
                "prefill_ratio_of_min": self.last_min_ratio}

    def peft_registered_and_load(self, base_dir: Path, paths: list[Path], batch: int, ctx: int, reps: int) -> dict:
        """PEFT forward latency with N adapters loaded vs 1 (timed alternately), and its load times."""
        pm, load_times = self.peft_model(base_dir, paths)
        one, _ = self.peft_model(base_dir, paths[:1])
        vocab = pm.base_model.model.config.vocab_size
        ids = torch.randint(3, vocab, (batch, ctx), generator=torch.Generator().manual_seed(0)).to(self.device)

        def run(model):
            def go():
                with torch.inference_mode():
                    model(input_ids=ids)
            return go

        pm.set_adapter("t0")
        t_one, t_many = self.timepair(run(one), run(pm), reps)
        return {"one_ms": t_one * 1e3, "many_ms": t_many * 1e3, "ratio": t_many / t_one, "registered": len(paths),
                "load": _load_summary(load_times)}

    # --- classification ------------------------------------------------------------------------------
    def classify(self, tenants: int, requests: int, batch: int) -> dict:
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from lorafleet.runtime.engines import ClassificationEngine
        from support.models import CORPUS, minilm_path
        from lorafleet.runtime.tiers import AdapterManager

        base_dir = minilm_path()
        # One label count for all: PEFT cannot hold heads of different shapes in one model.
        paths = self.adapters(base_dir, tenants, 8, "cls", targets=("query", "value"), task="SEQ_CLS", num_labels=4)
        words = CORPUS.split()
        g = torch.Generator().manual_seed(0)
        texts = [" ".join(words[j] for j in torch.randint(len(words), (12,), generator=g).tolist())
                 for _ in range(requests)]
        who = torch.randint(tenants, (requests,), generator=g).tolist()

        eng = ClassificationEngine.from_dir(base_dir, dtype=self.dtype_name, device=self.device,
                                            device_slots=min(tenants, 128))
        man = AdapterManager("sequence-classification", tenants + 1, dtype=eng.dtype)
        eng.bind(man)
        entries = self.register(man, paths)

        def ours():
            for i in range(0, requests, batch):
                rows = range(i, min(i + batch, requests))
                slots = [eng.acquire(entries[who[j]]) for j in rows]
                eng.classify([texts[j] for j in rows], slots, [4] * len(slots))
                for j in rows:
                    eng.release(entries[who[j]])

        ours()  # warm up and fill the device slots
        self.sync()
        t0 = time.perf_counter()
        ours()
        self.sync()
        t_ours = time.perf_counter() - t0

        tok = AutoTokenizer.from_pretrained(str(base_dir))
        base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=4, dtype=self.dtype)
        pm = PeftModel.from_pretrained(base.to(self.device), str(paths[0]), adapter_name="t0").eval()
        for i, p in enumerate(paths[1:], 1):
            pm.load_adapter(str(p), adapter_name=f"t{i}")
        lock = threading.Lock()

        def peft():
            for j in range(requests):
                with lock, torch.inference_mode():
                    pm.set_adapter(f"t{who[j]}")
                    pm(**tok(texts[j], return_tensors="pt").to(self.device))

        peft_n = min(requests, 200)
        requests_peft, requests_all = peft_n, requests
        requests = peft_n
        peft()  # warm-up pass over the same requests
        self.sync()
        t0 = time.perf_counter()
        peft()
        self.sync()
        t_peft = time.perf_counter() - t0
        return {"tenants": tenants, "requests_per_s": requests_all / t_ours, "peft_requests_per_s": requests_peft / t_peft,
                "speedup": (requests_all / t_ours) / (requests_peft / t_peft), "batch": batch}


def _load_summary(times: list[float]) -> dict:
    if not times:
        return {}
    first = times[:32]
    last = times[-32:]
    return {"count": len(times), "first32_ms": statistics.mean(first) * 1e3, "last32_ms": statistics.mean(last) * 1e3,
            "max_ms": max(times) * 1e3, "median_ms": statistics.median(times) * 1e3}


def machine() -> dict:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"nproc": os.cpu_count(), "cpu": cpu, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and counts (a CI smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated subset: decode,registered,load,classify")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import lorafleet  # noqa: F401  (maps lorafleet.runtime onto the checkout)

    b = Bench(args.device, args.dtype)
    only = set(filter(None, args.only.split(",")))
    want = (lambda k: not only or k in only)
    if args.quick:
        shapes = [(128, 2, 8, 8)]
        reps, ctx, many, peft_many, loads, tenants, requests = 5, 8, 50, 8, 50, 10, 40
    else:
        big = args.device != "cpu"
        shapes = [(512, 8, 16, 64), (2048, 4, 8, 32)] + ([(4096, 8, 16, 64)] if big else [])
        reps, ctx, many, peft_many, loads, tenants, requests = 10, 16, 1000, 100, 1000, 100, 800
    out: dict = {"bench": "runtime", "quick": args.quick, "device": args.device, "dtype": args.dtype,
                 "threads": args.threads, "machine": machine()}
    for d, layers, r, batch in shapes:
        if not want("decode"):
            break
        base = b.llama(d, layers)
        paths = b.adapters(base, batch, r, f"{d}-{layers}-{r}")
        key = f"d{d}_l{layers}_r{r}_b{batch}"
        out[f"decode_{key}"] = {"ours": b.ours_decode(base, paths, batch, ctx, reps),
                                "peft": b.peft_decode(base, paths, batch, ctx, reps)}
        print(json.dumps({key: out[f"decode_{key}"]}), file=sys.stderr)
    d, layers, r, batch = shapes[0]
    base = b.llama(d, layers)
    paths = b.adapters(base, batch, r, f"{d}-{layers}-{r}")
    if want("registered"):
        peft = b.peft_registered_and_load(base, [paths[i % len(paths)] for i in range(peft_many)], batch, ctx, reps)
        out["registered"] = {"ours": b.ours_registered(base, paths, many, batch, ctx, reps),
                             "peft": {k: v for k, v in peft.items() if k != "load"}}
        print(json.dumps({"registered": out["registered"]}), file=sys.stderr)
    if want("load"):
        small = b.llama(256, 4)
        small_paths = b.adapters(small, min(loads, 64), 8, "small")
        out["load"] = {"ours": b.ours_load([small_paths[i % len(small_paths)] for i in range(loads)], small)}
        out["load"]["peft"] = b.peft_registered_and_load(
            small, [small_paths[i % len(small_paths)] for i in range(min(peft_many, loads))], 1, 4, 2)["load"]
        print(json.dumps({"load": out["load"]}), file=sys.stderr)
    if want("classify"):
        out["classify"] = b.classify(tenants, requests, 32)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

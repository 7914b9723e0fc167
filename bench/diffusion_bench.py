"""Text-to-image with many tenants' LoRAs: time per image when a batch of images carries 8 distinct
adapters (one UNet call per step for all of them) against the same batch with no adapter (goal
≤1.15×), and against the seed system's way on the same pipeline: per request diffusers'
``load_lora_weights`` + ``fuse_lora`` + generate + ``unfuse_lora`` + ``unload_lora_weights``, one
request at a time (goal: ≥5× its images per second).

The pipeline is a seeded Stable-Diffusion-layout model built from configs (no download), larger than
the tests' one; ``--device cuda --dtype float16`` runs the same on a GPU.

    python bench/diffusion_bench.py [--adapters 8] [--steps 20] [--size 64] [--rank 16] [--rounds 3] [--seed-rounds 1]

prints one JSON line."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--channels", default="32,64,64", help="UNet block channels")
    ap.add_argument("--cross-dim", type=int, default=64, help="text encoder width (the UNet's cross-attention)")
    ap.add_argument("--rounds", type=int, default=3, help="batches timed with and without adapters (interleaved)")
    ap.add_argument("--seed-rounds", type=int, default=1, help="passes of the seed system over the adapters")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorafleet.runtime.diffusion import DiffusionEngine, ImageJob
    from support.diffusion_models import load_pipeline, make_diffusers_lora, make_kohya_lora, make_tiny_pipeline

    work = Path(tempfile.mkdtemp(prefix="lf-diffusion-bench-"))
    channels = tuple(int(c) for c in args.channels.split(","))
    base = make_tiny_pipeline(work / "base", channels=channels, cross_dim=args.cross_dim, text_layers=4,
                              sample_size=args.size // 2)
    pipe = load_pipeline(base)
    adapters = []
    for i in range(args.adapters):  # half diffusers files, half kohya files, all on the attention projections
        if i % 2:
            f = make_kohya_lora(base, work / f"k{i}" / "lora.safetensors", seed=i, r=args.rank, alpha=args.rank / 2,
                                pipe=pipe)
            adapters.append((f.parent, f))
        else:
            d = make_diffusers_lora(base, work / f"p{i}", seed=i, r=args.rank, alpha=args.rank, pipe=pipe)
            adapters.append((d, d))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    engine = DiffusionEngine.from_dir(base, dtype=args.dtype, device=args.device, device_slots=args.adapters,
                                      max_rank=max(64, args.rank))
    for slot, (d, _) in enumerate(adapters, start=1):
        engine.patch.install(slot, engine.load_adapter(d))
    prompts = [f"tenant {i} draws a red cat" for i in range(args.adapters)]

    def batch(with_adapters: bool) -> float:
        jobs = [ImageJob(p, steps=args.steps, seed=100 + i, slot=(i + 1) if with_adapters else 0,
                         height=args.size, width=args.size) for i, p in enumerate(prompts)]
        sync()
        t0 = time.perf_counter()
        engine.generate(jobs)
        sync()
        return (time.perf_counter() - t0) / len(jobs)

    batch(True)  # warm up both paths (kernels, allocator)
    batch(False)
    lora_s, base_s = [], []
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both
        lora_s.append(batch(True))
        base_s.append(batch(False))

    # The seed system: one warm pipeline, each request loads, fuses, generates, unfuses, unloads.
    pipe = load_pipeline(base).to(args.device, dtype)

    def seed_system_request(i: int) -> None:
        _, src = adapters[i]
        p = Path(src)
        if p.is_file():
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name="req")
        else:
            pipe.load_lora_weights(str(p), adapter_name="req")
        pipe.fuse_lora()
        pipe(prompts[i], num_inference_steps=args.steps, height=args.size, width=args.size, output_type="np",
             generator=torch.Generator().manual_seed(100 + i))
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    seed_system_request(0)
    seed_s = []
    adapter_work_s = []
    for _ in range(args.seed_rounds):
        sync()
        t0 = time.perf_counter()
        for i in range(args.adapters):
            seed_system_request(i)
        sync()
        seed_s.append((time.perf_counter() - t0) / args.adapters)
    # The adapter work alone (load + fuse + unfuse + unload), for the record.
    for i in range(args.adapters):
        _, src = adapters[i]
        p = Path(src)
        t0 = time.perf_counter()
        if p.is_file():
            pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name="req")
        else:
            pipe.load_lora_weights(str(p), adapter_name="req")
        pipe.fuse_lora()
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        sync()
        adapter_work_s.append(time.perf_counter() - t0)

    lora, none, seed = statistics.median(lora_s), statistics.median(base_s), statistics.median(seed_s)
    print(json.dumps({
        "bench": "diffusion", "device": args.device, "dtype": args.dtype,
        "machine": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model(),
        "threads": torch.get_num_threads(), "adapters_per_batch": args.adapters, "rank": args.rank,
        "steps": args.steps, "size": args.size, "unet_channels": list(channels),
        "unet_params_m": round(sum(p.numel() for p in engine.unet.parameters()) / 1e6, 2),
        "s_per_image_8_adapters": round(lora, 4), "s_per_image_no_adapter": round(none, 4),
        "lora_vs_none": round(lora / none, 3), "target_lora_vs_none": 1.15,
        "seed_system_s_per_image": round(seed, 4),
        "seed_system_adapter_work_s_per_request": round(statistics.median(adapter_work_s), 4),
        "images_per_s": round(1 / lora, 3), "seed_system_images_per_s": round(1 / seed, 3),
        "speedup_vs_seed_system": round(seed / lora, 2), "target_speedup": 5.0,
        "rounds": {"lora": [round(x, 4) for x in lora_s], "none": [round(x, 4) for x in base_s],
                   "seed": [round(x, 4) for x in seed_s]},
    }))


if __name__ == "__main__":
    main()

"""diffusers is the oracle: every image of a mixed multi-tenant denoising batch equals diffusers'
StableDiffusionPipeline with ``load_lora_weights`` of that image's adapter alone (same seed, same
scheduler), to 1e-4 on [0, 1] pixel floats in fp32; adapters the engine cannot apply exactly are
refused with the reason."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lorafleet.runtime.diffusion import DiffusionEngine, ImageJob, ImageRequestError
from lorafleet.runtime.peft_format import AdapterFormatError
from support.diffusion_models import (TEXT_ATTN, UNET_ATTN, DiffusersOracle, load_pipeline, make_diffusers_lora,
                                      make_kohya_lora, make_tiny_pipeline)

TOL = 1e-4  # max abs difference of [0, 1] pixel floats (one 8-bit level is 3.9e-3)
UNET_ALL = UNET_ATTN + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_ALL = TEXT_ATTN + ("fc1", "fc2")


@pytest.fixture(scope="module")
def sd_base(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def oracle(sd_base):
    return DiffusersOracle(sd_base)


def _kohya_dir(base, root: Path, name: str, **kw) -> tuple[Path, Path]:
    d = root / name
    f = make_kohya_lora(base, d / f"{name}.safetensors", **kw)
    return d, f


@pytest.fixture(scope="module")
def sd_adapters(sd_base, oracle, tmp_path_factory):
    """name -> (adapter directory as the cache holds it, what load_lora_weights is given)."""
    root = tmp_path_factory.mktemp("sd-adapters")
    pipe = oracle.pipe
    out = {}
    for name, kw in {
        "peft-meta": dict(seed=1, r=4, alpha=8),  # metadata: scale alpha/r = 2
        "peft-plain": dict(seed=2, r=6, alpha=24, metadata=False, unet_targets=UNET_ALL, text_targets=TEXT_ALL),
        "peft-rslora-unet": dict(seed=3, r=8, alpha=4, use_rslora=True, text_targets=None),
        "peft-text-only": dict(seed=4, r=2, alpha=1, unet_targets=None, b_std=1.0),
    }.items():
        d = make_diffusers_lora(sd_base, root / name, pipe=pipe, **kw)
        out[name] = (d, d)
    out["kohya"] = _kohya_dir(sd_base, root, "kohya", seed=5, r=8, alpha=3, pipe=pipe, unet_targets=UNET_ALL,
                              text_targets=TEXT_ALL)
    out["kohya-noalpha"] = _kohya_dir(sd_base, root, "kohya-noalpha", seed=6, r=4, alpha=4, pipe=pipe)
    return out


def _engine(base, slots=8, max_rank=64):
    return DiffusionEngine.from_dir(base, device_slots=slots, max_rank=max_rank)


def test_mixed_batch_equals_diffusers_per_adapter(sd_base, oracle, sd_adapters):
    engine = _engine(sd_base)
    calls = []
    engine.unet.register_forward_pre_hook(lambda m, args: calls.append(tuple(engine.patch.ctx.idx.tolist())
                                                                       if engine.patch.ctx.idx is not None else ()))
    names = list(sd_adapters)
    for slot, name in enumerate(names, start=1):
        engine.patch.install(slot, engine.load_adapter(sd_adapters[name][0]))
    # Different steps, guidance (one without CFG), image counts, negative prompts and sizes in one batch.
    specs = [
        ("peft-meta", dict(prompt="a red cat", steps=4, guidance=7.5, seed=11)),
        ("peft-plain", dict(prompt="the dog", steps=6, guidance=3.0, seed=12, n=2)),
        ("peft-rslora-unet", dict(prompt="a red cat", steps=4, guidance=1.0, seed=13)),
        ("peft-text-only", dict(prompt="elephant", steps=5, guidance=7.5, seed=14, negative_prompt="blurry")),
        ("kohya", dict(prompt="a cat and a dog", steps=4, guidance=5.0, seed=15)),
        ("kohya-noalpha", dict(prompt="red", steps=4, guidance=7.5, seed=16, height=48, width=40)),
        (None, dict(prompt="a red cat", steps=4, guidance=7.5, seed=11)),  # the base model, same seed as row 0
        ("peft-meta", dict(prompt="the dog", steps=3, guidance=7.5, seed=17, height=48, width=40)),
    ]
    jobs = [ImageJob(slot=0 if name is None else names.index(name) + 1, **kw) for name, kw in specs]
    images = engine.generate(jobs)

    # Rows of every tenant shared each UNet call: one call per step per size, not per image.
    assert len(calls) == 6 + 4, calls
    assert len(set(calls[0])) == 6, "the first 32x32 call carries six adapters and the base"
    for (name, kw), img in zip(specs, images):
        ref = oracle.image(None if name is None else sd_adapters[name][1], kw["prompt"], seed=kw["seed"],
                           steps=kw["steps"], guidance=kw["guidance"], n=kw.get("n", 1),
                           negative_prompt=kw.get("negative_prompt"), height=kw.get("height"), width=kw.get("width"))
        assert img.shape == ref.shape, (name, img.shape, ref.shape)
        diff = float(np.abs(img.numpy() - ref).max())
        assert diff <= TOL, f"{name}: max pixel difference {diff} against diffusers"
    # The adapters change the picture (else the comparison above proves nothing).
    base_img = images[6].numpy()
    assert float(np.abs(images[0].numpy() - base_img).max()) > 0.05


def test_euler_scheduler_and_iteration_level_admission(tmp_path, sd_adapters):
    """A scheduler that draws from the generator every step, and a job admitted while another is mid-way."""
    base = make_tiny_pipeline(tmp_path / "euler", scheduler="euler", seed=3)
    oracle = DiffusersOracle(base)
    a = make_diffusers_lora(base, tmp_path / "a", seed=21, r=4, alpha=4, pipe=oracle.pipe)
    k, kf = _kohya_dir(base, tmp_path, "k", seed=22, r=4, alpha=2, pipe=oracle.pipe)
    engine = _engine(base, slots=2)
    engine.patch.install(1, engine.load_adapter(a))
    engine.patch.install(2, engine.load_adapter(k))
    first = engine.prepare(ImageJob("a red cat", steps=6, seed=5, slot=1))
    second = engine.prepare(ImageJob("the dog", steps=4, seed=6, slot=2, guidance=4.0))
    engine.start([first])
    engine.step([first])
    engine.step([first])
    engine.start([second])
    while not (first.done and second.done):
        engine.step([j for j in (first, second) if not j.done])
    img1, img2 = engine.decode([first, second])
    ref1 = oracle.image(a, "a red cat", seed=5, steps=6)
    ref2 = oracle.image(kf, "the dog", seed=6, steps=4, guidance=4.0)
    assert float(np.abs(img1.numpy() - ref1).max()) <= TOL
    assert float(np.abs(img2.numpy() - ref2).max()) <= TOL


def _write(d: Path, tensors: dict, metadata: dict | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return d


def _refusals(sd_base, oracle, root: Path) -> dict[str, tuple[Path, str]]:
    pipe = oracle.pipe
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    unet_q = pipe.unet.get_submodule(q)
    cin, cout = unet_q.in_features, unet_q.out_features
    ok = {f"unet.{q}.lora_A.weight": torch.randn(4, cin), f"unet.{q}.lora_B.weight": torch.randn(cout, 4)}
    conv = "down_blocks.0.resnets.0.conv1"
    cw = pipe.unet.get_submodule(conv).weight.shape
    cases = {
        "conv": (_write(root / "conv", {**ok, f"unet.{conv}.lora_A.weight": torch.randn(4, cw[1], 3, 3),
                                         f"unet.{conv}.lora_B.weight": torch.randn(cw[0], 4, 1, 1)}), "conv LoRA"),
        "dora": (_write(root / "dora", {**ok, f"unet.{q}.lora_magnitude_vector": torch.randn(cout)}), "DoRA"),
        "bias": (_write(root / "bias", {**ok, f"unet.{q}.lora_B.bias": torch.randn(cout)}), "LoRA biases"),
        "sdxl": (_write(root / "sdxl", {**ok, "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                        torch.randn(4, 32)}), "text_encoder_2"),
        "shape": (_write(root / "shape", {f"unet.{q}.lora_A.weight": torch.randn(4, cin + 8),
                                          f"unet.{q}.lora_B.weight": torch.randn(cout, 4)}), "do not fit"),
        "rank": (_write(root / "rank", {f"unet.{q}.lora_A.weight": torch.randn(80, cin),
                                        f"unet.{q}.lora_B.weight": torch.randn(cout, 80)}), "maxRank"),
        "half": (_write(root / "half", {f"unet.{q}.lora_A.weight": torch.randn(4, cin)}), "only one of"),
        "untargeted": (_write(root / "untargeted", {
            "unet.time_embedding.linear_1.lora_A.weight": torch.randn(4, 32),
            "unet.time_embedding.linear_1.lora_B.weight": torch.randn(128, 4)}), "not served"),
        "meta-missing": (_write(root / "meta-missing", {
            **ok, "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4)},
            {"lora_adapter_metadata": '{"unet.r": 4, "unet.lora_alpha": 4}'}), "no config for text_encoder"),
        "meta-rank": (_write(root / "meta-rank", ok, {"lora_adapter_metadata": '{"unet.r": 8, "unet.lora_alpha": 8}'}),
                      "says r=8"),
    }
    k, _ = _kohya_dir(sd_base, root, "kohya-mixed", seed=1, r=4, alpha=2, pipe=pipe)
    f = next(k.glob("*.safetensors"))
    from safetensors.torch import load_file
    t = load_file(str(f))
    first_alpha = sorted(x for x in t if x.endswith(".alpha"))[0]
    t[first_alpha] = torch.tensor(7.0)
    save_file(t, str(f))
    cases["kohya-alphas"] = (k, "per-module alphas differ")
    ldm = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, cin),
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(cout, 4)}
    (root / "ldm").mkdir()
    save_file(ldm, str(root / "ldm" / "ldm.safetensors"))
    cases["ldm-names"] = (root / "ldm", "names no module")
    (root / "pickle").mkdir()
    torch.save(ok, root / "pickle" / "pytorch_lora_weights.bin")
    cases["pickle"] = (root / "pickle", "pickle")
    two = _write(root / "two", ok)
    shutil.copy(two / "pytorch_lora_weights.safetensors", two / "other.safetensors")
    (two / "pytorch_lora_weights.safetensors").unlink()
    (two / "third.safetensors").write_bytes((two / "other.safetensors").read_bytes())
    cases["ambiguous"] = (two, "keep one")
    return cases


def test_adapters_the_engine_cannot_apply_exactly_are_refused_with_the_reason(sd_base, oracle, tmp_path):
    engine = _engine(sd_base)
    for name, (path, needle) in _refusals(sd_base, oracle, tmp_path).items():
        with pytest.raises(AdapterFormatError) as e:
            engine.load_adapter(path)
        assert needle in str(e.value), f"{name}: {e.value}"


def test_bad_generation_parameters_are_refused_together(sd_base):
    engine = _engine(sd_base, slots=1)
    with pytest.raises(ImageRequestError) as e:
        engine.prepare(ImageJob("x", steps=0, height=30, n=20))
    msg = str(e.value)
    assert "height 30" in msg and "num_inference_steps 0" in msg and "n 20" in msg


def test_twenty_clients_over_eight_adapters_with_three_slots_get_their_own_images(sd_base, oracle, tmp_path, caplog):
    """Concurrency: fewer device slots than adapters, so slots are evicted and rewritten while other
    tenants' images denoise; every image must still be its own adapter's (checked against diffusers)."""
    import asyncio
    import threading

    from lorafleet.contracts.runtime_api import AdapterLoadRequest
    from lorafleet.runtime.tiers import AdapterManager
    from lorafleet.runtime.engine_api import Work
    from lorafleet.runtime.worker import Scheduler

    adapters = {}
    for i in range(8):
        if i % 2:
            d, f = _kohya_dir(sd_base, tmp_path, f"k{i}", seed=100 + i, r=2 + i, alpha=1.5, pipe=oracle.pipe)
            adapters[f"t{i}"] = (d, f)
        else:
            d = make_diffusers_lora(sd_base, tmp_path / f"p{i}", seed=100 + i, r=2 + i, alpha=4, pipe=oracle.pipe)
            adapters[f"t{i}"] = (d, d)
    engine = _engine(sd_base, slots=3)
    manager = AdapterManager("text-to-image", 4)  # the host tier holds half of them too
    engine.bind(manager)
    entries = {}
    for name, (d, _) in adapters.items():
        entry, _ = manager.register(name, "1", AdapterLoadRequest(path=str(d), sha256="0" * 64, tenant=name))
        assert entry.error is None, entry.error
        entries[name] = entry
    sched = Scheduler(max_queue=64, per_tenant_max_inflight=8)
    batcher = engine.batcher(sched, max_jobs=6)
    batcher.progress_log_s = 0.0  # log every step (a pool logs a long generation every 10 s)
    caplog.set_level("INFO", logger="lorafleet.runtime")
    stop = threading.Event()
    rounds = []

    def worker():
        while not stop.is_set():
            batcher.step()
            if batcher.active:
                rounds.append({w.payload.slot for w in batcher.active})

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    clients = [(f"t{i % 8}", f"prompt {i} cat", 1000 + i, 3 + i % 3) for i in range(20)]

    async def client(name, prompt, seed, steps):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = engine.prepare(ImageJob(prompt, steps=steps, seed=seed))
        sched.submit([Work(name, entries[name], job, loop, events)])
        progress = []
        while True:
            kind, value = await events.get()
            if kind == "progress":
                progress.append(value)
            elif kind == "result":
                return value, progress
            else:
                raise value

    async def run_all():
        return await asyncio.gather(*(client(*c) for c in clients))

    try:
        results = asyncio.run(run_all())
    finally:
        stop.set()
        thread.join(timeout=10)
    assert engine.slots.evictions > 0, "three slots for eight adapters: slots were reused"
    assert max(len(r) for r in rounds) >= 2, "jobs of several tenants denoised together"
    wrong = []
    for (name, prompt, seed, steps), (img, progress) in zip(clients, results):
        assert progress == [(k, steps) for k in range(1, steps + 1)]
        ref = oracle.image(adapters[name][1], prompt, seed=seed, steps=steps)
        diff = float(np.abs(img.numpy() - ref).max())
        if diff > TOL:
            wrong.append((name, seed, diff))
    assert wrong == [], f"images that are not their adapter's: {wrong}"
    progress = [r.getMessage() for r in caplog.records if "denoising steps" in r.getMessage()]
    assert any(m.startswith("image for t3 (t3@1): 1/") for m in progress), progress[:5]


def test_the_sidecar_accepts_and_refuses_exactly_what_the_runtime_does(sd_base, oracle, sd_adapters, tmp_path):
    """One rule in two places would drift: an adapter the sidecar installs and the runtime refuses
    fails on every replica. Both read contracts.diffusion_lora; this holds them to the same verdicts."""
    from lorafleet.contracts.adapter_rules import BaseModelInfo, Limits, adapter_problems

    base = BaseModelInfo.from_dir(sd_base)
    assert base.components is not None and "down_blocks.1.attentions.0.proj_in" in base.components["unet"]
    limits = Limits(max_rank=64)
    engine = _engine(sd_base)
    for name, (d, _) in sd_adapters.items():
        assert adapter_problems(d, limits, base) == [], name
        engine.load_adapter(d)
    for name, (path, needle) in _refusals(sd_base, oracle, tmp_path).items():
        problems = "; ".join(adapter_problems(path, limits, base))
        assert needle in problems, f"{name}: the sidecar says {problems!r}"
        with pytest.raises(AdapterFormatError):
            engine.load_adapter(path)
    # Without a base (lorafleet push), a diffusion LoRA folder is checked for what needs none.
    problems = adapter_problems(sd_adapters["kohya"][0], Limits(max_rank=4))
    assert problems and all("rank 8 is above maxRank (4)" in p for p in problems)
    assert adapter_problems(sd_adapters["kohya"][0], Limits(max_rank=8)) == []

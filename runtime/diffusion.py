"""The text-to-image engine: a Stable Diffusion pipeline (UNet2DConditionModel + CLIP text encoder +
AutoencoderKL, any diffusers scheduler) whose UNet and text-encoder projections carry per-slot LoRA,
so images of many tenants denoise together: every UNet call runs the rows of every running image of
one size (both classifier-free-guidance halves), each row with its own adapter and its own timestep.

Each image keeps a scheduler of its own, so requests with different step counts, guidance or seeds
share UNet calls from any step on (iteration-level batching); the arithmetic per image is that of
diffusers' ``StableDiffusionPipeline.__call__``, which the tests hold it to."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorafleet.runtime.engines import DTYPES, Engine
from lorafleet.runtime.peft_format import HostAdapter
from lorafleet.runtime.worker import ModelWorker, slot_acceptor

log = logging.getLogger("lorafleet.runtime")

TASK = "text-to-image"
MAX_STEPS = 200
MAX_SIDE = 2048
MAX_IMAGES = 8


class ImageRequestError(ValueError):
    """A generation parameter this engine cannot honour; the message names it."""


@dataclass(eq=False)
class ImageJob:
    """One prompt's ``n`` images being denoised: its adapter slot, settings and scheduler state."""

    prompt: str
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    n: int = 1
    seed: int | None = None
    negative_prompt: str | None = None
    eta: float = 0.0
    slot: int = 0
    # state, set by DiffusionEngine.start
    generator: torch.Generator | None = None
    scheduler: object = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    embeds: torch.Tensor | None = None  # (2n or n, tokens, dim): negative halves first, as diffusers
    index: int = 0  # UNet evaluations done
    step_kwargs: dict = field(default_factory=dict)

    @property
    def cfg(self) -> bool:
        return self.guidance > 1.0

    @property
    def size(self) -> tuple[int, int]:
        return int(self.height), int(self.width)

    @property
    def total(self) -> int:
        return 0 if self.timesteps is None else len(self.timesteps)

    @property
    def done(self) -> bool:
        return self.timesteps is not None and self.index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        return self.n * (2 if self.cfg else 1)


class _Components(nn.Module):
    """The LoRA'd models under one root, so adapter module paths read ``unet.<...>``/``text_encoder.<...>``."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder


def _check_pipeline(model_dir: Path) -> dict:
    index_file = model_dir / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no model_index.json; a text-to-image pool's model is a diffusers "
                                "pipeline folder (save_pretrained of a StableDiffusionPipeline)")
    index = json.loads(index_file.read_text())
    cls = index.get("_class_name")
    problems = []
    if cls != "StableDiffusionPipeline":
        problems.append(f"pipeline class {cls!r} is not served (only StableDiffusionPipeline: UNet2DConditionModel "
                        "+ CLIPTextModel + AutoencoderKL)")
    want = {"unet": "UNet2DConditionModel", "text_encoder": "CLIPTextModel", "vae": "AutoencoderKL"}
    for comp, name in want.items():
        got = (index.get(comp) or [None, None])[1]
        if got != name:
            problems.append(f"{comp} is {got!r}, expected {name}")
    if problems:
        raise ValueError(f"{model_dir}: " + "; ".join(problems))
    return index


class DiffusionEngine(Engine):
    task = TASK

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, device_slots: int, max_rank: int,
                 device: str = "cpu"):
        self.unet, self.text_encoder, self.vae, self.scheduler = unet.eval(), text_encoder.eval(), vae.eval(), scheduler
        cfg = unet.config
        if getattr(cfg, "time_cond_proj_dim", None) is not None or getattr(cfg, "addition_embed_type", None):
            raise ValueError("UNet with time_cond_proj_dim or addition_embed_type (LCM, SDXL) is not served")
        # Module shapes before any layer is wrapped: what adapters are checked against.
        self.base_shapes = {
            comp: {name: list(m.weight.shape) for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d))}
            for comp, model in (("unet", unet), ("text_encoder", text_encoder))}
        super().__init__(_Components(unet, text_encoder), tokenizer, device_slots, max_rank, device)
        self.weights_bytes += sum(p.numel() * p.element_size() for p in vae.parameters())
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.default_side = int(cfg.sample_size) * self.vae_scale_factor
        self.max_tokens = int(tokenizer.model_max_length)
        self.use_attention_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
        params = set(inspect.signature(scheduler.step).parameters)
        self._step_takes = {"eta": "eta" in params, "generator": "generator" in params}

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", device_slots: int = 32,
                 max_rank: int = 64) -> "DiffusionEngine":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.schedulers import SchedulerMixin
        import diffusers
        from transformers import CLIPTextModel, CLIPTokenizer

        model_dir = Path(model_dir)
        index = _check_pipeline(model_dir)
        if (index.get("safety_checker") or [None, None])[1]:
            log.warning("%s ships a safety checker; this engine does not run it (images are not filtered)", model_dir)
        torch_dtype = DTYPES[dtype]
        unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"), torch_dtype=torch_dtype).to(device)
        vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"), torch_dtype=torch_dtype).to(device)
        te = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"), dtype=torch_dtype).to(device)
        tok = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
        sched_cls = getattr(diffusers, str((index.get("scheduler") or [None, None])[1]), None)
        if not (isinstance(sched_cls, type) and issubclass(sched_cls, SchedulerMixin)):
            raise ValueError(f"{model_dir}: scheduler {index['scheduler'][1]!r} is not a diffusers scheduler")
        sched = sched_cls.from_pretrained(str(model_dir / "scheduler"))
        return cls(unet, te, tok, vae, sched, device_slots, max_rank, device)

    def max_input_tokens(self) -> int:
        return self.max_tokens

    def batcher(self, sched, max_jobs: int, metrics=None) -> "DiffusionBatcher":
        return DiffusionBatcher(self, sched, max_jobs, metrics)

    @property
    def worker_class(self):
        return DiffusionWorker

    # --- adapters ----------------------------------------------------------------------------------
    def bind(self, manager) -> None:
        super().bind(manager)
        manager.read_adapter = self.load_adapter

    def load_adapter(self, path: str | Path, dtype: torch.dtype | None = None) -> HostAdapter:
        from lorafleet.runtime.diffusion_lora import load_diffusion_adapter

        return load_diffusion_adapter(path, self.base_shapes, self.patch.max_rank, dtype or self.dtype)

    # --- requests ----------------------------------------------------------------------------------
    def prepare(self, job: ImageJob) -> ImageJob:
        """Fill defaults and refuse what diffusers would refuse (or what this engine does not do)."""
        job.height = job.height or self.default_side
        job.width = job.width or self.default_side
        problems = []
        for name in ("height", "width"):
            v = getattr(job, name)
            if v % 8 or not 8 <= v <= MAX_SIDE:
                problems.append(f"{name} {v} must be a multiple of 8 between 8 and {MAX_SIDE}")
        if not 1 <= job.steps <= MAX_STEPS:
            problems.append(f"num_inference_steps {job.steps} must be between 1 and {MAX_STEPS}")
        if not 1 <= job.n <= MAX_IMAGES:
            problems.append(f"n {job.n} must be between 1 and {MAX_IMAGES}")
        if not 0 <= job.guidance <= 100:
            problems.append(f"guidance_scale {job.guidance} must be between 0 and 100")
        if job.eta < 0 or job.eta > 1:
            problems.append(f"eta {job.eta} must be between 0 and 1")
        if problems:
            raise ImageRequestError("; ".join(problems))
        if job.seed is None:
            job.seed = random.randrange(2**63)
        return job

    @torch.inference_mode()
    def _encode(self, texts: list[str], slots: list[int]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        mask = enc.attention_mask.to(self.device) if self.use_attention_mask else None
        self.patch.ctx.set(torch.tensor(slots, device=self.device))
        try:
            return self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)
        finally:
            self.patch.ctx.set(None)

    @torch.inference_mode()
    def start(self, jobs: list[ImageJob]) -> None:
        """Encode every new job's prompts in one text-encoder pass; draw its noise; set its scheduler."""
        texts, slots = [], []
        for j in jobs:
            texts.append(j.prompt)
            slots.append(j.slot)
            if j.cfg:
                texts.append(j.negative_prompt or "")
                slots.append(j.slot)
        embeds = self._encode(texts, slots)
        k = 0
        for j in jobs:
            pos = embeds[k:k + 1].repeat(j.n, 1, 1)
            k += 1
            if j.cfg:
                neg = embeds[k:k + 1].repeat(j.n, 1, 1)
                k += 1
                pos = torch.cat([neg, pos])
            j.embeds = pos
            j.scheduler = copy.deepcopy(self.scheduler)
            j.scheduler.set_timesteps(j.steps, device=self.device)
            j.timesteps = j.scheduler.timesteps
            j.generator = torch.Generator("cpu").manual_seed(j.seed)
            h, w = j.size
            shape = (j.n, self.unet.config.in_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
            # Noise from a CPU generator, as diffusers draws it for a CPU generator on any device.
            noise = torch.randn(shape, generator=j.generator, device="cpu", dtype=self.dtype).to(self.device)
            j.latents = noise * j.scheduler.init_noise_sigma
            j.step_kwargs = {}
            if self._step_takes["eta"]:
                j.step_kwargs["eta"] = j.eta
            if self._step_takes["generator"]:
                j.step_kwargs["generator"] = j.generator
            j.index = 0

    @torch.inference_mode()
    def step(self, jobs: list[ImageJob]) -> None:
        """One UNet call over every row of ``jobs`` (all the same size), then each job's scheduler step."""
        assert len({j.size for j in jobs}) == 1, "one UNet call runs one latent size"
        xs, ts, embeds, slots = [], [], [], []
        for j in jobs:
            t = j.timesteps[j.index]
            x = torch.cat([j.latents] * 2) if j.cfg else j.latents
            xs.append(j.scheduler.scale_model_input(x, t))
            ts.append(t.reshape(1).to(torch.float32).expand(j.rows))
            embeds.append(j.embeds)
            slots += [j.slot] * j.rows
        self.patch.ctx.set(torch.tensor(slots, device=self.device))
        try:
            noise = self.unet(torch.cat(xs), torch.cat(ts), encoder_hidden_states=torch.cat(embeds),
                              return_dict=False)[0]
        finally:
            self.patch.ctx.set(None)
        k = 0
        for j in jobs:
            pred = noise[k:k + j.rows]
            k += j.rows
            if j.cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + j.guidance * (text - uncond)
            j.latents = j.scheduler.step(pred, j.timesteps[j.index], j.latents, **j.step_kwargs,
                                         return_dict=False)[0]
            j.index += 1

    @torch.inference_mode()
    def decode(self, jobs: list[ImageJob]) -> list[torch.Tensor]:
        """Finished jobs' images as float tensors (n, H, W, 3) in [0, 1] on the CPU (one VAE call per size)."""
        out: dict[int, torch.Tensor] = {}
        by_size: dict[tuple[int, int], list[ImageJob]] = {}
        for j in jobs:
            by_size.setdefault(j.size, []).append(j)
        for group in by_size.values():
            z = torch.cat([j.latents for j in group]) / self.vae.config.scaling_factor
            img = self.vae.decode(z, return_dict=False)[0]
            img = (img * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float()
            k = 0
            for j in group:
                out[id(j)] = img[k:k + j.n]
                k += j.n
        for j in jobs:  # the state is large: drop it once the image exists
            j.latents = j.embeds = j.scheduler = None
        return [out[id(j)] for j in jobs]

    def generate(self, jobs: list[ImageJob]) -> list[torch.Tensor]:
        """Run ``jobs`` to completion together (slots already set): the batch path without a worker."""
        for j in jobs:
            self.prepare(j)
        self.start(jobs)
        running = list(jobs)
        while running:
            by_size: dict[tuple[int, int], list[ImageJob]] = {}
            for j in running:
                by_size.setdefault(j.size, []).append(j)
            for group in by_size.values():
                self.step(group)
            running = [j for j in running if not j.done]
        return self.decode(jobs)


def to_uint8(images: torch.Tensor):
    """[0, 1] floats (n, H, W, 3) -> uint8 numpy, rounded as diffusers' ``numpy_to_pil``."""
    return (images.numpy() * 255).round().astype("uint8")


def encode_image(image, fmt: str = "png") -> bytes:
    """One (H, W, 3) uint8 array as PNG or JPEG bytes."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG" if fmt in ("jpeg", "jpg") else "PNG")
    return buf.getvalue()



class DiffusionBatcher:
    """The model-worker side of a text-to-image pool (iteration-level batching): queued jobs are
    admitted between steps while others denoise, every running job advances one step per round (one
    UNet call per image size), finished ones are decoded, answered and give their slot back.

    ``works`` carry an ``ImageJob`` as payload and receive ``("progress", (done, total))`` after each
    step, then ``("result", images)`` or ``("error", exc)``."""

    def __init__(self, engine: DiffusionEngine, sched, max_jobs: int, metrics=None, progress_log_s: float = 10.0):
        self.engine = engine
        self.sched = sched
        self.max_jobs = max_jobs
        self.metrics = metrics
        self.progress_log_s = progress_log_s
        self.active: list = []
        self._logged: dict[int, float] = {}

    def _admit(self) -> None:
        room = self.max_jobs - len(self.active)
        if room <= 0 or not self.sched.queued:
            return
        held = {w.key for w in self.active if w.key is not None}
        new = []
        for w in self.sched.take(room, slot_acceptor(self.engine.slots, held), in_flight=len(self.active)):
            if w.cancelled:  # between the queue and the model: it never runs
                self.sched.finished(w)
                if self.metrics:
                    self.metrics.cancelled_work("queued", w)
                continue
            try:
                w.payload.slot = self.engine.acquire(w.entry)
                new.append(w)
            except Exception as e:
                w.send("error", e)
                self.sched.finished(w)
        if not new:
            return
        try:
            self.engine.start([w.payload for w in new])
        except Exception as e:
            log.exception("text encoding failed")
            for w in new:
                self._finish(w, error=e)
            return
        now = time.monotonic()
        for w in new:
            self._logged[id(w)] = now
        self.active.extend(new)

    def _finish(self, w, images=None, error: Exception | None = None) -> None:
        if error is not None:
            w.send("error", error)
        elif images is not None:
            w.send("result", images)
        self._logged.pop(id(w), None)
        self.engine.release(w.entry)
        self.sched.finished(w)

    def step(self) -> None:
        if not self.active:
            with self.sched.cv:
                self.sched.cv.wait_for(lambda: self.sched.queued or self.sched.control or self.sched.closed,
                                       timeout=0.5)
        self._admit()
        for w in [w for w in self.active if w.cancelled]:
            self.active.remove(w)
            self._finish(w)
            if self.metrics:
                self.metrics.cancelled_work("running", w)
        by_size: dict[tuple[int, int], list] = {}
        for w in self.active:
            by_size.setdefault(w.payload.size, []).append(w)
        for group in by_size.values():
            t0, c0 = time.perf_counter(), time.thread_time()
            for w in group:
                w.steps += 1
            try:
                self.engine.step([w.payload for w in group])
            except Exception as e:
                log.exception("denoising step failed")
                for w in group:
                    self.active.remove(w)
                    self._finish(w, error=e)
                continue
            if self.metrics:
                self.metrics.batch(TASK, sum(w.payload.rows for w in group), time.perf_counter() - t0,
                                   time.thread_time() - c0)
            now = time.monotonic()
            for w in group:
                job: ImageJob = w.payload
                w.send("progress", (job.index, job.total))
                if self.metrics:
                    self.metrics.denoise_step(w.tenant)
                if now - self._logged.get(id(w), now) >= self.progress_log_s and not job.done:
                    self._logged[id(w)] = now
                    log.info("image for %s (%s): %d/%d denoising steps", w.tenant,
                             w.entry.served if w.entry else "base", job.index, job.total)
        done = [w for w in self.active if w.payload.done]
        if done:
            self.active = [w for w in self.active if not w.payload.done]
            try:
                images = self.engine.decode([w.payload for w in done])
            except Exception as e:
                log.exception("decoding images failed")
                for w in done:
                    self._finish(w, error=e)
                return
            for w, img in zip(done, images):
                self._finish(w, images=img)

    def shutdown(self) -> None:
        for w in self.active:
            w.send("error", RuntimeError("the runtime is shutting down"))


class DiffusionWorker(ModelWorker):
    """The model-worker thread of a text-to-image pool: control operations between rounds, then one
    round of the batcher (``maxBatchSize`` is the number of image jobs denoising at once)."""

    def __init__(self, engine: DiffusionEngine, scheduler, max_batch_size: int, max_batch_delay_ms: float,
                 metrics=None):
        super().__init__(engine, scheduler, max_batch_size, max_batch_delay_ms, metrics)
        self.batcher = DiffusionBatcher(engine, scheduler, max_batch_size, metrics)

    def run(self) -> None:
        while not self.sched.closed:
            try:
                self._control()
                self.batcher.step()
            except Exception:  # never let one bad round kill the worker
                log.exception("model worker step failed")
        self.batcher.shutdown()

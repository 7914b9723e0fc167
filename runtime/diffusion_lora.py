"""Read a diffusion LoRA directory (diffusers ``pytorch_lora_weights.safetensors`` or one kohya file)
into host tensors keyed ``unet.<module>`` / ``text_encoder.<module>``, with the scale diffusers'
``load_lora_weights`` applies folded into B. Which files are accepted is ``contracts.diffusion_lora``."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open

from lorafleet.contracts import diffusion_lora as rules
from lorafleet.contracts.adapter_rules import TRANSIENT, BaseModelInfo, Limits, adapter_problems
from lorafleet.runtime.peft_format import AdapterFormatError, HostAdapter, LoRAWeights


def _scale(plan: rules.DiffusionLoRAPlan, p: rules.ModulePlan, alphas: dict[str, float]) -> float:
    if plan.layout == "kohya":
        return alphas[p.alpha_key] / p.rank if p.alpha_key else 1.0
    cfg = plan.config.get(p.component)
    if not cfg:
        return 1.0  # no metadata: diffusers sets alpha = r for every module
    r = p.rank  # equal to the metadata's (rank_pattern included): the plan checked it
    alpha = float(rules.pattern_value(cfg.get("alpha_pattern") or {}, p.module, cfg.get("lora_alpha", 8)))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def load_diffusion_adapter(path: str | Path, base: dict[str, dict[str, list[int]]], max_rank: int,
                           dtype: torch.dtype = torch.float32) -> HostAdapter:
    """``base``: component -> module path -> weight shape (``DiffusionEngine.base_shapes``)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"adapter directory {path} does not exist", "path", TRANSIENT)
    # The shared rules decide (contracts.adapter_rules, as the sidecar applies them: symlinks, pickles,
    # a header the safetensors library would choke on, the diffusion_lora plan against this pipeline,
    # kohya alphas); what follows only reads a file they passed.
    found = adapter_problems(path, Limits(max_rank=max_rank, max_adapter_bytes=None),
                             BaseModelInfo.build("", "", "", {}, task="text-to-image", components=base))
    if found:
        raise AdapterFormatError(f"{path}: " + "; ".join(p.message for p in found), found[0].category)
    name, _ = rules.pick_weights_file([p.name for p in path.iterdir() if p.is_file()])
    with safe_open(str(path / name), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        plan, problems = rules.plan(shapes, f.metadata(), base, max_rank)
        if plan is None:  # the rules above ran the same plan: only a file changed meanwhile gets here
            raise AdapterFormatError(f"{path / name}: " + "; ".join(problems))
        alphas = {p.alpha_key: float(f.get_tensor(p.alpha_key).item()) for p in plan.modules if p.alpha_key}
        modules: dict[str, LoRAWeights] = {}
        nbytes = 0
        for p in plan.modules:
            scale = _scale(plan, p, alphas)
            a = f.get_tensor(p.down_key).t().to(dtype).contiguous()
            b = (f.get_tensor(p.up_key).t().float() * scale).to(dtype).contiguous()
            modules[f"{p.component}.{p.module}"] = LoRAWeights(a, b, p.rank, scale)
            nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return HostAdapter(modules=modules, task="text-to-image", max_rank=plan.max_rank, nbytes=nbytes)

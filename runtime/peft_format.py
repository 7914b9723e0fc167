"""Parse a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) straight into
host tensors: per target module A (in×r) and B·scale (r×out), plus per-tenant heads (modules_to_save)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"  # optional: a JSON list of label names (or {"id2label": {...}})

# PEFT task types -> the runtime task a pool serves.
TASKS = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "text-generation"}
_PREFIX = "base_model.model."


class AdapterFormatError(ValueError):
    """The adapter directory is not a LoRA adapter this runtime can serve; the message says why."""


@dataclass
class LoRAWeights:
    a: torch.Tensor  # (in, r): x @ a
    b: torch.Tensor  # (r, out): already multiplied by the adapter's scale for this module
    rank: int
    scale: float


@dataclass
class HostAdapter:
    """One adapter version parsed into host memory."""

    modules: dict[str, LoRAWeights]  # module path in the base model (e.g. model.layers.0.self_attn.q_proj)
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module path -> weight/bias
    task: str | None = None
    labels: list[str] | None = None
    max_rank: int = 0
    nbytes: int = 0


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches rank_pattern/alpha_pattern keys as regexes against the end of the module path.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _labels(path: Path, config: dict, head_rows: int | None) -> list[str] | None:
    id2label = config.get("id2label")
    lf = path / LABELS_FILE
    if lf.is_file():
        data = json.loads(lf.read_text())
        id2label = data.get("id2label", data) if isinstance(data, dict) else data
    if isinstance(id2label, dict):
        id2label = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
    if id2label:
        labels = [str(x) for x in id2label]
        if head_rows is not None and len(labels) != head_rows:
            raise AdapterFormatError(
                f"{path}: {len(labels)} label names but the classifier head has {head_rows} outputs; "
                f"fix {LABELS_FILE} or id2label")
        return labels
    return [f"LABEL_{i}" for i in range(head_rows)] if head_rows else None


def read_config(path: Path) -> dict:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no {CONFIG_FILE}; an adapter directory is what PEFT's "
                                 "save_pretrained writes")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{cfg_path}: use_dora is not supported; train a plain LoRA")
    if config.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{cfg_path}: fan_in_fan_out adapters are not supported")
    return config


def load_adapter_dir(path: str | Path, dtype: torch.dtype = torch.float32) -> HostAdapter:
    """Read one adapter directory into host tensors with the LoRA scale folded into B."""
    path = Path(path)
    config = read_config(path)
    wpath = path / WEIGHTS_FILE
    if not wpath.is_file():
        raise AdapterFormatError(f"{path}: no {WEIGHTS_FILE} (pickled .bin weights are refused)")
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))

    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(wpath), framework="pt") as f:
        for key in f.keys():
            tensors[key] = f.get_tensor(key)

    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if name.endswith(".lora_A.weight"):
            a_parts[name[: -len(".lora_A.weight")]] = t
        elif name.endswith(".lora_B.weight"):
            b_parts[name[: -len(".lora_B.weight")]] = t
        elif name.endswith((".weight", ".bias")):
            module, _, kind = name.rpartition(".")
            module = module.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
            module = module.replace(".original_module", "")
            heads.setdefault(module, {})[kind] = t
        else:
            raise AdapterFormatError(f"{wpath}: unexpected tensor {key!r}")
    if set(a_parts) != set(b_parts):
        raise AdapterFormatError(f"{wpath}: modules with lora_A but no lora_B (or the reverse): "
                                 f"{sorted(set(a_parts) ^ set(b_parts))}")

    modules: dict[str, LoRAWeights] = {}
    max_rank = 0
    nbytes = 0
    for module, a in a_parts.items():
        b = b_parts[module]
        r = a.shape[0]
        expected_r = int(_pattern_value(rank_pattern, module, r_default))
        if r != expected_r or b.shape[1] != r:
            raise AdapterFormatError(f"{wpath}: {module} has rank {r} (lora_B {tuple(b.shape)}) but the "
                                     f"config says r={expected_r}")
        alpha = float(_pattern_value(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        wa = a.t().to(dtype).contiguous()
        wb = (b.t().float() * scale).to(dtype).contiguous()
        modules[module] = LoRAWeights(wa, wb, r, scale)
        max_rank = max(max_rank, r)
        nbytes += wa.numel() * wa.element_size() + wb.numel() * wb.element_size()
    for h in heads.values():
        for k in list(h):
            h[k] = h[k].to(dtype).contiguous()
            nbytes += h[k].numel() * h[k].element_size()
    task = TASKS.get(config.get("task_type") or "")
    head_rows = next((h["weight"].shape[0] for h in heads.values() if "weight" in h), None)
    labels = _labels(path, config, head_rows) if task == "sequence-classification" or heads else None
    return HostAdapter(modules=modules, heads=heads, task=task, labels=labels, max_rank=max_rank,
                       nbytes=nbytes)

"""Parse a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) straight into
host tensors: per target module A (in×r) and B·scale (r×out), plus per-tenant heads (modules_to_save).

What is accepted is decided by ``lorafleet.contracts.adapter_rules`` (the same rules the sidecar and
``lorafleet push`` apply): this module reads the tensors of a directory those rules passed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lorafleet.contracts.adapter_rules import (CONFIG_FILE, LABELS_FILE, TASKS, TRANSIENT, WEIGHTS_FILE, Limits,
                                               LoraSettings, Refused, check_adapter)

__all__ = ["CONFIG_FILE", "LABELS_FILE", "TASKS", "WEIGHTS_FILE", "AdapterFormatError", "HostAdapter",
           "LoRAWeights", "load_adapter_dir", "pack"]

# The runtime's own loads apply no size limit (the sidecar applied the pool's before the download);
# the rank limit is the pool's and is checked against the loaded model (multilora.LoRAModelPatch).
RUNTIME_LIMITS = Limits(max_rank=1 << 30, max_adapter_bytes=None)


class AdapterFormatError(Refused, ValueError):
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
    settings: LoraSettings | None = None  # None: not read from a PEFT adapter_config.json
    # load_adapter_dir puts every tensor above in this one buffer (they are views of it), so that the trip to
    # a model process is one block of bytes rather than one per tensor (model_process._Pickler).
    blob: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every factor and head tensor, in a fixed order (modules' A and B, then heads)."""
        return [t for w in self.modules.values() for t in (w.a, w.b)] + \
            [t for h in self.heads.values() for t in h.values()]


def pack(host: HostAdapter) -> HostAdapter:
    """``host`` with its tensors copied into one contiguous buffer (``blob``) and replaced by views of it;
    their values are unchanged. Tensors of more than one dtype are left as they are."""
    ts = host.tensors()
    if not ts or len({t.dtype for t in ts}) != 1:
        return host
    blob = torch.empty(sum(t.numel() for t in ts), dtype=ts[0].dtype)
    off = 0

    def place(t: torch.Tensor) -> torch.Tensor:
        nonlocal off
        v = blob[off: off + t.numel()].view(t.shape)
        v.copy_(t)
        off += t.numel()
        return v

    for w in host.modules.values():
        w.a, w.b = place(w.a), place(w.b)
    for h in host.heads.values():
        for k in h:
            h[k] = place(h[k])
    host.blob = blob
    return host


def read_checked_adapter(path: Path, limits: Limits = RUNTIME_LIMITS, what: str = ""):
    """The adapter rules' layout of ``path`` and its LoRA tensors as saved; a refusal is an
    ``AdapterFormatError`` naming ``what`` (e.g. "merged adapter ") and the path."""
    try:
        layout = check_adapter(path, limits)
    except Refused as e:
        raise AdapterFormatError(f"{what}{path}: {e.reason}", e.category, e.kind) from None
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        for key in layout.keys:
            tensors[key] = f.get_tensor(key)
    return layout, tensors


def load_adapter_dir(path: str | Path, dtype: torch.dtype = torch.float32,
                     limits: Limits = RUNTIME_LIMITS) -> HostAdapter:
    """Read one adapter directory into host tensors with the LoRA scale folded into B."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise AdapterFormatError(f"adapter directory {path} does not exist", "path", TRANSIENT)
    layout, tensors = read_checked_adapter(path, limits)

    modules: dict[str, LoRAWeights] = {}
    heads: dict[str, dict[str, torch.Tensor]] = {}
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, (kind, module) in layout.keys.items():
        if kind == "lora_A":
            a_parts[module] = tensors[key]
        elif kind == "lora_B":
            b_parts[module] = tensors[key]
        else:
            heads.setdefault(module, {})[kind] = tensors[key].to(dtype).contiguous()
    nbytes = 0
    for module, a in a_parts.items():
        b = b_parts[module]
        r, scale = a.shape[0], layout.scales[module]
        wa = a.t().to(dtype).contiguous()
        wb = (b.t().float() * scale).to(dtype).contiguous()
        modules[module] = LoRAWeights(wa, wb, r, scale)
        nbytes += wa.numel() * wa.element_size() + wb.numel() * wb.element_size()
    for h in heads.values():
        nbytes += sum(t.numel() * t.element_size() for t in h.values())
    return pack(HostAdapter(modules=modules, heads=heads, task=layout.settings.task,
                            labels=layout.labels if (layout.settings.task == "sequence-classification" or heads) else None,
                            max_rank=layout.max_rank, nbytes=nbytes, settings=layout.settings))

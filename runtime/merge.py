"""Merging one LoRA adapter into the base model's weights at load (a merged pool,
``spec.model.mergedAdapter``): W += (B @ A) * scale per target module, as PEFT's ``merge_and_unload``
computes it. PEFT keeps LoRA factors in float32 even over a 16-bit base (``autocast_adapter_dtype``),
forms the product there and adds it in place into the base weight (the sum rounded once, to the
weight's dtype); so does this, and the merged model answers what PEFT's merged model answers, at the
base's speed."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.contracts.adapter_rules import PERMANENT, Refused
from lorafleet.runtime.peft_format import read_checked_adapter


class MergeRefused(Refused, ValueError):
    """The adapter cannot be merged into this base exactly; the message says why and what to do."""


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` for a Linear LoRA with float32 factors: (B @ A) * scale."""
    return (b.to(torch.float32) @ a.to(torch.float32)) * scale


@torch.no_grad()
def merge_adapter(model: torch.nn.Module, adapter_dir: str | Path) -> list[str]:
    """Merge the adapter at ``adapter_dir`` (a directory the adapter rules accept) into ``model`` in
    place; returns the module paths it changed. Refuses, before changing anything, an adapter with
    trained heads (modules_to_save) or a target that is not a plain ``nn.Linear`` of this model."""
    path = Path(adapter_dir)
    layout, tensors = read_checked_adapter(path, what="merged adapter ")
    a_parts: dict[str, torch.Tensor] = {}
    b_parts: dict[str, torch.Tensor] = {}
    for key, (kind, module) in layout.keys.items():
        if kind == "lora_A":
            a_parts[module] = tensors[key]
        elif kind == "lora_B":
            b_parts[module] = tensors[key]
        else:
            raise MergeRefused(f"merged adapter {path}: it trains module {module} in full (modules_to_save); a merged "
                               "pool merges LoRA factors only. Serve it on a shared pool instead", "merge", PERMANENT)
    targets = {}
    for module in sorted(a_parts):
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise MergeRefused(f"merged adapter {path}: the base model has no module {module}", "merge",
                               PERMANENT) from None
        if type(layer) is not torch.nn.Linear:
            raise MergeRefused(f"merged adapter {path}: module {module} is a {type(layer).__name__}, not a Linear "
                               "layer; only Linear targets are merged", "merge", PERMANENT)
        a, b = a_parts[module], b_parts[module]
        if tuple(layer.weight.shape) != (b.shape[0], a.shape[1]):
            raise MergeRefused(f"merged adapter {path}: {module} has weight {tuple(layer.weight.shape)}, the adapter's "
                               f"factors make {(b.shape[0], a.shape[1])}", "merge", PERMANENT)
        targets[module] = layer
    for module, layer in targets.items():
        w = layer.weight
        # In place, as PEFT: a 16-bit weight plus the float32 delta, rounded once into the weight.
        w.data += delta_weight(a_parts[module].to(w.device), b_parts[module].to(w.device), layout.scales[module])
    return sorted(targets)

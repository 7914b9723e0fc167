"""What ``spec.runtime.engine: auto`` runs, the one rule the runtime (which engine it builds) and the
operator (which runtime image a pool's pods get) both apply."""

from __future__ import annotations


def auto_engine(task: str, quantization: str, merged: bool, *, gpu: bool, vllm: bool) -> str:
    """``vllm`` for a text-generation pool on a GPU whose runtime has vLLM, unless its base is quantized
    (the torch engine's bitsandbytes path) or merged (the torch engine merges the adapter at load), both of
    which the vLLM engine refuses; ``torch`` otherwise."""
    torch_only = quantization != "none" or merged
    return "vllm" if task == "text-generation" and not torch_only and gpu and vllm else "torch"

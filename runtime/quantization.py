"""A quantized base model for the torch engine: bitsandbytes int8 (LLM.int8) or NF4 linear layers,
loaded through transformers' own quantizer (the call PEFT's users make), with what cannot run here
refused at startup, and the base's weight bytes before and after quantization."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger("lorafleet.runtime")

from lorafleet.runtime.settings import QUANTIZATIONS
# Tasks whose linear layers the torch engine serves quantized; a diffusers pipeline is not loaded
# through transformers' quantizer.
QUANTIZED_TASKS = ("text-generation", "sequence-classification")
# bitsandbytes' NF4 kernel on CPUs with AVX512-BF16 repacks each weight in blocks of this many rows.
_CPU_NF4_BLOCK_ROWS = 32


class UnsupportedQuantization(ValueError):
    """The pool's quantization cannot run with this engine, task, device or model."""


def bitsandbytes_config(quantization: str, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for a pool's quantization (None for ``none``). NF4 is QLoRA's: 4-bit
    NormalFloat with double-quantized block scales, computing in the pool's dtype; int8 is LLM.int8
    with bitsandbytes' default outlier threshold. transformers keeps the output head (and any module
    it keeps in full precision) unquantized."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    raise UnsupportedQuantization(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")


def check_supported(quantization: str, task: str, device: str) -> None:
    """Refuse, before any weight is read, what this engine cannot serve quantized."""
    if quantization == "none":
        return
    if quantization not in QUANTIZATIONS:
        raise UnsupportedQuantization(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if task not in QUANTIZED_TASKS:
        raise UnsupportedQuantization(f"quantization {quantization} is not supported for {task} pools by the torch "
                                      f"engine (only {' and '.join(QUANTIZED_TASKS)}); set quantization none")
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise UnsupportedQuantization(f"quantization {quantization} runs on cpu or cuda devices, not {device!r}; "
                                      "set quantization none or another device")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UnsupportedQuantization(f"quantization {quantization} on {device!r}: no CUDA device is visible")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise UnsupportedQuantization(f"quantization {quantization} needs the bitsandbytes package (pinned in "
                                      f"requirements.lock; the runtime image has it): {e}; install it or set "
                                      "quantization none") from None


def load_kwargs(quantization: str, dtype: torch.dtype, device: str) -> dict:
    """Extra ``from_pretrained`` arguments: a quantized model is placed by its device map (bitsandbytes
    models refuse ``.to``)."""
    cfg = bitsandbytes_config(quantization, dtype)
    if cfg is None:
        return {}
    return {"quantization_config": cfg, "device_map": {"": device}}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes linear layers of ``model`` by path (empty when it is not quantized)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return {}
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def prepare(model: nn.Module, quantization: str, device: str) -> None:
    """Make the loaded quantized model serve-ready before the first request: shapes bitsandbytes' CPU
    NF4 kernel cannot take are refused by name, and one forward runs so that layers which repack
    their weights on first use (NF4 on AVX512-BF16 CPUs) do it now and report their real size."""
    if quantization == "none":
        return
    layers = quantized_layers(model)
    if not layers:
        raise UnsupportedQuantization(f"quantization {quantization}: no linear layer of the model was quantized")
    if quantization == "nf4" and torch.device(device).type == "cpu":
        odd = [f"{name} ({m.out_features} outputs)" for name, m in layers.items()
               if getattr(m, "support_avx512bf16_for_cpu", False) and m.out_features % _CPU_NF4_BLOCK_ROWS]
        if odd:
            raise UnsupportedQuantization(
                f"quantization nf4 on this CPU (bitsandbytes' AVX512-BF16 kernel) needs every quantized layer's "
                f"output size to be a multiple of {_CPU_NF4_BLOCK_ROWS}; not: {', '.join(odd[:5])}"
                f"{' and more' if len(odd) > 5 else ''}; use quantization int8 or none on this machine, or nf4 on cuda")
    if quantization == "int8":
        _quiet_int8_cast_warning()
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if dtype != torch.float16:
            log.info("quantization int8: bitsandbytes' 8-bit matmul quantizes activations from float16, so every "
                     "quantized layer casts its %s input to float16 (dtype float16 avoids the casts)",
                     str(dtype).removeprefix("torch."))
    model.eval()
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    try:
        with torch.inference_mode():
            model(input_ids=ids)
    except Exception as e:
        raise UnsupportedQuantization(f"quantization {quantization} on {device}: the first forward of the quantized "
                                      f"model failed ({type(e).__name__}: {e}); set quantization none") from e


def _quant_state_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a bitsandbytes layer holds outside its parameters: NF4 block scales (and their own
    scales when double-quantized), int8 row scales."""
    out = []
    w = module.weight
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None)):
            if isinstance(t, torch.Tensor):
                out.append(t)
        nested = getattr(qs, "state2", None)
        if getattr(qs, "nested", False) and nested is not None:
            out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    for holder in (w, getattr(module, "state", None)):
        scb = getattr(holder, "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out


def weight_bytes(model: nn.Module, dtype: torch.dtype) -> tuple[int, int]:
    """``(loaded, unquantized)``: the bytes the model's weights hold now, and what they hold in ``dtype``
    without quantization. Tied tensors count once; equal when nothing is quantized."""
    quantized = quantized_layers(model)
    qweights = {id(m.weight): m for m in quantized.values()}
    seen: set[int] = set()
    loaded = unquantized = 0
    size = torch.tensor([], dtype=dtype).element_size()
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        n = t.numel() * t.element_size()
        loaded += n
        layer = qweights.get(id(t))
        unquantized += layer.out_features * layer.in_features * size if layer is not None else n
    for layer in quantized.values():
        for t in _quant_state_tensors(layer):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                loaded += t.numel() * t.element_size()
    return loaded, unquantized


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


def _quiet_int8_cast_warning() -> None:
    """bitsandbytes logs a warning on every 8-bit matmul whose input is not float16 (every layer, every
    step): said once at startup instead (``prepare``)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in logger.filters):
        logger.addFilter(_DropInt8CastWarning())

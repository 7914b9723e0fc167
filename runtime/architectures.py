"""Which causal-LM architectures the generation engine computes exactly, and how: one ``Layout`` per
accepted architecture (where its decoder layer puts norms, q/k norms, fused projections, windows and
soft-capping), and the refusals, with their reasons, for everything else.

An architecture is listed here only once greedy tokens of a seeded tiny model of it equal Hugging
Face's own ``generate`` (and PEFT's with adapters): tests/unit/runtime/test_architectures.py."""

from __future__ import annotations

from dataclasses import dataclass

# RoPE variants whose frequencies do not depend on the sequence seen so far. ``dynamic`` and
# ``longrope`` rescale with the current length (in HF, the longest row of the batch), so a row's
# answer would depend on what it was batched with.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class UnsupportedModel(ValueError):
    """The base model cannot be served exactly by the generation engine; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Where one architecture's decoder layer puts its pieces (attribute names on HF's modules)."""

    pre_attn_norm: str | None = "input_layernorm"
    post_attn_norm: str | None = None  # applied to the attention output before the residual add
    pre_mlp_norm: str | None = "post_attention_layernorm"
    post_mlp_norm: str | None = None  # applied to the MLP output before the residual add
    fused_qkv: bool = False  # one ``qkv_proj`` (Phi-3); LoRA on it is a LoRA on that one Linear
    qk_norm: str | None = None  # "head": RMSNorm over head_dim (Qwen3, Gemma 3); "proj": over the projection (Olmo2)
    windows: str = "none"  # "none"; "all": config.sliding_window on every layer; "layer_types": per layer
    attn_softcap: bool = False  # config.attn_logit_softcapping (tanh on attention scores)
    final_softcap: bool = False  # config.final_logit_softcapping (tanh on the logits)
    rope_per_layer_type: bool = False  # Gemma 3: one rotary base for sliding layers, another for full
    multipliers: bool = False  # Granite: embedding_multiplier, residual_multiplier, logits_scaling


_GEMMA2 = dict(post_attn_norm="post_attention_layernorm", pre_mlp_norm="pre_feedforward_layernorm",
               post_mlp_norm="post_feedforward_layernorm", windows="layer_types", attn_softcap=True,
               final_softcap=True)

_OLMO2 = dict(pre_attn_norm=None, post_attn_norm="post_attention_layernorm", pre_mlp_norm=None,
              post_mlp_norm="post_feedforward_layernorm", qk_norm="proj")

LAYOUTS: dict[str, Layout] = {
    "LlamaForCausalLM": Layout(),
    "MistralForCausalLM": Layout(windows="all"),
    "MinistralForCausalLM": Layout(windows="layer_types"),
    "Qwen2ForCausalLM": Layout(windows="layer_types"),
    "Qwen3ForCausalLM": Layout(qk_norm="head", windows="layer_types"),
    "GemmaForCausalLM": Layout(),
    "GraniteForCausalLM": Layout(multipliers=True),  # attention_multiplier is HF's attn.scaling
    "Gemma2ForCausalLM": Layout(**_GEMMA2),
    "Gemma3ForCausalLM": Layout(**_GEMMA2, qk_norm="head", rope_per_layer_type=True),
    "Olmo2ForCausalLM": Layout(**_OLMO2),
    "Olmo3ForCausalLM": Layout(**_OLMO2, windows="layer_types", rope_per_layer_type=True),
    "Phi3ForCausalLM": Layout(fused_qkv=True, windows="all"),
    "Starcoder2ForCausalLM": Layout(windows="all"),  # LayerNorm and a plain MLP: HF's own modules
}

# Known architectures refused with a specific reason (anything else gets the generic one).
REFUSED: dict[str, str] = {
    "MixtralForCausalLM": "a mixture-of-experts MLP (routed experts) is not implemented",
    "Qwen2MoeForCausalLM": "a mixture-of-experts MLP (routed experts) is not implemented",
    "Qwen3MoeForCausalLM": "a mixture-of-experts MLP (routed experts) is not implemented",
    "PhiForCausalLM": "Phi-1/2 use a parallel attention+MLP block with LayerNorm and partial rotary, not implemented",
    "OlmoForCausalLM": "OLMo 1 uses non-parametric LayerNorm and q/k/v clipping, not implemented",
    "CohereForCausalLM": "Cohere uses a parallel attention+MLP block with LayerNorm, not implemented",
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 checkpoint is not served; use its text-only "
                                      "Gemma3ForCausalLM weights",
}


@dataclass(frozen=True)
class LayerPlan:
    window: int | None  # a query at p sees keys in (p - window, p]; None: all earlier keys
    softcap: float | None
    scaling: float
    layer_type: str | None  # Gemma 3's rotary table for this layer


@dataclass(frozen=True)
class ModelPlan:
    architecture: str
    layout: Layout
    layers: tuple[LayerPlan, ...]
    final_softcap: float | None
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_divisor: float | None = None


def supported() -> str:
    return ", ".join(a.removesuffix("ForCausalLM") for a in LAYOUTS)


def check_architecture(arch: str) -> Layout:
    """The layout of ``arch`` (a ``*ForCausalLM`` class name), or ``UnsupportedModel`` saying why not."""
    layout = LAYOUTS.get(arch)
    if layout is None:
        why = REFUSED.get(arch, "its decoder layer is not one the engine implements")
        raise UnsupportedModel(f"architecture {arch} cannot be served by the text-generation engine: {why}. "
                               f"Supported: {supported()}; serve this model with a server that implements it, "
                               "or pick a model of a supported architecture")
    return layout


def causal_lm_class(config) -> str:
    """The class ``AutoModelForCausalLM`` builds for ``config`` (known before any weight is read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) or (config.architectures or ["?"])[0]


def plan_model(model) -> ModelPlan:
    """How the engine computes ``model`` exactly, or ``UnsupportedModel`` naming every reason it cannot."""
    cfg = model.config
    arch = type(model).__name__
    layout = check_architecture(arch)
    problems = []
    rope = getattr(cfg, "rope_parameters", None) or {}
    ropes = rope.values() if layout.rope_per_layer_type else [rope]
    for r in ropes:
        rope_type = (r or {}).get("rope_type", "default")
        if rope_type not in STATIC_ROPE:
            problems.append(f"rope_type {rope_type!r} rescales the rotary frequencies with the sequence length "
                            f"(implemented: {', '.join(STATIC_ROPE)})")
    if getattr(cfg, "use_bidirectional_attention", None):
        problems.append("use_bidirectional_attention (an encoder variant) is not causal generation")
    if not layout.attn_softcap and getattr(cfg, "attn_logit_softcapping", None):
        problems.append("attn_logit_softcapping is set but this architecture's attention is not soft-capped here")
    layer_types = getattr(cfg, "layer_types", None)
    sliding = getattr(cfg, "sliding_window", None)
    layers = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        lt = layer_types[i] if layer_types else None
        if layout.windows == "all":
            window = sliding
        elif layout.windows == "layer_types":
            window = sliding if lt == "sliding_attention" else None
        else:
            window = None
        if lt not in (None, "full_attention", "sliding_attention"):
            problems.append(f"layer {i}: layer type {lt!r} is not implemented")
        softcap = getattr(cfg, "attn_logit_softcapping", None) if layout.attn_softcap else None
        layers.append(LayerPlan(window=int(window) if window else None, softcap=softcap,
                                scaling=float(attn.scaling), layer_type=lt))
        if layout.fused_qkv and not hasattr(attn, "qkv_proj"):
            problems.append(f"layer {i} has no qkv_proj")
    if problems:
        raise UnsupportedModel(f"{arch} cannot be served exactly by the text-generation engine: "
                               + "; ".join(dict.fromkeys(problems)))
    final = getattr(cfg, "final_logit_softcapping", None) if layout.final_softcap else None
    if layout.multipliers:
        return ModelPlan(arch, layout, tuple(layers), final, float(cfg.embedding_multiplier),
                         float(cfg.residual_multiplier), float(cfg.logits_scaling))
    return ModelPlan(arch, layout, tuple(layers), final)

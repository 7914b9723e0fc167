"""A tiny Stable-Diffusion-layout pipeline built from configs with seeded weights (UNet with
cross-attention, VAE, CLIP text encoder, a CLIP tokenizer written in code), tenant LoRAs in the formats
people publish for diffusers (PEFT-style ``pytorch_lora_weights.safetensors`` and kohya single files),
and diffusers itself as the oracle. Nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# The tokenizer's alphabet: CLIP's byte-to-unicode table, every symbol also as a word end (``</w>``).
_SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>", "r e", "re d</w>", "a n", "e l"]


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer(out_dir: str | Path, max_length: int = 77) -> Path:
    """A CLIP BPE tokenizer (vocab.json + merges.txt) over single bytes plus a few merges."""
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(s, len(vocab))
    for m in _MERGES:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    for s in _SPECIAL:
        vocab[s] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(str(out))
    return out


def make_tiny_pipeline(out_dir: str | Path, *, seed: int = 0, channels: tuple[int, ...] = (32, 64),
                       cross_dim: int = 32, text_layers: int = 2, sample_size: int = 16,
                       scheduler: str = "ddim") -> Path:
    """Write a seeded tiny StableDiffusionPipeline folder (``model_index.json``); returns it."""
    from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    import tempfile

    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp)))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=channels, layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=8, use_linear_projection=True)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=sample_size * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=cross_dim, intermediate_size=2 * cross_dim,
        num_attention_heads=4, num_hidden_layers=text_layers, vocab_size=len(tokenizer),
        max_position_embeddings=tokenizer.model_max_length))
    # Random init leaves biases at zero and the UNet's output conv at zero; a base whose every weight
    # matters makes the equivalence tests sharper.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for model in (unet, text_encoder):
            for name, p in model.named_parameters():
                if name.endswith("bias") or "conv_out" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
    sched = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, **({"clip_sample": False, "set_alpha_to_one": False}
                                        if scheduler == "ddim" else {}))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return out


def load_pipeline(base_dir: str | Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def _seeded_lora_layers(model, targets, r: int, seed: int, b_std: float, rank_of=None) -> dict[str, torch.Tensor]:
    """``{module.lora_A.weight, module.lora_B.weight}`` for every Linear whose name ends in a target."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + t for t in targets)):
            rr = rank_of(name) if rank_of else r
            out[f"{name}.lora_A.weight"] = torch.randn(rr, module.in_features, generator=g) / module.in_features ** 0.5
            out[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rr, generator=g) * b_std
    return out


def make_diffusers_lora(base_dir: str | Path, out_dir: str | Path, *, seed: int, r: int = 4, alpha: float | None = None,
                        unet_targets=UNET_ATTN, text_targets=TEXT_ATTN, b_std: float = 0.3,
                        metadata: bool = True, use_rslora: bool = False, pipe=None) -> Path:
    """A PEFT-style diffusers LoRA written by ``StableDiffusionPipeline.save_lora_weights`` (seeded random
    factors). ``metadata`` stores the LoraConfig (r, lora_alpha, ...) the way diffusers' training scripts
    do; without it diffusers reads alpha = r (scale 1)."""
    from diffusers import StableDiffusionPipeline

    pipe = pipe or load_pipeline(base_dir)
    unet_layers = _seeded_lora_layers(pipe.unet, unet_targets, r, seed, b_std) if unet_targets else None
    text_layers = _seeded_lora_layers(pipe.text_encoder, text_targets, r, seed + 1000, b_std) if text_targets else None

    def meta(layers):
        if not metadata or not layers:
            return None
        targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers})
        return {"r": r, "lora_alpha": alpha if alpha is not None else r, "target_modules": targets,
                "use_rslora": use_rslora}

    StableDiffusionPipeline.save_lora_weights(
        str(out_dir), unet_lora_layers=unet_layers, text_encoder_lora_layers=text_layers,
        unet_lora_adapter_metadata=meta(unet_layers), text_encoder_lora_adapter_metadata=meta(text_layers),
        safe_serialization=True)
    return Path(out_dir)


def make_kohya_lora(base_dir: str | Path, out_file: str | Path, *, seed: int, r: int = 4, alpha: float = 2.0,
                    unet_targets=UNET_ATTN, text_targets=TEXT_ATTN, b_std: float = 0.3, pipe=None,
                    extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A kohya-style single file: ``lora_unet_<path with _>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` and ``lora_te_<path>`` for the text encoder."""
    from safetensors.torch import save_file

    pipe = pipe or load_pipeline(base_dir)
    tensors: dict[str, torch.Tensor] = {}
    for prefix, model, targets, s in (("lora_unet_", pipe.unet, unet_targets, seed),
                                      ("lora_te_", pipe.text_encoder, text_targets, seed + 1000)):
        if not targets:
            continue
        text = prefix == "lora_te_"
        for key, t in _seeded_lora_layers(model, targets, r, s, b_std).items():
            module, _, kind = key.rpartition(".lora_")
            if text and not module.startswith("text_model."):
                module = "text_model." + module  # kohya names CLIP modules from text_model down
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = t
            tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    tensors.update(extra or {})
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


class DiffusersOracle:
    """What diffusers' own pipeline answers with one adapter loaded by ``load_lora_weights`` (or none)."""

    def __init__(self, base_dir: str | Path):
        self.base_dir = base_dir
        self.pipe = load_pipeline(base_dir)

    @torch.inference_mode()
    def image(self, adapter: str | Path | None, prompt: str, *, seed: int, steps: int = 4, guidance: float = 7.5,
              height: int | None = None, width: int | None = None, negative_prompt: str | None = None,
              n: int = 1):
        """Images as float arrays in [0, 1] (``output_type="np"``), shape (n, H, W, 3)."""
        pipe = self.pipe
        if adapter is not None:
            p = Path(adapter)
            if p.is_file():
                pipe.load_lora_weights(str(p.parent), weight_name=p.name, adapter_name="tenant")
            else:
                pipe.load_lora_weights(str(p), adapter_name="tenant")
        try:
            return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                        negative_prompt=negative_prompt, num_images_per_prompt=n, output_type="np",
                        generator=torch.Generator().manual_seed(seed)).images
        finally:
            if adapter is not None:
                pipe.unload_lora_weights()

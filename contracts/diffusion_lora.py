"""Which diffusion LoRA files lorafleet serves, and how their tensor names map onto a Stable Diffusion
pipeline's modules: the one rule the sidecar (validating headers, no torch) and the runtime (loading
tensors) share.

Two layouts are accepted, as diffusers' ``load_lora_weights`` reads them:

- diffusers/PEFT (what ``save_lora_weights`` writes, ``pytorch_lora_weights.safetensors``):
  ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` (or ``.lora.down/.lora.up``,
  ``.lora_linear_layer.down/.up``) and ``text_encoder.<module>...``; the LoRA config (r, lora_alpha,
  rank/alpha patterns, rsLoRA) in the file's ``lora_adapter_metadata`` header when the trainer stored
  it, else scale 1 (alpha = r), which is what diffusers applies.
- kohya single files: ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
  and ``lora_te_`` (or ``lora_te1_``) for the text encoder; scale alpha / r.

Everything else is refused with the reason: conv LoRA (LoCon), DoRA, LoRA biases, a second text
encoder (an SDXL LoRA), modules outside the attention and MLP projections, per-module alphas in a
kohya file (diffusers applies those inconsistently), pickles."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder")

# Linear layers a LoRA may target, by the end of their module path (what diffusers loads exactly).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
TARGETS = {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS}

_PEFT_RE = re.compile(r"^(?P<comp>[a-z_0-9]+)\.(?P<module>.+?)\."
                      r"(?P<kind>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
                      r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight)$")
_KOHYA_RE = re.compile(r"^lora_(?P<comp>unet|te|te1|te2)_(?P<name>[A-Za-z0-9_]+)\.(?P<kind>lora_down\.weight|"
                       r"lora_up\.weight|alpha|dora_scale)$")
_KOHYA_COMP = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class ModulePlan:
    """One LoRA'd Linear: where its factors are in the file and what they target."""

    component: str  # unet | text_encoder
    module: str  # module path inside the component
    down_key: str  # (r, in)
    up_key: str  # (out, r)
    rank: int
    alpha_key: str | None = None  # kohya: a scalar tensor holding alpha


@dataclass
class DiffusionLoRAPlan:
    modules: list[ModulePlan]
    layout: str  # "diffusers" | "kohya"
    config: dict[str, dict]  # per component LoraConfig fields from the metadata ({} when none)
    max_rank: int


def component_configs(file_metadata: dict | None) -> dict[str, dict]:
    """Per component (``unet``, ``text_encoder``) LoraConfig fields from a safetensors ``__metadata__``."""
    raw = (file_metadata or {}).get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{METADATA_KEY} in the safetensors header is not JSON ({e})") from None
    if not isinstance(flat, dict):
        raise ValueError(f"{METADATA_KEY} in the safetensors header is not a JSON object")
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    return out


def pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: keys match the end of the module path as regexes."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def kohya_alpha_problem(alphas: dict[str, float]) -> str | None:
    """Why a kohya file's alphas (key -> value) are refused, if they are."""
    values = sorted(set(alphas.values()))
    if len(values) > 1:
        return (f"per-module alphas differ ({', '.join(f'{v:g}' for v in values)}); diffusers' load_lora_weights "
                "applies them inconsistently, so they are refused: save one alpha")
    return None


def _targets_match(targets, module: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


def _kohya_index(base: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, str | None]]:
    # kohya writes module paths with "_" for "."; the base's own paths disambiguate them. CLIP modules
    # are named from text_model down in kohya files whether or not the base model nests them there.
    index: dict[str, dict[str, str | None]] = {}
    for comp, modules in base.items():
        names: dict[str, str | None] = {}
        for m in modules:
            keys = {m.replace(".", "_")}
            if comp == "text_encoder" and not m.startswith("text_model."):
                keys.add("text_model_" + m.replace(".", "_"))
            for k in keys:
                names[k] = None if k in names and names[k] != m else m  # None: two modules collide
        index[comp] = names
    return index


def plan(tensors: dict[str, list[int]], file_metadata: dict | None, base: dict[str, dict[str, list[int]]],
         max_rank: int) -> tuple[DiffusionLoRAPlan | None, list[str]]:
    """Map a LoRA file's tensors (name -> shape) onto ``base`` (component -> module -> weight shape,
    [out, in] for Linear, 4-D for conv); returns the plan, or None and every reason to refuse it."""
    problems: list[str] = []
    try:
        configs = component_configs(file_metadata)
    except ValueError as e:
        return None, [str(e)]
    kohya = any(k.startswith("lora_") for k in tensors)
    if kohya and not all(k.startswith("lora_") for k in tensors):
        return None, ["the file mixes kohya keys (lora_unet_..., lora_te_...) with diffusers keys (unet..., "
                      "text_encoder...); save one layout"]
    pairs: dict[tuple[str, str], dict[str, str]] = {}
    index = _kohya_index(base) if kohya else {}
    for key in sorted(tensors):
        if kohya:
            m = _KOHYA_RE.match(key)
            if not m:
                problems.append(f"tensor {key}: not a kohya LoRA key (lora_unet_<module>.lora_down.weight, "
                                ".lora_up.weight, .alpha)")
                continue
            comp = _KOHYA_COMP[m["comp"]]
            kind = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(m["kind"], m["kind"])
            if kind == "dora_scale":
                problems.append(f"tensor {key}: DoRA adapters are not supported (diffusers drops the magnitude "
                                "silently); train a plain LoRA")
                continue
            if comp not in base:
                problems.append(f"tensor {key}: the pipeline has no {comp} (is this an SDXL LoRA?)")
                continue
            module = index[comp].get(m["name"])
            if module is None:
                problems.append(f"tensor {key}: {m['name']!r} names no module of the base pipeline's {comp} "
                                "(trained on another architecture, or with original LDM block names?)")
                continue
        else:
            m = _PEFT_RE.match(key)
            if m is None:
                why = ("DoRA adapters are not supported; train a plain LoRA" if "lora_magnitude_vector" in key
                       or "dora_scale" in key else
                       "LoRA biases (lora_bias) are not supported" if key.endswith("lora_B.bias") else
                       "not a LoRA factor (<component>.<module>.lora_A.weight / .lora_B.weight)")
                problems.append(f"tensor {key}: {why}")
                continue
            comp, module = m["comp"], m["module"]
            kind = "down" if m["kind"].startswith(("lora_A", "lora.down", "lora_linear_layer.down")) else "up"
            if comp not in base:
                problems.append(f"tensor {key}: the pipeline has no component {comp!r} "
                                f"(expected {' or '.join(base)}; is this an SDXL LoRA?)")
                continue
            if comp == "text_encoder" and module not in base[comp] and module.startswith("text_model."):
                module = module[len("text_model."):]  # diffusers strips it when the base is flattened
        pairs.setdefault((comp, module), {})[kind] = key

    has_alpha = {p.get("alpha") is not None for p in pairs.values()}
    if kohya and len(has_alpha) > 1:
        problems.append("some modules have a .alpha and others do not; diffusers reads the missing ones as the "
                        "most common alpha, kohya as alpha = rank: give every module its alpha")
    modules: list[ModulePlan] = []
    for (comp, module), kinds in sorted(pairs.items()):
        where = f"{comp}.{module}"
        if "down" not in kinds or "up" not in kinds:
            problems.append(f"{where}: has only one of the down (lora_A) and up (lora_B) factors")
            continue
        down, up = tensors[kinds["down"]], tensors[kinds["up"]]
        if len(down) == 4 or len(up) == 4:
            problems.append(f"{where}: a conv LoRA (LoCon) is not supported, only Linear layers")
            continue
        if len(down) != 2 or len(up) != 2:
            problems.append(f"{where}: LoRA factors are 2-D, got {down} and {up}")
            continue
        if not module.endswith(tuple("." + t for t in TARGETS[comp])) and module not in TARGETS[comp]:
            problems.append(f"{where}: LoRA on this module is not served (targets: "
                            f"{', '.join(TARGETS[comp])})")
            continue
        w = base[comp].get(module)
        if w is None:
            problems.append(f"{where}: the base pipeline has no such module")
            continue
        if len(w) != 2:
            problems.append(f"{where}: the base layer is a conv ({w}); a conv LoRA is not supported")
            continue
        r = down[0]
        if up[1] != r:
            problems.append(f"{where}: down {down} and up {up} disagree on the rank")
            continue
        if r > max_rank:
            problems.append(f"{where}: rank {r} is above maxRank ({max_rank})")
        if down[1] != w[1] or up[0] != w[0]:
            problems.append(f"{where}: LoRA shapes down {down}, up {up} do not fit the base weight {w} "
                            f"(expected down [r, {w[1]}], up [{w[0]}, r]); trained on another base?")
            continue
        modules.append(ModulePlan(comp, module, kinds["down"], kinds["up"], r, kinds.get("alpha")))

    if configs and kohya:
        problems.append(f"a kohya file with {METADATA_KEY} is ambiguous (diffusers refuses both); drop one")
    for comp in {p.component for p in modules}:
        if configs and comp not in configs:
            problems.append(f"{METADATA_KEY} has no config for {comp} although the file has {comp} LoRA "
                            "weights (diffusers would load them with LoraConfig defaults)")
    for comp, cfg in configs.items():
        if comp not in COMPONENTS:
            continue
        for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
            if cfg.get(flag):
                problems.append(f"{METADATA_KEY}: {comp}.{flag} is set; {what} is not supported")
        if cfg.get("fan_in_fan_out"):
            problems.append(f"{METADATA_KEY}: {comp}.fan_in_fan_out is not supported")
        r = cfg.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            problems.append(f"{METADATA_KEY}: {comp}.r must be a positive integer, got {r!r}")
            continue
        for p in modules:
            want = pattern_value(cfg.get("rank_pattern") or {}, p.module, r) if p.component == comp else p.rank
            if want != p.rank:
                problems.append(f"{comp}.{p.module}: rank {p.rank} in the weights but {METADATA_KEY} says r={want}")
            if p.component == comp and "target_modules" in cfg and not _targets_match(cfg["target_modules"], p.module):
                problems.append(f"{comp}.{p.module}: not in {comp}.target_modules of {METADATA_KEY} "
                                "(diffusers would ignore its weights)")
    if not modules and not problems:
        problems.append("no LoRA weights for the unet or text_encoder in the file")
    if problems:
        return None, problems
    return DiffusionLoRAPlan(modules, "kohya" if kohya else "diffusers", configs,
                             max(p.rank for p in modules)), []


def pick_weights_file(names: list[str]) -> tuple[str | None, str | None]:
    """The one safetensors file of an adapter directory, as ``load_lora_weights`` picks it; or why not."""
    files = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if WEIGHTS_FILE in files:
        return WEIGHTS_FILE, None
    if len(files) == 1:
        return files[0], None
    if not files:
        return None, f"no .safetensors file (a diffusion LoRA is {WEIGHTS_FILE} or one kohya .safetensors)"
    return None, f"{len(files)} .safetensors files ({', '.join(files)}); keep one, or name it {WEIGHTS_FILE}"

"""Checks an adapter must pass before the runtime sees it: safe paths, no pickle, size and rank
limits, a well-formed PEFT config, and tensors that fit the pool's base model.

No torch here: safetensors headers are parsed directly (8-byte little-endian length + JSON).
Every check runs and every problem is reported together, so a tenant fixes them in one go.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lorafleet.contracts import diffusion_lora

# Formats that unpickle (run code) when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
CONFIG_FILE = "adapter_config.json"
_MAX_HEADER = 100 * 1024 * 1024
_LORA_RE = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"
)


class Refused(Exception):
    """The adapter (or model) is refused; ``reason`` goes to the sync report and the CR's status.

    Refusals are about content: the same digest is refused again, so it is not retried.
    """

    def __init__(self, reason: str, category: str = "validation"):
        super().__init__(reason)
        self.reason = reason
        self.category = category


@dataclass(frozen=True)
class Limits:
    max_rank: int = 64
    max_adapter_bytes: int = 512 * 1024 * 1024


# ----------------------------------------------------------------------------------- paths


def path_problem(rel: str) -> str | None:
    """Why a relative path (a file in a directory, or an S3 key below the prefix) is unsafe, if it is."""
    if not rel:
        return "empty path"
    if "\x00" in rel or "\\" in rel:
        return f"{rel!r}: backslashes and NUL are not allowed in paths"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return f"{rel!r}: absolute path leaves the adapter directory"
    if any(part in ("..", ".") for part in rel.split("/")) or "//" in rel:
        return f"{rel!r}: path leaves the adapter directory ('..', '.' or empty segment)"
    return None


def pickle_problem(rel: str) -> str | None:
    if rel.lower().endswith(PICKLE_SUFFIXES):
        return (f"{rel}: pickle weights are refused (they run code when loaded); "
                f"save the adapter with safe_serialization=True (adapter_model.safetensors)")
    return None


def listing_problems(entries: list[tuple[str, int]], limits: Limits) -> list[str]:
    """Checks that need only names and sizes: run on an S3 listing before anything is downloaded."""
    out = []
    for rel, _ in entries:
        out += [p for p in (path_problem(rel), pickle_problem(rel)) if p]
    total = sum(size for _, size in entries)
    if total > limits.max_adapter_bytes:
        out.append(f"size {total} bytes is above maxAdapterBytes ({limits.max_adapter_bytes})")
    return out


# ----------------------------------------------------------------------------- safetensors


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, checking it is well-formed."""
    return read_safetensors(path)[0]


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, tuple[str, list[int]]], dict]:
    """The header's tensors (name -> (dtype, shape)) and its ``__metadata__`` (str -> str)."""
    name = Path(path).name
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise Refused(f"{name}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise Refused(f"{name}: not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise Refused(f"{name}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise Refused(f"{name}: safetensors header is not a JSON object")
    out: dict[str, tuple[str, list[int]]] = {}
    data_len = size - 8 - n
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise Refused(f"{name}: safetensors __metadata__ is not a JSON object")
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
            ok = (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
                  and 0 <= start <= end <= data_len)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise Refused(f"{name}: tensor {key!r} has a malformed entry in the safetensors header")
        out[key] = (dtype, shape)
    return out, metadata


# ------------------------------------------------------------------------------ base model


@dataclass
class BaseModelInfo:
    """What validation needs to know about the pool's base model."""

    # Names an adapter's base_model_name_or_path may carry (see docs/sidecar.md, "Base model match").
    names: set[str] = field(default_factory=set)
    has_own_name: bool = False
    # module name -> shape of its 2-D ``weight`` tensor ([out, in] for Linear, [num, dim] for Embedding)
    weights: dict[str, list[int]] = field(default_factory=dict)
    # A diffusers pipeline folder (text-to-image): component -> module -> weight shape; None otherwise.
    components: dict[str, dict[str, list[int]]] | None = None
    _suffix: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str], uri: str = "", sha256: str = "") -> "BaseModelInfo":
        d = Path(model_dir)
        if (d / "model_index.json").is_file():
            return cls(names=set(), components=pipeline_components(d))
        own = ""
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                own = str(json.loads(cfg.read_text()).get("_name_or_path") or "")
            except (ValueError, AttributeError):
                own = ""
        weights: dict[str, list[int]] = {}
        for st in sorted(d.glob("*.safetensors")):
            for key, (_, shape) in read_safetensors_header(st).items():
                if key.endswith(".weight") and len(shape) == 2:
                    weights[key[: -len(".weight")]] = shape
        return cls.build(own, uri, sha256, weights)

    @classmethod
    def build(cls, own_name: str, uri: str, sha256: str, weights: dict[str, list[int]]) -> "BaseModelInfo":
        names = {n for n in (own_name, uri, uri.rstrip("/"), sha256, f"sha256:{sha256}" if sha256 else "") if n}
        for n in (own_name, uri.rstrip("/")):
            if n:
                names.add(n.rstrip("/").rsplit("/", 1)[-1])
        base = cls(names=names, has_own_name=bool(own_name), weights=weights)
        for mod in weights:
            parts = mod.split(".")
            for i in range(len(parts)):
                base._suffix.setdefault(".".join(parts[i:]), []).append(mod)
        return base

    def find_module(self, module: str) -> str | None:
        """The base module an adapter's module path names: exact, or the longest unique dotted suffix
        (an adapter trained on ``BertForSequenceClassification`` says ``bert.encoder...`` where a
        ``BertModel`` checkpoint says ``encoder...``)."""
        if module in self.weights:
            return module
        parts = module.split(".")
        for i in range(len(parts)):
            hits = self._suffix.get(".".join(parts[i:]))
            if hits and len(hits) == 1:
                return hits[0]
            if hits:
                return None
        return None

    def has_target(self, target: str, regex: bool = False) -> bool:
        if regex:
            pat = re.compile(target)
            return any(pat.fullmatch(".".join(m.split(".")[i:]))
                       for m in self.weights for i in range(len(m.split("."))))
        return target in self._suffix

    def accepts_name(self, name: str) -> bool:
        if not name or not self.has_own_name:
            return True
        if name in self.names or name.rstrip("/") in self.names:
            return True
        # A local path (the folder the tenant trained from) says nothing about which model it was:
        # the shape checks against the base's tensors decide.
        if name.startswith(("/", "./", "../", "file://")):
            return True
        return name.rstrip("/").rsplit("/", 1)[-1] in self.names


def pipeline_components(model_dir: Path) -> dict[str, dict[str, list[int]]]:
    """The LoRA-able components of a diffusers pipeline folder: module -> weight shape (2-D Linear,
    4-D conv), with CLIP's ``text_model.`` prefix dropped as the runtime's (flattened) modules have it."""
    out: dict[str, dict[str, list[int]]] = {}
    for comp in diffusion_lora.COMPONENTS:
        modules: dict[str, list[int]] = {}
        for st in sorted((model_dir / comp).glob("*.safetensors")):
            for key, (_, shape) in read_safetensors_header(st).items():
                if key.endswith(".weight") and len(shape) in (2, 4):
                    module = key[: -len(".weight")]
                    modules[module.removeprefix("text_model.") if comp == "text_encoder" else module] = shape
        out[comp] = modules
    return out


def diffusion_adapter_problems(root: Path, names: set[str], limits: Limits,
                               components: dict[str, dict[str, list[int]]] | None) -> list[str]:
    """A text-to-image adapter: one LoRA .safetensors as ``load_lora_weights`` reads it, mapped onto the
    pipeline's modules by ``contracts.diffusion_lora`` (the runtime applies the same plan)."""
    name, why = diffusion_lora.pick_weights_file(sorted(names))
    if name is None:
        return [why]
    try:
        header, metadata = read_safetensors(root / name)
    except Refused as e:
        return [e.reason]
    shapes = {k: shape for k, (_, shape) in header.items()}
    if components is None:  # no base to map onto (lorafleet push): the limits only
        return [f"tensor {k}: rank {s[0]} is above maxRank ({limits.max_rank})" for k, s in sorted(shapes.items())
                if k.endswith(("lora_A.weight", "lora.down.weight", "lora_down.weight", ".down.weight"))
                and s and s[0] > limits.max_rank]
    plan, problems = diffusion_lora.plan(shapes, metadata, components, limits.max_rank)
    if plan is not None and plan.layout == "kohya":
        try:
            alphas = read_scalars(root / name, [p.alpha_key for p in plan.modules if p.alpha_key])
        except Refused as e:
            return problems + [e.reason]
        why = diffusion_lora.kohya_alpha_problem(alphas)
        if why:
            problems.append(why)
    return problems


_SCALAR = {"F32": ("<f", 4), "F64": ("<d", 8), "F16": ("<e", 2), "BF16": ("<H", 2)}


def read_scalars(path: Path, keys: list[str]) -> dict[str, float]:
    """The values of one-element tensors (kohya's ``.alpha``), read from the file without torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        out = {}
        for key in keys:
            meta = header[key]
            fmt, size = _SCALAR.get(meta["dtype"], (None, 0))
            start, end = meta["data_offsets"]
            if fmt is None or end - start != size:
                raise Refused(f"{path.name}: {key} is not a scalar float (dtype {meta['dtype']}, {end - start} bytes)")
            f.seek(8 + n + start)
            (v,) = struct.unpack(fmt, f.read(size))
            out[key] = struct.unpack("<f", struct.pack("<I", v << 16))[0] if meta["dtype"] == "BF16" else float(v)
    return out


def _looks_like_diffusion_lora(names: set[str]) -> bool:
    return CONFIG_FILE not in names and any(n.endswith(".safetensors") and "/" not in n for n in names)


# --------------------------------------------------------------------------------- adapter


def walk_problems(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Symlinks and non-regular files anywhere under ``root``, and (relative path, size) of the files."""
    problems: list[str] = []
    files: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in list(dirnames) + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                problems.append(f"{rel}: symlinks are refused (could point outside the adapter)")
            elif name in filenames:
                if not full.is_file():
                    problems.append(f"{rel}: not a regular file")
                else:
                    files.append((rel, full.stat().st_size))
    return problems, sorted(files)


def adapter_problems(root: str | os.PathLike[str], limits: Limits, base: BaseModelInfo | None = None) -> list[str]:
    """Every reason to refuse the adapter directory ``root`` (empty when it is fine)."""
    root = Path(root)
    problems, files = walk_problems(root)
    problems += listing_problems(files, limits)
    names = {rel for rel, _ in files}
    if (base is not None and base.components is not None) or (base is None and _looks_like_diffusion_lora(names)):
        return problems + diffusion_adapter_problems(root, names, limits, base.components if base else None)

    config = None
    if CONFIG_FILE not in names:
        problems.append(f"{CONFIG_FILE} is missing (a PEFT adapter directory has adapter_config.json "
                        f"and adapter_model.safetensors)")
    else:
        try:
            config = json.loads((root / CONFIG_FILE).read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{CONFIG_FILE} is malformed: {e}")
            config = None
    ranks: dict[str, int] = {}
    default_rank = None
    if config is not None:
        problems += _config_problems(config, limits, base)
        default_rank = config.get("r") if isinstance(config.get("r"), int) else None
        rp = config.get("rank_pattern")
        if isinstance(rp, dict):
            ranks = {k: v for k, v in rp.items() if isinstance(v, int)}

    tensors = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if "adapter_model.safetensors" not in names:
        problems.append("adapter_model.safetensors is missing")
    fan_in_fan_out = bool(config.get("fan_in_fan_out")) if config else False
    for st in tensors:
        try:
            header = read_safetensors_header(root / st)
        except Refused as e:
            problems.append(e.reason)
            continue
        problems += _tensor_problems(header, limits, base, default_rank, ranks, fan_in_fan_out)
    return problems


def _config_problems(config: dict, limits: Limits, base: BaseModelInfo | None) -> list[str]:
    out = []
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        out.append(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported (only LORA)")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        out.append(f"{CONFIG_FILE}: r must be a positive integer, got {r!r}")
    elif r > limits.max_rank:
        out.append(f"rank r={r} is above maxRank ({limits.max_rank})")
    rp = config.get("rank_pattern") or {}
    if not isinstance(rp, dict):
        out.append(f"{CONFIG_FILE}: rank_pattern must be an object")
    else:
        for k, v in rp.items():
            if isinstance(v, int) and v > limits.max_rank:
                out.append(f"rank_pattern[{k!r}]={v} is above maxRank ({limits.max_rank})")
    targets = config.get("target_modules")
    if not targets or not (isinstance(targets, str) or
                           (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        out.append(f"{CONFIG_FILE}: target_modules must be a non-empty list of module names or a regex")
    elif base is not None and base.weights:
        if isinstance(targets, str):
            if not base.has_target(targets, regex=True):
                out.append(f"target_modules regex {targets!r} matches no module of the base model")
        else:
            missing = [t for t in targets if not base.has_target(t)]
            if missing:
                out.append(f"target_modules {missing} are not modules of the base model")
    bmnp = config.get("base_model_name_or_path")
    if base is not None and bmnp is not None and not base.accepts_name(str(bmnp)):
        out.append(f"base_model_name_or_path {bmnp!r} does not match the pool's model "
                   f"(expected one of {sorted(base.names)})")
    return out


def _tensor_problems(header: dict[str, tuple[str, list[int]]], limits: Limits, base: BaseModelInfo | None,
                     default_rank: int | None, rank_pattern: dict[str, int], fan_in_fan_out: bool) -> list[str]:
    out: list[str] = []
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, (_, shape) in header.items():
        m = _LORA_RE.match(key)
        if not m:
            continue  # modules_to_save (e.g. classification heads): sizes may differ per tenant
        if len(shape) != 2:
            out.append(f"tensor {key}: LoRA weights are 2-D, got shape {shape}")
            continue
        pairs.setdefault(m["module"], {})[m["kind"]] = shape
    for module, kinds in sorted(pairs.items()):
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a = kinds.get("lora_embedding_A" if embedding else "lora_A")
        b = kinds.get("lora_embedding_B" if embedding else "lora_B")
        if a is None or b is None:
            out.append(f"module {module}: has only one of lora_A/lora_B")
            continue
        r = a[0]
        if r > limits.max_rank:
            out.append(f"module {module}: rank {r} is above maxRank ({limits.max_rank})")
        if b[1] != r:
            out.append(f"module {module}: lora_A {a} and lora_B {b} disagree on the rank")
        # With a rank_pattern (whose keys PEFT matches as names or regexes) per-module ranks vary:
        # only the maxRank limit applies. Without one, every module must have the config's r, which
        # the runtime's alpha/r scaling relies on.
        expected_r = None if rank_pattern else default_rank
        if expected_r is not None and r != expected_r:
            out.append(f"module {module}: rank {r} differs from adapter_config.json r={expected_r}")
        if base is None or not base.weights:
            continue
        target = base.find_module(module)
        if target is None:
            out.append(f"module {module}: the base model has no such module")
            continue
        w = base.weights[target]
        if embedding:  # weight [num, dim]; A [r, num], B [dim, r]
            want_in, want_out = w[0], w[1]
        elif fan_in_fan_out:  # Conv1D stores [in, out]
            want_in, want_out = w[0], w[1]
        else:
            want_out, want_in = w
        if a[1] != want_in or b[0] != want_out:
            out.append(f"module {module}: LoRA shapes A {a}, B {b} do not fit the base weight {w} "
                       f"(expected A [r, {want_in}], B [{want_out}, r])")
    return out

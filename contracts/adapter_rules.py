"""The one definition of an adapter lorafleet serves: the rules ``lorafleet push``, the sidecar (before
an adapter enters the cache) and the runtime (before it takes a slot) all apply, so an adapter one of
them accepts is never refused by another for a different reason.

No torch here: safetensors headers are parsed directly (8-byte little-endian length + JSON) and
checked as strictly as the safetensors library checks them, so the runtime's reader never meets a
file these rules let through. Every check runs and every problem is reported together, so a tenant
fixes them in one go. A refusal carries a kind: ``permanent`` (the content is wrong; the same digest
is refused again, so it is not retried until the spec names other content) or ``transient`` (the
files could not be read now; retried with backoff).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

try:  # the regex parser: public name until 3.10, private since
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parse  # type: ignore[no-redef]

PERMANENT = "permanent"
TRANSIENT = "transient"

# Formats that unpickle (run code) when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LABELS_FILE = "labels.json"  # optional: a JSON list of label names (or {"id2label": {...}})
# An adapter's config and label files are small: anything bigger is not what PEFT writes.
MAX_JSON_FILE_BYTES = 1 << 20
# 10,000 LoRA tensors make a header of about 1.5 MB; the safetensors library's own limit is 100 MB.
MAX_ADAPTER_HEADER_BYTES = 8 << 20
MAX_MODEL_HEADER_BYTES = 100_000_000
MAX_REGEX_CHARS = 500
MAX_REGEX_UNBOUNDED = 3  # `.*` and friends in one regex: matching time grows as names^this at worst
# PEFT task types -> the runtime task a pool serves.
TASKS = {"SEQ_CLS": "sequence-classification", "CAUSAL_LM": "text-generation"}
_PREFIX = "base_model.model."
# safetensors dtype -> bytes per element (the ones the library reads; sub-byte formats are refused).
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# PEFT LoRA options that change what the adapter computes and that the runtime does not implement:
# key -> (the value that means "off", what to do instead). Refused when set to anything else.
_UNSUPPORTED = {
    "use_dora": (False, "DoRA is not supported; train a plain LoRA (use_dora=False)"),
    "fan_in_fan_out": (False, "fan_in_fan_out (Conv1D bases such as GPT-2) is not supported"),
    "bias": ("none", "trained biases (bias='all' or 'lora_only') are not supported; train with bias='none'"),
    "lora_bias": (False, "lora_bias is not supported; train with lora_bias=False"),
    "use_qalora": (False, "QA-LoRA is not supported"),
    "layer_replication": (None, "layer_replication is not supported"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) is not supported"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters) is not supported"),
    "trainable_token_indices": (None, "trainable_token_indices is not supported"),
    "megatron_config": (None, "Megatron-parallel LoRA is not supported"),
    "use_bdlora": (None, "BD-LoRA is not supported"),
    "arrow_config": (None, "Arrow routing is not supported"),
    "kasa_config": (None, "KaSA is not supported"),
    "velora_config": (None, "VeLoRA is not supported"),
    "monteclora_config": (None, "MonteCLoRA is not supported"),
}
# Initialisations that also rewrite the base model's weights: the adapter is only right on that
# rewritten base. PEFT converts them to a plain LoRA when saved with
# path_initial_model_for_weight_conversion.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


class Refused(Exception):
    """The adapter (or model) is refused; ``reason`` goes to the sync report and the CR's status.

    ``kind`` is ``permanent`` for content (the same digest is refused again: not retried until the spec
    changes) or ``transient`` (retried with backoff)."""

    def __init__(self, reason: str, category: str = "validation", kind: str = PERMANENT):
        super().__init__(reason)
        self.reason = reason
        self.category = category
        self.kind = kind

    @property
    def permanent(self) -> bool:
        return self.kind == PERMANENT

    @classmethod
    def of(cls, problems: list["Problem"]) -> "Refused":
        return cls("; ".join(p.message for p in problems), problems[0].category)


class Problem(str):
    """One reason to refuse an adapter (the text); ``category`` labels metrics (pickle, path, size, ...)."""

    category: str

    def __new__(cls, category: str, message: str) -> "Problem":
        obj = super().__new__(cls, message)
        obj.category = category
        return obj

    @property
    def message(self) -> str:
        return str(self)


@dataclass(frozen=True)
class Limits:
    max_rank: int = 64
    max_adapter_bytes: int | None = 512 * 1024 * 1024  # None: no size limit (the runtime's own loads)


# ----------------------------------------------------------------------------------- JSON


def load_json(data: bytes | str, what: str) -> Any:
    """Parse JSON from an untrusted file: malformed text, bad UTF-8 and nesting deep enough to exhaust
    the parser's recursion (a "JSON bomb") are refusals, never exceptions of another kind."""
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data)
    except RecursionError:
        raise Refused(f"{what}: nested too deeply to parse", "config") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise Refused(f"{what} is malformed: {e}", "config") from None


def read_json_file(path: Path, what: str | None = None) -> Any:
    what = what or path.name
    size = path.stat().st_size
    if size > MAX_JSON_FILE_BYTES:
        raise Refused(f"{what}: {size} bytes is too big for a config file (at most {MAX_JSON_FILE_BYTES})",
                      "config")
    with open(path, "rb") as f:
        return load_json(f.read(MAX_JSON_FILE_BYTES + 1), what)


# ----------------------------------------------------------------------------------- regexes


def regex_problem(pattern: str, what: str) -> str | None:
    """Why ``pattern`` may not be matched against module names, if it may not: it must compile, and a
    repetition may not contain another repetition or an alternation (those take exponential time on
    a name that almost matches, which would stall whoever checks the adapter)."""
    if len(pattern) > MAX_REGEX_CHARS:
        return f"{what}: the regex is {len(pattern)} characters long (at most {MAX_REGEX_CHARS})"
    try:
        parsed = _sre_parse.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as e:
        return f"{what}: {pattern!r} is not a valid regex ({e})"
    if _nested_repeat(parsed, inside=False):
        return (f"{what}: {pattern!r} repeats a group that itself repeats or alternates (exponential "
                f"matching time); list the module names or simplify the regex")
    if (n := _unbounded_repeats(parsed)) > MAX_REGEX_UNBOUNDED:
        return (f"{what}: {pattern!r} has {n} unbounded repetitions (at most {MAX_REGEX_UNBOUNDED}: each "
                f"one multiplies the matching time); list the module names or simplify the regex")
    return None


def _unbounded_repeats(items) -> int:
    n = 0
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            n += (av[1] is _sre_parse.MAXREPEAT) + _unbounded_repeats(av[2])
        elif name == "SUBPATTERN":
            n += _unbounded_repeats(av[3])
        elif name == "BRANCH":
            n += max((_unbounded_repeats(b) for b in av[1]), default=0)
        elif name == "ATOMIC_GROUP":
            n += _unbounded_repeats(av)
        elif name in ("ASSERT", "ASSERT_NOT"):
            n += _unbounded_repeats(av[1])
    return n


def _nested_repeat(items, inside: bool) -> bool:
    c = _sre_parse
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            lo, hi, sub = av
            repeats = hi is c.MAXREPEAT or hi > 1
            if inside and repeats:
                return True
            if _nested_repeat(sub, inside or repeats):
                return True
        elif name == "BRANCH":
            if inside:
                return True
            if any(_nested_repeat(b, inside) for b in av[1]):
                return True
        elif name == "SUBPATTERN":
            if _nested_repeat(av[3], inside):
                return True
        elif name == "ATOMIC_GROUP":
            if _nested_repeat(av, inside):
                return True
        elif name in ("ASSERT", "ASSERT_NOT"):
            if _nested_repeat(av[1], inside):
                return True
        elif name == "GROUPREF_EXISTS":
            if _nested_repeat(av[1], inside) or (av[2] is not None and _nested_repeat(av[2], inside)):
                return True
    return False


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key that matches the end of the
    module path as a regex (``peft.utils.other.get_pattern_key``)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


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


def listing_problems(entries: list[tuple[str, int]], limits: Limits) -> list[Problem]:
    """Checks that need only names and sizes: run on an S3 listing before anything is downloaded."""
    out = []
    for rel, _ in entries:
        if p := path_problem(rel):
            out.append(Problem("path", p))
        if p := pickle_problem(rel):
            out.append(Problem("pickle", p))
    total = sum(size for _, size in entries)
    if limits.max_adapter_bytes is not None and total > limits.max_adapter_bytes:
        out.append(Problem("size", f"size {total} bytes is above maxAdapterBytes ({limits.max_adapter_bytes})"))
    return out


def walk_problems(root: Path) -> tuple[list[Problem], list[tuple[str, int]]]:
    """Symlinks and non-regular files anywhere under ``root``, and (relative path, size) of the files."""
    problems: list[Problem] = []
    files: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in list(dirnames) + filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                problems.append(Problem("path", f"{rel}: symlinks are refused (could point outside the adapter)"))
            elif name in filenames:
                if not full.is_file():
                    problems.append(Problem("path", f"{rel}: not a regular file"))
                else:
                    files.append((rel, full.stat().st_size))
    return problems, sorted(files)


# ----------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int] = (0, 0)  # where its bytes lie in the file (absolute)


def read_safetensors_header(path: str | os.PathLike[str],
                            max_header: int = MAX_ADAPTER_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, checked as the safetensors
    library checks it (known dtypes, sizes that match the shapes, offsets that tile the data exactly):
    a file that passes is one the library reads."""
    return read_safetensors(path, max_header)[0]


def read_safetensors(path: str | os.PathLike[str], max_header: int = MAX_ADAPTER_HEADER_BYTES
                     ) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """``read_safetensors_header`` and the file's ``__metadata__``."""
    name = Path(path).name
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise Refused(f"{name}: not a safetensors file (shorter than its 8-byte header length)", "format")
        (n,) = struct.unpack("<Q", raw)
        if n > max_header:
            raise Refused(f"{name}: safetensors header of {n} bytes is above the limit of {max_header}",
                          "format")
        if 8 + n > size:
            raise Refused(f"{name}: truncated or not a safetensors file (header length {n} does not fit "
                          f"the file's {size} bytes)", "format")
        header = load_json(f.read(n), f"{name}: safetensors header")
    if not isinstance(header, dict):
        raise Refused(f"{name}: safetensors header is not a JSON object", "format")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise Refused(f"{name}: safetensors __metadata__ must map strings to strings", "format")
    data_len = size - 8 - n
    out: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            start, end = offsets
            ok = (isinstance(dtype, str) and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in shape)
                  and type(start) is int and type(end) is int and 0 <= start <= end)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise Refused(f"{name}: tensor {key!r} has a malformed entry in the safetensors header", "format")
        if dtype not in DTYPE_BYTES:
            raise Refused(f"{name}: tensor {key!r} has dtype {dtype!r}, which is not read here", "format")
        if (end - start) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise Refused(f"{name}: tensor {key!r} of shape {shape} ({dtype}) does not take "
                          f"{end - start} bytes", "format")
        spans.append((start, end, key))
        out[key] = TensorInfo(dtype, tuple(shape), (8 + n + start, 8 + n + end))
    pos = 0
    for start, end, key in sorted(spans):
        if start != pos:
            raise Refused(f"{name}: tensor {key!r} starts at byte {start}, expected {pos} (overlapping or "
                          f"gapped data)", "format")
        pos = end
    if pos != data_len:
        what = "truncated" if pos > data_len else "has trailing bytes"
        raise Refused(f"{name}: {what}: the header describes {pos} data bytes, the file holds {data_len}",
                      "format")
    return out, dict(meta or {})


# ------------------------------------------------------------------------------ base model


@dataclass
class BaseModelInfo:
    """What the rules need to know about the pool's base model. The sidecar builds it from the model's
    safetensors headers (``from_dir``); the runtime from its loaded modules, where it also knows each
    module's class (``kinds``) and paths are exact."""

    # Names an adapter's base_model_name_or_path may carry (see docs/sidecar.md, "Base model match").
    names: set[str] = field(default_factory=set)
    has_own_name: bool = False
    # module name -> shape of its 2-D ``weight`` tensor ([out, in] for Linear, [num, dim] for Embedding)
    weights: dict[str, list[int]] = field(default_factory=dict)
    # module name -> class name ("Linear", "Embedding", ...); empty when only checkpoint headers are known
    kinds: dict[str, str] = field(default_factory=dict)
    # True: adapter module paths must name a module exactly (the runtime installs by path)
    exact_paths: bool = False
    task: str | None = None  # the pool's task when known (the runtime knows it)
    # A diffusers pipeline: component (unet, text_encoder) -> module -> weight shape (2-D and conv 4-D)
    components: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    _suffix: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str], uri: str = "", sha256: str = "") -> "BaseModelInfo":
        d = Path(model_dir)
        own = ""
        cfg = d / "config.json"
        if cfg.is_file():
            try:
                data = read_json_file(cfg)
                own = str(data.get("_name_or_path") or "") if isinstance(data, dict) else ""
            except Refused:
                own = ""
        weights: dict[str, list[int]] = {}
        for st in sorted(d.glob("*.safetensors")):
            for key, info in read_safetensors_header(st, MAX_MODEL_HEADER_BYTES).items():
                if key.endswith(".weight") and len(info.shape) == 2:
                    weights[key[: -len(".weight")]] = list(info.shape)
        base = cls.build(own, uri, sha256, weights)
        if (d / "model_index.json").is_file():  # a diffusers pipeline: its adapters are diffusion LoRAs
            from .diffusion_lora import COMPONENTS

            base.task = "text-to-image"
            for comp in COMPONENTS:
                shapes = base.components.setdefault(comp, {})
                for st in sorted((d / comp).glob("*.safetensors")):
                    for key, info in read_safetensors_header(st, MAX_MODEL_HEADER_BYTES).items():
                        if key.endswith(".weight") and len(info.shape) in (2, 4):  # Linear, conv
                            module = key[: -len(".weight")]
                            # CLIP's modules as the runtime (flattened) has them: no ``text_model.``
                            if comp == "text_encoder":
                                module = module.removeprefix("text_model.")
                            shapes[module] = list(info.shape)
        return base

    @classmethod
    def build(cls, own_name: str, uri: str, sha256: str, weights: dict[str, list[int]],
              kinds: dict[str, str] | None = None, exact_paths: bool = False, task: str | None = None,
              components: dict[str, dict[str, list[int]]] | None = None) -> "BaseModelInfo":
        names = {n for n in (own_name, uri, uri.rstrip("/"), sha256, f"sha256:{sha256}" if sha256 else "") if n}
        for n in (own_name, uri.rstrip("/")):
            if n:
                names.add(n.rstrip("/").rsplit("/", 1)[-1])
        base = cls(names=names, has_own_name=bool(own_name), weights=weights, kinds=dict(kinds or {}),
                   exact_paths=exact_paths, task=task, components=dict(components or {}))
        for mod in set(weights) | set(base.kinds):
            parts = mod.split(".")
            for i in range(len(parts)):
                base._suffix.setdefault(".".join(parts[i:]), []).append(mod)
        return base

    def find_module(self, module: str) -> str | None:
        """The base module an adapter's module path names: exact, or (from checkpoint headers only) the
        longest unique dotted suffix (an adapter trained on ``BertForSequenceClassification`` says
        ``bert.encoder...`` where a ``BertModel`` checkpoint says ``encoder...``)."""
        if module in self.weights or module in self.kinds:
            return module
        if self.exact_paths:
            return None
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
            return any(pat.fullmatch(s) for s in self._suffix)
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


# ------------------------------------------------------------------------------ the config


@dataclass
class LoraSettings:
    """The parts of adapter_config.json that decide what the adapter computes."""

    r: int = 8
    lora_alpha: float = 8.0  # PEFT's default when the file leaves it out
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    task: str | None = None  # runtime task (TASKS) or None
    id2label: Any = None
    base_model_name_or_path: str | None = None

    def rank(self, module: str) -> int:
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scale(self, module: str, rank: int) -> float:
        """PEFT's scaling for this module: alpha / r, or alpha / sqrt(r) with use_rslora."""
        alpha = float(pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _is_int(v) -> bool:
    return type(v) is int


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def config_problems(config: Any, limits: Limits, base: BaseModelInfo | None = None
                    ) -> tuple[LoraSettings | None, list[Problem]]:
    """Check a parsed adapter_config.json; return the settings the runtime computes with (None when
    they cannot be read) and every problem."""
    out: list[Problem] = []

    def bad(category: str, message: str) -> None:
        out.append(Problem(category, f"{CONFIG_FILE}: {message}"))

    if not isinstance(config, dict):
        return None, [Problem("config", f"{CONFIG_FILE} is malformed: not a JSON object")]
    s = LoraSettings()
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        bad("config", f"peft_type {peft_type!r} is not supported (only LORA)")
    for key, (off, message) in _UNSUPPORTED.items():
        value = config.get(key, off)
        if value not in (off, None) and not (off is None and value in ({}, [], False)):
            bad("unsupported", f"{key}={value!r}: {message}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        bad("unsupported", f"init_lora_weights={init!r} rewrites the base model's weights; save the adapter "
                           f"with path_initial_model_for_weight_conversion to make it a plain LoRA")

    r = config.get("r")
    if not _is_int(r) or r < 1:
        bad("config", f"r must be a positive integer, got {r!r}")
    else:
        s.r = r
        if r > limits.max_rank:
            out.append(Problem("rank", f"rank r={r} is above maxRank ({limits.max_rank})"))
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha) or alpha <= 0:
        bad("config", f"lora_alpha must be a positive number, got {alpha!r}")
    else:
        s.lora_alpha = float(alpha)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        bad("config", f"use_rslora must be true or false, got {rslora!r}")
    s.use_rslora = rslora is True
    for key, check, kind in (("rank_pattern", _is_int, "positive integers"),
                             ("alpha_pattern", _is_number, "positive numbers")):
        pat = config.get(key) or {}
        if not isinstance(pat, dict):
            bad("config", f"{key} must be an object")
            continue
        good = {}
        for k, v in pat.items():
            if problem := regex_problem(k, f"{key} key"):
                out.append(Problem("config", f"{CONFIG_FILE}: {problem}"))
            elif not check(v) or v <= 0:
                bad("config", f"{key}[{k!r}] must be {kind}, got {v!r}")
            else:
                good[k] = v
                if key == "rank_pattern" and v > limits.max_rank:
                    out.append(Problem("rank", f"rank_pattern[{k!r}]={v} is above maxRank ({limits.max_rank})"))
        setattr(s, key, good)

    targets = config.get("target_modules")
    if isinstance(targets, str):
        if problem := regex_problem(targets, "target_modules"):
            out.append(Problem("target_modules", f"{CONFIG_FILE}: {problem}"))
        else:
            s.target_modules = targets
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        s.target_modules = targets
    else:
        bad("target_modules", "target_modules must be a non-empty list of module names or a regex")
    out += target_problems(s, base)

    mts = config.get("modules_to_save")
    if mts is not None and not (isinstance(mts, list) and all(isinstance(m, str) for m in mts)):
        bad("config", f"modules_to_save must be a list of module names, got {mts!r}")
    else:
        s.modules_to_save = list(mts or [])
    task_type = config.get("task_type")
    if task_type is not None:
        if task_type not in TASKS:
            bad("task", f"task_type {task_type!r} is not served (only {', '.join(sorted(TASKS))})")
        else:
            s.task = TASKS[task_type]
    s.id2label = config.get("id2label")
    bmnp = config.get("base_model_name_or_path")
    if bmnp is not None and not isinstance(bmnp, str):
        bad("config", f"base_model_name_or_path must be a string, got {bmnp!r}")
    else:
        s.base_model_name_or_path = bmnp
        if base is not None and bmnp is not None and not base.accepts_name(bmnp):
            out.append(Problem("base_model", f"base_model_name_or_path {bmnp!r} does not match the pool's model "
                                             f"(expected one of {sorted(base.names)})"))
    return s, out


def target_problems(settings: LoraSettings, base: BaseModelInfo | None) -> list[Problem]:
    """target_modules must name modules the base model has (a regex: match at least one)."""
    targets = settings.target_modules
    if base is None or not (base.weights or base.kinds) or not targets:
        return []
    if isinstance(targets, str):
        if not base.has_target(targets, regex=True):
            return [Problem("target_modules", f"target_modules regex {targets!r} matches no module of the base model")]
        return []
    missing = [t for t in targets if not base.has_target(t)]
    if missing:
        return [Problem("target_modules", f"target_modules {missing} are not modules of the base model")]
    return []


# ------------------------------------------------------------------------------ the tensors


@dataclass
class AdapterLayout:
    """What an adapter directory holds, as the runtime loads it: per LoRA module the shapes of A
    [r, in] and B [out, r] and its scale; per head (modules_to_save) the shapes of weight and bias."""

    settings: LoraSettings
    modules: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    heads: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)
    # adapter tensor key -> (kind, module): kind "lora_A", "lora_B" or a head's "weight"/"bias"
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    labels: list[str] | None = None
    max_rank: int = 0


def head_module(name: str) -> tuple[str, str] | None:
    """``classifier.modules_to_save.default.weight`` -> ("classifier", "weight"); None if not weight/bias."""
    module, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias") or not module:
        return None
    for wrapper in (".modules_to_save.default", ".modules_to_save"):
        if module.endswith(wrapper):
            module = module[: -len(wrapper)]
    return module, kind


def tensor_problems(header: dict[str, TensorInfo], settings: LoraSettings, limits: Limits,
                    base: BaseModelInfo | None, ranks_from_config: bool = True) -> tuple[AdapterLayout, list[Problem]]:
    """Check the tensors of adapter_model.safetensors against the config, the limits and the base.
    ``ranks_from_config=False``: the adapter came from another format (a diffusion LoRA, whose ranks its
    own rules checked), so only the limits and the base are checked."""
    out: list[Problem] = []
    layout = AdapterLayout(settings)
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, info in header.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for kind in ("lora_A", "lora_B"):
            if name.endswith(f".{kind}.weight"):
                module = name[: -len(f".{kind}.weight")]
                if info.dtype not in FLOAT_DTYPES:
                    out.append(Problem("format", f"tensor {key}: dtype {info.dtype} is not a float type"))
                elif len(info.shape) != 2:
                    out.append(Problem("shape", f"tensor {key}: LoRA weights are 2-D, got shape {list(info.shape)}"))
                else:
                    parts.setdefault(module, {})[kind] = info.shape
                    layout.keys[key] = (kind, module)
                break
        else:
            if ".lora_embedding_A" in name or ".lora_embedding_B" in name:
                out.append(Problem("unsupported", f"tensor {key}: LoRA on embeddings is not supported; target "
                                                  f"linear layers only"))
            elif ".lora_magnitude_vector" in name:
                out.append(Problem("unsupported", f"tensor {key}: DoRA is not supported; train a plain LoRA"))
            elif ".lora_" in name or ".original_module." in name or (hm := head_module(name)) is None:
                out.append(Problem("format", f"tensor {key}: not a LoRA weight nor a modules_to_save weight/bias"))
            else:
                module, kind = hm
                if not any(module == m or module.endswith(f".{m}") for m in settings.modules_to_save):
                    out.append(Problem("format", f"tensor {key}: module {module!r} is not in modules_to_save "
                                                 f"({settings.modules_to_save})"))
                elif info.dtype not in FLOAT_DTYPES:
                    out.append(Problem("format", f"tensor {key}: dtype {info.dtype} is not a float type"))
                elif kind in layout.heads.get(module, {}):
                    out.append(Problem("format", f"tensor {key}: a second {kind} for head {module!r}"))
                else:
                    layout.heads.setdefault(module, {})[kind] = info.shape
                    layout.keys[key] = (kind, module)

    known = base is not None and bool(base.weights or base.kinds)
    for module, kinds in sorted(parts.items()):
        a, b = kinds.get("lora_A"), kinds.get("lora_B")
        if a is None or b is None:
            out.append(Problem("shape", f"module {module}: has only one of lora_A/lora_B"))
            continue
        r = a[0]
        if r < 1:
            out.append(Problem("shape", f"module {module}: rank 0"))
            continue
        if r > limits.max_rank:
            out.append(Problem("rank", f"module {module}: rank {r} is above maxRank ({limits.max_rank})"))
        if b[1] != r:
            out.append(Problem("shape", f"module {module}: lora_A {list(a)} and lora_B {list(b)} disagree on the rank"))
        expected = settings.rank(module) if ranks_from_config else r
        if r != expected:
            out.append(Problem("shape", f"module {module}: rank {r} differs from the r={expected} "
                                        f"{CONFIG_FILE} gives it (r / rank_pattern)"))
        layout.modules[module] = (a, b)
        layout.scales[module] = settings.scale(module, r)
        layout.max_rank = max(layout.max_rank, r)
        if not known:
            continue
        target = base.find_module(module)
        if target is None:
            out.append(Problem("shape", f"module {module}: the base model has no such module"))
            continue
        kind = base.kinds.get(target)
        if kind is not None and kind != "Linear":
            out.append(Problem("unsupported", f"module {module}: is a {kind} in the base model; LoRA is "
                                              f"served on Linear layers only"))
            continue
        w = base.weights.get(target)
        if w is None:
            continue
        want_out, want_in = w
        if a[1] != want_in or b[0] != want_out:
            out.append(Problem("shape", f"module {module}: LoRA shapes A {list(a)}, B {list(b)} do not fit the "
                                        f"base weight {list(w)} (expected A [r, {want_in}], B [{want_out}, r]); "
                                        f"was it trained on another base model?"))

    for module, head in sorted(layout.heads.items()):
        w, bias = head.get("weight"), head.get("bias")
        if w is None or len(w) != 2 or w[0] < 1:
            out.append(Problem("shape", f"head {module}: needs a 2-D weight [labels, in], got "
                                        f"{list(w) if w is not None else 'none'}"))
            continue
        if bias is not None and list(bias) != [w[0]]:
            out.append(Problem("shape", f"head {module}: bias {list(bias)} does not fit weight {list(w)}"))
        if not known:
            continue
        target = base.find_module(module)
        if target is None:
            # A checkpoint lacks the heads its task model adds (BertModel has no classifier): only the
            # loaded model's modules say for sure.
            if base.exact_paths:
                out.append(Problem("shape", f"head {module}: the base model has no such module"))
            continue
        kind = base.kinds.get(target)
        if kind is not None and kind != "Linear":
            out.append(Problem("unsupported", f"head {module}: is a {kind} in the base model; only Linear "
                                              f"layers can be per-tenant heads"))
            continue
        bw = base.weights.get(target)
        if bw is not None and w[1] != bw[1]:
            out.append(Problem("shape", f"head {module}: weight {list(w)} does not fit the base layer's "
                                        f"{bw[1]} inputs"))
    if base is not None and base.task:
        out += task_problems(settings.task, bool(layout.heads), base.task)
    return layout, out


def task_problems(adapter_task: str | None, has_heads: bool, pool_task: str) -> list[Problem]:
    """An adapter serves the pool's task; a classification pool needs a per-tenant head."""
    if adapter_task is not None and adapter_task != pool_task:
        return [Problem("task", f"the adapter was trained for {adapter_task} but this pool serves {pool_task}")]
    if pool_task == "sequence-classification" and not has_heads:
        return [Problem("task", "no classifier head (modules_to_save): a classification pool needs one; train "
                                "the adapter with task_type SEQ_CLS")]
    return []


def labels_problems(root: Path, layout: AdapterLayout) -> list[Problem]:
    """Label names (labels.json or the config's id2label) must match the head's outputs."""
    id2label = layout.settings.id2label
    lf = root / LABELS_FILE
    try:
        if lf.is_file():
            data = read_json_file(lf)
            id2label = data.get("id2label", data) if isinstance(data, dict) else data
        if isinstance(id2label, dict):
            try:
                id2label = [id2label[k] for k in sorted(id2label, key=lambda k: int(k))]
            except (ValueError, TypeError):
                raise Refused(f"{LABELS_FILE}/id2label: keys must be label indices (0, 1, ...)", "labels") from None
        if id2label is not None and not isinstance(id2label, list):
            raise Refused(f"{LABELS_FILE}/id2label must be a list of names or an index -> name object", "labels")
    except Refused as e:
        return [Problem(e.category if e.category != "config" else "labels", e.reason)]
    rows = next((h["weight"][0] for h in layout.heads.values() if "weight" in h and len(h["weight"]) == 2), None)
    if id2label:
        labels = [str(x) for x in id2label]
        if rows is not None and len(labels) != rows:
            return [Problem("labels", f"{len(labels)} label names but the classifier head has {rows} outputs; "
                                      f"fix {LABELS_FILE} or id2label")]
        layout.labels = labels
    elif rows:
        layout.labels = [f"LABEL_{i}" for i in range(rows)]
    return []


# ------------------------------------------------------------------------------ the directory


def inspect_adapter(root: str | os.PathLike[str], limits: Limits, base: BaseModelInfo | None = None
                    ) -> tuple[AdapterLayout | None, list[Problem]]:
    """Every reason to refuse the adapter directory ``root`` (empty when it is fine), and its layout."""
    root = Path(root)
    if root.is_symlink():
        return None, [Problem("path", f"{root.name}: the adapter directory is a symlink (could point anywhere)")]
    if not root.is_dir():
        return None, [Problem("path", f"{root}: not a directory")]
    problems, files = walk_problems(root)
    problems += listing_problems(files, limits)
    names = {rel for rel, _ in files}
    # The base decides the format when it is known (a pipeline takes diffusion LoRAs); else the files.
    if base is not None and (base.weights or base.kinds or base.components):
        diffusion = bool(base.components)
    else:
        diffusion = CONFIG_FILE not in names and _diffusion_files(names)
    if diffusion:
        return None, problems + diffusion_problems(root, names, limits, base)

    settings = None
    if CONFIG_FILE not in names:
        problems.append(Problem("config", f"{CONFIG_FILE} is missing (a PEFT adapter directory has "
                                          f"adapter_config.json and adapter_model.safetensors)"))
    else:
        try:
            settings, more = config_problems(read_json_file(root / CONFIG_FILE), limits, base)
            problems += more
        except Refused as e:
            problems.append(Problem(e.category, e.reason))

    layout = None
    if WEIGHTS_FILE not in names:
        problems.append(Problem("format", f"{WEIGHTS_FILE} is missing"))
    for st in sorted(n for n in names if n.endswith(".safetensors") and "/" not in n):
        try:
            header = read_safetensors_header(root / st)
        except Refused as e:
            problems.append(Problem(e.category, e.reason))
            continue
        if st == WEIGHTS_FILE and settings is not None:
            layout, more = tensor_problems(header, settings, limits, base)
            problems += more
    if layout is not None:
        problems += labels_problems(root, layout)
    return layout, problems


def _diffusion_files(names: set[str]) -> bool:
    from .diffusion_lora import WEIGHTS_FILE as DIFFUSION_WEIGHTS

    return DIFFUSION_WEIGHTS in names or (WEIGHTS_FILE not in names and
                                          sum(1 for n in names if n.endswith(".safetensors") and "/" not in n) == 1)


def diffusion_problems(root: Path, names: set[str], limits: Limits, base: BaseModelInfo | None) -> list[Problem]:
    """A diffusion LoRA (diffusers or kohya file, no adapter_config.json): the file checks here, then
    ``contracts.diffusion_lora.plan`` (which files map onto which pipeline modules) against the base
    pipeline when it is known."""
    from . import diffusion_lora

    name, why = diffusion_lora.pick_weights_file(sorted(names))
    if name is None:
        return [Problem("format", why)]
    try:
        header, metadata = read_safetensors(root / name)
    except Refused as e:
        return [Problem(e.category, e.reason)]
    if base is None or not base.components:  # no pipeline to map onto (lorafleet push): the limits only
        downs = ("lora_A.weight", "lora.down.weight", "lora_down.weight", ".down.weight")
        return [Problem("rank", f"tensor {k}: rank {v.shape[0]} is above maxRank ({limits.max_rank})")
                for k, v in sorted(header.items())
                if k.endswith(downs) and v.shape and v.shape[0] > limits.max_rank]
    plan, problems = diffusion_lora.plan({k: list(v.shape) for k, v in header.items()}, metadata,
                                         base.components, limits.max_rank)
    if plan is not None and plan.layout == "kohya":
        try:
            alphas = read_scalars(root / name, header, [p.alpha_key for p in plan.modules if p.alpha_key])
        except Refused as e:
            return [Problem(e.category, e.reason)]
        if why := diffusion_lora.kohya_alpha_problem(alphas):
            problems.append(why)
    return [Problem("diffusion", f"{name}: {p}") for p in problems]


def read_scalars(path: Path, header: dict[str, TensorInfo], keys: Iterable[str]) -> dict[str, float]:
    """The values of one-element float tensors (kohya ``.alpha``), read without torch."""
    fmt = {"F32": "<f", "F64": "<d", "F16": "<e"}
    out = {}
    with open(path, "rb") as f:
        for key in keys:
            info = header[key]
            if math.prod(info.shape) != 1 or info.dtype not in fmt | {"BF16": ""}:
                raise Refused(f"{path.name}: tensor {key!r} must be one float, got {info.dtype} {list(info.shape)}",
                              "format")
            f.seek(info.offsets[0])
            raw = f.read(info.offsets[1] - info.offsets[0])
            out[key] = (struct.unpack("<f", b"\0\0" + raw)[0] if info.dtype == "BF16"
                        else struct.unpack(fmt[info.dtype], raw)[0])
    return out


def adapter_problems(root: str | os.PathLike[str], limits: Limits,
                     base: BaseModelInfo | None = None) -> list[Problem]:
    return inspect_adapter(root, limits, base)[1]


def check_adapter(root: str | os.PathLike[str], limits: Limits, base: BaseModelInfo | None = None) -> AdapterLayout:
    """The adapter's layout, or ``Refused`` (permanent) naming every problem."""
    layout, problems = inspect_adapter(root, limits, base)
    if problems:
        raise Refused.of(problems)
    assert layout is not None
    return layout


def fit_problems(modules: dict[str, tuple[Iterable[int], Iterable[int]]],
                 heads: dict[str, dict[str, Iterable[int]]], settings: LoraSettings | None, limits: Limits,
                 base: BaseModelInfo) -> list[Problem]:
    """The shape rules for an adapter already parsed (module -> (A shape, B shape), head -> shapes),
    e.g. by the runtime against the modules of the model it loaded. ``settings`` None: the adapter was
    not read from a PEFT config (its own format's rules decided its ranks and heads)."""
    header = {}
    for module, (a, b) in modules.items():
        header[f"{module}.lora_A.weight"] = TensorInfo("F32", tuple(a))
        header[f"{module}.lora_B.weight"] = TensorInfo("F32", tuple(b))
    for module, kinds in heads.items():
        for kind, shape in kinds.items():
            header[f"{module}.{kind}"] = TensorInfo("F32", tuple(shape))
    if settings is None:
        return tensor_problems(header, LoraSettings(modules_to_save=list(heads)), limits, base,
                               ranks_from_config=False)[1]
    return target_problems(settings, base) + tensor_problems(header, settings, limits, base)[1]

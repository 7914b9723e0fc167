"""Runtime settings: defaults, the pod environment (``contracts.names.RuntimeEnv``), then flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from lorafleet.contracts.names import ADMIN_PORT, RUNTIME_METRICS_PORT, RUNTIME_PORT, RuntimeEnv

QUANTIZATIONS = ("none", "int8", "nf4")  # what each means: runtime/quantization.py
TASKS = ("sequence-classification", "text-generation", "text-to-image")
ENGINES = ("auto", "torch", "vllm")  # what runs the model (lifecycle.choose_engine)


@dataclass
class RuntimeSettings:
    model_dir: str = ""
    cache_dir: str = ""
    task: str = ""  # empty: read from the model's config (architectures)
    dtype: str = "float32"
    quantization: str = "none"  # the base's linear layers: none | int8 | nf4 (runtime/quantization.py)
    device: str = "cpu"
    engine: str = "auto"
    # torch's intra-op threads; 0: on CPU, one core fewer than the machine has (at least 1), so the
    # event loop keeps a core; elsewhere torch's default.
    torch_threads: int = 0
    host: str = "0.0.0.0"
    port: int = RUNTIME_PORT
    admin_port: int = ADMIN_PORT
    metrics_port: int = RUNTIME_METRICS_PORT  # /metrics only, on `host`
    max_batch_size: int = 32
    max_batch_delay_ms: float = 5.0
    max_queue: int = 1024
    # Queued work older than this is answered 429 (and work that would wait longer is refused at once); 0: no bound.
    max_queue_delay_ms: float = 2000.0
    per_tenant_max_inflight: int = 64
    device_slots: int = 32
    host_adapters: int = 512
    max_rank: int = 64
    max_new_tokens: int = 256  # default when a request gives none
    # Generation: positions per KV-cache row (prompt + generated); 0: the model's length capped at 8192.
    max_model_len: int = 0
    served_model_name: str = ""  # the base model's id; empty: the model folder's name
    # A merged pool: the adapter directory merged into the base at load, and what it answers as.
    merged_adapter_dir: str = ""
    merged_adapter_name: str = ""
    merged_adapter_version: str = ""
    merged_adapter_tenant: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides) -> "RuntimeSettings":
        env = os.environ if env is None else env
        names = {
            "model_dir": RuntimeEnv.MODEL_DIR, "cache_dir": RuntimeEnv.CACHE_DIR, "task": RuntimeEnv.TASK,
            "dtype": RuntimeEnv.DTYPE, "quantization": RuntimeEnv.QUANTIZATION, "engine": RuntimeEnv.ENGINE,
            "port": RuntimeEnv.PORT, "admin_port": RuntimeEnv.ADMIN_PORT,
            "metrics_port": RuntimeEnv.METRICS_PORT,
            "max_batch_size": RuntimeEnv.MAX_BATCH_SIZE, "max_batch_delay_ms": RuntimeEnv.MAX_BATCH_DELAY_MS,
            "max_queue": RuntimeEnv.MAX_QUEUE, "max_queue_delay_ms": RuntimeEnv.MAX_QUEUE_DELAY_MS, "per_tenant_max_inflight": RuntimeEnv.PER_TENANT_MAX_INFLIGHT,
            "device_slots": RuntimeEnv.DEVICE_SLOTS, "host_adapters": RuntimeEnv.HOST_ADAPTERS,
            "max_rank": RuntimeEnv.MAX_RANK, "served_model_name": RuntimeEnv.SERVED_MODEL_NAME,
            "max_model_len": RuntimeEnv.MAX_MODEL_LEN, "torch_threads": RuntimeEnv.TORCH_THREADS,
            "merged_adapter_dir": RuntimeEnv.MERGED_ADAPTER_DIR, "merged_adapter_name": RuntimeEnv.MERGED_ADAPTER_NAME,
            "merged_adapter_version": RuntimeEnv.MERGED_ADAPTER_VERSION,
            "merged_adapter_tenant": RuntimeEnv.MERGED_ADAPTER_TENANT,
        }
        s = cls()
        types = {f.name: f.type for f in fields(cls)}
        for attr, var in names.items():
            raw = env.get(var)
            if raw not in (None, ""):
                s._set(attr, raw, types[attr], var)
        for attr, value in overrides.items():
            if value is not None:
                setattr(s, attr, value)
        s.validate()
        return s

    def _set(self, attr: str, raw: str, typ: str, source: str) -> None:
        conv = {"int": int, "float": float}.get(typ, str)
        try:
            setattr(self, attr, conv(raw))
        except ValueError:
            raise ValueError(f"{source}={raw!r}: expected a {typ}") from None

    def validate(self) -> None:
        problems = []
        if self.task and self.task not in TASKS:
            problems.append(f"task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.engine not in ENGINES:
            problems.append(f"engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype {self.dtype!r}: expected float32, bfloat16 or float16")
        if self.quantization not in QUANTIZATIONS:
            problems.append(f"quantization {self.quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
        for name in ("max_batch_size", "max_queue", "per_tenant_max_inflight", "device_slots", "host_adapters",
                     "max_rank"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.torch_threads < 0:
            problems.append(f"torch_threads must not be negative (got {self.torch_threads}; 0 = automatic)")
        if self.max_model_len < 0:
            problems.append(f"max_model_len must not be negative (got {self.max_model_len}; 0 = the model's length, "
                            "capped at 8192)")
        if self.max_batch_delay_ms < 0:
            problems.append("max_batch_delay_ms must not be negative")
        if self.max_queue_delay_ms < 0:
            problems.append(f"max_queue_delay_ms must not be negative (got {self.max_queue_delay_ms}; 0 = no bound)")
        if self.merged_adapter_dir and not (self.merged_adapter_name and self.merged_adapter_version):
            problems.append(f"merged_adapter_dir is set: {RuntimeEnv.MERGED_ADAPTER_NAME} and "
                            f"{RuntimeEnv.MERGED_ADAPTER_VERSION} must name what it answers as")
        if problems:
            raise ValueError("invalid runtime settings: " + "; ".join(problems))

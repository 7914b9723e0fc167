"""The runtime's lifecycle: load the base model (in the background), bind the adapter tiers to the
engine, readiness, and the per-request steps every route shares (task check, adapter resolution,
submission with overload answered as 429)."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from lorafleet.contracts.engines import auto_engine
from lorafleet.contracts.adapter_rules import PERMANENT, Refused
from lorafleet.contracts.names import split_versioned, versioned_name
from lorafleet.contracts.runtime_api import ModelStatus, SyncState
from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engine_api import Overloaded, ServingEngine, Work
from lorafleet.runtime.metrics import RuntimeMetrics
from lorafleet.runtime.protocol import ApiError, too_busy
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterEntry, AdapterManager, AdapterUnavailable, ModelNotFound

log = logging.getLogger("lorafleet.runtime")

# The resolve errors a base-model fallback answers instead, and the reason it is counted under.
# The request scope's key for when the request reached the app (time.monotonic; admission.py sets it).
ARRIVED = "lorafleet_arrived"
# The request scope's key for the HTTP front's number for a request it counts as forwarded (front.py);
# ``Runtime.submit`` acknowledges it once its work is queued.
FRONT_SEQ = "lorafleet_front_seq"

FALLBACK_REASONS = {"adapter_unavailable": "load_failed", "model_not_found": "not_loaded"}


def fallback_of(request) -> dict | None:
    """The ``fallback`` field of an answer the base model gave instead of an adapter, else None."""
    return request.scope.get("lorafleet_fallback")


def marked_start(scope, message: dict) -> dict:
    """An ``http.response.start`` message with ``x-lorafleet-fallback: base`` when the base model
    answered for an adapter (``fallback_of``); other messages as they are."""
    if message["type"] == "http.response.start" and scope.get("lorafleet_fallback"):
        return {**message, "headers": [*message.get("headers", []), (b"x-lorafleet-fallback", b"base")]}
    return message


def detect_task(model_dir: Path) -> str:
    if (model_dir / "model_index.json").is_file():  # a diffusers pipeline folder
        return "text-to-image"
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    return "text-generation" if any(a.endswith("ForCausalLM") for a in archs) else "sequence-classification"


def vllm_installed() -> bool:
    """Whether this runtime's environment has vLLM (found, not imported: importing it takes seconds)."""
    spec = importlib.util.find_spec("vllm")
    # A folder named vllm on sys.path without vLLM in it (tests/vllm, under pytest) is a namespace package.
    return spec is not None and spec.origin is not None


def gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_engine(task: str, settings: RuntimeSettings, *, has_vllm=vllm_installed, has_gpu=gpu_available) -> str:
    """``torch`` or ``vllm`` for a pool of ``task`` (settings.engine: auto, torch or vllm). ``auto`` is vLLM
    for text generation on a GPU when vLLM is installed (unless the base is quantized or merged),
    lorafleet's torch engine otherwise; ``vllm``
    that cannot be honoured is refused (``UnsupportedModel``: the pool's ModelReady condition says why)."""
    wanted = settings.engine
    if wanted == "torch":
        return "torch"
    if wanted == "auto":
        # The operator applies the same rule to choose the pool's image (contracts/engines.py).
        if task != "text-generation":
            return "torch"
        return auto_engine(task, settings.quantization, bool(settings.merged_adapter_dir), gpu=has_gpu(),
                           vllm=has_vllm())
    if task != "text-generation":
        raise UnsupportedModel(f"engine vllm serves text-generation pools only; this pool's task is {task} "
                               "(set spec.runtime.engine to torch or auto)")
    if not has_vllm():
        raise UnsupportedModel("engine vllm: vLLM is not installed in this runtime image; use an image with vLLM "
                               "(docker/runtime-vllm.Dockerfile, lorafleet/runtime-vllm) or set "
                               "spec.runtime.engine to torch or auto (--engine / LORAFLEET_ENGINE)")
    return "vllm"


def choose_front(s: RuntimeSettings, task: str | None) -> str:
    """``inline`` or ``process``: who serves the public port (settings.front). ``auto`` is the HTTP front
    process where the torch engine computes in a model process (text generation and classification on
    CPU, ``torch_engine.model_process``): there the event loop alone, parsing every request of a 5x overload,
    left the ones it answered waiting seconds in the socket buffers where the queue-delay bound does not see
    them (docs/benchmarks.md, issue 19). Inline elsewhere: with vLLM, on a GPU (not measured) and for
    text-to-image. ``task`` None: not known yet (the model folder is not there): decided without it."""
    if s.front != "auto":
        return s.front
    if s.engine == "vllm" or not s.device.startswith("cpu") or s.model_process == "inline":
        return "inline"
    if task is None:
        return "process"
    from lorafleet.runtime.torch_engine import model_process

    return model_process(s, task)


def known_task(s: RuntimeSettings) -> str | None:
    """The pool's task where it can be told before the model loads: set, or read from the model folder's
    config; None while the folder is not there."""
    if s.task:
        return s.task
    try:
        return detect_task(Path(s.model_dir))
    except (OSError, ValueError):
        return None


def torch_threads(s: RuntimeSettings) -> int:
    """The intra-op threads to set (0: leave torch's default). On CPU, as many threads as cores starve the
    event loop and whatever else runs there; a parallel op then waits for its descheduled thread (on 2
    busy cores MiniLM's batch-1 forward took a median 480 ms with 2 threads, 18 ms with 1)."""
    if s.torch_threads:
        return s.torch_threads
    if s.device.startswith("cpu"):
        return max(1, (os.cpu_count() or 1) - 1)
    return 0


def build_engine(model_dir: Path, task: str, settings: RuntimeSettings, metrics) -> ServingEngine:
    """The engine for ``task`` as ``choose_engine`` picks it: lorafleet's torch engine or vLLM's."""
    kind = choose_engine(task, settings)
    log.info("engine: %s (spec.runtime.engine %s, task %s)", kind, settings.engine, task)
    if kind == "vllm":
        from lorafleet.runtime.vllm_engine import VLLMEngine

        return VLLMEngine.from_dir(model_dir, settings, metrics)
    from lorafleet.runtime.torch_engine import TorchEngine

    return TorchEngine.from_dir(model_dir, task, settings, metrics)


class Runtime:
    """One runtime: loads the base model (in the background), owns the engine, serves both apps."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self.instance = uuid.uuid4().hex
        self.metrics = RuntimeMetrics()
        self.engine: ServingEngine | None = None
        self.manager: AdapterManager | None = None
        self.task = settings.task
        self.base_name = settings.served_model_name or Path(settings.model_dir).name or "base"
        # A merged pool answers as its merged adapter (name and name@version) and as nothing else.
        self.merged = (versioned_name(settings.merged_adapter_name, settings.merged_adapter_version)
                       if settings.merged_adapter_dir else None)
        self.model_error: str | None = None
        # loading -> loaded, or refused (the engine cannot serve it exactly) / failed (loading raised):
        # both for good, the model is not loaded again; the admin API and /readyz keep saying why.
        self.model_state = "loading"
        self.sync: SyncState | None = None
        self.pool_adapters: frozenset[str] = frozenset()  # the last SyncState's, for lookups
        self.require_sync = True  # lorafleet serve has no sidecar: it marks itself synced
        # Readiness waits for the first complete preload only: an adapter added later must not take a
        # serving pod out of its Service (during a rollout the old version keeps answering).
        self.preloaded = False
        self.loaded = threading.Event()
        # The commands set this: the process is the runtime's alone (not a test process holding many).
        self.freeze_gc = False
        # With the HTTP front (front.py): the numbers of its requests queued since the last admission
        # snapshot went to it (front_link.py), and how often the adapter names changed.
        self.front_acks: list[int] = []
        self.names_changed = 0
        # The engine can no longer serve (its model process died): the reason, and who stops the servers.
        self.fatal: str | None = None
        self.fatal_hooks: list = []

    # --- lifecycle -------------------------------------------------------------------------------
    def load(self, wait_s: float = 0.0) -> None:
        """Load the base model (blocking). With ``wait_s`` waits for the directory to appear."""
        s = self.settings
        model_dir = Path(s.model_dir)
        deadline = time.monotonic() + wait_s
        next_log = 0.0
        merged = Path(s.merged_adapter_dir) if s.merged_adapter_dir else None
        while not (((model_dir / "config.json").is_file() or (model_dir / "model_index.json").is_file())
                   and (merged is None or merged.is_dir())):
            if time.monotonic() >= deadline:
                if merged is not None and not merged.is_dir():
                    raise FileNotFoundError(f"merged adapter directory {merged} does not exist; set "
                                            "LORAFLEET_MERGED_ADAPTER_DIR to a verified adapter directory")
                raise FileNotFoundError(f"model directory {model_dir} has no config.json (a transformers model) "
                                        "or model_index.json (a diffusers pipeline); set --model / "
                                        "LORAFLEET_MODEL_DIR to one")
            if time.monotonic() >= next_log:
                log.info("waiting for the base model at %s%s (the sidecar downloads it)", model_dir,
                         f" and the merged adapter at {merged}" if merged is not None else "")
                next_log = time.monotonic() + 10
            time.sleep(0.5)
        self.task = s.task or detect_task(model_dir)
        t0 = time.monotonic()
        threads = torch_threads(s)
        if threads:
            import torch

            torch.set_num_threads(threads)
        engine = build_engine(model_dir, self.task, s, self.metrics)
        manager = AdapterManager(self.task, s.host_adapters, s.cache_dir or None, engine.dtype,
                                 on_event=self._adapter_event)
        engine.bind(manager)
        engine.on_fatal = self._engine_failed
        self.engine, self.manager = engine, manager
        if self.freeze_gc:
            # The model, tokenizer and imported modules are ~430,000 Python objects that live as long as
            # the process. Every full collection walked them all: 165 ms with MiniLM, with the worker
            # and the event loop stalled meanwhile. Frozen, a full collection walks what came later.
            gc.collect()
            gc.freeze()
        engine.start()
        self.metrics.bind(self)
        self.model_state = "loaded"
        self.loaded.set()
        base = engine.base_weights()
        weights = "" if base is None else (f", weights {base[1] / 2**20:.1f} MiB" if base[0] == "none" else
                                           f", {base[0]} weights {base[1] / 2**20:.1f} MiB "
                                           f"({base[2] / 2**20:.1f} MiB unquantized)")
        log.info("base model %s loaded (%s, %s%s)%s in %.1fs", model_dir, self.task, s.dtype, weights,
                 f" with adapter {self.merged} merged in" if self.merged else "", time.monotonic() - t0)

    def load_in_background(self, wait_s: float = 0.0) -> threading.Thread:
        def run():
            try:
                self.load(wait_s)
            except (UnsupportedModel, Refused) as e:
                if isinstance(e, Refused) and e.kind != PERMANENT:
                    self.model_error, self.model_state = str(e), "failed"
                    log.exception("loading the base model failed")
                    return
                self.model_error, self.model_state = str(e), "refused"
                log.error("base model refused: %s", e)
            except Exception as e:
                self.model_error, self.model_state = str(e), "failed"
                log.exception("loading the base model failed")

        t = threading.Thread(target=run, name="lorafleet-model-loader", daemon=True)
        t.start()
        return t

    def _engine_failed(self, reason: str) -> None:
        """The engine lost its model for good (any thread): not ready, the admin API says why, and the
        servers stop with exit code 1 so that the container restarts (``server.serve_async``)."""
        if self.fatal is not None:
            return
        self.fatal = reason
        self.model_error, self.model_state = reason, "failed"
        self.loaded.clear()
        for hook in list(self.fatal_hooks):
            try:
                hook(reason)
            except Exception:
                log.exception("stopping after the engine failed")

    def model_status(self) -> ModelStatus:
        return ModelStatus(state=self.model_state, message=self.model_error or "", task=self.task,
                           instance=self.instance)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    def ready(self) -> tuple[bool, str]:
        if not self.loaded.is_set():
            return False, self.model_error or "the base model is still loading"
        if self.require_sync and not self.preloaded:
            if self.sync is None or self.sync.preload_pending > 0:
                pending = "no sync state from the sidecar yet" if self.sync is None else \
                    f"{self.sync.preload_pending} preload adapters pending"
                return False, pending
            self.preloaded = True
        return True, "ready"

    def _adapter_event(self, kind: str, entry: AdapterEntry) -> None:
        self.metrics.adapter_events.labels(kind).inc()
        self.names_changed += 1
        if self.engine is not None:
            self.engine.adapter_event(kind, entry)

    # --- requests --------------------------------------------------------------------------------
    def tenant_of(self, model) -> str | None:
        """The tenant a request naming ``model`` is queued for, if it can be told without side effects
        (a registered adapter's, the base model's or the merged adapter's); None: unknown here (the
        route resolves it and answers as it does)."""
        if not isinstance(model, str) or not model or not self.loaded.is_set():
            return None
        if self.merged is not None:
            name = split_versioned(self.merged)[0]
            return (self.settings.merged_adapter_tenant or name) if model in (name, self.merged) else None
        if model == self.base_name:
            return "_base"
        if self.manager is None:
            return None
        name, version = split_versioned(model)
        versions = self.manager.entries.get(name)
        if not versions:
            return None
        if version is not None:
            e = versions.get(version)
            return e.tenant if e is not None and e.error is None else None
        tenants = {e.tenant for e in list(versions.values()) if e.error is None}
        return tenants.pop() if len(tenants) == 1 else None

    def tenant_map(self) -> dict[str, str]:
        """Every ``model`` a request can name for which ``tenant_of`` tells the tenant, and that tenant
        (what the HTTP front refuses by: the same rule as ``tenant_of``)."""
        if not self.loaded.is_set():
            return {}
        if self.merged is not None:
            name = split_versioned(self.merged)[0]
            tenant = self.settings.merged_adapter_tenant or name
            return {name: tenant, self.merged: tenant}
        out: dict[str, str] = {}
        for name, versions in list(self.manager.entries.items() if self.manager is not None else ()):
            tenants = set()
            for version, e in list(versions.items()):
                if e.error is None:
                    out[versioned_name(name, version)] = e.tenant
                    tenants.add(e.tenant)
            if len(tenants) == 1:
                out[name] = tenants.pop()
        out[self.base_name] = "_base"  # tenant_of reads the base model's name first
        return out

    def need_task(self, task: str) -> None:
        if not self.loaded.is_set():
            raise ApiError(503, "the base model is still loading; retry shortly", "service_unavailable",
                           "model_loading", {"Retry-After": "5"})
        if self.task != task:
            raise ApiError(400, f"this pool serves {self.task}; this endpoint needs a {task} pool",
                           "invalid_request_error", "wrong_task")

    def resolve(self, model: str | None) -> AdapterEntry | None:
        if not model:
            raise ApiError(400, "`model` is required: the served name of an adapter (or name@version)",
                           "invalid_request_error", "missing_model")
        if self.merged is not None:
            return self._resolve_merged(model)
        if model == self.base_name:
            return None
        try:
            return self.manager.resolve(model)
        except ModelNotFound as e:
            if split_versioned(model)[0] in self.pool_adapters:
                raise ApiError(503, f"adapter {model!r} is not served by this replica (placed on other replicas of "
                               "the pool, or still loading here); "
                               "retry (the gateway sends it to a replica that holds it)", "service_unavailable",
                               "adapter_elsewhere", {"Retry-After": "1"}) from None
            raise ApiError(404, str(e), "invalid_request_error", "model_not_found") from None
        except AdapterUnavailable as e:
            raise ApiError(503, str(e), "service_unavailable", "adapter_unavailable", {"Retry-After": "30"}) from None

    def _resolve_merged(self, model: str) -> None:
        """In a merged pool the base weights are the adapter's: its name and name@version resolve to
        them (no slot, the base's speed); the plain base model and every other adapter are not here."""
        name, version = split_versioned(self.merged)
        if model in (name, self.merged):
            return None
        if split_versioned(model)[0] == name:
            raise ApiError(404, f"this pool serves {self.merged} merged into its base; version "
                           f"{split_versioned(model)[1]!r} is not here (send {name!r} or {self.merged!r})",
                           "invalid_request_error", "model_not_found")
        raise ApiError(404, f"The model '{model}' does not exist here: this pool serves only {self.merged}, merged "
                       "into its base model (spec.model.mergedAdapter)", "invalid_request_error", "model_not_found")

    def answered_as(self, entry: AdapterEntry | None) -> str:
        """The ``model`` an answer names: the version that served it, or the base model's id."""
        if entry is not None:
            return entry.served
        return self.merged or self.base_name

    def resolve_request(self, request, model: str | None, fallback: bool = True) -> AdapterEntry | None:
        """``resolve`` for one HTTP request, tagging it with its tenant (metrics). With ``fallback``, an
        adapter that opted into the base-model fallback (the sidecar's ``SyncState.fallback``) and
        that this replica cannot serve (failed to load: ``load_failed``; not loaded here:
        ``not_loaded``) resolves to the base model; the request is marked (``fallback_of``), counted
        by tenant and reason, and its answer says so. Without the opt-in: 404/503 as always."""
        try:
            entry = self.resolve(model)
        except ApiError as e:
            name = split_versioned(model or "")[0]
            tenant = (self.sync.fallback.get(name) if fallback and self.sync is not None else None)
            if tenant is None or e.code not in FALLBACK_REASONS:
                raise
            reason = FALLBACK_REASONS[e.code]
            log.info("adapter %s of tenant %s cannot be served here (%s): answering with the base model",
                     model, tenant, reason)
            self.metrics.fallback.labels(tenant, reason).inc()
            request.scope["lorafleet_tenant"] = tenant
            request.scope["lorafleet_fallback"] = {"to": "base", "model": self.base_name, "requested": model,
                                                   "reason": reason}
            return None
        request.scope["lorafleet_requested"] = model
        if entry is None and self.merged is not None:
            request.scope["lorafleet_tenant"] = self.settings.merged_adapter_tenant or split_versioned(self.merged)[0]
        else:
            request.scope["lorafleet_tenant"] = entry.tenant if entry else "_base"
        return entry

    def settle(self, request, work: Work) -> None:
        """After the engine took ``work``: if it fell back to the base model (no slot within the
        deadline), mark the answer and count it, as ``resolve_request`` does for the other reasons."""
        if work.fell_back and not request.scope.get("lorafleet_fallback"):
            model = request.scope.get("lorafleet_requested") or ""
            self.metrics.fallback.labels(work.tenant, work.fell_back).inc()
            log.info("a request of tenant %s for %s got no device slot in time: answering with the base model",
                     work.tenant, model)
            request.scope["lorafleet_fallback"] = {"to": "base", "model": self.base_name, "requested": model,
                                                   "reason": work.fell_back}

    def submit(self, entry: AdapterEntry | None, payloads: list[Any], tenant: str | None = None,
               fallback: bool = False, request=None) -> list[Work]:
        """Queue ``payloads`` for ``entry``. With ``fallback`` (a route that can answer with the base), an
        adapter that opted into the base-model fallback runs on the base if no device slot takes it
        within the scheduler's deadline (``settle`` then marks the answer). With ``request``, the work
        counts as enqueued when the request arrived (admission.py stamps it): the time it spent
        before the queue counts against the queue-delay bound."""
        loop = asyncio.get_running_loop()
        tenant = tenant or (entry.tenant if entry is not None else "_base")
        may = bool(fallback and entry is not None and self.sync is not None and entry.name in self.sync.fallback)
        arrived = request.scope.get(ARRIVED) if request is not None else None
        now = time.monotonic()
        at = now if arrived is None else min(arrived, now)
        works = [Work(tenant, entry, p, loop, asyncio.Queue(), enqueued=at, fallback=may) for p in payloads]
        try:
            self.engine.submit(works)
        except Overloaded as e:
            raise too_busy(e) from None
        if request is not None and (seq := request.scope.get(FRONT_SEQ)) is not None:
            self.front_acks.append(seq)
        return works

"""lorafleet's own engine behind the ``ServingEngine`` interface: the batched multi-LoRA model
(engines.py), the per-tenant scheduler and the one model-worker thread (worker.py)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from lorafleet.runtime.engine_api import ImageParams, SamplingParams, ServingEngine, Work
from lorafleet.runtime.protocol import refuse
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.worker import ModelWorker, Scheduler

log = logging.getLogger("lorafleet.runtime")


MODEL_PROCESS_TASKS = ("text-generation", "sequence-classification")  # the engines model_process.py can run


def model_process(s: RuntimeSettings, task: str) -> str:
    """Where the torch engine's model computes: "process" (model_process.py) or "inline" (a worker thread).
    auto: a process for text generation and classification on CPU (measured faster there, docs/benchmarks.md);
    inline on a GPU, where it has not been measured yet (text-to-image has no model process)."""
    if task not in MODEL_PROCESS_TASKS:
        return "inline"
    if s.model_process == "auto":
        return "process" if s.device.startswith("cpu") else "inline"
    return s.model_process


class TorchEngine(ServingEngine):
    def __init__(self, model_engine, settings: RuntimeSettings, metrics=None):
        self.model = model_engine  # ClassificationEngine or GenerationEngine
        self.task = model_engine.task
        self.tokenizer = model_engine.tokenizer
        self.dtype = model_engine.dtype
        self.settings = settings
        self.scheduler = Scheduler(settings.max_queue, settings.per_tenant_max_inflight, settings.max_queue_delay_ms,
                                   on_shed=metrics.shed if metrics is not None else None,
                                   on_cancelled=metrics.cancelled_work if metrics is not None else None)
        # An engine with a stepping loop of its own (text-to-image) brings its worker.
        worker_class = getattr(model_engine, "worker_class", ModelWorker)
        self.worker = worker_class(model_engine, self.scheduler, settings.max_batch_size,
                                  settings.max_batch_delay_ms, metrics)
        if hasattr(model_engine, "on_death"):  # a model process (model_process.py)
            model_engine.on_death = self._model_died

    def _model_died(self, reason: str) -> None:
        if self.on_fatal is not None:
            self.on_fatal(reason)

    @classmethod
    def from_dir(cls, model_dir: Path, task: str, settings: RuntimeSettings, metrics=None) -> "TorchEngine":
        from lorafleet.runtime.engines import ClassificationEngine, GenerationEngine

        s = settings
        if s.merged_adapter_dir and task != "text-generation":
            from lorafleet.runtime.architectures import UnsupportedModel

            raise UnsupportedModel(f"spec.model.mergedAdapter: merged pools are text-generation only (this pool is "
                                   f"{task}); serve the adapter on a shared pool")
        if s.merged_adapter_dir and s.quantization != "none":
            from lorafleet.runtime.architectures import UnsupportedModel

            # Merging into quantized weights is not PEFT's merge_and_unload over the float base.
            raise UnsupportedModel(f"spec.model.mergedAdapter with quantization {s.quantization}: a merged pool merges "
                                   "into unquantized weights only; set spec.model.quantization: none")
        if s.model_process == "process" and task not in MODEL_PROCESS_TASKS:
            from lorafleet.runtime.architectures import UnsupportedModel

            raise UnsupportedModel(f"--model-process process (LORAFLEET_MODEL_PROCESS): a {task} pool has no model "
                                   f"process (only {' and '.join(MODEL_PROCESS_TASKS)} pools have one); set it to "
                                   "auto or inline")
        remote = model_process(s, task) == "process"
        if remote:
            from lorafleet.runtime.lifecycle import torch_threads
            from lorafleet.runtime.model_process import make_remote_engine
        log.info("model: %s (--model-process %s, task %s, device %s)",
                 "a process of its own" if remote else "a thread of the model server",
                 s.model_process, task, s.device)
        if task == "text-to-image":
            from lorafleet.runtime.diffusion import DiffusionEngine

            from lorafleet.runtime.quantization import check_supported

            check_supported(s.quantization, task, s.device)
            engine = DiffusionEngine.from_dir(model_dir, dtype=s.dtype, device=s.device, device_slots=s.device_slots,
                                              max_rank=s.max_rank)
        elif task == "text-generation":
            kwargs = dict(dtype=s.dtype, device=s.device, device_slots=s.device_slots, max_rank=s.max_rank,
                          max_seqs=s.max_batch_size, max_len=s.max_model_len or None, quantization=s.quantization,
                          merged_adapter=s.merged_adapter_dir or None)
            engine = make_remote_engine(model_dir, s, task, threads=torch_threads(s), **kwargs) if remote else \
                GenerationEngine.from_dir(model_dir, **kwargs)
        else:
            kwargs = dict(dtype=s.dtype, device=s.device, device_slots=s.device_slots, max_rank=s.max_rank,
                          quantization=s.quantization)
            engine = make_remote_engine(model_dir, s, task, threads=torch_threads(s), **kwargs) if remote else \
                ClassificationEngine.from_dir(model_dir, **kwargs)
        return cls(engine, settings, metrics)

    # --- requests -------------------------------------------------------------------------------------
    def max_input_tokens(self) -> int:
        return self.model.max_input_tokens()

    def count_tokens(self, text: str) -> int:
        return self.model.count_tokens(text)

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text)

    def new_sequence(self, prompt: list[int], params: SamplingParams):
        from lorafleet.runtime.engines import Sequence

        if params.structured is not None:
            raise refuse(params.structured.field, f"type {params.structured.kind!r} (structured output) is not "
                         "implemented by the torch engine; ask for text, or use a pool with "
                         "spec.runtime.engine vllm")
        # Shallow: the request's own params are handed over (asdict deep-copies every set and dict).
        fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.name != "structured"}
        return Sequence(prompt=prompt, **fields)

    def new_image(self, params: ImageParams):
        from lorafleet.runtime.diffusion import ImageJob

        job = ImageJob(params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                       width=params.width, n=params.n, seed=params.seed)
        if params.steps is not None:
            job.steps = params.steps
        if params.guidance is not None:
            job.guidance = params.guidance
        return self.model.prepare(job)

    def submit(self, works: list[Work]) -> None:
        self.scheduler.submit(works)

    def precheck(self, tenant: str, n: int, arrived: float):
        return self.scheduler.precheck(tenant, n, arrived)

    def admission_snapshot(self) -> dict:
        sched = self.scheduler
        with sched.cv:
            s = sched.admission_state()
            return {"max_queue": s.max_queue, "per_tenant": s.per_tenant, "max_delay": s.max_delay, "closed": s.closed,
                    "queued": s.queued, "rate": s.rate, "load": dict(s.load), "waiting": dict(s.waiting)}

    def cancel(self, work: Work, reason: str = "client_left") -> None:
        # Queued work leaves the queue (and its counts) now; the worker frees cancelled rows before its next step.
        self.scheduler.cancel(work, reason)

    # --- adapters -------------------------------------------------------------------------------------
    def bind(self, manager) -> None:
        self.model.bind(manager)

    def adapter_event(self, kind: str, entry) -> None:
        model = self.model
        if kind == "unloaded":
            # Slots are the worker's; in-flight batches keep theirs until they finish.
            self.scheduler.post(lambda: model.slots.drop(entry.key))
        elif kind == "loaded" and entry.pinned:
            def pin():
                try:
                    model.acquire(entry)
                    model.release(entry)
                except Exception:
                    log.exception("pinning %s failed", entry.served)
            self.scheduler.post(pin)

    # --- capacity and lifecycle -------------------------------------------------------------------------
    def capacity(self) -> dict[str, int]:
        slots = self.model.slots
        out = {"device_slots": slots.size, "device_slots_used": len(slots.by_key),
               "device_evictions": slots.evictions, "queued": self.scheduler.queued,
               "max_batch_size": self.settings.max_batch_size}
        if hasattr(self.model, "free_rows"):
            out["rows_free"] = len(self.model.free_rows)
        if hasattr(self.model, "memory_bytes"):  # {"weights": n, "kv_cache": n, ...} -> "weights_bytes": n
            out.update({f"{part}_bytes": n for part, n in self.model.memory_bytes().items()})
        return out

    def base_weights(self) -> tuple[str, int, int] | None:
        m = self.model
        if not hasattr(m, "unquantized_weights_bytes"):
            return None
        return m.quantization, m.weights_bytes, m.unquantized_weights_bytes

    def start(self) -> None:
        self.scheduler.start()
        self.worker.start()

    def close(self) -> None:
        self.scheduler.close()
        if self.worker.is_alive():
            self.worker.join(timeout=10)
        if hasattr(self.model, "close"):  # a model process (model_process.py) exits
            self.model.close()

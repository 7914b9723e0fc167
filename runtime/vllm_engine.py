"""vLLM's async engine behind the ``ServingEngine`` interface, in-process: text-generation pools on a GPU
(or vLLM's CPU build), with everything above the engine unchanged (OpenAI and TGI routes, ``name@version``,
404 for an unknown adapter, per-tenant caps, metrics, the admin API the sidecar calls).

- Each registered adapter version is one ``LoRARequest`` whose int id is the registration's key and whose
  name carries that key: neither is ever reused, so vLLM's slots and prefix cache (keyed by them) can never
  serve another version's or another tenant's weights. An unloaded version is removed from vLLM
  (``remove_lora``) once its last running request ends.
- ``deviceSlots`` / ``hostAdapters`` / ``maxRank`` / ``maxBatchSize`` / ``maxModelLen`` are vLLM's
  ``max_loras`` / ``max_cpu_loras`` / ``max_lora_rank`` (rounded up to a rank vLLM accepts) /
  ``max_num_seqs`` / ``max_model_len``; what vLLM cannot take is refused at startup.
- Sampling parameters map to vLLM's one to one; what vLLM would compute differently from the torch
  engine's semantics (sampling.py) is refused with 400 naming the parameter. Stop strings and
  detokenization stay in the HTTP layer (generation.TextStream), as for the torch engine.
- ``response_format`` json_object / json_schema become vLLM's structured outputs, as vLLM's OpenAI server maps
  them, and so do TGI's ``parameters.grammar`` json (a schema) and regex; what vLLM refuses when it takes a request (a schema its grammar backend cannot compile) is a 400.

vLLM is imported only when this engine is built: the runtime imports without it."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.runtime.architectures import UnsupportedModel
from lorafleet.runtime.engine_api import TAKEN, Overloaded, SamplingParams, ServingEngine, Work
from lorafleet.runtime.protocol import bad_request
from lorafleet.runtime.settings import RuntimeSettings

log = logging.getLogger("lorafleet.runtime")

# vLLM 0.32's LoRAConfig.max_lora_rank takes only these values.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_MODEL_LEN = 8192  # as the torch engine: the model's length, capped here
# The share of GPU memory vLLM may take (weights, activations, KV cache) is the setting
# vllm_gpu_memory_utilization (LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION); on vLLM's CPU build the KV cache is
# sized by VLLM_CPU_KVCACHE_SPACE (GiB) instead.
STARTUP_TIMEOUT_S = 1800.0
# vLLM's CPU build (0.32.0) computes rows without an adapter wrongly when they share a batch with rows that
# have one (seen here: alone they equal Hugging Face's, mixed they do not; the adapter rows stay exact). On
# it, base-model requests run with an adapter whose factors are all zero (it adds exactly 0): a LoRA id no
# registration takes (registration keys count up from 1).
ZERO_ADAPTER_ID = 2**31 - 1


def write_zero_adapter(model_dir: Path, out: Path) -> Path:
    """A rank-1 PEFT adapter on every layer's ``q_proj`` with zero factors (Llama-style module names)."""
    import json

    import torch
    from safetensors.torch import save_file

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    tensors = {}
    for i in range(cfg["num_hidden_layers"]):
        pre = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{pre}.lora_A.weight"] = torch.zeros(1, cfg["hidden_size"])
        tensors[f"{pre}.lora_B.weight"] = torch.zeros(heads * head_dim, 1)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1,
                                                         "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    return out


def lora_rank_for(max_rank: int) -> int:
    """The smallest rank vLLM accepts that holds ``max_rank`` (the pool's maxRank); refused above 512."""
    for r in VLLM_LORA_RANKS:
        if r >= max_rank:
            return r
    raise UnsupportedModel(f"cache.maxRank {max_rank} is above the largest LoRA rank vLLM serves "
                           f"({VLLM_LORA_RANKS[-1]}); lower cache.maxRank or use spec.runtime.engine torch")


def _settings_problems(settings: RuntimeSettings) -> list[str]:
    problems = []
    if settings.quantization != "none":
        problems.append(f"model.quantization {settings.quantization} is the torch engine's (bitsandbytes); the vllm "
                        "engine serves unquantized weights: set model.quantization none or engine torch")
    if settings.merged_adapter_dir:
        problems.append("a merged pool (spec.model.mergedAdapter) merges its adapter into the base weights in the "
                        "torch engine; the vllm engine would serve the unmerged base: use engine torch for it")
    return problems


@dataclass(eq=False)
class VLLMSequence:
    """One generation request: what the routes read (``prompt``, ``generated``, logprobs, ``seed``,
    ``sample``), written by the engine's thread before each token event."""

    prompt: list[int]
    params: SamplingParams
    vllm_params: object  # vllm.SamplingParams
    generated: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list]] = field(default_factory=list)

    @property
    def seed(self) -> int | None:
        return self.params.seed

    @property
    def sample(self) -> bool:
        return bool(self.params.sample)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens


def _plain(p: SamplingParams) -> bool:
    """No processor or warper changes the scores: TGI's processed logprobs are then the raw ones."""
    return (not p.sample and not p.logit_bias and p.repetition_penalty == 1.0 and not p.frequency_penalty
            and not p.presence_penalty and not p.min_tokens)


def vllm_sampling(p: SamplingParams, vllm_sampling_params_class, output_kind):
    """vLLM's SamplingParams for ``p``; ``ValueError`` names what vLLM cannot compute as sampling.py does."""
    problems = []
    if p.typical_p != 1.0:
        problems.append("`typical_p` (vLLM has no typical sampling)")
    if p.penalty_style == "tgi" and p.frequency_penalty:
        problems.append("TGI's `frequency_penalty` (vLLM's is OpenAI's formula over output tokens only)")
    if p.logprobs is not None and p.logprob_mode == "processed" and not _plain(p):
        problems.append("TGI's logprobs after sampling processors and warpers (vLLM reports the model's raw "
                        "logprobs; they are the same only for greedy requests without penalties)")
    if p.banned_until_min and p.min_tokens:
        # vLLM bans the end-of-sequence and stop ids until min_tokens, as openai_params asks; nothing else.
        pass
    if problems:
        raise ValueError("the vllm engine cannot honour " + "; ".join(problems)
                         + " (use a pool with spec.runtime.engine torch for them)")
    kw = dict(n=1, max_tokens=p.max_new_tokens, seed=p.seed, stop_token_ids=sorted(p.stop_ids) or None,
              ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, repetition_penalty=p.repetition_penalty,
              presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
              logit_bias=dict(p.logit_bias) if p.logit_bias else None, logprobs=p.logprobs,
              prompt_logprobs=p.prompt_logprobs, detokenize=False, output_kind=output_kind)
    if p.structured is not None:
        # As vLLM's OpenAI server maps response_format (entrypoints/generate/base/protocol.py).
        from vllm.sampling_params import StructuredOutputsParams

        s = p.structured
        kw["structured_outputs"] = (StructuredOutputsParams(json_object=True) if s.kind == "json_object"
                                    else StructuredOutputsParams(regex=s.pattern) if s.kind == "regex"
                                    else StructuredOutputsParams(json=s.schema))
    if p.sample:
        kw.update(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or 0, min_p=p.min_p)
    else:
        kw.update(temperature=0.0)  # greedy: warpers do not apply (sampling.py samples only when asked)
    return vllm_sampling_params_class(**kw)


async def _prepend(first, rest):
    yield first
    async for x in rest:
        yield x


class VLLMEngine(ServingEngine):
    task = "text-generation"

    def __init__(self, llm, loop: asyncio.AbstractEventLoop, thread: threading.Thread, tokenizer,
                 settings: RuntimeSettings, max_model_len: int, lora_rank: int, metrics=None):
        import torch
        from vllm import SamplingParams as VSamplingParams
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind

        self.llm, self.loop, self.thread = llm, loop, thread
        self.tokenizer = tokenizer
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
        self.settings, self.metrics = settings, metrics
        self.max_model_len, self.lora_rank = max_model_len, lora_rank
        from vllm.exceptions import VLLMClientError

        self._vsp, self._lora_class, self._delta = VSamplingParams, LoRARequest, RequestOutputKind.DELTA
        # What vLLM raises for a request it refuses (its OpenAI server answers them 400).
        self._refusals = (VLLMClientError, ValueError, TypeError)
        self._lock = threading.Lock()
        self._load: dict[str, int] = {}  # running + waiting work per tenant
        self._inflight = 0
        self._running_by_key: dict[int, int] = {}  # adapter key -> requests in vLLM using it
        self._dropped: set[int] = set()  # unloaded keys still used by running requests
        self._tasks: dict[int, object] = {}  # id(work) -> concurrent future of its task
        self._added: set[int] = set()  # keys vLLM has been given (add_lora)
        self.manager = None
        self.base_lora = None  # the zero adapter base-model requests run with (vLLM's CPU build only)

    @classmethod
    def from_dir(cls, model_dir: Path, settings: RuntimeSettings, metrics=None) -> "VLLMEngine":
        import json

        problems = _settings_problems(settings)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        model_len = int(cfg.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
        if settings.max_model_len and settings.max_model_len > model_len:
            problems.append(f"maxModelLen {settings.max_model_len} is above the model's max_position_embeddings "
                            f"{model_len}; set maxModelLen to {model_len} or less")
        try:
            lora_rank = lora_rank_for(settings.max_rank)
        except UnsupportedModel as e:
            problems.append(str(e))
            lora_rank = 0
        if problems:
            raise UnsupportedModel("engine vllm: " + "; ".join(problems))
        max_model_len = settings.max_model_len or min(model_len, DEFAULT_MAX_MODEL_LEN)

        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        import torch

        on_gpu = torch.cuda.is_available()
        args = AsyncEngineArgs(
            model=str(model_dir), tokenizer=str(model_dir), dtype=settings.dtype, max_model_len=max_model_len,
            enable_lora=True, max_loras=settings.device_slots,
            max_cpu_loras=max(settings.host_adapters, settings.device_slots), max_lora_rank=lora_rank,
            max_num_seqs=settings.max_batch_size, enforce_eager=not on_gpu,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            disable_log_stats=True, seed=0)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="lorafleet-vllm-loop", daemon=True)
        thread.start()

        async def build():
            return AsyncLLM.from_engine_args(args)

        try:
            llm = asyncio.run_coroutine_threadsafe(build(), loop).result(timeout=STARTUP_TIMEOUT_S)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            raise
        engine = cls(llm, loop, thread, tokenizer, settings, max_model_len, lora_rank, metrics)
        if not on_gpu:
            import tempfile

            zero = write_zero_adapter(model_dir, Path(tempfile.mkdtemp(prefix="lorafleet-vllm-zero-")))
            engine.base_lora = engine._lora_class(lora_name="lorafleet-base#zero", lora_int_id=ZERO_ADAPTER_ID,
                                                  lora_path=str(zero))
        log.info("vLLM engine started: max_loras %d, max_cpu_loras %d, max_lora_rank %d (maxRank %d), "
                 "max_num_seqs %d, max_model_len %d, %s", settings.device_slots, args.max_cpu_loras, lora_rank,
                 settings.max_rank, settings.max_batch_size, max_model_len, "GPU" if on_gpu else "CPU")
        return engine

    # --- requests -------------------------------------------------------------------------------------
    def max_input_tokens(self) -> int:
        return self.max_model_len

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> VLLMSequence:
        try:
            vp = vllm_sampling(params, self._vsp, self._delta)
        except ValueError as e:
            raise bad_request(str(e), "unsupported_parameter") from None
        return VLLMSequence(prompt=list(prompt), params=params, vllm_params=vp)

    def _admit(self, tenant: str, n: int) -> None:
        s = self.settings
        if self._load.get(tenant, 0) + n > s.per_tenant_max_inflight:
            raise Overloaded(f"tenant {tenant} has {self._load.get(tenant, 0)} requests queued or running "
                             f"(perTenantMaxInflight {s.per_tenant_max_inflight}); retry later", "tenant_over_share")
        if self._inflight + n > s.max_queue + s.max_batch_size:
            raise Overloaded(f"the queue is full ({s.max_queue} waiting beyond {s.max_batch_size} running); "
                             "retry later", "queue_full")

    def submit(self, works: list[Work]) -> None:
        if not works:
            return
        tenant = works[0].tenant
        with self._lock:
            try:
                self._admit(tenant, len(works))
            except Overloaded as e:
                if self.metrics is not None:
                    self.metrics.shed(tenant, e.code, len(works))
                raise
            self._load[tenant] = self._load.get(tenant, 0) + len(works)
            self._inflight += len(works)
            for w in works:
                if w.key is not None:
                    self._running_by_key[w.key] = self._running_by_key.get(w.key, 0) + 1
        for w in works:
            w.state = TAKEN
            fut = asyncio.run_coroutine_threadsafe(self._run(w), self.loop)
            self._tasks[id(w)] = fut
            # Done, failed or cancelled (even before it started): its counts and adapter reference go.
            fut.add_done_callback(lambda _, w=w: self._finished(w))

    def cancel(self, work: Work, reason: str = "client_left") -> None:
        if work.cancelled:
            return
        work.cancel(reason)
        fut = self._tasks.get(id(work))
        if fut is not None:
            fut.cancel()  # cancels its task on the engine's loop: vLLM aborts the request

    def _lora(self, entry):
        if entry is None:
            return self.base_lora
        return self._lora_class(lora_name=f"{entry.served}#{entry.key}", lora_int_id=entry.key,
                                lora_path=str(entry.path))

    async def _run(self, work: Work) -> None:
        seq: VLLMSequence = work.payload
        gen = self.llm.generate({"prompt_token_ids": seq.prompt}, seq.vllm_params, uuid.uuid4().hex,
                                lora_request=self._lora(work.entry))
        delay = self.settings.max_queue_delay_ms / 1000.0
        try:
            # The queue-delay bound: vLLM does not say when a request leaves its queue, so the bound is on
            # its first token (prefill included). Past it the request is aborted and answered 429.
            try:
                first = await (asyncio.wait_for(gen.__anext__(), delay) if delay > 0 else gen.__anext__())
            except asyncio.TimeoutError:
                if self.metrics is not None:
                    self.metrics.shed(work.tenant, "queue_timeout", 1)
                work.send("error", Overloaded(
                    f"the request had no first token within maxQueueDelayMs ({delay * 1000:.0f} ms); "
                    "retry later", "queue_timeout"))
                return
            except self._refusals as e:  # refused when vLLM took it (e.g. a schema its grammar backend cannot take)
                work.send("error", self._refused(seq, e))
                return
            async for out in _prepend(first, gen):
                if seq.params.prompt_logprobs is not None and out.prompt_logprobs and not seq.prompt_token_logprobs:
                    seq.prompt_token_logprobs = self._prompt_logprobs(seq, out.prompt_logprobs)
                o = out.outputs[0]
                lps = o.logprobs or []
                for i, tok in enumerate(o.token_ids):
                    if seq.params.logprobs is not None and i < len(lps):
                        self._record(seq, tok, lps[i])
                    seq.generated.append(tok)
                    work.steps += 1
                    work.send("token", tok)
                if out.finished:
                    work.send("done", "length" if o.finish_reason == "length" else "stop")
                    break
        except asyncio.CancelledError:
            if self.metrics is not None and work.cancelled and work.steps:
                self.metrics.cancelled_work("running", work)
        except Exception as e:  # noqa: BLE001 - this request only: the client gets a 500 naming it
            log.exception("vLLM generation failed")
            work.send("error", e)
        finally:
            await gen.aclose()

    @staticmethod
    def _refused(seq: VLLMSequence, e: Exception):
        """The 400 for a request vLLM refused when it took it, naming the field (vLLM's, or the structured
        output's — response_format or parameters.grammar — when the request has one: the constraint is what
        vLLM checks there)."""
        s = seq.params.structured
        field_name = getattr(e, "parameter", None) or (s.field if s else None)
        code = ("invalid_response_format" if field_name == "response_format"
                else "invalid_grammar" if field_name == "parameters.grammar" else "invalid_body")
        return bad_request(f"`{field_name}`: {e}" if field_name else f"vLLM refused the request: {e}", code)

    def _record(self, seq: VLLMSequence, tok: int, entries: dict) -> None:
        chosen = entries.get(tok)
        seq.token_logprobs.append(float(chosen.logprob) if chosen is not None else float("nan"))
        n = seq.params.logprobs or 0
        top = sorted(((i, lp) for i, lp in entries.items() if lp.rank is not None and lp.rank <= n),
                     key=lambda x: x[1].rank)
        seq.top_logprobs.append([(i, float(lp.logprob)) for i, lp in top[:n]])

    def _prompt_logprobs(self, seq: VLLMSequence, plps) -> list[tuple[float, list]]:
        n = seq.params.prompt_logprobs or 0
        out = []
        for k in range(1, len(seq.prompt)):
            entries = plps[k] or {}
            chosen = entries.get(seq.prompt[k])
            top = sorted(((i, lp) for i, lp in entries.items() if lp.rank is not None and lp.rank <= n),
                         key=lambda x: x[1].rank)
            out.append((float(chosen.logprob) if chosen else float("nan"),
                        [(i, float(lp.logprob)) for i, lp in top[:n]]))
        return out

    def _finished(self, work: Work) -> None:
        self._tasks.pop(id(work), None)
        if work.cancelled and work.steps == 0 and self.metrics is not None:
            self.metrics.cancelled_work("queued", work)
        if self.metrics is not None and work.payload.generated:
            self.metrics.tokens.labels(work.tenant).inc(len(work.payload.generated))
        remove = None
        with self._lock:
            self._inflight -= 1
            left = self._load.get(work.tenant, 0) - 1
            if left > 0:
                self._load[work.tenant] = left
            else:
                self._load.pop(work.tenant, None)
            if work.key is not None:
                n = self._running_by_key.get(work.key, 0) - 1
                if n > 0:
                    self._running_by_key[work.key] = n
                else:
                    self._running_by_key.pop(work.key, None)
                    if work.key in self._dropped:
                        self._dropped.discard(work.key)
                        remove = work.key
        if remove is not None:
            self._remove(remove)

    # --- adapters -------------------------------------------------------------------------------------
    def bind(self, manager) -> None:
        self.manager = manager
        manager.check = self._check

    def _check(self, adapter) -> None:
        """Refuse at registration what vLLM would refuse at its first request: a rank above maxRank."""
        from lorafleet.runtime.peft_format import AdapterFormatError

        if adapter.max_rank > self.settings.max_rank:
            raise AdapterFormatError(f"rank {adapter.max_rank} is above the pool's maxRank {self.settings.max_rank}",
                                     "rank")

    def adapter_event(self, kind: str, entry) -> None:
        if kind == "loaded":
            lora = self._lora(entry)

            async def add():
                try:
                    await self.llm.add_lora(lora)
                    self._added.add(entry.key)
                    if entry.pinned:
                        await self.llm.pin_lora(entry.key)
                except Exception:
                    log.exception("vLLM could not load adapter %s", entry.served)

            asyncio.run_coroutine_threadsafe(add(), self.loop)
        elif kind == "unloaded":
            with self._lock:
                if self._running_by_key.get(entry.key):
                    self._dropped.add(entry.key)  # removed when its last running request ends
                    return
            self._remove(entry.key)

    def _remove(self, key: int) -> None:
        async def remove():
            try:
                await self.llm.remove_lora(key)
            except Exception:
                log.exception("vLLM could not remove adapter id %d", key)
            self._added.discard(key)

        asyncio.run_coroutine_threadsafe(remove(), self.loop)

    def loras(self) -> set[int]:
        """The adapter ids vLLM holds now (its host cache and device slots)."""
        return asyncio.run_coroutine_threadsafe(self.llm.list_loras(), self.loop).result(timeout=60)

    # --- capacity and lifecycle -------------------------------------------------------------------------
    def capacity(self) -> dict[str, int]:
        s = self.settings
        with self._lock:
            inflight = self._inflight
        return {"device_slots": s.device_slots, "queued": max(0, inflight - s.max_batch_size),
                "max_batch_size": s.max_batch_size, "inflight": inflight}

    def start(self) -> None:
        pass

    def close(self) -> None:
        async def shutdown():
            self.llm.shutdown()  # on the loop that runs its output handler

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=60)
        except Exception:
            log.exception("vLLM shutdown failed")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

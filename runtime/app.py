"""The runtime process: public API (OpenAI, TGI, classification, health, metrics) and the admin API
(127.0.0.1 only) around one model worker. ``Runtime`` ties engine, tiers, scheduler and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafleet.contracts.runtime_api import AdapterLoadRequest, AdapterState, SyncState
from lorafleet.runtime.metrics import RuntimeMetrics
from lorafleet.runtime.settings import RuntimeSettings
from lorafleet.runtime.tiers import AdapterEntry, AdapterManager, AdapterUnavailable, ModelNotFound
from lorafleet.runtime.worker import ModelWorker, Overloaded, Scheduler, Work

log = logging.getLogger("lorafleet.runtime")

# Used when the tokenizer has no chat template of its own (documented in docs/runtime.md).
FALLBACK_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_CHAT_PROMPT = "<|assistant|>\n"


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def _error(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


def detect_task(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "config.json").read_text())
    archs = cfg.get("architectures") or []
    return "text-generation" if any(a.endswith("ForCausalLM") for a in archs) else "sequence-classification"


class Runtime:
    """One runtime: loads the base model (in the background), owns the worker, serves both apps."""

    def __init__(self, settings: RuntimeSettings):
        self.settings = settings
        self.instance = uuid.uuid4().hex
        self.metrics = RuntimeMetrics()
        self.scheduler = Scheduler(settings.max_queue, settings.per_tenant_max_inflight)
        self.engine = None
        self.manager: AdapterManager | None = None
        self.worker: ModelWorker | None = None
        self.task = settings.task
        self.base_name = settings.served_model_name or Path(settings.model_dir).name or "base"
        self.model_error: str | None = None
        self.sync: SyncState | None = None
        self.require_sync = True  # lorafleet serve has no sidecar: it marks itself synced
        # Readiness waits for the first complete preload only: an adapter added later must not take a
        # serving pod out of its Service (during a rollout the old version keeps answering).
        self.preloaded = False
        self.loaded = threading.Event()
        # The commands set this: the process is the runtime's alone (not a test process holding many).
        self.freeze_gc = False

    # --- lifecycle -------------------------------------------------------------------------------
    def load(self, wait_s: float = 0.0) -> None:
        """Load the base model (blocking). With ``wait_s`` waits for the directory to appear."""
        from lorafleet.runtime.engines import ClassificationEngine, GenerationEngine

        s = self.settings
        model_dir = Path(s.model_dir)
        deadline = time.monotonic() + wait_s
        next_log = 0.0
        while not (model_dir / "config.json").is_file():
            if time.monotonic() >= deadline:
                raise FileNotFoundError(f"model directory {model_dir} has no config.json; set --model / "
                                        "LORAFLEET_MODEL_DIR to a transformers model directory")
            if time.monotonic() >= next_log:
                log.info("waiting for the base model at %s (the sidecar downloads it)", model_dir)
                next_log = time.monotonic() + 10
            time.sleep(0.5)
        self.task = s.task or detect_task(model_dir)
        t0 = time.monotonic()
        if self.task == "text-generation":
            engine = GenerationEngine.from_dir(model_dir, dtype=s.dtype, device=s.device, device_slots=s.device_slots,
                                               max_rank=s.max_rank, max_seqs=s.max_batch_size)
        else:
            engine = ClassificationEngine.from_dir(model_dir, dtype=s.dtype, device=s.device,
                                                   device_slots=s.device_slots, max_rank=s.max_rank)
        manager = AdapterManager(self.task, s.host_adapters, s.cache_dir or None, engine.dtype,
                                 on_event=self._adapter_event)
        engine.bind(manager)
        self.engine, self.manager = engine, manager
        if self.freeze_gc:
            # The model, tokenizer and imported modules are ~430,000 Python objects that live as long as
            # the process. Every full collection walked them all: 165 ms with MiniLM, with the worker
            # and the event loop stalled meanwhile. Frozen, a full collection walks what came later.
            gc.collect()
            gc.freeze()
        self.worker = ModelWorker(engine, self.scheduler, s.max_batch_size, s.max_batch_delay_ms, self.metrics)
        self.worker.start()
        self.metrics.bind(self)
        self.loaded.set()
        log.info("base model %s loaded (%s, %s) in %.1fs", model_dir, self.task, s.dtype, time.monotonic() - t0)

    def load_in_background(self, wait_s: float = 0.0) -> threading.Thread:
        def run():
            try:
                self.load(wait_s)
            except Exception as e:
                self.model_error = str(e)
                log.exception("loading the base model failed")

        t = threading.Thread(target=run, name="lorafleet-model-loader", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self.scheduler.close()
        if self.worker is not None:
            self.worker.join(timeout=10)

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
        if kind == "unloaded":
            # Slots are the worker's; in-flight batches keep theirs until they finish.
            self.scheduler.post(lambda: self.engine.slots.drop(entry.key))
        elif kind == "loaded" and entry.pinned:
            def pin():
                try:
                    self.engine.acquire(entry)
                    self.engine.release(entry)
                except Exception:
                    log.exception("pinning %s failed", entry.served)
            self.scheduler.post(pin)

    # --- requests --------------------------------------------------------------------------------
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
        if model == self.base_name:
            return None
        try:
            return self.manager.resolve(model)
        except ModelNotFound as e:
            raise ApiError(404, str(e), "invalid_request_error", "model_not_found") from None
        except AdapterUnavailable as e:
            raise ApiError(503, str(e), "service_unavailable", "adapter_unavailable", {"Retry-After": "30"}) from None

    def submit(self, entry: AdapterEntry | None, payloads: list[Any]) -> list[Work]:
        loop = asyncio.get_running_loop()
        tenant = entry.tenant if entry is not None else "_base"
        works = [Work(tenant, entry, p, loop, asyncio.Queue()) for p in payloads]
        try:
            self.scheduler.submit(works)
        except Overloaded as e:
            raise ApiError(429, str(e), "rate_limit_exceeded", e.code, {"Retry-After": str(e.retry_after)}) from None
        return works


# --- request bodies ----------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Sampling(_Body):
    """The OpenAI sampling fields both completion endpoints take, with the same bounds."""
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)


class ChatMessage(_Body):
    role: str
    content: str | list[dict] | None = ""


class ChatRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class TGIParameters(_Body):
    adapter_id: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    do_sample: bool | None = False
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    details: bool | None = False
    return_full_text: bool | None = False


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False


class ClassifyRequest(_Body):
    model: str
    input: str | list[str] = Field(min_length=1)


# --- generation plumbing -----------------------------------------------------------------------------
class _Generation:
    """Turns the worker's token events into text, applying stop strings and incremental decoding."""

    def __init__(self, rt: Runtime, work: Work, stops: list[str]):
        self.rt, self.work, self.stops = rt, work, [s for s in stops if s]
        self.tok = rt.engine.tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.finish: str | None = None

    async def deltas(self):
        """Yields (token_id, new_text) until the sequence ends; sets ``finish``."""
        tok = self.tok
        hold = max((len(s) for s in self.stops), default=1) - 1
        try:
            while True:
                kind, value = await self.work.events.get()
                if kind == "error":
                    raise ApiError(500, f"generation failed: {value}", "server_error", "internal_error")
                if kind == "done":
                    self.finish = value
                    # Bytes held back as half a character are final now: the decoder's output stands.
                    self.text = tok.decode(self.ids, skip_special_tokens=True)
                    for s in self.stops:
                        at = self.text.find(s)
                        if at >= 0:
                            self.text, self.finish = self.text[:at], "stop"
                    if self.sent < len(self.text):
                        yield None, self.text[self.sent:]
                        self.sent = len(self.text)
                    return
                self.ids.append(value)
                text = tok.decode(self.ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                    continue
                self.text = text
                for s in self.stops:
                    at = text.find(s)
                    if at >= 0:
                        self.text = text[:at]
                        self.finish = "stop"
                        self.work.cancelled = True
                        if self.sent < len(self.text):
                            yield value, self.text[self.sent:]
                        self.sent = len(self.text)
                        return
                upto = len(text) - hold if self.stops else len(text)
                if upto > self.sent:
                    yield value, text[self.sent:upto]
                    self.sent = upto
                elif not self.stops:
                    yield value, ""
        finally:
            if self.finish is None:
                self.work.cancelled = True  # the client went away: free the row and slot
            else:
                self.rt.metrics.tokens.labels(self.work.tenant).inc(len(self.work.payload.generated))


def _make_sequence(rt: Runtime, prompt: str, max_new: int | None, temperature: float | None, top_p: float | None,
                   seed: int | None):
    from lorafleet.runtime.engines import Sequence

    engine = rt.engine
    ids = engine.tokenizer(prompt)["input_ids"]
    if not ids:
        raise ApiError(400, "the prompt is empty", "invalid_request_error", "empty_prompt")
    limit = engine.max_input_tokens()
    max_new = max_new or min(rt.settings.max_new_tokens, max(1, limit - len(ids)))
    if len(ids) + max_new > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                       f"tokens and max_tokens is {max_new}. Shorten the prompt or lower max_tokens.",
                       "invalid_request_error", "context_length_exceeded")
    return Sequence(prompt=ids, max_new_tokens=max_new, temperature=temperature or 0.0,
                    top_p=top_p if top_p is not None else 1.0, seed=seed)


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    msgs = []
    for m in messages:
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        msgs.append({"role": m.role, "content": content or ""})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(FALLBACK_CHAT_TEMPLATE.format(**m) for m in msgs) + FALLBACK_CHAT_PROMPT


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _tgi_finish(reason: str | None) -> str:
    return {"length": "length", "stop": "eos_token"}.get(reason or "", "stop_sequence")


# --- apps ------------------------------------------------------------------------------------------------
def _install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return _error(e.status, e.message, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors())
        return _error(422, f"invalid request body: {problems}", "invalid_request_error", "invalid_body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error", "not_found" if e.status_code == 404
                      else "http_error")


def public_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="lorafleet runtime", docs_url=None, redoc_url=None)
    _install_errors(app)

    @app.middleware("http")
    async def count(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        tenant = request.scope.get("lorafleet_tenant", "")
        if request.url.path not in ("/metrics", "/healthz", "/readyz"):
            rt.metrics.requests.labels(tenant, request.url.path, str(response.status_code)).inc()
            if tenant:
                rt.metrics.latency.labels(tenant, request.url.path).observe(time.perf_counter() - t0)
        return response

    def tag(request: Request, entry: AdapterEntry | None) -> None:
        request.scope["lorafleet_tenant"] = entry.tenant if entry else "_base"

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "instance": rt.instance}

    @app.get("/readyz")
    async def readyz():
        ok, why = rt.ready()
        if not ok:
            return _error(503, f"not ready: {why}", "service_unavailable", "not_ready")
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(rt.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": rt.base_name, "object": "model", "created": created, "owned_by": "lorafleet",
                 "task": rt.task}]
        if rt.manager is not None:
            by_name: dict[str, list[AdapterEntry]] = {}
            for e in rt.manager.all():
                by_name.setdefault(e.name, []).append(e)
            for name, entries in sorted(by_name.items()):
                data.append({"id": name, "object": "model", "created": int(min(e.loaded_at for e in entries)),
                             "owned_by": entries[0].tenant, "parent": rt.base_name, "task": rt.task,
                             "versions": [{"version": e.version, "weight": e.weight,
                                           "state": rt.manager.state(e)} for e in entries]})
        return {"object": "list", "data": data}

    async def _generate(request: Request, model: str, prompt: str, max_new, temperature, top_p, seed, stop):
        rt.need_task("text-generation")
        entry = rt.resolve(model)
        tag(request, entry)
        seq = _make_sequence(rt, prompt, max_new, temperature, top_p, seed)
        (work,) = rt.submit(entry, [seq])
        return entry, seq, _Generation(rt, work, _stops(stop))

    def _usage(seq) -> dict:
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.generated),
                "total_tokens": len(seq.prompt) + len(seq.generated)}

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "send one prompt per request (prompt lists of length 1 are accepted)",
                               "invalid_request_error", "unsupported_prompt_list")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        entry, seq, gen = await _generate(request, body.model, prompt, body.max_tokens, body.temperature,
                                          body.top_p, body.seed, body.stop)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        served = entry.served if entry else rt.base_name
        if body.stream:
            async def stream():
                async for _, delta in gen.deltas():
                    if delta:
                        yield _sse({"id": rid, "object": "text_completion", "created": created, "model": served,
                                    "choices": [{"index": 0, "text": delta, "logprobs": None,
                                                 "finish_reason": None}]})
                yield _sse({"id": rid, "object": "text_completion", "created": created, "model": served,
                            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": gen.finish}]})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        async for _ in gen.deltas():
            pass
        return {"id": rid, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish}],
                "usage": _usage(seq)}

    @app.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        rt.need_task("text-generation")
        prompt = _chat_prompt(rt.engine.tokenizer, body.messages)
        entry, seq, gen = await _generate(request, body.model, prompt, body.max_completion_tokens or body.max_tokens,
                                          body.temperature, body.top_p, body.seed, body.stop)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        served = entry.served if entry else rt.base_name
        if body.stream:
            async def stream():
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served}
                yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}]})
                async for _, delta in gen.deltas():
                    if delta:
                        yield _sse({**base, "choices": [{"index": 0, "delta": {"content": delta},
                                                         "finish_reason": None}]})
                yield _sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": gen.finish}]})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        async for _ in gen.deltas():
            pass
        return {"id": rid, "object": "chat.completion", "created": created, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "finish_reason": gen.finish}], "usage": _usage(seq)}

    async def _tgi(request: Request, body: TGIRequest, stream: bool):
        p = body.parameters
        temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
        entry, seq, gen = await _generate(request, p.adapter_id or rt.base_name, body.inputs, p.max_new_tokens or 20,
                                          temperature, p.top_p, p.seed, p.stop)
        if stream:
            async def events():
                tokens = 0
                async for tok_id, delta in gen.deltas():
                    if tok_id is None and not delta:
                        continue
                    tokens += 1
                    yield _sse({"index": tokens, "token": {"id": tok_id if tok_id is not None else -1,
                                                           "text": delta, "logprob": 0.0, "special": False},
                                "generated_text": None, "details": None, "top_tokens": None})
                text = (body.inputs + gen.text) if p.return_full_text else gen.text
                yield _sse({"index": tokens + 1, "token": {"id": -1, "text": "", "logprob": 0.0, "special": True},
                            "generated_text": text, "top_tokens": None,
                            "details": {"finish_reason": _tgi_finish(gen.finish),
                                        "generated_tokens": len(seq.generated), "seed": p.seed}})
            return StreamingResponse(events(), media_type="text/event-stream")
        async for _ in gen.deltas():
            pass
        out: dict[str, Any] = {"generated_text": (body.inputs + gen.text) if p.return_full_text else gen.text}
        if p.details:
            out["details"] = {"finish_reason": _tgi_finish(gen.finish), "generated_tokens": len(seq.generated),
                              "seed": p.seed, "prefill": [], "tokens": [
                                  {"id": t, "text": rt.engine.tokenizer.decode([t]), "logprob": 0.0, "special": False}
                                  for t in seq.generated]}
        return out

    @app.post("/generate")
    async def generate(request: Request, body: TGIRequest):
        return await _tgi(request, body, stream=False)

    @app.post("/generate_stream")
    async def generate_stream(request: Request, body: TGIRequest):
        return await _tgi(request, body, stream=True)

    @app.post("/")
    async def tgi_root(request: Request, body: TGIRequest):
        # TGI's compatibility route (what huggingface_hub's InferenceClient posts to).
        return await _tgi(request, body, stream=body.stream)

    @app.post("/v1/classify")
    async def classify(request: Request, body: ClassifyRequest):
        rt.need_task("sequence-classification")
        entry = rt.resolve(body.model)
        tag(request, entry)
        if entry is None:
            raise ApiError(400, f"the base model {rt.base_name} has no classifier head; name a tenant's adapter",
                           "invalid_request_error", "no_classifier_head")
        texts = [body.input] if isinstance(body.input, str) else body.input
        limit = rt.engine.max_input_tokens()
        for i, t in enumerate(texts):
            n = rt.engine.count_tokens(t)
            if n > limit:
                raise ApiError(400, f"input[{i}] has {n} tokens; this model accepts at most {limit}. Shorten it.",
                               "invalid_request_error", "input_too_long")
        works = rt.submit(entry, texts)
        labels = entry.labels or []
        data = []
        for i, w in enumerate(works):
            try:
                kind, value = await w.events.get()
            except asyncio.CancelledError:
                for x in works:
                    x.cancelled = True
                raise
            if kind == "error":
                raise ApiError(500, f"classification failed: {value}", "server_error", "internal_error")
            scores = [{"label": labels[j], "score": p} for j, p in enumerate(value)]
            top = max(scores, key=lambda s: s["score"])
            data.append({"index": i, "label": top["label"], "score": top["score"], "labels": scores})
        return {"object": "list", "model": entry.served, "data": data}

    return app


def admin_app(rt: Runtime) -> FastAPI:
    app = FastAPI(title="lorafleet runtime admin", docs_url=None, redoc_url=None)
    _install_errors(app)

    def manager() -> AdapterManager:
        if rt.manager is None:
            raise ApiError(503, rt.model_error or "the base model is still loading; retry shortly",
                           "service_unavailable", "model_loading", {"Retry-After": "5"})
        return rt.manager

    def state(e: AdapterEntry) -> dict:
        m = manager()
        return AdapterState(name=e.name, version=e.version, sha256=e.sha256, tenant=e.tenant, weight=e.weight,
                            pinned=e.pinned, state=m.state(e), error=e.error).model_dump(by_alias=True)

    @app.put("/admin/adapters/{name}/{version}")
    async def put_adapter(name: str, version: str, body: AdapterLoadRequest):
        if name == rt.base_name:
            # Requests naming it would reach the base model: the adapter could never be used.
            raise ApiError(409, f"adapter name {name!r} is the base model's served name; give the adapter "
                                f"another name", "invalid_request_error", "name_conflict")
        m = manager()
        entry, changed = await asyncio.to_thread(m.register, name, version, body)
        if entry.error:
            return JSONResponse({"error": {"message": f"adapter {entry.served}: {entry.error}",
                                           "type": "invalid_request_error", "code": "adapter_load_failed"},
                                 "adapter": state(entry)}, 422)
        return state(entry) | {"changed": changed}

    @app.delete("/admin/adapters/{name}/{version}")
    async def delete_adapter(name: str, version: str):
        entry = manager().unregister(name, version)
        if entry is None:
            raise ApiError(404, f"adapter {name}@{version} is not registered", "invalid_request_error",
                           "model_not_found")
        return {"name": name, "version": version, "deleted": True}

    @app.get("/admin/adapters")
    async def list_adapters():
        if rt.manager is None:
            return {"adapters": [], "instance": rt.instance}
        return rt.manager.listing(rt.instance).model_dump(by_alias=True)

    @app.put("/admin/sync")
    async def put_sync(body: SyncState):
        rt.sync = body
        ok, why = rt.ready()
        return {"ready": ok, "reason": why, "instance": rt.instance}

    return app


# --- serving ---------------------------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _QuietServer:
    """A uvicorn server that leaves signal handling to the public one."""

    def __new__(cls, config):
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        return Server(config)


def exit_quietly_after_signals() -> None:
    """uvicorn re-raises the signal that stopped it once shutdown is complete; a no-op handler lets the
    command return 0 after a graceful SIGTERM (what Kubernetes sends) instead of dying by the signal."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)


async def serve_async(rt: Runtime, public_sock: socket.socket, admin_sock: socket.socket,
                      stop: asyncio.Event | None = None, log_level: str = "info", on_started=None) -> None:
    """Run the public and admin servers until the public one exits (signal) or ``stop`` is set."""
    import uvicorn

    pub_cfg = uvicorn.Config(public_app(rt), log_level=log_level, timeout_graceful_shutdown=5)
    adm_cfg = uvicorn.Config(admin_app(rt), log_level=log_level, timeout_graceful_shutdown=5)
    pub = uvicorn.Server(pub_cfg) if stop is None else _QuietServer(pub_cfg)
    adm = _QuietServer(adm_cfg)
    adm_task = asyncio.create_task(adm.serve(sockets=[admin_sock]))
    pub_task = asyncio.create_task(pub.serve(sockets=[public_sock]))
    if on_started is not None:
        while not (pub.started and adm.started):
            await asyncio.sleep(0.01)
        on_started()
    if stop is not None:
        await stop.wait()
        pub.should_exit = True
    await pub_task
    adm.should_exit = True
    await adm_task


def serve_until_signalled(rt: Runtime, public_sock: socket.socket, admin_sock: socket.socket,
                          log_level: str = "info") -> int:
    """The commands' main loop: serve both APIs until SIGTERM/SIGINT, then close the runtime; 0."""
    exit_quietly_after_signals()
    try:
        asyncio.run(serve_async(rt, public_sock, admin_sock, log_level=log_level))
    finally:
        rt.close()
    return 0


class RuntimeServer:
    """The runtime on loopback ports in a background thread (tests, benchmarks, ``lorafleet serve``)."""

    def __init__(self, rt: Runtime, host: str = "127.0.0.1", port: int = 0, admin_port: int = 0):
        self.rt = rt
        self.public_sock = bind(host, port)
        self.admin_sock = bind("127.0.0.1", admin_port)
        self.url = f"http://{host}:{self.public_sock.getsockname()[1]}"
        self.admin_url = f"http://127.0.0.1:{self.admin_sock.getsockname()[1]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorafleet-runtime-server", daemon=True)

    def _run(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_async(self.rt, self.public_sock, self.admin_sock, self._stop, "warning", self._started.set)

        asyncio.run(main())

    def start(self) -> "RuntimeServer":
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the runtime server did not start within 30 s")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=15)
        self.rt.close()
        self.public_sock.close()
        self.admin_sock.close()

    def __enter__(self) -> "RuntimeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

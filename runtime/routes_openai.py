"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from lorafleet.runtime.engine_api import SamplingParams
from lorafleet.runtime.generation import (TextStream, build_sequence, chat_prompt_ids,
                                          openai_params, stop_strings)
from lorafleet.runtime.lifecycle import Runtime, fallback_of
from lorafleet.runtime.protocol import ApiError, ChatRequest, CompletionRequest
from lorafleet.runtime.routes_common import CancelOnClose, unless_disconnected
from lorafleet.runtime.tiers import AdapterEntry


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def with_fallback(request: Request, body: dict) -> dict:
    """``body`` with the ``fallback`` field when the base model answered for an adapter."""
    fb = fallback_of(request)
    return {**body, "model": fb["model"], "fallback": fb} if fb else body


def usage(seq, generated: int) -> dict:
    """Token counts; ``generated`` is the tokens the answer was made of (the engine may have run one
    step further after a stop string, which nobody receives)."""
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": generated,
            "total_tokens": len(seq.prompt) + generated}


async def start_generation(rt: Runtime, request: Request, model: str, prompt_ids_of, params_of, stop,
                           include_stop: bool = False, skip_special_tokens: bool = True, tgi_stops: bool = False,
                           incremental: bool = True):
    """Resolve the adapter, shape the sequence and submit it: (entry, sequence, text stream).
    ``params_of(tokenizer)`` gives the request's ``SamplingParams``; ``incremental``: the text is read
    as it grows (a stream), not only at its end."""
    rt.need_task("text-generation")
    entry = rt.resolve_request(request, model)
    tok = rt.engine.tokenizer
    params: SamplingParams = params_of(tok)
    seq = build_sequence(rt.engine, prompt_ids_of(tok), params, rt.settings.max_new_tokens)
    (work,) = rt.submit(entry, [seq], tenant=request.scope["lorafleet_tenant"], fallback=True,
                         request=request)
    return entry, seq, TextStream(rt.engine, work, stop_strings(stop), include_stop=include_stop,
                                  skip_special_tokens=skip_special_tokens, tgi_stops=tgi_stops,
                                  incremental=incremental)


async def wait_started(request: Request, rt: Runtime, gen: TextStream) -> None:
    """Before a stream's headers: wait for the engine to take the request (429 if it is shed instead)."""
    await unless_disconnected(request, gen.started(), lambda: rt.engine.cancel(gen.work))
    rt.settle(request, gen.work)


async def drain(request: Request, rt: Runtime, gen: TextStream) -> None:
    async def consume():
        async for _ in gen.deltas():
            pass

    await unless_disconnected(request, consume(), lambda: rt.engine.cancel(gen.work))
    rt.settle(request, gen.work)


class _Logprobs:
    """OpenAI's logprobs objects from the engine's per-token records, one slice of tokens at a time."""

    def __init__(self, tokenizer, seq):
        self.tok, self.seq = tokenizer, seq
        self.done = 0  # tokens already reported
        self.offset = 0

    def _text(self, i: int) -> str:
        return self.tok.decode([i])

    def _take(self, upto: int) -> range:
        upto = min(len(self.seq.token_logprobs), upto)
        r = range(self.done, upto)
        self.done = max(self.done, upto)
        return r

    def completion(self, upto: int) -> dict:
        s, out = self.seq, {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for j in self._take(upto):
            t = self._text(s.generated[j])
            out["tokens"].append(t)
            out["token_logprobs"].append(s.token_logprobs[j])
            out["top_logprobs"].append({self._text(i): lp for i, lp in s.top_logprobs[j]})
            out["text_offset"].append(self.offset)
            self.offset += len(t)
        return out

    def chat(self, upto: int) -> dict:
        s, content = self.seq, []
        for j in self._take(upto):
            t = self._text(s.generated[j])
            content.append({"token": t, "logprob": s.token_logprobs[j], "bytes": list(t.encode()),
                            "top_logprobs": [{"token": self._text(i), "logprob": lp,
                                              "bytes": list(self._text(i).encode())} for i, lp in s.top_logprobs[j]]})
        return {"content": content}


async def completions(rt: Runtime, request: Request, body: CompletionRequest):
    """One validated ``/v1/completions`` request, answered (``ApiError`` for the documented errors). The
    route and the admission gate's direct path (admission.py) both answer with this."""
    body.unsupported()
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "send one prompt per request (prompt lists of length 1 are accepted)",
                           "invalid_request_error", "unsupported_prompt_list")
        prompt = body.prompt[0]
    else:
        prompt = body.prompt
    entry, seq, gen = await start_generation(
        rt, request, body.model, lambda tok: rt.engine.encode(prompt),
        lambda tok: openai_params(body, body.max_tokens, body.logprobs, tok), body.stop,
        bool(body.include_stop_str_in_output), body.skip_special_tokens is not False,
        incremental=bool(body.stream))
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    served = rt.answered_as(entry)
    lps = _Logprobs(rt.engine.tokenizer, seq) if body.logprobs is not None else None
    head = prompt if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def stream():
            base = with_fallback(request, {"id": rid, "object": "text_completion", "created": created,
                                           "model": served})
            if head:
                yield sse({**base, "choices": [{"index": 0, "text": head, "logprobs": None,
                                                "finish_reason": None}]})
            async for _, delta in gen.deltas():
                if delta:
                    yield sse({**base, "choices": [{"index": 0, "text": delta, "finish_reason": None,
                                                    "logprobs": lps.completion(gen.received) if lps else None}]})
            yield sse({**base, "choices": [{"index": 0, "text": "", "finish_reason": gen.openai_finish,
                                            "logprobs": lps.completion(gen.received) if lps else None}]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(seq, gen.received)})
            yield "data: [DONE]\n\n"
        await wait_started(request, rt, gen)
        return CancelOnClose(stream(), gen.abandon, media_type="text/event-stream")
    await drain(request, rt, gen)
    return JSONResponse(with_fallback(request, {
        "id": rid, "object": "text_completion", "created": created, "model": served,
        "choices": [{"index": 0, "text": head + gen.text, "finish_reason": gen.openai_finish,
                     "logprobs": lps.completion(gen.received) if lps else None}],
        "usage": usage(seq, gen.received)}))


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": rt.base_name, "object": "model", "created": created, "owned_by": "lorafleet",
                 "task": rt.task}]
        if rt.merged is not None:
            # The base weights are the adapter's: the adapter is listed (and held, "merged"), the plain
            # base model is not served.
            name, version = rt.merged.split("@", 1)
            data = [{"id": name, "object": "model", "created": created, "task": rt.task, "merged": True,
                     "owned_by": rt.settings.merged_adapter_tenant or name, "parent": rt.base_name,
                     "versions": [{"version": version, "weight": 100, "state": "merged"}]}]
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

    @r.post("/v1/completions")
    async def completions_route(request: Request, body: CompletionRequest):
        return await completions(rt, request, body)

    @r.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        rt.need_task("text-generation")
        body.unsupported()
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        entry, seq, gen = await start_generation(
            rt, request, body.model, lambda tok: chat_prompt_ids(tok, body.messages),
            lambda tok: openai_params(body, body.max_completion_tokens or body.max_tokens, logprobs, tok), body.stop,
            bool(body.include_stop_str_in_output), body.skip_special_tokens is not False,
            incremental=bool(body.stream))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        served = rt.answered_as(entry)
        lps = _Logprobs(rt.engine.tokenizer, seq) if logprobs is not None else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def stream():
                base = with_fallback(request, {"id": rid, "object": "chat.completion.chunk", "created": created,
                                               "model": served})
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
                async for _, delta in gen.deltas():
                    if delta:
                        yield sse({**base, "choices": [{"index": 0, "delta": {"content": delta},
                                                        "logprobs": lps.chat(gen.received) if lps else None,
                                                        "finish_reason": None}]})
                yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": gen.openai_finish,
                                                "logprobs": lps.chat(gen.received) if lps else None}]})
                if include_usage:
                    yield sse({**base, "choices": [], "usage": usage(seq, gen.received)})
                yield "data: [DONE]\n\n"
            await wait_started(request, rt, gen)
            return CancelOnClose(stream(), gen.abandon, media_type="text/event-stream")
        await drain(request, rt, gen)
        return JSONResponse(with_fallback(request, {
            "id": rid, "object": "chat.completion", "created": created, "model": served,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                         "logprobs": lps.chat(gen.received) if lps else None, "finish_reason": gen.openai_finish}],
            "usage": usage(seq, gen.received)}))

    return r

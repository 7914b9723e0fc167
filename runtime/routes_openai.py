"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``."""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lorafleet.runtime.generation import (TextStream, build_sequence, chat_prompt_ids, completion_prompt_ids,
                                          stop_strings)
from lorafleet.runtime.lifecycle import Runtime
from lorafleet.runtime.protocol import ApiError, ChatRequest, CompletionRequest
from lorafleet.runtime.routes_common import tag, unless_disconnected
from lorafleet.runtime.tiers import AdapterEntry


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(seq) -> dict:
    return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.generated),
            "total_tokens": len(seq.prompt) + len(seq.generated)}


async def start_generation(rt: Runtime, request: Request, model: str, prompt_ids_of, max_new, temperature, top_p,
                           seed, stop):
    """Resolve the adapter, shape the sequence and submit it: (entry, sequence, text stream)."""
    rt.need_task("text-generation")
    entry = rt.resolve(model)
    tag(request, entry)
    seq = build_sequence(rt.engine, prompt_ids_of(rt.engine.tokenizer), max_new, rt.settings.max_new_tokens,
                         temperature, top_p, seed)
    (work,) = rt.submit(entry, [seq])

    def count(stream: TextStream) -> None:
        rt.metrics.tokens.labels(work.tenant).inc(len(seq.generated))

    return entry, seq, TextStream(rt.engine, work, stop_strings(stop), on_done=count)


async def drain(request: Request, rt: Runtime, gen: TextStream) -> None:
    async def consume():
        async for _ in gen.deltas():
            pass

    await unless_disconnected(request, consume(), lambda: rt.engine.cancel(gen.work))


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
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

    @r.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "send one prompt per request (prompt lists of length 1 are accepted)",
                               "invalid_request_error", "unsupported_prompt_list")
            prompt = body.prompt[0]
        else:
            prompt = body.prompt
        entry, seq, gen = await start_generation(rt, request, body.model,
                                                 lambda tok: completion_prompt_ids(tok, prompt), body.max_tokens,
                                                 body.temperature, body.top_p, body.seed, body.stop)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        served = entry.served if entry else rt.base_name
        if body.stream:
            async def stream():
                async for _, delta in gen.deltas():
                    if delta:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": served,
                                   "choices": [{"index": 0, "text": delta, "logprobs": None,
                                                "finish_reason": None}]})
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": served,
                           "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": gen.finish}]})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        await drain(request, rt, gen)
        return {"id": rid, "object": "text_completion", "created": created, "model": served,
                "choices": [{"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish}],
                "usage": usage(seq)}

    @r.post("/v1/chat/completions")
    async def chat(request: Request, body: ChatRequest):
        rt.need_task("text-generation")
        entry, seq, gen = await start_generation(rt, request, body.model,
                                                 lambda tok: chat_prompt_ids(tok, body.messages),
                                                 body.max_completion_tokens or body.max_tokens,
                                                 body.temperature, body.top_p, body.seed, body.stop)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        served = entry.served if entry else rt.base_name
        if body.stream:
            async def stream():
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served}
                yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "finish_reason": None}]})
                async for _, delta in gen.deltas():
                    if delta:
                        yield sse({**base, "choices": [{"index": 0, "delta": {"content": delta},
                                                        "finish_reason": None}]})
                yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": gen.finish}]})
                yield "data: [DONE]\n\n"
            return StreamingResponse(stream(), media_type="text/event-stream")
        await drain(request, rt, gen)
        return {"id": rid, "object": "chat.completion", "created": created, "model": served,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "finish_reason": gen.finish}], "usage": usage(seq)}

    return r

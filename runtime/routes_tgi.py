"""TGI-compatible routes: ``/generate``, ``/generate_stream`` and ``/`` (what huggingface_hub's
InferenceClient posts to), with the adapter in ``parameters.adapter_id``. In a text-to-image pool
``/`` is the hosted image API (routes_images.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from lorafleet.runtime import routes_images
from lorafleet.runtime.generation import completion_prompt_ids
from lorafleet.runtime.lifecycle import Runtime
from lorafleet.runtime.protocol import TGIRequest
from lorafleet.runtime.routes_openai import drain, sse, start_generation


def finish_reason(reason: str | None) -> str:
    return {"length": "length", "stop": "eos_token"}.get(reason or "", "stop_sequence")


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    async def tgi(request: Request, body: TGIRequest, stream: bool):
        p = body.parameters
        temperature = (p.temperature if p.temperature is not None else 1.0) if p.do_sample else 0.0
        entry, seq, gen = await start_generation(rt, request, p.adapter_id or rt.base_name,
                                                 lambda tok: completion_prompt_ids(tok, body.inputs),
                                                 p.max_new_tokens or 20, temperature, p.top_p, p.seed, p.stop)
        if stream:
            async def events():
                tokens = 0
                async for tok_id, delta in gen.deltas():
                    if tok_id is None and not delta:
                        continue
                    tokens += 1
                    yield sse({"index": tokens, "token": {"id": tok_id if tok_id is not None else -1,
                                                          "text": delta, "logprob": 0.0, "special": False},
                               "generated_text": None, "details": None, "top_tokens": None})
                text = (body.inputs + gen.text) if p.return_full_text else gen.text
                yield sse({"index": tokens + 1, "token": {"id": -1, "text": "", "logprob": 0.0, "special": True},
                           "generated_text": text, "top_tokens": None,
                           "details": {"finish_reason": finish_reason(gen.finish),
                                       "generated_tokens": len(seq.generated), "seed": p.seed}})
            return StreamingResponse(events(), media_type="text/event-stream")
        await drain(request, rt, gen)
        out: dict[str, Any] = {"generated_text": (body.inputs + gen.text) if p.return_full_text else gen.text}
        if p.details:
            out["details"] = {"finish_reason": finish_reason(gen.finish), "generated_tokens": len(seq.generated),
                              "seed": p.seed, "prefill": [], "tokens": [
                                  {"id": t, "text": rt.engine.tokenizer.decode([t]), "logprob": 0.0, "special": False}
                                  for t in seq.generated]}
        return out

    @r.post("/generate")
    async def generate(request: Request, body: TGIRequest):
        return await tgi(request, body, stream=False)

    @r.post("/generate_stream")
    async def generate_stream(request: Request, body: TGIRequest):
        return await tgi(request, body, stream=True)

    @r.post("/")
    async def tgi_root(request: Request, body: TGIRequest):
        if rt.task == "text-to-image":  # the hosted image API's shape: same body, the adapter in `lora`
            return await routes_images.hosted(rt, request, body.inputs, body.parameters.model_dump(exclude_unset=True),
                                              None)
        return await tgi(request, body, stream=body.stream)

    return r

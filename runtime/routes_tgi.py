"""TGI-compatible routes: ``/generate``, ``/generate_stream`` and ``/`` (what huggingface_hub's
InferenceClient posts to), with the adapter in ``parameters.adapter_id`` and TGI's semantics for
sampling (``do_sample`` or any warper), logprobs (after processors and warpers), ``details``,
``top_n_tokens`` and ``decoder_input_details`` (the prompt's raw logprobs). In a text-to-image pool
``/`` is the hosted image API (routes_images.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from lorafleet.runtime import routes_images
from lorafleet.runtime.generation import tgi_params
from lorafleet.runtime.lifecycle import Runtime
from lorafleet.runtime.protocol import TGIRequest, bad_request
from lorafleet.runtime.routes_common import CancelOnClose
from lorafleet.runtime.routes_openai import drain, sse, start_generation, wait_started


def finish_reason(reason: str | None) -> str:
    return {"length": "length", "stop": "eos_token"}.get(reason or "", "stop_sequence")  # TGI's names


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    def token(tok, i: int, logprob) -> dict:
        special = i in set(getattr(tok, "all_special_ids", []) or [])
        return {"id": i, "text": tok.decode([i]), "logprob": logprob, "special": special}

    async def tgi(request: Request, body: TGIRequest, stream: bool):
        body.unsupported()
        p = body.parameters
        if stream and p.decoder_input_details:
            raise bad_request("`decoder_input_details` == true is not supported when streaming tokens",
                              "invalid_parameters")
        want_logprobs = bool(stream or p.details)

        def prompt_ids(tok):
            ids = rt.engine.encode(body.inputs)
            return ids[-p.truncate:] if p.truncate else ids  # TGI keeps the input's last `truncate` tokens

        entry, seq, gen = await start_generation(rt, request, p.adapter_id or rt.base_name, prompt_ids,
                                                 lambda tok: tgi_params(p, p.max_new_tokens or 20, want_logprobs),
                                                 p.stop, tgi_stops=True)
        tok = rt.engine.tokenizer
        seed = seq.seed if seq.sample else None

        def top_tokens(j: int) -> list[dict]:
            return [token(tok, i, lp) for i, lp in seq.top_logprobs[j]] if p.top_n_tokens else []

        if stream:
            async def events():
                # As TGI: one event per token; the last token's event also carries generated_text and
                # details (and the decoder's held-back bytes, which belong to no token of their own).
                pending = None
                async for tok_id, delta in gen.deltas():
                    if tok_id is None:
                        if pending is not None:
                            pending["token"]["text"] += delta
                        continue
                    if pending is not None:
                        yield sse(pending)
                    j = gen.received - 1
                    pending = {"index": gen.received, "token": token(tok, tok_id, seq.token_logprobs[j]) | {"text": delta},
                               "generated_text": None, "details": None,
                               "top_tokens": top_tokens(j) if p.top_n_tokens else None}
                text = (body.inputs + gen.text) if p.return_full_text else gen.text
                pending = pending or {"index": 0, "token": {"id": -1, "text": "", "logprob": 0.0, "special": True},
                                      "top_tokens": None}
                pending["generated_text"] = text
                pending["details"] = {"finish_reason": finish_reason(gen.finish), "generated_tokens": gen.received,
                                      "seed": seed}
                yield sse(pending)
            await wait_started(request, rt, gen)
            return CancelOnClose(events(), gen.abandon, media_type="text/event-stream")
        await drain(request, rt, gen)
        out: dict[str, Any] = {"generated_text": (body.inputs + gen.text) if p.return_full_text else gen.text}
        if p.details:
            n = gen.received
            details: dict[str, Any] = {
                "finish_reason": finish_reason(gen.finish), "generated_tokens": n, "seed": seed,
                "prefill": [], "tokens": [token(tok, seq.generated[j], seq.token_logprobs[j]) for j in range(n)]}
            if p.decoder_input_details:
                pre = [{"id": seq.prompt[0], "text": tok.decode([seq.prompt[0]]), "logprob": None}]
                for k, (lp, _) in enumerate(seq.prompt_token_logprobs):
                    i = seq.prompt[k + 1]
                    pre.append({"id": i, "text": tok.decode([i]), "logprob": lp})
                details["prefill"] = pre
            if p.top_n_tokens:
                details["top_tokens"] = [top_tokens(j) for j in range(n)]
            out["details"] = details
        return out

    @r.post("/generate")
    async def generate(request: Request, body: TGIRequest):
        return await tgi(request, body, stream=False)

    @r.post("/generate_stream")
    async def generate_stream(request: Request, body: TGIRequest):
        return await tgi(request, body, stream=True)

    @r.post("/")
    async def tgi_root(request: Request):
        # One path, two APIs: TGI's body (validated as strictly as /generate) or, in a text-to-image pool,
        # the hosted image API's {"inputs", "parameters"} with the adapter in the `lora` header.
        try:
            raw = await request.json()
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}", "invalid_json") from None
        if rt.task == "text-to-image":
            if not isinstance(raw, dict):
                raise bad_request('the body must be an object: {"inputs": ..., "parameters": {...}}', "invalid_body")
            return await routes_images.hosted(rt, request, raw.get("inputs"), raw.get("parameters"), None)
        try:
            body = TGIRequest.model_validate(raw)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) \
                from None
        return await tgi(request, body, stream=body.stream)

    return r

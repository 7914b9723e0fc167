"""The baseline of the seed article, for bench/serve_bench.py: one PEFT model holding every adapter behind an
``asyncio.Lock``, ``set_adapter`` per request, one request at a time, in a small FastAPI/uvicorn server
that speaks enough of OpenAI's ``/v1/completions`` (streamed or not) for the benchmark's load generator.

Usage: python bench/peft_baseline.py --model DIR --adapters NAME=PATH,... --port 8000 [--threads 1]
       [--device cpu --dtype float32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
import time
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402  (module level: FastAPI reads the handlers' annotations)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_app(model_dir: str, adapters: list[tuple[str, str]], device: str, dtype: str):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype]).to(device).eval()
    t0 = time.perf_counter()
    first_name, first_path = adapters[0]
    pm = PeftModel.from_pretrained(base, first_path, adapter_name=first_name)
    for name, path in adapters[1:]:
        pm.load_adapter(path, adapter_name=name)
    pm.eval()
    load_s = time.perf_counter() - t0
    names = {n for n, _ in adapters}
    eos = tok.eos_token_id
    lock = asyncio.Lock()
    app = FastAPI()

    def generate(ids: list[int], max_tokens: int, ignore_eos: bool, emit) -> int:
        """Greedy decoding with a KV cache; ``emit(text delta)`` per token (text ending in half a UTF-8 character
        is held back, as vLLM and the runtime do); returns the tokens generated."""
        out_ids: list[int] = []
        text = ""
        with torch.inference_mode():
            x = torch.tensor([ids], device=device)
            cache = None
            for _ in range(max_tokens):
                out = pm(input_ids=x, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = int(out.logits[0, -1].argmax())
                out_ids.append(nxt)
                now = tok.decode(out_ids, skip_special_tokens=True)
                if not now.endswith("\ufffd") and now.startswith(text):  # half a character waits for the rest
                    emit(now[len(text):])
                    text = now
                if nxt == eos and not ignore_eos:
                    break
                x = torch.tensor([[nxt]], device=device)
            now = tok.decode(out_ids, skip_special_tokens=True)
            emit(now[len(text):] if now.startswith(text) else "")
        return len(out_ids)

    @app.get("/health")
    async def health():
        return {"adapters": len(names), "load_s": round(load_s, 2)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        model = body.get("model")
        if model not in names:
            return JSONResponse({"error": {"message": f"The model '{model}' does not exist", "code": "model_not_found"}},
                                status_code=404)
        ids = tok(body["prompt"])["input_ids"]
        max_tokens = int(body.get("max_tokens") or 16)
        ignore_eos = bool(body.get("ignore_eos"))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            # The article's pattern: the lock is held for the whole generation, the adapter set per request.
            async with lock:
                pm.set_adapter(model)
                done: list[int] = []

                def work():
                    try:
                        done.append(generate(ids, max_tokens, ignore_eos,
                                             lambda d: loop.call_soon_threadsafe(q.put_nowait, ("delta", d))))
                        loop.call_soon_threadsafe(q.put_nowait, ("done", done[0]))
                    except Exception as e:  # noqa: BLE001 - reported to the client
                        loop.call_soon_threadsafe(q.put_nowait, ("error", repr(e)))

                th = threading.Thread(target=work, daemon=True)
                th.start()
                await asyncio.to_thread(th.join)

        task = asyncio.ensure_future(run())

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if body.get("stream"):
            base = {"id": rid, "object": "text_completion", "created": created, "model": model}

            async def stream():
                while True:
                    kind, v = await q.get()
                    if kind == "delta":
                        if v:
                            yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'text': v, 'finish_reason': None}]})}\n\n"
                    elif kind == "done":
                        yield f"data: {json.dumps({**base, 'choices': [{'index': 0, 'text': '', 'finish_reason': 'length'}]})}\n\n"
                        if (body.get("stream_options") or {}).get("include_usage"):
                            yield f"data: {json.dumps({**base, 'choices': [], 'usage': usage(v)})}\n\n"
                        yield "data: [DONE]\n\n"
                        break
                    else:
                        yield f"data: {json.dumps({'error': {'message': v}})}\n\n"
                        break
                await task

            return StreamingResponse(stream(), media_type="text/event-stream")
        text = ""
        while True:
            kind, v = await q.get()
            if kind == "delta":
                text += v
            elif kind == "done":
                await task
                return {**{"id": rid, "object": "text_completion", "created": created, "model": model},
                        "choices": [{"index": 0, "text": text, "finish_reason": "length"}], "usage": usage(v)}
            else:
                return JSONResponse({"error": {"message": v}}, status_code=500)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--adapters", required=True, help="comma-separated name=path (or @FILE: one name=path a line)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = open(args.adapters[1:]).read().replace("\n", ",") if args.adapters.startswith("@") else args.adapters
    adapters = [tuple(e.split("=", 1)) for e in text.split(",") if e.strip()]
    import uvicorn

    app = build_app(args.model, adapters, args.device, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Text-to-image routes: OpenAI ``POST /v1/images/generations`` (base64 images in JSON) and the hosted
inference API's shape, ``POST /`` and ``POST /models/{name}`` with ``{"inputs", "parameters"}`` and the
adapter in the ``lora`` header, answering the image's bytes (PNG, or JPEG when ``Accept`` asks)."""

from __future__ import annotations

import asyncio
import base64
import time

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lorafleet.runtime.engine_api import ImageParams, Overloaded
from lorafleet.runtime.lifecycle import Runtime, fallback_of
from lorafleet.runtime.protocol import ApiError, ImagesRequest, bad_request, too_busy
from lorafleet.runtime.routes_common import unless_disconnected

TASK = "text-to-image"
FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg"}
# The hosted API's parameters this engine honours (diffusers' names); any other is refused by name.
HOSTED_PARAMETERS = {"num_inference_steps": int, "guidance_scale": float, "negative_prompt": str, "height": int,
                     "width": int, "seed": int}


def _size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    w, sep, h = size.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise bad_request(f"size {size!r}: expected WIDTHxHEIGHT (e.g. 512x512) or auto", "invalid_size")
    return int(h), int(w)


def _encode(images, fmt: str) -> list[bytes]:
    from lorafleet.runtime.diffusion import encode_image, to_uint8

    return [encode_image(img, fmt) for img in to_uint8(images)]


async def generate(rt: Runtime, request: Request, model: str, params: ImageParams, fmt: str) -> list[bytes]:
    """Resolve the adapter, submit one job, wait for its images (cancelled if the client leaves)."""
    rt.need_task(TASK)
    entry = rt.resolve_request(request, model)
    try:
        job = rt.engine.new_image(params)
    except ValueError as e:
        raise bad_request(str(e), "invalid_parameter") from None
    (work,) = rt.submit(entry, [job], tenant=request.scope["lorafleet_tenant"], fallback=True,
                         request=request)

    async def result():
        while True:
            kind, value = await work.events.get()
            if kind == "result":
                return value
            if kind == "error":
                if isinstance(value, Overloaded):  # shed at the queue-delay bound
                    raise too_busy(value)
                raise ApiError(500, f"image generation failed: {value}", "server_error", "internal_error")

    images = await unless_disconnected(request, result(), lambda: rt.engine.cancel(work))
    rt.settle(request, work)
    return await asyncio.to_thread(_encode, images, fmt)


def _hosted_params(inputs, parameters: dict | None) -> ImageParams:
    if not isinstance(inputs, str) or not inputs:
        raise bad_request("`inputs` must be the prompt (a non-empty string)", "invalid_inputs")
    params = ImageParams(prompt=inputs)
    unknown = sorted(set(parameters or {}) - set(HOSTED_PARAMETERS))
    if unknown:
        raise bad_request(f"parameters {unknown} are not supported (supported: {', '.join(HOSTED_PARAMETERS)})",
                          "unsupported_parameter")
    fields = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
    for name, value in (parameters or {}).items():
        typ = HOSTED_PARAMETERS[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float) if typ is float else typ):
            raise bad_request(f"parameters.{name} must be a{'n integer' if typ is int else ' ' + typ.__name__}",
                              "invalid_parameter")
        setattr(params, fields.get(name, name), typ(value))
    return params


def _accept_format(request: Request) -> str:
    accept = request.headers.get("accept", "")
    return "jpeg" if "image/jpeg" in accept and "image/png" not in accept else "png"


async def hosted(rt: Runtime, request: Request, inputs, parameters: dict | None, model: str | None) -> Response:
    """``{"inputs": prompt, "parameters": {...}}`` -> one image's bytes."""
    params = _hosted_params(inputs, parameters)
    fmt = _accept_format(request)
    (image,) = await generate(rt, request, model or request.headers.get("lora") or rt.base_name, params, fmt)
    return Response(image, media_type=FORMATS[fmt])


def router(rt: Runtime) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/images/generations")
    async def images(request: Request, body: ImagesRequest):
        if body.response_format not in (None, "b64_json"):
            raise bad_request(f"response_format {body.response_format!r} is not supported; use b64_json "
                              "(this server keeps no images to link to)", "unsupported_response_format")
        fmt = (body.output_format or "png").lower()
        if fmt not in FORMATS:
            raise bad_request(f"output_format {body.output_format!r}: expected png or jpeg", "invalid_output_format")
        height, width = _size(body.size)
        params = ImageParams(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.num_inference_steps,
                             guidance=body.guidance_scale, height=height, width=width, n=body.n, seed=body.seed)
        images = await generate(rt, request, body.model, params, fmt)
        out = {"created": int(time.time()), "output_format": "jpeg" if fmt == "jpg" else fmt,
               "data": [{"b64_json": base64.b64encode(img).decode()} for img in images]}
        fb = fallback_of(request)
        return {**out, "fallback": fb} if fb else out

    @r.post("/models/{name:path}")
    async def hosted_model(request: Request, name: str):
        body = await _json(request)
        lora = request.headers.get("lora")
        if lora and name not in (lora, rt.base_name):
            raise bad_request(f"the path names {name!r} but the lora header names {lora!r}; name the adapter once",
                              "conflicting_model")
        return await hosted(rt, request, body.get("inputs"), body.get("parameters"), lora or name)

    return r


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise bad_request("the body must be JSON: {\"inputs\": prompt, \"parameters\": {...}}", "invalid_body") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object with `inputs`", "invalid_body")
    if body.get("parameters") is not None and not isinstance(body["parameters"], dict):
        raise bad_request("`parameters` must be an object", "invalid_body")
    return body

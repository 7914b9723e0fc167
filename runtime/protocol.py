"""The runtime's HTTP protocol: request bodies of the OpenAI, TGI and classification APIs, and the
OpenAI-shaped error every route answers with (``{"error": {"message", "type", "code"}}``)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "code": code}}, status, headers=headers)


def bad_request(message: str, code: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


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


class ImagesRequest(_Body):
    """OpenAI ``POST /v1/images/generations``; ``seed``, ``negative_prompt``, ``num_inference_steps`` and
    ``guidance_scale`` are lorafleet's extensions (extra_body in the OpenAI clients)."""
    model: str
    prompt: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=8)
    size: str | None = None  # "WIDTHxHEIGHT" or "auto"
    response_format: str | None = None  # b64_json only
    output_format: str | None = None  # png (default) or jpeg
    seed: int | None = Field(None, ge=0, lt=2**63)
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

"""The runtime's HTTP protocol: request bodies of the OpenAI, TGI and classification APIs, and the
OpenAI-shaped error every route answers with (``{"error": {"message", "type", "code"}}``).

Every field a body may carry is declared here. Each is either implemented with the reference
server's semantics (OpenAI/vLLM for ``/v1/*``, TGI for ``/generate*`` and ``/``) or, when set to
anything but its neutral value, refused with 400 naming the field and why (``unsupported()``). A field
no reference API has is refused by the models themselves (``extra="forbid"``) and answered 400 with
its name."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafleet.contracts.runtime_api import error_body
from lorafleet.runtime.engine_api import StructuredOutput


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers


def error_response(status: int, message: str, type_: str, code: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code), status, headers=headers)


def too_busy(e) -> ApiError:
    """429 with ``Retry-After`` for an ``engine_api.Overloaded`` (refused at submission or shed from the queue)."""
    return ApiError(429, str(e), "rate_limit_exceeded", e.code, {"Retry-After": str(e.retry_after)})


def bad_request(message: str, code: str = "invalid_request_error") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code)


def refuse(field: str, why: str) -> ApiError:
    return ApiError(400, f"`{field}` is not supported: {why}", "invalid_request_error", "unsupported_field")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def unsupported(self) -> None:
        """Raise ``refuse(...)`` for the first field set to something this server cannot do exactly."""


class StreamOptions(_Body):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM


class _OpenAISampling(_Body):
    """The fields both OpenAI completion endpoints take (and vLLM's extensions), with their bounds."""
    model: str
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # an end-user id for the caller's own records; no effect on the answer
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0)
    skip_special_tokens: bool | None = True
    include_stop_str_in_output: bool | None = False
    # OpenAI's (chat) and vLLM's (both endpoints): text, or structured output where the engine has it
    response_format: dict[str, Any] | None = None

    def structured_output(self) -> StructuredOutput | None:
        """``response_format`` as vLLM's OpenAI server reads it: ``json_object`` -> any JSON object,
        ``json_schema`` -> its ``json_schema.schema`` (``strict`` changes nothing: the schema always
        constrains); None for text. A malformed one is a 400 naming what is wrong."""
        rf = self.response_format
        if rf is None:
            return None
        kind = rf.get("type")
        allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
        if kind == "structural_tag":
            raise refuse("response_format", "type 'structural_tag' is not exposed by this server; use json_schema")
        if kind not in allowed:
            raise bad_request(f"`response_format.type` must be text, json_object or json_schema, not {kind!r}",
                              "invalid_response_format")
        extra = sorted(set(rf) - allowed[kind])
        if extra:
            raise bad_request(f"`response_format` of type {kind} does not take {', '.join(extra)}",
                              "invalid_response_format")
        if kind == "text":
            return None
        if kind == "json_object":
            return StructuredOutput("json_object")
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("`response_format.json_schema` must be given (an object with name and schema) when "
                              "type is json_schema", "invalid_response_format")
        problems = []
        if not isinstance(js.get("name"), str):
            problems.append("`response_format.json_schema.name` must be a string")
        if not isinstance(js.get("schema"), dict):
            problems.append("`response_format.json_schema.schema` must be a JSON schema object")
        if js.get("description") is not None and not isinstance(js.get("description"), str):
            problems.append("`response_format.json_schema.description` must be a string")
        if js.get("strict") is not None and not isinstance(js.get("strict"), bool):
            problems.append("`response_format.json_schema.strict` must be a boolean")
        extra = sorted(set(js) - {"name", "description", "schema", "strict"})
        if extra:
            problems.append(f"`response_format.json_schema` does not take {', '.join(extra)}")
        if problems:
            raise bad_request("; ".join(problems), "invalid_response_format")
        return StructuredOutput("json_schema", js["schema"])

    def unsupported(self) -> None:
        if self.n not in (None, 1):
            raise refuse("n", "one choice per request; send n requests (with different seeds) instead")
        if self.stream_options is not None and self.stream_options.continuous_usage_stats:
            raise refuse("stream_options.continuous_usage_stats", "usage is sent once, in the last chunk "
                         "(stream_options.include_usage)")
        if self.stream_options is not None and not self.stream:
            raise bad_request("`stream_options` is only allowed with `stream: true`", "invalid_stream_options")
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise bad_request(f"logit_bias key {k!r} is not a token id", "invalid_logit_bias")
            if not -100 <= v <= 100:
                raise bad_request(f"logit_bias[{k}] = {v} is outside [-100, 100]", "invalid_logit_bias")


class CompletionRequest(_OpenAISampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of not in (None, 1):
            raise refuse("best_of", "one candidate per request")
        if self.suffix:
            raise refuse("suffix", "insertion (fill-in-the-middle) is not implemented")
        if self.echo and self.logprobs is not None:
            raise refuse("echo", "echo with logprobs needs the prompt's logprobs, which /v1/completions does "
                         "not compute; drop one of them")


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = ""
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.tool_calls or self.tool_call_id or self.role == "tool":
            raise refuse("messages[].tool_calls", "this server does not implement tool calling")
        content = self.content
        if isinstance(content, list):  # OpenAI content parts: text only
            parts = []
            for part in content:
                if part.get("type") != "text":
                    raise refuse(f"messages[].content[].type={part.get('type')!r}",
                                 "this pool serves a text-only model; send text parts")
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        return content or ""


class ChatRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    store: bool | None = False
    metadata: dict[str, str] | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.tools or self.functions:
            raise refuse("tools", "this server does not implement tool calling")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise refuse("tool_choice", "this server does not implement tool calling")
        if self.store:
            raise refuse("store", "this server keeps no completions")
        if self.top_logprobs and not self.logprobs:
            raise bad_request("`top_logprobs` needs `logprobs: true`", "invalid_logprobs")
        for m in self.messages:
            m.text()


class TGIParameters(_Body):
    """TGI's GenerateParameters, with TGI's validation."""
    adapter_id: str | None = None
    best_of: int | None = None
    decoder_input_details: bool | None = False
    details: bool | None = False
    do_sample: bool | None = False
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    grammar: dict[str, Any] | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    repetition_penalty: float | None = Field(None, gt=0)
    return_full_text: bool | None = False
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = None
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_n_tokens: int | None = Field(None, ge=0, le=5)
    top_p: float | None = Field(None, gt=0, lt=1)
    truncate: int | None = Field(None, ge=1)
    typical_p: float | None = Field(None, gt=0, lt=1)
    watermark: bool | None = False

    def unsupported(self) -> None:
        if self.best_of not in (None, 1):
            raise refuse("best_of", "one candidate per request")
        if self.watermark:
            raise refuse("watermark", "watermarking is not implemented")

    def structured_output(self) -> StructuredOutput | None:
        """``grammar`` as TGI reads it (``{"type": "json" | "json_object", "value": schema}``, the schema an
        object or a string holding one, or ``{"type": "regex", "value": pattern}``); None without one. A
        malformed one is a 400 naming what is wrong; which engine can honour it is the engine's to say."""
        g = self.grammar
        if g is None:
            return None
        kind, value = g.get("type"), g.get("value")
        if kind not in ("json", "json_object", "regex"):
            raise bad_request(f"`parameters.grammar.type` must be json, json_object or regex, not {kind!r}",
                              "invalid_grammar")
        extra = sorted(set(g) - {"type", "value"})
        if extra:
            raise bad_request(f"`parameters.grammar` does not take {', '.join(extra)}", "invalid_grammar")
        if kind == "regex":
            if not isinstance(value, str):
                raise bad_request("`parameters.grammar.value` must be a regular expression (a string) when type "
                                  "is regex", "invalid_grammar")
            return StructuredOutput("regex", pattern=value, field="parameters.grammar")
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as e:
                raise bad_request(f"`parameters.grammar.value` is a string that is not JSON: {e}",
                                  "invalid_grammar") from None
        if not isinstance(value, dict):
            raise bad_request("`parameters.grammar.value` must be a JSON schema (an object, or a string holding "
                              "one) when type is json", "invalid_grammar")
        return StructuredOutput("json_schema", value, field="parameters.grammar")

    def sampling(self) -> bool:
        """TGI samples when asked to or when any warper is set (temperature != 1, top_k, top_p, typical_p)."""
        return bool(self.do_sample or (self.temperature is not None and self.temperature != 1.0)
                    or self.top_k or (self.top_p is not None and self.top_p < 1.0)
                    or (self.typical_p is not None and self.typical_p < 1.0))


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False

    def unsupported(self) -> None:
        self.parameters.unsupported()


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

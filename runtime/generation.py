"""Request shaping for text generation: prompts as the reference servers build them, the engine's
sequence for a request, and the stream that turns the engine's token events into text (incremental
detokenization, stop strings held back until they cannot match)."""

from __future__ import annotations

from lorafleet.runtime.detokenizer import IncrementalDetokenizer
from lorafleet.runtime.engine_api import SamplingParams, ServingEngine, Work
from lorafleet.runtime.protocol import ApiError, ChatMessage

# Used when the tokenizer has no chat template of its own (documented in docs/runtime.md).
FALLBACK_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_CHAT_PROMPT = "<|assistant|>\n"


class TextStream:
    """The text of one generating ``Work``: ``deltas()`` yields (token_id, new_text) until the sequence
    ends and sets ``finish`` ("length", "stop"); ``text`` is the answer so far."""

    def __init__(self, engine: ServingEngine, work: Work, stops: list[str], on_done=None):
        self.engine, self.work = engine, work
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.detok = IncrementalDetokenizer(engine.tokenizer)
        self.text = ""  # what is final: sent, or about to be
        self.sent = 0
        self.finish: str | None = None
        self._on_done = on_done

    def _stop_at(self, pending_from: int) -> int:
        """Index of the earliest stop string in text not yet final (searching only where one can end)."""
        text = self.detok.text
        start = max(0, pending_from - self.hold)
        best = -1
        for s in self.stops:
            at = text.find(s, start)
            if at >= 0 and (best < 0 or at < best):
                best = at
        return best

    async def deltas(self):
        tokenizer_text = self.detok
        try:
            while True:
                kind, value = await self.work.events.get()
                if kind == "error":
                    raise ApiError(500, f"generation failed: {value}", "server_error", "internal_error")
                if kind == "done":
                    before = len(tokenizer_text.text)
                    tokenizer_text.flush()
                    self.finish = value
                    at = self._stop_at(before) if self.stops else -1
                    end = at if at >= 0 else len(tokenizer_text.text)
                    if at >= 0:
                        self.finish = "stop"
                    self.text = tokenizer_text.text[:end]
                    if self.sent < end:
                        yield None, self.text[self.sent:]
                        self.sent = end
                    return
                before = len(tokenizer_text.text)
                tokenizer_text.push(value)
                text = tokenizer_text.text
                if self.stops:
                    at = self._stop_at(before)
                    if at >= 0:
                        self.text, self.finish = text[:at], "stop"
                        self.engine.cancel(self.work)
                        if self.sent < at:
                            yield value, text[self.sent:at]
                        self.sent = at
                        return
                    upto = len(text) - self.hold
                else:
                    upto = len(text)
                if upto > self.sent:
                    self.text = text[:upto]
                    yield value, text[self.sent:upto]
                    self.sent = upto
                elif not self.stops:
                    yield value, ""
        finally:
            if self.finish is None:
                self.engine.cancel(self.work)  # the client went away: free the row and slot
            elif self._on_done is not None:
                self._on_done(self)


def build_sequence(engine: ServingEngine, prompt_ids: list[int], max_new: int | None, default_max_new: int,
                   temperature: float | None, top_p: float | None, seed: int | None):
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "invalid_request_error", "empty_prompt")
    limit = engine.max_input_tokens()
    max_new = max_new or min(default_max_new, max(1, limit - len(prompt_ids)))
    if len(prompt_ids) + max_new > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                       f"{len(prompt_ids)} tokens and max_tokens is {max_new}. Shorten the prompt or lower "
                       "max_tokens.", "invalid_request_error", "context_length_exceeded")
    params = SamplingParams(max_new_tokens=max_new, temperature=temperature or 0.0,
                            top_p=top_p if top_p is not None else 1.0, seed=seed)
    return engine.new_sequence(prompt_ids, params)


def stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def completion_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A completion prompt is tokenized with the tokenizer's special tokens (BOS), as vLLM and TGI do."""
    return tokenizer(prompt)["input_ids"]


def chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """The chat template's own tokens: rendered and tokenized by ``apply_chat_template``, never given
    special tokens a second time (a template with ``{{ bos_token }}`` already has its BOS)."""
    msgs = []
    for m in messages:
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
        msgs.append({"role": m.role, "content": content or ""})
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding in newer transformers
            out = out["input_ids"]
        return list(out)
    text = "".join(FALLBACK_CHAT_TEMPLATE.format(**m) for m in msgs) + FALLBACK_CHAT_PROMPT
    return tokenizer(text)["input_ids"]

"""Request shaping for text generation: prompts as the reference servers build them, the engine's
sequence for a request, and the stream that turns the engine's token events into text (incremental
detokenization, stop strings held back until they cannot match)."""

from __future__ import annotations

import secrets

from lorafleet.runtime.detokenizer import IncrementalDetokenizer
from lorafleet.runtime.engine_api import Overloaded, SamplingParams, ServingEngine, Work
from lorafleet.runtime.protocol import ApiError, ChatMessage, bad_request, too_busy

# Used when the tokenizer has no chat template of its own (documented in docs/runtime.md).
FALLBACK_CHAT_TEMPLATE = "<|{role}|>\n{content}\n"
FALLBACK_CHAT_PROMPT = "<|assistant|>\n"


class TextStream:
    """The text of one generating ``Work``: ``deltas()`` yields (token_id, new_text) until the sequence
    ends and sets ``finish``: "length", "stop" (an end-of-sequence or stop token) or "stop_sequence" (a
    stop string; OpenAI calls all three kinds of stop "stop"); ``text`` is the answer so far."""

    def __init__(self, engine: ServingEngine, work: Work, stops: list[str],
                 include_stop: bool = False, skip_special_tokens: bool = True, tgi_stops: bool = False,
                 incremental: bool = True):
        self.engine, self.work = engine, work
        self.stops = [s for s in stops if s]
        # An answer nobody reads before its end (not streamed) and that no stop string can cut is decoded
        # once when it ends: the incremental detokenizer decodes two windows per token on the event loop.
        self.whole = not incremental and not self.stops and not tgi_stops
        self.skip_special_tokens = skip_special_tokens
        self.include_stop = include_stop
        # TGI stops once the text so far ends with a stop sequence and keeps it; nothing is held back.
        self.tgi_stops = tgi_stops
        self.hold = 0 if tgi_stops else max((len(s) for s in self.stops), default=1) - 1
        self.detok = IncrementalDetokenizer(engine.tokenizer, skip_special_tokens)
        self.received = 0  # token events so far
        self.text = ""  # what is final: sent, or about to be
        self.sent = 0
        self.finish: str | None = None
        self._first = None  # the first event, once ``started`` has read it

    async def started(self) -> None:
        """Wait until the engine has taken the request (its first event): a stream's headers go out
        only then, so a request shed from the queue is still a 429 and not a broken stream."""
        if self._first is None:
            self._first = await self.work.events.get()
            kind, value = self._first
            if kind == "error" and isinstance(value, Overloaded):
                raise too_busy(value)
            if kind == "error" and isinstance(value, ApiError):  # the engine refused the request (400)
                raise value

    def _stop_at(self, pending_from: int) -> int:
        """Where the answer ends at the earliest stop string in text not yet final (searching only where
        one can end): its start, or its end with ``include_stop_str_in_output``; -1 if none."""
        text = self.detok.text
        start = max(0, pending_from - self.hold)
        best, end = -1, -1
        for s in self.stops:
            at = text.find(s, start)
            if at >= 0 and (best < 0 or at < best):
                best, end = at, at + len(s)
        return end if (best >= 0 and self.include_stop) else best

    def abandon(self) -> None:
        """The answer's reader is gone: cancel the work unless the sequence already ended."""
        if self.finish is None:
            self.engine.cancel(self.work)

    @property
    def openai_finish(self) -> str | None:
        return "stop" if self.finish == "stop_sequence" else self.finish

    async def deltas(self):
        tokenizer_text = self.detok
        try:
            while True:
                if self._first:  # read by started()
                    (kind, value), self._first = self._first, False
                else:
                    kind, value = await self.work.events.get()
                if kind == "error":
                    if isinstance(value, Overloaded):  # shed at the queue-delay bound
                        raise too_busy(value)
                    if isinstance(value, ApiError):  # the engine refused the request before its first token
                        raise value
                    raise ApiError(500, f"generation failed: {value}", "server_error", "internal_error")
                if self.whole:
                    if kind == "done":
                        self.finish = value
                        self.text = self.engine.tokenizer.decode(tokenizer_text.ids,
                                                                 skip_special_tokens=self.skip_special_tokens)
                        self.sent = len(self.text)
                        yield None, self.text
                        return
                    self.received += 1
                    tokenizer_text.ids.append(value)
                    continue
                if kind == "done":
                    before = len(tokenizer_text.text)
                    tokenizer_text.flush()
                    self.finish = value
                    at = self._stop_at(before) if (self.stops and not self.tgi_stops) else -1
                    end = at if at >= 0 else len(tokenizer_text.text)
                    if at >= 0:
                        self.finish = "stop_sequence"
                    self.text = tokenizer_text.text[:end]
                    if self.sent < end:
                        yield None, self.text[self.sent:]
                        self.sent = end
                    return
                self.received += 1
                before = len(tokenizer_text.text)
                tokenizer_text.push(value)
                text = tokenizer_text.text
                if self.tgi_stops:
                    if text[self.sent:]:
                        self.text = text
                        yield value, text[self.sent:]
                        self.sent = len(text)
                    else:
                        yield value, ""
                    if any(text.endswith(x) for x in self.stops):
                        self.finish = "stop_sequence"
                        self.engine.cancel(self.work, "stop_sequence")
                        return
                    continue
                if self.stops:
                    at = self._stop_at(before)
                    if at >= 0:
                        self.text, self.finish = text[:at], "stop_sequence"
                        self.engine.cancel(self.work, "stop_sequence")
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
            self.abandon()  # when the client went away: free the row and slot


def build_sequence(engine: ServingEngine, prompt_ids: list[int], params: SamplingParams, default_max_new: int):
    """The engine's sequence for a request; ``params.max_new_tokens`` 0 means the server's default."""
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", "invalid_request_error", "empty_prompt")
    limit = engine.max_input_tokens()
    max_new = params.max_new_tokens or min(default_max_new, max(1, limit - len(prompt_ids)))
    if len(prompt_ids) + max_new > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens; the prompt has "
                       f"{len(prompt_ids)} tokens and max_tokens is {max_new}. Shorten the prompt or lower "
                       "max_tokens.", "invalid_request_error", "context_length_exceeded")
    params.max_new_tokens = max_new
    vocab = _vocab_size(engine.tokenizer)
    for name, ids in (("logit_bias", (params.logit_bias or {}).keys()), ("stop_token_ids", params.stop_ids)):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"`{name}` names token id {bad[0]}, outside this model's vocabulary (0..{vocab - 1})",
                              "invalid_token_id")
    return engine.new_sequence(prompt_ids, params)


def _vocab_size(tokenizer) -> int:
    return len(tokenizer)


def eos_ids(tokenizer) -> set[int]:
    ids = getattr(tokenizer, "eos_token_id", None)
    return set(ids) if isinstance(ids, (list, tuple, set)) else ({ids} if ids is not None else set())


def openai_params(body, max_new: int | None, logprobs: int | None, tokenizer) -> SamplingParams:
    """OpenAI's (and vLLM's) sampling fields as engine parameters: greedy when temperature is 0."""
    temperature = 1.0 if body.temperature is None else body.temperature
    stop_ids = set(body.stop_token_ids or [])
    min_tokens = body.min_tokens or 0
    return SamplingParams(
        max_new_tokens=max_new or 0, temperature=temperature, sample=temperature > 0,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop_ids=stop_ids,
        top_k=body.top_k if body.top_k and body.top_k > 0 else 0, min_p=body.min_p or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, penalty_style="openai",
        logit_bias={int(k): float(v) for k, v in body.logit_bias.items()} if body.logit_bias else None,
        min_tokens=min_tokens, banned_until_min=(eos_ids(tokenizer) | stop_ids) if min_tokens else set(),
        ignore_eos=bool(body.ignore_eos), logprobs=logprobs, logprob_mode="raw",
        structured=body.structured_output())


def tgi_params(p, max_new: int, want_logprobs: bool) -> SamplingParams:
    """TGI's GenerateParameters as engine parameters (TGI's sampling rule and logprob semantics)."""
    sample = p.sampling()
    seed = p.seed
    if sample and seed is None:
        seed = secrets.randbits(63)  # TGI reports the seed it drew
    return SamplingParams(
        max_new_tokens=max_new, temperature=p.temperature if p.temperature is not None else 1.0, sample=sample,
        top_p=p.top_p if p.top_p is not None else 1.0, seed=seed, top_k=p.top_k or 0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty or 1.0, frequency_penalty=p.frequency_penalty or 0.0,
        penalty_style="tgi", logprobs=(p.top_n_tokens or 0) if want_logprobs else None,
        logprob_mode="processed", prompt_logprobs=(p.top_n_tokens or 0) if p.decoder_input_details else None,
        structured=p.structured_output())


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
    msgs = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        if isinstance(out, dict) or hasattr(out, "keys"):  # a BatchEncoding in newer transformers
            out = out["input_ids"]
        return list(out)
    text = "".join(FALLBACK_CHAT_TEMPLATE.format(**m) for m in msgs) + FALLBACK_CHAT_PROMPT
    return tokenizer(text)["input_ids"]

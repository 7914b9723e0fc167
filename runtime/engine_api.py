"""The one interface between the runtime's HTTP layer and an engine that runs a model.

The HTTP layer (routers, lifecycle) only ever talks to a ``ServingEngine``: it builds requests, submits
them for an adapter, reads events back and cancels what nobody waits for; it tells the engine when an
adapter is registered or dropped and asks it for its capacity. The torch engine (torch_engine.py) is
one implementation; a second engine implements the same methods without touching the HTTP layer.

Torch-free on purpose: nothing here runs a model."""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


class Overloaded(Exception):
    """429: the queue is full, the tenant is over its share, or the request would wait (or has waited)
    longer than the queue-delay bound. ``code`` is the reason (the ``reason`` label of the shed counter)."""

    def __init__(self, message: str, code: str, retry_after: int = 1):
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


QUEUED, TAKEN, WITHDRAWN = 0, 1, 2


@dataclass(eq=False)
class Work:
    """One unit of work (one input to classify, or one sequence to generate) and its way back.

    Events on ``events``: ("token", id), ("done", finish_reason), ("result", value), ("error", exc)."""

    tenant: str
    entry: Any  # tiers.AdapterEntry, or None for the base model
    payload: Any  # str to classify, or the engine's sequence object
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    cancel_reason: str = ""  # "client_left" or "stop_sequence" (the answer ended at a stop string)
    steps: int = 0  # model steps that included this work (written by the engine's thread)
    steps_at_cancel: int = 0  # ``steps`` when it was cancelled: what ran later ran for nobody
    # The scheduler's view: QUEUED until the worker takes it (TAKEN) or it leaves the queue unserved
    # (WITHDRAWN: cancelled while queued, or shed at the queue-delay bound). Written under its lock.
    state: int = 0
    # The adapter opted into the base-model fallback: still waiting for a device slot at the
    # scheduler's fallback deadline, it runs on the base model instead (``fell_back`` says why).
    fallback: bool = False
    fell_back: str | None = None

    def cancel(self, reason: str) -> None:
        if not self.cancelled:
            self.steps_at_cancel = self.steps
            self.cancel_reason = reason
            self.cancelled = True

    def send(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    @property
    def key(self):
        return None if self.entry is None else self.entry.key


def _put_all(events: list) -> None:
    for w, kind, value in events:
        w.events.put_nowait((kind, value))


def send_all(events: list) -> None:
    """``w.send(kind, value)`` for each ``(w, kind, value)``, in order, with one wake-up of each event
    loop instead of one per event (a batch's answers, a decode step's tokens)."""
    by_loop: dict = {}
    for ev in events:
        by_loop.setdefault(ev[0].loop, []).append(ev)
    for loop, evs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, evs)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass


@dataclass(frozen=True)
class StructuredOutput:
    """Constrained output as vLLM's structured outputs take it: ``json_object`` (any JSON object),
    ``json_schema`` (JSON valid against ``schema``) or ``regex`` (text matching ``pattern``). From OpenAI's
    ``response_format`` or TGI's ``parameters.grammar``; ``field`` names the one it came from (refusals)."""

    kind: str  # "json_object", "json_schema" or "regex"
    schema: dict | None = None
    pattern: str | None = None
    field: str = "response_format"


@dataclass
class SamplingParams:
    """What a generation request asks for, as the HTTP layer validated it (engine-neutral; the
    semantics of each field: sampling.py)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)
    sample: bool | None = None  # None: sample iff temperature > 0
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_style: str = "openai"  # "openai" (vLLM's) or "tgi"
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    banned_until_min: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; n: the chosen token's and n alternatives
    logprob_mode: str = "raw"  # "raw" (vLLM) or "processed" (TGI)
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None  # None: free text


@dataclass
class ImageParams:
    """What a text-to-image request asks for (engine-neutral; the engine validates the ranges)."""

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = None  # None: the pool's default
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    n: int = 1
    seed: int | None = None


class ServingEngine(ABC):
    """What an engine offers the runtime. Every method is called on the asyncio loop's thread unless
    it says otherwise; the engine runs its model wherever it likes (the torch engine: one worker
    thread) and answers through ``Work.send``."""

    task: str = ""
    tokenizer: Any = None
    dtype: Any = None  # the adapters' weight dtype in host memory (the tiers need it)
    # Set by the runtime: called (from any thread) with the reason when the engine can never serve again
    # (its model process died); the runtime then stops with exit code 1.
    on_fatal: Any = None

    # --- requests ---------------------------------------------------------------------------------
    @abstractmethod
    def max_input_tokens(self) -> int:
        """Prompt + new tokens (generation) or input tokens (classification) one request may take."""

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` (safe to call on the event loop while the engine runs)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text)["input_ids"]``: a completion prompt's ids, special tokens (BOS) added, as
        ``generation.completion_prompt_ids`` gives them (safe on the event loop while the engine runs)."""
        return self.tokenizer(text)["input_ids"]

    def new_sequence(self, prompt: list[int], params: SamplingParams) -> Any:
        """The engine's object for one generation request (``.prompt`` and ``.generated`` readable)."""
        raise NotImplementedError(f"the {self.task} engine does not generate text")

    def new_image(self, params: ImageParams) -> Any:
        """The engine's object for one text-to-image request (``n`` images of one prompt); raises
        ``ValueError`` naming a parameter it cannot honour. Events: ("progress", (steps done, total)),
        then ("result", float images (n, H, W, 3) in [0, 1])."""
        raise NotImplementedError(f"the {self.task} engine does not generate images")

    @abstractmethod
    def submit(self, works: list[Work]) -> None:
        """Queue all of ``works`` (one request) or none: raises ``Overloaded``."""

    def precheck(self, tenant: str, n: int, arrived: float) -> Overloaded | None:
        """Whether ``n`` items of ``tenant`` that arrived at ``arrived`` (time.monotonic) would be refused
        now, asked before the request is parsed: the refusal (counted as a refused submission is), or
        None to go on (``submit`` decides). An engine without a cheap answer says None."""
        return None

    def admission_snapshot(self) -> dict | None:
        """The admission state ``precheck`` decides by (admission_rule.AdmissionState's fields, as JSON
        types) for the HTTP front to refuse by; None: an engine without one (the front forwards all)."""
        return None

    def cancel(self, work: Work, reason: str = "client_left") -> None:
        """Nobody waits for ``work`` any more (``reason``: "client_left" or "stop_sequence"): drop it
        from the queue, or free its row before the next step."""
        work.cancel(reason)

    # --- adapters -------------------------------------------------------------------------------
    @abstractmethod
    def bind(self, manager) -> None:
        """Attach the adapter manager (host tier) this engine takes adapters from."""

    @abstractmethod
    def adapter_event(self, kind: str, entry) -> None:
        """The manager registered ("loaded") or dropped ("unloaded") ``entry`` (any thread)."""

    # --- capacity and lifecycle ------------------------------------------------------------------
    @abstractmethod
    def capacity(self) -> dict[str, int]:
        """Current figures: device slots (total/used), rows, queued work."""

    def base_weights(self) -> tuple[str, int, int] | None:
        """``(quantization, loaded bytes, unquantized bytes)`` of the base model's weights: what they
        hold on the device, and what they would in the pool's dtype unquantized. None if unknown."""
        return None

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

"""The two model engines a pool runs: sequence classification (an HF encoder with per-tenant heads)
and text generation (a compact Llama-style forward over HF's modules with a per-sequence KV cache in
a preallocated pool, so rows of different lengths and tenants decode together)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.runtime.multilora import LoRAModelPatch, SlotAllocator
from lorafleet.runtime.tiers import AdapterEntry, AdapterManager

log = logging.getLogger("lorafleet.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SlotsBusy(RuntimeError):
    """Every device slot is referenced by in-flight work; the batch waits for one to free up."""


class Engine:
    task = ""

    def __init__(self, model, tokenizer, device_slots: int, max_rank: int, device: str = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.patch = LoRAModelPatch(self.model, device_slots, max_rank)
        self.slots = SlotAllocator(device_slots)
        self.manager: AdapterManager | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def bind(self, manager: AdapterManager) -> None:
        self.manager = manager
        manager.resident = self.slots.by_key  # the host tier keeps device residents' host copies
        manager.check = self.patch.check

    def max_input_tokens(self) -> int:
        raise NotImplementedError

    # --- device slots (model-worker thread only) ---------------------------------------------------
    def acquire(self, entry: AdapterEntry | None) -> int:
        """A device slot holding ``entry`` with one reference (0 = base model, no reference)."""
        if entry is None:
            return 0
        got = self.slots.acquire(entry.key, entry.pinned)
        if got is None:
            raise SlotsBusy(f"all {self.slots.size} device slots are in use by in-flight requests")
        slot, needs_write = got
        if needs_write:
            try:
                self.patch.install(slot, self.manager.host_adapter(entry))
            except Exception:
                self.slots.release(entry.key)
                self.slots.drop(entry.key)
                raise
        return slot

    def release(self, entry: AdapterEntry | None) -> None:
        if entry is not None:
            self.slots.release(entry.key)


class ClassificationEngine(Engine):
    task = "sequence-classification"

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 device_slots: int = 32, max_rank: int = 64) -> "ClassificationEngine":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        torch.manual_seed(0)  # the base head is never used for answers, but keep loading deterministic
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, tok, device_slots, max_rank, device)

    _counter = None

    def max_input_tokens(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", 512), self.tokenizer.model_max_length]
        return int(min(x for x in limits if x and x < 1e9))

    def count_tokens(self, text: str) -> int:
        """Called on the event loop while the worker tokenises batches: a fast tokenizer keeps padding
        state per call and is not safe to share across threads, so this uses a copy of its own."""
        if self._counter is None:
            self._counter = copy.deepcopy(self.tokenizer)
        return len(self._counter(text)["input_ids"])

    @torch.inference_mode()
    def classify(self, texts: list[str], slots: list[int], label_counts: list[int]) -> list[list[float]]:
        enc = self.tokenizer(texts, padding=True, return_tensors="pt").to(self.device)
        self.patch.ctx.set(torch.tensor(slots, device=self.device))
        try:
            logits = self.model(**enc).logits.float()
        finally:
            self.patch.ctx.set(None)
        return [torch.softmax(logits[i, :n], -1).tolist() for i, n in enumerate(label_counts)]


@dataclass(eq=False)
class Sequence:
    """One generation request being decoded: its KV-cache row, adapter slot and sampling settings."""

    prompt: list[int]
    max_new_tokens: int
    slot: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)
    row: int = -1
    pos: int = 0  # tokens in the cache
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


class GenerationEngine(Engine):
    """Llama-family causal LM (Llama, Mistral, Qwen2 layouts: q/k/v/o + RMSNorm + gated MLP)."""

    task = "text-generation"

    def __init__(self, model, tokenizer, device_slots: int, max_rank: int, device: str = "cpu",
                 max_seqs: int = 32, max_len: int | None = None):
        super().__init__(model, tokenizer, device_slots, max_rank, device)
        cfg = model.config
        self.inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len = int(max_len or cfg.max_position_embeddings)
        self.max_seqs = max_seqs
        shape = (max_seqs, self.n_kv, self.max_len, self.head_dim)
        n = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.free_rows = list(range(max_seqs - 1, -1, -1))
        self.eos_ids = set(_as_list(getattr(model.generation_config, "eos_token_id", None))
                           or _as_list(cfg.eos_token_id) or _as_list(tokenizer.eos_token_id))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self._rope = apply_rotary_pos_emb

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 device_slots: int = 32, max_rank: int = 64, max_seqs: int = 32,
                 max_len: int | None = None) -> "GenerationEngine":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype]).to(device)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, tok, device_slots, max_rank, device, max_seqs, max_len)

    def max_input_tokens(self) -> int:
        return self.max_len

    def has_row(self) -> bool:
        return bool(self.free_rows)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, decode: bool) -> torch.Tensor:
        n, t = ids.shape
        h = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(h, pos)
        if decode:
            p = pos[:, 0]
            span = int(p.max()) + 1
            mask = (torch.arange(span, device=self.device)[None, :] <= p[:, None])[:, None, None, :]
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(n, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if decode:
                kc[rows, :, p] = k[:, :, 0]
                vc[rows, :, p] = v[:, :, 0]
                o = F.scaled_dot_product_attention(q, kc[rows, :, :span], vc[rows, :, :span], attn_mask=mask,
                                                   enable_gqa=self.n_kv != self.n_heads)
            else:
                kc[rows, :, :t] = k
                vc[rows, :, :t] = v
                # Right padding: a real query never sees the pads after it, so plain causal is exact.
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.inner.norm(h)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Start sequences: take a cache row each, run their prompts in one pass, return first tokens."""
        for s in seqs:
            s.row = self.free_rows.pop()
            if s.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
        t = max(len(s.prompt) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([s.prompt + [pad] * (t - len(s.prompt)) for s in seqs], device=self.device)
        pos = torch.arange(t, device=self.device).expand(len(seqs), t)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        self.patch.ctx.set(torch.tensor([s.slot for s in seqs], device=self.device))
        try:
            h = self._forward(ids, pos, rows, decode=False)
            last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
            logits = self.model.lm_head(h[torch.arange(len(seqs)), last])
        finally:
            self.patch.ctx.set(None)
        for s in seqs:
            s.pos = len(s.prompt)
        self.last_logits = logits
        return self._sample(logits, seqs)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One decode step for every running sequence (each feeds its last generated token)."""
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([[s.pos] for s in seqs], device=self.device)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        self.patch.ctx.set(torch.tensor([s.slot for s in seqs], device=self.device))
        try:
            h = self._forward(ids, pos, rows, decode=True)
            logits = self.model.lm_head(h[:, 0])
        finally:
            self.patch.ctx.set(None)
        for s in seqs:
            s.pos += 1
        self.last_logits = logits  # kept for tests that compare logits with PEFT's
        return self._sample(logits, seqs)

    def finish(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self.free_rows.append(seq.row)
            seq.row = -1

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()
        out = []
        for i, s in enumerate(seqs):
            tok = greedy[i]
            if s.temperature > 0:
                probs = torch.softmax(logits[i] / s.temperature, -1)
                if s.top_p < 1.0:
                    sp, si = probs.sort(descending=True)
                    keep = sp.cumsum(-1) - sp < s.top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                tok = int(torch.multinomial(probs, 1, generator=s.generator))
            s.generated.append(tok)
            out.append(tok)
        return out

    def is_done(self, seq: Sequence) -> bool:
        return (len(seq.generated) >= seq.max_new_tokens or seq.generated[-1] in self.eos_ids
                or seq.generated[-1] in seq.stop_ids or seq.pos >= self.max_len)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [int(x)]

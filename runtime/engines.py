"""The two model engines a pool runs: sequence classification (an HF encoder with per-tenant heads)
and text generation (a compact Llama-style forward over HF's modules with a per-sequence KV cache in
a preallocated pool, so rows of different lengths and tenants decode together)."""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafleet.runtime.architectures import UnsupportedModel, causal_lm_class, check_architecture, plan_model
from lorafleet.runtime.multilora import LoRAModelPatch, SlotAllocator
from lorafleet.runtime import quantization as quant
from lorafleet.runtime.tiers import AdapterEntry, AdapterManager

log = logging.getLogger("lorafleet.runtime")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SlotsBusy(RuntimeError):
    """Every device slot is referenced by in-flight work; the batch waits for one to free up."""


class Engine:
    task = ""

    def __init__(self, model, tokenizer, device_slots: int, max_rank: int, device: str = "cpu",
                 quantization: str = "none"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.quantization = quantization
        quant.prepare(self.model, quantization, device)
        self.patch = LoRAModelPatch(self.model, device_slots, max_rank, self.dtype)
        self.slots = SlotAllocator(device_slots)
        self.manager: AdapterManager | None = None
        self._encoder = None  # token_encoder(tokenizer), made on first use
        # Unquantized: what the same weights take in the pool's dtype (equal when quantization is none).
        self.weights_bytes, self.unquantized_weights_bytes = quant.weight_bytes(self.model, self.dtype)
        if quantization != "none":
            log.info("base model quantized %s: weights %.1f MiB (%.1f MiB unquantized in %s), %d linear layers",
                     quantization, self.weights_bytes / 2**20, self.unquantized_weights_bytes / 2**20,
                     str(self.dtype).removeprefix("torch."), len(quant.quantized_layers(self.model)))

    def memory_bytes(self) -> dict[str, int]:
        """What the engine holds on its device: the base weights and the adapter slots' stacked factors."""
        slots = sum(layer.A.numel() * layer.A.element_size() + layer.B.numel() * layer.B.element_size()
                    for layer in self.patch.layers.values())
        slots += sum(h.W.numel() * h.W.element_size() + h.b.numel() * h.b.element_size()
                     for h in self.patch.heads.values())
        return {"weights": self.weights_bytes, "adapter_slots": slots}

    @property
    def dtype(self) -> torch.dtype:
        # A quantized model's int8/uint8 weights are not the dtype it computes (and adapters live) in.
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def bind(self, manager: AdapterManager) -> None:
        self.manager = manager
        manager.resident = self.slots.by_key  # the host tier keeps device residents' host copies
        manager.check = self.patch.check

    def max_input_tokens(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text)["input_ids"]`` (special tokens added; the event loop's, on a copy of the
        tokenizer: ``token_encoder``)."""
        if self._encoder is None:
            self._encoder = token_encoder(self.tokenizer)
        return self._encoder(text)

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


def token_encoder(tokenizer):
    """``text -> tokenizer(text)["input_ids"]`` on a copy of ``tokenizer`` (safe beside other threads'
    use of it): with a fast tokenizer, the copy's Rust backend with no padding and no truncation (what
    transformers hands it for a plain call), without transformers' per-call wrapping (2-3x the time)."""
    own = copy.deepcopy(tokenizer)
    backend = getattr(own, "_tokenizer", None)
    if backend is None or not hasattr(backend, "encode"):  # a slow (Python) tokenizer
        return lambda text: own(text)["input_ids"]
    backend.no_truncation()
    backend.no_padding()
    return lambda text: backend.encode(text).ids


class ClassificationEngine(Engine):
    task = "sequence-classification"

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 device_slots: int = 32, max_rank: int = 64, quantization: str = "none") -> "ClassificationEngine":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        quant.check_supported(quantization, cls.task, device)
        torch.manual_seed(0)  # the base head is never used for answers, but keep loading deterministic
        model = _load(AutoModelForSequenceClassification, model_dir, dtype, device, quantization)
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        engine = cls(model, tok, device_slots, max_rank, device, quantization)
        engine._encoder = token_encoder(tok)  # now, not on the first request's time
        return engine

    def max_input_tokens(self) -> int:
        limits = [getattr(self.model.config, "max_position_embeddings", 512), self.tokenizer.model_max_length]
        return int(min(x for x in limits if x and x < 1e9))

    def count_tokens(self, text: str) -> int:
        """Called on the event loop while the worker tokenises batches: a fast tokenizer keeps padding
        state per call and is not safe to share across threads, so this uses a copy of its own. With a
        fast tokenizer the copy's Rust backend counts (no padding, no truncation: what ``tokenizer(text)``
        hands it, the same ids) without transformers' per-call wrapping, half of each count's time on
        the loop."""
        return len(self.encode(text))

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
    """One generation request being decoded: its KV-cache row, adapter slot and sampling settings
    (their semantics: sampling.py)."""

    prompt: list[int]
    max_new_tokens: int
    slot: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: set[int] = field(default_factory=set)
    sample: bool | None = None  # None: sample iff temperature > 0 (OpenAI); TGI decides itself
    top_k: int = 0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_style: str = "openai"  # or "tgi"
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    banned_until_min: set[int] = field(default_factory=set)
    ignore_eos: bool = False
    logprobs: int | None = None  # record logprobs (and this many top alternatives); None: none
    logprob_mode: str = "raw"  # or "processed" (TGI)
    prompt_logprobs: int | None = None  # TGI decoder_input_details: logprobs of the prompt's tokens
    row: int = -1
    pos: int = 0  # tokens in the cache
    generated: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_token_logprobs: list[tuple[float, list]] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        if self.sample is None:
            self.sample = self.temperature > 0


DEFAULT_MAX_MODEL_LEN = 8192  # when maxModelLen is not set: the model's length, capped here
PREFILL_SPLIT_TOKENS_CPU = 48  # GenerationEngine.prefill_groups on CPU


class GenerationEngine(Engine):
    """Causal LM with a per-sequence KV cache: a compact forward over HF's own modules (embeddings,
    norms, rotary tables, MLPs), laid out per architecture by ``architectures.plan_model``; an
    architecture it cannot compute exactly is refused when the engine is built."""

    task = "text-generation"

    def __init__(self, model, tokenizer, device_slots: int, max_rank: int, device: str = "cpu",
                 max_seqs: int = 32, max_len: int | None = None, quantization: str = "none"):
        cfg = model.config
        self.plan = plan_model(model)  # before anything is allocated: a refusal costs nothing
        model_len = int(cfg.max_position_embeddings)
        if max_len and max_len > model_len:
            raise UnsupportedModel(f"maxModelLen {max_len} is above the model's max_position_embeddings "
                                   f"{model_len}; set maxModelLen to {model_len} or less")
        super().__init__(model, tokenizer, device_slots, max_rank, device, quantization)
        self.inner = model.model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = self.inner.layers[0].self_attn.head_dim  # what HF's attention uses
        self.model_len = model_len
        self.max_len = int(max_len or min(model_len, DEFAULT_MAX_MODEL_LEN))
        self.max_seqs = max_seqs
        # prefill_groups: a forward's fixed cost in prompt tokens. Measured on CPU (d=256, 4 layers, one
        # thread: about 4 ms a forward against 85 us a token, docs/benchmarks.md); elsewhere not
        # measured yet, so a prefill stays one forward there.
        self.prefill_split_tokens = PREFILL_SPLIT_TOKENS_CPU if torch.device(self.device).type == "cpu" else 0
        shape = (max_seqs, self.n_kv, self.max_len, self.head_dim)
        n = cfg.num_hidden_layers
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n)]
        self.kv_cache_bytes = sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)
        # Cache rows in use are always 0..n-1 (``finish`` moves the last one into a freed row), so a
        # decode step over all of them reads the cache as a slice, without gathering a copy.
        self._row_seq: dict[int, Sequence] = {}  # row -> the sequence in it
        self.eos_ids = set(_as_list(getattr(model.generation_config, "eos_token_id", None))
                           or _as_list(cfg.eos_token_id) or _as_list(tokenizer.eos_token_id))
        # The architecture's own rotary application (Phi-3's rotates only part of each head).
        self._rope = sys.modules[type(self.inner.layers[0].self_attn).__module__].apply_rotary_pos_emb
        lay = self.plan.layout
        self._layers = []
        for layer, lp in zip(self.inner.layers, self.plan.layers):
            attn = layer.self_attn
            self._layers.append((
                attn, _opt(layer, lay.pre_attn_norm), _opt(layer, lay.post_attn_norm),
                _opt(layer, lay.pre_mlp_norm), _opt(layer, lay.post_mlp_norm), layer.mlp,
                getattr(attn, "q_norm", None) if lay.qk_norm else None,
                getattr(attn, "k_norm", None) if lay.qk_norm else None,
                lp.window, lp.softcap, lp.scaling, lp.layer_type))
        self._head_norm = lay.qk_norm == "head"
        self._gqa = self.n_kv != self.n_heads
        # A decode step's attention (one query per row over its cached keys) as HF's eager attention does
        # it (matmul, softmax in float32, matmul) where torch's CPU SDPA kernel is slow for one query in
        # 16 bits: bfloat16, 32 rows x 101 keys, 4 heads: 1.02 ms SDPA against 0.28 ms; at one row SDPA is the
        # faster (37 against 50 us), so it keeps that (docs/benchmarks.md).
        self._eager_decode = self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16)
        log.info("text-generation engine: %s; weights %.1f MiB, KV cache %.1f MiB (%d rows x %d positions; "
                 "the model's length is %d)", self.plan.architecture, self.weights_bytes / 2**20,
                 self.kv_cache_bytes / 2**20, max_seqs, self.max_len, model_len)

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu",
                 device_slots: int = 32, max_rank: int = 64, max_seqs: int = 32,
                 max_len: int | None = None, quantization: str = "none",
                 merged_adapter: str | Path | None = None) -> "GenerationEngine":
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        quant.check_supported(quantization, cls.task, device)
        config = AutoConfig.from_pretrained(str(model_dir))
        check_architecture(causal_lm_class(config))  # refuse before reading the weights
        if max_len:
            model_len = int(config.max_position_embeddings)
            if max_len > model_len:
                raise UnsupportedModel(f"maxModelLen {max_len} is above the model's max_position_embeddings "
                                       f"{model_len}; set maxModelLen to {model_len} or less")
        model = _load(AutoModelForCausalLM, model_dir, dtype, device, quantization)
        if merged_adapter:
            from lorafleet.runtime.merge import merge_adapter

            merge_adapter(model, merged_adapter)  # before the multi-LoRA layers wrap the Linear ones
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(model, tok, device_slots, max_rank, device, max_seqs, max_len, quantization)

    def max_input_tokens(self) -> int:
        return self.max_len

    def memory_bytes(self) -> dict[str, int]:
        return {**super().memory_bytes(), "kv_cache": self.kv_cache_bytes}

    @property
    def free_rows(self) -> range:
        """The cache rows not in use: every row after the ones in use."""
        return range(len(self._row_seq), self.max_seqs)

    def has_row(self) -> bool:
        return len(self._row_seq) < self.max_seqs

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, decode: bool,
                 first_row: int | None = None) -> torch.Tensor:
        """``rows``: each sequence's cache row; ``first_row``: set when they are first_row, first_row + 1,
        ... in order (decode then reads the cache as a slice)."""
        n, t = ids.shape
        masks: dict[object, torch.Tensor | None] = {}
        if decode:
            p = pos[:, 0]
            span = int(p.max()) + 1
            masks[None] = self._window_mask(pos, None, True)
        else:
            masks[None] = None  # right padding: a real query never sees the pads after it, causal is exact

        def attend(i, q, k, v, window, softcap, scaling):
            key = window if decode else _prefill_mask_key(window, softcap)
            mask = masks.get(key, False)
            if mask is False:
                mask = masks[key] = self._window_mask(pos, window, decode)
            kc, vc = self.k_cache[i], self.v_cache[i]
            if decode:
                kc[rows, :, p] = k[:, :, 0]
                vc[rows, :, p] = v[:, :, 0]
                if first_row is not None:
                    k, v = kc[first_row:first_row + n, :, :span], vc[first_row:first_row + n, :, :span]
                else:  # index_select: the rows of ``kc[rows, :, :span]`` at about 0.4x its cost on CPU
                    k = kc.narrow(2, 0, span).index_select(0, rows)
                    v = vc.narrow(2, 0, span).index_select(0, rows)
            else:
                kc[rows, :, :t] = k
                vc[rows, :, :t] = v
            return self._attention(q, k, v, mask, scaling, softcap, decode)

        return self._layers_forward(ids, pos, attend)

    def _attention(self, q, k, v, mask, scaling: float, softcap, decode: bool) -> torch.Tensor:
        """(n, heads, t, d) queries over (n, kv heads, keys, d); ``mask``: True = attend, or None: causal."""
        if softcap is not None:
            return _softcapped_attention(q, k, v, mask, scaling, softcap, self.n_heads // self.n_kv)
        if decode and self._eager_decode and q.shape[0] > 1:  # (one row: SDPA's kernel is the faster, measured)
            return _eager_decode_attention(q, k, v, mask, scaling, self.n_heads // self.n_kv)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=self._gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=self._gqa)

    def _layers_forward(self, ids: torch.Tensor, pos: torch.Tensor, attend) -> torch.Tensor:
        """The decoder over ``ids`` (b, t) at positions ``pos`` (b, t); ``attend(layer, q, k, v, window,
        softcap, scaling)`` keeps the layer's keys and values and answers its attention output
        (b, heads, t, head_dim), given q (b, heads, t, head_dim) and k, v (b, kv heads, t, head_dim)."""
        n, t = ids.shape
        h = self.inner.embed_tokens(ids)
        plan = self.plan
        if plan.embedding_multiplier is not None:
            h = h * plan.embedding_multiplier
        rm = plan.residual_multiplier
        if self.plan.layout.rope_per_layer_type:
            ropes = {lt: self.inner.rotary_emb(h, pos, lt) for lt in {lp.layer_type for lp in self.plan.layers}}
        else:
            cs = self.inner.rotary_emb(h, pos)
        fused = self.plan.layout.fused_qkv
        for i, (attn, pre_norm, post_attn_norm, pre_mlp_norm, post_mlp_norm, mlp, q_norm, k_norm, window,
                softcap, scaling, layer_type) in enumerate(self._layers):
            x = h if pre_norm is None else pre_norm(h)
            if fused:
                qkv = attn.qkv_proj(x)
                nq, nk = self.n_heads * self.head_dim, self.n_kv * self.head_dim
                q, k, v = qkv[..., :nq], qkv[..., nq:nq + nk], qkv[..., nq + nk:]
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            if q_norm is not None and not self._head_norm:
                q, k = q_norm(q), k_norm(k)
            q = q.view(n, t, self.n_heads, self.head_dim)
            k = k.view(n, t, self.n_kv, self.head_dim)
            if q_norm is not None and self._head_norm:
                q, k = q_norm(q), k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            v = v.view(n, t, self.n_kv, self.head_dim).transpose(1, 2)
            cos, sin = ropes[layer_type] if self.plan.layout.rope_per_layer_type else cs
            q, k = self._rope(q, k, cos, sin)
            o = attend(i, q, k, v, window, softcap, scaling)
            o = attn.o_proj(o.transpose(1, 2).reshape(n, t, self.n_heads * self.head_dim))
            if post_attn_norm is not None:
                o = post_attn_norm(o)
            h = h + (o if rm is None else o * rm)
            m = mlp(h if pre_mlp_norm is None else pre_mlp_norm(h))
            if post_mlp_norm is not None:
                m = post_mlp_norm(m)
            h = h + (m if rm is None else m * rm)
        return self.inner.norm(h)

    def _window_mask(self, pos: torch.Tensor, window: int | None, decode: bool) -> torch.Tensor:
        """Boolean mask (True = attend) for a query at p over keys in (p - window, p], as HF's
        sliding-window mask; without a window, plain causal (prefill needs it for soft-capped attention)."""
        if decode:
            p = pos[:, 0]
            keys = torch.arange(int(p.max()) + 1, device=self.device)[None, :]
            ok = keys <= p[:, None]
            if window is not None:
                ok = ok & (keys > p[:, None] - window)
            return ok[:, None, None, :]
        t = pos.shape[1]
        q, k = torch.arange(t, device=self.device)[:, None], torch.arange(t, device=self.device)[None, :]
        ok = k <= q
        if window is not None:
            ok = ok & (k > q - window)
        return ok[None, None]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(h)
        if self.plan.logits_divisor is not None:  # Granite
            logits = logits / self.plan.logits_divisor
        cap = self.plan.final_softcap
        if cap is not None:  # as HF's Gemma 2: divide, tanh, multiply
            logits = torch.tanh(logits / cap) * cap
        return logits

    def prefill_groups(self, lengths: list[int]) -> list[list[int]]:
        """How to split a prefill of prompts of these lengths into forwards (indices into ``lengths``).

        One forward pads every prompt to the longest, so a mixed batch (16 and 128 tokens) computes
        mostly padding; each extra forward costs about ``prefill_split_tokens`` tokens' worth of fixed
        work (the per-layer dispatch). Minimises ``sum(split + rows x longest)`` over groups of prompts
        consecutive in length order (an optimal split is always of that form)."""
        n = len(lengths)
        order = sorted(range(n), key=lambda i: lengths[i])
        if n <= 1 or self.prefill_split_tokens <= 0:
            return [list(range(n))] if n else []
        srt = [lengths[i] for i in order]
        best = [0.0] + [float("inf")] * n  # best[j]: the cost of the j shortest prompts
        cut = [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):  # prompts i..j-1 in length order in one forward, padded to srt[j - 1]
                c = best[i] + self.prefill_split_tokens + (j - i) * srt[j - 1]
                if c < best[j]:
                    best[j], cut[j] = c, i
        groups, j = [], n
        while j > 0:
            groups.append(order[cut[j]:j])
            j = cut[j]
        if len(groups) == 1:
            return [list(range(n))]
        return groups[::-1]

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Start sequences: take a cache row each, run their prompts (in as few padded forwards as
        ``prefill_groups`` finds cheapest), return their first tokens in the order given."""
        groups = self.prefill_groups([len(s.prompt) for s in seqs])
        if len(groups) == 1:
            return self._prefill(seqs)
        toks: list[int] = [0] * len(seqs)
        logits = None
        for g in groups:
            for i, t in zip(g, self._prefill([seqs[i] for i in g])):
                toks[i] = t
            if logits is None:
                logits = self.last_logits.new_empty((len(seqs), self.last_logits.shape[-1]))
            logits[g] = self.last_logits
        self.last_logits = logits
        return toks

    def _take_rows(self, seqs: list[Sequence]) -> None:
        """A cache row each, after the rows in use (and a seeded generator for a sequence with a seed)."""
        for s in seqs:
            if not self.has_row():
                raise RuntimeError(f"no free KV cache row: all {self.max_seqs} hold running sequences")
            s.row = len(self._row_seq)
            self._row_seq[s.row] = s
            if s.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.seed)

    def _prefill(self, seqs: list[Sequence]) -> list[int]:
        """One padded forward over these sequences' prompts (right padding: causal attention is exact)."""
        self._take_rows(seqs)
        t = max(len(s.prompt) for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([s.prompt + [pad] * (t - len(s.prompt)) for s in seqs], device=self.device)
        pos = torch.arange(t, device=self.device).expand(len(seqs), t)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        self.patch.ctx.set(torch.tensor([s.slot for s in seqs], device=self.device))
        try:
            h = self._forward(ids, pos, rows, decode=False)
            last = torch.tensor([len(s.prompt) - 1 for s in seqs], device=self.device)
            logits = self._logits(h[torch.arange(len(seqs)), last])
            for i, s in enumerate(seqs):
                if s.prompt_logprobs is not None and len(s.prompt) > 1:
                    from lorafleet.runtime.sampling import prompt_logprobs

                    s.prompt_token_logprobs = prompt_logprobs(self._logits(h[i, : len(s.prompt) - 1]),
                                                              s.prompt, s.prompt_logprobs)
        finally:
            self.patch.ctx.set(None)
        for s in seqs:
            s.pos = len(s.prompt)
        self.last_logits = logits
        return self._sample(logits, seqs)

    def packs(self, new: list[Sequence], running: list[Sequence]) -> bool:
        """Whether ``step`` runs ``new`` and ``running`` in one forward: both given, every row in use
        running (rows in use are always 0..n-1, so the running rows are those), no prompt logprobs asked,
        room for the new rows. Only then does ``step``'s error contract hold."""
        return (bool(new) and bool(running) and len(running) == len(self._row_seq)
                and all(s.row >= 0 for s in running) and all(s.prompt_logprobs is None for s in new)
                and len(self._row_seq) + len(new) <= self.max_seqs)

    @torch.inference_mode()
    def step(self, new: list[Sequence], running: list[Sequence]) -> tuple[list[int], list[int]]:
        """The prefill of ``new`` and a decode step of ``running`` in one forward: every token of both goes
        through the linear layers at once (one pass of the per-layer fixed cost, and no padding there);
        attention runs apart for the decode rows (over their cache) and the prompts (causal, padded).
        Returns (new's first tokens, running's next tokens), each in the order given. Where it ``packs``, on
        an error the new sequences' rows are freed again and nothing of ``running`` has moved, so the caller
        may retry the two apart; elsewhere it is a ``prefill`` and a ``decode`` call, with their own errors."""
        if not self.packs(new, running):
            return (self.prefill(new) if new else []), (self.decode(running) if running else [])
        order = sorted(range(len(running)), key=lambda i: running[i].row)
        run = [running[i] for i in order]
        try:
            return self._packed(new, run, order)
        except Exception:
            for s in reversed(new):  # the last rows: freeing them moves nothing
                self.finish(s)
            raise

    def _packed(self, new: list[Sequence], run: list[Sequence], order: list[int]) -> tuple[list[int], list[int]]:
        dev = self.device
        self._take_rows(new)
        nd, n_p = len(run), len(new)
        longest = max(len(s.prompt) for s in new)
        ids, pos, slots, dest, last = [], [], [], [], []
        for s in run:
            ids.append(s.generated[-1])
            pos.append(s.pos)
            slots.append(s.slot)
        for j, s in enumerate(new):
            ids += s.prompt
            pos += range(len(s.prompt))
            slots += [s.slot] * len(s.prompt)
            dest += range(j * longest, j * longest + len(s.prompt))
            last.append(len(ids) - 1)
        ids_t = torch.tensor([ids], device=dev)
        pos_t = torch.tensor([pos], device=dev)
        dest_t = torch.tensor(dest, device=dev)
        rows_d = torch.arange(nd, device=dev)
        rows_p = torch.tensor([s.row for s in new], device=dev)
        p_d = pos_t[0, :nd]
        span = max(s.pos for s in run) + 1
        pos_d = p_d[:, None]
        pos_p = torch.arange(longest, device=dev).expand(n_p, longest)
        masks_d: dict[object, torch.Tensor] = {}
        masks_p: dict[object, torch.Tensor | None] = {None: None}  # right padding: causal is exact

        def pad(x: torch.Tensor) -> torch.Tensor:  # (heads, prompt tokens, d) -> (n_p, heads, longest, d)
            out = x.new_zeros(x.shape[0], n_p * longest, x.shape[2])
            out[:, dest_t] = x
            return out.view(x.shape[0], n_p, longest, x.shape[2]).transpose(0, 1)

        def attend(i, q, k, v, window, softcap, scaling):
            kc, vc = self.k_cache[i], self.v_cache[i]
            # The decode rows: one query each over its cache row (rows 0..nd-1, a slice).
            mask = masks_d.get(window)
            if mask is None:
                mask = masks_d[window] = self._window_mask(pos_d, window, True)
            kc[rows_d, :, p_d] = k[0, :, :nd].transpose(0, 1)
            vc[rows_d, :, p_d] = v[0, :, :nd].transpose(0, 1)
            od = self._attention(q[0, :, :nd].transpose(0, 1).unsqueeze(2), kc[:nd, :, :span], vc[:nd, :, :span],
                                 mask, scaling, softcap, True)  # (nd, heads, 1, d)
            # The prompts, padded on the right as one prefill forward pads them.
            qp, kp, vp = pad(q[0, :, nd:]), pad(k[0, :, nd:]), pad(v[0, :, nd:])
            kc[rows_p, :, :longest] = kp
            vc[rows_p, :, :longest] = vp
            key = _prefill_mask_key(window, softcap)
            mp = masks_p.get(key, False)
            if mp is False:
                mp = masks_p[key] = self._window_mask(pos_p, window, False)
            op = self._attention(qp, kp, vp, mp, scaling, softcap, False)  # (n_p, heads, longest, d)
            op = op.transpose(0, 1).reshape(op.shape[1], n_p * longest, op.shape[3])[:, dest_t]
            return torch.cat([od[:, :, 0].transpose(0, 1), op], dim=1).unsqueeze(0)

        self.patch.ctx.set(torch.tensor(slots, device=dev))
        try:
            h = self._layers_forward(ids_t, pos_t, attend)
            logits = self._logits(h[0, torch.tensor(list(range(nd)) + last, device=dev)])
        finally:
            self.patch.ctx.set(None)
        for s in run:
            s.pos += 1
        for s in new:
            s.pos = len(s.prompt)
        toks = self._sample(logits, run + new)
        self.last_logits = logits  # running in row order, then new (tests compare them with PEFT's)
        back = [0] * nd
        for j, i in enumerate(order):
            back[i] = toks[j]
        return toks[nd:], back

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One decode step for every running sequence (each feeds its last generated token); the
        tokens in the order given."""
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].row)
        given = seqs
        if order != list(range(len(seqs))):
            seqs = [seqs[i] for i in order]
        first = seqs[0].row
        contiguous = seqs[-1].row - first == len(seqs) - 1
        ids = torch.tensor([[s.generated[-1]] for s in seqs], device=self.device)
        pos = torch.tensor([[s.pos] for s in seqs], device=self.device)
        rows = torch.tensor([s.row for s in seqs], device=self.device)
        self.patch.ctx.set(torch.tensor([s.slot for s in seqs], device=self.device))
        try:
            h = self._forward(ids, pos, rows, decode=True, first_row=first if contiguous else None)
            logits = self._logits(h[:, 0])
        finally:
            self.patch.ctx.set(None)
        for s in seqs:
            s.pos += 1
        toks = self._sample(logits, seqs)
        if seqs is not given:  # back to the order given
            back = [0] * len(order)
            for j, i in enumerate(order):
                back[i] = j
            logits = logits[torch.tensor(back, device=logits.device)]
            toks = [toks[j] for j in back]
        self.last_logits = logits  # kept for tests that compare logits with PEFT's
        return toks

    def finish(self, seq: Sequence) -> None:
        """Free the sequence's cache row; the sequence in the last row in use moves into it (its keys
        and values up to its position), so rows in use stay 0..n-1."""
        row = seq.row
        if row < 0:
            return
        seq.row = -1
        del self._row_seq[row]
        last = len(self._row_seq)  # rows in use now: 0..last-1, and ``last`` unless this was it
        moved = self._row_seq.pop(last, None)
        if moved is not None:
            span = min(max(moved.pos, len(moved.prompt)), self.max_len)
            for kc, vc in zip(self.k_cache, self.v_cache):
                kc[row, :, :span].copy_(kc[last, :, :span])
                vc[row, :, :span].copy_(vc[last, :, :span])
            moved.row = row
            self._row_seq[row] = moved

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        from lorafleet.runtime.sampling import choose

        return choose(logits, seqs)

    def is_done(self, seq: Sequence) -> bool:
        last = seq.generated[-1]
        return (len(seq.generated) >= seq.max_new_tokens or (last in self.eos_ids and not seq.ignore_eos)
                or last in seq.stop_ids or seq.pos >= self.max_len)


def _load(auto_class, model_dir, dtype: str, device: str, quantization: str):
    """The base model on its device; quantized by transformers' bitsandbytes quantizer when asked."""
    kwargs = quant.load_kwargs(quantization, DTYPES[dtype], device)
    model = auto_class.from_pretrained(str(model_dir), dtype=DTYPES[dtype], **kwargs)
    return model if kwargs else model.to(device)


def _opt(module, name: str | None):
    return None if name is None else getattr(module, name)


def _softcapped_attention(q, k, v, mask, scaling: float, softcap: float, groups: int) -> torch.Tensor:
    """HF's eager attention with Gemma 2's tanh soft-capping of the scores (SDPA cannot cap)."""
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scaling
    w = torch.tanh(w / softcap) * softcap
    w = w.masked_fill(~mask, float("-inf"))
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def _prefill_mask_key(window: int | None, softcap) -> object:
    """Which prefill mask a layer needs: None (causal SDPA, no mask), its window, or "causal" (an explicit
    causal mask, for soft-capped attention, which cannot use SDPA's)."""
    return "causal" if window is None and softcap is not None else window


def _eager_decode_attention(q, k, v, mask, scaling: float, groups: int) -> torch.Tensor:
    """HF's eager attention (``eager_attention_forward``: scores = q k^T x scaling, masked, softmax in float32
    cast back, times v) for one query per row; the query heads of a key head are grouped in a view rather
    than the keys repeated (the same products). q: (n, heads, 1, d); k, v: (n, kv heads, span, d)."""
    n, h, _, d = q.shape
    kv = k.shape[1]
    # The cache's slice is strided; a 16-bit matmul over it takes a slow path on CPU: a copy first costs
    # less (bfloat16, 64 rows x 101 keys: 565 us strided against 81 + 210 us).
    k, v = k.contiguous(), v.contiguous()
    qg = q.reshape(n, kv, groups, d)
    w = torch.matmul(qg, k.transpose(2, 3)) * scaling  # (n, kv, groups, span)
    w = w.masked_fill(~mask, float("-inf"))  # mask: (n, 1, 1, span)
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v).reshape(n, h, 1, d)


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple, set)) else [int(x)]

"""Batched multi-LoRA layers: every row of a batch carries a device-slot index and each LoRA'd linear
computes ``y = xW + (x A_i) B_i`` for all rows in one pass (slot 0 holds zeros = no adapter).

Decode rows (one token each) use a BGMV built on ``embedding_bag``: it reads each row's adapter once
without materialising a gathered copy. Prefill rows (many tokens) amortise a gather + bmm."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.contracts.adapter_rules import BaseModelInfo, Limits, fit_problems
from lorafleet.runtime.peft_format import AdapterFormatError, HostAdapter


class LoRAContext:
    """Per-forward state shared by every wrapped layer of one model: the slot index of each row."""

    def __init__(self) -> None:
        self.idx: torch.Tensor | None = None
        self._bags: dict[int, torch.Tensor] = {}

    def set(self, idx: torch.Tensor | None) -> None:
        # Rows without an adapter skip the LoRA path entirely when the whole batch is base-only.
        self.idx = idx if idx is not None and bool((idx != 0).any()) else None
        self._bags = {}

    def bag(self, width: int) -> torch.Tensor:
        """Indices ``slot*width + k`` for k < width, per row: one bag per row over its own adapter."""
        t = self._bags.get(width)
        if t is None:
            assert self.idx is not None
            t = self.idx[:, None] * width + torch.arange(width, device=self.idx.device)
            self._bags[width] = t
        return t


def _factor_dtype(base: nn.Linear, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the LoRA factors and the layer's activations are in: the weight's own, or for a
    quantized layer (int8/uint8 weights) the model's compute dtype."""
    w = base.weight
    if w.is_floating_point():
        return w.dtype
    if dtype is None:
        raise AdapterFormatError(f"a quantized {type(base).__name__} needs the model's compute dtype")
    return dtype


class MultiLoRALinear(nn.Module):
    """An ``nn.Linear`` plus stacked per-slot LoRA factors; rank grows to the largest adapter seen.

    The base may be a quantized linear (bitsandbytes ``Linear8bitLt``/``Linear4bit``): its output is
    the base term and the slot's LoRA delta is added in the compute dtype, as PEFT's LoRA layers over
    bitsandbytes do."""

    def __init__(self, base: nn.Linear, ctx: LoRAContext, slots: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.slots = slots
        self.rank = 0
        dt, dev = _factor_dtype(base, dtype), base.weight.device
        self.register_buffer("A", torch.zeros(slots + 1, self.in_features, 0, dtype=dt, device=dev),
                             persistent=False)
        self.register_buffer("B", torch.zeros(slots + 1, 0, self.out_features, dtype=dt, device=dev),
                             persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # lets code that inspects .weight (dtype, device) keep working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def grow(self, rank: int) -> None:
        if rank <= self.rank:
            return
        A = self.A.new_zeros(self.slots + 1, self.in_features, rank)
        B = self.B.new_zeros(self.slots + 1, rank, self.out_features)
        A[:, :, : self.rank] = self.A
        B[:, : self.rank, :] = self.B
        self.A, self.B, self.rank = A, B, rank

    def write(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        if a is None:
            self.A[slot].zero_()
            self.B[slot].zero_()
            return
        r = a.shape[1]
        self.grow(r)
        self.A[slot, :, :r].copy_(a)
        self.B[slot, :r, :].copy_(b)
        if r < self.rank:
            self.A[slot, :, r:].zero_()
            self.B[slot, r:, :].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.ctx.idx
        if idx is None or self.rank == 0:
            return y
        n = idx.shape[0]
        if x.numel() == n * self.in_features:  # one token per row: BGMV without a gathered copy
            x2 = x.reshape(n, self.in_features)
            h = F.embedding_bag(self.ctx.bag(self.in_features), self.A.view(-1, self.rank),
                                per_sample_weights=x2, mode="sum")
            d = F.embedding_bag(self.ctx.bag(self.rank), self.B.view(-1, self.out_features),
                                per_sample_weights=h, mode="sum")
            return y.add_(d.view(y.shape))
        # Many tokens per row (prefill): the gathered (in×r, r×out) copies are small next to the
        # tokens' activations, and baddbmm adds into y without another pass over it.
        x3 = x.reshape(n, -1, self.in_features)
        y3 = y.view(n, -1, self.out_features)
        # index_select copies whole slots; ``A[idx]`` (advanced indexing) measured slower.
        a, b = self.A.index_select(0, idx), self.B.index_select(0, idx)
        return torch.baddbmm(y3, torch.bmm(x3, a), b, out=y3).view(y.shape)


class MultiHead(nn.Module):
    """A per-slot classification head (PEFT ``modules_to_save``); label counts differ per slot, logits
    are padded to the widest head and each row is sliced to its own count by the caller."""

    def __init__(self, base: nn.Linear, ctx: LoRAContext, slots: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.slots = slots
        self.in_features = base.in_features
        self.width = 0
        dt, dev = _factor_dtype(base, dtype), base.weight.device
        self.register_buffer("W", torch.zeros(slots + 1, 0, self.in_features, dtype=dt, device=dev),
                             persistent=False)
        self.register_buffer("b", torch.zeros(slots + 1, 0, dtype=dt, device=dev), persistent=False)

    def write(self, slot: int, head: dict[str, torch.Tensor] | None) -> None:
        if head is None:
            self.W[slot].zero_()
            self.b[slot].zero_()
            return
        w = head["weight"]
        n = w.shape[0]
        if n > self.width:
            W = self.W.new_zeros(self.slots + 1, n, self.in_features)
            b = self.b.new_zeros(self.slots + 1, n)
            W[:, : self.width] = self.W
            b[:, : self.width] = self.b
            self.W, self.b, self.width = W, b, n
        self.W[slot].zero_()
        self.b[slot].zero_()
        self.W[slot, :n].copy_(w)
        if "bias" in head:
            self.b[slot, :n].copy_(head["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.ctx.idx
        if idx is None:
            return self.base(x)
        return torch.bmm(self.W[idx], x.unsqueeze(-1)).squeeze(-1) + self.b[idx]


def check_fit(adapter: HostAdapter, base: BaseModelInfo, max_rank: int) -> None:
    """``LoRAModelPatch.check`` against a model's layout (``base_info``), wherever the model is."""
    problems = fit_problems(
        {p: ((w.rank, w.a.shape[0]), (w.b.shape[1], w.rank)) for p, w in adapter.modules.items()},
        {p: {k: tuple(t.shape) for k, t in h.items()} for p, h in adapter.heads.items()},
        adapter.settings, Limits(max_rank=max_rank, max_adapter_bytes=None), base)
    if problems:
        raise AdapterFormatError("; ".join(p.message for p in problems), problems[0].category)


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


class LoRAModelPatch:
    """The wrapped layers of one base model; writes host adapters into device slots.

    Layers are wrapped lazily, the first time an adapter targets them, so modules no adapter uses
    cost nothing."""

    def __init__(self, model: nn.Module, slots: int, max_rank: int = 64, dtype: torch.dtype | None = None):
        self.model = model
        self.slots = slots
        self.max_rank = max_rank
        self.dtype = dtype  # the compute dtype, for layers whose weights are quantized
        self._base: BaseModelInfo | None = None
        self.ctx = LoRAContext()
        self.layers: dict[str, MultiLoRALinear] = {}
        self.heads: dict[str, MultiHead] = {}

    def _wrap(self, path: str, kind: type) -> nn.Module:
        try:
            module = self.model.get_submodule(path)
        except AttributeError:
            raise AdapterFormatError(f"target module {path!r} does not exist in the base model") from None
        if isinstance(module, kind):
            return module
        # bitsandbytes' quantized layers are nn.Linear subclasses whose forward gives the base term.
        if not isinstance(module, nn.Linear):
            raise AdapterFormatError(f"target module {path!r} is a {type(module).__name__}, "
                                     "only nn.Linear layers can carry LoRA or a per-tenant head")
        wrapped = kind(module, self.ctx, self.slots, self.dtype)
        parent, attr = _parent(self.model, path)
        setattr(parent, attr, wrapped)
        return wrapped

    def base_info(self) -> BaseModelInfo:
        """The loaded model as the adapter rules see it: every module's class and 2-D weight shape, by
        exact path (taken before any layer is wrapped, so it is the model's own layout)."""
        if self._base is None:
            weights, kinds = {}, {}
            for name, module in self.model.named_modules():
                if not name:
                    continue
                base = module.base if isinstance(module, (MultiLoRALinear, MultiHead)) else module
                kinds[name] = "Linear" if isinstance(base, nn.Linear) else type(base).__name__
                w = getattr(base, "weight", None)
                if isinstance(base, nn.Linear):  # a quantized layer's weight is packed: its features say
                    weights[name] = [base.out_features, base.in_features]
                elif isinstance(w, torch.Tensor) and w.dim() == 2:
                    weights[name] = list(w.shape)
            self._base = BaseModelInfo.build("", "", "", weights, kinds, exact_paths=True)
        return self._base

    def check(self, adapter: HostAdapter) -> None:
        """Refuse, before it takes a slot, an adapter that cannot fit this model (the adapter rules'
        shape checks against the loaded modules, with the pool's maxRank)."""
        check_fit(adapter, self.base_info(), self.max_rank)

    def install(self, slot: int, adapter: HostAdapter, check: bool = True) -> None:
        """Write ``adapter`` into ``slot``; ``check=False`` only for one this layout has checked already."""
        if check:
            self.check(adapter)
        for path in adapter.modules:
            if path not in self.layers:
                self.layers[path] = self._wrap(path, MultiLoRALinear)
        for path in adapter.heads:
            if path not in self.heads:
                self.heads[path] = self._wrap(path, MultiHead)
        for path, layer in self.layers.items():
            w = adapter.modules.get(path)
            layer.write(slot, None if w is None else w.a, None if w is None else w.b)
        for path, head in self.heads.items():
            head.write(slot, adapter.heads.get(path))


@dataclass
class _Slot:
    key: object
    refs: int = 0
    pinned: bool = False


class SlotAllocator:
    """Device slots 1..n with LRU eviction and reference counts: a slot an in-flight batch uses is never
    evicted or overwritten, pinned adapters stay. Pure bookkeeping; the caller writes the weights."""

    def __init__(self, slots: int):
        self.size = slots
        self.free = list(range(slots, 0, -1))
        self.by_key: dict[object, int] = {}
        self.slots: dict[int, _Slot] = {}
        self.lru: OrderedDict[object, None] = OrderedDict()  # unreferenced, unpinned residents
        self.dropped: set = set()  # unregistered while a batch still used them: freed on last release
        self.evictions = 0

    def slot_of(self, key) -> int | None:
        return self.by_key.get(key)

    def in_use(self) -> int:
        return len(self.by_key)

    def can_acquire(self, keys) -> bool:
        """Whether every key can hold a slot at once (residents count, free and evictable slots too)."""
        keys = set(keys)
        new = sum(1 for k in keys if k not in self.by_key)
        chosen_in_lru = sum(1 for k in keys if k in self.lru)
        return new <= len(self.free) + len(self.lru) - chosen_in_lru

    def acquire(self, key, pinned: bool = False) -> tuple[int, bool] | None:
        """A slot for ``key`` with one more reference; ``(slot, needs_write)`` or None when every slot is
        referenced or pinned."""
        slot = self.by_key.get(key)
        if slot is not None:
            s = self.slots[slot]
            s.refs += 1
            s.pinned = s.pinned or pinned
            self.lru.pop(key, None)
            return slot, False
        if self.free:
            slot = self.free.pop()
        elif self.lru:
            victim, _ = self.lru.popitem(last=False)
            slot = self.by_key.pop(victim)
            self.evictions += 1
        else:
            return None
        self.by_key[key] = slot
        self.slots[slot] = _Slot(key, 1, pinned)
        return slot, True

    def release(self, key) -> None:
        slot = self.by_key.get(key)
        if slot is None:
            return
        s = self.slots[slot]
        s.refs -= 1
        if s.refs <= 0 and key in self.dropped:
            s.refs = 0
            self.drop(key)
        elif s.refs <= 0 and not s.pinned:
            s.refs = 0
            self.lru[key] = None

    def pin(self, key, pinned: bool) -> None:
        slot = self.by_key.get(key)
        if slot is not None:
            s = self.slots[slot]
            s.pinned = pinned
            if not pinned and s.refs == 0:
                self.lru[key] = None
            elif pinned:
                self.lru.pop(key, None)

    def drop(self, key) -> bool:
        """Forget ``key`` if no batch references it; returns whether its slot was freed."""
        slot = self.by_key.get(key)
        if slot is None:
            return True
        if self.slots[slot].refs > 0:
            self.slots[slot].pinned = False
            self.dropped.add(key)
            return False
        self.dropped.discard(key)
        del self.by_key[key]
        del self.slots[slot]
        self.lru.pop(key, None)
        self.free.append(slot)
        return True

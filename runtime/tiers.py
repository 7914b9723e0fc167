"""Adapter registry and the host tier: registered (a directory in the cache) -> host memory
(``hostAdapters``, LRU) -> device slots (``deviceSlots``, owned by the model worker).

Requests name adapters (``name`` or ``name@version``); paths stay in here."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorafleet.contracts.adapter_rules import PERMANENT, TRANSIENT, Refused, task_problems
from lorafleet.contracts.names import split_versioned, versioned_name
from lorafleet.contracts.runtime_api import AdapterList, AdapterLoadRequest, AdapterState
from lorafleet.runtime.peft_format import AdapterFormatError, HostAdapter, load_adapter_dir


class ModelNotFound(LookupError):
    pass


class AdapterUnavailable(RuntimeError):
    """The adapter is registered but failed to load: 503 for this adapter only."""


@dataclass(eq=False)
class AdapterEntry:
    name: str
    version: str
    sha256: str
    tenant: str
    weight: int
    pinned: bool
    preload: bool
    path: Path
    key: int  # unique per registration: a re-registered version never reuses a stale slot
    error: str | None = None
    error_kind: str | None = None  # with error: permanent (the content is refused) or transient
    labels: list[str] | None = None
    task: str | None = None
    loaded_at: float = field(default_factory=time.time)
    requests: int = 0  # requests resolved to this version (the sidecar turns them into a rate for placement)

    @property
    def served(self) -> str:
        return versioned_name(self.name, self.version)


class AdapterManager:
    """Thread-safe registry + host LRU. ``check`` (optional) validates a parsed adapter against the
    base model so a bad one fails at load time, not on its first request."""

    def __init__(self, task: str, host_capacity: int, cache_dir: str | Path | None = None,
                 dtype: torch.dtype = torch.float32, check=None, on_event=None):
        self.task = task
        self.host_capacity = max(1, host_capacity)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.dtype = dtype
        self.check = check
        # Reads an adapter directory into host tensors; an engine whose adapters have another layout
        # (text-to-image) sets its own.
        self.read_adapter = load_adapter_dir
        self.on_event = on_event or (lambda kind, entry: None)
        self._lock = threading.RLock()
        self._keys = itertools.count(1)
        self.entries: dict[str, dict[str, AdapterEntry]] = {}
        self.host: OrderedDict[int, HostAdapter] = OrderedDict()
        self.resident: set[int] = set()  # keys in device slots (maintained by the worker)
        self.loads = 0
        self.host_evictions = 0

    # --- admin -----------------------------------------------------------------------------------
    def resolve_path(self, path: str) -> Path:
        p = Path(path)
        if p.is_absolute() or self.cache_dir is None:
            return p
        for cand in (self.cache_dir / p, self.cache_dir / "adapters" / p):
            if cand.is_dir():
                return cand
        return self.cache_dir / p

    def register(self, name: str, version: str, req: AdapterLoadRequest) -> tuple[AdapterEntry, bool]:
        """Register and load into the host tier. Idempotent for the same digest; returns whether
        anything changed. A load failure is recorded on the entry (state ``failed``), not raised."""
        with self._lock:
            old = self.entries.get(name, {}).get(version)
            if old is not None and old.sha256 == req.sha256 and old.error is None:
                changed = (old.weight, old.pinned, old.tenant) != (req.weight, req.pinned, req.tenant)
                old.weight, old.pinned, old.tenant, old.preload = req.weight, req.pinned, req.tenant, req.preload
                return old, changed
        entry = AdapterEntry(name, version, req.sha256, req.tenant, req.weight, req.pinned, req.preload,
                             self.resolve_path(req.path), next(self._keys))
        try:
            host = self._parse(entry)
        except Refused as e:
            entry.error, entry.error_kind, host = e.reason, e.kind, None
        except Exception as e:  # noqa: BLE001 - unreadable files, memory: this adapter only, retried
            entry.error, entry.error_kind, host = f"{type(e).__name__}: {e}", TRANSIENT, None
        with self._lock:
            if old is not None:
                self._forget(old)
            self.entries.setdefault(name, {})[version] = entry
            if host is not None:
                self._put_host(entry.key, host)
        if old is not None:
            # The replaced digest is unloaded as an unregistered version is: the engine frees its slot
            # (and vLLM its LoRA id) once its running requests end; new requests already get ``entry``.
            self.on_event("unloaded", old)
        self.on_event("failed" if entry.error else "loaded", entry)
        return entry, True

    def refuse(self, name: str, version: str, reason: str, tenant: str = "", kind: str = PERMANENT) -> AdapterEntry:
        """Record an adapter that could not even be registered (``lorafleet serve``: a hub id, files the
        digest could not read) as failed with its reason, so the listing shows it."""
        entry = AdapterEntry(name, version, "", tenant or name, 0, False, False, Path(), next(self._keys),
                             error=reason, error_kind=kind)
        with self._lock:
            old = self.entries.get(name, {}).get(version)
            if old is not None:
                self._forget(old)
            self.entries.setdefault(name, {})[version] = entry
        self.on_event("failed", entry)
        return entry

    def unregister(self, name: str, version: str) -> AdapterEntry | None:
        with self._lock:
            entry = self.entries.get(name, {}).pop(version, None)
            if entry is None:
                return None
            if not self.entries[name]:
                del self.entries[name]
            self._forget(entry)
        self.on_event("unloaded", entry)
        return entry

    def _forget(self, entry: AdapterEntry) -> None:
        self.host.pop(entry.key, None)

    def _parse(self, entry: AdapterEntry) -> HostAdapter:
        host = self.read_adapter(entry.path, self.dtype)
        problems = task_problems(host.task, bool(host.heads), self.task)
        if problems:
            raise AdapterFormatError(f"adapter {entry.served}: {problems[0].message}", "task", PERMANENT)
        if self.check is not None:
            self.check(host)
        entry.labels, entry.task = host.labels, host.task or self.task
        self.loads += 1
        return host

    def _put_host(self, key: int, host: HostAdapter) -> None:
        self.host[key] = host
        self.host.move_to_end(key)
        while len(self.host) > self.host_capacity:
            # Evict the least recently used one that is not in a device slot (those are reloaded fast
            # from their slot's owner anyway); fall back to the oldest.
            victim = next((k for k in self.host if k not in self.resident and k != key), None)
            if victim is None:
                break
            del self.host[victim]
            self.host_evictions += 1

    def host_adapter(self, entry: AdapterEntry) -> HostAdapter:
        """The host copy, read again from disk if the host tier evicted it."""
        with self._lock:
            host = self.host.get(entry.key)
            if host is not None:
                self.host.move_to_end(entry.key)
                return host
        host = self._parse(entry)
        with self._lock:
            self._put_host(entry.key, host)
        return host

    # --- requests --------------------------------------------------------------------------------
    def resolve(self, model: str) -> AdapterEntry:
        """``name`` -> a loaded version chosen by weight; ``name@version`` -> exactly that version."""
        name, version = split_versioned(model)
        with self._lock:
            versions = self.entries.get(name)
            if not versions or (version is not None and version not in versions):
                held = ", ".join(sorted(versions)) if versions else ""
                extra = f" (this replica holds versions: {held})" if held else ""
                raise ModelNotFound(f"The model '{model}' does not exist{extra}; GET /v1/models lists them")
            if version is not None:
                entry = versions[version]
            else:
                ok = [e for e in versions.values() if e.error is None]
                if not ok:
                    entry = next(iter(versions.values()))
                else:
                    weights = [e.weight for e in ok]
                    if sum(weights) == 0:  # every version draining: serve the newest one held
                        entry = max(ok, key=lambda e: e.loaded_at)
                    else:
                        entry = random.choices(ok, weights=weights)[0]
            entry.requests += 1
        if entry.error is not None:
            raise AdapterUnavailable(f"adapter {entry.served} failed to load: {entry.error}")
        return entry

    def state(self, entry: AdapterEntry) -> str:
        if entry.error is not None:
            return "failed"
        if entry.key in self.resident:
            return "device"
        return "host" if entry.key in self.host else "registered"

    def all(self) -> list[AdapterEntry]:
        with self._lock:
            return [e for versions in self.entries.values() for e in versions.values()]

    def state_of(self, e: AdapterEntry) -> AdapterState:
        return AdapterState(name=e.name, version=e.version, sha256=e.sha256, tenant=e.tenant, weight=e.weight,
                            pinned=e.pinned, state=self.state(e), error=e.error, error_kind=e.error_kind,
                            requests=e.requests)

    def listing(self, instance: str) -> AdapterList:
        return AdapterList(instance=instance, adapters=[self.state_of(e) for e in self.all()])

    def counts(self) -> dict[str, int]:
        out = {"registered": 0, "host": 0, "device": 0, "failed": 0}
        for e in self.all():
            out[self.state(e)] += 1
        return out

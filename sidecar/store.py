"""The sidecar's side of the content-addressed cache: install a digest (download to ``tmp/`` ->
verify -> validate -> rename into place -> fsync in the background), account for its size, remove what
is collected.

A directory under ``adapters/`` or ``models/`` appears only through the final ``rename``, so readers
(the runtime, a restarted sidecar) never see a partial one. Durability is off the serving path: the
runtime may load an entry from the page cache while its files are still being written to disk; a
background thread fsyncs it and then writes its ``durable/<digest>`` marker. After a crash (power loss,
node reset) an entry without its marker may hold torn files, so ``scan`` verifies it again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from lorafleet.contracts.cache import CacheLayout
from lorafleet.contracts.digest import directory_digest, regular_files

from .metrics import Metrics
from .plan import CachedContent
from .storage import Storages, fsync_path, fsync_tree, remove_tree
from lorafleet.contracts.adapter_rules import (TRANSIENT, BaseModelInfo, Limits, Refused, adapter_problems,
                                               listing_problems)

log = logging.getLogger("lorafleet.sidecar")


class DiskFull(Exception):
    """No room for a download even after evicting every unreferenced entry: retried later."""


def digest_of_hashes(hashes: dict[str, str]) -> str:
    """The directory digest (contracts.digest) from per-file hashes computed while downloading."""
    h = hashlib.sha256()
    for rel in sorted(hashes, key=lambda p: p.encode("utf-8", "surrogateescape")):
        h.update(f"{hashes[rel]}  {rel}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def tree_size(root: Path) -> int:
    return sum((root / rel).stat().st_size for rel in regular_files(root))


class ContentStore:
    def __init__(self, layout: CacheLayout, storages: Storages, limits: Limits, metrics: Metrics,
                 disk_bytes: int | None = None):
        self.layout = layout.ensure()
        self.storages = storages
        self.limits = limits
        self.metrics = metrics
        self.disk_bytes = disk_bytes
        self._lock = threading.Lock()
        self._entries: dict[str, CachedContent] = {}
        self._reserved = 0
        self.model_bytes = 0
        # Called (under no lock) to free ``needed`` bytes of unreferenced content; returns bytes freed.
        self.make_room: Callable[[int], int] | None = None
        self._durable_q: queue.Queue[Path] = queue.Queue()
        self._durable_thread: threading.Thread | None = None

    # --------------------------------------------------------------------------- inventory

    def scan(self) -> None:
        """Take stock after a (re)start: leftovers in ``tmp/`` are removed; durable entries stay; an
        entry without its durable marker is verified again (made durable if whole, removed if not)."""
        for leftover in self.layout.tmp.iterdir():
            remove_tree(leftover) if leftover.is_dir() else leftover.unlink(missing_ok=True)
        cached = {d: self.layout.adapter_dir(d) for d in self.layout.cached_adapters()}
        cached |= {d: self.layout.model_dir(d) for d in self.layout.cached_models()}
        for marker in self.layout.durable.iterdir():
            if marker.name not in cached:
                marker.unlink(missing_ok=True)
        for digest, path in sorted(cached.items()):
            if not self.layout.durable_marker(digest).exists():
                self._verify_again(path, digest)
        entries = {}
        for digest in self.layout.cached_adapters():
            d = self.layout.adapter_dir(digest)
            entries[digest] = CachedContent(digest, tree_size(d), d.stat().st_mtime)
        self.model_bytes = sum(tree_size(self.layout.model_dir(m)) for m in self.layout.cached_models())
        with self._lock:
            self._entries = entries
        self._gauge()

    def _verify_again(self, path: Path, digest: str) -> None:
        t0 = time.monotonic()
        got = directory_digest(path)
        if got == digest:
            self._make_durable(path)
            log.info("%s had no durable marker (the sidecar stopped before it was on disk); verified "
                     "again in %.2f s, kept", path, time.monotonic() - t0)
            return
        log.warning("%s had no durable marker and its files no longer match the digest (%s): torn by a "
                    "crash; removed, it is downloaded again if the routes still want it", path, got)
        self._move_out_and_delete(path, digest)

    # ------------------------------------------------------------------------------ durability

    def _make_durable(self, path: Path) -> None:
        fsync_tree(path)
        fsync_path(path.parent)
        marker = self.layout.durable_marker(path.name)
        marker.touch()
        fsync_path(marker.parent)

    def _durable_loop(self) -> None:
        while True:
            path = self._durable_q.get()
            try:
                if path.is_dir():  # gone already if collected right after install
                    t0 = time.monotonic()
                    self._make_durable(path)
                    self.metrics.durable_seconds.observe(time.monotonic() - t0)
            except OSError as e:
                # Not fatal to serving; without its marker the entry is verified again after a restart.
                log.warning("could not make %s durable: %s", path, e)
            finally:
                self._durable_q.task_done()

    def _queue_durable(self, path: Path) -> None:
        with self._lock:
            if self._durable_thread is None:
                self._durable_thread = threading.Thread(target=self._durable_loop, name="cache-fsync", daemon=True)
                self._durable_thread.start()
        self._durable_q.put(path)

    def wait_durable(self, timeout: float = 60.0) -> bool:
        """Wait until every installed entry is on disk with its marker (shutdown, tests); False if
        ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self._durable_q.unfinished_tasks:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def entries(self) -> dict[str, CachedContent]:
        with self._lock:
            return dict(self._entries)

    def used_bytes(self) -> int:
        with self._lock:
            return self.model_bytes + sum(e.size for e in self._entries.values()) + self._reserved

    def touch(self, digests: set[str], now: float) -> None:
        """Mark entries as referenced now (kept in memory; the directory's mtime is set when an entry
        stops being referenced, so LRU order survives a restart)."""
        with self._lock:
            for d in digests:
                e = self._entries.get(d)
                if e and e.last_used != now:
                    self._entries[d] = CachedContent(d, e.size, now)

    def mark_unreferenced(self, digest: str) -> None:
        e = self.entries().get(digest)
        if e:
            try:
                os.utime(self.layout.adapter_dir(digest), (e.last_used, e.last_used))
            except OSError:
                pass

    def remove(self, digest: str) -> None:
        """Move out of ``adapters/`` first (atomic), then delete: never a half-deleted entry in place."""
        with self._lock:
            self._entries.pop(digest, None)
        self._move_out_and_delete(self.layout.adapter_dir(digest), digest)
        log.info("removed %s from the cache", digest)
        self._gauge()

    def _move_out_and_delete(self, src: Path, digest: str) -> None:
        # The marker goes first: a marker without its entry is harmless, an entry left behind by a
        # crash without its marker is verified again.
        self.layout.durable_marker(digest).unlink(missing_ok=True)
        if src.is_dir():
            trash = self.layout.new_tmp_dir(f"gc-{digest[:12]}")
            try:
                os.rename(src, trash / "x")
            except FileNotFoundError:  # removed concurrently (eviction for a download)
                pass
            remove_tree(trash)

    def _gauge(self) -> None:
        self.metrics.cache_bytes.set(self.used_bytes())
        self.metrics.adapters.labels("cached").set(len(self._entries))

    # ------------------------------------------------------------------------------ install

    def _reserve(self, needed: int) -> None:
        if self.disk_bytes is None:
            with self._lock:
                self._reserved += needed
            return
        for attempt in range(2):
            with self._lock:
                used = self.model_bytes + sum(e.size for e in self._entries.values()) + self._reserved
                if used + needed <= self.disk_bytes:
                    self._reserved += needed
                    return
                short = used + needed - self.disk_bytes
            if attempt == 0 and self.make_room is not None:
                self.make_room(short)
        raise DiskFull(f"cache full: needs {needed} bytes, {used} of diskBytes {self.disk_bytes} in use "
                       f"by content the routes reference (raise spec.cache.diskBytes)")

    def install_adapter(self, digest: str, uri: str, base: BaseModelInfo | None) -> Path:
        final = self.layout.adapter_dir(digest)
        if final.is_dir():
            return final
        return self._install(digest, uri, final, lambda tmp: adapter_problems(tmp, self.limits, base),
                             self.limits)

    def install_model(self, digest: str, uri: str) -> Path:
        final = self.layout.model_dir(digest)
        if final.is_dir():
            return final
        # A model is not an adapter: only the path and pickle checks apply, no size limit.
        path = self._install(digest, uri, final, None, Limits(max_rank=1 << 30, max_adapter_bytes=None))
        self.model_bytes += tree_size(path)
        self._gauge()
        return path

    def _install(self, digest: str, uri: str, final: Path, validate, limits: Limits) -> Path:
        storage = self.storages.for_uri(uri)
        entries = storage.listing(uri)
        problems = listing_problems([(e.rel, e.size) for e in entries], limits)
        if problems:
            raise Refused.of(problems)
        size = sum(e.size for e in entries)
        self._reserve(size)
        tmp = self.layout.new_tmp_dir(digest[:12])
        try:
            t0 = time.monotonic()
            hashes = storage.fetch(uri, tmp, self.metrics.downloaded_bytes.inc, entries=entries)
            self.metrics.download_seconds.observe(time.monotonic() - t0)
            t1 = time.monotonic()
            got = digest_of_hashes(hashes)
            # Only files we wrote are there (so the digest we computed covers the whole directory).
            if set(regular_files(tmp)) != set(hashes):
                got = directory_digest(tmp)
            self.metrics.verify_seconds.observe(time.monotonic() - t1)
            if got != digest:
                raise Refused(f"digest mismatch: {uri} has {got}, the route says {digest} (content under "
                              f"a known version changed in storage; push a new version instead)",
                              "digest_mismatch", TRANSIENT)
            if validate is not None:
                problems = validate(tmp)
                if problems:
                    raise Refused.of(problems)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # lost a race with ourselves: the other copy is as good
                    raise
            self._queue_durable(final)
            if final.parent == self.layout.adapters:
                with self._lock:
                    self._entries[digest] = CachedContent(digest, size, time.time())
            log.info("installed %s from %s (%d bytes)", digest, uri, size)
            return final
        finally:
            with self._lock:
                self._reserved -= size
            if tmp.exists():
                remove_tree(tmp)
            self._gauge()


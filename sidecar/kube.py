"""The sidecar's two uses of the Kubernetes API: watch its pool's routes ConfigMaps, and patch its own
pod's ``lorafleet.io/sync`` annotation. The only module here that talks to the API server."""

from __future__ import annotations

import functools
import logging
import threading
from typing import Callable

from lightkube import Client, KubeConfig
from lightkube.resources.core_v1 import ConfigMap, Pod
from lightkube.types import PatchType

from lorafleet.contracts import names
from lorafleet.contracts.kubeio import Informer, warm_decoders
from lorafleet.contracts.routes import RoutesTable, SyncReport

log = logging.getLogger("lorafleet.sidecar")


def warm_up_decoders() -> None:
    """Build lightkube's (msgspec) decoders for the types the sidecar reads, once, in one thread
    (``kubeio.warm_decoders``: several threads building one at once crashed the process, seen as
    SIGSEGV when the routes watches all listed at the same moment)."""
    warm_decoders((ConfigMap, Pod))


def make_client(kubeconfig: str | None = None) -> Client:
    """In-cluster credentials, else ``KUBECONFIG`` (``KubeConfig.from_env``)."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    return Client(config=config, field_manager=names.FIELD_MANAGER, trust_env=False)


class RoutesWatcher:
    """Keeps the merged routes table of ``pool`` current.

    The sidecar's Role may read only its pool's routes ConfigMaps, by name (RBAC authorizes a list or
    watch naming one object through ``fieldSelector=metadata.name=...``), so there is one watch per
    name: the unsharded ``lorafleet-routes-<pool>`` and shards ``-0 .. -(2N-1)`` for the largest shard
    count N seen (the operator's Role covers the next doubling too). Each is a ``contracts.kubeio.Informer``:
    it lists once, then watches from the list's resourceVersion; after an error (a dropped connection,
    an API server restart) it watches again from the last version it saw, and lists again only on 410
    Gone. The label ``lorafleet.io/routes-for=<pool>`` is required as well.

    Only a complete, consistent set of shards is published (``RoutesTable.merge_complete``), once
    every watch has listed, and only when it is newer than the one published before: a reshard or a
    generation caught half written, or ConfigMaps deleted, never unloads anything. Meanwhile the last
    complete table stays in force (fail static) and ``on_stale`` is told why (None once it is over).
    """

    def __init__(self, new_client: Callable[[], Client], namespace: str, pool: str,
                 on_change: Callable[[RoutesTable], None], server_timeout: int = 60,
                 on_stale: Callable[[str | None], None] | None = None):
        # Each informer holds a streaming watch open for minutes: each gets a client (and connection
        # pool) of its own, so no two threads ever share a TLS connection.
        self.new_client, self.namespace, self.pool = new_client, namespace, pool
        self.on_change = on_change
        self.server_timeout = server_timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._shards: dict[str, RoutesTable] = {}
        self._listed: set[str] = set()
        self._informers: dict[str, Informer] = {}
        self.on_stale = on_stale
        self.published: RoutesTable | None = None
        self.stale: str | None = None

    def start(self) -> "RoutesWatcher":
        warm_up_decoders()
        self._ensure_watches(1)
        return self

    def stop(self) -> None:
        # Only the flag: closing a client from this thread while a watch thread is blocked reading its
        # socket frees the fd number for reuse, and the watch's TLS state then reads and writes another
        # socket (seen as SSL errors and corrupted HTTP in other clients of the same process). Watches
        # end at their next event or server timeout.
        self._stop.set()
        with self._lock:
            for inf in self._informers.values():
                inf.stop()

    def alive(self) -> bool:
        """Every informer's thread runs (each retries for ever, until stopped)."""
        with self._lock:
            return self._stop.is_set() or all(inf.alive() for inf in self._informers.values())

    def retrying(self) -> bool:
        """Some informer's last list or watch failed (the API server unreachable, a refusal)."""
        with self._lock:
            return any(inf.last_error is not None for inf in self._informers.values())

    @property
    def lists(self) -> int:
        """LIST requests made: one per ConfigMap name watched, then one per expired (410) watch."""
        with self._lock:
            return sum(inf.lists for inf in self._informers.values())

    def _ensure_watches(self, shards: int) -> None:
        wanted = [names.routes_configmap_name(self.pool)]
        wanted += [names.routes_configmap_name(self.pool, i) for i in range(max(2, 2 * shards))]
        with self._lock:  # started under the lock: alive() never sees one not yet running
            for name in wanted:
                if name not in self._informers and not self._stop.is_set():
                    inf = Informer(self.new_client, ConfigMap, self.namespace,
                                   labels={names.LABEL_ROUTES_FOR: self.pool}, fields={"metadata.name": name},
                                   server_timeout=self.server_timeout,
                                   what=f"routes ConfigMap {self.namespace}/{name}")
                    inf.subscribe(functools.partial(self._changed, name))
                    self._informers[name] = inf.start()

    def _changed(self, name: str) -> None:
        """The informer of ConfigMap ``name`` has listed, or seen it change or go (its thread)."""
        with self._lock:
            inf = self._informers[name]
        items = inf.objects()
        self._update(name, self._parse(items[0]) if items else None, listed=True)

    def _parse(self, cm) -> RoutesTable | None:
        text = (cm.data or {}).get(names.ROUTES_KEY)
        if not text:
            return None
        try:
            return RoutesTable.from_json(text)
        except ValueError as e:
            log.error("ConfigMap %s/%s: %s is not a routes table (%s); ignoring it",
                      self.namespace, cm.metadata.name, names.ROUTES_KEY, e)
            return None

    def _update(self, name: str, table: RoutesTable | None, listed: bool = False) -> None:
        with self._lock:
            if table is None:
                self._shards.pop(name, None)
            else:
                self._shards[name] = table
            if listed:
                self._listed.add(name)
            most = max([s.shards or 1 for s in self._shards.values()] + [1])
        self._ensure_watches(most)
        with self._lock:
            if not set(self._informers) <= self._listed:
                return  # some watch has not listed yet: its shard may be missing from the view
            merged = RoutesTable.merge_complete(self.pool, self._shards.values())
            published = self.published
            if merged is not None and (published is None or merged.generation >= published.generation):
                self.published = merged
            elif published is None:
                return  # nothing complete seen yet: wait (the sync loop does nothing without routes)
            else:
                merged = None
            in_force = self.published
            newest = max((t.generation for t in self._shards.values() if t.pool == self.pool), default=None)
            gone = newest is None
            stale = self._why_stale(in_force) if gone or newest > in_force.generation else None
        self._set_stale(stale, gone)
        if merged is not None and merged != published:
            self.on_change(merged)

    def _why_stale(self, published: RoutesTable) -> str:
        have = ", ".join(f"{n}@{t.generation}" for n, t in sorted(self._shards.items()))
        if not self._shards:
            return (f"routes ConfigMaps of pool {self.pool!r} are gone; serving the last complete table "
                    f"(generation {published.generation}) until they are back")
        return (f"routes of pool {self.pool!r} are not a complete set of shards ({have}); serving the last "
                f"complete table (generation {published.generation})")

    def _set_stale(self, stale: str | None, gone: bool) -> None:
        if stale == self.stale:
            return
        if stale is None:
            log.info("routes of pool %r complete again", self.pool)
        elif gone:
            log.warning("%s", stale)
        else:
            log.info("%s", stale)  # a reshard or a write in progress: usually over in milliseconds
        self.stale = stale
        if self.on_stale is not None:
            self.on_stale(stale)


class PodReporter:
    """Patches the sync report onto this pod (only when it changed), and while the routes drain this
    pod (a scale down removes it) the pod-deletion-cost that makes the ReplicaSet delete it first."""

    def __init__(self, client: Client, namespace: str, pod: str):
        self.client, self.namespace, self.pod = client, namespace, pod
        self.last: str | None = None
        self.marked = False  # this sidecar set the deletion cost (and removes it once not draining)

    def report(self, report: SyncReport, draining: bool = False) -> bool:
        text = report.to_json()
        if text == self.last and draining == self.marked:
            return False
        annotations: dict[str, str | None] = {names.SYNC_ANNOTATION: text}
        if draining != self.marked:
            # Only a cost this sidecar set is removed: one the pool's podAnnotations give stays.
            annotations[names.POD_DELETION_COST_ANNOTATION] = names.DRAIN_DELETION_COST if draining else None
        self.client.patch(Pod, self.pod, {"metadata": {"annotations": annotations}},
                          namespace=self.namespace, patch_type=PatchType.MERGE)
        self.last, self.marked = text, draining
        return True

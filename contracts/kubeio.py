"""What every component repeats against the Kubernetes API (torch-free, lightkube only): our custom
resources as lightkube resources, pod readiness, backoff with jitter, and ``Informer``, a list-then-watch
store of one kind (client-go's informer, in a thread): a change is seen within one watch event, and
an idle cluster costs no LIST at all."""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Iterable
from typing import Any

from lightkube.generic_resource import create_namespaced_resource

from . import names

log = logging.getLogger("lorafleet.kube")

LoRAAdapterResource = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND,
                                                 names.ADAPTER_PLURAL)
BaseModelPoolResource = create_namespaced_resource(names.GROUP, names.VERSION, names.POOL_KIND, names.POOL_PLURAL)
LoRATenantResource = create_namespaced_resource(names.GROUP, names.VERSION, names.TENANT_KIND,
                                                names.TENANT_PLURAL)


def jittered(delay: float) -> float:
    """``delay`` with jitter: half of it fixed, half random, so replicas that failed together do not
    retry in step."""
    return delay / 2 + random.uniform(0, delay / 2)


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with jitter for the ``attempt``-th failure in a row (1, 2, ...): ``base``,
    then doubling, at most ``cap``, each ``jittered``."""
    return jittered(min(cap, base * 2 ** max(0, attempt - 1)))


def pod_ready(pod: Any) -> bool:
    """Kubernetes' Ready condition of a pod not being deleted; ``pod`` a lightkube ``Pod`` or its raw body."""
    if isinstance(pod, dict):
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        return not meta.get("deletionTimestamp") and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    if pod.metadata.deletionTimestamp or not pod.status:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def warm_decoders(resources: Iterable[Any]) -> None:
    """lightkube 1.0 builds msgspec decoders lazily; two threads building the same one at once crashed
    the process (docs/architecture.md, hazards). Build them once, in one thread, before others run."""
    from lightkube.core.decoders import decode_list, decode_object, decode_watch_event

    for res in resources:
        decode_list(b'{"items": [], "metadata": {"resourceVersion": "1"}}', res)
        decode_object(b'{"metadata": {"name": "w", "resourceVersion": "1"}}', res)
    decode_watch_event(b'{"type": "ADDED", "object": {"metadata": {"name": "w"}}}')


class NotSynced(RuntimeError):
    """An informer has not listed yet: its view is not to be taken for an empty cluster."""


class Informer:
    """The objects of one kind (in ``namespace``, with ``labels``/``fields``), kept current by a thread.

    It lists once, then watches from the list's resourceVersion (a watch the server ends after
    ``server_timeout`` is resumed from the last event seen, by lightkube). When the network fails (the
    API server unreachable, a dropped stream) it keeps what it has, waits ``backoff`` and watches again
    from where it was; when the server answers with an error (410 Gone: it has compacted past that
    version; a 500 or a 403) it lists again (at once on 410, after ``backoff`` otherwise) and replaces
    its store, so objects deleted meanwhile go too. ``last_error`` is the last failure until the API
    server answers again. ``on_change`` is called (from the thread)
    after every change of the store. Each informer has a client of its own (``new_client``): a watch
    holds its connection open for minutes and no two threads share one. It stops by flag only
    (docs/architecture.md, hazards: never close a client another thread reads)."""

    def __init__(self, new_client: Callable[[], Any], res: Any, namespace: str | None = None, *,
                 labels: dict | None = None, fields: dict | None = None, server_timeout: int = 60,
                 retry_base: float = 0.4, retry_cap: float = 10.0, what: str | None = None):
        self.new_client, self.res, self.namespace = new_client, res, namespace
        self.labels, self.fields, self.server_timeout = labels, fields, server_timeout
        self.retry_base, self.retry_cap = retry_base, retry_cap
        self.what = what or f"{getattr(res, '__name__', res)} in {namespace or 'every namespace'}"
        self._objects: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listeners: list[Callable[[], None]] = []
        self.synced = threading.Event()  # set once the first list is in
        self.version = 0                 # grows with every change of the store
        self.lists = 0                   # LIST requests made (the first, and one per 410 or failed list)
        self.last_error: str | None = None
        self._thread: threading.Thread | None = None

    def subscribe(self, listener: Callable[[], None]) -> None:
        """``listener()`` after every change, from the informer's thread: keep it short."""
        self._listeners.append(listener)

    def start(self) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer {self.what}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        """Its thread runs (it retries for ever until stopped), or it was stopped."""
        return self._stop.is_set() or (self._thread is not None and self._thread.is_alive())

    def objects(self) -> list[Any]:
        """The objects as last seen (raises ``NotSynced`` before the first list)."""
        if not self.synced.is_set():
            raise NotSynced(f"{self.what} not listed yet" + (f" (last error: {self.last_error})"
                                                              if self.last_error else ""))
        with self._lock:
            return list(self._objects.values())

    def wait_synced(self, timeout: float) -> None:
        if not self.synced.wait(timeout):
            raise NotSynced(f"{self.what} not listed within {timeout:g}s"
                            + (f": {self.last_error}" if self.last_error else ""))

    @staticmethod
    def _key(obj: Any) -> tuple[str, str]:
        return obj.metadata.namespace or "", obj.metadata.name

    def _changed(self) -> None:
        self.version += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - a listener's fault must not end the watch
                log.exception("informer %s: a change listener failed", self.what)

    def _run(self) -> None:
        from lightkube.core.exceptions import ApiError

        client = self.new_client()
        self._hear_responses(client)
        selectors = {"namespace": self.namespace, "labels": self.labels, "fields": self.fields}
        rv: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    self.lists += 1
                    listing = client.list(self.res, **selectors)
                    items = list(listing)
                    with self._lock:
                        self._objects = {self._key(o): o for o in items}
                    rv = listing.resourceVersion
                    failures, self.last_error = 0, None
                    self.synced.set()
                    self._changed()
                for kind, obj in client.watch(self.res, **selectors, resource_version=rv,
                                              server_timeout=self.server_timeout):
                    if self._stop.is_set():
                        return
                    rv = obj.metadata.resourceVersion or rv
                    with self._lock:
                        if kind == "DELETED":
                            self._objects.pop(self._key(obj), None)
                        else:
                            self._objects[self._key(obj)] = obj
                    if failures or self.last_error:
                        log.info("informer %s: watching again", self.what)
                    failures, self.last_error = 0, None
                    self._changed()
                # The stream ended without an error: watch again from the last version seen.
            except ApiError as e:
                if self._stop.is_set():
                    return
                if e.status.code == 410:  # compacted past our version: only a fresh list is whole
                    log.info("informer %s: resourceVersion %s expired (410 Gone); listing again", self.what, rv)
                    rv = None
                    continue
                # The server itself refused the watch (a 500 such as "etcd event received with PrevKv=nil"
                # once etcd is compacted under a selector, a 403): watching from the same version would
                # be refused the same way for ever, so list again, as client-go's reflector does.
                rv = None
                failures = self._failed(failures, e, then="listing again")
            except Exception as e:  # noqa: BLE001 - unreachable or dropped: keep the view, resume the watch
                if self._stop.is_set():
                    return
                failures = self._failed(failures, e, then="watching again" if rv is not None else "listing again")

    def _hear_responses(self, client: Any) -> None:
        """Clear ``last_error`` as soon as the API server accepts a request again. lightkube resumes a
        watch the server ended by itself and says nothing until an event comes, which for a quiet
        object can be never: the response hook of its httpx client is the only sign the watch works."""
        http = getattr(getattr(client, "_client", None), "_client", None)
        hooks = getattr(http, "event_hooks", None)
        if isinstance(hooks, dict) and isinstance(hooks.get("response"), list):
            hooks["response"].append(self._responded)

    def _responded(self, response: Any) -> None:
        if self.last_error is not None and getattr(response, "is_success", False):
            log.debug("informer %s: the API server answers again", self.what)
            self.last_error = None

    def _failed(self, failures: int, e: Exception, then: str) -> int:
        failures += 1
        delay = backoff(failures, self.retry_base, self.retry_cap)
        self.last_error = f"{type(e).__name__}: {e}"
        log.warning("informer %s: %s; keeping the last view, %s in %.1fs", self.what, self.last_error, then,
                    delay)
        self._stop.wait(delay)
        return failures

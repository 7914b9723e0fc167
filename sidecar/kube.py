"""The sidecar's two uses of the Kubernetes API: watch its pool's routes ConfigMaps, and patch its own
pod's ``lorafleet.io/sync`` annotation. The only module here that talks to the API server."""

from __future__ import annotations

import logging
import random
import threading
from typing import Callable

from lightkube import Client, KubeConfig
from lightkube.resources.core_v1 import ConfigMap, Pod
from lightkube.types import PatchType

from lorafleet.contracts import names
from lorafleet.contracts.routes import RoutesTable, SyncReport

log = logging.getLogger("lorafleet.sidecar")


def make_client(kubeconfig: str | None = None) -> Client:
    """In-cluster credentials, else ``KUBECONFIG`` (``KubeConfig.from_env``)."""
    config = KubeConfig.from_file(kubeconfig) if kubeconfig else KubeConfig.from_env()
    return Client(config=config, field_manager=names.FIELD_MANAGER, trust_env=False)


class RoutesWatcher:
    """Keeps the merged routes table of ``pool`` current: list, then watch from the list's
    resourceVersion; on any error (410 Gone, dropped connection, API server restart) list again."""

    def __init__(self, client: Client, namespace: str, pool: str, on_change: Callable[[RoutesTable], None],
                 server_timeout: int = 60):
        self.client, self.namespace, self.pool = client, namespace, pool
        self.on_change = on_change
        self.server_timeout = server_timeout
        self._stop = threading.Event()
        self._shards: dict[str, RoutesTable] = {}
        self.thread = threading.Thread(target=self._run, name="routes-watch", daemon=True)

    def start(self) -> "RoutesWatcher":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        try:  # unblocks a watch waiting for events
            self.client._client._client.close()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass

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

    def _publish(self) -> None:
        self.on_change(RoutesTable.merge(self.pool, self._shards.values()))

    def _run(self) -> None:
        labels = {names.LABEL_ROUTES_FOR: self.pool}
        failures = 0
        while not self._stop.is_set():
            try:
                listing = self.client.list(ConfigMap, namespace=self.namespace, labels=labels)
                shards = {}
                for cm in listing:
                    t = self._parse(cm)
                    if t is not None:
                        shards[cm.metadata.name] = t
                self._shards = shards
                self._publish()
                failures = 0
                for kind, cm in self.client.watch(ConfigMap, namespace=self.namespace, labels=labels,
                                                  resource_version=listing.resourceVersion,
                                                  server_timeout=self.server_timeout):
                    if self._stop.is_set():
                        return
                    name = cm.metadata.name
                    t = None if kind == "DELETED" else self._parse(cm)
                    if t is None:
                        self._shards.pop(name, None)
                    else:
                        self._shards[name] = t
                    self._publish()
            except Exception as e:  # noqa: BLE001 - any failure: list again after a pause
                if self._stop.is_set():
                    return
                failures += 1
                delay = min(10.0, 0.2 * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
                log.warning("routes watch for pool %s: %s: %s; listing again in %.1fs",
                            self.pool, type(e).__name__, e, delay)
                self._stop.wait(delay)


class PodReporter:
    """Patches the sync report onto this pod (only when it changed)."""

    def __init__(self, client: Client, namespace: str, pod: str):
        self.client, self.namespace, self.pod = client, namespace, pod
        self.last: str | None = None

    def report(self, report: SyncReport) -> bool:
        text = report.to_json()
        if text == self.last:
            return False
        self.client.patch(Pod, self.pod, {"metadata": {"annotations": {names.SYNC_ANNOTATION: text}}},
                          namespace=self.namespace, patch_type=PatchType.MERGE)
        self.last = text
        return True

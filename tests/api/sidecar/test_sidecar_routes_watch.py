"""The sidecar reads its routes by list-then-watch (``contracts.kubeio.Informer``), not by listing
again: a new generation arrives as a watch event, an idle watch lists nothing, a watch cut off from the
API server resumes from the last version it saw (the write made meanwhile arrives, no LIST), and only a
watch the server has compacted past (410 Gone) lists again, once per ConfigMap name watched.

The module's own API server (watch cache off, no controller manager) counts only these requests."""

from __future__ import annotations

import time
import uuid

from sidecar_api_support import Routes
from support.apiserver_faults import CuttableProxy, compact_etcd, list_requests

from lorafleet.localstack.procs import wait_for

POOL = "watched"


def _configmap_lists(cp) -> int:
    return list_requests(cp).get("configmaps", 0)


def test_routes_arrive_by_watch_and_a_cut_off_watch_resumes_without_listing(uncached_control_plane, uncached_kube,
                                                                             tmp_path):
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    from lorafleet.sidecar.kube import RoutesWatcher, make_client

    cp, kube = uncached_control_plane, uncached_kube
    ns = f"routes-watch-{uuid.uuid4().hex[:6]}"
    kube.create(Namespace(metadata=ObjectMeta(name=ns)))
    routes = Routes(kube, ns, pool=POOL)
    routes.set("acme-a", [("1", "s3://adapters/acme/a/1/", "0" * 64, 100)])
    proxy = CuttableProxy(cp.api_port)
    kubeconfig = proxy.kubeconfig(cp.kubeconfig, tmp_path / "proxied.kubeconfig")
    tables = []
    watcher = RoutesWatcher(lambda: make_client(str(kubeconfig)), ns, POOL, tables.append, server_timeout=2)
    try:
        before = _configmap_lists(cp)
        watcher.start()
        routes.write()
        wait_for(lambda: tables and tables[-1].generation == 1, 15, what="generation 1 from the watch")
        watched = len(watcher._informers)  # the unsharded name and shards -0, -1
        assert watched == 3 and _configmap_lists(cp) - before == watched  # one LIST each, at start
        before = _configmap_lists(cp)

        routes.write()
        routes.write()
        wait_for(lambda: tables[-1].generation == 3, 10, what="generation 3 from watch events")
        time.sleep(5)  # past two server timeouts: each watch is resumed, nothing listed
        assert _configmap_lists(cp) == before, "the routes watch listed while nothing went wrong"

        proxy.cut()
        try:
            wait_for(watcher.retrying, 15, what="the watches to notice the cut")
            routes.write()  # generation 4, while the sidecar cannot see it
            time.sleep(1)
            assert tables[-1].generation == 3 and watcher.alive()
        finally:
            proxy.restore()
        wait_for(lambda: tables[-1].generation == 4, 30, what="the write made while cut off, from the resumed watch")
        wait_for(lambda: not watcher.retrying(), 15, what="the watches to be healthy again")
        assert _configmap_lists(cp) == before, "a watch cut off and back listed again instead of resuming"

        proxy.cut()
        try:
            wait_for(watcher.retrying, 15, what="the watches to notice the second cut")
            routes.write()  # generation 5
            compact_etcd(cp)  # every version the watches hold is gone: 410 Gone on resuming
        finally:
            proxy.restore()
        wait_for(lambda: tables[-1].generation == 5, 30, what="generation 5 after listing again")
        wait_for(lambda: _configmap_lists(cp) - before == watched, 15, what="one LIST per watch after 410")
        time.sleep(3)
        assert _configmap_lists(cp) - before == watched
        assert [t.generation for t in tables] == [1, 2, 3, 4, 5]
    finally:
        watcher.stop()
        proxy.close()

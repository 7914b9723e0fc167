"""The sidecar acts only on a complete, consistent routes table: a reshard caught half written, two
shards of one generation of which one has arrived, or the routes ConfigMaps deleted never unload
anything; the last complete table stays in force (fail static) and the sync report says why."""

from __future__ import annotations

import time
import urllib.request

from lorafleet.contracts.routes import shard_of
from lorafleet.localstack.procs import free_port, wait_for

from sidecar_api_support import digest, sync_report, upload_dir
from support.peft_dirs import write_adapter


def report_at(kube, namespace, pod, g, **want):
    def check():
        r = sync_report(kube, namespace, pod)
        if r and r.generation >= g and all(getattr(r, k) == v for k, v in want.items()):
            return r
    return check


def stale_report(kube, namespace, pod):
    return wait_for(lambda: (r := sync_report(kube, namespace, pod)) and r.routes_stale and r, 30,
                    what="the sync report to say the routes are stale")


def test_a_half_written_reshard_or_generation_unloads_nothing(kube, namespace, pod, s3, bucket, tmp_path, runtime,
                                                             routes, start_sidecar):
    # Names that fall into both shards of two.
    names_ = [f"a{i}" for i in range(12)]
    first = [n for n in names_ if shard_of(n, 2) == 0][:2] + [n for n in names_ if shard_of(n, 2) == 1][:2]
    later = [n for n in names_ if shard_of(n, 2) == 0][2:3] + [n for n in names_ if shard_of(n, 2) == 1][2:3]
    ads = {}
    for i, name in enumerate(first + later):
        d = write_adapter(tmp_path / name, seed=i)
        ads[name] = (upload_dir(s3, bucket, d, f"{name}/"), digest(d))
    for name in first:
        routes.set(name, [("1", *ads[name], 100)])
    g1 = routes.write()  # one ConfigMap
    start_sidecar()
    wait_for(report_at(kube, namespace, pod, g1, loaded=4), 60, what="4 adapters loaded")

    # The operator re-shards into two ConfigMaps; the sidecar sees shard 0 before shard 1.
    full = len(routes.table.to_configmap_data()["lorafleet-routes-tiny"].encode())
    routes.budget = next(b for b in range(full - 1, 0, -50) if routes.table.shard_count(b) == 2)
    g2 = routes.write(only={"lorafleet-routes-tiny-0"})
    time.sleep(1.5)  # several sync passes (--poll-interval 0.3; a routes change wakes one at once)
    assert runtime.unloads == [] and set(runtime.loaded()) == {f"{n}@1" for n in first}
    r = stale_report(kube, namespace, pod)
    assert r.generation == g1 and "not a complete set" in r.routes_stale
    routes.write_rest()
    r = wait_for(report_at(kube, namespace, pod, g2, loaded=4, routes_stale=None), 30, what="generation 2 in force")
    assert runtime.unloads == []

    # Two shards change in one generation; one of them arrives first. The report must not claim the
    # generation (the other shard's new adapter would read as loaded) until both are there.
    for name in later:
        routes.set(name, [("1", *ads[name], 100)])
    g3 = routes.write(only={"lorafleet-routes-tiny-0"})
    time.sleep(1.5)
    r = sync_report(kube, namespace, pod)
    assert r.generation == g2 and not r.has_loaded(later[1], "1", since=g3)
    assert runtime.unloads == []
    assert "not a complete set" in stale_report(kube, namespace, pod).routes_stale
    routes.write_rest()
    r = wait_for(report_at(kube, namespace, pod, g3, loaded=6, routes_stale=None), 60, what="6 adapters loaded")
    assert r.has_loaded(later[1], "1", since=g3) and runtime.unloads == []


def test_deleted_routes_configmaps_keep_the_last_complete_table(kube, namespace, pod, s3, bucket, tmp_path, runtime,
                                                                routes, start_sidecar):
    ads = {}
    for i, name in enumerate(["support", "billing"]):
        d = write_adapter(tmp_path / name, seed=i)
        ads[name] = (upload_dir(s3, bucket, d, f"{name}/"), digest(d))
        routes.set(name, [("1", *ads[name], 100)])
    g = routes.write()
    port = free_port()
    start_sidecar("--metrics-port", str(port))
    wait_for(report_at(kube, namespace, pod, g, loaded=2), 60, what="2 adapters loaded")

    routes.delete_all()
    time.sleep(1.5)  # several sync passes: still serving everything
    assert runtime.unloads == [] and set(runtime.loaded()) == {"support@1", "billing@1"}
    r = stale_report(kube, namespace, pod)
    assert "gone" in r.routes_stale and f"generation {g}" in r.routes_stale and r.generation == g and r.loaded == 2
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "lorafleet_sidecar_routes_stale 1.0" in metrics

    # The operator writes them again (here: the test, one adapter fewer): back in step.
    routes.drop("billing")
    g = routes.write()
    wait_for(report_at(kube, namespace, pod, g, loaded=1, routes_stale=None), 30, what="routes in force again")
    assert runtime.unloads == ["billing@1"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert "lorafleet_sidecar_routes_stale 0.0" in metrics

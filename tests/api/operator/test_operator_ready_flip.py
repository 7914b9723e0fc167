"""A replica of a pool that goes unready and comes back changes every adapter's status twice (its
ready count goes down and back), and nothing else: no Event per adapter. An adapter's `Ready`
Event says that a version of it is ready: once per version, and again after a failure or a time
no replica served it (bench/statuswrite_bench.py measures the writes of such a flip in a
10,000-adapter pool)."""

from __future__ import annotations

import json
import time

from lf_operator_kit import SHA, adapter_doc, apply, make_pod, pool_doc, set_pod, wait_routes, wait_status

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for

ADAPTERS = [f"a{i}" for i in range(4)]


def ready_events(control_plane, namespace: str, name: str) -> int:
    out = control_plane.kubectl("get", "events", "-n", namespace, "-o", "json",
                                f"--field-selector=involvedObject.name={name},reason=Ready")
    return sum(e.get("count") or 1 for e in json.loads(out.stdout)["items"])


def all_status(control_plane, namespace: str, check, what: str) -> None:
    for name in ADAPTERS:
        wait_status(control_plane, namespace, "lora", name, check, what=f"{name}: {what}")


def test_a_replica_flipping_ready_posts_no_event_per_adapter(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("p", replicas=2))
    for name in ADAPTERS:
        apply(control_plane, namespace, adapter_doc(name, "p", version="1", sha=SHA["b"]))
    g1 = wait_routes(kube, namespace, "p", lambda t: set(ADAPTERS) <= set(t.adapters), "all in the routes").generation
    for pod in ("p-0", "p-1"):
        make_pod(kube, namespace, "p", pod, sync={"generation": g1, "loaded": len(ADAPTERS), "modelReady": True})
    all_status(control_plane, namespace, lambda s: s.get("phase") == "Ready" and s.get("ready") == "2/2", "Ready 2/2")
    for name in ADAPTERS:  # the adapter's first Ready: announced
        wait_for(lambda: ready_events(control_plane, namespace, name) == 1, timeout=30,
                 what=f"{name}'s Ready Event")

    # p-1 goes unready and comes back: every adapter's status follows (1/2, then 2/2) ...
    set_pod(kube, namespace, "p-1", ready=False)
    all_status(control_plane, namespace, lambda s: s.get("ready") == "1/2" and s.get("phase") == "Syncing", "1/2")
    set_pod(kube, namespace, "p-1", ready=True)
    all_status(control_plane, namespace, lambda s: s.get("phase") == "Ready" and s.get("ready") == "2/2",
               "Ready 2/2 again")
    time.sleep(3)  # kopf posts Events from a queue of its own: give a wrong one time to arrive
    # ... and no adapter got a second Ready Event: that would be one Event per adapter per flip.
    assert {n: ready_events(control_plane, namespace, n) for n in ADAPTERS} == {n: 1 for n in ADAPTERS}

    # Both replicas unready (nothing serves the adapters: Pending), then back: that is news.
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, ready=False)
    all_status(control_plane, namespace, lambda s: s.get("phase") == "Pending", "Pending")
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, ready=True)
    all_status(control_plane, namespace, lambda s: s.get("phase") == "Ready" and s.get("ready") == "2/2",
               "Ready 2/2 after the outage")
    for name in ADAPTERS:
        wait_for(lambda: ready_events(control_plane, namespace, name) == 2, timeout=30,
                 what=f"{name}'s Ready Event after the outage")

    # A new version ready is news: announced.
    apply(control_plane, namespace, adapter_doc("a0", "p", version="2", sha=SHA["c"]))
    g2 = wait_routes(kube, namespace, "p", lambda t: t.adapters["a0"].versions[0].version == "2", "a0@2").generation
    for pod in ("p-0", "p-1"):
        set_pod(kube, namespace, pod, sync={"generation": g2, "loaded": len(ADAPTERS), "modelReady": True})
    wait_status(control_plane, namespace, "lora", "a0", lambda s: s.get("phase") == "Ready"
                and s.get("servedVersion") == "2" and s.get("ready") == "2/2", what="a0@2 Ready")
    wait_for(lambda: ready_events(control_plane, namespace, "a0") == 3, timeout=30, what="a0@2's Ready Event")


def test_a_short_flip_rewrites_only_the_statuses_written_meanwhile(control_plane, operator, namespace, kube):
    """With a pool's statuses queued behind the API server (1,000 adapters, one replica unready for
    a moment), the statuses planned and undone before their write are not written at all: the ones
    written down are written back, nothing else. A transition time taken from the undone plan would
    rewrite every adapter of the pool on every flip."""
    from lightkube.generic_resource import create_namespaced_resource

    adapter = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND, names.ADAPTER_PLURAL)
    n = 1000
    apply(control_plane, namespace, pool_doc("big", replicas=2))
    items = [adapter_doc(f"b{i:04d}", "big", version="1", sha=SHA["b"]) for i in range(n)]
    control_plane.kubectl("create", "-n", namespace, "-f", "-",
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    g = wait_routes(kube, namespace, "big", lambda t: len(t.adapters) == n, "all in the routes", timeout=120).generation
    for pod in ("big-0", "big-1"):
        make_pod(kube, namespace, "big", pod, sync={"generation": g, "loaded": n, "modelReady": True})

    def versions(check) -> dict[str, str] | None:
        got = list(kube.list(adapter, namespace=namespace))
        ok = len(got) == n and all(check(a.status or {}) for a in got)
        return {a.metadata.name: a.metadata.resourceVersion for a in got} if ok else None

    ready = lambda s: s.get("phase") == "Ready" and s.get("ready") == "2/2"  # noqa: E731
    before = wait_for(lambda: versions(ready), timeout=180, interval=1, what="every adapter Ready 2/2")

    set_pod(kube, namespace, "big-1", ready=False)
    wait_status(control_plane, namespace, "lfpool", "big", lambda s: s.get("readyReplicas") == 1,
                what="the pool at 1 ready replica")
    set_pod(kube, namespace, "big-1", ready=True)
    wait_status(control_plane, namespace, "lfpool", "big", lambda s: s.get("readyReplicas") == 2,
                what="the pool at 2 ready replicas")
    last: dict = {}

    def settled() -> dict[str, str] | None:
        now = versions(ready)
        done = now is not None and now == last.get("v")
        last["v"] = now
        return now if done else None

    after = wait_for(settled, timeout=180, interval=3, what="every adapter Ready 2/2 again, no write for 3 s")
    rewritten = sum(1 for k in before if after[k] != before[k])
    # Each adapter written down while it was queued is written back (2 writes); the rest, nothing.
    assert rewritten <= n // 2, f"{rewritten} of {n} adapters' statuses rewritten by a flip of one replica"

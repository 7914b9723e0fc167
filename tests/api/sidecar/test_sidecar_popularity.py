"""Placement policy through the real control plane: an adapter's measured request rate raises its
replica count and a quiet spell lowers it again; an adapter without sizeBytes is counted at the size
its holder's sidecar verified; a host-memory budget that cannot hold every
adapter leaves some unplaced and the pool says which, within which budget; the pool's status shows
each replica's placed bytes against both budgets and its cache as the sidecar measured it.

The runtimes are the stand-in (``sidecar_standin_runtime``: it counts requests per adapter version
as the runtime does, in ``GET /admin/adapters``); the sidecars are the real ones, in-process, with a
rate window of 2 s instead of 30 s; the operator is the real one."""

from __future__ import annotations

import json
import threading
import time

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for

from sidecar_api_support import digest, upload_dir
from support.peft_dirs import write_adapter
from test_sidecar_placement import POOL, Stand, statuses

from lf_operator_kit import Operator, pool_doc  # noqa: E402 (test_sidecar_placement puts it on the path)

N = 9


def pool_status(control_plane, namespace) -> dict:
    return json.loads(control_plane.kubectl("get", "lfpool", POOL, "-n", namespace, "-o", "json").stdout)["status"]


def test_a_hot_adapter_gains_replicas_and_a_memory_budget_names_what_it_leaves_out(
        control_plane, minio_server, kube, namespace, s3, bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_server.secret_key)
    src = tmp_path / "src"
    adapters, docs = [], []
    size = 0
    for i in range(N):
        name = f"p{i:02d}"
        d = write_adapter(src / name, seed=100 + i)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        uri = upload_dir(s3, bucket, d, f"acme/{name}/")
        adapters.append(name)
        source = {"uri": uri, "sha256": digest(d), "sizeBytes": size}
        if i == N - 1:
            del source["sizeBytes"]  # counted as cache.maxAdapterBytes until its holder verifies it
        docs.append({"apiVersion": names.API_VERSION, "kind": names.ADAPTER_KIND, "metadata": {"name": name},
                     "spec": {"pool": POOL, "tenant": "acme", "version": "1", "source": source}})
    tenant = {"apiVersion": names.API_VERSION, "kind": names.TENANT_KIND, "metadata": {"name": "acme"},
              "spec": {"sources": [f"s3://{bucket}/"]}}
    # Disk for every adapter on every replica; host memory for 6 per replica (18 > 9 + the 2 extra
    # copies a hot adapter takes on 3 replicas); one replica per adapter, one more per 4 requests/s.
    # The adapter without sizeBytes counts cache.maxAdapterBytes (3 adapters' worth) at first.
    disk, memory = N * size, 6 * size
    placement = {"replicasPerAdapter": 1, "adapterBytes": disk, "hostMemoryBytes": memory,
                 "requestsPerReplica": 4}
    pool = pool_doc(POOL, replicas=3, placement=placement, cache={"maxAdapterBytes": 3 * size})
    control_plane.kubectl("apply", "-n", namespace, "-f", "-",
                          input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [tenant, pool, *docs]}))
    op = Operator(control_plane.kubeconfig, tmp_path / "operator.log").start()
    stand = Stand(control_plane, minio_server, kube, namespace, tmp_path, disk, sidecar_args=["--rate-window", "2"])
    try:
        for i in range(3):
            stand.add(i)

        def one_each():
            st = statuses(control_plane, namespace)
            return st if all(st.get(a, {}).get("ready") == "1/1" for a in adapters) else None

        wait_for(one_each, 180, interval=0.5, what=f"{N} adapters Ready 1/1 on 3 replicas")
        # The routes count what the sidecars verified: the unsized adapter's real size, not 3x it.
        unsized = adapters[-1]
        wait_for(lambda: stand.routes().adapters[unsized].versions[0].verified == size, 30, interval=0.5,
                 what=f"{unsized}'s verified size in the routes")
        assert all(e.versions[0].verified == size for e in stand.routes().adapters.values())
        ps = pool_status(control_plane, namespace)
        placed = {c["type"]: c for c in ps["conditions"]}["Placed"]
        assert placed["status"] == "True", placed
        use = ps["placement"]
        assert all(u["memoryBudgetBytes"] == memory and u["budgetBytes"] == disk and u["bytes"] <= memory
                   and u["cacheBytes"] >= u["bytes"] for u in use), use

        # About 12 requests/s for p00 through the ingress: 3 replicas (4/s each).
        hot = adapters[0]
        stop = threading.Event()
        failed: list[tuple[int, dict]] = []

        def load():
            while not stop.is_set():
                t0 = time.monotonic()
                code, body = stand.ask(hot)
                if code != 200:
                    failed.append((code, body))
                stop.wait(max(0.0, 1 / 12 - (time.monotonic() - t0)))

        loader = threading.Thread(target=load, daemon=True)
        loader.start()

        def spread():
            st = statuses(control_plane, namespace).get(hot, {})
            return st if st.get("ready") == "3/3" and st.get("placed") == 3 else None

        st = wait_for(spread, 90, interval=0.5, what=f"{hot} raised to 3 replicas by its request rate")
        assert st["requestRate"] >= 8, st
        assert "request rate" in st["message"] and "3 replicas wanted" in st["message"], st["message"]
        assert stand.routes().adapters[hot].hot == 3
        # The other adapters stay on one replica each.
        others = statuses(control_plane, namespace)
        assert all(others[a]["placed"] == 1 for a in adapters[1:]), {a: others[a]["placed"] for a in adapters}
        # Requests reach every holder (the ingress spreads over the pods the routes place it on).
        time.sleep(3)
        served = {p: r.runtime.served.get(hot, 0) for p, r in stand.replicas.items()}
        stop.set()
        loader.join(10)
        assert not failed, failed[:5]
        assert sum(1 for n in served.values() if n > 0) >= 2, served

        # Quiet: its rate falls to 0 and it goes back to one replica (make before break: it keeps
        # answering meanwhile).
        def back():
            st = statuses(control_plane, namespace).get(hot, {})
            return st if st.get("placed") == 1 and st.get("ready") == "1/1" else None

        st = wait_for(back, 90, interval=0.5, what=f"{hot} back to 1 replica once quiet")
        assert stand.routes().adapters[hot].hot is None
        assert stand.ask(hot)[0] == 200

        # Host memory for 2 adapters per replica (6 < 9): 3 adapters are left unplaced, and the pool
        # and the adapters name the host-memory budget; no replica is given more than it.
        pool["spec"]["placement"]["hostMemoryBytes"] = 2 * size
        control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pool))

        def short():
            ps = pool_status(control_plane, namespace)
            c = {c["type"]: c for c in ps.get("conditions", [])}.get("Placed", {})
            return ps if c.get("status") == "False" else None

        ps = wait_for(short, 60, interval=0.5, what="the pool to say what the memory budget leaves out")
        c = {c["type"]: c for c in ps["conditions"]}["Placed"]
        assert c["reason"] == "MemoryBudget" and "spec.placement.hostMemoryBytes (host memory)" in c["message"], c
        assert "3 adapters lack 3 of the replicas their spec asks for (3 placed nowhere)" in c["message"], c
        st = statuses(control_plane, namespace)
        unplaced = [a for a in adapters if st[a]["conditions"][0]["reason"] == "Unplaced"]
        assert len(unplaced) == 3 and all(a in c["message"] for a in unplaced), (unplaced, c)
        assert all("hostMemoryBytes" in st[a]["message"] for a in unplaced)
        t = stand.routes()
        assert all(sum(size for e in t.adapters.values() if p in (e.holders or {})) <= 2 * size
                   for p in t.placed_on), t
        print(f"popularity: {hot} at ~12 req/s held by 3 replicas, back to 1 when quiet; "
              f"host-memory budget of 2 per replica left {unplaced} unplaced, named on the pool")
    finally:
        stand.close()
        op.stop()

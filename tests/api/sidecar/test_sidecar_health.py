"""The sidecar's probe endpoint (the default liveness and readiness probes of every pool pod): on a port
of its own, bound for the pod IP, answering /healthz and /readyz and nothing else. It reflects the sync
loop and the routes watches (real API server, real MinIO, the in-process sidecar ``lorafleet sidecar``
runs): not ready before a complete routes table, ready after, still ready while the routes are gone
(fail static), not live once the sync loop stalls."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

from sidecar_api_support import digest, upload_dir

from lorafleet.localstack.procs import free_port, wait_for


def get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def answers(port: int, path: str, code: int):
    """A waiter: the answer of ``path`` once it is ``code``."""
    def check():
        got = get(port, path)
        return got if got[0] == code else None
    return check


def test_the_health_endpoint_reflects_the_sync_loop_and_the_routes(start_sidecar, routes, s3, bucket, tmp_path):
    from support.peft_dirs import write_adapter

    port = free_port()
    sc = start_sidecar("--health-port", str(port))
    # Bound for every address (the kubelet probes the pod IP), and serving only the two probe paths.
    assert sc._health_server.server_address[0] == "0.0.0.0"
    code, body = wait_for(answers(port, "/healthz", 200), 10, what="live")
    assert body["status"] == "ok"
    code, body = get(port, "/readyz")
    assert code == 503 and body["reason"] == "waiting for the first complete routes table", body
    for path in ("/metrics", "/", "/admin/adapters", "/healthz/../metrics"):
        assert get(port, path)[0] == 404, path

    d = write_adapter(tmp_path / "a")
    routes.set("acme-a", [("1", upload_dir(s3, bucket, d, "acme/a/1/"), digest(d), 100)])
    routes.write()
    wait_for(lambda: get(port, "/readyz")[0] == 200, 30, what="ready once the routes are in")
    code, body = get(port, "/readyz")
    assert body == {"status": "ok", "routesStale": False, "watchRetrying": False}
    assert "acme" not in json.dumps(body)  # no adapter, tenant or pool named

    # The routes ConfigMaps go: the sidecar keeps the last complete table, and so stays ready and live.
    routes.delete_all()
    wait_for(lambda: get(port, "/readyz")[1]["routesStale"], 30, what="the routes stale")
    assert get(port, "/readyz")[0] == 200 and get(port, "/healthz")[0] == 200

    # The sync loop stalls (a pass that never ends): not live, nor ready, once the stall passes the limit.
    stuck = threading.Event()
    sc.syncer.step = lambda: stuck.wait()
    sc.syncer.wake.set()
    sc.health.stall_s = 1.0
    try:
        code, body = wait_for(answers(port, "/healthz", 503), 15, what="not live while the sync loop is stuck")
        assert body["reason"].startswith("the sync loop ended no pass for"), body
        assert get(port, "/readyz")[0] == 503
    finally:
        stuck.set()

"""The gateway under a replica's overload, against two real runtime replicas (in this process, so a
test can hold one's model worker and fill its queue): a replica's 429 spills the request to the other
replica, and with no replica left with room the 429 reaches the client with its Retry-After and the
runtime's error body. Asserted with both sides' counters."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.localstack.procs import free_port, wait_for
from support.metrics import metric
from support.models import put_adapter, start_runtime

BODY = {"model": "gen0", "prompt": "hello world", "max_tokens": 2, "temperature": 0}


class GatewayThread:
    """``lorafleet gateway``'s server without tenant keys, on its own loop in a thread."""

    def __init__(self, replicas: dict[str, str]):
        from lorafleet.gateway.server import Gateway

        self.gw = Gateway(lambda: dict(replicas), None, spill_inflight=100, replica_poll_s=0.1, poll_s=0.2)
        self.port, self.ops_port = free_port(), free_port()
        self.url, self.ops = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.ops_port}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from aiohttp import web

        async def main():
            runners = [web.AppRunner(self.gw.app(), access_log=None), web.AppRunner(self.gw.ops_app(), access_log=None)]
            for runner, port in zip(runners, (self.port, self.ops_port)):
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", port).start()
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            for runner in runners:
                await runner.cleanup()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    def __enter__(self) -> "GatewayThread":
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


class Full:
    """Holds a replica's model worker and fills its queue (maxQueue 1), so it answers 429 queue_full."""

    def __init__(self, srv, pool: ThreadPoolExecutor):
        self.srv, self.pool = srv, pool
        self.gate, self.running = threading.Event(), threading.Event()

    def __enter__(self) -> "Full":
        sched = self.srv.rt.engine.scheduler

        def hold():
            self.running.set()
            self.gate.wait(120)

        sched.post(hold)
        assert self.running.wait(30)
        self.queued = self.pool.submit(httpx.post, self.srv.url + "/v1/completions", json=BODY, timeout=120)
        wait_for(lambda: sched.queued == 1, what="the replica's one queue place taken")
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        assert self.queued.result().status_code == 200


@pytest.fixture(scope="module")
def replicas(tiny_llama, gen_adapters):
    # No queue-delay bound: the held replica's queued request must stay queued, not time out.
    srvs = {name: start_runtime(tiny_llama, device_slots=4, max_queue=1, max_queue_delay_ms=0) for name in ("a", "b")}
    try:
        for srv in srvs.values():
            with httpx.Client(base_url=srv.admin_url) as admin:
                assert put_adapter(admin, "gen0", "1", gen_adapters["gen0"]).status_code == 200
        # gen0 on a's device only: the gateway's affinity picks a first.
        assert httpx.post(srvs["a"].url + "/v1/completions", json=BODY, timeout=60).status_code == 200
        yield srvs
    finally:
        for srv in srvs.values():
            srv.stop()


def test_a_replicas_429_spills_to_another_and_passes_through_when_none_has_room(replicas):
    a, b = replicas["a"], replicas["b"]
    with GatewayThread({"a": a.url, "b": b.url}) as gw, ThreadPoolExecutor(4) as pool:
        wait_for(lambda: "gen0" in httpx.get(gw.ops + "/readyz", timeout=5).json()["replicas"].get("a", {})
                 .get("device", []), what="the gateway seeing gen0 resident on a")
        r = httpx.post(gw.url + "/v1/completions", json=BODY, timeout=60)
        assert r.status_code == 200 and r.headers["x-lorafleet-replica"] == "a"  # affinity, no load
        with Full(a, pool):
            r = httpx.post(gw.url + "/v1/completions", json=BODY, timeout=60)
            assert r.status_code == 200 and r.headers["x-lorafleet-replica"] == "b"
            assert metric(a.metrics_url, "lorafleet_runtime_shed_total", reason="queue_full") >= 1
            assert metric(gw.ops, "lorafleet_gateway_overloaded_total", replica="a") >= 1
            assert metric(gw.ops, "lorafleet_gateway_routed_total", replica="b", reason="overloaded") >= 1
            with Full(b, pool):
                r = httpx.post(gw.url + "/v1/completions", json=BODY, timeout=60)
                assert r.status_code == 429, r.text
                assert r.json()["error"]["code"] == "queue_full" and "maxQueue 1" in r.json()["error"]["message"]
                assert int(r.headers["retry-after"]) >= 1
                assert metric(b.metrics_url, "lorafleet_runtime_shed_total", reason="queue_full") >= 1
                assert metric(gw.ops, "lorafleet_gateway_requests_total", status="429") == 1
        # Both released: served again (by whichever the refusal memory and affinity pick).
        r = httpx.post(gw.url + "/v1/completions", json=BODY, timeout=60)
        assert r.status_code == 200

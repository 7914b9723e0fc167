"""Overload over real HTTP: the queue-delay bound answers 429 with Retry-After at once (without the
model worker), the tenant over its share is refused first, a shed stream is a 429 and not a broken
200, and a client that gives up takes its work out of the queue. Asserted with the runtime's own
counters and gauges while the model worker is held (a control operation that blocks), not timings."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from lorafleet.runtime.worker import ServiceRate
from support.metrics import metric
from support.models import put_adapter, start_runtime


class Held:
    """Holds the model worker (a control operation that blocks until released) so work stays queued."""

    def __init__(self, rt):
        self.rt, self.gate, self.running = rt, threading.Event(), threading.Event()

    def __enter__(self):
        def hold():
            self.running.set()
            self.gate.wait(120)

        self.rt.engine.scheduler.post(hold)
        assert self.running.wait(30), "the model worker did not pick up the control operation"
        return self

    def __exit__(self, *exc):
        self.gate.set()


def shed_429(r: httpx.Response, code: str) -> None:
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] == "rate_limit_exceeded" and err["message"]
    assert int(r.headers["retry-after"]) >= 1


@pytest.fixture(scope="module")
def cls_server(minilm, cls_adapters):
    srv = start_runtime(minilm, device_slots=4, max_batch_size=32, max_batch_delay_ms=2, max_queue_delay_ms=300)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name in ("cls0", "cls1"):
            assert put_adapter(admin, name, "1", cls_adapters[name]).status_code == 200
        admin.put("/admin/sync", json={"preloadPending": 0})
    yield srv
    srv.stop()


def classify(srv, model: str, timeout: float = 60):
    return httpx.post(srv.url + "/v1/classify", json={"model": model, "input": "where is my refund"}, timeout=timeout)


def test_the_runtime_serves_on_uvloop_with_httptools(cls_server):
    """Both are in the runtime's dependencies; uvicorn picks httptools itself, but uvloop only when it
    creates the loop, which the runtime does (server.run_loop): asyncio's loop would drop the
    interpreter lock on every socket call while the model worker wants it."""
    assert cls_server.stack == ("uvloop", "httptools")
    assert classify(cls_server, "cls0").status_code == 200


def test_metrics_are_served_on_their_own_port_and_not_on_the_public_one(cls_server):
    """Tenants' names are labels of /metrics, and the public port is what the gateway and the ingress
    reach: the public port answers 404 for it, the metrics port serves it (and nothing else)."""
    srv = cls_server
    assert classify(srv, "cls0").status_code == 200
    public = httpx.get(srv.url + "/metrics")
    assert public.status_code == 404 and public.json()["error"]["code"] == "not_found"
    scraped = httpx.get(srv.metrics_url + "/metrics")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert metric(srv.metrics_url, "lorafleet_runtime_requests_total", tenant="cls0", endpoint="/v1/classify",
                  status="200") >= 1
    assert httpx.get(srv.metrics_url + "/v1/models").status_code == 404
    assert httpx.get(srv.metrics_url + "/admin/adapters").status_code == 404


def test_queued_past_the_bound_is_answered_429_while_the_worker_is_still_held(cls_server):
    srv = cls_server
    assert classify(srv, "cls0").status_code == 200
    before = metric(srv.metrics_url, "lorafleet_runtime_shed_total", reason="queue_timeout")
    with Held(srv.rt), ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: classify(srv, f"cls{i % 2}"), range(6)))
        # Every answer came back while the worker was still held: the bound, not the model, answered.
        for r in answers:
            shed_429(r, "queue_timeout")
            assert "maxQueueDelayMs (300 ms)" in r.json()["error"]["message"]
        assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", reason="queue_timeout") - before == 6
        assert metric(srv.metrics_url, "lorafleet_runtime_queue_depth") == 0
        assert metric(srv.metrics_url, "lorafleet_runtime_requests_total", endpoint="/v1/classify", status="429") >= 6
    assert classify(srv, "cls1").status_code == 200


def test_the_tenant_over_its_share_is_refused_first(minilm, cls_adapters):
    # A bound long enough that nothing expires during the test; the measured rate pinned to one item
    # every 5.9 s, so 10 items fit within the bound (59 s; the time each request spends before the
    # queue counts too, and may use the second left) and an 11th does not (64.9 s).
    srv = start_runtime(minilm, device_slots=4, max_batch_size=32, max_queue_delay_ms=60_000)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in ("cls0", "cls1"):
                assert put_adapter(admin, name, "1", cls_adapters[name]).status_code == 200
        sched = srv.rt.engine.scheduler
        with ThreadPoolExecutor(23) as pool:
            with Held(srv.rt):
                with sched.cv:
                    sched.rate = ServiceRate()
                    sched.rate.took(1, 5, 0.0)
                    sched.rate.took(1, 5, 5.9)
                heavy = [pool.submit(classify, srv, "cls0") for _ in range(15)]
                wait_for(lambda: metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="cls0") == 5
                         and sched.queued == 10, what="the heavy tenant's first 10 queued, 5 refused")
                light = [pool.submit(classify, srv, "cls1") for _ in range(8)]
                wait_for(lambda: metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="cls1") == 3
                         and sched.queued == 15, what="the light tenant's 5 queued beside them, 3 refused")
            codes = {"cls0": [f.result().status_code for f in heavy], "cls1": [f.result().status_code for f in light]}
        assert sorted(codes["cls0"]) == [200] * 10 + [429] * 5
        assert sorted(codes["cls1"]) == [200] * 5 + [429] * 3
        for f in heavy + light:
            if f.result().status_code == 429:
                shed_429(f.result(), "queue_delay")
        assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="cls0", reason="queue_delay") == 5
        assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="cls1", reason="queue_delay") == 3
        assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", reason="queue_timeout") == 0
    finally:
        srv.stop()


def test_a_client_that_gives_up_takes_its_work_out_of_the_queue(cls_server):
    srv = cls_server
    sched = srv.rt.engine.scheduler
    with Held(srv.rt):
        sched.max_delay = 0.0  # only the client's own timeout ends these
        try:
            with ThreadPoolExecutor(4) as pool:
                gave_up = list(pool.map(lambda i: _times_out(srv, f"cls{i % 2}"), range(4)))
            assert gave_up == [True] * 4
            wait_for(lambda: sched.queued == 0 and metric(srv.metrics_url, "lorafleet_runtime_queue_depth") == 0,
                     what="the abandoned work leaving the queue while the worker is held")
            assert sched.load == {}
        finally:
            sched.max_delay = 0.3
    assert classify(srv, "cls0").status_code == 200


def _times_out(srv, model: str) -> bool:
    try:
        classify(srv, model, timeout=0.5)
    except httpx.TimeoutException:
        return True
    return False


def test_a_shed_stream_is_a_429_not_a_broken_stream(tiny_llama, gen_adapters):
    srv = start_runtime(tiny_llama, device_slots=4, max_queue_delay_ms=300)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            assert put_adapter(admin, "gen0", "1", gen_adapters["gen0"]).status_code == 200
        openai = {"model": "gen0", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
        tgi = {"inputs": "hello", "parameters": {"adapter_id": "gen0", "max_new_tokens": 3}}
        chat = {"model": "gen0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        calls = [("/v1/completions", openai), ("/generate_stream", tgi), ("/v1/chat/completions", chat),
                 ("/v1/completions", {**openai, "stream": False})]
        with Held(srv.rt), ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda c: httpx.post(srv.url + c[0], json=c[1], timeout=60), calls))
            for r in answers:
                shed_429(r, "queue_timeout")
            assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="gen0", reason="queue_timeout") == 4
        for path, body in calls:
            with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
                assert r.status_code == 200
                text = r.read().decode()
            assert text.strip(), path
    finally:
        srv.stop()


def test_a_request_the_queue_would_refuse_is_answered_before_it_is_parsed(minilm, cls_adapters):
    """Admission (runtime/admission.py): with the tenant at its perTenantMaxInflight, its next request is
    answered 429 by the gate in front of the app (counted as admitted-refused and as shed, with the
    route's counters), while another tenant's request is still queued and served."""
    srv = start_runtime(minilm, device_slots=4, max_batch_size=32, max_queue_delay_ms=60_000,
                        per_tenant_max_inflight=3)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in ("cls0", "cls1"):
                assert put_adapter(admin, name, "1", cls_adapters[name]).status_code == 200
        sched = srv.rt.engine.scheduler
        with ThreadPoolExecutor(4) as pool:
            with Held(srv.rt):
                queued = [pool.submit(classify, srv, "cls0") for _ in range(3)]
                wait_for(lambda: sched.queued == 3, what="the tenant's 3 requests queued")
                r = classify(srv, "cls0")
                shed_429(r, "tenant_over_share")
                assert "perTenantMaxInflight 3" in r.json()["error"]["message"]
                assert r.headers["content-type"] == "application/json"
                other = pool.submit(classify, srv, "cls1")
                wait_for(lambda: sched.queued == 4, what="the other tenant's request queued")
                assert metric(srv.metrics_url, "lorafleet_runtime_admission_refused_total",
                              reason="tenant_over_share") == 1
                assert metric(srv.metrics_url, "lorafleet_runtime_shed_total", tenant="cls0",
                              reason="tenant_over_share") == 1
                assert metric(srv.metrics_url, "lorafleet_runtime_requests_total", tenant="cls0",
                              endpoint="/v1/classify", status="429") == 1
            assert [f.result().status_code for f in queued] == [200] * 3 and other.result().status_code == 200
        assert metric(srv.metrics_url, "lorafleet_runtime_admission_refused_total") == 1
        # Below the share, nothing is refused; an unknown model goes on to the route (404, not 429).
        assert classify(srv, "cls0").status_code == 200
        assert classify(srv, "nope").status_code == 404
    finally:
        srv.stop()

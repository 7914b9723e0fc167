"""Cancellation over real HTTP (uvicorn on loopback, real clients that close their connection): a
running row whose client left is freed before the model's next step, streaming or not, and a queued
request whose client left never reaches the model. Shown by the runtime's counters on /metrics."""

from __future__ import annotations

import http.client
import json
import threading
from urllib.parse import urlsplit

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from support.metrics import metric as support_metric
from support.models import make_generation_adapter, make_tiny_llama, put_adapter, start_runtime

# Long enough that the row is still generating when the test looks (one token per model step).
LONG = {"prompt": "hello world , how are", "max_tokens": 4000, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("long-llama"), max_len=4096)


@pytest.fixture(scope="module")
def adapters(long_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("cancel-adapters")
    return {name: make_generation_adapter(long_llama, root / name, seed=seed)
            for name, seed in (("acme", 1), ("globex", 2))}


@pytest.fixture
def server(long_llama, adapters):
    # One row: while it generates, every other request waits in the queue.
    srv = start_runtime(long_llama, max_batch_size=1, max_batch_delay_ms=0, device_slots=2, max_model_len=4096)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, path in adapters.items():
            assert put_adapter(admin, name, "1", path).status_code == 200
    yield srv
    srv.stop()


def metric(srv, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``, on ``srv``'s metrics port."""
    return support_metric(srv.metrics_url, name, **labels)


def cancelled(srv, stage: str) -> float:
    return metric(srv, "lorafleet_runtime_cancelled_total", stage=stage, reason="client_left")


def post_and_leave_open(srv, body: dict) -> http.client.HTTPConnection:
    """A non-streaming request sent; the answer is never read. ``close()`` is the client leaving."""
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    return conn


def running(srv, steps: int = 3):
    """The one running row's work once it has run ``steps`` model steps."""
    worker = srv.rt.engine.worker
    return wait_for(lambda: next((w for w in list(worker.active) if w.steps >= steps), None),
                    what=f"a row running {steps} steps")


def hold_worker(srv) -> threading.Event:
    """Stop the model worker between two steps until the returned event is set."""
    entered, gate = threading.Event(), threading.Event()

    def hold():
        entered.set()
        gate.wait(60)

    srv.rt.engine.scheduler.post(hold)
    assert entered.wait(30), "the model worker did not reach the gate"
    return gate


def assert_freed_before_next_step(srv, work, leave) -> None:
    """With the worker held between steps, the client leaves; released, the worker must free the
    row without running it again."""
    gate = hold_worker(srv)
    steps = work.steps
    leave()
    wait_for(lambda: work.cancelled, what="the runtime seeing the client leave")
    gate.set()
    wait_for(lambda: cancelled(srv, "running") == 1, what="the running row retired as cancelled")
    assert work.steps == steps, f"the row ran {work.steps - steps} steps after its client left"
    assert metric(srv, "lorafleet_runtime_cancelled_row_steps_total") == 0
    assert cancelled(srv, "queued") == 0
    # What the model generated for it: one token per step it ran, far from max_tokens.
    assert metric(srv, "lorafleet_runtime_generated_tokens_total", tenant="acme") == steps < LONG["max_tokens"]
    cap = srv.rt.engine.capacity()
    assert cap["rows_free"] == 1 and cap["queued"] == 0 and not srv.rt.engine.scheduler.load
    # The row serves the next request.
    r = httpx.post(srv.url + "/v1/completions", json={"model": "acme", "prompt": "hi", "max_tokens": 3,
                                                     "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_non_streaming_client_that_leaves_frees_its_row_before_the_next_step(server):
    conn = post_and_leave_open(server, {"model": "acme", **LONG})
    work = running(server)
    assert_freed_before_next_step(server, work, conn.close)


def test_streaming_client_that_leaves_frees_its_row_before_the_next_step(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    fields = {k: v for k, v in LONG.items() if k != "ignore_eos"}
    stream = client.completions.create(model="acme", stream=True, **fields, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    assert next(chunks).choices[0].text is not None  # tokens arrive
    work = running(server)
    assert_freed_before_next_step(server, work, stream.close)


def test_queued_requests_whose_clients_left_never_reach_the_model(server):
    busy = post_and_leave_open(server, {"model": "acme", **LONG})
    running(server)  # the only row is taken
    sched = server.rt.engine.scheduler
    # globex asks twice, non-streaming and streaming; both wait for the row, then their clients leave.
    plain = post_and_leave_open(server, {"model": "globex", **LONG})
    wait_for(lambda: sched.queued == 1, what="the non-streaming request queued")
    # A stream's headers wait for the engine to take the request: this client leaves before any.
    stream = post_and_leave_open(server, {"model": "globex", "stream": True, **LONG})
    wait_for(lambda: sched.queued == 2, what="the streaming request queued")
    plain.close()
    wait_for(lambda: cancelled(server, "queued") == 1, what="the non-streaming request withdrawn")
    stream.close()
    wait_for(lambda: cancelled(server, "queued") == 2, what="the streaming request withdrawn")
    # Their places in the queue and in globex's share are free at once, while the row still runs.
    assert sched.queued == 0 and "globex" not in sched.load
    assert len(server.rt.engine.worker.active) == 1
    busy.close()
    wait_for(lambda: cancelled(server, "running") == 1, what="the busy row retired")
    assert server.rt.engine.capacity()["rows_free"] == 1
    # A row that reached the model has generated at least its prefill's token: none did for globex.
    assert metric(server, "lorafleet_runtime_generated_tokens_total", tenant="globex") == 0
    r = httpx.post(server.url + "/v1/completions", json={"model": "globex", "prompt": "hi", "max_tokens": 2,
                                                       "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200
    assert metric(server, "lorafleet_runtime_generated_tokens_total", tenant="globex") == 2
    assert cancelled(server, "queued") == 2 and cancelled(server, "running") == 1

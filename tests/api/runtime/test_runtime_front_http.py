"""The HTTP front process (runtime/front.py, ``--front process``): answers through it are the inline
server's, the requests the scheduler would refuse are refused by the front without reaching the
model server (with the same 429s and the same /metrics totals), a client that leaves cancels its work
in the model server, a client cannot spoof the front's private headers, and the command stops cleanly
on SIGTERM and with exit code 1 when the front dies. Asserted with counters, not timings."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from support.models import put_adapter, start_runtime
from test_runtime_cli import _free_port, _start
from test_runtime_overload_http import Held, metric, shed_429


def _servers(model, names, adapters, **settings):
    out = []
    for front in (False, True):
        srv = start_runtime(model, front=front, device_slots=4, **settings)
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in names:
                assert put_adapter(admin, name, "1", adapters[name]).status_code == 200
        out.append(srv)
    return out


def _same(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created")}


def _stream_text(url: str, path: str, body: dict) -> tuple[int, str, str]:
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        raw = r.read().decode()
    pieces = []
    for line in raw.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            import json

            for choice in json.loads(line[6:]).get("choices", []):
                pieces.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
    return r.status_code, r.headers.get("content-type", ""), "".join(pieces)


def test_the_front_process_imports_neither_torch_nor_the_framework():
    out = subprocess.run([sys.executable, "-c", "import sys, lorafleet.runtime.front; "
                          "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'starlette') if m in sys.modules))"],
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_generation_answers_through_the_front_are_the_inline_ones(tiny_llama, gen_adapters):
    inline, front = _servers(tiny_llama, ["gen0", "gen1"], gen_adapters)
    try:
        comp = {"model": "gen1", "prompt": "hello there", "max_tokens": 6, "temperature": 0}
        chat = {"model": "gen0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
        for path, body in (("/v1/completions", comp), ("/v1/chat/completions", chat)):
            a, b = (httpx.post(s.url + path, json=body, timeout=60) for s in (inline, front))
            assert a.status_code == b.status_code == 200, b.text
            assert _same(a.json()) == _same(b.json())
            sa, sb = (_stream_text(s.url, path, {**body, "stream": True}) for s in (inline, front))
            assert sa == sb and sa[0] == 200 and sa[1].startswith("text/event-stream") and sa[2], (sa, sb)
        # The TGI route (chunked SSE as well), an unknown model, a bad body: the same answers.
        tgi = {"inputs": "hello", "parameters": {"adapter_id": "gen0", "max_new_tokens": 3}}
        for path, body in (("/generate", tgi), ("/v1/completions", {**comp, "model": "nope"}),
                           ("/v1/completions", {**comp, "max_tokens": "x"})):
            a, b = (httpx.post(s.url + path, json=body, timeout=60) for s in (inline, front))
            assert (a.status_code, a.json()) == (b.status_code, b.json())
        # Keep-alive over one connection, then a client that asks to close.
        with httpx.Client(base_url=front.url) as c:
            assert [c.post("/v1/completions", json=comp).status_code for _ in range(3)] == [200] * 3
            r = c.post("/v1/completions", json=comp, headers={"connection": "close"})
            assert r.status_code == 200 and r.headers["connection"] == "close"
        assert httpx.get(front.url + "/healthz").json()["instance"] == front.rt.instance
    finally:
        inline.stop()
        front.stop()


def test_classification_through_the_front_and_its_refusals_count_as_inline(minilm, cls_adapters):
    """With the tenant at its perTenantMaxInflight the next requests are refused by the front (the
    model server's precheck and submit never see them) with the inline gate's 429, and /metrics shows
    the same counts on both."""
    servers = _servers(minilm, ["cls0", "cls1"], cls_adapters, max_batch_size=32, max_queue_delay_ms=60_000,
                       per_tenant_max_inflight=3)
    inline, front = servers
    try:
        body = {"model": "cls0", "input": ["where is my refund", "cancel my order"]}
        a, b = (httpx.post(s.url + "/v1/classify", json=body, timeout=60) for s in servers)
        assert a.status_code == b.status_code == 200 and a.json() == b.json()
        large = {"model": "cls1", "input": ["x " * 300] * 2000}  # over the 1 MiB the gate reads: streamed on
        a, b = (httpx.post(s.url + "/v1/classify", json=large, timeout=60) for s in servers)
        assert (a.status_code, a.json()) == (b.status_code, b.json())
        refusals = {}
        for srv in servers:
            sched = srv.rt.engine.scheduler
            seen = {"precheck": 0, "submit": 0}
            precheck, submit = sched.precheck, sched.submit

            def counting_precheck(*a, _f=precheck, _s=seen):
                _s["precheck"] += 1
                return _f(*a)

            def counting_submit(*a, _f=submit, _s=seen):
                _s["submit"] += 1
                return _f(*a)

            sched.precheck, sched.submit = counting_precheck, counting_submit
            with ThreadPoolExecutor(3) as pool:
                with Held(srv.rt):
                    queued = [pool.submit(httpx.post, srv.url + "/v1/classify", json={"model": "cls0", "input": "hi"},
                                          timeout=60) for _ in range(3)]
                    wait_for(lambda: sched.queued == 3, what="the tenant's 3 requests queued")
                    before = dict(seen)
                    with httpx.Client(base_url=srv.url) as c:
                        answers = [c.post("/v1/classify", json={"model": "cls0", "input": "hi"}) for _ in range(20)]
                    for r in answers:
                        shed_429(r, "tenant_over_share")
                    refusals[srv.front] = (answers[0].json(), answers[0].headers["retry-after"], seen["precheck"]
                                           - before["precheck"], seen["submit"] - before["submit"])
                assert [f.result().status_code for f in queued] == [200] * 3
            wait_for(lambda: metric(srv.metrics_url, "lorafleet_runtime_admission_refused_total") == 20,
                     what="the 20 refusals counted")
        (body_i, retry_i, pre_i, sub_i), (body_f, retry_f, pre_f, sub_f) = refusals[False], refusals[True]
        assert body_i == body_f and retry_i == retry_f
        assert (pre_i, sub_i) == (20, 0)  # inline: the model server's gate asked the scheduler 20 times
        assert (pre_f, sub_f) == (0, 0)  # behind the front: none of the 20 reached the model server
        for name, labels in (("lorafleet_runtime_admission_refused_total", {"reason": "tenant_over_share"}),
                             ("lorafleet_runtime_shed_total", {"tenant": "cls0", "reason": "tenant_over_share"}),
                             ("lorafleet_runtime_requests_total", {"tenant": "cls0", "status": "429"}),
                             ("lorafleet_runtime_requests_total", {"tenant": "cls0", "status": "200"}),
                             ("lorafleet_runtime_request_seconds_count", {"tenant": "cls0"})):
            assert metric(inline.metrics_url, name, **labels) == metric(front.metrics_url, name, **labels), name
        assert metric(front.metrics_url, "lorafleet_runtime_admission_refused_total") == 20
    finally:
        inline.stop()
        front.stop()


def test_a_client_that_leaves_cancels_its_work_behind_the_front(minilm, cls_adapters):
    srv = start_runtime(minilm, front=True, device_slots=4, max_queue_delay_ms=0)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            assert put_adapter(admin, "cls0", "1", cls_adapters["cls0"]).status_code == 200
        sched = srv.rt.engine.scheduler
        with Held(srv.rt):
            for _ in range(3):
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(srv.url + "/v1/classify", json={"model": "cls0", "input": "hi"}, timeout=0.5)
            wait_for(lambda: metric(srv.metrics_url, "lorafleet_runtime_cancelled_total", stage="queued",
                                    reason="client_left") == 3 and sched.queued == 0,
                     what="the 3 abandoned requests leaving the model server's queue while the worker is held")
            assert sched.load == {}
        assert httpx.post(srv.url + "/v1/classify", json={"model": "cls0", "input": "hi"}).status_code == 200
    finally:
        srv.stop()


def test_a_client_cannot_spoof_the_fronts_arrival_time(minilm, cls_adapters):
    """An arrival stamp of long ago would be refused at once by the queue-delay bound if it were
    believed: from a client it is dropped by the front (and ignored inline)."""
    servers = _servers(minilm, ["cls0"], cls_adapters, max_queue_delay_ms=2_000)
    try:
        for srv in servers:
            for header in ("x-lorafleet-front-arrived", "X-Lorafleet-Front-Arrived"):
                r = httpx.post(srv.url + "/v1/classify", json={"model": "cls0", "input": "hi"},
                               headers={header: "1.0", "x-lorafleet-front-seq": "7"}, timeout=60)
                assert r.status_code == 200, (srv.front, r.text)
            assert metric(srv.metrics_url, "lorafleet_runtime_shed_total") == 0
    finally:
        for srv in servers:
            srv.stop()


def _children(pid: int, module: str) -> list[int]:
    """The child processes of ``pid`` (any of its threads') running ``python -m module``: the HTTP front,
    apart from the model process a classification pool on CPU also has."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for c in (task / "children").read_text().split():
            if f"-m\0{module}\0".encode() in Path(f"/proc/{c}/cmdline").read_bytes():
                out.append(int(c))
    return out


def test_serve_with_the_front_stops_on_sigterm_and_exits_1_when_the_front_dies(minilm, cls_adapters, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    shutil.copytree(cls_adapters["cls0"], folder / "cls0")
    for how in ("sigterm", "front_killed"):
        port = _free_port()
        log_path = tmp_path / f"serve-{how}.log"
        with open(log_path, "wb") as log:
            p = _start(["serve", "--model", str(minilm), "--adapters", str(folder), "--port", str(port),
                        "--admin-port", str(_free_port()), "--metrics-port", str(_free_port()), "--host", "127.0.0.1",
                        "--front", "process"], log=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=120, what="lorafleet serve ready")
            assert httpx.post(url + "/v1/classify", json={"model": "cls0", "input": "hi"}).status_code == 200
            (child,) = _children(p.pid, "lorafleet.runtime.front")
            if how == "sigterm":
                p.send_signal(signal.SIGTERM)
                assert p.wait(timeout=30) == 0, log_path.read_text()[-2000:]
            else:
                os.kill(child, signal.SIGKILL)
                assert p.wait(timeout=30) == 1, log_path.read_text()[-2000:]
                assert f"the HTTP front process {child} exited unexpectedly" in log_path.read_text()
            assert not Path(f"/proc/{child}").exists() or "zombie" in Path(f"/proc/{child}/status").read_text()
        finally:
            if p.poll() is None:
                p.kill()


def test_the_fronts_own_503_names_the_cause_and_is_counted(tmp_path):
    """The front process alone, its backend socket absent (the model server starting or gone): a client
    gets 503 backend_unavailable with Retry-After, and the front reports it on its channel; the
    runtime's side turns that report into /metrics lines."""
    import json
    import socket

    from prometheus_client import generate_latest

    from lorafleet.runtime.front_link import FrontProcess
    from lorafleet.runtime.metrics import RuntimeMetrics

    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen(16)
    port = listen.getsockname()[1]
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "lorafleet.runtime.front", "--listen-fd", str(listen.fileno()),
                             "--channel-fd", str(theirs.fileno()), "--backend", str(tmp_path / "absent.sock"),
                             "--log-level", "error"], pass_fds=(listen.fileno(), theirs.fileno()))
    theirs.close()
    listen.close()
    try:
        channel = ours.makefile("rb")
        assert "started" in json.loads(channel.readline())
        r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "backend_unavailable"
        ours.settimeout(30)
        msg = json.loads(channel.readline())
        while "errors" not in msg:
            msg = json.loads(channel.readline())
        assert msg["errors"] == [["", "/v1/models", 503, "backend_unavailable", 1]]
    finally:
        proc.terminate()
        proc.wait(30)
        ours.close()

    class _Rt:  # what FrontProcess._on_message reads of the runtime: its metrics
        metrics = RuntimeMetrics()

    FrontProcess._on_message(type("F", (), {"rt": _Rt})(), msg)
    text = generate_latest(_Rt.metrics.registry).decode()
    assert 'lorafleet_runtime_front_errors_total{code="backend_unavailable"} 1.0' in text
    assert 'lorafleet_runtime_requests_total{endpoint="/v1/models",status="503",tenant=""} 1.0' in text

"""The runtime over real HTTP (uvicorn on loopback) for a text-generation pool: OpenAI and TGI clients
unchanged, 50 concurrent clients over 20 tenants checked against PEFT, and the documented errors."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lorafleet.localstack.procs import wait_for
from lorafleet.runtime.generation import FALLBACK_CHAT_PROMPT, FALLBACK_CHAT_TEMPLATE
from support.models import PeftOracle, put_adapter, start_runtime

PROMPTS = ["hello world , how are", "please refund me , the invoice"]
NEW = 6


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    return PeftOracle(tiny_llama, "text-generation")


@pytest.fixture(scope="module")
def expected(oracle, gen_adapters20):
    """PEFT's greedy text for every (served version, prompt)."""
    out = {}
    for key, path in gen_adapters20.items():
        served = key if "@" in key else f"{key}@1"
        for p in PROMPTS:
            out[served, p] = oracle.tok.decode(oracle.greedy(path, p, NEW), skip_special_tokens=True)
    return out


@pytest.fixture(scope="module", params=["inline", "process"], ids=["model-inline", "model-process"])
def server(request, tiny_llama, gen_adapters20):
    # Fewer device slots than adapters in use: slots are evicted and rewritten under traffic. Every test
    # runs twice: the model in a thread of the server, and in a model process of its own.
    srv = start_runtime(tiny_llama, device_slots=6, max_batch_size=16, max_batch_delay_ms=2, max_queue=512,
                        per_tenant_max_inflight=64, max_queue_delay_ms=0,  # answers under contention, not shedding
                        model_process=request.param)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, path in gen_adapters20.items():
            if "@" not in name:
                assert put_adapter(admin, name, "1", path).status_code == 200
        assert admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0}).json()["ready"]
    yield srv
    srv.stop()


def test_openai_client_completions_chat_streaming_models(server, oracle, gen_adapters20, expected):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.completions.create(model="gen0", prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
    assert r.choices[0].text == expected["gen0@1", PROMPTS[0]]
    assert r.model == "gen0@1" and r.usage.completion_tokens == NEW

    pinned = client.completions.create(model="gen3@1", prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
    assert pinned.choices[0].text == expected["gen3@1", PROMPTS[1]]

    chunks = client.completions.create(model="gen1", prompt=PROMPTS[1], max_tokens=NEW, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == expected["gen1@1", PROMPTS[1]]

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat_prompt = "".join(FALLBACK_CHAT_TEMPLATE.format(**m) for m in messages) + FALLBACK_CHAT_PROMPT
    want = oracle.tok.decode(oracle.greedy(gen_adapters20["gen2"], chat_prompt, NEW), skip_special_tokens=True)
    chat = client.chat.completions.create(model="gen2", messages=messages, max_tokens=NEW, temperature=0)
    assert chat.choices[0].message.content == want and chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="gen2", messages=messages, max_tokens=NEW, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want

    ids = {m.id for m in client.models.list()}
    assert {"gen0", "gen19", server.rt.base_name} <= ids

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert e.value.code == "model_not_found"


def test_an_answer_read_only_at_its_end_is_decoded_once(server, expected, monkeypatch):
    """A completion that is not streamed and has no stop string is decoded once when it ends (the
    incremental detokenizer decodes two windows per token on the event loop); a stream, or an answer a
    stop string may cut, is still decoded token by token. Same text as PEFT's either way."""
    tok = server.rt.engine.tokenizer
    calls = [0]
    decode = tok.decode

    def counting(*a, **kw):
        calls[0] += 1
        return decode(*a, **kw)

    monkeypatch.setattr(tok, "decode", counting)
    want = expected["gen1@1", PROMPTS[0]]
    body = {"model": "gen1", "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert calls[0] == 1
    calls[0] = 0
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "gen1", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": NEW, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == NEW
    assert calls[0] == 1
    calls[0] = 0
    r = httpx.post(server.url + "/v1/completions", json={**body, "stop": ["\u2603"]}, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
    assert calls[0] >= 2 * NEW
    calls[0] = 0
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in s.iter_lines()
                       if line.startswith("data: {"))
    assert text == want and calls[0] >= 2 * NEW


def test_completions_not_streamed_are_answered_by_the_gate_through_the_same_handler(server, expected):
    """A valid JSON /v1/completions body that is not streamed is answered from the admission gate by the
    route's own handler (lorafleet_runtime_direct_requests_total); answers and errors are the app's. A
    stream, a chat request or a body the model refuses goes through the app."""
    from test_runtime_overload_http import metric

    m = server.metrics_url

    def direct():
        return metric(m, "lorafleet_runtime_direct_requests_total", endpoint="/v1/completions")

    before = direct()
    body = {"model": "gen2", "prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["gen2@1", PROMPTS[1]]
    assert r.json()["model"] == "gen2@1" and r.json()["usage"]["completion_tokens"] == NEW
    r = httpx.post(server.url + "/v1/completions", json={**body, "model": "nobody"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert direct() - before == 2
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=60) as s:
        assert s.status_code == 200 and any(line.startswith("data: {") for line in s.iter_lines())
    r = httpx.post(server.url + "/v1/completions", json={**body, "best_of_all": 2}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field"
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "gen2", "messages": [{"role": "user", "content": PROMPTS[1]}], "max_tokens": NEW, "temperature": 0})
    assert r.status_code == 200
    assert direct() - before == 2


def test_huggingface_inference_client_text_generation(server, expected, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # Offline mode (no hub downloads) also blocks the client's requests to our loopback server.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    client = InferenceClient(model=server.url)
    text = client.text_generation(PROMPTS[0], adapter_id="gen4", max_new_tokens=NEW)
    assert text == expected["gen4@1", PROMPTS[0]]
    streamed = "".join(client.text_generation(PROMPTS[1], adapter_id="gen5", max_new_tokens=NEW, stream=True))
    assert streamed == expected["gen5@1", PROMPTS[1]]
    details = client.text_generation(PROMPTS[1], adapter_id="gen6", max_new_tokens=NEW, details=True)
    assert details.generated_text == expected["gen6@1", PROMPTS[1]]
    assert details.details.generated_tokens == NEW
    tgi = httpx.post(server.url + "/generate", json={"inputs": PROMPTS[0],
                                                      "parameters": {"adapter_id": "gen7", "max_new_tokens": NEW}})
    assert tgi.json()["generated_text"] == expected["gen7@1", PROMPTS[0]]


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_50_concurrent_clients_20_tenants_never_get_another_tenants_answer(server, gen_adapters20, expected):
    churn = {"gen16", "gen17", "gen18", "gen19"}  # unloaded and loaded again while clients run
    stop = threading.Event()
    admin = httpx.Client(base_url=server.admin_url, timeout=30)

    def churner():
        i = 0
        while not stop.is_set():
            name = sorted(churn)[i % len(churn)]
            admin.delete(f"/admin/adapters/{name}/1")
            put_adapter(admin, name, "1", gen_adapters20[name])
            # A rollout of gen15: version 2 takes the weight, version 1 drains, then back.
            if i % 2 == 0:
                put_adapter(admin, "gen15", "2", gen_adapters20["gen15@2"], tenant="gen15", weight=100)
                put_adapter(admin, "gen15", "1", gen_adapters20["gen15"], weight=0)
            else:
                put_adapter(admin, "gen15", "1", gen_adapters20["gen15"], weight=100)
                admin.delete("/admin/adapters/gen15/2")
            i += 1

    evictions_before = _metric(server.metrics_url, 'lorafleet_runtime_adapter_evictions_total{tier="device"}')
    wrong, ok, missing = [], [], []

    def client(n: int):
        rng = random.Random(n)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for _ in range(6):
                name, prompt = f"gen{rng.randrange(20)}", rng.choice(PROMPTS)
                r = c.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": NEW,
                                                    "temperature": 0})
                if r.status_code == 404 and name in churn:
                    missing.append(name)
                    continue
                if r.status_code != 200:
                    wrong.append((name, r.status_code, r.text))
                    continue
                body = r.json()
                served = body["model"]
                if served.split("@")[0] != name or body["choices"][0]["text"] != expected[served, prompt]:
                    wrong.append((name, served, prompt, body["choices"][0]["text"]))
                else:
                    ok.append(served)

    t = threading.Thread(target=churner)
    t.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            list(pool.map(client, range(50)))
    finally:
        stop.set()
        t.join()
        admin.close()
    assert not wrong, wrong[:5]
    assert len(ok) + len(missing) == 300 and len(ok) > 200
    assert len({s.split("@")[0] for s in ok}) == 20
    assert _metric(server.metrics_url, 'lorafleet_runtime_adapter_evictions_total{tier="device"}') > evictions_before
    # The model thread's CPU inside forwards is shown beside their wall time, and is never more: a
    # reader takes their ratio for the share of the forwards' time the model really computed.
    cpu = _metric(server.metrics_url, 'lorafleet_runtime_batch_cpu_seconds_total{task="text-generation"}')
    wall = _metric(server.metrics_url, 'lorafleet_runtime_batch_seconds_sum{task="text-generation"}')
    assert 0 < cpu <= wall * 1.01 + 0.01, (cpu, wall)


def test_bad_requests_get_documented_codes_and_the_server_keeps_serving(server, expected, tmp_path):
    c = httpx.Client(base_url=server.url, timeout=30)
    r = c.post("/v1/completions", json={"model": "nobody", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = c.post("/v1/completions", content=b'{"model": "gen0", "prompt": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = c.post("/v1/completions", json={"model": "gen0"})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]
    r = c.post("/v1/classify", json={"model": "gen0", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"
    r = c.post("/v1/completions", json={"model": "gen0", "prompt": "word " * 300, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert str(server.rt.engine.max_input_tokens()) in r.json()["error"]["message"]

    with httpx.Client(base_url=server.admin_url) as admin:
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "adapter_config.json").write_text("{not json")
        r = put_adapter(admin, "broken", "1", broken)
        assert r.status_code == 422 and r.json()["adapter"]["state"] == "failed"
        assert r.json()["error"]["code"] == "adapter_load_failed" and "broken@1" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "broken", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable"

    r = c.post("/v1/completions", json={"model": "gen0", "prompt": PROMPTS[0], "max_tokens": NEW, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected["gen0@1", PROMPTS[0]]


def test_queue_full_and_tenant_over_share_get_429_with_retry_after(tiny_llama, gen_adapters20):
    srv = start_runtime(tiny_llama, max_queue=2, per_tenant_max_inflight=1, device_slots=4)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in ("gen0", "gen1", "gen2"):
                put_adapter(admin, name, "1", gen_adapters20[name])
        gate = threading.Event()
        srv.rt.engine.scheduler.post(gate.wait)  # hold the model worker so requests stay queued
        body = {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(httpx.post, srv.url + "/v1/completions", json={"model": "gen0", **body}, timeout=60)
            wait_for(lambda: srv.rt.engine.scheduler.queued == 1, what="first request queued")
            r = httpx.post(srv.url + "/v1/completions", json={"model": "gen0", **body})
            assert r.status_code == 429 and r.json()["error"]["code"] == "tenant_over_share"
            assert int(r.headers["retry-after"]) >= 1
            second = pool.submit(httpx.post, srv.url + "/v1/completions", json={"model": "gen1", **body}, timeout=60)
            wait_for(lambda: srv.rt.engine.scheduler.queued == 2, what="second request queued")
            r = httpx.post(srv.url + "/v1/completions", json={"model": "gen2", **body})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert "retry-after" in r.headers
            gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        r = httpx.post(srv.url + "/v1/completions", json={"model": "gen2", **body})
        assert r.status_code == 200
    finally:
        srv.stop()


def test_readyz_waits_for_the_sidecars_sync_and_admin_listens_on_loopback_only(tiny_llama):
    srv = start_runtime(tiny_llama)
    try:
        assert srv.admin_sock.getsockname()[0] == "127.0.0.1"
        assert httpx.get(srv.url + "/healthz").status_code == 200
        assert httpx.get(srv.url + "/readyz").status_code == 503
        admin = httpx.Client(base_url=srv.admin_url)
        assert admin.put("/admin/sync", json={"routesGeneration": 3, "preloadPending": 2}).json()["ready"] is False
        assert httpx.get(srv.url + "/readyz").status_code == 503
        assert admin.put("/admin/sync", json={"routesGeneration": 4, "preloadPending": 0}).json()["ready"] is True
        assert httpx.get(srv.url + "/readyz").status_code == 200
        # A new adapter on its way (a rollout) does not take a serving replica out of its Service.
        admin.put("/admin/sync", json={"routesGeneration": 5, "preloadPending": 1})
        assert httpx.get(srv.url + "/readyz").status_code == 200
        listing = admin.get("/admin/adapters").json()
        assert listing["instance"] == srv.rt.instance and listing["adapters"] == []
    finally:
        srv.stop()

"""The opt-in base-model fallback (LoRAAdapter spec.fallback: base) over real HTTP: an adapter that
opted in and cannot be served here (failed to load, or not loaded on this replica) is answered by the
base model, saying so in a header, a response field and a metric; one without the opt-in still gets
503 / 404."""

from __future__ import annotations

import httpx
import pytest

from support.models import PeftOracle, put_adapter, start_runtime

PROMPT = "hello world , how are"
NEW = 5


@pytest.fixture(scope="module")
def server(tiny_llama, gen_adapters, tmp_path_factory):
    srv = start_runtime(tiny_llama, device_slots=4, max_batch_size=4)
    broken = tmp_path_factory.mktemp("broken")
    (broken / "adapter_config.json").write_text("{not json")
    with httpx.Client(base_url=srv.admin_url) as admin:
        assert put_adapter(admin, "gen0", "1", gen_adapters["gen0"]).status_code == 200
        for name in ("broken-opt", "broken-plain"):
            assert put_adapter(admin, name, "1", broken, tenant="acme").status_code == 422
        # What the sidecar sends from the routes: the opted-in names (loaded here or not) and tenants.
        r = admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0,
                                           "fallback": {"broken-opt": "acme", "absent-opt": "globex"}})
        assert r.json()["ready"]
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def base_text(tiny_llama):
    o = PeftOracle(tiny_llama, "text-generation")
    return o.tok.decode(o.greedy(None, PROMPT, NEW), skip_special_tokens=True)


def _fallback_count(srv, tenant: str, reason: str) -> float:
    v = srv.rt.metrics.registry.get_sample_value("lorafleet_runtime_fallback_total",
                                                 {"tenant": tenant, "reason": reason})
    return v or 0.0


def test_opted_in_adapter_that_failed_to_load_is_answered_by_the_base(server, base_text):
    before = _fallback_count(server, "acme", "load_failed")
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/completions", json={"model": "broken-opt", "prompt": PROMPT, "max_tokens": NEW,
                                            "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.headers["x-lorafleet-fallback"] == "base"
    body = r.json()
    assert body["choices"][0]["text"] == base_text
    assert body["model"] == server.rt.base_name
    assert body["fallback"] == {"to": "base", "model": server.rt.base_name, "requested": "broken-opt",
                                "reason": "load_failed"}
    assert _fallback_count(server, "acme", "load_failed") == before + 1


def test_opted_in_adapter_not_loaded_here_falls_back_streaming_and_chat(server, base_text):
    before = _fallback_count(server, "globex", "not_loaded")
    with httpx.Client(base_url=server.url) as c:
        with c.stream("POST", "/v1/completions", json={"model": "absent-opt", "prompt": PROMPT,
                                                       "max_tokens": NEW, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-lorafleet-fallback"] == "base"
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
        import json
        chunks = [json.loads(ln[6:]) for ln in lines]
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == base_text
        assert all(ch["fallback"]["reason"] == "not_loaded" for ch in chunks)
        chat = c.post("/v1/chat/completions", json={"model": "absent-opt@3", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200 and chat.json()["fallback"]["requested"] == "absent-opt@3"
        # TGI's route: the header says it (TGI's body has no field for it).
        tgi = c.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "absent-opt",
                                                                         "max_new_tokens": NEW}})
        assert tgi.status_code == 200 and tgi.headers["x-lorafleet-fallback"] == "base"
        assert tgi.json()["generated_text"] == base_text
    assert _fallback_count(server, "globex", "not_loaded") == before + 3


def test_without_the_opt_in_the_answers_stay_503_and_404(server):
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/completions", json={"model": "broken-plain", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_unavailable"
        assert "x-lorafleet-fallback" not in r.headers
        r = c.post("/v1/completions", json={"model": "absent-plain", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert "x-lorafleet-fallback" not in r.headers
        # A loaded adapter is served by itself, never by the fallback.
        r = c.post("/v1/completions", json={"model": "gen0", "prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 200 and "fallback" not in r.json() and "x-lorafleet-fallback" not in r.headers
    assert _fallback_count(server, "acme", "not_loaded") == 0


def test_no_slot_within_the_deadline_falls_back_only_for_the_opted_in_adapter(tiny_llama, gen_adapters, base_text):
    # One device slot, held by a long generation of gen0: gen1 (opted in) gets no slot within half of
    # maxQueueDelayMs and is answered by the base; gen2 (not opted in) never is.
    srv = start_runtime(tiny_llama, device_slots=1, max_batch_size=4, max_queue_delay_ms=80)
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            for name in ("gen0", "gen1", "gen2"):
                assert put_adapter(admin, name, "1", gen_adapters[name]).status_code == 200
            admin.put("/admin/sync", json={"routesGeneration": 1, "preloadPending": 0, "fallback": {"gen1": "gen1"}})
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            long = {"model": "gen0", "prompt": "hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            with c.stream("POST", "/v1/completions", json=long) as held:
                assert held.status_code == 200
                lines = held.iter_lines()  # kept: a dropped iterator closes the stream (the server cancels)
                assert next(lines).startswith("data: {")  # gen0 runs: its slot is taken until it ends
                r = c.post("/v1/completions", json={"model": "gen1", "prompt": PROMPT, "max_tokens": NEW,
                                                    "temperature": 0})
                cap = srv.rt.engine.capacity()
                still_running = cap["rows_free"] < cap["max_batch_size"]  # gen0's row is still taken
            assert still_running, "gen0 ended before gen1's deadline: the test shows nothing"
            assert r.status_code == 200, r.text
            assert r.headers["x-lorafleet-fallback"] == "base"
            assert r.json()["fallback"]["reason"] == "slot_timeout" and r.json()["fallback"]["requested"] == "gen1"
            assert r.json()["choices"][0]["text"] == base_text and r.json()["model"] == srv.rt.base_name
            assert _fallback_count(srv, "gen1", "slot_timeout") == 1
            with c.stream("POST", "/v1/completions", json=long) as held:
                lines = held.iter_lines()
                next(lines)
                r = c.post("/v1/completions", json={"model": "gen2", "prompt": PROMPT, "max_tokens": NEW,
                                                    "temperature": 0})
            assert "x-lorafleet-fallback" not in r.headers and r.status_code in (200, 429), r.text
            assert "fallback" not in r.json()
    finally:
        srv.stop()

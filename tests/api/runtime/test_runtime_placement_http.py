"""A replica of a pool with placement over real HTTP: an adapter of the pool's routes that this
replica does not hold (the sidecar's ``SyncState.pool_adapters``) is answered 503
``adapter_elsewhere`` with Retry-After, which the gateway retries on a holder: never 404, never the
base model (not even for an adapter that opted into the base fallback). Names the pool does not
route are still 404."""

from __future__ import annotations

import httpx
import pytest

from support.models import put_adapter, start_runtime

PROMPT = "hello world , how are"


@pytest.fixture(scope="module")
def server(tiny_llama, gen_adapters):
    srv = start_runtime(tiny_llama, device_slots=4, max_batch_size=4)
    with httpx.Client(base_url=srv.admin_url) as admin:
        assert put_adapter(admin, "gen0", "1", gen_adapters["gen0"]).status_code == 200
        r = admin.put("/admin/sync", json={"routesGeneration": 4, "preloadPending": 0,
                                           "poolAdapters": ["gen0", "on-another-pod", "opted-in-elsewhere"],
                                           "fallback": {"opted-in-elsewhere": "acme"}})
        assert r.json()["ready"]
    yield srv
    srv.stop()


def ask(srv, model: str) -> httpx.Response:
    with httpx.Client(base_url=srv.url) as c:
        return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 2,
                                               "temperature": 0})


def test_an_adapter_placed_on_another_replica_is_a_retryable_503(server):
    for model in ("on-another-pod", "on-another-pod@3", "opted-in-elsewhere"):
        r = ask(server, model)
        assert r.status_code == 503, (model, r.text)
        assert r.json()["error"]["code"] == "adapter_elsewhere" and r.headers["retry-after"] == "1"
        assert "x-lorafleet-fallback" not in r.headers


def test_the_replica_serves_what_it_holds_and_404s_what_the_pool_does_not_route(server):
    assert ask(server, "gen0").status_code == 200
    r = ask(server, "nobody-routes-this")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_requests_answered_are_counted_per_version_for_the_sidecars_rates(server):
    def count() -> int:
        with httpx.Client(base_url=server.admin_url) as admin:
            listing = admin.get("/admin/adapters").json()["adapters"]
        return next(a["requests"] for a in listing if (a["name"], a["version"]) == ("gen0", "1"))

    before = count()
    for model in ("gen0", "gen0@1", "on-another-pod"):
        ask(server, model)
    # Both requests it answered count (by name and pinned); the one answered 503 is not its.
    assert count() - before == 2

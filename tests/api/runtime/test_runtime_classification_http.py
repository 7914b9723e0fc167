"""A sequence-classification pool over real HTTP on the real MiniLM: per-tenant heads with different
label counts, each answer checked against PEFT, concurrent tenants, and the documented errors."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from support.models import PeftOracle, make_classification_adapter, put_adapter, start_runtime

TEXTS = ["my order has not arrived", "the invoice is wrong", "great product , thanks !", "please reset my password",
         "where is my refund", "hello"]


@pytest.fixture(scope="module")
def expected(minilm, cls_adapters):
    oracle = PeftOracle(minilm, "sequence-classification")
    return {name: torch.softmax(oracle.logits(path, TEXTS), -1) for name, path in cls_adapters.items()}


@pytest.fixture(scope="module", params=["inline", "process"], ids=["model-inline", "model-process"])
def server(request, minilm, cls_adapters):
    # No queue-delay bound: this module checks answers under contention, not shedding (on two busy
    # cores 50 clients wait longer than the default bound). Every test runs with the model in a thread of
    # the server and in a model process of its own.
    srv = start_runtime(minilm, device_slots=3, max_batch_size=16, max_batch_delay_ms=2, max_queue_delay_ms=0,
                        model_process=request.param)
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, path in cls_adapters.items():
            assert put_adapter(admin, name, "1", path).status_code == 200
        admin.put("/admin/sync", json={"preloadPending": 0})
    yield srv
    srv.stop()


def _check(body: dict, name: str, rows: list[int], expected) -> None:
    assert body["model"] == f"{name}@1"
    for item, i in zip(body["data"], rows):
        want = expected[name][i]
        scores = [s["score"] for s in item["labels"]]
        assert len(scores) == len(want), f"{name}: one score per label of its own head"
        torch.testing.assert_close(torch.tensor(scores), want, atol=1e-4, rtol=1e-3)
        top = int(want.argmax())
        assert item["label"] == item["labels"][top]["label"] == f"{name}-label{top}"


def test_classify_matches_peft_per_tenant_with_own_labels(server, cls_adapters, expected):
    for name in cls_adapters:
        r = httpx.post(server.url + "/v1/classify", json={"model": name, "input": TEXTS})
        assert r.status_code == 200, r.text
        _check(r.json(), name, list(range(len(TEXTS))), expected)
    r = httpx.post(server.url + "/v1/classify", json={"model": "cls0", "input": TEXTS[2]})
    _check(r.json(), "cls0", [2], expected)


def test_concurrent_tenants_get_their_own_heads(server, cls_adapters, expected):
    wrong = []

    def client(n: int):
        rng = random.Random(n)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for _ in range(4):
                name = rng.choice(list(cls_adapters))
                rows = rng.sample(range(len(TEXTS)), 2)
                r = c.post("/v1/classify", json={"model": name, "input": [TEXTS[i] for i in rows]})
                try:
                    assert r.status_code == 200, r.text
                    _check(r.json(), name, rows, expected)
                except AssertionError as e:
                    wrong.append((name, str(e)[:200]))

    with ThreadPoolExecutor(50) as pool:
        list(pool.map(client, range(50)))
    assert not wrong, wrong[:3]


def test_a_trained_tenant_adapter_predicts_its_labels(server, minilm, tmp_path):
    labels = ["billing", "shipping", "password"]
    path = make_classification_adapter(minilm, tmp_path / "trained", labels=labels, seed=7, train_steps=25)
    with httpx.Client(base_url=server.admin_url) as admin:
        assert put_adapter(admin, "helpdesk", "1", path, tenant="acme").status_code == 200
    r = httpx.post(server.url + "/v1/classify", json={"model": "helpdesk", "input": [
        "please billing today", "the account shipping now", "my password again"]})
    assert [d["label"] for d in r.json()["data"]] == labels


def test_classification_errors(server):
    c = httpx.Client(base_url=server.url, timeout=30)
    r = c.post("/v1/classify", json={"model": "cls0", "input": "word " * 600})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long" and "512" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "cls0", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"
    r = c.post("/v1/classify", json={"model": "nobody", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = c.post("/v1/classify", json={"model": "cls0", "input": []})
    assert r.status_code == 400
    r = c.post("/v1/classify", content=b"not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert c.post("/v1/classify", json={"model": "cls1", "input": "hello"}).status_code == 200


def test_the_base_model_answers_to_its_served_name(minilm, cls_adapters):
    srv = start_runtime(minilm, served_model_name="support-pool")
    try:
        with httpx.Client(base_url=srv.admin_url) as admin:
            assert put_adapter(admin, "cls0", "1", cls_adapters["cls0"]).status_code == 200
            clash = put_adapter(admin, "support-pool", "1", cls_adapters["cls1"])
            assert clash.status_code == 409 and clash.json()["error"]["code"] == "name_conflict"
            assert "support-pool" in clash.json()["error"]["message"]
            admin.put("/admin/sync", json={"preloadPending": 0})
        c = httpx.Client(base_url=srv.url, timeout=30)
        models = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["support-pool", "cls0"]
        assert models[1]["parent"] == "support-pool"
        # The base model has no tenant head: named, it is the base (a clear 400), not an unknown model.
        r = c.post("/v1/classify", json={"model": "support-pool", "input": "hello"})
        assert r.status_code == 400 and "support-pool" in r.json()["error"]["message"]
        assert c.post("/v1/classify", json={"model": "cls0", "input": "hello"}).status_code == 200
    finally:
        srv.stop()


def test_valid_requests_are_answered_by_the_gate_through_the_same_handler(server, expected):
    """A valid JSON /v1/classify body is answered from the admission gate by the route's own handler,
    without the framework (counted in lorafleet_runtime_direct_requests); the answers, the documented
    errors and the request counters are what the app gives. A body the model refuses, or another
    content type, goes through the app (its 400 names the problem) and is not counted as direct."""
    from test_runtime_overload_http import metric

    m = server.metrics_url
    c = httpx.Client(base_url=server.url, timeout=30)
    direct0 = metric(m, "lorafleet_runtime_direct_requests_total", endpoint="/v1/classify")
    ok0 = metric(m, "lorafleet_runtime_requests_total", tenant="cls2", endpoint="/v1/classify", status="200")
    for i in range(3):
        r = c.post("/v1/classify", json={"model": "cls2", "input": [TEXTS[i], TEXTS[i + 1]]})
        assert r.status_code == 200, r.text
        _check(r.json(), "cls2", [i, i + 1], expected)
    r = c.post("/v1/classify", json={"model": "nobody", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = c.post("/v1/classify", json={"model": "cls2", "input": "word " * 600})
    assert r.status_code == 400 and r.json()["error"]["code"] == "input_too_long"
    assert metric(m, "lorafleet_runtime_direct_requests_total", endpoint="/v1/classify") - direct0 == 5
    assert metric(m, "lorafleet_runtime_requests_total", tenant="cls2", endpoint="/v1/classify", status="200") - ok0 == 3
    r = c.post("/v1/classify", json={"model": "cls2", "input": "x", "top_k": 3})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field" and "top_k" in r.json()["error"]["message"]
    r = c.post("/v1/classify", json={"model": "cls2", "input": []})
    assert r.status_code == 400 and "input" in r.json()["error"]["message"]
    r = c.post("/v1/classify", content=b'{"model": "cls2", "input": "x"}', headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_body"  # FastAPI reads no JSON from it
    assert metric(m, "lorafleet_runtime_direct_requests_total", endpoint="/v1/classify") - direct0 == 5

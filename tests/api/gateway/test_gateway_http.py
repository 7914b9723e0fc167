"""The gateway in front of three real runtime replicas: adapter affinity, load spill, tenant isolation on
every endpoint, key rotation, rate and concurrency limits, SSE, metrics, and a replica killed mid-run.
(The kill test runs last: it takes a replica away from the module's pool.)"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from lorafleet.gateway.routing import rendezvous_score
from lorafleet.localstack.procs import wait_for
from support.tenants import key_entry

PROMPT = "hello world , how are"


def complete(c: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                           "temperature": 0})


def ranked(adapter: str, pods) -> list[str]:
    return sorted(pods, key=lambda p: rendezvous_score(adapter, p), reverse=True)


def test_requests_for_an_adapter_go_to_the_replica_that_holds_it(pool):
    pods = list(pool.replicas)
    # globex-bot made resident on the device of the replica the hash would pick last ...
    holder = ranked("globex-bot", pods)[-1]
    assert complete(httpx.Client(base_url=pool.urls[holder], timeout=30), "globex-bot").status_code == 200
    wait_for(lambda: "globex-bot" in pool.view()[holder]["device"], 10, what=f"the gateway to see globex-bot on {holder}")
    with pool.client("globex") as c:
        served_by = {complete(c, "globex-bot").headers["X-Lorafleet-Replica"] for _ in range(12)}
    assert served_by == {holder}
    # ... and acme-support, held by no device, lands on its hash choice every time and stays there.
    with pool.client("acme") as c:
        served_by = [complete(c, "acme-support").headers["X-Lorafleet-Replica"] for _ in range(12)]
    assert set(served_by) == {ranked("acme-support", pods)[0]}
    # The gateway reads each replica's holdings by polling (--replica-poll-s), as for globex-bot above.
    wait_for(lambda: "acme-support" in pool.view()[served_by[0]]["device"], 10,
             what=f"the gateway to see acme-support on {served_by[0]}")


def test_load_spreads_to_other_replicas_when_the_holder_is_busy(pool):
    with pool.client("acme") as c, ThreadPoolExecutor(12) as ex:
        rs = list(ex.map(lambda _: complete(c, "acme-chat", max_tokens=48), range(24)))
    assert [r.status_code for r in rs] == [200] * 24
    assert len({r.headers["X-Lorafleet-Replica"] for r in rs}) >= 2, "12 at once with --spill-inflight 2"
    metrics = pool.metrics()
    assert re.search(r'lorafleet_gateway_routed_total\{reason="spill",replica="[^"]+"\} [1-9]', metrics)


def test_a_key_reaches_only_its_own_tenants_adapters_on_every_endpoint(pool):
    bodies = {
        "/v1/completions": lambda m: {"model": m, "prompt": PROMPT, "max_tokens": 3},
        "/v1/chat/completions": lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 3},
        "/generate": lambda m: {"inputs": PROMPT, "parameters": {"adapter_id": m, "max_new_tokens": 3}},
        "/generate_stream": lambda m: {"inputs": PROMPT, "parameters": {"adapter_id": m, "max_new_tokens": 3}},
        "/": lambda m: {"inputs": PROMPT, "parameters": {"adapter_id": m, "max_new_tokens": 3}},
        "/v1/classify": lambda m: {"model": m, "input": "refund please"},
    }
    with pool.client("acme") as acme, pool.client() as anonymous, pool.client(key="not-a-key") as stranger:
        for path, body in bodies.items():
            foreign = acme.post(path, json=body("globex-bot"))
            assert foreign.status_code == 403, (path, foreign.text)
            err = foreign.json()["error"]
            assert err["code"] == "adapter_forbidden" and "globex-bot" in err["message"] and "acme" in err["message"]
            pinned = acme.post(path, json=body("globex-bot@1"))
            assert pinned.status_code == 403, path
            assert anonymous.post(path, json=body("acme-support")).status_code == 401, path
            assert stranger.post(path, json=body("acme-support")).json()["error"]["code"] == "invalid_api_key"
            own = acme.post(path, json=body("acme-support"))
            # The tiny pool generates text: classify reaches the runtime, which says it is the wrong task.
            expected = (400, "wrong_task") if path == "/v1/classify" else (200, None)
            assert own.status_code == expected[0], (path, own.text)
            if expected[1]:
                assert own.json()["error"]["code"] == "wrong_task"
        assert acme.post("/v1/completions", json=bodies["/v1/completions"]("no-such-adapter")).status_code == 404
        # Text-to-image pools name the adapter in the `lora` header or the path: checked as well.
        sneaky = acme.post("/", json=bodies["/"]("acme-support"), headers={"lora": "globex-bot"})
        assert sneaky.status_code == 403 and "globex-bot" in sneaky.json()["error"]["message"]
        assert acme.post("/models/globex-bot", json={"inputs": "x"}).status_code == 403
        assert acme.post("/models/x", json={"inputs": "x"}, headers={"lora": "globex-bot"}).status_code == 403
        # Another pool's adapter of the same tenant is not served here.
        assert acme.post("/v1/completions", json=bodies["/v1/completions"]("elsewhere")).status_code == 404

        listed = {m["id"]: m for m in acme.get("/v1/models").json()["data"]}
        assert {k for k, m in listed.items() if "parent" in m} == {"acme-support", "acme-chat"}
        assert all(m["owned_by"] == "acme" for m in listed.values() if "parent" in m)
        globex = {m["id"] for m in pool.client("globex").get("/v1/models").json()["data"] if "parent" in m}
        assert globex == {"globex-bot"}
        assert anonymous.get("/v1/models").status_code == 401

        # The public port tells nothing about other tenants or the pods: metrics are on the internal port.
        assert anonymous.get("/metrics").status_code == 404
        assert anonymous.get("/readyz").json() == {"status": "ready"}

        # The base model is shared, not a tenant's adapter: any valid key may use it.
        base = next(k for k, m in listed.items() if "parent" not in m)
        assert complete(acme, base).status_code == 200


def test_sse_streams_through_and_errors_keep_the_runtimes_shape(pool):
    with pool.client("acme") as c:
        with c.stream("POST", "/v1/chat/completions", json={"model": "acme-chat", "stream": True, "max_tokens": 8,
                                                             "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3
        bad = c.post("/v1/completions", json={"model": "acme-chat", "prompt": PROMPT, "max_tokens": 0})
        assert bad.status_code == 400  # the runtime's validation error, passed through
        assert c.post("/v1/completions", content=b"{not json").json()["error"]["code"] == "invalid_json"


def test_rotating_a_key_digest_takes_effect_without_a_restart(pool, kube):
    from lightkube.types import PatchType

    from lorafleet.gateway.kube import LoRATenantResource

    def keys(*entries):
        kube.patch(LoRATenantResource, "acme", {"spec": {"apiKeys": list(entries)}}, namespace=pool.namespace,
                   patch_type=PatchType.MERGE)

    with pool.client("acme") as old, pool.client(key="acme-key-2") as new:
        assert complete(old, "acme-support").status_code == 200
        assert complete(new, "acme-support").status_code == 401
        keys(key_entry("acme-key-1"), key_entry("acme-key-2", "k2"))  # rotation: both for a while
        wait_for(lambda: complete(new, "acme-support").status_code == 200, 5, what="the new key to be accepted")
        assert complete(old, "acme-support").status_code == 200
        keys(key_entry("acme-key-2", "k2"))
        wait_for(lambda: complete(old, "acme-support").status_code == 401, 5, what="the old key to be refused")
        assert complete(new, "acme-support").status_code == 200
        keys(key_entry("acme-key-1"))
        wait_for(lambda: complete(old, "acme-support").status_code == 200, 5, what="the key to be restored")


def test_rate_limit_and_concurrency_answer_429_with_retry_after(pool):
    with pool.client("initech") as c:  # 0.2 requests/s, burst 2
        codes = [complete(c, "initech-bot").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = complete(c, "initech-bot")
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded" and "rateLimit" in r.json()["error"]["message"]
    with pool.client("acme") as other:  # another tenant is not affected
        assert complete(other, "acme-support").status_code == 200

    start = threading.Barrier(6)

    def one(_):
        with pool.client("umbrella") as c:  # maxConcurrency 1
            start.wait()
            return complete(c, "umbrella-bot", max_tokens=48)
    with ThreadPoolExecutor(6) as ex:
        rs = list(ex.map(one, range(6)))
    codes = sorted(r.status_code for r in rs)
    assert codes[0] == 200 and codes[-1] == 429, codes
    refused = next(r for r in rs if r.status_code == 429)
    assert refused.json()["error"]["code"] == "concurrency_limit_exceeded" and refused.headers["Retry-After"]

    metrics = pool.metrics()
    assert re.search(r'lorafleet_gateway_rejected_total\{reason="rate_limit_exceeded",tenant="initech"\} [1-9]',
                     metrics)
    assert re.search(r'lorafleet_gateway_requests_total\{replica="tiny-replica-\d",status="200",tenant="acme"\} '
                     r'[1-9]', metrics)
    assert 'lorafleet_gateway_request_seconds_bucket{le="0.5",tenant="acme"}' in metrics


def test_tenant_limits_are_divided_among_the_pools_ready_gateway_replicas(pool, kube):
    """With a second Ready gateway pod of the pool, this gateway admits half of a tenant's limits (the
    load balancer sends it half the requests); once the peer is gone, the whole of them again."""
    from lightkube import ApiError
    from lightkube.models.core_v1 import Container, PodSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Pod
    from lightkube.types import PatchType

    from lorafleet.contracts import names
    from lorafleet.gateway.kube import LoRATenantResource

    ns = pool.namespace

    def readyz() -> dict:
        return httpx.get(f"{pool.ops}/readyz", timeout=5).json()

    def gateway_pod(name: str, of_pool: str, ready: bool) -> None:
        kube.create(Pod(metadata=ObjectMeta(name=name, namespace=ns, labels={names.LABEL_GATEWAY_FOR: of_pool}),
                        spec=PodSpec(containers=[Container(name="gateway", image="lorafleet/control:0.1.0")])))
        if ready:
            kube.patch(Pod.Status, name, {"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True"}]}}, namespace=ns, patch_type=PatchType.MERGE)

    # One token per 20 s (per 40 s at half the rate): far longer than the test runs, so the counts of
    # 200s in a burst are exact even on a loaded machine.
    tenants = readyz()["tenants"]
    for tenant in ("hooli", "piper"):
        kube.create(LoRATenantResource(metadata=ObjectMeta(name=tenant, namespace=ns), spec={
            "apiKeys": [key_entry(f"{tenant}-key-1")],
            "rateLimit": {"requestsPerSecond": 0.05, "burst": 4}}))
    wait_for(lambda: readyz()["tenants"] == tenants + 2, 10, what="the gateway to read tenants hooli and piper")
    assert readyz()["gatewayReplicas"] == 1  # run by hand: no gateway pod of its own, counts itself
    with pool.client("acme") as acme:
        base = next(m["id"] for m in acme.get("/v1/models").json()["data"] if "parent" not in m)
    mine = ["tiny-gateway-0", "tiny-gateway-1", "tiny-gateway-2", "other-gateway-0"]
    try:
        gateway_pod("tiny-gateway-0", "tiny", ready=True)    # this gateway, as its pod
        gateway_pod("tiny-gateway-1", "tiny", ready=True)    # its peer
        gateway_pod("tiny-gateway-2", "tiny", ready=False)   # starting: gets no traffic, does not count
        gateway_pod("other-gateway-0", "other", ready=True)  # another pool's gateway
        wait_for(lambda: readyz()["gatewayReplicas"] == 2, 10, what="the gateway to count 2 Ready gateway pods")
        with pool.client(key="hooli-key-1") as c:
            rs = [complete(c, base) for _ in range(6)]
        assert [r.status_code for r in rs] == [200, 200, 429, 429, 429, 429]  # half the burst of 4
        err = rs[-1].json()["error"]
        assert err["code"] == "rate_limit_exceeded" and "its share across 2 replicas" in err["message"], err
        assert 20 < int(rs[-1].headers["Retry-After"]) <= 40, "half of 0.05/s: 40 s to the next token"
        assert re.search(r"^lorafleet_gateway_ready_gateways 2\.0$", pool.metrics(), re.M)

        kube.delete(Pod, "tiny-gateway-1", namespace=ns)
        wait_for(lambda: readyz()["gatewayReplicas"] == 1, 10, what="the gateway to count 1 Ready gateway pod")
        with pool.client(key="hooli-key-1") as c:
            r = complete(c, base)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) <= 20, "the whole 0.05/s again"
        with pool.client(key="piper-key-1") as c:
            assert [complete(c, base).status_code for _ in range(6)] == [200] * 4 + [429] * 2  # the whole burst
        assert re.search(r"^lorafleet_gateway_ready_gateways 1\.0$", pool.metrics(), re.M)
    finally:
        for name in mine:
            try:
                kube.delete(Pod, name, namespace=ns)
            except ApiError as e:  # already gone, or never created when the test failed early
                if e.status.code != 404:
                    raise
    wait_for(lambda: readyz()["gatewayReplicas"] == 1, 10, what="the gateway back to counting itself alone")


def test_a_replica_killed_mid_run_fails_no_request_and_never_replays_a_stream(pool):
    """Runs last in this module (the pool keeps two replicas afterwards)."""
    models = ["acme-support", "acme-chat"]
    warmed = threading.Event()
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def worker(i: int):
        with pool.client("acme") as c:
            for j in range(12):
                r = complete(c, models[(i + j) % len(models)], max_tokens=24)
                with lock:
                    results.append(r)
                    if len(results) >= 12:
                        warmed.set()

    with ThreadPoolExecutor(6) as ex, pool.client("acme") as c:
        futures = [ex.submit(worker, i) for i in range(6)]
        assert warmed.wait(60)
        # A long stream: once its first bytes reached us, its replica dies (SIGKILL, connections reset
        # under every request in flight there).
        with c.stream("POST", "/v1/completions", json={"model": "acme-chat", "prompt": PROMPT, "max_tokens": 220,
                                                        "temperature": 0, "stream": True}) as stream:
            victim = stream.headers["X-Lorafleet-Replica"]
            lines = stream.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: "))
            pool.replicas[victim].proc.kill()
            rest = [ln for ln in lines if ln.startswith("data: ")]
        for f in futures:
            f.result()
    # The stream was not replayed from another replica: it ends with an error event, no [DONE].
    assert "text_completion" in first
    assert rest and "upstream_failed" in rest[-1] and "data: [DONE]" not in rest, rest[-3:]
    failed = [(r.status_code, r.text[:200]) for r in results if r.status_code != 200]
    assert not failed and len(results) == 72
    after = pool.metrics()
    retries = sum(float(v) for v in re.findall(r'lorafleet_gateway_retries_total\{[^}]*\} (\S+)', after))
    assert retries >= 1, "no request was in flight on the killed replica; the test proved nothing"
    wait_for(lambda: not pool.view()[victim]["healthy"], 5, what=f"{victim} marked down")
    with pool.client("acme") as c2:
        assert all(complete(c2, m).headers["X-Lorafleet-Replica"] != victim for m in models)

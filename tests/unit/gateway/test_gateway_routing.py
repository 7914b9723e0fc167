"""Gateway decisions without processes: replica choice, tenant keys and ownership, limits, request parsing."""

from __future__ import annotations

from types import SimpleNamespace

from lorafleet.gateway.kube import pod_address, pod_ready
from lorafleet.gateway.routing import AffinityRouter, Replica, RoundRobinRouter, rendezvous_score
from lorafleet.gateway.server import requested_adapter, requested_adapters
from lorafleet.gateway.tenants import Admission, Directory, TenantLimits, TokenBucket, key_digest


def fleet(n=4, **held):
    reps = [Replica(f"pod-{i}", f"http://10.0.0.{i}:8000") for i in range(n)]
    for name, states in held.items():
        for i, s in enumerate(states):
            if s:
                reps[i].adapters[name] = s
    return reps


def test_an_adapter_on_a_device_wins_over_one_in_host_memory_and_over_the_hash():
    reps = fleet(a=["host", "device", "host", None])
    c = AffinityRouter(4).choose("a", reps)
    assert c.order[0].name == "pod-1" and c.reason == "device"
    # The other holders are the fallbacks; pod-3 does not hold it (placed elsewhere: it would answer 503),
    # so it comes last, for a retry only.
    assert {r.name for r in c.order[1:3]} == {"pod-0", "pod-2"} and c.order[3].name == "pod-3"


def test_among_device_holders_the_least_loaded_serves():
    reps = fleet(a=["device", "device", None, None])
    reps[0].inflight = 3
    assert AffinityRouter(8).choose("a", reps).order[0].name == "pod-1"


def test_a_busy_holder_spills_and_everything_busy_goes_to_the_least_loaded():
    reps = fleet(a=["device", "host", "registered", "registered"])
    reps[0].inflight = 4
    c = AffinityRouter(4).choose("a", reps)
    assert c.reason == "spill" and c.order[0].name == "pod-1"
    for r in reps:
        r.inflight = 5
    reps[2].inflight = 4
    assert AffinityRouter(4).choose("a", reps).order[0].name == "pod-2"


def test_adapters_held_nowhere_land_on_one_replica_by_rendezvous_and_spread_over_all():
    reps = fleet()
    router = AffinityRouter(8)
    picks = {f"t{i}": router.choose(f"t{i}", reps).order[0].name for i in range(400)}
    assert all(router.choose(a, reps).order[0].name == p for a, p in picks.items())  # stable
    counts = {r.name: list(picks.values()).count(r.name) for r in reps}
    assert min(counts.values()) > 60, counts  # ~100 each
    # Removing a replica moves only the adapters that ranked it first.
    moved = sum(1 for a, p in picks.items() if router.choose(a, reps[:3]).order[0].name != p)
    assert moved == counts["pod-3"]
    assert rendezvous_score("a", "pod-0") == rendezvous_score("a", "pod-0")


def test_host_copy_beats_the_hash_when_no_device_holds_it():
    reps = fleet(a=[None, None, "host", None])
    assert AffinityRouter(8).choose("a", reps).order[0].name == "pod-2"


def test_unhealthy_replicas_are_skipped_while_a_healthy_one_exists():
    reps = fleet(a=["device", None, None, None])
    reps[0].healthy = False
    assert AffinityRouter(8).choose("a", reps).order[0].name != "pod-0"
    for r in reps:
        r.healthy = False
    assert AffinityRouter(8).choose("a", reps).order  # nothing healthy: try them all anyway


def test_round_robin_cycles():
    reps = fleet(3)
    rr = RoundRobinRouter()
    assert [rr.choose("a", reps).order[0].name for _ in range(4)] == ["pod-0", "pod-1", "pod-2", "pod-0"]


def test_directory_maps_keys_and_versioned_names_to_tenants():
    d = Directory(keys={key_digest("k1"): "acme"}, adapters={"support": "acme", "bot": "globex"})
    assert d.tenant_of_key("k1") == "acme" and d.tenant_of_key("k2") is None and d.tenant_of_key(None) is None
    assert d.owner("support@3") == "acme" and d.owner("nope") is None
    assert d.adapters_of("acme") == {"support"}


def test_token_bucket_and_concurrency():
    b = TokenBucket(2.0, 2, now=0.0)
    assert b.take(0.0) == 0 and b.take(0.0) == 0
    assert b.take(0.0) == 0.5  # the next token in half a second
    assert b.take(0.5) == 0
    a = Admission()
    lim = TenantLimits(max_concurrency=1)
    assert a.admit("acme", lim) is None
    code, message, retry = a.admit("acme", lim)
    assert code == "concurrency_limit_exceeded" and "maxConcurrency" in message and retry >= 1
    a.release("acme")
    assert a.admit("acme", lim) is None
    rl = TenantLimits(requests_per_second=0.5, burst=1)
    assert a.admit("globex", rl, now=0.0) is None
    code, _, retry = a.admit("globex", rl, now=0.1)
    assert code == "rate_limit_exceeded" and retry == 2


def test_the_adapter_comes_from_model_or_tgi_parameters():
    assert requested_adapter("/v1/completions", {"model": "a"}) == "a"
    assert requested_adapter("/v1/chat/completions", {"model": "a@2"}) == "a@2"
    assert requested_adapter("/v1/classify", {"model": "c"}) == "c"
    assert requested_adapter("/generate", {"inputs": "x", "parameters": {"adapter_id": "t"}}) == "t"
    assert requested_adapter("/generate_stream", {"inputs": "x"}) is None
    assert requested_adapter("/", {"parameters": "junk"}) is None
    assert requested_adapter("/v1/images/generations", {"model": "art@3", "prompt": "x"}) == "art@3"


def test_every_name_a_request_carries_is_checked_whichever_the_pool_reads():
    # A text-to-image pool reads the `lora` header on / and /models/{name}; a text pool reads adapter_id.
    assert requested_adapters("/", {"inputs": "x"}, {"lora": "art"}) == ["art"]
    assert requested_adapters("/", {"inputs": "x", "parameters": {"adapter_id": "mine"}}, {"lora": "theirs"}) == [
        "mine", "theirs"]
    assert requested_adapters("/models/sd15", {"inputs": "x"}, {"lora": "art"}) == ["art", "sd15"]
    assert requested_adapters("/models/art@2", {"inputs": "x"}, {}) == ["art@2"]
    assert requested_adapters("/generate", {"inputs": "x"}, {"lora": "ignored-there"}) == []


def _pod(annotations=None, ip="10.1.2.3", ready=True, deleting=False):
    return SimpleNamespace(
        metadata=SimpleNamespace(name="p", annotations=annotations, deletionTimestamp="x" if deleting else None),
        status=SimpleNamespace(podIP=ip, conditions=[SimpleNamespace(type="Ready", status="True" if ready else "False")]))


def test_pod_address_prefers_the_local_stacks_port_else_the_pod_ip():
    assert pod_address(_pod()) == "http://10.1.2.3:8000"
    assert pod_address(_pod({"lorafleet.io/local-ports": '{"8000": 41234}'})) == "http://127.0.0.1:41234"
    assert pod_address(_pod({"lorafleet.io/local-ports": "not json"})) == "http://10.1.2.3:8000"
    assert pod_ready(_pod()) and not pod_ready(_pod(ready=False)) and not pod_ready(_pod(deleting=True))


def test_of_two_adapters_claiming_one_served_name_the_older_keeps_it():
    from lorafleet.contracts.resources import LoRAAdapter
    from lorafleet.gateway.tenants import adapter_owners

    def adapter(name, tenant, created, served="bot", pool="p"):
        return LoRAAdapter.model_validate({"metadata": {"name": name, "creationTimestamp": created}, "spec": {
            "pool": pool, "tenant": tenant, "servedName": served, "version": "1",
            "source": {"uri": "s3://a/b/", "sha256": "0" * 64}}})

    owners, problems = adapter_owners([adapter("thief", "globex", "2026-01-02T00:00:00Z"),
                                       adapter("orig", "acme", "2026-01-01T00:00:00Z"),
                                       adapter("other-pool", "globex", "2025-01-01T00:00:00Z", "x", pool="q")], "p")
    assert owners == {"bot": "acme"}
    assert len(problems) == 1 and "thief" in problems[0] and "orig" in problems[0]


def test_the_command_refuses_to_start_without_a_pool(capsys, monkeypatch):
    from lorafleet.gateway.cli import main

    monkeypatch.delenv("POOL", raising=False)
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert main(["--namespace", "team-a"]) == 2
    assert "--pool" in capsys.readouterr().err


def test_with_n_gateway_replicas_each_enforces_a_share_so_the_pool_holds_the_tenants_limits():
    lim = TenantLimits(requests_per_second=10.0, burst=4, max_concurrency=5)
    assert lim.share(1) == lim and lim.share(0) == lim  # nobody visible: this replica alone
    assert lim.share(2) == TenantLimits(5.0, 2.0, 3)    # rate/N, burst/N, ceil(maxConcurrency/N)
    assert lim.share(3) == TenantLimits(10 / 3, 4 / 3, 2)
    # Never below one token or one request in flight, or the tenant could not be served at all.
    assert TenantLimits(1.0, 1, 1).share(8) == TenantLimits(0.125, 1.0, 1)
    assert TenantLimits().share(4) == TenantLimits(burst=1.0)  # unlimited stays unlimited

    # Two replicas: a burst of 4 lets 2 through here, then one token per 1/5 s (half of 10/s).
    a = Admission()
    assert [a.admit("acme", TenantLimits(10.0, 4), now=0.0, replicas=2) for _ in range(3)][:2] == [None, None]
    code, message, retry = a.admit("acme", TenantLimits(10.0, 4), now=0.0, replicas=2)
    assert code == "rate_limit_exceeded" and "5/s" in message and "2 replicas" in message and retry == 1
    slow = TenantLimits(0.1, 4)
    assert [a.admit("globex", slow, now=0.0, replicas=2) is None for _ in range(3)] == [True, True, False]
    assert a.admit("globex", slow, now=0.0, replicas=2)[2] == 20  # 1 / (0.1/2) seconds to the next token
    # The peer went away: the same bucket refills at the whole rate, without a fresh burst.
    assert a.admit("globex", slow, now=0.0, replicas=1)[2] == 10
    assert a.admit("globex", slow, now=10.0, replicas=1) is None
    assert a.admit("globex", slow, now=10.0, replicas=1) is not None

    # maxConcurrency 3 over two replicas: 2 in flight here.
    c = Admission()
    assert c.admit("umbrella", TenantLimits(max_concurrency=3), replicas=2) is None
    assert c.admit("umbrella", TenantLimits(max_concurrency=3), replicas=2) is None
    code, message, _ = c.admit("umbrella", TenantLimits(max_concurrency=3), replicas=2)
    assert code == "concurrency_limit_exceeded" and "maxConcurrency 3 across 2 gateway replicas" in message
    assert c.admit("umbrella", TenantLimits(max_concurrency=3), replicas=1) is None  # back to 3


def test_a_pod_that_refused_a_tenant_is_tried_last_until_its_retry_after():
    from lorafleet.gateway.server import REFUSAL_MEMORY_S, Refusals

    reps = fleet(3)
    memo = Refusals()
    memo.refused("pod-0", "acme", "2", now=100.0)
    assert [r.name for r in memo.order(reps, "acme", 101.0)] == ["pod-1", "pod-2", "pod-0"]
    assert [r.name for r in memo.order(reps, "globex", 101.0)] == ["pod-0", "pod-1", "pod-2"]  # per tenant
    assert [r.name for r in memo.order(reps, "acme", 102.0)] == ["pod-0", "pod-1", "pod-2"]  # Retry-After passed
    memo.refused("pod-1", "acme", "3600", now=200.0)  # capped: a pod's long Retry-After is not a ban
    assert memo.refusing("pod-1", "acme", 200.0 + REFUSAL_MEMORY_S - 0.1)
    assert not memo.refusing("pod-1", "acme", 200.0 + REFUSAL_MEMORY_S)
    memo.refused("pod-2", "acme", "soon", now=300.0)  # unreadable: one second
    assert memo.refusing("pod-2", "acme", 300.5) and not memo.refusing("pod-2", "acme", 301.0)


def test_with_placement_only_replicas_holding_the_adapter_are_chosen_even_when_busy():
    # "a" is placed on pod-1 and pod-3; the others do not hold it and would answer 503 adapter_elsewhere.
    reps = fleet(a=[None, "host", None, "registered"], b=["device", None, None, None])
    router = AffinityRouter(2)
    c = router.choose("a", reps)
    assert [r.name for r in c.order[:2]] == ["pod-1", "pod-3"] and c.reason == "host"
    assert {r.name for r in c.order[2:]} == {"pod-0", "pod-2"}  # retries only, after every holder
    reps[1].inflight = reps[3].inflight = 5  # both holders busy: still one of them, never a non-holder
    assert {r.name for r in router.choose("a", reps).order[:2]} == {"pod-1", "pod-3"}
    # A holder that stopped answering is passed over while another holder is healthy.
    reps[1].healthy = False
    assert [r.name for r in router.choose("a", reps).order][0] == "pod-3"
    # Held nowhere yet (a new adapter before the next poll): every live replica, by the hash.
    assert len(router.choose("c", reps).order) == 3

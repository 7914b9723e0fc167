"""Prometheus metrics of one gateway, by tenant and by replica (its own registry: tests run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class GatewayMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lorafleet_gateway_requests", "Requests answered, by tenant, replica and HTTP status",
                                ["tenant", "replica", "status"], registry=r)
        self.latency = Histogram("lorafleet_gateway_request_seconds", "Time to the end of the response, by tenant",
                                 ["tenant"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rejected = Counter("lorafleet_gateway_rejected",
                                "Requests refused before any replica, by tenant and reason "
                                "(missing_api_key, invalid_api_key, adapter_forbidden, rate_limit_exceeded, ...)",
                                ["tenant", "reason"], registry=r)
        self.routed = Counter("lorafleet_gateway_routed", "Routing decisions, by replica and reason "
                              "(device, host, hash, spill, round-robin)", ["replica", "reason"], registry=r)
        self.pool_choice = Counter("lorafleet_gateway_pool_choice",
                                   "Requests by the pool first chosen for them: role merged (a pool that merges the "
                                   "adapter, while it has Ready replicas) or shared", ["tenant", "pool", "role"],
                                   registry=r)
        self.retries = Counter("lorafleet_gateway_retries", "Requests sent again to another replica after this one "
                               "failed before answering", ["replica"], registry=r)
        self.overloaded = Counter("lorafleet_gateway_overloaded", "429 answers of a replica (its queue or the "
                                  "tenant's share there full); the request spills to another replica with room, "
                                  "else the 429 goes to the client", ["replica"], registry=r)
        self.inflight = Gauge("lorafleet_gateway_inflight", "Requests open on a replica", ["replica"], registry=r)
        self.replicas = Gauge("lorafleet_gateway_replicas", "Replicas by health", ["healthy"], registry=r)
        self.gateways = Gauge("lorafleet_gateway_ready_gateways",
                              "Ready gateway replicas of the pool (pods labelled lorafleet.io/gateway-for=<pool>, "
                              "at least 1); this replica enforces 1/N of each tenant's rate, burst and concurrency",
                              registry=r)
        self.gateways.set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Who may call what (pure): API keys -> tenant, adapters -> tenant, and each tenant's token bucket and
concurrency cap. The kube poller builds a new ``Directory`` on every change; requests read the current one."""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

from lorafleet.contracts.names import split_versioned


def key_digest(key: str) -> str:
    # Keys are kept only as digests, so a heap dump or a log of the directory does not leak them.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    requests_per_second: float | None = None
    burst: float = 1
    max_concurrency: int | None = None

    def share(self, replicas: int) -> TenantLimits:
        """What one of ``replicas`` gateway replicas enforces so that the pool as a whole holds the
        tenant's limits, when the load balancer in front spreads requests evenly: rate/N, burst/N (at
        least one token, or no request would ever pass) and ceil(maxConcurrency/N) (at least one)."""
        n = max(1, replicas)
        if n == 1:
            return self
        return TenantLimits(
            None if self.requests_per_second is None else self.requests_per_second / n,
            max(1.0, self.burst / n),
            None if self.max_concurrency is None else math.ceil(self.max_concurrency / n))


@dataclass
class Directory:
    keys: dict[str, str] = field(default_factory=dict)          # key digest -> tenant
    adapters: dict[str, str] = field(default_factory=dict)      # served name -> tenant
    limits: dict[str, TenantLimits] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)           # tenants whose keys could not be read, why
    # served name -> (merged pool, version): a BaseModelPool merges the adapter (the operator names it in
    # the LoRAAdapter's status.pools); its requests go there while that pool has Ready replicas.
    merged: dict[str, tuple[str, str]] = field(default_factory=dict)

    def merged_target(self, model: str) -> tuple[str, str] | None:
        """(pool, version) of the merged pool for ``model`` (``name``, or ``name@`` that version)."""
        name, version = split_versioned(model)
        found = self.merged.get(name)
        return found if found is not None and version in (None, found[1]) else None

    def tenant_of_key(self, key: str | None) -> str | None:
        if not key:
            return None
        # Looked up by digest: the timing of a dict lookup says nothing about the key itself.
        return self.keys.get(key_digest(key))

    def owner(self, model: str) -> str | None:
        """The tenant owning ``model`` (``name`` or ``name@version``); None when no adapter has that name."""
        name, _ = split_versioned(model)
        return self.adapters.get(name)

    def adapters_of(self, tenant: str) -> set[str]:
        return {a for a, t in self.adapters.items() if t == tenant}


def merged_pools(adapters: list, pool: str) -> dict[str, tuple[str, str]]:
    """Served name -> (merged pool, version) for this pool's adapters that a merged pool serves."""
    out = {}
    for a in adapters:
        if a.spec.pool != pool or a.status is None:
            continue
        for p in a.status.pools or []:
            if p.role == "merged" and p.version:
                out[a.served_name] = (p.pool, p.version)
    return out


def adapter_owners(adapters: list, pool: str) -> tuple[dict[str, str], list[str]]:
    """Served name -> tenant for the pool's ``LoRAAdapter``s, with the operator's rule for two adapters
    claiming one servedName: the older keeps it (so a tenant cannot take over another's name by
    creating a colliding adapter); the problems name the loser."""
    owners: dict[str, str] = {}
    holders: dict[str, str] = {}
    problems = []
    mine = [a for a in adapters if a.spec.pool == pool and not a.spec.problems()]
    for a in sorted(mine, key=lambda a: (str(a.metadata.get("creationTimestamp") or ""), a.metadata.get("name", ""))):
        name = a.served_name
        if name in owners:
            problems.append(f"LoRAAdapter {a.metadata.get('name')}: spec.servedName {name!r} is already served by "
                            f"LoRAAdapter {holders[name]!r}; the gateway routes it to tenant {owners[name]}")
            continue
        owners[name], holders[name] = a.spec.tenant, a.metadata.get("name", "")
    return owners, problems


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float | None = None):
        self.rate, self.burst = rate, max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic() if now is None else now

    def retune(self, rate: float, burst: float, now: float | None = None) -> None:
        """New rate and size (the tenant's limits or the number of gateway replicas changed): tokens
        earned so far are kept, up to the new size, so a change never hands out a fresh full burst."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.rate, self.burst = rate, max(1, burst)
        self.tokens = min(self.tokens, self.burst)

    def take(self, now: float | None = None) -> float:
        """0 when a request may pass (a token is spent), else seconds until the next token."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Admission:
    """Per-tenant rate and concurrency. ``admit`` returns None (go, call ``release`` when done) or
    ``(code, message, retry_after_s)``. ``replicas``: the pool's Ready gateway replicas; each enforces
    its ``TenantLimits.share`` so that together they hold the tenant's limits."""

    def __init__(self):
        self.buckets: dict[str, tuple[TenantLimits, TokenBucket]] = {}
        self.inflight: dict[str, int] = {}

    def admit(self, tenant: str, limits: TenantLimits, now: float | None = None, replicas: int = 1):
        mine = limits.share(replicas)
        if mine.max_concurrency is not None and self.inflight.get(tenant, 0) >= mine.max_concurrency:
            where = (f" through this gateway replica (its share of LoRATenant spec.maxConcurrency "
                     f"{limits.max_concurrency} across {replicas} gateway replicas)" if replicas > 1 else
                     " (LoRATenant spec.maxConcurrency)")
            return ("concurrency_limit_exceeded", f"tenant {tenant} already has {mine.max_concurrency} requests "
                    f"in flight{where}; retry when one finishes", 1)
        if mine.requests_per_second is not None:
            held = self.buckets.get(tenant)
            if held is None:
                held = (mine, TokenBucket(mine.requests_per_second, mine.burst, now))
                self.buckets[tenant] = held
            elif held[0] != mine:  # edited limits or another number of gateway replicas
                held[1].retune(mine.requests_per_second, mine.burst, now)
                held = self.buckets[tenant] = (mine, held[1])
            wait = held[1].take(now)
            if wait > 0:
                return ("rate_limit_exceeded",
                        f"tenant {tenant} is over its rate limit of {limits.requests_per_second:g} requests/s "
                        f"(burst {limits.burst:g}; LoRATenant spec.rateLimit)"
                        + (f"; this gateway replica admits {mine.requests_per_second:g}/s (burst {mine.burst:g}), "
                           f"its share across {replicas} replicas" if replicas > 1 else ""),
                        max(1, math.ceil(wait)))
        self.inflight[tenant] = self.inflight.get(tenant, 0) + 1
        return None

    def release(self, tenant: str) -> None:
        n = self.inflight.get(tenant, 0) - 1
        if n <= 0:
            self.inflight.pop(tenant, None)
        else:
            self.inflight[tenant] = n

"""Leader election on a ``coordination.k8s.io`` Lease, as client-go's ``leaderelection`` does it: of
several operator replicas only the holder of the Lease runs the operator; the others wait to take
it over once its holder stops renewing.

Safety rests on two durations measured on each replica's own monotonic clock (never on wall clocks,
which need not agree): a candidate takes the Lease only ``duration`` seconds after it last *saw* the
Lease change, and a leader that could not renew within ``renew_deadline`` (< ``duration``) seconds of
sending its last successful renewal stops acting at once. Writes to the Lease carry its
resourceVersion, so of two replicas racing for it exactly one wins.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease

from lorafleet.contracts import names

try:
    from httpx2 import TransportError
except ImportError:  # pragma: no cover - whichever httpx lightkube was built on
    from httpx import TransportError

log = logging.getLogger("lorafleet.operator.leader")

LEASE_NAME = "lorafleet-operator"
LEASE_DURATION_S = 10.0
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class LeadershipLost(Exception):
    """The Lease could not be renewed before the renew deadline: whoever held it must stop acting."""


def default_identity(pod_name: str | None = None) -> str:
    """The pod's name (or the host's) plus a random part: a restarted container is a new candidate,
    never mistaken for the holder its predecessor was."""
    return f"{pod_name or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def in_cluster_namespace() -> str | None:
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class LeaderElector:
    client: AsyncClient
    namespace: str
    name: str = LEASE_NAME
    identity: str = field(default_factory=default_identity)
    duration: float = LEASE_DURATION_S
    # What client-go calls renewDeadline and retryPeriod; by default 2/3 and 1/5 of the duration.
    renew_deadline: float = 0.0
    retry_period: float = 0.0
    _observed: tuple | None = None  # the Lease record as last seen
    _observed_at: float = 0.0  # monotonic time it was first seen so
    _renewed_at: float = 0.0  # monotonic time our last successful write was sent

    def __post_init__(self) -> None:
        if self.duration < 3:
            raise ValueError(f"lease duration {self.duration} s is too short: at least 3 s")
        self.renew_deadline = self.renew_deadline or self.duration * 2 / 3
        self.retry_period = self.retry_period or self.duration / 5
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(f"lease timing must satisfy 0 < retry period ({self.retry_period} s) < renew deadline "
                             f"({self.renew_deadline} s) < lease duration ({self.duration} s)")

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    async def acquire(self) -> None:
        """Return once this replica holds the Lease."""
        loop = asyncio.get_running_loop()
        waiting_on: str | None = None
        while True:
            sent = loop.time()
            holder = await self._attempt(sent)
            if holder == self.identity:
                self._renewed_at = sent
                log.info("%s acquired by %s: leading", self.where, self.identity)
                return
            if holder != waiting_on:
                log.info("%s held by %s; %s waits to take over", self.where, holder or "nobody", self.identity)
                waiting_on = holder
            await asyncio.sleep(self.retry_period)

    async def hold(self) -> None:
        """Renew the Lease every retry period; raise :class:`LeadershipLost` when a renewal could not
        be made within the renew deadline of the last one that was."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.retry_period)
            while True:
                sent = loop.time()
                left = self._renewed_at + self.renew_deadline - sent
                if left <= 0:
                    raise LeadershipLost(f"{self.where}: not renewed for {sent - self._renewed_at:.1f} s "
                                         f"(renew deadline {self.renew_deadline:.1f} s)")
                try:
                    holder = await asyncio.wait_for(self._attempt(sent), left)
                except asyncio.TimeoutError:
                    continue
                if holder == self.identity:
                    self._renewed_at = sent
                    break
                if holder is not None:
                    raise LeadershipLost(f"{self.where} is held by {holder} now")
                await asyncio.sleep(min(self.retry_period / 2, max(0.0, left - 0.1)))

    async def release(self) -> None:
        """Give the Lease up on a clean shutdown, so another replica takes it at once (not after the
        lease duration)."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
            if lease.spec is None or lease.spec.holderIdentity != self.identity:
                return
            now = _now()
            lease.spec = LeaseSpec(holderIdentity=None, leaseDurationSeconds=1, acquireTime=now, renewTime=now,
                                   leaseTransitions=lease.spec.leaseTransitions)
            await self.client.replace(lease)
            log.info("%s released by %s", self.where, self.identity)
        except (ApiError, TransportError) as e:
            log.warning("%s: could not release it (%s); the next leader takes it after %.0f s", self.where, e,
                        self.duration)

    async def _attempt(self, sent: float) -> str | None:
        """One try to take or renew the Lease. Returns its holder afterwards (ours when we hold it),
        None when the API server did not answer or a concurrent write won (try again)."""
        try:
            lease = await self.client.get(Lease, self.name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code != 404:
                log.warning("%s: cannot read it: %s", self.where, e.status.message)
                return None
            now = _now()
            try:
                await self.client.create(Lease(
                    metadata=ObjectMeta(name=self.name, namespace=self.namespace,
                                        labels={names.LABEL_MANAGED_BY: "lorafleet"}),
                    spec=LeaseSpec(holderIdentity=self.identity, leaseDurationSeconds=round(self.duration),
                                   acquireTime=now, renewTime=now, leaseTransitions=0)))
            except ApiError as e:
                if e.status.code != 409:
                    log.warning("%s: cannot create it: %s", self.where, e.status.message)
                return None
            return self.identity
        except TransportError as e:
            log.warning("%s: the API server did not answer (%s: %s)", self.where, type(e).__name__, e)
            return None
        spec = lease.spec or LeaseSpec()
        record = (spec.holderIdentity, spec.renewTime, spec.acquireTime, spec.leaseDurationSeconds,
                  spec.leaseTransitions)
        if record != self._observed:
            self._observed, self._observed_at = record, sent
        holder = spec.holderIdentity or None
        if holder is not None and holder != self.identity:
            # Expired only when it has not changed for its whole duration, as seen from here.
            if sent < self._observed_at + (spec.leaseDurationSeconds or self.duration):
                return holder
        now = _now()
        ours = holder == self.identity
        lease.spec = LeaseSpec(
            holderIdentity=self.identity, leaseDurationSeconds=round(self.duration),
            acquireTime=spec.acquireTime if ours and spec.acquireTime else now, renewTime=now,
            leaseTransitions=(spec.leaseTransitions or 0) + (0 if ours else 1))
        try:
            await self.client.replace(lease)  # carries the resourceVersion we read: optimistic
        except ApiError as e:
            if e.status.code != 409:
                log.warning("%s: cannot update it: %s", self.where, e.status.message)
            return None
        except TransportError as e:
            log.warning("%s: the API server did not answer (%s: %s)", self.where, type(e).__name__, e)
            return None
        if not ours:
            log.info("%s taken over from %s after %.1f s without renewal", self.where, holder or "nobody",
                     sent - self._observed_at)
        return self.identity

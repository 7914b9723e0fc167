"""The only module that reads the Kubernetes API: the pool's ready pods (where each listens) and the
tenant directory (LoRATenants with their API keys' digests, the pool's LoRAAdapters), each kind
listed once and then watched (``contracts.kubeio.Informer``), so a new or removed key takes effect
within one watch event, without a restart, an idle cluster costs no LIST, and while the API server is
unreachable the gateway keeps serving the last view. The gateway reads no Secrets: a LoRATenant holds
only the sha256 of each key (docs/gateway.md, "API keys")."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from lightkube import Client
from lightkube.operators import exists
from lightkube.resources.core_v1 import Pod

from lorafleet.contracts import names
from lorafleet.contracts.kubeio import Informer, LoRAAdapterResource, LoRATenantResource, pod_ready
from lorafleet.contracts.kubeio import warm_decoders as _warm
from lorafleet.contracts.resources import LoRAAdapter, LoRATenant
from lorafleet.contracts.tenancy import accepted_keys

from .tenants import Directory, TenantLimits, adapter_owners, merged_pools

log = logging.getLogger("lorafleet.gateway")

LOCAL_PORTS_ANNOTATION = "lorafleet.io/local-ports"  # the local stack's pod runner: {"8000": <local port>}
__all__ = ["KubeView", "LoRAAdapterResource", "LoRATenantResource", "pod_address", "pod_ready", "warm_decoders"]


def warm_decoders() -> None:
    """The decoders of every kind the gateway reads, built in this thread (``kubeio.warm_decoders``)."""
    _warm((Pod, LoRAAdapterResource, LoRATenantResource))


def pod_address(pod, port: int = names.RUNTIME_PORT) -> str | None:
    """``http://podIP:8000``, or the local stack's loopback port when the pod is a local process."""
    local = (pod.metadata.annotations or {}).get(LOCAL_PORTS_ANNOTATION)
    if local:
        try:
            return f"http://127.0.0.1:{int(json.loads(local)[str(port)])}"
        except (ValueError, KeyError, TypeError):
            log.warning("pod %s: annotation %s=%r has no port for %d", pod.metadata.name,
                        LOCAL_PORTS_ANNOTATION, local, port)
    ip = pod.status.podIP if pod.status else None
    return f"http://{ip}:{port}" if ip else None


class KubeView:
    """Four informers in the pool's namespace: pool pods (``lorafleet.io/pool``, any pool: merged pools
    of this pool's adapters included), this pool's gateway pods, LoRAAdapters and LoRATenants. Reads
    are of their stores (no API call); ``subscribe`` tells of every change. ``new_client`` makes one
    client per informer (each holds a watch open)."""

    def __init__(self, new_client: Callable[[], Client], namespace: str, pool: str, server_timeout: int = 60):
        self.namespace, self.pool = namespace, pool
        where = f"in namespace {namespace}"

        def informer(res, what: str, labels: dict | None = None) -> Informer:
            return Informer(new_client, res, namespace, labels=labels, server_timeout=server_timeout,
                            what=f"{what} {where}")

        self.pods = informer(Pod, "pool pods", {names.LABEL_POOL: exists()})
        self.gateway_pods = informer(Pod, f"gateway pods of pool {pool}", {names.LABEL_GATEWAY_FOR: pool})
        self.adapters = informer(LoRAAdapterResource, "LoRAAdapters")
        self.tenants = informer(LoRATenantResource, "LoRATenants")
        self.informers = (self.pods, self.gateway_pods, self.adapters, self.tenants)
        # Parsed LoRAAdapters by (uid, resourceVersion): an event re-validates only what it changed.
        self._parsed: dict[tuple[str, str], LoRAAdapter | str] = {}
        self._directory: tuple[tuple[int, int], Directory] | None = None

    def start(self) -> KubeView:
        warm_decoders()
        for inf in self.informers:
            inf.start()
        return self

    def stop(self) -> None:
        for inf in self.informers:
            inf.stop()

    def wait_synced(self, timeout: float = 30) -> KubeView:
        for inf in self.informers:
            inf.wait_synced(timeout)
        return self

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """``listener(what)`` after every change: ``pods``, ``gateways`` or ``directory`` (from an
        informer's thread)."""
        self.pods.subscribe(lambda: listener("pods"))
        self.gateway_pods.subscribe(lambda: listener("gateways"))
        self.adapters.subscribe(lambda: listener("directory"))
        self.tenants.subscribe(lambda: listener("directory"))

    def lists(self) -> int:
        """LIST requests the view has made (one per informer, then one per expired watch)."""
        return sum(inf.lists for inf in self.informers)

    def ready_pods(self, pool: str | None = None) -> dict[str, str]:
        """Pod name -> address of the pool's Ready pods (of ``pool``: a merged pool of its adapters)."""
        want = pool or self.pool
        out = {}
        for pod in self.pods.objects():
            if (pod.metadata.labels or {}).get(names.LABEL_POOL) != want:
                continue
            addr = pod_address(pod)
            if pod_ready(pod) and addr:
                out[pod.metadata.name] = addr
        return out

    def ready_gateways(self) -> int:
        """Ready gateway pods of the pool (``lorafleet.io/gateway-for=<pool>``), this one included when
        it runs in one: tenant limits are divided by it. 0 when none is visible (run by hand)."""
        return sum(1 for pod in self.gateway_pods.objects() if pod_ready(pod))

    def _adapter(self, obj) -> LoRAAdapter | str:
        key = (obj.metadata.uid or obj.metadata.name, obj.metadata.resourceVersion or "")
        found = self._parsed.get(key)
        if found is None:
            try:
                found = LoRAAdapter.model_validate(obj.to_dict())
            except ValueError as e:
                found = str(e)
            self._parsed[key] = found
        return found

    def directory(self) -> Directory:
        """The tenant directory; built again only after the adapters or tenants changed."""
        stamp = (self.adapters.version, self.tenants.version)
        if self._directory is not None and self._directory[0] == stamp:
            return self._directory[1]
        adapter_objs, tenant_objs = self.adapters.objects(), self.tenants.objects()
        d = Directory()
        adapters = []
        seen = set()
        for obj in sorted(adapter_objs, key=lambda o: o.metadata.name):
            a = self._adapter(obj)
            seen.add((obj.metadata.uid or obj.metadata.name, obj.metadata.resourceVersion or ""))
            if isinstance(a, str):
                log.warning("LoRAAdapter %s/%s skipped: %s", self.namespace, obj.metadata.name, a)
            else:
                adapters.append(a)
        for key in set(self._parsed) - seen:
            del self._parsed[key]
        d.adapters, d.problems = adapter_owners(adapters, self.pool)
        d.merged = {n: t for n, t in merged_pools(adapters, self.pool).items() if n in d.adapters}
        keys: dict[str, list[tuple[str, str]]] = {}
        for obj in sorted(tenant_objs, key=lambda o: o.metadata.name):
            name = obj.metadata.name
            try:
                t = LoRATenant.model_validate(obj.to_dict())
            except ValueError as e:
                d.problems.append(f"LoRATenant {self.namespace}/{name}: {e}")
                continue
            rl = t.spec.rate_limit
            d.limits[name] = TenantLimits(rl.requests_per_second if rl else None, rl.burst if rl else 1,
                                          t.spec.max_concurrency)
            keys[name] = [(k.name, k.sha256) for k in t.spec.api_keys]
        # The operator writes each tenant's status.keys by the same rule (contracts/tenancy.py).
        d.keys, problems = accepted_keys(keys)
        d.problems += [f"LoRATenant {self.namespace}/{name}: {p}" for name, found in problems.items() for p in found]
        self._directory = (stamp, d)
        return d

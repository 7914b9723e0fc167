"""The only module that reads the Kubernetes API: the pool's ready pods (where each listens) and the
tenant directory (LoRATenants with their API keys' digests, the pool's LoRAAdapters), polled so a new
or removed key takes effect within a poll interval, without a restart. The gateway reads no Secrets:
a LoRATenant holds only the sha256 of each key (docs/gateway.md, "API keys")."""

from __future__ import annotations

import json
import logging

from lightkube import Client
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from lorafleet.contracts import names
from lorafleet.contracts.resources import LoRAAdapter, LoRATenant
from lorafleet.contracts.tenancy import accepted_keys

from .tenants import Directory, TenantLimits, adapter_owners, merged_pools

log = logging.getLogger("lorafleet.gateway")

LOCAL_PORTS_ANNOTATION = "lorafleet.io/local-ports"  # the local stack's pod runner: {"8000": <local port>}

LoRAAdapterResource = create_namespaced_resource(names.GROUP, names.VERSION, names.ADAPTER_KIND,
                                                 names.ADAPTER_PLURAL)
LoRATenantResource = create_namespaced_resource(names.GROUP, names.VERSION, names.TENANT_KIND,
                                                names.TENANT_PLURAL)


def warm_decoders() -> None:
    """lightkube 1.0 builds msgspec decoders lazily; two threads building the same one at once crashed
    the process (docs/architecture.md, hazards). Build them once, here, before any other thread runs."""
    from lightkube.core.decoders import decode_list

    for res in (Pod, LoRAAdapterResource, LoRATenantResource):
        decode_list(b'{"items": []}', res)


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


def pod_ready(pod) -> bool:
    if pod.metadata.deletionTimestamp or not pod.status:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


class KubeView:
    def __init__(self, client: Client, namespace: str, pool: str):
        self.client, self.namespace, self.pool = client, namespace, pool

    def ready_pods(self, pool: str | None = None) -> dict[str, str]:
        """Pod name -> address of the pool's Ready pods (of ``pool``: a merged pool of its adapters)."""
        out = {}
        for pod in self.client.list(Pod, namespace=self.namespace, labels={names.LABEL_POOL: pool or self.pool}):
            addr = pod_address(pod)
            if pod_ready(pod) and addr:
                out[pod.metadata.name] = addr
        return out

    def ready_gateways(self) -> int:
        """Ready gateway pods of the pool (``lorafleet.io/gateway-for=<pool>``), this one included when
        it runs in one: tenant limits are divided by it. 0 when none is visible (run by hand)."""
        pods = self.client.list(Pod, namespace=self.namespace, labels={names.LABEL_GATEWAY_FOR: self.pool})
        return sum(1 for pod in pods if pod_ready(pod))

    def directory(self) -> Directory:
        d = Directory()
        adapters = []
        for obj in self.client.list(LoRAAdapterResource, namespace=self.namespace):
            try:
                adapters.append(LoRAAdapter.model_validate(obj.to_dict()))
            except ValueError as e:
                log.warning("LoRAAdapter %s/%s skipped: %s", self.namespace, obj.metadata.name, e)
        d.adapters, d.problems = adapter_owners(adapters, self.pool)
        d.merged = {n: t for n, t in merged_pools(adapters, self.pool).items() if n in d.adapters}
        keys: dict[str, list[tuple[str, str]]] = {}
        for obj in self.client.list(LoRATenantResource, namespace=self.namespace):
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
        return d

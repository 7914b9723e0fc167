"""Pure builders: a BaseModelPool's spec -> the manifests of everything the pool owns (no API calls).

Every function returns plain dicts as server-side apply takes them. Nothing here depends on the
pool's adapters, so changing adapters never changes the pod template (no restarts), except a merged
pool's one adapter (``MergedRef``): its version is the pod template's, and a new one rolls the pods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorafleet.contracts import names
from lorafleet.contracts.engines import auto_engine
from lorafleet.contracts.names import RuntimeEnv, SidecarEnv
from lorafleet.contracts.quantity import parse_quantity
from lorafleet.contracts.resources import BaseModelPoolSpec, Engine, ResourceRequirements

if TYPE_CHECKING:
    from .routing import MergedRef

Manifest = dict[str, Any]


def owner_reference(pool: str, uid: str) -> dict[str, Any]:
    """The pool as controller of what it owns: the garbage collector deletes it all with the pool."""
    return {"apiVersion": names.API_VERSION, "kind": names.POOL_KIND, "name": pool, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def _meta(name: str, namespace: str, pool: str, uid: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": names.pool_labels(pool, component),
            "ownerReferences": [owner_reference(pool, uid)]}


def _env(pairs: dict[str, object]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in pairs.items() if v is not None]


def _resources(r: ResourceRequirements | None) -> dict[str, Any]:
    return r.wire() if r is not None else {}


@dataclass(frozen=True)
class RuntimeImages:
    """The operator's runtime images (``--runtime-image``, ``--runtime-vllm-image``), for pools whose spec
    names none."""

    torch: str = names.DEFAULT_RUNTIME_IMAGE
    vllm: str = names.DEFAULT_RUNTIME_VLLM_IMAGE


def asks_for_gpu(r: ResourceRequirements | None) -> bool:
    """Whether the runtime container requests or is limited to at least one GPU (``nvidia.com/gpu``)."""
    if r is None:
        return False
    return any(parse_quantity(q.get(names.GPU_RESOURCE, 0)) > 0 for q in (r.limits or {}, r.requests or {}))


def pool_engine(spec: BaseModelPoolSpec) -> str:
    """``torch`` or ``vllm``: what the pool's runtime will run, as far as the spec says (``auto``: the runtime's
    own rule, with a GPU where the pool asks for one and vLLM where its image has it)."""
    if spec.runtime.engine != Engine.auto:
        return spec.runtime.engine.value
    return auto_engine(spec.model.task.value, spec.model.quantization.value, spec.model.merged_adapter is not None,
                       gpu=asks_for_gpu(spec.runtime.resources), vllm=True)


def runtime_image(spec: BaseModelPoolSpec, images: RuntimeImages) -> str:
    """The pool's own ``spec.runtime.image``, else the operator's image for the pool's engine."""
    if spec.runtime.image:
        return spec.runtime.image
    return images.vllm if pool_engine(spec) == "vllm" else images.torch


def runtime_env(pool: str, spec: BaseModelPoolSpec, merged: "MergedRef | None" = None) -> list[dict[str, Any]]:
    return _env({
        RuntimeEnv.MODEL_DIR: f"{names.CACHE_MOUNT}/models/{spec.model.sha256}",
        RuntimeEnv.CACHE_DIR: names.CACHE_MOUNT,
        RuntimeEnv.TASK: spec.model.task.value,
        RuntimeEnv.DTYPE: spec.model.dtype.value,
        RuntimeEnv.QUANTIZATION: spec.model.quantization.value,
        RuntimeEnv.ENGINE: spec.runtime.engine.value,
        RuntimeEnv.PORT: names.RUNTIME_PORT,
        RuntimeEnv.ADMIN_PORT: names.ADMIN_PORT,
        RuntimeEnv.METRICS_PORT: names.RUNTIME_METRICS_PORT,
        RuntimeEnv.MAX_BATCH_SIZE: spec.runtime.max_batch_size,
        RuntimeEnv.MAX_BATCH_DELAY_MS: spec.runtime.max_batch_delay_ms,
        RuntimeEnv.MAX_QUEUE: spec.runtime.max_queue,
        RuntimeEnv.MAX_QUEUE_DELAY_MS: spec.runtime.max_queue_delay_ms,
        RuntimeEnv.PER_TENANT_MAX_INFLIGHT: spec.runtime.per_tenant_max_inflight,
        RuntimeEnv.DEVICE_SLOTS: spec.cache.device_slots,
        RuntimeEnv.HOST_ADAPTERS: spec.cache.host_adapters,
        RuntimeEnv.MAX_RANK: spec.cache.max_rank,
        RuntimeEnv.MAX_MODEL_LEN: spec.runtime.max_model_len,
        RuntimeEnv.SERVED_MODEL_NAME: pool,
        # A merged pool: what its runtime merges and answers as. In the pod template, so a new version
        # of the adapter is a Deployment rollout.
        RuntimeEnv.MERGED_ADAPTER_DIR: f"{names.CACHE_MOUNT}/adapters/{merged.sha256}" if merged else None,
        RuntimeEnv.MERGED_ADAPTER_NAME: merged.served_name if merged else None,
        RuntimeEnv.MERGED_ADAPTER_VERSION: merged.version if merged else None,
        RuntimeEnv.MERGED_ADAPTER_TENANT: merged.tenant if merged else None,
    })


def sidecar_env(pool: str, spec: BaseModelPoolSpec, merged: "MergedRef | None" = None) -> list[dict[str, Any]]:
    env = [
        {"name": SidecarEnv.POD_NAME, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": SidecarEnv.POD_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    env += _env({
        SidecarEnv.POOL: pool,
        SidecarEnv.CACHE_DIR: names.CACHE_MOUNT,
        SidecarEnv.RUNTIME_ADMIN_URL: f"http://127.0.0.1:{names.ADMIN_PORT}",
        SidecarEnv.MODEL_URI: spec.model.uri,
        SidecarEnv.MODEL_SHA256: spec.model.sha256,
        SidecarEnv.MERGED_ADAPTER_URI: merged.uri if merged else None,
        SidecarEnv.MERGED_ADAPTER_SHA256: merged.sha256 if merged else None,
        SidecarEnv.S3_ENDPOINT: spec.storage.endpoint,
        SidecarEnv.S3_REGION: spec.storage.region,
    })
    if spec.storage.secret_ref is not None:
        # The storage credentials reach this container only, never the runtime.
        for key in (SidecarEnv.ACCESS_KEY, SidecarEnv.SECRET_KEY):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.storage.secret_ref.name,
                                                                    "key": key}}})
    env += _env({
        SidecarEnv.MAX_RANK: spec.cache.max_rank,
        SidecarEnv.MAX_ADAPTER_BYTES: spec.cache.max_adapter_bytes_int,
        SidecarEnv.DISK_BYTES: spec.cache.disk_bytes_int,
        SidecarEnv.METRICS_PORT: names.SIDECAR_METRICS_PORT,
        SidecarEnv.HEALTH_PORT: names.SIDECAR_HEALTH_PORT,
        SidecarEnv.TASK: spec.model.task.value,
    })
    return env


# Pod Security "restricted" for every container the operator makes: no root, no privilege escalation,
# no capabilities, the runtime's default seccomp profile, a read-only root filesystem (the images'
# user, 10001, has its home in /tmp, an emptyDir of its own).
POD_SECURITY: dict[str, Any] = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY: dict[str, Any] = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                      "capabilities": {"drop": ["ALL"]}}
TMP_VOLUME = "tmp"
# Scratch space: Python, torch and the HF libraries write caches under $HOME (/tmp in the images).
TMP_SIZE = "1Gi"
# A deleted pool pod keeps answering this long before its runtime gets SIGTERM (the preStop sleep),
# while the endpoints, gateways and ingress controllers drop it; then the runtime finishes what is in
# flight (uvicorn's graceful shutdown, 5 s) within the grace period.
PRESTOP_SLEEP_S = 5
TERMINATION_GRACE_S = 30


def pod_annotations(spec: BaseModelPoolSpec) -> dict[str, str]:
    """The pool pods' annotations: the pool's own, then where Prometheus scrapes the runtime (its own
    port: /metrics is not on the public one), which the pool cannot override."""
    out = dict(spec.pod_annotations or {})
    out.update({"prometheus.io/scrape": "true", "prometheus.io/port": str(names.RUNTIME_METRICS_PORT),
                "prometheus.io/path": "/metrics"})
    return out


def placement(spec: BaseModelPoolSpec) -> dict[str, Any]:
    """What the pool says about where its pods run, as the pod spec takes it (unset fields left out)."""
    out: dict[str, Any] = {}
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        out["tolerations"] = [t.wire() for t in spec.tolerations]
    if spec.affinity:
        out["affinity"] = spec.affinity
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [r.wire() for r in spec.image_pull_secrets]
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out


def sidecar_liveness(spec: BaseModelPoolSpec) -> dict[str, Any]:
    """The sidecar's health endpoint: its sync loop ends passes and its routes watches run."""
    if spec.sidecar.liveness_probe is not None:
        return spec.sidecar.liveness_probe
    return {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 10, "failureThreshold": 3,
            "timeoutSeconds": 5}


def sidecar_readiness(spec: BaseModelPoolSpec) -> dict[str, Any]:
    """Ready once a pass worked through a complete routes table (and live). A native sidecar's readiness
    is part of the pod's; it stays ready while the routes are stale or the API server is away."""
    if spec.sidecar.readiness_probe is not None:
        return spec.sidecar.readiness_probe
    return {"httpGet": {"path": "/readyz", "port": "health"}, "periodSeconds": 5, "failureThreshold": 3,
            "timeoutSeconds": 5}


def deployment(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec,
               merged: "MergedRef | None" = None, images: RuntimeImages = RuntimeImages(),
               replicas: int | None = None) -> Manifest:
    """``replicas``: the Deployment's (None: ``spec.replicas``); the operator holds it above
    spec.replicas while a scale down drains the pods it removes (operator/routing.py, ``plan_drain``)."""
    labels = names.pool_labels(pool, "runtime")
    mount = [{"name": names.CACHE_VOLUME, "mountPath": names.CACHE_MOUNT},
             {"name": TMP_VOLUME, "mountPath": "/tmp"}]
    runtime = {
        "name": names.RUNTIME_CONTAINER,
        "image": runtime_image(spec, images),
        "command": ["lorafleet", "runtime"],
        "ports": [{"name": "http", "containerPort": names.RUNTIME_PORT, "protocol": "TCP"},
                  {"name": "runtime-metrics", "containerPort": names.RUNTIME_METRICS_PORT, "protocol": "TCP"}],
        "env": runtime_env(pool, spec, merged),
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5,
                           "failureThreshold": 3},
        # Loading a large base model can take minutes: liveness only starts once the pod was ready.
        "startupProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": 120},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        "resources": _resources(spec.runtime.resources),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mount,
        # A pod being deleted leaves the Service's endpoints, the gateway's view and the ingress
        # controllers' tables within moments, not at once: it keeps answering meanwhile, and the
        # runtime's SIGTERM (finish what is in flight, then exit) comes after.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_S}}},
    }
    sidecar = {
        "name": names.SIDECAR_CONTAINER,
        "image": spec.sidecar.image,
        "command": ["lorafleet", "sidecar"],
        # A native sidecar: starts before the runtime and lives as long as the pod.
        "restartPolicy": "Always",
        "ports": [{"name": "metrics", "containerPort": names.SIDECAR_METRICS_PORT, "protocol": "TCP"},
                  {"name": "health", "containerPort": names.SIDECAR_HEALTH_PORT, "protocol": "TCP"}],
        "env": sidecar_env(pool, spec, merged),
        "livenessProbe": sidecar_liveness(spec),
        "readinessProbe": sidecar_readiness(spec),
        "resources": _resources(spec.sidecar.resources),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": mount,
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(names.deployment_name(pool), namespace, pool, uid, "runtime"),
        "spec": {
            "replicas": spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": names.pod_selector(pool)},
            "template": {
                "metadata": {"labels": labels, "annotations": pod_annotations(spec)},
                "spec": {
                    "serviceAccountName": names.sidecar_service_account(pool),
                    "securityContext": POD_SECURITY,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                    **placement(spec),
                    "initContainers": [sidecar],
                    "containers": [runtime],
                    "volumes": [{"name": names.CACHE_VOLUME,
                                 "emptyDir": {"sizeLimit": str(spec.cache.disk_bytes)}},
                                {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": TMP_SIZE}}],
                },
            },
        },
    }


def pod_disruption_budget(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec) -> Manifest | None:
    """At most ``spec.disruption.maxUnavailable`` (default 1) pool pods evicted at once by a drain; none
    for a pool of fewer than 2 replicas unless asked (a budget of 0 unavailable would block drains)."""
    d = spec.disruption
    if d is not None and not d.enabled:
        return None
    if (d is None or d.max_unavailable is None) and spec.replicas < 2:
        return None
    max_unavailable = d.max_unavailable if d is not None and d.max_unavailable is not None else 1
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(names.deployment_name(pool), namespace, pool, uid, "runtime"),
            "spec": {"maxUnavailable": max_unavailable, "selector": {"matchLabels": names.pod_selector(pool)}}}


def service_account(pool: str, namespace: str, uid: str) -> Manifest:
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": _meta(names.sidecar_service_account(pool), namespace, pool, uid, "sidecar")}


def routes_reader_names(pool: str, shards: int) -> list[str]:
    """ConfigMap names the sidecar may read: today's shards and those of the next doubling, so a
    re-shard never races the Role update."""
    out = [names.routes_configmap_name(pool)]
    out += [names.routes_configmap_name(pool, i) for i in range(max(2, 2 * shards))]
    return out


# What each sidecar does with its own pod: read it and patch its ``lorafleet.io/sync`` annotation. RBAC
# cannot name a pod that does not exist yet; the chart's ValidatingAdmissionPolicy narrows it to the
# sidecar's own pod and that annotation (docs/operations.md, "Permissions").
SIDECAR_POD_RULE: dict[str, Any] = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}


def role(pool: str, namespace: str, uid: str, shards: int = 1, sidecar_cluster_role: str | None = None) -> Manifest:
    """The sidecar's Role: this pool's routes ConfigMaps, by name, and, without ``sidecar_cluster_role``,
    its pod. With it (the chart's), the pod rule comes from a RoleBinding to that ClusterRole instead, so
    the operator never holds ``patch`` on pods itself (RBAC lets it grant only what it holds, or what it
    may ``bind``)."""
    rules = [
        # Only this pool's routes, by name (a watch uses fieldSelector metadata.name=<shard>).
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"],
         "resourceNames": routes_reader_names(pool, shards)},
    ]
    if not sidecar_cluster_role:
        rules.append(SIDECAR_POD_RULE)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": _meta(names.sidecar_service_account(pool), namespace, pool, uid, "sidecar"),
        "rules": rules,
    }


def sidecar_pods_binding_name(pool: str) -> str:
    return f"{names.sidecar_service_account(pool)}-pods"


def role_binding(pool: str, namespace: str, uid: str, sidecar_cluster_role: str | None = None) -> list[Manifest]:
    """The sidecar's RoleBinding to its Role, and with ``sidecar_cluster_role`` a second one to it."""
    sa = names.sidecar_service_account(pool)
    subjects = [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]
    out = [{
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": _meta(sa, namespace, pool, uid, "sidecar"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
        "subjects": subjects,
    }]
    if sidecar_cluster_role:
        out.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _meta(sidecar_pods_binding_name(pool), namespace, pool, uid, "sidecar"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": sidecar_cluster_role},
            "subjects": subjects,
        })
    return out


def service(pool: str, namespace: str, uid: str) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(names.service_name(pool), namespace, pool, uid, "runtime"),
        "spec": {"type": "ClusterIP", "selector": names.pod_selector(pool),
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }


def gateway_enabled(spec: BaseModelPoolSpec) -> bool:
    return spec.gateway is not None and spec.gateway.enabled


def ingress(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec) -> Manifest | None:
    """The pool's Ingress; with the gateway on, it sends requests to the gateway (tenants' API keys
    are checked there), else straight to the pool's pods."""
    ing = spec.ingress
    if ing is None:
        return None
    backend = names.gateway_name(pool) if gateway_enabled(spec) else names.service_name(pool)
    rule: dict[str, Any] = {"http": {"paths": [{
        "path": ing.path, "pathType": "Prefix",
        "backend": {"service": {"name": backend, "port": {"number": 80}}}}]}}
    if ing.host:
        rule["host"] = ing.host
    body: dict[str, Any] = {"rules": [rule]}
    if ing.class_name:
        body["ingressClassName"] = ing.class_name
    if ing.tls:
        body["tls"] = ing.tls
    return {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": _meta(names.ingress_name(pool), namespace, pool, uid, "ingress"), "spec": body}


def http_route(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec) -> Manifest | None:
    """The pool's HTTPRoute (Gateway API) to the Gateways ``spec.httpRoute.parentRefs`` names, sending
    the path prefix to the same backend as the Ingress: the gateway's Service with the gateway on, else
    the pool's."""
    route = spec.http_route
    if route is None:
        return None
    backend = names.gateway_name(pool) if gateway_enabled(spec) else names.service_name(pool)
    parents = []
    for ref in route.parent_refs:
        parent: dict[str, Any] = {"group": names.GATEWAY_API_GROUP, "kind": "Gateway", "name": ref.name}
        if ref.namespace:
            parent["namespace"] = ref.namespace
        if ref.section_name:
            parent["sectionName"] = ref.section_name
        if ref.port:
            parent["port"] = ref.port
        parents.append(parent)
    body: dict[str, Any] = {
        "parentRefs": parents,
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": route.path}}],
                   "backendRefs": [{"group": "", "kind": "Service", "name": backend, "port": 80, "weight": 1}]}],
    }
    if route.hostnames:
        body["hostnames"] = list(route.hostnames)
    return {"apiVersion": f"{names.GATEWAY_API_GROUP}/{names.GATEWAY_API_VERSION}", "kind": names.HTTPROUTE_KIND,
            "metadata": _meta(names.http_route_name(pool), namespace, pool, uid, "ingress"), "spec": body}


# ------------------------------------------------------------------------------------ gateway

# What `lorafleet gateway` reads, in the pool's namespace only: the pool's pods (where to send
# requests), LoRAAdapters (which tenant owns which adapter) and LoRATenants (limits, key digests). No
# Secrets: a LoRATenant holds only its keys' sha256. The same rules as the chart's gateway Role; the
# operator holds all of them, so it may make this Role without `bind` or `escalate`.
GATEWAY_RULES: list[dict[str, Any]] = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [names.GROUP], "resources": [names.ADAPTER_PLURAL, names.TENANT_PLURAL],
     "verbs": ["get", "list", "watch"]},
]


def gateway_labels(pool: str) -> dict[str, str]:
    """Labels of the gateway's pods: no ``lorafleet.io/pool``, which would make the operator, the
    gateway itself and the pool's Service count them as pool replicas."""
    labels = names.pool_labels(pool, "gateway")
    del labels[names.LABEL_POOL]
    labels[names.LABEL_GATEWAY_FOR] = pool
    return labels


def gateway_deployment(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec) -> Manifest:
    gw = spec.gateway
    assert gw is not None
    args = [f"--namespace={namespace}", f"--pool={pool}",
            # Ports as arguments of their own: the local stack's pod runner maps container ports it
            # finds as whole arguments to free local ports.
            "--port", str(names.GATEWAY_PORT), "--metrics-port", str(names.GATEWAY_METRICS_PORT),
            f"--spill-inflight={gw.spill_inflight}", f"--retries={gw.retries}", *(gw.extra_args or [])]
    container = {
        "name": names.GATEWAY_CONTAINER,
        "image": gw.image or spec.sidecar.image,
        "command": ["lorafleet", "gateway"],
        "args": args,
        "ports": [{"name": "http", "containerPort": names.GATEWAY_PORT, "protocol": "TCP"},
                  # /metrics (tenant names are labels) and the detailed /readyz: not in the Service.
                  {"name": "metrics", "containerPort": names.GATEWAY_METRICS_PORT, "protocol": "TCP"}],
        # Ready once it read the tenants and a pool pod answered.
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 20},
        "resources": _resources(gw.resources),
        "securityContext": CONTAINER_SECURITY,
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _meta(names.gateway_name(pool), namespace, pool, uid, "gateway"),
        "spec": {
            "replicas": gw.replicas,
            "selector": {"matchLabels": names.gateway_selector(pool)},
            "template": {
                "metadata": {"labels": gateway_labels(pool)},
                "spec": {
                    "serviceAccountName": names.gateway_name(pool),
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [{"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def gateway_service(pool: str, namespace: str, uid: str) -> Manifest:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(names.gateway_name(pool), namespace, pool, uid, "gateway"),
        "spec": {"type": "ClusterIP", "selector": names.gateway_selector(pool),
                 "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }


def gateway_rbac(pool: str, namespace: str, uid: str) -> list[Manifest]:
    """The gateway's ServiceAccount and its read-only Role in this namespace."""
    name = names.gateway_name(pool)
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, namespace, pool, uid, "gateway")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(name, namespace, pool, uid, "gateway"), "rules": GATEWAY_RULES}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": _meta(name, namespace, pool, uid, "gateway"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
               "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]}
    return [sa, role, binding]


def runtime_network_policy(pool: str, namespace: str, uid: str) -> Manifest:
    """With a gateway, the pool's runtime port answers the pool's gateway pods only: tenants' keys are
    checked there, and the pool's Service would otherwise let any pod of the cluster around them. The
    metrics ports (the sidecar's and the runtime's) stay open to scrapers and the sidecar's health port
    to the kubelet's probes; the runtime's admin port listens on 127.0.0.1."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(names.gateway_name(pool), namespace, pool, uid, "gateway"),
        "spec": {
            "podSelector": {"matchLabels": names.pod_selector(pool)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {names.LABEL_GATEWAY_FOR: pool}}}],
                 "ports": [{"protocol": "TCP", "port": names.RUNTIME_PORT}]},
                {"ports": [{"protocol": "TCP", "port": names.SIDECAR_METRICS_PORT},
                           {"protocol": "TCP", "port": names.RUNTIME_METRICS_PORT},
                           {"protocol": "TCP", "port": names.SIDECAR_HEALTH_PORT}]},
            ],
        },
    }


def gateway_children(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec) -> list[Manifest]:
    """The gateway's objects when ``spec.gateway.enabled``, else none."""
    if not gateway_enabled(spec):
        return []
    return [*gateway_rbac(pool, namespace, uid), gateway_service(pool, namespace, uid),
            gateway_deployment(pool, namespace, uid, spec), runtime_network_policy(pool, namespace, uid)]


def stale_children(pool: str, spec: BaseModelPoolSpec, sidecar_cluster_role: str | None = None) -> list[tuple[str, str]]:
    """(kind, name) of objects this pool may have owned that ``pool_children`` no longer renders: they
    are deleted (a 404 is fine, also an API server without the Gateway API's HTTPRoute). Turning the
    gateway off removes all of it."""
    out: list[tuple[str, str]] = []
    if spec.ingress is None:
        out.append(("Ingress", names.ingress_name(pool)))
    if spec.http_route is None:
        out.append((names.HTTPROUTE_KIND, names.http_route_name(pool)))
    gw = names.gateway_name(pool)
    if not gateway_enabled(spec):
        out += [("NetworkPolicy", gw), ("Deployment", gw), ("Service", gw), ("RoleBinding", gw), ("Role", gw),
                ("ServiceAccount", gw)]
    if not sidecar_cluster_role:
        out.append(("RoleBinding", sidecar_pods_binding_name(pool)))
    if pod_disruption_budget(pool, "", "", spec) is None:
        out.append(("PodDisruptionBudget", names.deployment_name(pool)))
    return out


def routes_configmap(pool: str, namespace: str, uid: str, name: str, routes_json: str) -> Manifest:
    meta = _meta(name, namespace, pool, uid, "routes")
    meta["labels"][names.LABEL_ROUTES_FOR] = pool
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {names.ROUTES_KEY: routes_json}}


def pool_children(pool: str, namespace: str, uid: str, spec: BaseModelPoolSpec, shards: int = 1,
                  sidecar_cluster_role: str | None = None, merged: "MergedRef | None" = None,
                  images: RuntimeImages = RuntimeImages(), replicas: int | None = None) -> list[Manifest]:
    """Everything a pool owns except its routes, in the order to apply them (the pod's service
    account and its permissions before the Deployment that uses them; the gateway's Service before
    the Ingress and HTTPRoute that point at it)."""
    out = [service_account(pool, namespace, uid), role(pool, namespace, uid, shards, sidecar_cluster_role),
           *role_binding(pool, namespace, uid, sidecar_cluster_role), service(pool, namespace, uid)]
    out += gateway_children(pool, namespace, uid, spec)
    for route in (ingress(pool, namespace, uid, spec), http_route(pool, namespace, uid, spec)):
        if route is not None:
            out.append(route)
    pdb = pod_disruption_budget(pool, namespace, uid, spec)
    if pdb is not None:
        out.append(pdb)
    if spec.model.merged_adapter is None or merged is not None:
        # A merged pool whose adapter cannot be resolved gets no Deployment (its status says why):
        # pods of the plain base would answer as the adapter. One already running keeps its version.
        out.append(deployment(pool, namespace, uid, spec, merged, images, replicas))
    return out

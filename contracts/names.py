"""Names, labels, annotations, ports and paths every part of lorafleet agrees on."""

from __future__ import annotations

GROUP = "lorafleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

POOL_KIND = "BaseModelPool"
POOL_PLURAL = "basemodelpools"
POOL_SHORT = "lfpool"
ADAPTER_KIND = "LoRAAdapter"
ADAPTER_PLURAL = "loraadapters"
ADAPTER_SHORT = "lora"
TENANT_KIND = "LoRATenant"
TENANT_PLURAL = "loratenants"
TENANT_SHORT = "lftenant"

FIELD_MANAGER = "lorafleet"

# The runtime images a pool's pods get when its spec.runtime.image is unset (the operator's
# --runtime-image / --runtime-vllm-image, the chart's operator.runtimeImage / operator.runtimeVllmImage):
# the vLLM one when the pool's engine is vllm, or auto resolving to vLLM (contracts/engines.py).
DEFAULT_RUNTIME_IMAGE = "lorafleet/runtime:0.1.0"
DEFAULT_RUNTIME_VLLM_IMAGE = "lorafleet/runtime-vllm:0.1.0"
# The resource a pool's runtime requests to get a GPU (what vLLM's CUDA image runs on).
GPU_RESOURCE = "nvidia.com/gpu"

# Labels
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_POOL = "lorafleet.io/pool"
LABEL_ROUTES_FOR = "lorafleet.io/routes-for"
# On a pool's gateway pods instead of LABEL_POOL, which marks the pool's runtime pods only.
LABEL_GATEWAY_FOR = "lorafleet.io/gateway-for"

# Annotations
SYNC_ANNOTATION = "lorafleet.io/sync"  # on pool pods, written by the sidecar
# Kubernetes' hint to the ReplicaSet controller of which pods to delete first on scale down (lower
# first, among pods equally scheduled, running and ready). A pool pod's sidecar sets it to
# DRAIN_DELETION_COST while the routes drain its pod (``RoutesTable.draining``), and removes it after.
POD_DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_DELETION_COST = "-2147483648"
ROUTES_KEY = "routes.json"  # key of the routes ConfigMaps

# Ports and paths inside a pool pod
RUNTIME_PORT = 8000
ADMIN_PORT = 8001  # runtime admin API, bound to 127.0.0.1 only
SIDECAR_METRICS_PORT = 9090
# The sidecar's probe endpoint (GET /healthz, /readyz and nothing else), on the pod IP for the kubelet.
SIDECAR_HEALTH_PORT = 9091
# The runtime's Prometheus /metrics, on the pod IP (for scrapers) but off the public port: tenants' names
# are labels there, and the public port is reachable through the gateway.
RUNTIME_METRICS_PORT = 9100
CACHE_MOUNT = "/var/lib/lorafleet"
CACHE_VOLUME = "cache"

RUNTIME_CONTAINER = "runtime"
SIDECAR_CONTAINER = "sidecar"
GATEWAY_CONTAINER = "gateway"
# Ports of a pool's gateway pod (``lorafleet gateway --port/--metrics-port``)
GATEWAY_PORT = 8080
GATEWAY_METRICS_PORT = 9090


def deployment_name(pool: str) -> str:
    return f"lorafleet-{pool}"


def service_name(pool: str) -> str:
    return f"lorafleet-{pool}"


def ingress_name(pool: str) -> str:
    return f"lorafleet-{pool}"


def http_route_name(pool: str) -> str:
    return f"lorafleet-{pool}"


# Gateway API (sigs.k8s.io/gateway-api): the pool's HTTPRoute.
GATEWAY_API_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSION = "v1"
HTTPROUTE_KIND = "HTTPRoute"
HTTPROUTE_PLURAL = "httproutes"


def sidecar_service_account(pool: str) -> str:
    return f"lorafleet-{pool}-sidecar"


def gateway_name(pool: str) -> str:
    """The pool's gateway Deployment, Service, ServiceAccount, Role and RoleBinding."""
    return f"lorafleet-{pool}-gateway"


def gateway_selector(pool: str) -> dict[str, str]:
    return {LABEL_NAME: "lorafleet", LABEL_GATEWAY_FOR: pool, LABEL_COMPONENT: "gateway"}


def routes_configmap_name(pool: str, shard: int | None = None) -> str:
    """``lorafleet-routes-<pool>`` for an unsharded pool, ``...-<shard>`` for shard N of many."""
    base = f"lorafleet-routes-{pool}"
    return base if shard is None else f"{base}-{shard}"


def pool_labels(pool: str, component: str) -> dict[str, str]:
    return {
        LABEL_NAME: "lorafleet",
        LABEL_INSTANCE: pool,
        LABEL_COMPONENT: component,
        LABEL_MANAGED_BY: "lorafleet",
        LABEL_POOL: pool,
    }


def pod_selector(pool: str) -> dict[str, str]:
    return {LABEL_NAME: "lorafleet", LABEL_POOL: pool, LABEL_COMPONENT: "runtime"}


def versioned_name(name: str, version: str) -> str:
    """``name@version``: how clients pin a version and how sync reports name an adapter version."""
    return f"{name}@{version}"


def split_versioned(model: str) -> tuple[str, str | None]:
    name, sep, version = model.partition("@")
    return name, (version if sep else None)


# Environment of a pool pod's containers: the operator's Deployment sets these, the sidecar and the
# runtime read them (the pod runner of the local stack passes them through unchanged).
class RuntimeEnv:
    MODEL_DIR = "LORAFLEET_MODEL_DIR"  # <cache>/models/<digest>; the runtime waits until it exists
    CACHE_DIR = "LORAFLEET_CACHE_DIR"
    TASK = "LORAFLEET_TASK"
    DTYPE = "LORAFLEET_DTYPE"
    QUANTIZATION = "LORAFLEET_QUANTIZATION"  # none | int8 | nf4 (spec.model.quantization)
    ENGINE = "LORAFLEET_ENGINE"  # auto, torch or vllm
    PORT = "LORAFLEET_PORT"
    ADMIN_PORT = "LORAFLEET_ADMIN_PORT"
    METRICS_PORT = "LORAFLEET_METRICS_PORT"  # /metrics only (names.RUNTIME_METRICS_PORT)
    MAX_BATCH_SIZE = "LORAFLEET_MAX_BATCH_SIZE"
    MAX_BATCH_DELAY_MS = "LORAFLEET_MAX_BATCH_DELAY_MS"
    MAX_QUEUE = "LORAFLEET_MAX_QUEUE"
    MAX_QUEUE_DELAY_MS = "LORAFLEET_MAX_QUEUE_DELAY_MS"  # queued longer than this: 429 (0: no bound)
    PER_TENANT_MAX_INFLIGHT = "LORAFLEET_PER_TENANT_MAX_INFLIGHT"
    DEVICE_SLOTS = "LORAFLEET_DEVICE_SLOTS"
    HOST_ADAPTERS = "LORAFLEET_HOST_ADAPTERS"
    MAX_RANK = "LORAFLEET_MAX_RANK"
    TORCH_THREADS = "LORAFLEET_TORCH_THREADS"  # torch intra-op threads (0/unset: CPU cores - 1 on CPU)
    MAX_MODEL_LEN = "LORAFLEET_MAX_MODEL_LEN"  # generation: KV-cache positions per row (0/unset: model's, capped)
    # The base model's id in /v1/models and in requests (the operator sets the pool's name).
    SERVED_MODEL_NAME = "LORAFLEET_SERVED_MODEL_NAME"
    # A merged pool (spec.model.mergedAdapter): the adapter directory the sidecar verified into the
    # cache (<cache>/adapters/<digest>; the runtime waits for it as for the model), merged into the
    # base at load, and the served name, version and tenant it answers as.
    MERGED_ADAPTER_DIR = "LORAFLEET_MERGED_ADAPTER_DIR"
    MERGED_ADAPTER_NAME = "LORAFLEET_MERGED_ADAPTER_NAME"
    MERGED_ADAPTER_VERSION = "LORAFLEET_MERGED_ADAPTER_VERSION"
    MERGED_ADAPTER_TENANT = "LORAFLEET_MERGED_ADAPTER_TENANT"


# ``lorafleet serve``'s static adapter list (name=path,...): TGI's variable, in TGI's format.
LORA_ADAPTERS_ENV = "LORA_ADAPTERS"


class SidecarEnv:
    POD_NAME = "POD_NAME"
    POD_NAMESPACE = "POD_NAMESPACE"
    POOL = "POOL"
    CACHE_DIR = "CACHE_DIR"
    RUNTIME_ADMIN_URL = "RUNTIME_ADMIN_URL"
    MODEL_URI = "MODEL_URI"
    MODEL_SHA256 = "MODEL_SHA256"
    MERGED_ADAPTER_URI = "MERGED_ADAPTER_URI"  # a merged pool: fetched and verified before the model is ready
    MERGED_ADAPTER_SHA256 = "MERGED_ADAPTER_SHA256"
    S3_ENDPOINT = "S3_ENDPOINT"
    S3_REGION = "S3_REGION"
    ACCESS_KEY = "AWS_ACCESS_KEY_ID"  # from the pool's storage Secret, in this container only
    SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
    MAX_RANK = "LORAFLEET_MAX_RANK"
    MAX_ADAPTER_BYTES = "LORAFLEET_MAX_ADAPTER_BYTES"
    DISK_BYTES = "LORAFLEET_DISK_BYTES"
    METRICS_PORT = "LORAFLEET_METRICS_PORT"
    HEALTH_PORT = "LORAFLEET_HEALTH_PORT"
    TASK = "LORAFLEET_TASK"  # the pool's task: the adapter rules' task check runs in the sidecar too

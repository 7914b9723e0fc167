"""Pydantic models of the lorafleet custom resources (DESIGN §2): the one source of the CRD schema.

Field names are camelCase on the wire (aliases) and snake_case in Python. Rules the API server can
enforce are attached as CEL ``x-kubernetes-validations`` (see ``crdgen``); the same rules are
checked again here so that Python callers get the same errors.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .quantity import parse_quantity

URI_RE = r"^(s3|file|hf)://.+"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$"  # no '@': name@version pins
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
TENANT_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"

IntOrString = Annotated[int | str, Field(json_schema_extra={"x-kubernetes-int-or-string": True})]


def cel(rule: str, message: str, field_path: str | None = None, reason: str | None = None) -> dict:
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    if reason:
        out["reason"] = reason
    return out


def _cel_extra(*rules: dict) -> dict:
    return {"x-kubernetes-validations": list(rules)}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class _Status(_Model):
    # Status is written by the operator and read back; tolerate fields newer versions add.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def _match(pattern: str, value: str, what: str) -> str:
    if not re.match(pattern, value):
        raise ValueError(f"{what} {value!r} does not match {pattern}")
    return value


# ---------------------------------------------------------------------------------------- pool


class Task(str, Enum):
    sequence_classification = "sequence-classification"
    text_generation = "text-generation"
    text_to_image = "text-to-image"


class Engine(str, Enum):
    """What runs the model in a pool's runtime (docs/runtime.md, "Engines")."""
    auto = "auto"  # vllm for text generation on a GPU when the image has vLLM; torch otherwise
    torch = "torch"  # lorafleet's own engine (every task)
    vllm = "vllm"  # vLLM's async engine (text generation; the lorafleet/runtime-vllm image)


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Quantization(str, Enum):
    none = "none"
    int8 = "int8"
    nf4 = "nf4"


class MergedAdapterSpec(_Model):
    """A dedicated pool for one hot adapter: its pods merge that adapter into the base weights at load."""
    name: str = Field(max_length=253, pattern=DNS_LABEL_PATTERN.replace("{0,61}", "{0,251}"),
                      description="The LoRAAdapter (same namespace) whose version this pool's pods merge into the "
                                  "base model; its requests go to this pool while it has Ready replicas, else to "
                                  "the adapter's spec.pool")
    version: str | None = Field(None, max_length=63, pattern=VERSION_PATTERN,
                                description="The version to merge: the adapter's spec.version or canary.version; "
                                            "default: its spec.version (a new version rolls this pool's pods)")


class ModelSpec(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            cel("self.uri.matches('^(s3|file|hf)://.+')",
                "model.uri must start with s3://, file:// or hf://", ".uri", "FieldValueInvalid"),
            cel("self.sha256.matches('^[0-9a-f]{64}$')",
                "model.sha256 must be 64 lowercase hex characters", ".sha256", "FieldValueInvalid"),
        ),
    )
    uri: str = Field(max_length=2048, description="Where the base model directory is: s3://bucket/prefix/, file:///path or hf://org/name")
    sha256: str = Field(max_length=64, description="Digest of the model directory (lorafleet digest DIR)")
    task: Task = Field(description="sequence-classification, text-generation or text-to-image (a diffusers "
                                   "pipeline folder)")
    dtype: DType = Field(DType.float32, description="Weights' dtype on the device")
    quantization: Quantization = Field(
        Quantization.none,
        description="The base model's linear layers quantized at load (the adapters stay in dtype). torch engine: "
                    "int8 = bitsandbytes LLM.int8, nf4 = bitsandbytes 4-bit NormalFloat (QLoRA's, double-quantized "
                    "scales, computing in dtype); text-generation and sequence-classification pools on cpu or cuda; "
                    "other tasks and devices, and shapes the device's kernel cannot take, are refused at startup. "
                    "Output heads stay unquantized. See docs/runtime.md")
    merged_adapter: MergedAdapterSpec | None = Field(
        None, description="Text generation: merge this LoRAAdapter's version into the base at load (W + scale·B·A, "
                          "as PEFT's merge_and_unload) and serve only it, under its served name, at the base's speed. "
                          "The pool then serves no other adapter and not the plain base model")

    @field_validator("uri")
    @classmethod
    def check_uri(cls, v: str) -> str:
        return _match(URI_RE, v, "model.uri")

    @field_validator("sha256")
    @classmethod
    def check_sha(cls, v: str) -> str:
        return _match(DIGEST_PATTERN, v, "model.sha256")



class ResourceRequirements(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    limits: dict[str, IntOrString] | None = None
    requests: dict[str, IntOrString] | None = None


class RuntimeSpec(_Model):
    image: str | None = Field(
        None, max_length=512,
        description="Runtime container image. Unset: the operator's runtime image for the pool's engine, "
                    "lorafleet/runtime (torch) or lorafleet/runtime-vllm when engine is vllm, or auto on a "
                    "text-generation pool whose runtime resources ask for nvidia.com/gpu (unquantized, not "
                    "merged); the chart's operator.runtimeImage / operator.runtimeVllmImage")
    engine: Engine = Field(
        Engine.auto,
        description="What runs the model: torch (lorafleet's engine, every task), vllm (vLLM's engine, text "
                    "generation only; needs an image with vLLM, e.g. lorafleet/runtime-vllm, the default image "
                    "then) or auto (vllm for text generation on a GPU when the image has vLLM, torch otherwise). "
                    "A runtime that cannot run the chosen engine refuses the model: the pool's ModelReady "
                    "condition says why")
    resources: ResourceRequirements | None = None
    max_batch_size: int = Field(32, ge=1, le=4096, description="Rows in one forward pass")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000, description="How long a batch waits to fill")
    max_queue: int = Field(1024, ge=1, description="Queued requests before 429")
    max_queue_delay_ms: float = Field(
        2000.0, ge=0, le=600_000,
        description="Queue-delay bound: a request still queued after this long is answered 429 with Retry-After, "
                    "and one that would wait longer at the measured rate is refused at once (a tenant with more "
                    "queued than its share first); 0: no bound")
    per_tenant_max_inflight: int = Field(64, ge=1, description="Queued + running requests of one tenant before 429")
    max_model_len: int | None = Field(
        None, ge=1, le=10_000_000,
        description="Text generation: positions per KV-cache row (prompt + generated tokens); the cache holds "
                    "maxBatchSize rows of this many. Default: the model's max_position_embeddings capped at 8192; "
                    "above the model's max_position_embeddings the runtime refuses to start")


_K8S_OBJECT = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


class SidecarSpec(_Model):
    image: str = Field("lorafleet/control:0.1.0", description="Sidecar container image")
    resources: ResourceRequirements | None = None
    liveness_probe: dict[str, Any] | None = Field(
        None, json_schema_extra=_K8S_OBJECT,
        description="The sidecar container's livenessProbe (a Kubernetes Probe); default: HTTP GET /healthz on its "
                    "health port (9091) every 10 s, 3 failures: its sync loop ends passes and its routes watches run")
    readiness_probe: dict[str, Any] | None = Field(
        None, json_schema_extra=_K8S_OBJECT,
        description="The sidecar container's readinessProbe (a Kubernetes Probe; a native sidecar's readiness is "
                    "part of the pod's); default: HTTP GET /readyz on its health port (9091) every 5 s: live, and a "
                    "pass worked through a complete routes table")


class CacheSpec(_Model):
    device_slots: int = Field(32, ge=1, le=65536, description="Adapters resident on the device at once")
    host_adapters: int = Field(512, ge=1, description="Adapters kept in host memory")
    disk_bytes: IntOrString = Field("20Gi", description="Cache volume size (emptyDir sizeLimit)")
    max_rank: int = Field(64, ge=1, le=4096, description="Largest LoRA rank accepted")
    max_adapter_bytes: IntOrString = Field("512Mi", description="Largest adapter accepted")

    @field_validator("disk_bytes", "max_adapter_bytes")
    @classmethod
    def _quantity(cls, v: int | str) -> int | str:
        parse_quantity(v)
        return v

    @property
    def disk_bytes_int(self) -> int:
        return parse_quantity(self.disk_bytes)

    @property
    def max_adapter_bytes_int(self) -> int:
        return parse_quantity(self.max_adapter_bytes)


class SecretRef(_Model):
    name: str = Field(pattern=DNS_LABEL_PATTERN.replace("{0,61}", "{0,251}"))


class StorageSpec(_Model):
    endpoint: str = Field("http://minio.lorafleet-system:9000", description="S3 endpoint URL")
    secret_ref: SecretRef | None = Field(None, description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    region: str | None = None


class IngressSpec(_Model):
    host: str | None = None
    class_name: str | None = None
    path: str = "/"
    tls: list[dict[str, Any]] | None = Field(
        None, json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}
    )


class ParentRef(_Model):
    """A Gateway (Gateway API, gateway.networking.k8s.io) the pool's HTTPRoute attaches to."""
    name: str = Field(min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN.replace("{0,61}", "{0,251}"),
                      description="The Gateway's name")
    namespace: str | None = Field(None, min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN,
                                  description="The Gateway's namespace (default: the pool's; a Gateway elsewhere "
                                              "must allow routes from it in its listeners' allowedRoutes)")
    section_name: str | None = Field(None, min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN.replace(
        "{0,61}", "{0,251}"), description="One listener of the Gateway, by name (default: every listener that allows "
                                          "the route)")
    port: int | None = Field(None, ge=1, le=65535, description="Only the Gateway's listeners on this port")


class HTTPRouteSpec(_Model):
    """The pool's HTTPRoute (Gateway API), the alternative to spec.ingress (both may be set)."""
    parent_refs: list[ParentRef] = Field(min_length=1, max_length=32,
                                         description="The Gateways the route attaches to (a Gateway's controller, e.g. "
                                                     "Envoy Gateway, then serves it)")
    hostnames: list[Annotated[str, Field(min_length=1, max_length=253)]] | None = Field(
        None, max_length=16, description="Hosts the route answers (default: every host the Gateway's listener takes)")
    path: str = Field("/", max_length=1024, pattern=r"^/", description="Path prefix the route sends to the pool")


class GatewaySpec(_Model):
    """``lorafleet gateway`` in front of this pool, deployed by the operator (docs/gateway.md)."""
    enabled: bool = Field(False, description="Deploy a gateway for this pool; the pool's Ingress and HTTPRoute "
                                             "then send requests to the gateway (tenants need API keys)")
    replicas: int = Field(1, ge=0, le=100, description="Gateway pods; each enforces its share of a tenant's "
                                                       "limits (divided by the Ready gateway pods)")
    image: str | None = Field(None, max_length=512, description="Gateway image; default spec.sidecar.image "
                                                                "(the control image)")
    spill_inflight: int = Field(8, ge=1, le=100_000, description="Requests open on a pod before the next "
                                                                 "request for its adapters goes to another pod")
    retries: int = Field(2, ge=0, le=10, description="Other pods tried when one fails before answering")
    resources: ResourceRequirements | None = None
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(
        None, max_length=64, description="Extra arguments after `lorafleet gateway` (see its --help)")


def _replicas_value(v: int | str | None, what: str) -> int | str | None:
    if v is None or v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"{what} must be a number of replicas (1 or more) or \"all\", got {v!r}")


_REPLICAS_CEL_RULE = "type({f}) == int ? {f} >= 1 : {f} == 'all'"


class PlacementSpec(_Model):
    """Which replicas hold each adapter (docs/operator.md, "Placement")."""
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            cel(_REPLICAS_CEL_RULE.format(f="self.replicasPerAdapter"),
                "placement.replicasPerAdapter must be a number of replicas (1 or more) or \"all\"",
                ".replicasPerAdapter", "FieldValueInvalid"),
            # The schema's minimum is not enough: the API server compares an integer 0 with it as an
            # integer (0.001 -> 0) and lets it through.
            cel("!has(self.requestsPerReplica) || self.requestsPerReplica >= 0.001",
                "placement.requestsPerReplica must be more than 0 requests per second",
                ".requestsPerReplica", "FieldValueInvalid"),
        ),
    )
    replicas_per_adapter: IntOrString = Field(
        "all", description="Replicas that hold each adapter unless its spec.replicas says otherwise: a number "
                           "(placed by rendezvous hashing over the pool's pods, within adapterBytes), or \"all\" "
                           "(every replica syncs every adapter)")
    adapter_bytes: IntOrString | None = Field(
        None, description="Disk budget: bytes of adapters placed on one replica at most (default half of "
                          "spec.cache.diskBytes: the cache also holds the base model and, while adapters move, both "
                          "copies); an adapter counts spec.source.sizeBytes per version, else the size its holders' "
                          "sidecars verified, else spec.cache.maxAdapterBytes")
    host_memory_bytes: IntOrString | None = Field(
        None, description="Host-memory budget: bytes of adapters placed on one replica at most, counted as for "
                          "adapterBytes (the runtime parses every adapter it is given into host memory); default "
                          "none (only the disk budget bounds placement)")
    requests_per_replica: float | None = Field(
        None, ge=0.001, le=1_000_000_000,
        description="Popularity: an adapter is placed on one replica per this many requests per second it "
                    "receives (measured by the runtimes, reported by the sidecars), at least its spec.replicas "
                    "(or replicasPerAdapter), at most the pool's replicas and within the budgets; lowered only "
                    "once its rate fits the lower count with 25% to spare. Default none: counts follow the specs only")

    @field_validator("replicas_per_adapter")
    @classmethod
    def _per_adapter(cls, v: int | str) -> int | str:
        return _replicas_value(v, "placement.replicasPerAdapter")

    @field_validator("adapter_bytes", "host_memory_bytes")
    @classmethod
    def _bytes(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_quantity(v)
        return v


class Toleration(_Model):
    key: str | None = Field(None, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class LocalObjectReference(_Model):
    name: str = Field(max_length=253, pattern=DNS_LABEL_PATTERN.replace("{0,61}", "{0,251}"))


class DisruptionSpec(_Model):
    """The pool's PodDisruptionBudget (voluntary evictions: node drains, cluster upgrades)."""
    max_unavailable: IntOrString | None = Field(
        None, description="Pool pods a drain may take down at once (a number or a percentage); default 1 with "
                          "2 or more replicas, and no PodDisruptionBudget with fewer")
    enabled: bool = Field(True, description="false: no PodDisruptionBudget")


class BaseModelPoolSpec(_Model):
    model: ModelSpec
    replicas: int = Field(1, ge=0, le=1000)
    # Where and how the pool's pods run: passed through to the pod template as Kubernetes takes them.
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None, description="The pool pods' nodeSelector")
    tolerations: list[Toleration] | None = Field(None, max_length=64, description="The pool pods' tolerations")
    affinity: dict[str, Any] | None = Field(None, json_schema_extra=_K8S_OBJECT,
                                            description="The pool pods' affinity (a Kubernetes Affinity)")
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        None, max_length=16, description="Secrets the kubelet pulls the images with (the pods never read them)")
    pod_annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        None, description="Annotations of the pool's pods (the operator's own prometheus.io/* ones are kept)")
    priority_class_name: str | None = Field(None, max_length=253, description="The pool pods' PriorityClass")
    disruption: DisruptionSpec | None = Field(None, description="The pool's PodDisruptionBudget")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    sidecar: SidecarSpec = Field(default_factory=SidecarSpec)
    cache: CacheSpec = Field(default_factory=CacheSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    ingress: IngressSpec | None = Field(None, description="The pool's Ingress (networking.k8s.io/v1)")
    http_route: HTTPRouteSpec | None = Field(
        None, description="The pool's HTTPRoute (gateway.networking.k8s.io/v1), to a Gateway you name; with "
                          "spec.ingress too, both are made")
    gateway: GatewaySpec | None = None
    placement: PlacementSpec = Field(default_factory=PlacementSpec)

    def placement_budget(self) -> int:
        """Bytes of adapters one replica may be given (``placement.adapterBytes``, else half the
        cache's: the cache also holds the base model and, during a move, an adapter's old copy)."""
        b = self.placement.adapter_bytes
        return parse_quantity(b) if b is not None else self.cache.disk_bytes_int // 2

    def placement_memory_budget(self) -> int | None:
        """Bytes of adapters one replica may keep in host memory (``placement.hostMemoryBytes``; None:
        unbounded)."""
        b = self.placement.host_memory_bytes
        return parse_quantity(b) if b is not None else None


class Condition(_Status):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class PoolPhase(str, Enum):
    pending = "Pending"
    progressing = "Progressing"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class BaseModelPoolStatus(_Status):
    phase: PoolPhase | None = None
    observed_generation: int | None = None
    replicas: int | None = None
    ready_replicas: int | None = None
    ready: str | None = Field(None, description="readyReplicas/replicas, for kubectl get")
    adapters: int | None = None
    adapters_ready: int | None = None
    routes_generation: int | None = None
    merged_adapter: str | None = Field(None, description="spec.model.mergedAdapter: the served name@version its "
                                                         "pods merge into the base")
    gateway_ready_replicas: int | None = Field(None, description="Ready gateway pods (spec.gateway.enabled)")
    placement: list["ReplicaPlacement"] | None = Field(
        None, description="Per replica: adapters placed on it and their bytes against the budget "
                          "(set when spec.placement places adapters on some replicas)")
    message: str | None = None
    conditions: list[Condition] | None = None


class ReplicaPlacement(_Status):
    pod: str
    adapters: int = 0
    bytes: int = Field(0, description="Bytes of the adapters placed on it (leaving ones included): what the disk "
                                      "and the host-memory budgets are held against")
    budget_bytes: int = Field(0, description="Disk budget (spec.placement.adapterBytes)")
    memory_budget_bytes: int | None = Field(None, description="Host-memory budget (spec.placement.hostMemoryBytes)")
    cache_bytes: int | None = Field(None, description="Bytes in the pod's cache volume as its sidecar last reported "
                                                      "(base model and adapters), against spec.cache.diskBytes")


BaseModelPoolStatus.model_rebuild()


class BaseModelPool(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: str = "lorafleet.io/v1alpha1"
    kind: Literal["BaseModelPool"] = "BaseModelPool"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: BaseModelPoolSpec
    status: BaseModelPoolStatus | None = None


# ------------------------------------------------------------------------------------- adapter


class AdapterSource(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            cel("self.uri.matches('^(s3|file|hf)://.+')",
                "source.uri must start with s3://, file:// or hf://", ".uri", "FieldValueInvalid"),
            cel("self.sha256.matches('^[0-9a-f]{64}$')",
                "source.sha256 must be 64 lowercase hex characters (lorafleet digest DIR)", ".sha256",
                "FieldValueInvalid"),
        ),
    )
    uri: str = Field(max_length=2048, description="Where the adapter directory is: s3://bucket/prefix/ or file:///path")
    sha256: str = Field(max_length=64, description="Digest of the adapter directory (lorafleet digest DIR)")
    size_bytes: IntOrString | None = Field(
        None, description="Size of the adapter directory (`lorafleet push` prints it): what placement counts "
                          "against a replica's budget (default the pool's spec.cache.maxAdapterBytes)")

    @field_validator("size_bytes")
    @classmethod
    def _size(cls, v: int | str | None) -> int | str | None:
        if v is not None:
            parse_quantity(v)
        return v

    @field_validator("uri")
    @classmethod
    def check_uri(cls, v: str) -> str:
        return _match(URI_RE, v, "source.uri")

    @field_validator("sha256")
    @classmethod
    def check_sha(cls, v: str) -> str:
        return _match(DIGEST_PATTERN, v, "source.sha256")



_VERSION_CEL = cel(
    "self.version.matches('^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$')",
    "version must be 1-63 characters of letters, digits, '.', '_' or '-', starting with a letter or digit",
    ".version", "FieldValueInvalid",
)


class CanarySpec(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            _VERSION_CEL,
            cel("self.weight >= 0 && self.weight <= 100", "canary.weight must be between 0 and 100",
                ".weight", "FieldValueInvalid"),
        ),
    )
    version: str = Field(max_length=63)
    source: AdapterSource
    weight: int = Field(10, description="Percent of requests sent to the canary version (0-100)")

    @field_validator("version")
    @classmethod
    def check_version(cls, v: str) -> str:
        return _match(VERSION_PATTERN, v, "canary.version")


    @field_validator("weight")
    @classmethod
    def _weight(cls, v: int) -> int:
        if not 0 <= v <= 100:
            raise ValueError(f"canary.weight must be between 0 and 100, got {v}")
        return v


class LoRAAdapterSpec(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            _VERSION_CEL,
            cel("self.pool.matches('^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$')",
                "pool must be the name of a BaseModelPool (a DNS label)", ".pool", "FieldValueInvalid"),
            cel("self.tenant.matches('^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$')",
                "tenant must be 1-63 letters, digits, '.', '_' or '-'", ".tenant", "FieldValueInvalid"),
            cel("!has(self.servedName) || self.servedName.matches('^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$')",
                "servedName must be letters, digits, '.', '_' or '-' (no '@', which pins a version)",
                ".servedName", "FieldValueInvalid"),
            cel("!has(self.replicas) || (" + _REPLICAS_CEL_RULE.format(f="self.replicas") + ")",
                "replicas must be a number of replicas (1 or more) or \"all\"", ".replicas", "FieldValueInvalid"),
        ),
    )
    pool: str = Field(max_length=63, description="BaseModelPool in the same namespace")
    tenant: str = Field(max_length=63, description="Tenant that owns this adapter")
    served_name: str | None = Field(None, max_length=253, description="The `model` clients send; default metadata.name")
    version: str = Field(max_length=63, description="A version's content never changes: same version => same digest")
    source: AdapterSource
    canary: CanarySpec | None = None
    pinned: bool = Field(False, description="Keep resident in a device slot")
    preload: bool = Field(True, description="Load on every replica before first use")
    fallback: Literal["none", "base"] = Field(
        "none", description="When a replica cannot serve this adapter (it failed to load there, is not "
                            "loaded there yet, or got no device slot within half of maxQueueDelayMs): none answers 503/404 as for any adapter; base answers with the "
                            "pool's base model instead, saying so (header x-lorafleet-fallback: base and the "
                            "response's `fallback` field). Text-generation and text-to-image pools only")
    replicas: IntOrString | None = Field(
        None, description="Replicas of the pool that hold this adapter: a number, or \"all\"; default the pool's "
                          "spec.placement.replicasPerAdapter")

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: int | str | None) -> int | str | None:
        return _replicas_value(v, "replicas")

    def bytes_per_replica(self, default: int) -> int:
        """What the adapter's versions take on a replica that holds it (``default`` per version whose
        source does not say)."""
        sources = [self.source] + ([self.canary.source] if self.canary is not None else [])
        return sum(parse_quantity(s.size_bytes) if s.size_bytes is not None else default for s in sources)

    @field_validator("version")
    @classmethod
    def check_version(cls, v: str) -> str:
        return _match(VERSION_PATTERN, v, "version")

    @field_validator("pool")
    @classmethod
    def check_pool(cls, v: str) -> str:
        return _match(DNS_LABEL_PATTERN, v, "pool")

    @field_validator("tenant")
    @classmethod
    def check_tenant(cls, v: str) -> str:
        return _match(TENANT_PATTERN, v, "tenant")

    @field_validator("served_name")
    @classmethod
    def _served(cls, v: str | None) -> str | None:
        return None if v is None else _match(NAME_PATTERN, v, "servedName")

    def problems(self) -> list[str]:
        """Rules the schema cannot express, each naming its field (every problem, not the first)."""
        out = []
        if self.canary is not None:
            if self.canary.version == self.version:
                out.append(f"spec.canary.version: must differ from spec.version ({self.version!r})")
        return out


class AdapterPhase(str, Enum):
    pending = "Pending"
    syncing = "Syncing"
    ready = "Ready"
    degraded = "Degraded"
    failed = "Failed"


class LoRAAdapterStatus(_Status):
    phase: AdapterPhase | None = None
    served_version: str | None = None
    digest: str | None = None
    ready_replicas: int | None = None
    replicas: int | None = None
    ready: str | None = Field(None, description="readyReplicas/replicas, for kubectl get")
    placed: int | None = Field(None, description="Replicas the adapter is placed on")
    placement: list[str] | None = Field(None, description="Pods the adapter is placed on (set when it is placed "
                                                          "on some replicas, not all)")
    request_rate: float | None = Field(None, description="Requests per second the pool's runtimes measured for it, "
                                                         "set while that rate gives it more replicas than its spec "
                                                         "(spec.placement.requestsPerReplica)")
    observed_generation: int | None = None
    message: str | None = None
    conditions: list[Condition] | None = None
    pools: list["AdapterPoolStatus"] | None = Field(
        None, description="Where the adapter is served: its spec.pool (role shared) and, when a BaseModelPool "
                          "merges it (spec.model.mergedAdapter), that pool (role merged), which takes its requests "
                          "while it has Ready replicas")


class AdapterPoolStatus(_Status):
    pool: str
    role: Literal["shared", "merged"]
    version: str | None = Field(None, description="merged: the version its pods merge")
    ready_replicas: int | None = None
    replicas: int | None = None
    message: str | None = Field(None, description="merged: why its pods cannot ready that version (the "
                                                  "sidecar's reason: a digest mismatch, refused content)")


class LoRAAdapter(_Model):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: str = "lorafleet.io/v1alpha1"
    kind: Literal["LoRAAdapter"] = "LoRAAdapter"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LoRAAdapterSpec
    status: LoRAAdapterStatus | None = None

    @property
    def served_name(self) -> str:
        return self.spec.served_name or self.metadata.get("name", "")


# -------------------------------------------------------------------------------------- tenant


class ApiKeyDigest(_Model):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid",
        json_schema_extra=_cel_extra(
            cel("self.sha256.matches('^[0-9a-f]{64}$')",
                "apiKeys[].sha256 must be the sha256 of the key, 64 lowercase hex characters "
                "(lorafleet api-key prints a new key and its digest)", ".sha256", "FieldValueInvalid"),
        ),
    )
    name: str = Field(max_length=63, pattern=TENANT_PATTERN,
                      description="What the key is for (rotation: add the new key, then remove the old one)")
    sha256: str = Field(max_length=64, description="sha256 hex of the API key the tenant sends as "
                                                  "`Authorization: Bearer <key>`; never the key itself")

    @field_validator("sha256")
    @classmethod
    def check_sha(cls, v: str) -> str:
        return _match(DIGEST_PATTERN, v, "apiKeys[].sha256")


class RateLimitSpec(_Model):
    requests_per_second: float = Field(ge=0.001, le=1_000_000, description="Sustained requests per second")
    burst: int = Field(1, ge=1, le=1_000_000, description="Requests allowed at once above the sustained rate")


SOURCE_PREFIX_CEL = "self.matches('^(s3://[^/]+|file://|hf://[^/]+)/(.*/)?$')"


class LoRATenantSpec(_Model):
    api_keys: list[ApiKeyDigest] = Field(
        default_factory=list, max_length=64,
        description="Digests of the tenant's API keys, written by whoever makes the keys (the keys themselves "
                    "stay with the tenant: nothing in lorafleet reads them)")
    sources: list[Annotated[str, Field(max_length=2048, json_schema_extra=_cel_extra(
        cel(SOURCE_PREFIX_CEL, "sources[] must be a folder: s3://bucket/prefix/, file:///path/ or hf://org/ "
                               "(ending in '/')", None, "FieldValueInvalid")))]] = Field(
        default_factory=list, max_length=64,
        description="Storage prefixes the tenant's adapters may come from (s3://bucket/tenant/); a LoRAAdapter "
                    "whose source or canary lies outside them is invalid and never downloaded")
    rate_limit: RateLimitSpec | None = Field(None, description="Per-tenant token bucket; unset: unlimited")
    max_concurrency: int | None = Field(None, ge=1, le=1_000_000,
                                        description="Requests of this tenant in flight at once; unset: unlimited")

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        from .tenancy import prefix_problem

        found = [p for p in (prefix_problem(s) for s in v) if p]
        if found:
            raise ValueError("; ".join(found))
        return v

    @model_validator(mode="after")
    def _unique_keys(self) -> "LoRATenantSpec":
        seen: set[str] = set()
        for k in self.api_keys:
            if k.name in seen:
                raise ValueError(f"apiKeys: two keys are named {k.name!r}; give each its own name")
            seen.add(k.name)
        return self


class LoRATenantStatus(_Status):
    keys: int | None = Field(None, description="API key digests the gateway accepts for this tenant (written by the "
                                               "operator; a digest two tenants list is refused for both)")
    message: str | None = Field(None, description="How many keys are accepted, and why any is refused")


class LoRATenant(_Model):
    """A tenant of the gateway: its API keys and limits. The tenant's name is ``metadata.name``; its
    adapters are the LoRAAdapters of the same namespace whose ``spec.tenant`` is that name."""
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")
    api_version: str = "lorafleet.io/v1alpha1"
    kind: Literal["LoRATenant"] = "LoRATenant"
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LoRATenantSpec
    status: LoRATenantStatus | None = None


def condition(type_: str, ok: bool | None, reason: str, message: str = "", generation: int | None = None,
              previous: list[Condition] | None = None) -> Condition:
    """A condition whose lastTransitionTime only moves when its status changes."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for c in previous or []:
        if c.type == type_ and c.status == status and c.last_transition_time:
            now = c.last_transition_time
    return Condition(type=type_, status=status, reason=reason, message=message,
                     last_transition_time=now, observed_generation=generation)

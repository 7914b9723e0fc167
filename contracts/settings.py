"""Every component's settings, in one place: the environment variable, the flag, the default, the type
and range of each, read through pydantic-settings. The components build their flags from these classes
(``add_flags``), docs/configuration.md is rendered from them (``lorafleet gen-settings-doc``), and a bad
value is one line naming the component, the variable or flag, the value and what was expected."""

from __future__ import annotations

import argparse
import contextvars
import os
import sys
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import annotated_types
from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from . import names
from .digest import is_digest
from .names import RuntimeEnv, SidecarEnv
from .quantity import parse_quantity

# --- value types -------------------------------------------------------------------------------------

Port = Annotated[int, Field(ge=1, le=65535)]
PortOrOff = Annotated[int, Field(ge=0, le=65535)]  # 0: the endpoint is not served
Seconds = Annotated[float, Field(gt=0)]


def _bytes(value: Any) -> Any:
    return parse_quantity(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else value


Quantity = Annotated[int, BeforeValidator(_bytes)]  # 512Mi, 20Gi, 1000000: bytes
QUANTITY = "a byte quantity such as 512Mi, 20Gi or 1000000"


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)]


def setting(default: Any = None, *, help: str, env: str | None = None, flags: tuple[str, ...] = (),
            expect: str | None = None, group: str | None = None, metavar: str | None = None,
            shown_default: str | None = None, **constraints: Any) -> Any:
    """A field: ``env`` is the variable it is read from (none: flag only), ``flags`` its flags (none: the
    environment only), ``expect`` what a bad value is told it should be when the type does not say it
    well, ``group`` a set of mutually exclusive flags."""
    extra = {"env": env, "flags": list(flags), "expect": expect, "group": group, "metavar": metavar,
             "shown_default": shown_default}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def _meta(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


# --- reading ------------------------------------------------------------------------------------------

# The environment the next settings object reads (``from_env``'s env); os.environ when unset.
_ENV: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("lorafleet_settings_env",
                                                                                 default=None)


class _EnvVars(PydanticBaseSettingsSource):
    """Each field's own variable, exactly as named (no prefix, no case folding, nothing read for a
    flag-only field); an empty variable counts as unset, as Kubernetes writes unset optional values."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        var = _meta(field).get("env")
        env = _ENV.get()
        env = os.environ if env is None else env
        raw = env.get(var) if var else None
        return (raw if raw not in (None, "") else None), field_name, False

    def __call__(self) -> dict[str, Any]:
        out = {}
        for name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, name)
            if value is not None:
                out[name] = value
        return out


class SettingsError(ValueError):
    """Every bad setting of one component, in one line."""

    def __init__(self, component: str, problems: list[str]):
        self.component, self.problems = component, problems
        super().__init__("; ".join(problems))

    def line(self) -> str:
        return f"lorafleet {self.component}: {self}"


class ComponentSettings(BaseSettings):
    """Flags (init arguments) over the environment over the defaults."""

    component: ClassVar[str] = ""
    reference_base: ClassVar[type["ComponentSettings"] | None] = None  # its fields are documented there
    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return init_settings, _EnvVars(settings_cls)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any):
        """Settings from ``env`` (default os.environ) with ``overrides`` (None: not given) on top;
        raises SettingsError naming every bad value."""
        given = {k: v for k, v in overrides.items() if v is not None}
        token = _ENV.set(env)
        try:
            return cls(**given)
        except ValidationError as e:
            raise SettingsError(cls.component, problems(cls, e, set(given))) from None
        finally:
            _ENV.reset(token)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None):
        """Settings from parsed flags (``add_flags``: None where a flag was not given) over ``env``."""
        return cls.from_env(env, **{k: getattr(args, k, None) for k in cls.model_fields})

    @classmethod
    def from_args_or_exit(cls, args: argparse.Namespace, env: Mapping[str, str] | None = None):
        """``from_args``, or the command ends (exit 2) with one line naming every bad value: what each
        command does with its settings, no traceback."""
        try:
            return cls.from_args(args, env)
        except SettingsError as e:
            print(e.line(), file=sys.stderr)
            raise SystemExit(2) from None


def problems(cls: type[ComponentSettings], error: ValidationError, from_flags: set[str]) -> list[str]:
    out = []
    for err in error.errors():
        loc = err.get("loc") or ()
        field = cls.model_fields.get(str(loc[0])) if loc else None
        if field is None:  # a rule across fields: its own message names them
            msg = err.get("msg", "")
            out.append(msg.removeprefix("Value error, "))
            continue
        name = str(loc[0])
        meta = _meta(field)
        if name in from_flags or not meta.get("env"):
            source = (meta.get("flags") or [f"--{name.replace('_', '-')}"])[-1]
        else:
            source = meta["env"]
        value = err.get("input")
        value = value.get_secret_value() if isinstance(value, SecretStr) else value
        out.append(f"{source}={value!r}: expected {expected(field)}")
    return out


def _plain(annotation: Any) -> tuple[Any, bool]:
    """The annotation without Optional, and whether None is allowed."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _choices(annotation: Any) -> list[str] | None:
    ann, _ = _plain(annotation)
    if typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) is Literal:
        return [str(a) for a in typing.get_args(ann)]
    return None


def expected(field: FieldInfo) -> str:
    """What a value of this field must be, in words."""
    meta = _meta(field)
    if meta.get("expect"):
        return meta["expect"]
    choices = _choices(field.annotation)
    if choices is not None:
        return "one of " + ", ".join(c if c else '"" (unset)' for c in choices)
    ann, _ = _plain(field.annotation)
    bounds = {}
    for m in field.metadata:
        for kind, attr in (("Ge", "ge"), ("Gt", "gt"), ("Le", "le"), ("MinLen", "min_length")):
            if isinstance(m, getattr(annotated_types, kind)):
                bounds[kind] = getattr(m, attr)
    if ann is bool:
        return "true or false"
    if ann is int or ann is float:
        what = "an integer" if ann is int else "a number"
        lo, hi = bounds.get("Ge"), bounds.get("Le")
        if lo is not None and hi is not None:
            return f"{what} from {lo:g} to {hi:g}"
        if lo is not None:
            return f"{what} of at least {lo:g}"
        if bounds.get("Gt") is not None:
            return f"{what} greater than {bounds['Gt']:g}"
        return what
    if bounds.get("MinLen"):
        return "a non-empty value"
    return "text"


# --- flags --------------------------------------------------------------------------------------------

def add_flags(parser: argparse.ArgumentParser, cls: type[ComponentSettings], skip: tuple[str, ...] = ()) -> None:
    """One flag per field that has one. Every flag's default is None (not given), so the settings
    object, not argparse, decides between the flag, the environment and the default, and checks all
    three the same way."""
    groups: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        meta = _meta(field)
        if not meta.get("flags") or name in skip:
            continue
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": flag_help(field).replace("%", "%%")}
        ann, _ = _plain(field.annotation)
        if ann is bool:
            kwargs["action"] = "store_true"
        elif typing.get_origin(ann) is list:
            kwargs["action"] = "append"
        elif meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        target.add_argument(*meta["flags"], **kwargs)


def shown_default(field: FieldInfo) -> str:
    meta = _meta(field)
    if meta.get("shown_default") is not None:
        return meta["shown_default"]
    d = field.default
    if d is None:
        return "unset"
    if d == "" or d == []:
        return "empty"
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, float):
        return f"{d:g}"
    return str(d)


def flag_help(field: FieldInfo) -> str:
    meta = _meta(field)
    tail = [f"env {meta['env']}"] if meta.get("env") else []
    choices = _choices(field.annotation)
    if choices is not None:
        tail.append(expected(field))
    if not (isinstance(field.default, bool) or field.default in (None, "", [])):
        tail.append(f"default {shown_default(field)}")
    return field.description + (f" ({'; '.join(tail)})" if tail else "")


# --- the components -----------------------------------------------------------------------------------

TaskName = Literal["sequence-classification", "text-generation", "text-to-image"]
TASKS: tuple[str, ...] = typing.get_args(TaskName)
Quantization = Literal["none", "int8", "nf4"]  # what each means: runtime/quantization.py
QUANTIZATIONS: tuple[str, ...] = typing.get_args(Quantization)
Engine = Literal["auto", "torch", "vllm"]  # what runs the model (runtime/lifecycle.py's choose_engine)
ENGINES: tuple[str, ...] = typing.get_args(Engine)


class OperatorSettings(ComponentSettings):
    """``lorafleet operator``: the kopf operator (the chart's operator Deployment)."""

    component: ClassVar[str] = "operator"

    namespace: list[str] = setting(
        [], flags=("-n", "--namespace"), group="scope", metavar="NAMESPACE",
        help="watch only this namespace (repeatable; glob patterns allowed)")
    all_namespaces: bool = setting(
        False, flags=("-A", "--all-namespaces"), group="scope",
        help="watch every namespace (the default when no --namespace is given)")
    liveness: str = setting(
        "", env="LORAFLEET_OPERATOR_LIVENESS", flags=("--liveness",), metavar="URL", pattern=r"^(https?://\S+)?$",
        expect="an http:// URL such as http://0.0.0.0:8080/healthz",
        help="serve liveness on this URL, e.g. http://0.0.0.0:8080/healthz (empty: not served)")
    sidecar_cluster_role: str = setting(
        "", env="LORAFLEET_SIDECAR_CLUSTER_ROLE", flags=("--sidecar-cluster-role",),
        help="pools' sidecars get their pod rights (get, patch) from a RoleBinding to this ClusterRole (the "
             "chart's), so the operator itself need not hold patch on pods")
    runtime_image: str = setting(
        names.DEFAULT_RUNTIME_IMAGE, env="LORAFLEET_RUNTIME_IMAGE", flags=("--runtime-image",), min_length=1,
        help="runtime image of pools whose spec.runtime.image is unset and whose engine is torch")
    runtime_vllm_image: str = setting(
        names.DEFAULT_RUNTIME_VLLM_IMAGE, env="LORAFLEET_RUNTIME_VLLM_IMAGE", flags=("--runtime-vllm-image",),
        min_length=1,
        help="runtime image of pools whose spec.runtime.image is unset and whose engine is vllm, or auto on a "
             "text-generation pool asking for nvidia.com/gpu")
    resync_interval: float = setting(
        300.0, env="LORAFLEET_OPERATOR_RESYNC_S", flags=("--resync-interval",), ge=0, metavar="SECONDS",
        help="seconds between full listings that sweep objects whose deletion a watch missed (0: never)")
    lease_namespace: str = setting(
        "", env="LORAFLEET_OPERATOR_LEASE_NAMESPACE", flags=("--lease-namespace",),
        help="elect a leader among the operator's replicas on a coordination.k8s.io Lease in this namespace; "
             "only the holder acts (empty: the pod's own namespace when run in a cluster)")
    lease_name: str = setting(
        "lorafleet-operator", env="LORAFLEET_OPERATOR_LEASE_NAME", flags=("--lease-name",), min_length=1,
        help="the Lease's name")
    lease_duration: float = setting(
        10.0, env="LORAFLEET_OPERATOR_LEASE_DURATION_S", flags=("--lease-duration",), ge=3, le=300,
        metavar="SECONDS",
        help="seconds a replica waits after the Lease last changed before taking it over; the leader renews "
             "every 1/5 of it and stops acting when it could not renew within 2/3 of it")
    pod_name: str | None = setting(
        env="POD_NAME", help="this replica's pod (the chart sets it): the start of its identity in the Lease "
                             "(unset: the host's name)")
    no_leader_election: bool = setting(
        False, flags=("--no-leader-election",), help="act at once, without a Lease (run exactly one replica then)")
    verbose: bool = setting(False, flags=("-v", "--verbose"), help="log every reconcile")
    debug: bool = setting(False, flags=("--debug",), help="also log kopf's internals")


E = SidecarEnv


class SidecarSettings(ComponentSettings):
    """``lorafleet sidecar``: a pool pod's sidecar; the operator's Deployment sets its environment."""

    component: ClassVar[str] = "sidecar"

    pool: str | None = setting(env=E.POOL, flags=("--pool",), help="pool name")
    namespace: str | None = setting(env=E.POD_NAMESPACE, flags=("--namespace",), help="the pod's namespace")
    pod: str | None = setting(env=E.POD_NAME, flags=("--pod",), help="this pod's name, for the sync report")
    cache_dir: str = setting(names.CACHE_MOUNT, env=E.CACHE_DIR, flags=("--cache-dir",),
                             help="the pod's cache folder (shared with the runtime)")
    runtime_admin_url: str = setting(
        f"http://127.0.0.1:{names.ADMIN_PORT}", env=E.RUNTIME_ADMIN_URL, flags=("--runtime-admin-url",),
        help="the runtime's admin API")
    model_uri: str = setting("", env=E.MODEL_URI, flags=("--model-uri",), help="the base model's S3 URI")
    model_sha256: str = setting("", env=E.MODEL_SHA256, flags=("--model-sha256",),
                                help="the base model's digest (needed with --model-uri)")
    merged_adapter_uri: str = setting(
        "", env=E.MERGED_ADAPTER_URI, flags=("--merged-adapter-uri",),
        help="a merged pool's adapter, fetched and verified before the model is ready")
    merged_adapter_sha256: str = setting("", env=E.MERGED_ADAPTER_SHA256, flags=("--merged-adapter-sha256",),
                                         help="the merged adapter's digest")
    s3_endpoint: str | None = setting(env=E.S3_ENDPOINT, flags=("--s3-endpoint",),
                                      help="S3 endpoint (unset: no S3 downloads)")
    s3_region: str | None = setting(env=E.S3_REGION, flags=("--s3-region",), help="S3 region")
    access_key: SecretStr | None = setting(env=E.ACCESS_KEY, help="S3 access key (from the pool's storage Secret)")
    secret_key: SecretStr | None = setting(env=E.SECRET_KEY, help="S3 secret key (from the pool's storage Secret)")
    max_rank: int = setting(64, env=E.MAX_RANK, flags=("--max-rank",), ge=1,
                            help="adapters of a higher LoRA rank are refused")
    max_adapter_bytes: Quantity = setting("512Mi", env=E.MAX_ADAPTER_BYTES, flags=("--max-adapter-bytes",),
                                          expect=QUANTITY, help="larger adapters are refused")
    task: Literal["", TaskName] = setting(
        "", env=E.TASK, flags=("--task",), help="the pool's task, so adapters for another task are refused here")
    disk_bytes: Quantity | None = setting(env=E.DISK_BYTES, flags=("--disk-bytes",), expect=QUANTITY,
                                          help="cache budget on disk (unset: unbounded)")
    metrics_port: PortOrOff = setting(names.SIDECAR_METRICS_PORT, env=E.METRICS_PORT, flags=("--metrics-port",),
                                      help="Prometheus /metrics (0: no metrics endpoint)")
    health_port: PortOrOff = setting(
        names.SIDECAR_HEALTH_PORT, env=E.HEALTH_PORT, flags=("--health-port",),
        help="GET /healthz and /readyz for the kubelet's probes, nothing else (0: off)")
    health_host: str = setting("0.0.0.0", flags=("--health-host",),
                               help="address the health endpoint binds (every address: the kubelet probes the pod IP)")
    kubeconfig: str | None = setting(flags=("--kubeconfig",),
                                     help="kubeconfig file (unset: in-cluster credentials, else KUBECONFIG)")
    concurrency: int = setting(4, flags=("--concurrency",), ge=1, help="downloads at once")
    collect_after: float = setting(600.0, flags=("--collect-after",), ge=0, metavar="SECONDS",
                                   help="seconds content stays cached after no route references it")
    poll_interval: Seconds = setting(2.0, flags=("--poll-interval",), metavar="SECONDS",
                                     help="seconds between runtime checks")
    rate_window: Seconds = setting(30.0, flags=("--rate-window",), metavar="SECONDS",
                                   help="seconds over which the adapters' request rates are measured for the sync "
                                        "report (placement by popularity)")
    retry_base: Seconds = setting(0.5, flags=("--retry-base",), metavar="SECONDS",
                                  help="first retry delay in seconds")
    retry_max: Seconds = setting(60.0, flags=("--retry-max",), metavar="SECONDS",
                                 help="largest retry delay in seconds")
    log_level: LogLevel = setting("info", env="LORAFLEET_LOG_LEVEL", flags=("--log-level",), help="log level")

    @model_validator(mode="after")
    def _complete(self) -> "SidecarSettings":
        missing = [f"--{k} ({env})" for k, env in (("pool", E.POOL), ("namespace", E.POD_NAMESPACE),
                                                   ("pod", E.POD_NAME)) if not getattr(self, k)]
        if missing:
            raise ValueError("missing settings: " + ", ".join(missing))
        if self.model_uri and not is_digest(self.model_sha256):
            raise ValueError(f"--model-sha256 ({E.MODEL_SHA256}) must be the base model's digest when "
                             f"--model-uri is set")
        if self.merged_adapter_uri and not (is_digest(self.merged_adapter_sha256) and self.model_uri):
            raise ValueError(f"--merged-adapter-uri ({E.MERGED_ADAPTER_URI}) needs --merged-adapter-sha256 "
                             f"({E.MERGED_ADAPTER_SHA256}), the adapter's digest, and --model-uri")
        return self


class GatewaySettings(ComponentSettings):
    """``lorafleet gateway``: a pool's gateway (the operator's gateway Deployment passes flags)."""

    component: ClassVar[str] = "gateway"

    namespace: str | None = setting(env="POD_NAMESPACE", flags=("--namespace",),
                                    help="namespace of the pool, its adapters and tenants")
    pool: str | None = setting(env="POOL", flags=("--pool",), help="the BaseModelPool to front")
    host: str = setting("0.0.0.0", flags=("--host",), help="address both ports bind")
    port: Port = setting(names.GATEWAY_PORT, env="LORAFLEET_GATEWAY_PORT", flags=("--port",), help="the public API")
    metrics_port: Port = setting(
        names.GATEWAY_METRICS_PORT, flags=("--metrics-port",),
        help="/metrics and the detailed /readyz (tenant names are labels there: keep it internal)")
    policy: Literal["affinity", "round-robin"] = setting(
        "affinity", flags=("--policy",),
        help="replica choice (round-robin is the baseline the benchmark compares against)")
    spill_inflight: int = setting(
        8, flags=("--spill-inflight",), ge=1,
        help="requests open on a replica before the next request for its adapters goes elsewhere")
    retries: int = setting(2, flags=("--retries",), ge=0,
                           help="other replicas tried when one fails before answering (never once a stream started)")
    poll_s: Seconds = setting(
        1.0, flags=("--poll-s",), metavar="SECONDS",
        help="the longest between two reads of the watched view of pods, tenants and keys (in memory: changes "
             "arrive as watch events and apply at once; nothing is re-listed)")
    watch_timeout_s: int = setting(
        60, flags=("--watch-timeout-s",), ge=1, metavar="SECONDS",
        help="how long each watch request runs before the API server ends it and it is resumed")
    replica_poll_s: Seconds = setting(0.5, flags=("--replica-poll-s",), metavar="SECONDS",
                                      help="how often each replica's GET /v1/models is read (what it holds where)")
    log_level: LogLevel = setting("info", flags=("--log-level",), help="log level")

    @model_validator(mode="after")
    def _complete(self) -> "GatewaySettings":
        if not self.namespace or not self.pool:
            raise ValueError("pass --namespace and --pool (or set POD_NAMESPACE and POOL)")
        return self


R = RuntimeEnv


class RuntimeSettings(ComponentSettings):
    """``lorafleet runtime``: the model server of a pool pod; the operator's Deployment sets its
    environment from the pool's spec."""

    component: ClassVar[str] = "runtime"

    model_dir: str = setting("", env=R.MODEL_DIR, flags=("--model",), metavar="DIR",
                             help="base model directory (the runtime waits until it exists)")
    cache_dir: str = setting("", env=R.CACHE_DIR, flags=("--cache",), metavar="DIR", help="the pod's cache folder")
    task: Literal["", TaskName] = setting(
        "", env=R.TASK, flags=("--task",), help="the model's task (empty: from the model's config)")
    dtype: Literal["float32", "bfloat16", "float16"] = setting("float32", env=R.DTYPE, flags=("--dtype",),
                                                               help="the weights' dtype")
    quantization: Quantization = setting(
        "none", env=R.QUANTIZATION, flags=("--quantization",),
        help="quantize the base model's linear layers at load: int8 (bitsandbytes LLM.int8) or nf4 "
             "(bitsandbytes 4-bit NormalFloat)")
    device: str = setting("cpu", flags=("--device",), min_length=1, help="torch device, e.g. cpu or cuda")
    engine: Engine = setting(
        "auto", env=R.ENGINE, flags=("--engine",),
        help="what runs the model: torch, vllm (text generation; needs vLLM installed) or auto (vllm for text "
             "generation on a GPU when vLLM is installed, torch otherwise)")
    torch_threads: int = setting(
        0, env=R.TORCH_THREADS, flags=("--torch-threads",), ge=0,
        help="torch intra-op threads (0: on CPU the machine's cores minus one, at least 1, so the HTTP event loop "
             "keeps a core; elsewhere torch's default)")
    host: str = setting("0.0.0.0", flags=("--host",), help="public API and metrics bind address")
    port: Port = setting(names.RUNTIME_PORT, env=R.PORT, flags=("--port",), help="public API port")
    admin_port: Port = setting(names.ADMIN_PORT, env=R.ADMIN_PORT, flags=("--admin-port",),
                               help="admin API port, on 127.0.0.1 only")
    metrics_port: Port = setting(names.RUNTIME_METRICS_PORT, env=R.METRICS_PORT, flags=("--metrics-port",),
                                 help="Prometheus /metrics, on the bind address (not on the public port)")
    max_batch_size: int = setting(32, env=R.MAX_BATCH_SIZE, flags=("--max-batch-size",), ge=1,
                                  help="requests in one batch")
    max_batch_delay_ms: float = setting(5.0, env=R.MAX_BATCH_DELAY_MS, flags=("--max-batch-delay-ms",), ge=0,
                                        help="milliseconds a batch waits to fill")
    max_queue: int = setting(1024, env=R.MAX_QUEUE, flags=("--max-queue",), ge=1,
                             help="requests queued before new ones are refused")
    max_queue_delay_ms: float = setting(
        2000.0, env=R.MAX_QUEUE_DELAY_MS, flags=("--max-queue-delay-ms",), ge=0,
        help="queued work older than this is answered 429 with Retry-After, and work that would wait longer is "
             "refused at once (0: no bound)")
    per_tenant_max_inflight: int = setting(64, env=R.PER_TENANT_MAX_INFLIGHT, flags=("--per-tenant-max-inflight",),
                                           ge=1, help="one tenant's requests in flight at once")
    device_slots: int = setting(32, env=R.DEVICE_SLOTS, flags=("--device-slots",), ge=1,
                                help="adapters resident on the device at once")
    host_adapters: int = setting(512, env=R.HOST_ADAPTERS, flags=("--host-adapters",), ge=1,
                                 help="adapters registered in host memory at once")
    max_rank: int = setting(64, env=R.MAX_RANK, flags=("--max-rank",), ge=1,
                            help="adapters of a higher LoRA rank are refused")
    max_new_tokens: int = setting(256, ge=1, help="generated tokens when a request gives no limit")
    max_model_len: int = setting(
        0, env=R.MAX_MODEL_LEN, flags=("--max-model-len",), ge=0,
        help="generation: positions per KV-cache row, prompt + generated (0: the model's max_position_embeddings "
             "capped at 8192)")
    served_model_name: str = setting(
        "", env=R.SERVED_MODEL_NAME, flags=("--served-model-name",),
        help="the base model's id in /v1/models and requests (empty: the model folder's name)")
    merged_adapter_dir: str = setting("", env=R.MERGED_ADAPTER_DIR,
                                      help="a merged pool: the adapter directory merged into the base at load")
    merged_adapter_name: str = setting("", env=R.MERGED_ADAPTER_NAME,
                                       help="a merged pool: the served name it answers as")
    merged_adapter_version: str = setting("", env=R.MERGED_ADAPTER_VERSION,
                                          help="a merged pool: the version it answers as")
    merged_adapter_tenant: str = setting("", env=R.MERGED_ADAPTER_TENANT,
                                         help="a merged pool: the tenant it answers as")
    vllm_gpu_memory_utilization: float = setting(
        0.9, env="LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION", gt=0, le=1,
        expect="a fraction greater than 0 and at most 1",
        help="engine vllm: the share of the GPU's memory vLLM may take (weights, KV cache, adapters)")
    front: Literal["auto", "inline", "process"] = setting(
        "auto", env="LORAFLEET_FRONT", flags=("--front",),
        help="who serves the public port: process (an HTTP front process of its own takes the connections, HTTP "
             "parsing and refusals off the model's interpreter lock, and forwards the rest to the model server on "
             "a private socket), inline (the model server's event loop does it all), or auto (process where the "
             "torch engine computes in a model process: text generation and classification on CPU, where the "
             "event loop alone let 5x overload wait for seconds past the queue-delay bound; inline elsewhere)")
    model_process: Literal["auto", "inline", "process"] = setting(
        "auto", env="LORAFLEET_MODEL_PROCESS", flags=("--model-process",),
        help="where a text-generation or classification pool's torch engine computes: process (a model process of its own holds the "
             "model, KV cache and adapter slots, so the forward passes do not share an interpreter lock with the "
             "HTTP event loop; answers are the same), inline (a thread of the model server; text-to-image always), "
             "or auto (process on CPU, where it was measured faster; inline on a GPU)")
    log_level: LogLevel = setting("info", flags=("--log-level",), help="log level")

    @model_validator(mode="after")
    def _merged(self) -> "RuntimeSettings":
        if self.merged_adapter_dir and not (self.merged_adapter_name and self.merged_adapter_version):
            raise ValueError(f"{R.MERGED_ADAPTER_DIR} is set: {R.MERGED_ADAPTER_NAME} and "
                             f"{R.MERGED_ADAPTER_VERSION} must name what it answers as")
        return self


class RuntimeCommandSettings(RuntimeSettings):
    """``lorafleet runtime``: the model server of a pool pod; the operator's Deployment sets its
    environment from the pool's spec (RuntimeSettings, and how long to wait for the model)."""

    model_wait_s: Seconds = setting(86400.0, flags=("--model-wait-s",), metavar="SECONDS",
                                    help="how long to wait for the model directory to appear (default: a day)")


class ServeSettings(RuntimeSettings):
    """``lorafleet serve``: a model and every adapter in a folder, no cluster: the runtime's settings
    above (all but `--cache` and `--model-wait-s`), and these."""

    component: ClassVar[str] = "serve"
    reference_base: ClassVar[type[ComponentSettings] | None] = RuntimeSettings

    cache_dir: str = setting("", env=R.CACHE_DIR, help="the pod's cache folder (unused without a sidecar)")

    adapters: str | None = setting(
        flags=("--adapters",), metavar="DIR",
        help="folder whose subfolders are PEFT adapters, or diffusion LoRA folders for a pipeline (name = folder "
             "name)")
    lora_adapters: str | None = setting(env=names.LORA_ADAPTERS_ENV, flags=("--lora-adapters",),
                                        help="comma-separated name=path or path entries, TGI's format")


class PushSettings(ComponentSettings):
    """``lorafleet push``: the settings of the upload (the adapter and its LoRAAdapter are arguments)."""

    component: ClassVar[str] = "push"

    endpoint: str | None = setting(env=E.S3_ENDPOINT, flags=("--endpoint",), help="S3 endpoint")
    region: str | None = setting(env=E.S3_REGION, flags=("--region",), help="S3 region")
    access_key: SecretStr | None = setting(env=E.ACCESS_KEY, help="S3 access key")
    secret_key: SecretStr | None = setting(env=E.SECRET_KEY, help="S3 secret key")
    max_rank: int = setting(64, flags=("--max-rank",), ge=1,
                            help="refuse adapters of a higher LoRA rank (the pool's spec.cache.maxRank)")
    max_adapter_bytes: Quantity = setting("512Mi", flags=("--max-adapter-bytes",), expect=QUANTITY,
                                          help="refuse larger adapters (the pool's spec.cache.maxAdapterBytes)")
    no_progress: bool = setting(False, flags=("--no-progress",), help="print no progress bar")


COMPONENTS: tuple[type[ComponentSettings], ...] = (OperatorSettings, SidecarSettings, GatewaySettings,
                                                   RuntimeCommandSettings, ServeSettings, PushSettings)


# --- the reference ------------------------------------------------------------------------------------

def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference() -> str:
    """docs/configuration.md: every setting of every component."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from contracts/settings.py by `lorafleet gen-settings-doc`; do not edit by hand. -->",
        "",
        "Every component reads its settings from its environment; a flag, where there is one, overrides "
        "the variable, and the variable overrides the default. An empty variable counts as unset. The "
        "operator's Deployment sets the pool pods' variables from the BaseModelPool's spec "
        "(docs/operator.md), so change those through the pool, not the pod.",
        "",
        "A bad value stops the component before it starts, with exit code 2 and one line naming the "
        "component, the variable or flag, the value and what it must be, e.g. "
        "`lorafleet sidecar: LORAFLEET_MAX_RANK='abc': expected an integer of at least 1`.",
        "",
        "`lorafleet <component> --help` lists the same flags.",
    ]
    for cls in COMPONENTS:
        doc = " ".join(line.strip() for line in (cls.__doc__ or "").strip().split("\n\n")[0].splitlines())
        doc = doc.replace("``", "`")
        lines += ["", f"## {cls.component}", "", doc, "",
                  "| Variable | Flag | Default | Expected | Meaning |", "|---|---|---|---|---|"]
        inherited = set(cls.reference_base.model_fields) if cls.reference_base else set()
        for name, field in cls.model_fields.items():
            meta = _meta(field)
            if name in inherited or not (meta.get("env") or meta.get("flags")):
                continue  # documented with the base class, or not a setting anyone can set
            var = f"`{meta['env']}`" if meta.get("env") else ""
            flags = ", ".join(f"`{f}`" for f in meta.get("flags") or [])
            ann, _ = _plain(field.annotation)
            what = "a flag, no value" if ann is bool else ("repeatable" if typing.get_origin(ann) is list
                                                            else expected(field))
            lines.append(f"| {var} | {flags} | {_cell(shown_default(field))} | {_cell(what)} | "
                         f"{_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"

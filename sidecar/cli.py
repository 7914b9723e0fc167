"""``lorafleet sidecar``: every setting from the pod's environment (contracts.names.SidecarEnv), flags
override. Runs the routes watch, the sync loop and the metrics endpoint until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from lorafleet.contracts import names
from lorafleet.contracts.digest import is_digest
from lorafleet.contracts.quantity import parse_quantity

E = names.SidecarEnv


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lorafleet sidecar", description=__doc__.splitlines()[0])
    p.add_argument("--pool", default=_env(E.POOL), help=f"pool name (env {E.POOL})")
    p.add_argument("--namespace", default=_env(E.POD_NAMESPACE), help=f"namespace (env {E.POD_NAMESPACE})")
    p.add_argument("--pod", default=_env(E.POD_NAME), help=f"this pod's name, for the sync report (env {E.POD_NAME})")
    p.add_argument("--cache-dir", default=_env(E.CACHE_DIR, names.CACHE_MOUNT), help=f"env {E.CACHE_DIR}")
    p.add_argument("--runtime-admin-url", default=_env(E.RUNTIME_ADMIN_URL, f"http://127.0.0.1:{names.ADMIN_PORT}"),
                   help=f"env {E.RUNTIME_ADMIN_URL}")
    p.add_argument("--model-uri", default=_env(E.MODEL_URI, ""), help=f"env {E.MODEL_URI}")
    p.add_argument("--model-sha256", default=_env(E.MODEL_SHA256, ""), help=f"env {E.MODEL_SHA256}")
    p.add_argument("--merged-adapter-uri", default=_env(E.MERGED_ADAPTER_URI, ""),
                   help=f"a merged pool's adapter, fetched and verified before the model is ready (env {E.MERGED_ADAPTER_URI})")
    p.add_argument("--merged-adapter-sha256", default=_env(E.MERGED_ADAPTER_SHA256, ""),
                   help=f"env {E.MERGED_ADAPTER_SHA256}")
    p.add_argument("--s3-endpoint", default=_env(E.S3_ENDPOINT), help=f"env {E.S3_ENDPOINT}")
    p.add_argument("--s3-region", default=_env(E.S3_REGION), help=f"env {E.S3_REGION}")
    p.add_argument("--max-rank", type=int, default=int(_env(E.MAX_RANK, "64")), help=f"env {E.MAX_RANK}")
    p.add_argument("--max-adapter-bytes", default=_env(E.MAX_ADAPTER_BYTES, "512Mi"), help=f"env {E.MAX_ADAPTER_BYTES}")
    p.add_argument("--task", default=_env(E.TASK, ""), choices=["", "sequence-classification", "text-generation",
                                                                 "text-to-image"],
                   help=f"the pool's task, so adapters for another task are refused here (env {E.TASK})")
    p.add_argument("--disk-bytes", default=_env(E.DISK_BYTES), help=f"cache budget (env {E.DISK_BYTES}); none = unbounded")
    p.add_argument("--metrics-port", type=int, default=int(_env(E.METRICS_PORT, str(names.SIDECAR_METRICS_PORT))),
                   help=f"env {E.METRICS_PORT}; 0 = no metrics endpoint")
    p.add_argument("--health-port", type=int, default=int(_env(E.HEALTH_PORT, str(names.SIDECAR_HEALTH_PORT))),
                   help=f"GET /healthz and /readyz for the kubelet's probes, nothing else (env {E.HEALTH_PORT}); "
                        f"0 = off")
    p.add_argument("--health-host", default="0.0.0.0",
                   help="address the health endpoint binds (default every address: the kubelet probes the pod IP)")
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster credentials, else KUBECONFIG")
    p.add_argument("--concurrency", type=int, default=4, help="downloads at once (default 4)")
    p.add_argument("--collect-after", type=float, default=600.0,
                   help="seconds content stays cached after no route references it (default 600)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between runtime checks (default 2)")
    p.add_argument("--rate-window", type=float, default=30.0,
                   help="seconds over which the adapters' request rates are measured for the sync report "
                        "(placement by popularity; default 30)")
    p.add_argument("--retry-base", type=float, default=0.5, help="first retry delay in seconds (default 0.5)")
    p.add_argument("--retry-max", type=float, default=60.0, help="largest retry delay in seconds (default 60)")
    p.add_argument("--log-level", default=_env("LORAFLEET_LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)

    missing = [f"--{k.replace('_', '-')} ({env})" for k, env in
               (("pool", E.POOL), ("namespace", E.POD_NAMESPACE), ("pod", E.POD_NAME)) if not getattr(args, k)]
    if missing:
        p.error("missing settings: " + ", ".join(missing))
    if args.model_uri and not is_digest(args.model_sha256 or ""):
        p.error(f"--model-sha256 ({E.MODEL_SHA256}) must be the base model's digest when --model-uri is set")
    if args.merged_adapter_uri and not (is_digest(args.merged_adapter_sha256 or "") and args.model_uri):
        p.error(f"--merged-adapter-uri ({E.MERGED_ADAPTER_URI}) needs --merged-adapter-sha256 "
                f"({E.MERGED_ADAPTER_SHA256}), the adapter's digest, and --model-uri")
    try:
        args.max_adapter_bytes = parse_quantity(args.max_adapter_bytes)
        args.disk_bytes = parse_quantity(args.disk_bytes) if args.disk_bytes else None
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Every request the HTTP clients make (runtime polls, watches) would drown the sidecar's own lines.
    for noisy in ("httpx", "httpx2", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .app import Sidecar

    try:
        sidecar = Sidecar.from_args(args)
    except Exception as e:  # noqa: BLE001 - startup errors end the process with one clear line
        from lightkube.core.exceptions import ConfigError

        if isinstance(e, ConfigError):
            print(f"lorafleet sidecar: no Kubernetes credentials ({e}): run in a pod with a ServiceAccount, "
                  f"set KUBECONFIG or pass --kubeconfig", file=sys.stderr)
            return 2
        raise
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    sidecar.start(stop)
    stop.wait()
    sidecar.stop()
    return 0


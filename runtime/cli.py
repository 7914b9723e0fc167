"""``lorafleet runtime``: the model server of a pool pod. Settings come from the pod environment
(``LORAFLEET_*``, see contracts.names.RuntimeEnv); flags override them."""

from __future__ import annotations

import argparse
import logging
import sys

from lorafleet.runtime.settings import ENGINES, TASKS, RuntimeSettings


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", dest="model_dir", help="base model directory (env LORAFLEET_MODEL_DIR)")
    p.add_argument("--task", choices=list(TASKS),
                   help="default: from the model's config (env LORAFLEET_TASK)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="env LORAFLEET_DTYPE")
    p.add_argument("--quantization", choices=["none", "int8", "nf4"],
                   help="quantize the base model's linear layers at load: int8 (bitsandbytes LLM.int8) or nf4 "
                        "(bitsandbytes 4-bit NormalFloat); env LORAFLEET_QUANTIZATION, default none")
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--engine", choices=list(ENGINES),
                   help="what runs the model: torch, vllm (text generation; needs vLLM installed) or auto "
                        "(vllm for text generation on a GPU when vLLM is installed, torch otherwise; "
                        "env LORAFLEET_ENGINE, default auto)")
    p.add_argument("--host", help="public API bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="public API port (env LORAFLEET_PORT, default 8000)")
    p.add_argument("--admin-port", type=int, help="admin API port on 127.0.0.1 (env LORAFLEET_ADMIN_PORT, 8001)")
    p.add_argument("--metrics-port", type=int,
                   help="Prometheus /metrics, on --host (env LORAFLEET_METRICS_PORT, default 9100; not on the public port)")
    p.add_argument("--max-batch-size", type=int, help="env LORAFLEET_MAX_BATCH_SIZE")
    p.add_argument("--max-batch-delay-ms", type=float, help="env LORAFLEET_MAX_BATCH_DELAY_MS")
    p.add_argument("--max-queue", type=int, help="env LORAFLEET_MAX_QUEUE")
    p.add_argument("--max-queue-delay-ms", type=float,
                   help="queued work older than this is answered 429 with Retry-After, and work that would wait "
                        "longer is refused at once (env LORAFLEET_MAX_QUEUE_DELAY_MS; default 2000; 0: no bound)")
    p.add_argument("--per-tenant-max-inflight", type=int, help="env LORAFLEET_PER_TENANT_MAX_INFLIGHT")
    p.add_argument("--device-slots", type=int, help="env LORAFLEET_DEVICE_SLOTS")
    p.add_argument("--host-adapters", type=int, help="env LORAFLEET_HOST_ADAPTERS")
    p.add_argument("--max-rank", type=int, help="env LORAFLEET_MAX_RANK")
    p.add_argument("--torch-threads", type=int,
                   help="torch intra-op threads (env LORAFLEET_TORCH_THREADS; default on CPU: the machine's "
                        "cores minus one, at least 1, so the HTTP event loop keeps a core)")
    p.add_argument("--max-model-len", type=int,
                   help="generation: positions per KV-cache row, prompt + generated (env LORAFLEET_MAX_MODEL_LEN; "
                        "default: the model's max_position_embeddings capped at 8192)")
    p.add_argument("--served-model-name", help="the base model's id in /v1/models and requests "
                                                "(env LORAFLEET_SERVED_MODEL_NAME; default: the model folder's name)")
    p.add_argument("--log-level", default="info")


def settings_from(args: argparse.Namespace, **extra) -> RuntimeSettings:
    names = ["model_dir", "task", "dtype", "quantization", "device", "engine", "host", "port", "admin_port", "metrics_port", "max_batch_size",
             "max_batch_delay_ms", "max_queue", "max_queue_delay_ms", "per_tenant_max_inflight", "device_slots", "host_adapters",
             "max_rank", "served_model_name", "max_model_len", "torch_threads"]
    return RuntimeSettings.from_env(**{n: getattr(args, n, None) for n in names}, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet runtime", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--cache", dest="cache_dir", help="the pod's cache folder (env LORAFLEET_CACHE_DIR)")
    p.add_argument("--model-wait-s", type=float, default=86400.0,
                   help="how long to wait for the model directory to appear (default: a day)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from(args, cache_dir=args.cache_dir)
    except ValueError as e:
        print(f"lorafleet runtime: {e}", file=sys.stderr)
        return 2
    if not settings.model_dir:
        print("lorafleet runtime: no model directory; pass --model DIR or set LORAFLEET_MODEL_DIR", file=sys.stderr)
        return 2
    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.server import bind_all, serve_until_signalled

    try:
        socks = bind_all(settings)
    except OSError as e:
        print(f"lorafleet runtime: {e}", file=sys.stderr)
        return 2
    rt = Runtime(settings)
    rt.freeze_gc = True
    rt.load_in_background(wait_s=args.model_wait_s)
    return serve_until_signalled(rt, *socks, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())

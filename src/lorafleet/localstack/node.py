"""The local stack's node: the pod runner (kubelet stand-in) and the local ingress in one process.

    python -m lorafleet.localstack.node --kubeconfig K --workdir D --port 8080 [--default-backend NS/SERVICE]
        [--vhost-port 8081=pool.example ...] [--image-bin lorafleet/runtime-vllm=VENV/bin ...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightkube import Client, KubeConfig

from .ingress import LocalIngress
from .procs import ManagedProcess


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorafleet.localstack.node", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--workdir", required=True, help="where pods' volumes and logs go")
    p.add_argument("--port", type=int, required=True, help="local ingress port")
    p.add_argument("--default-backend", help="NS/SERVICE for requests no Ingress host matches")
    p.add_argument("--vhost-port", action="append", default=[], metavar="PORT=HOST",
                   help="also listen on PORT, treating every request there as sent to HOST (repeatable)")
    p.add_argument("--metrics-port", type=int, help="serve the ingress's GET /metrics on this port")
    p.add_argument("--image-bin", action="append", default=[], metavar="REPOSITORY=DIR",
                   help="the pod runner runs containers of this image repository from DIR (repeatable)")
    args = p.parse_args(argv)
    vhosts = {}
    for item in args.vhost_port:
        port, sep, host = item.partition("=")
        if not sep or not port.isdigit() or not host:
            p.error(f"--vhost-port {item!r}: expected PORT=HOST, e.g. 8081=minilm.lorafleet.local")
        vhosts[int(port)] = host
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # The pod runner is a process of its own: a TLS API client and the ingress's accepted sockets in
    # one process once saw bytes of one written to the other (fd reuse across threads, under load).
    workdir = Path(args.workdir)
    runner = ManagedProcess("pod-runner", [sys.executable, "-m", "lorafleet.localstack.podrunner",
                                           "--kubeconfig", args.kubeconfig, "--workdir", str(workdir),
                                           *[f"--image-bin={item}" for item in args.image_bin]],
                            workdir.parent / f"{workdir.name}-podrunner.log")
    default = tuple(args.default_backend.split("/", 1)) if args.default_backend else None
    ingress = LocalIngress(Client(config=KubeConfig.from_file(args.kubeconfig)), default)  # type: ignore[arg-type]

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Every API call of the ingress from one and the same thread.
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingress-api"))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        web_runner = await ingress.serve(args.port, vhosts=vhosts, metrics_port=args.metrics_port)
        logging.getLogger("lorafleet.node").info("ingress on http://127.0.0.1:%d%s", args.port, "".join(
            f", http://127.0.0.1:{port} as host {host}" for port, host in vhosts.items()))
        await stop.wait()
        await web_runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        runner.stop(timeout=30)  # SIGTERM: it ends its pods' processes first
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The local stack's node: the pod runner (kubelet stand-in) and the local ingress in one process.

    python -m lorafleet.localstack.node --kubeconfig K --workdir D --port 8080 [--default-backend NS/SERVICE]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from pathlib import Path

from lightkube import Client, KubeConfig

from .ingress import LocalIngress
from .podrunner import PodRunner


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lorafleet.localstack.node", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--workdir", required=True, help="where pods' volumes and logs go")
    p.add_argument("--port", type=int, required=True, help="local ingress port")
    p.add_argument("--default-backend", help="NS/SERVICE for requests no Ingress host matches")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    runner = PodRunner(Path(args.kubeconfig), Path(args.workdir))
    thread = threading.Thread(target=runner.run, name="pod-runner", daemon=True)
    thread.start()
    default = tuple(args.default_backend.split("/", 1)) if args.default_backend else None
    ingress = LocalIngress(Client(config=KubeConfig.from_file(args.kubeconfig)), default)  # type: ignore[arg-type]

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        web_runner = await ingress.serve(args.port)
        logging.getLogger("lorafleet.node").info("ingress on http://127.0.0.1:%d", args.port)
        await stop.wait()
        await web_runner.cleanup()

    try:
        asyncio.run(serve())
    finally:
        runner.stop()
        thread.join(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

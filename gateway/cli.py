"""``lorafleet gateway``: the HTTP front of one pool: adapter-affinity routing across its ready pods,
tenant API keys (their digests in LoRATenants), per-tenant rate and concurrency limits, Prometheus metrics."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Mapping

from lorafleet.contracts.settings import GatewaySettings, SettingsError, add_flags


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> GatewaySettings:
    """Flags over the environment (contracts/settings.py); SettingsError names every bad value."""
    p = argparse.ArgumentParser(prog="lorafleet gateway", description=__doc__.splitlines()[0])
    add_flags(p, GatewaySettings)
    return GatewaySettings.from_args(p.parse_args(argv), env)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse(list(sys.argv[1:] if argv is None else argv))
    except SettingsError as e:
        print(e.line(), file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from lightkube import Client, KubeConfig

    from .kube import KubeView
    from .server import Gateway

    try:
        config = KubeConfig.from_env()  # in-cluster credentials, else $KUBECONFIG or ~/.kube/config
    except Exception as e:
        print(f"lorafleet gateway: no Kubernetes credentials ({e}); set KUBECONFIG or run in a pod",
              file=sys.stderr)
        return 2
    view = KubeView(lambda: Client(config=config), args.namespace, args.pool,
                    server_timeout=args.watch_timeout_s).start()
    gw = Gateway(view.ready_pods, view.directory, policy=args.policy, spill_inflight=args.spill_inflight,
                 retries=args.retries, poll_s=args.poll_s, replica_poll_s=args.replica_poll_s,
                 gateways=view.ready_gateways, pool=args.pool, pool_pods=view.ready_pods,
                 changes=view.subscribe)
    asyncio.run(serve(gw, f"{args.namespace}/{args.pool}", args.host, args.port, args.metrics_port))
    return 0


async def serve(gw, pool: str, host: str, port: int, metrics_port: int) -> None:
    """Both ports until SIGTERM or SIGINT; then open requests get a few seconds to finish."""
    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    public = web.AppRunner(gw.app(), access_log=None, shutdown_timeout=10)
    ops = web.AppRunner(gw.ops_app(), access_log=None)
    await public.setup()
    await ops.setup()
    await web.TCPSite(public, host, port).start()
    await web.TCPSite(ops, host, metrics_port).start()
    # Imported modules and clients live as long as the process (~57,000 objects): out of the
    # collector's reach, a full collection no longer pauses every request for ~23 ms walking them.
    gc.collect()
    gc.freeze()
    logging.getLogger("lorafleet.gateway").info("gateway for pool %s on %s:%d (metrics :%d)",
                                                pool, host, port, metrics_port)
    await stop.wait()
    await public.cleanup()
    await ops.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())

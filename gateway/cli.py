"""``lorafleet gateway``: the HTTP front of one pool: adapter-affinity routing across its ready pods,
tenant API keys (their digests in LoRATenants), per-tenant rate and concurrency limits, Prometheus metrics."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet gateway", description=__doc__.splitlines()[0])
    p.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="namespace of the pool, its adapters and tenants (env POD_NAMESPACE)")
    p.add_argument("--pool", default=os.environ.get("POOL"), help="the BaseModelPool to front (env POOL)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("LORAFLEET_GATEWAY_PORT", "8080")),
                   help="the public API")
    p.add_argument("--metrics-port", type=int, default=9090,
                   help="/metrics and the detailed /readyz (tenant names are labels there: keep it internal)")
    p.add_argument("--policy", choices=["affinity", "round-robin"], default="affinity",
                   help="replica choice (round-robin is the baseline the benchmark compares against)")
    p.add_argument("--spill-inflight", type=int, default=8,
                   help="requests open on a replica before the next request for its adapters goes elsewhere")
    p.add_argument("--retries", type=int, default=2,
                   help="other replicas tried when one fails before answering (never once a stream started)")
    p.add_argument("--poll-s", type=float, default=1.0,
                   help="the longest between two reads of the watched view of pods, tenants and keys (in "
                        "memory: changes arrive as watch events and apply at once; nothing is re-listed)")
    p.add_argument("--watch-timeout-s", type=int, default=60,
                   help="how long each watch request runs before the API server ends it and it is resumed")
    p.add_argument("--replica-poll-s", type=float, default=0.5,
                   help="how often each replica's GET /v1/models is read (what it holds where)")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.namespace or not args.pool:
        print("lorafleet gateway: pass --namespace and --pool (or set POD_NAMESPACE and POOL)", file=sys.stderr)
        return 2

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

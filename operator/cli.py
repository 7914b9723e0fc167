"""``lorafleet operator``: run the kopf operator that reconciles pools and adapters."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Mapping

from lorafleet.contracts import names
from lorafleet.contracts.settings import OperatorSettings, add_flags


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Flags over the environment (contracts/settings.py); a bad value ends the process with one line."""
    p = argparse.ArgumentParser(prog="lorafleet operator",
                                description="Run the kopf operator that reconciles pools and adapters.")
    add_flags(p, OperatorSettings)
    return OperatorSettings.from_args_or_exit(p.parse_args(argv), env)


def main(argv: list[str]) -> int:
    args = parse(argv)
    import kopf

    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # kopf logs every handler call at INFO: with 10,000 adapters that is noise, not news.
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    if args.verbose:
        logging.getLogger("lorafleet.operator").setLevel(logging.DEBUG)

    from lorafleet.operator import main as handlers  # importing registers the handlers
    from lorafleet.operator.leader import in_cluster_namespace

    namespaces = args.namespace
    handlers.FLEET.namespaces = list(namespaces)
    handlers.FLEET.sidecar_cluster_role = args.sidecar_cluster_role or None
    handlers.FLEET.resync_interval = args.resync_interval
    from lorafleet.operator.manifests import RuntimeImages

    handlers.FLEET.runtime_images = RuntimeImages(torch=args.runtime_image, vllm=args.runtime_vllm_image)
    logging.getLogger("lorafleet.operator").info(
        "lorafleet operator starting, watching %s", ", ".join(namespaces) or "all namespaces")
    kopf_args = dict(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
                     liveness_endpoint=args.liveness or None)
    lease_namespace = "" if args.no_leader_election else args.lease_namespace or in_cluster_namespace() or ""
    try:
        if not lease_namespace:
            if not args.no_leader_election:
                logging.getLogger("lorafleet.operator").warning(
                    "leader election off (no --lease-namespace, not in a cluster): run only one operator")
            asyncio.run(run_standalone(kopf_args))  # what kopf.run does, with the handler below
        else:
            asyncio.run(run_elected(args, lease_namespace, kopf_args))
    except KeyboardInterrupt:
        pass
    except asyncio.CancelledError:
        pass
    return 0


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's own handling, except for one known kopf shutdown artefact: when the loop finalizes a watch
    stream that was still open (``infinite_watch``), kopf's ``streaming_block`` context manager answers the
    close with "generator didn't stop after athrow()". Nothing is lost (the operator is stopping and every
    state it keeps is in the API server), so that is one warning line, not a traceback that reads as a crash."""
    exc, gen = context.get("exception"), context.get("asyncgen")
    if (isinstance(exc, RuntimeError) and "didn't stop after athrow()" in str(exc)
            and getattr(gen, "__qualname__", "") == "infinite_watch"):
        logging.getLogger("lorafleet.operator").warning(
            "kopf's watch stream did not close cleanly at shutdown (%s); nothing is lost", exc)
        return
    # kopf's scan of the API server's resources reads /api and /apis side by side (asyncio.as_completed)
    # and stops at the first failure, leaving the other read's task unawaited: when its connection is
    # closed too (the operator stopping, the API server away) asyncio reports that task's exception as
    # never retrieved. kopf has logged the failed request and scans again; one warning line here.
    task = context.get("future")
    coro = task.get_coro() if isinstance(task, asyncio.Task) else None
    if (_is_connection_error(exc) and getattr(coro, "__qualname__", "") in ("_read_new_apis", "_read_old_api")
            and "Task exception was never retrieved" in str(context.get("message", ""))):
        logging.getLogger("lorafleet.operator").warning(
            "kopf's scan of the API server's resources lost its connection (%s: %s); kopf scans again",
            type(exc).__name__, exc)
        return
    loop.default_exception_handler(context)


def _is_connection_error(exc: BaseException | None) -> bool:
    import aiohttp

    return isinstance(exc, (aiohttp.ClientConnectionError, ConnectionError))


async def run_standalone(kopf_args: dict) -> None:
    import kopf

    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    await kopf.operator(**kopf_args)


async def run_elected(args: OperatorSettings, lease_namespace: str, kopf_args: dict) -> None:
    """Wait for the Lease, then run the operator while renewing it. A leader that cannot renew in time
    exits at once (its pod restarts as a candidate): two replicas must never act together."""
    import kopf

    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
    from lightkube import AsyncClient

    from lorafleet.operator.leader import LeaderElector, LeadershipLost, default_identity

    log = logging.getLogger("lorafleet.operator")
    elector = LeaderElector(AsyncClient(field_manager=names.FIELD_MANAGER), lease_namespace, args.lease_name,
                            identity=default_identity(args.pod_name), duration=args.lease_duration)
    liveness = await serve_liveness(args.liveness) if args.liveness else None
    try:
        await elector.acquire()
    finally:
        if liveness is not None:
            await liveness.cleanup()  # kopf serves it from now on
    operator = asyncio.create_task(kopf.operator(**kopf_args))
    holding = asyncio.create_task(elector.hold())
    await asyncio.wait({operator, holding}, return_when=asyncio.FIRST_COMPLETED)
    if holding.done():
        try:
            holding.result()
        except LeadershipLost as e:
            log.error("leadership lost, exiting at once: %s", e)
        except Exception:
            log.exception("leader election failed, exiting at once")
        logging.shutdown()
        os._exit(1)
    holding.cancel()
    await asyncio.gather(holding, return_exceptions=True)
    await elector.release()
    operator.result()


async def serve_liveness(url: str):
    """Answer liveness probes while waiting for the Lease: a waiting replica is healthy."""
    from urllib.parse import urlparse

    from aiohttp import web

    parsed = urlparse(url)

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"leading": False})

    app = web.Application()
    app.router.add_get(parsed.path or "/", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, parsed.hostname or "0.0.0.0", parsed.port or 80, reuse_address=True).start()
    return runner

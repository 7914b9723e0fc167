"""``lorafleet operator``: run the kopf operator that reconciles pools and adapters."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lorafleet operator",
                                description="Run the kopf operator that reconciles pools and adapters.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch only this namespace (repeatable; glob patterns allowed)")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (the default when no --namespace is given)")
    p.add_argument("--liveness", default=os.environ.get("LORAFLEET_OPERATOR_LIVENESS", ""),
                   help="serve liveness on this URL, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--sidecar-cluster-role", default=os.environ.get("LORAFLEET_SIDECAR_CLUSTER_ROLE", ""),
                   help="pools' sidecars get their pod rights (get, patch) from a RoleBinding to this ClusterRole "
                        "(the chart's), so the operator itself need not hold patch on pods")
    p.add_argument("--resync-interval", type=float,
                   default=float(os.environ.get("LORAFLEET_OPERATOR_RESYNC_S", "300")),
                   help="seconds between full listings that sweep objects whose deletion a watch missed "
                        "(0 = never)")
    p.add_argument("-v", "--verbose", action="store_true", help="log every reconcile")
    p.add_argument("--debug", action="store_true", help="also log kopf's internals")
    return p.parse_args(argv)


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

    namespaces = args.namespace
    handlers.FLEET.namespaces = list(namespaces)
    handlers.FLEET.sidecar_cluster_role = args.sidecar_cluster_role or None
    handlers.FLEET.resync_interval = args.resync_interval
    logging.getLogger("lorafleet.operator").info(
        "lorafleet operator starting, watching %s", ", ".join(namespaces) or "all namespaces")
    try:
        kopf.run(
            standalone=True,
            clusterwide=not namespaces,
            namespaces=namespaces,
            liveness_endpoint=args.liveness or None,
        )
    except KeyboardInterrupt:
        pass
    except asyncio.CancelledError:
        pass
    return 0

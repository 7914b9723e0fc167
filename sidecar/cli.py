"""``lorafleet sidecar``: every setting from the pod's environment (contracts/settings.py's
SidecarSettings), flags override. Runs the routes watch, the sync loop and the metrics endpoint until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Mapping

from lorafleet.contracts.settings import SidecarSettings, add_flags


def parse_args(argv: list[str], env: Mapping[str, str] | None = None) -> SidecarSettings:
    """Flags over the environment (contracts/settings.py); a bad or missing value ends the process with
    one line naming it."""
    p = argparse.ArgumentParser(prog="lorafleet sidecar", description=__doc__.splitlines()[0])
    add_flags(p, SidecarSettings)
    return SidecarSettings.from_args_or_exit(p.parse_args(argv), env)


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


"""``lorafleet runtime``: the model server of a pool pod. Settings come from the pod environment
(``LORAFLEET_*``, contracts/settings.py's RuntimeSettings); flags override them."""

from __future__ import annotations

import argparse
import logging
import sys

from lorafleet.contracts.settings import RuntimeCommandSettings, add_flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet runtime", description=__doc__.splitlines()[0])
    add_flags(p, RuntimeCommandSettings)
    settings = RuntimeCommandSettings.from_args_or_exit(p.parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not settings.model_dir:
        print("lorafleet runtime: no model directory; pass --model DIR or set LORAFLEET_MODEL_DIR", file=sys.stderr)
        return 2
    from lorafleet.runtime.lifecycle import Runtime, choose_front, known_task
    from lorafleet.runtime.server import bind_all, serve_until_signalled

    try:
        socks = bind_all(settings)
    except OSError as e:
        print(f"lorafleet runtime: {e}", file=sys.stderr)
        return 2
    rt = Runtime(settings)
    rt.freeze_gc = True
    rt.load_in_background(wait_s=settings.model_wait_s)
    return serve_until_signalled(rt, *socks, log_level=settings.log_level,
                                 front=choose_front(settings, known_task(settings)) == "process")


if __name__ == "__main__":
    raise SystemExit(main())

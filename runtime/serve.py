"""``lorafleet serve --model DIR [--adapters DIR] [--lora-adapters LIST]``: serve a base model and local
adapters, no cluster or sidecar needed. The admin API runs too.

Adapters come from a folder (every subfolder is one adapter: name = folder name) and/or a static list
in TGI's format (``LORA_ADAPTERS=name=path,...`` or ``--lora-adapters``; a bare entry is served under
itself as the name). Version "1" throughout. Each adapter is checked by the adapter rules
(contracts/adapter_rules.py): a bad one is refused with its reason (logged, and listed as ``failed``
with ``error`` in ``GET /admin/adapters``; requests naming it get a 503 with the reason) and every
good one serves. Nothing in an adapter's files can stop the server."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from lorafleet.contracts.names import LORA_ADAPTERS_ENV
from lorafleet.contracts.settings import ServeSettings, add_flags

log = logging.getLogger("lorafleet.runtime")


@dataclass(frozen=True)
class StaticAdapter:
    """One entry of an adapter list: the served name and the local directory (None: not local)."""

    name: str
    path: Path | None
    entry: str  # as written, for messages


def parse_lora_adapters(text: str) -> list[StaticAdapter]:
    """TGI's ``LORA_ADAPTERS`` format: comma-separated ``name=path`` or bare ``id`` (name = id)."""
    out = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, where = entry.partition("=")
        name, where = (name.strip(), where.strip()) if sep else (entry, entry)
        out.append(StaticAdapter(name, Path(where).expanduser() if _looks_local(where) else None, entry))
    return out


def _looks_local(where: str) -> bool:
    # An existing path is local; so is anything written as a path. "org/name" that does not exist
    # is a hub id, which this command cannot download.
    return bool(where) and (os.path.exists(where) or where.startswith(("/", "./", "../", "~")))


def _name_problem(rt, name: str, served: dict[str, str]) -> str | None:
    if not name:
        return "empty adapter name"
    if "@" in name:
        return f"adapter name {name!r} contains '@', which separates a name from its version in requests"
    if name == rt.base_name:
        return (f"adapter name {name!r} is the base model's served name; rename it or pass "
                f"--served-model-name")
    if name in served:
        return f"adapter name {name!r} is already served from {served[name]}"
    return None


def register_one(rt, name: str, path: Path, served: dict[str, str]) -> str | None:
    """Register one local adapter directory; return why it is refused (None: it serves)."""
    from lorafleet.contracts.digest import directory_digest
    from lorafleet.contracts.runtime_api import AdapterLoadRequest

    problem = _name_problem(rt, name, served)
    if problem is None and not path.is_dir() and not path.is_symlink():
        served[name] = str(path)
        problem = f"adapter directory {path} does not exist" if not path.exists() else f"{path} is not a directory"
        rt.manager.refuse(name, "1", problem)
    elif problem is None:
        served[name] = str(path)
        try:
            # The path as given (not resolved): a symlinked adapter folder is refused by the rules.
            req = AdapterLoadRequest(path=str(path.absolute()), sha256=directory_digest(path), tenant=name)
            entry, _ = rt.manager.register(name, "1", req)
            problem = entry.error
        except Exception as e:  # noqa: BLE001 - one adapter's files never stop the server
            problem = f"{type(e).__name__}: {e}"
            rt.manager.refuse(name, "1", problem)
    if problem:
        log.error("adapter %s (%s) is refused: %s", name, path, problem)
        return f"{name}: {problem}"
    log.info("serving adapter %s from %s", name, path)
    return None


def register_folder(rt, folder: Path, served: dict[str, str] | None = None) -> list[str]:
    """Register every subfolder of ``folder`` (hidden ones aside); returns the refusals."""
    served = {} if served is None else served
    failed = []
    for sub in sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p.is_dir() or p.is_symlink())):
        if (why := register_one(rt, sub.name, sub, served)) is not None:
            failed.append(why)
    return failed


def register_list(rt, adapters: list[StaticAdapter], served: dict[str, str] | None = None) -> list[str]:
    """Register a static adapter list (``LORA_ADAPTERS``); returns the refusals."""
    served = {} if served is None else served
    failed = []
    for a in adapters:
        if a.path is None:
            why = (f"{a.entry!r} is not a local directory; lorafleet serve serves only local adapter "
                   f"directories (it never downloads from a hub): download the adapter and pass "
                   f"{a.name}=/path/to/it")
            problem = _name_problem(rt, a.name, served) or why
            if problem == why and "@" not in a.name and a.name != rt.base_name:
                rt.manager.refuse(a.name, "1", why)
            log.error("adapter %s is refused: %s", a.name, problem)
            failed.append(f"{a.name}: {problem}")
        elif (why := register_one(rt, a.name, a.path, served)) is not None:
            failed.append(why)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet serve", description=__doc__.splitlines()[0])
    add_flags(p, ServeSettings)
    settings = ServeSettings.from_args_or_exit(p.parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path(settings.adapters) if settings.adapters else None
    if folder is not None and not folder.is_dir():
        print(f"lorafleet serve: --adapters {folder} is not a directory", file=sys.stderr)
        return 2
    if not settings.model_dir:
        print("lorafleet serve: pass --model DIR (a transformers model directory or a diffusers pipeline folder)",
              file=sys.stderr)
        return 2
    from lorafleet.runtime.lifecycle import Runtime, choose_front
    from lorafleet.runtime.server import bind_all, serve_until_signalled

    rt = Runtime(settings)
    rt.require_sync = False  # no sidecar: ready once the model and the folder's adapters are loaded
    rt.freeze_gc = True
    try:
        rt.load()
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"lorafleet serve: {e}", file=sys.stderr)
        return 2
    served: dict[str, str] = {}
    failed = register_folder(rt, folder, served) if folder is not None else []
    failed += register_list(rt, parse_lora_adapters(settings.lora_adapters or ""), served)
    if not served and not failed:
        log.info("no adapters given (--adapters, --lora-adapters or %s): serving the base model alone",
                 LORA_ADAPTERS_ENV)
    if failed:
        log.warning("%d adapters refused (GET /admin/adapters lists them with the reason); %d serve",
                    len(failed), sum(1 for e in rt.manager.all() if e.error is None))
    try:
        socks = bind_all(settings)
    except OSError as e:
        print(f"lorafleet serve: {e}", file=sys.stderr)
        return 2
    log.info("listening on %s:%d (admin 127.0.0.1:%d, metrics %s:%d)", settings.host, settings.port,
             settings.admin_port, settings.host, settings.metrics_port)
    return serve_until_signalled(rt, *socks, log_level=settings.log_level,
                                 front=choose_front(settings, rt.task) == "process")


if __name__ == "__main__":
    raise SystemExit(main())

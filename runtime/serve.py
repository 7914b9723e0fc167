"""``lorafleet serve --model DIR --adapters DIR``: serve a base model and every adapter subfolder of a
folder (name = folder name, version "1"), no cluster or sidecar needed. The admin API runs too."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lorafleet.runtime.cli import add_common_flags, settings_from

log = logging.getLogger("lorafleet.runtime")


def register_folder(rt, folder: Path) -> list[str]:
    """Register every adapter subfolder (one with adapter_config.json; in a text-to-image pool one with a
    .safetensors file); returns the failures."""
    from lorafleet.contracts.digest import directory_digest
    from lorafleet.contracts.runtime_api import AdapterLoadRequest

    failed = []
    def is_adapter(p: Path) -> bool:
        if rt.task == "text-to-image":
            return p.is_dir() and any(p.glob("*.safetensors"))
        return (p / "adapter_config.json").is_file()

    for sub in sorted(p for p in folder.iterdir() if is_adapter(p)):
        if sub.name == rt.base_name:
            failed.append(f"{sub.name}: the base model's served name; rename the folder or pass --served-model-name")
            log.error("adapter folder %s has the base model's served name; not served", sub)
            continue
        req = AdapterLoadRequest(path=str(sub.resolve()), sha256=directory_digest(sub), tenant=sub.name)
        entry, _ = rt.manager.register(sub.name, "1", req)
        if entry.error:
            failed.append(f"{sub.name}: {entry.error}")
            log.error("adapter %s failed to load: %s", sub.name, entry.error)
        else:
            log.info("serving adapter %s from %s", sub.name, sub)
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorafleet serve", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add_argument("--adapters", required=True, help="folder whose subfolders are PEFT adapters (text-to-image: LoRA folders)")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    folder = Path(args.adapters)
    if not folder.is_dir():
        print(f"lorafleet serve: --adapters {folder} is not a directory", file=sys.stderr)
        return 2
    try:
        settings = settings_from(args)
    except ValueError as e:
        print(f"lorafleet serve: {e}", file=sys.stderr)
        return 2
    if not settings.model_dir:
        print("lorafleet serve: pass --model DIR (a transformers model directory or a diffusers pipeline folder)",
              file=sys.stderr)
        return 2
    from lorafleet.runtime.lifecycle import Runtime
    from lorafleet.runtime.server import bind, serve_until_signalled

    rt = Runtime(settings)
    rt.require_sync = False  # no sidecar: ready once the model and the folder's adapters are loaded
    rt.freeze_gc = True
    try:
        rt.load()
    except (FileNotFoundError, OSError, ValueError) as e:
        print(f"lorafleet serve: {e}", file=sys.stderr)
        return 2
    register_folder(rt, folder)
    public, admin = bind(settings.host, settings.port), bind("127.0.0.1", settings.admin_port)
    log.info("listening on %s:%d (admin 127.0.0.1:%d)", settings.host, settings.port, settings.admin_port)
    return serve_until_signalled(rt, public, admin, log_level=args.log_level)


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``lorafleet`` command. Each component parses its own arguments and is imported only when its
subcommand runs, so ``lorafleet digest`` or ``lorafleet operator`` never import torch."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# subcommand -> (module with main(argv) -> int, one-line help)
COMPONENTS = {
    "operator": ("lorafleet.operator.cli", "run the kopf operator (reconciles pools and adapters)"),
    "sidecar": ("lorafleet.sidecar.cli", "run a pool pod's sidecar (syncs adapters from S3 into the cache)"),
    "runtime": ("lorafleet.runtime.cli", "run the model server of a pool pod"),
    "serve": ("lorafleet.runtime.serve", "serve a model and every adapter in a folder, no cluster needed"),
    "gateway": ("lorafleet.gateway.cli", "run a pool's gateway (adapter-affinity routing, tenant keys and limits)"),
    "push": ("lorafleet.sidecar.push", "validate an adapter, upload it to S3, print its LoRAAdapter YAML"),
}


def _digest(args: argparse.Namespace) -> int:
    from lorafleet.contracts.digest import directory_digest

    try:
        print(directory_digest(args.dir))
    except (NotADirectoryError, FileNotFoundError) as e:
        print(f"lorafleet digest: {e}", file=sys.stderr)
        return 2
    return 0


def _api_key(args: argparse.Namespace) -> int:
    """A new random API key on stdout's first line, the LoRATenant entry with its digest after it: the
    key goes to the tenant, only the digest into the cluster."""
    import hashlib
    import json
    import secrets

    key = f"lf-{secrets.token_urlsafe(32)}"  # 256 random bits: a digest of it cannot be searched back
    entry = {"name": args.name, "sha256": hashlib.sha256(key.encode()).hexdigest()}
    print(key)
    print(json.dumps(entry))
    return 0


def _gen_crds(args: argparse.Namespace) -> int:
    from lorafleet.contracts.crdgen import crd_manifests, render

    out = Path(args.out)
    stale = []
    for name, manifest in crd_manifests().items():
        text = render(manifest)
        path = out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", file=sys.stderr)
    if stale:
        print("stale CRDs (run `lorafleet gen-crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


def _gen_settings_doc(args: argparse.Namespace) -> int:
    from lorafleet.contracts.settings import render_reference

    out = Path(args.out)
    text = render_reference()
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"stale settings reference (run `lorafleet gen-settings-doc`): {out}", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMPONENTS:
        module, _ = COMPONENTS[argv[0]]
        return int(importlib.import_module(module).main(argv[1:]) or 0)

    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMPONENTS.items():
        sub.add_parser(name, help=help_, add_help=False)
    d = sub.add_parser("digest", help="print the content digest of an adapter or model directory")
    d.add_argument("dir")
    d.set_defaults(func=_digest)
    k = sub.add_parser("api-key", help="make a tenant API key: prints the key, then its LoRATenant "
                                       "spec.apiKeys entry (the digest)")
    k.add_argument("--name", default="key-1", help="the entry's name (default: key-1)")
    k.set_defaults(func=_api_key)
    g = sub.add_parser("gen-crds", help="write the CRD YAML generated from the contracts")
    g.add_argument("--out", default="crds", help="folder to write into (default: crds)")
    g.add_argument("--check", action="store_true", help="fail if the files differ instead of writing")
    g.set_defaults(func=_gen_crds)
    r = sub.add_parser("gen-settings-doc", help="write docs/configuration.md, every component's settings, from "
                                                 "contracts/settings.py")
    r.add_argument("--out", default="docs/configuration.md", help="file to write (default: docs/configuration.md)")
    r.add_argument("--check", action="store_true", help="fail if the file differs instead of writing")
    r.set_defaults(func=_gen_settings_doc)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))

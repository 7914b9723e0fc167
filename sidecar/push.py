"""``lorafleet push DIR s3://bucket/prefix/``: validate an adapter with the rules the sidecar and the
runtime apply (contracts/adapter_rules.py; against the base model too with ``--base-model DIR``),
upload it with a progress bar on stderr, print only its LoRAAdapter YAML on stdout, so
``lorafleet push ... | kubectl apply -f -`` works."""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import yaml

from lorafleet.contracts.digest import directory_digest, regular_files
from lorafleet.contracts.resources import LoRAAdapter
from lorafleet.contracts.settings import PushSettings, add_flags

from .storage import split_s3
from lorafleet.contracts.adapter_rules import BaseModelInfo, Limits, Refused, adapter_problems


class _Progress:
    """A one-line progress bar on stderr (redrawn at most 10 times a second)."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self._last = 0.0
        self._t0 = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(30 * frac)
            rate = self.done / max(now - self._t0, 1e-6) / 1e6
            sys.stderr.write(f"\rupload [{bar:<30}] {frac:6.1%} {self.done}/{self.total} B {rate:.1f} MB/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class _Reader:
    def __init__(self, f, progress: _Progress):
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.progress.add(len(b))
        return b


def _dns_name(text: str) -> str:
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return s or "adapter"


def _secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The adapter, where it goes and its LoRAAdapter from the arguments; the upload's settings
    (contracts/settings.py's PushSettings) from flags over the environment, as ``settings``."""
    p = argparse.ArgumentParser(prog="lorafleet push", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="adapter directory: PEFT (adapter_config.json + adapter_model.safetensors) or, "
                   "for a text-to-image pool, one diffusers or kohya LoRA .safetensors")
    p.add_argument("dest", help="s3://bucket/prefix/ to upload to")
    p.add_argument("--pool", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--name", help="LoRAAdapter name (default: <tenant>-<folder name>)")
    p.add_argument("--namespace", help="metadata.namespace of the printed YAML")
    p.add_argument("--base-model", help="the pool's base model directory: check shapes and target modules "
                                        "against it too")
    add_flags(p, PushSettings)
    args = p.parse_args(argv)
    args.settings = PushSettings.from_args_or_exit(args)
    return args


def main(argv: list[str] | None = None) -> int:
    a = parse_args(list(sys.argv[1:] if argv is None else argv))
    src = Path(a.dir)
    if not src.is_dir():
        print(f"lorafleet push: {src}: not a directory", file=sys.stderr)
        return 2
    try:
        bucket, prefix = split_s3(a.dest)
    except Refused as e:
        print(f"lorafleet push: {e.reason}", file=sys.stderr)
        return 2
    settings = a.settings
    if not settings.endpoint:
        print("lorafleet push: no S3 endpoint: pass --endpoint or set S3_ENDPOINT", file=sys.stderr)
        return 2
    try:
        base = BaseModelInfo.from_dir(a.base_model) if a.base_model else None
    except Refused as e:
        print(f"lorafleet push: --base-model {a.base_model}: {e.reason}", file=sys.stderr)
        return 2
    problems = adapter_problems(src, Limits(settings.max_rank, settings.max_adapter_bytes), base)
    if problems:
        print(f"lorafleet push: {src} is refused:", file=sys.stderr)
        for pr in problems:
            print(f"  - {pr}", file=sys.stderr)
        return 1
    digest = directory_digest(src)
    name = a.name or _dns_name(f"{a.tenant}-{src.resolve().name}")
    uri = f"s3://{bucket}/{prefix}"
    try:
        adapter = LoRAAdapter(metadata={"name": name, **({"namespace": a.namespace} if a.namespace else {})},
                              spec={"pool": a.pool, "tenant": a.tenant, "version": a.version,
                                    "source": {"uri": uri, "sha256": digest}})
    except ValueError as e:
        print(f"lorafleet push: {e}", file=sys.stderr)
        return 2

    from minio import Minio
    from minio.error import S3Error

    endpoint = settings.endpoint
    u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    client = Minio(u.netloc, access_key=_secret(settings.access_key), secret_key=_secret(settings.secret_key),
                   secure=u.scheme == "https", region=settings.region or None)
    files = regular_files(src)
    total = sum((src / rel).stat().st_size for rel in files)
    progress = _Progress(total, enabled=not settings.no_progress)
    try:
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        for rel in files:
            path = src / rel
            with open(path, "rb") as f:
                client.put_object(bucket, prefix + rel, _Reader(f, progress), path.stat().st_size,
                                  part_size=64 * 1024 * 1024)
    except (S3Error, OSError) as e:
        progress.close()
        print(f"lorafleet push: upload to {uri} failed: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # urllib3 connection errors
        progress.close()
        print(f"lorafleet push: upload to {uri} failed ({settings.endpoint} unreachable?): {e}", file=sys.stderr)
        return 1
    progress.close()
    print(f"pushed {len(files)} files ({total} bytes) to {uri}, digest {digest}", file=sys.stderr)
    sys.stdout.write(yaml.safe_dump(adapter.wire(), sort_keys=False))
    return 0

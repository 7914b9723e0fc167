"""Where adapters and models come from, behind one small interface: ``listing(uri)`` and
``fetch(uri, dest)``. ``s3://bucket/prefix/`` through the minio client, ``file:///path`` by copy.

``fetch`` hashes every file while writing it, so verification needs no second read; making it durable
(fsync) is the cache's job, off the serving path (``store.ContentStore``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import urlparse

from lorafleet.contracts.adapter_rules import Refused, path_problem

CHUNK = 1 << 20
Progress = Callable[[int], None]


class StorageError(Exception):
    """A transient storage failure (unreachable, reset, 5xx): retried with backoff."""


@dataclass(frozen=True)
class ObjectEntry:
    rel: str  # path below the prefix, with '/'
    size: int


class Storage(Protocol):
    def listing(self, uri: str) -> list[ObjectEntry]: ...

    def fetch(self, uri: str, dest: Path, progress: Progress | None = None) -> dict[str, str]:
        """Write every object below ``uri`` into ``dest``; return relative path -> sha256 hex."""
        ...


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")``: the prefix always names a folder."""
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise Refused(f"{uri!r}: expected s3://bucket/prefix/", "source")
    prefix = u.path.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return u.netloc, prefix


def _write_hashed(dest: Path, rel: str, chunks, progress: Progress | None,
                  max_size: int | None = None) -> tuple[str, int]:
    """Write ``chunks`` to ``dest/rel``; return its sha256, computed on the way (no second read of the
    file to verify it), and its size. A body longer than ``max_size`` (what the listing said) is refused
    as soon as it passes it: nothing more is written, so the size limits checked on the listing hold.
    No fsync here: the disk works after the entry is servable (see store.py); starting writeback
    while downloading measured 22% slower than leaving it to the background fsync."""
    target = dest / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    size = 0
    with open(target, "xb") as f:
        for chunk in chunks:
            if max_size is not None and size + len(chunk) > max_size:
                raise Refused(f"{rel}: the object is longer than the {max_size} bytes its listing says "
                              f"(storage does not serve what it lists; push the adapter again as a new "
                              f"version)", "storage")
            h.update(chunk)
            f.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest(), size


def fsync_path(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (children before parents)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


class S3Storage:
    def __init__(self, endpoint: str, access_key: str | None, secret_key: str | None,
                 region: str | None = None, max_connections: int = 16):
        import urllib3
        from minio import Minio

        u = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
        # Short timeouts and few client-side retries: a dead server is noticed quickly and our own
        # backoff (per adapter, with jitter) takes over.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=30), maxsize=max_connections,
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(u.netloc, access_key=access_key, secret_key=secret_key,
                            secure=u.scheme == "https", region=region or None, http_client=http)

    def listing(self, uri: str) -> list[ObjectEntry]:
        from minio.error import S3Error

        bucket, prefix = split_s3(uri)
        try:
            objs = list(self.client.list_objects(bucket, prefix=prefix, recursive=True))
        except S3Error as e:
            hint = (" (check the pool's spec.storage endpoint and its Secret's keys)"
                    if e.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") else "")
            raise StorageError(f"{uri}: {e.code}: {e.message}{hint}") from None
        except Exception as e:  # connection refused/reset: transient
            raise StorageError(f"{uri}: storage unreachable ({type(e).__name__}: {e})") from None
        out = []
        for o in objs:
            if o.is_dir:
                continue
            rel = o.object_name[len(prefix):]
            problem = path_problem(rel)
            if problem:
                raise Refused(f"object key {o.object_name!r}: {problem}", "path")
            out.append(ObjectEntry(rel, int(o.size or 0)))
        if not out:
            raise StorageError(f"{uri}: no objects under this prefix (push the adapter first)")
        return sorted(out, key=lambda e: e.rel)

    def fetch(self, uri: str, dest: Path, progress: Progress | None = None,
              entries: list[ObjectEntry] | None = None) -> dict[str, str]:
        bucket, prefix = split_s3(uri)
        hashes = {}
        buf = memoryview(bytearray(CHUNK))
        for e in entries if entries is not None else self.listing(uri):
            try:
                resp = self.client.get_object(bucket, prefix + e.rel)
                try:
                    hashes[e.rel], got = _write_hashed(dest, e.rel, _body_chunks(resp, buf), progress, e.size)
                    if got != e.size:
                        raise StorageError(f"{uri}: {e.rel}: got {got} bytes, the listing said {e.size} "
                                           f"(the object changed while it was read?)")
                finally:
                    resp.close()
                    resp.release_conn()
            except (Refused, StorageError, OSError) as err:
                if isinstance(err, (Refused, StorageError)):
                    raise
                if isinstance(err, FileExistsError):
                    raise Refused(f"{uri}: object {e.rel!r} listed twice", "path") from None
                raise StorageError(f"{uri}: {e.rel}: {type(err).__name__}: {err}") from None
            except Exception as err:  # urllib3 protocol errors, S3Error: transient
                raise StorageError(f"{uri}: {e.rel}: {type(err).__name__}: {err}") from None
        return hashes


def _body_chunks(resp, buf: memoryview):
    """The response body as views of ``buf`` (valid until the next one).

    Reading straight into one buffer saves a copy and an allocation per MiB over ``resp.stream()``
    (urllib3 reads into a fresh bytearray, then copies it to bytes): +10% MB/s on a 256 MiB object
    in a probe where the client's CPU is the limit. urllib3 keeps the http.client response as
    ``_fp``; where it is not there, or the body is encoded or chunked, ``stream()`` is used. A body cut
    short raises http.client.IncompleteRead, and the caller compares the count with the listing."""
    fp = getattr(resp, "_fp", None)
    if (fp is None or not hasattr(fp, "readinto") or getattr(resp, "chunked", False)
            or resp.headers.get("content-encoding", "identity") != "identity"):
        yield from resp.stream(CHUNK)
        return
    while n := fp.readinto(buf):
        yield buf[:n]


class FileStorage:
    """``file:///path``: a folder on a volume (tests, air-gapped clusters)."""

    @staticmethod
    def _root(uri: str) -> Path:
        u = urlparse(uri)
        if u.scheme != "file" or u.netloc not in ("", "localhost"):
            raise Refused(f"{uri!r}: expected file:///absolute/path", "source")
        return Path(u.path)

    def listing(self, uri: str) -> list[ObjectEntry]:
        root = self._root(uri)
        if not root.is_dir():
            raise StorageError(f"{uri}: no such directory")
        out = []
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if full.is_symlink():
                    raise Refused(f"{rel}: symlinks are refused (could point outside the adapter)", "path")
                if name in filenames:
                    if not full.is_file():
                        raise Refused(f"{rel}: not a regular file", "path")
                    out.append(ObjectEntry(rel, full.stat().st_size))
        return sorted(out, key=lambda e: e.rel)

    def fetch(self, uri: str, dest: Path, progress: Progress | None = None,
              entries: list[ObjectEntry] | None = None) -> dict[str, str]:
        root = self._root(uri)
        hashes = {}
        for e in entries if entries is not None else self.listing(uri):
            src = root / e.rel
            if src.is_symlink():
                raise Refused(f"{e.rel}: symlinks are refused", "path")
            with open(src, "rb") as f:
                hashes[e.rel], _ = _write_hashed(dest, e.rel, iter(lambda: f.read(CHUNK), b""), progress,
                                                 e.size)
        return hashes


class HubStorage:
    def listing(self, uri: str) -> list[ObjectEntry]:
        raise Refused(f"{uri}: hf:// sources are not supported (the sidecar never downloads from a hub); "
                      f"mirror the files to s3:// (lorafleet push) and use that URI", "source")

    fetch = listing  # type: ignore[assignment]


class Storages:
    """Picks the storage for a URI's scheme."""

    def __init__(self, s3: S3Storage | None = None):
        self.s3 = s3
        self.file = FileStorage()
        self.hub = HubStorage()

    def for_uri(self, uri: str) -> Storage:
        scheme = urlparse(uri).scheme
        if scheme == "s3":
            if self.s3 is None:
                raise StorageError(f"{uri}: no S3 endpoint configured (set S3_ENDPOINT)")
            return self.s3
        if scheme == "file":
            return self.file
        if scheme == "hf":
            return self.hub
        raise Refused(f"{uri!r}: unsupported scheme (use s3://, file://)", "source")


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)

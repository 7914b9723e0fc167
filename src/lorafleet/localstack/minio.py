"""A real MinIO server on loopback, with its own data folder and credentials."""

from __future__ import annotations

import secrets
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .procs import ManagedProcess, free_port
from .tools import require_tool


@dataclass
class MinioServer:
    workdir: Path
    access_key: str = field(default_factory=lambda: "lf" + secrets.token_hex(8))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    port: int = 0
    proc: ManagedProcess | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The variables S3 clients (and ``lorafleet push``) read."""
        return {"S3_ENDPOINT": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def start(self, timeout: float = 60) -> "MinioServer":
        minio = require_tool("minio")
        self.workdir = Path(self.workdir)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        console = free_port()
        self.proc = ManagedProcess(
            "minio",
            [str(minio), "server", str(self.workdir / "data"), "--address", f"127.0.0.1:{self.port}",
             "--console-address", f"127.0.0.1:{console}", "--quiet"],
            self.workdir / "minio.log",
            env={"MINIO_ROOT_USER": self.access_key, "MINIO_ROOT_PASSWORD": self.secret_key,
                 "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_CI_CD": "1"},
        )
        self.proc.wait_until(self.ready, timeout, "ready")
        return self

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.endpoint}/minio/health/ready", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc:
            self.proc.kill()

    def restart(self, timeout: float = 60) -> "MinioServer":
        """Start again on the same port, data and credentials (after ``kill`` or ``stop``)."""
        return self.start(timeout)

"""Faults of the API server as a client meets them: a TCP relay whose connections can be cut and
refused for a while, and etcd compacted so that every older resourceVersion is gone (410 Gone)."""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path


class CuttableProxy:
    """A TCP relay in front of the API server (TLS passes through untouched) whose connections can be
    cut and refused for a while: how a watch stream breaks in a real network."""

    def __init__(self, upstream_port: int):
        import socket
        import threading

        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.cut_off = False
        self.accepted = 0
        self._lock = threading.Lock()
        self._open: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def kubeconfig(self, admin_kubeconfig: Path, path: Path) -> Path:
        import yaml

        cfg = yaml.safe_load(admin_kubeconfig.read_text())
        cfg["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def cut(self) -> None:
        """Close every relayed connection and refuse new ones until ``restore``."""
        with self._lock:
            self.cut_off = True
            conns, self._open = self._open, []
        for c in conns:
            self._close(c)

    def restore(self) -> None:
        with self._lock:
            self.cut_off = False

    @staticmethod
    def _close(sock) -> None:
        import socket

        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self.cut_off
            if refused:
                self._close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                self._close(client)
                continue
            with self._lock:
                self._open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src)
            self._close(dst)

    def close(self) -> None:
        self.cut()
        self.listener.close()


def compact_etcd(cp) -> int:
    """Compact etcd to its current revision: every older resourceVersion is gone (410 on a watch)."""
    def post(path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{cp.etcd_port}{path}", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    revision = int(post("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})["header"]["revision"])
    post("/v3/kv/compaction", {"revision": revision, "physical": True})
    return revision


def list_requests(cp) -> dict[str, int]:
    """LIST requests the API server of ``cp`` has answered so far, by resource (its /metrics)."""
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{") and 'verb="LIST"' in line:
            resource = line.split('resource="', 1)[1].split('"', 1)[0]
            out[resource] = out.get(resource, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out

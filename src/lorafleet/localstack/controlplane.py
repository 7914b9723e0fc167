"""A real Kubernetes control plane on loopback: etcd, kube-apiserver (RBAC on, TLS with a CA made
here, an admin token) and kube-controller-manager (garbage collector, namespaces, Deployments,
ReplicaSets, service accounts). There is no kubelet: pods stay unscheduled unless a pod runner
(``lorafleet.localstack.podrunner``) plays the node.
"""

from __future__ import annotations

import json
import secrets
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .procs import ManagedProcess, free_port
from .tools import require_tool

SERVICE_CIDR = "10.96.0.0/16"


class KubectlFailed(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """CA, serving certificate for 127.0.0.1/localhost, service-account signing key."""
    d.mkdir(parents=True, exist_ok=True)
    if (d / "apiserver.crt").exists():
        return
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=lorafleet-local-ca", cwd=d)
    (d / "san.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,IP:10.96.0.1\nextendedKeyUsage=serverAuth\n"
    )
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=d)
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


@dataclass
class ControlPlane:
    workdir: Path
    admin_token: str = field(default_factory=lambda: secrets.token_hex(24))
    etcd_port: int = 0
    api_port: int = 0
    procs: list[ManagedProcess] = field(default_factory=list)
    apiserver_args: list[str] = field(default_factory=list)  # extra kube-apiserver flags (tests)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return Path(self.workdir) / "kubeconfig"

    @property
    def pki(self) -> Path:
        return Path(self.workdir) / "pki"

    def start(self, timeout: float = 120, controller_manager: bool = True) -> "ControlPlane":
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        self.etcd_port = self.etcd_port or free_port()
        self.api_port = self.api_port or free_port()
        self._start_etcd(timeout)
        self._start_apiserver(timeout)
        self._write_kubeconfig()
        if controller_manager:
            self._start_controller_manager(timeout)
        return self

    def _start_etcd(self, timeout: float) -> None:
        peer = free_port()
        etcd = ManagedProcess("etcd", [
            str(require_tool("etcd")), "--name", "lorafleet", "--data-dir", str(self.workdir / "etcd"),
            "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"lorafleet=http://127.0.0.1:{peer}",
            "--unsafe-no-fsync", "--log-level", "warn", "--quota-backend-bytes", str(4 << 30),
        ], self.workdir / "etcd.log")
        self.procs.append(etcd)

        def healthy() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.etcd_port}/health", timeout=2) as r:
                return json.load(r).get("health") == "true"

        etcd.wait_until(healthy, timeout, "healthy")

    def _start_apiserver(self, timeout: float) -> None:
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{self.admin_token},lorafleet-admin,lorafleet-admin,"system:masters"\n')
        api = ManagedProcess("kube-apiserver", [
            str(require_tool("kube-apiserver")),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={self.api_port}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}", f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
            f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--endpoint-reconciler-type=none", "--enable-priority-and-fairness=false", "--v=1",
            *self.apiserver_args,
        ], self.workdir / "kube-apiserver.log")
        self.procs.append(api)
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))

        def ready() -> bool:
            req = urllib.request.Request(f"{self.url}/readyz", headers={"Authorization": f"Bearer {self.admin_token}"})
            with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                return r.status == 200

        api.wait_until(ready, timeout, "ready")

    def _start_controller_manager(self, timeout: float) -> None:
        kcm = ManagedProcess("kube-controller-manager", [
            str(require_tool("kube-controller-manager")),
            f"--kubeconfig={self.kubeconfig}", f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            "--controllers=garbagecollector,namespace,deployment,replicaset,serviceaccount,serviceaccount-token,"
            "root-ca-cert-publisher",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--concurrent-gc-syncs=5", "--v=1",
        ], self.workdir / "kube-controller-manager.log")
        self.procs.append(kcm)
        # It has no readiness endpoint we can reach without more certificates; being alive a moment
        # after start means its flags were accepted.
        time.sleep(0.5)
        kcm.wait_until(lambda: True, timeout, "started")

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "lorafleet",
            "clusters": [{"name": "lorafleet", "cluster": {
                "server": self.url, "certificate-authority": str(self.pki / "ca.crt")}}],
            "users": [{"name": "admin", "user": {"token": self.admin_token}}],
            "contexts": [{"name": "lorafleet", "context": {"cluster": "lorafleet", "user": "admin",
                                                           "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))

    def kubeconfig_for_token(self, token: str, path: Path, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with ``token`` (e.g. a service account's), same server."""
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cfg["users"] = [{"name": "user", "user": {"token": token}}]
        cfg["contexts"][0]["context"].update(user="user", namespace=namespace)
        path.write_text(yaml.safe_dump(cfg))
        return path

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run the real kubectl against this control plane; with ``check``, a failure raises with its stderr."""
        r = subprocess.run([str(require_tool("kubectl")), f"--kubeconfig={self.kubeconfig}", *args],
                           input=input, capture_output=True, text=True)
        if check and r.returncode != 0:
            raise KubectlFailed(f"kubectl {' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()

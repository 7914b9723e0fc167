"""The local stack's stand-in for kubelet: runs lorafleet pool pods' containers as local processes.

It watches the Pods that the real kube-controller-manager creates from the operator's Deployments,
binds them to a pretend node, starts each container's command with the environment its template
gives (downward API, Secret and ConfigMap references resolved, a ServiceAccount token as
KUBECONFIG), probes readiness and writes Pod status back, restarts containers that exit, and ends
processes of deleted pods. Local processes share one network namespace, so the container ports of
each pod are mapped to free ports; the map is written to the pod's `lorafleet.io/local-ports`
annotation for the local ingress. Everything else a real node does is out of scope.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.authentication_v1 import BoundObjectReference, TokenRequestSpec
from lightkube.models.core_v1 import Binding, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, ServiceAccount
from lightkube.types import PatchType

from .procs import ManagedProcess, free_port

log = logging.getLogger("lorafleet.podrunner")

NODE_NAME = "lorafleet-local"
LOCAL_PORTS_ANNOTATION = "lorafleet.io/local-ports"
DEFAULT_SELECTOR = {"app.kubernetes.io/name": "lorafleet"}
# Ports every pool pod uses even where no container declares them (admin API, metrics). A container's
# securityContext (non-root, read-only root, no capabilities) is not enforced: the processes run as the
# runner's user, writing only under the pod's own folder.
IMPLICIT_PORTS = (8000, 8001, 9090, 9100)


def warm_decoders(*resources) -> None:
    """Build lightkube's msgspec decoders for ``resources`` now, in this thread.

    msgspec builds a type's decoder on its first use; two threads doing that for the same type at the
    same moment crashed the process (segfault, lightkube 1.0 with msgspec 0.22). Call this before
    starting threads that share those types."""
    from lightkube.core.decoders import decode_list

    for res in resources:
        decode_list(b'{"items": []}', res)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    name: str
    spec: object
    sidecar: bool  # native sidecar: an init container with restartPolicy Always
    proc: ManagedProcess | None = None
    restarts: int = 0
    next_start: float = 0.0
    ready: bool = False
    probe_failures: int = 0
    probe_successes: int = 0
    next_probe: float = 0.0
    started_at: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class LocalPod:
    namespace: str
    name: str
    uid: str
    root: Path
    ports: dict[int, int]
    containers: list[Container] = field(default_factory=list)
    last_status: str = ""
    stop_at: float | None = None  # being deleted: when its preStop sleep is over and SIGTERM goes out

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodRunner:
    def __init__(self, kubeconfig: Path, workdir: Path, selector: dict[str, str] | None = None,
                 executable_dir: Path | None = None, extra_env: dict[str, str] | None = None,
                 image_bins: dict[str, Path] | None = None):
        self.kubeconfig = Path(kubeconfig)
        self.client = Client(config=KubeConfig.from_file(str(kubeconfig)), field_manager="lorafleet-podrunner")
        self.workdir = Path(workdir)
        self.selector = selector or DEFAULT_SELECTOR
        self.bin = Path(executable_dir or Path(sys.executable).parent)
        # Image repository -> the folder its commands come from (a virtualenv's bin): what stands in for
        # that image here, e.g. lorafleet/runtime-vllm -> the vLLM virtualenv. Other images: ``bin``.
        self.image_bins = {repo: Path(d) for repo, d in (image_bins or {}).items()}
        self.extra_env = extra_env or {}
        self.pods: dict[str, LocalPod] = {}
        self._stop = threading.Event()
        warm_decoders(Pod, Secret, ConfigMap, ServiceAccount, Pod.Status, Pod.Binding, ServiceAccount.Token)

    # ------------------------------------------------------------------------------ main loop

    def run(self, interval: float = 0.25) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception:  # keep the node alive through API hiccups
                log.exception("pod runner sync failed")
            self._stop.wait(interval)
        self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        for pod in list(self.pods.values()):
            self._stop_pod(pod)
        self.pods.clear()

    def sync_once(self) -> None:
        seen = set()
        for pod in self.client.list(Pod, namespace="*", labels=self.selector):
            key = f"{pod.metadata.namespace}/{pod.metadata.name}"
            seen.add(key)
            local = self.pods.get(key)
            if pod.metadata.deletionTimestamp:
                # As kubelet: the preStop hooks first (a sleep: the pod keeps answering while
                # endpoints and ingresses drop it), then SIGTERM, then the pod object goes.
                if local:
                    if local.stop_at is None:
                        local.stop_at = time.monotonic() + prestop_sleep(pod)
                    if time.monotonic() < local.stop_at:
                        continue
                    self._stop_pod(local)
                    del self.pods[key]
                self._finalize_delete(pod)
                continue
            if local is None or local.uid != pod.metadata.uid:
                try:
                    local = self._start_pod(pod)
                except Exception as e:  # bad template: say so on the pod, like kubelet's events
                    log.exception("cannot start %s", key)
                    self._patch_status(pod.metadata.namespace, pod.metadata.name, {
                        "phase": "Pending", "message": f"local pod runner cannot start the pod: {e}",
                        "reason": "LocalStartFailed"})
                    continue
                self.pods[key] = local
            self._tend(local)
        for key in set(self.pods) - seen:  # deleted outright (grace period 0)
            self._stop_pod(self.pods.pop(key))

    # ------------------------------------------------------------------------------- starting

    def _start_pod(self, pod: Pod) -> LocalPod:
        ns, name = pod.metadata.namespace, pod.metadata.name
        root = self.workdir / ns / name
        if root.exists():
            shutil.rmtree(root)
        (root / "volumes").mkdir(parents=True)
        ports = {p: free_port() for p in self._declared_ports(pod)}
        local = LocalPod(ns, name, pod.metadata.uid, root, ports)
        if not pod.spec.nodeName:
            self.client.create(Pod.Binding(metadata=ObjectMeta(name=name, namespace=ns),
                                           target=ObjectReference(kind="Node", name=NODE_NAME)), name, namespace=ns)
        self.client.patch(Pod, name, {"metadata": {"annotations": {LOCAL_PORTS_ANNOTATION: json.dumps(
            {str(k): v for k, v in ports.items()})}}}, namespace=ns, patch_type=PatchType.MERGE)
        kubeconfig = self._service_account_kubeconfig(pod, root)
        for c in pod.spec.initContainers or []:
            if c.restartPolicy != "Always":
                raise ValueError(f"init container {c.name}: only native sidecars (restartPolicy: Always) are supported")
            local.containers.append(Container(c.name, c, sidecar=True))
        for c in pod.spec.containers:
            local.containers.append(Container(c.name, c, sidecar=False))
        env_base = {"KUBECONFIG": str(kubeconfig)} if kubeconfig else {}
        for c in local.containers:
            c.env = {**self.extra_env, **env_base, **self._container_env(pod, c.spec, local)}
        log.info("starting pod %s (ports %s)", local.key, ports)
        return local

    def _declared_ports(self, pod: Pod) -> list[int]:
        ports = set(IMPLICIT_PORTS)
        for c in list(pod.spec.initContainers or []) + list(pod.spec.containers):
            for p in c.ports or []:
                ports.add(p.containerPort)
        return sorted(ports)

    def _service_account_kubeconfig(self, pod: Pod, root: Path) -> Path | None:
        sa = pod.spec.serviceAccountName
        if not sa or sa == "default":
            return None
        # Bound to the pod, as the kubelet's projected tokens are: the API server then knows which pod
        # calls (the chart's pool-sidecar policy lets a sidecar patch only its own pod).
        bound = BoundObjectReference(apiVersion="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid)
        tr = self.client.create(ServiceAccount.Token(metadata=ObjectMeta(name=sa, namespace=pod.metadata.namespace),
                                                     spec=TokenRequestSpec(audiences=[], expirationSeconds=24 * 3600,
                                                                           boundObjectRef=bound)),
                                sa, namespace=pod.metadata.namespace)
        cfg = yaml.safe_load(self.kubeconfig.read_text())
        cfg["users"] = [{"name": sa, "user": {"token": tr.status.token}}]
        for ctx in cfg["contexts"]:
            ctx["context"].update(user=sa, namespace=pod.metadata.namespace)
        path = root / "kubeconfig"
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def _container_env(self, pod: Pod, c, local: LocalPod) -> dict[str, str]:
        env: dict[str, str] = {}
        for ef in c.envFrom or []:
            if ef.secretRef:
                env.update(self._secret(pod.metadata.namespace, ef.secretRef.name))
            if ef.configMapRef:
                env.update(self._configmap(pod.metadata.namespace, ef.configMapRef.name))
        for e in c.env or []:
            if e.value is not None:
                env[e.name] = e.value
            elif e.valueFrom and e.valueFrom.fieldRef:
                env[e.name] = {
                    "metadata.name": pod.metadata.name, "metadata.namespace": pod.metadata.namespace,
                    "metadata.uid": pod.metadata.uid, "spec.serviceAccountName": pod.spec.serviceAccountName or "",
                    "spec.nodeName": NODE_NAME, "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1",
                }.get(e.valueFrom.fieldRef.fieldPath, "")
            elif e.valueFrom and e.valueFrom.secretKeyRef:
                ref = e.valueFrom.secretKeyRef
                env[e.name] = self._secret(pod.metadata.namespace, ref.name)[ref.key]
            elif e.valueFrom and e.valueFrom.configMapKeyRef:
                ref = e.valueFrom.configMapKeyRef
                env[e.name] = self._configmap(pod.metadata.namespace, ref.name)[ref.key]
        return {k: self._localize(v, c, local) for k, v in env.items()}

    def _secret(self, ns: str, name: str) -> dict[str, str]:
        s = self.client.get(Secret, name, namespace=ns)
        out = {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}
        out.update(s.stringData or {})
        return out

    def _configmap(self, ns: str, name: str) -> dict[str, str]:
        return dict(self.client.get(ConfigMap, name, namespace=ns).data or {})

    def _localize(self, value: str, c, local: LocalPod) -> str:
        """Container paths -> the pod's local volume folders; container ports -> mapped local ports."""
        # The one mount the path lies in (the longest mount path that contains it), rewritten once: a
        # path already rewritten lies under this runner's folder, which another mount (a pod's /tmp,
        # with the folder under /tmp) would match again.
        mounts = [m for m in c.volumeMounts or []
                  if value == m.mountPath or value.startswith(m.mountPath.rstrip("/") + "/")]
        if mounts:
            m = max(mounts, key=lambda m: len(m.mountPath.rstrip("/")))
            value = str(local.root / "volumes" / m.name) + value[len(m.mountPath.rstrip("/")):]
        value = re.sub(r"(127\.0\.0\.1|localhost|0\.0\.0\.0):(\d+)",
                       lambda mm: f"{mm.group(1)}:{local.ports.get(int(mm.group(2)), int(mm.group(2)))}", value)
        if value.isdigit() and int(value) in local.ports:
            value = str(local.ports[int(value)])
        return value

    def _argv(self, c, local: LocalPod) -> list[str]:
        argv = [self._localize(a, c, local) for a in list(c.command or []) + list(c.args or [])]
        if not argv:
            raise ValueError(f"container {c.name}: no command (images' entrypoints are not known locally)")
        bin_dir = self.bin_for(c.image)
        exe = bin_dir / argv[0]
        if exe.exists():
            argv[0] = str(exe)
        elif not shutil.which(argv[0]):
            raise ValueError(f"container {c.name}: command {argv[0]!r} not found in {bin_dir} or on PATH")
        return argv

    def bin_for(self, image: str | None) -> Path:
        """The folder a container's command comes from: its image repository's (``image_bins``), else ``bin``."""
        repo = (image or "").rsplit("@", 1)[0]
        if ":" in repo.rsplit("/", 1)[-1]:
            repo = repo.rsplit(":", 1)[0]
        return self.image_bins.get(repo, self.bin)

    # ------------------------------------------------------------------------------- tending

    def _tend(self, local: LocalPod) -> None:
        now = time.monotonic()
        for c in local.containers:
            for m in c.spec.volumeMounts or []:
                (local.root / "volumes" / m.name).mkdir(parents=True, exist_ok=True)
            if c.proc is not None and not c.proc.alive():
                log.warning("%s container %s exited with %s; restarting", local.key, c.name, c.proc.proc.returncode)
                c.proc.stop()
                c.proc, c.ready = None, False
                c.restarts += 1
                c.next_start = now + min(10.0, 0.5 * 2 ** min(c.restarts, 5))
            if c.proc is None and now >= c.next_start:
                c.proc = ManagedProcess(f"{local.key}/{c.name}", self._argv(c.spec, local),
                                        local.root / "logs" / f"{c.name}.log", env=c.env)
                c.started_at = _now()
            self._update_readiness(c, local, now)
        self._report(local)

    def _update_readiness(self, c: Container, local: LocalPod, now: float) -> None:
        """Readiness as kubelet decides it: failureThreshold consecutive failures make a ready container
        unready, successThreshold successes make it ready. Probes run every periodSeconds, capped at 1 s
        so that local pods come up quickly."""
        if c.proc is None or not c.proc.alive():
            c.ready, c.probe_failures, c.probe_successes = False, 0, 0
            return
        probe = c.spec.readinessProbe
        if probe is None:
            c.ready = True
            return
        if now < c.next_probe:
            return
        c.next_probe = now + min(float(probe.periodSeconds or 10), 1.0)
        if self._probe(c.spec, local, timeout=float(probe.timeoutSeconds or 1)):
            c.probe_failures, c.probe_successes = 0, c.probe_successes + 1
            if c.probe_successes >= (probe.successThreshold or 1):
                c.ready = True
        else:
            c.probe_successes, c.probe_failures = 0, c.probe_failures + 1
            if not c.ready or c.probe_failures >= (probe.failureThreshold or 3):
                c.ready = False

    def _probe(self, c, local: LocalPod, timeout: float = 1.0) -> bool:
        probe = c.readinessProbe
        if probe is None or probe.httpGet is None:
            return True
        port = probe.httpGet.port
        if isinstance(port, str) and not port.isdigit():
            port = next(p.containerPort for p in c.ports or [] if p.name == port)
        url = f"http://127.0.0.1:{local.ports.get(int(port), int(port))}{probe.httpGet.path or '/'}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return 200 <= r.status < 400
        except Exception:
            return False

    def _report(self, local: LocalPod) -> None:
        main = [c for c in local.containers if not c.sidecar]
        ready = all(c.ready for c in local.containers)
        started = _now()

        def cstatus(c: Container) -> dict:
            state = {"running": {"startedAt": c.started_at}} if c.proc and c.proc.alive() else \
                {"waiting": {"reason": "ContainerCreating" if not c.restarts else "CrashLoopBackOff"}}
            return {"name": c.name, "ready": c.ready, "restartCount": c.restarts, "image": c.spec.image or "",
                    "imageID": "", "started": bool(c.proc and c.proc.alive()), "state": state}

        def cond(t: str, ok: bool) -> dict:
            return {"type": t, "status": "True" if ok else "False"}

        status = {
            "phase": "Running", "reason": None, "message": None, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": [cond("PodScheduled", True), cond("Initialized", True),
                           cond("ContainersReady", all(c.ready for c in main)), cond("Ready", ready)],
            "containerStatuses": [cstatus(c) for c in main],
            "initContainerStatuses": [cstatus(c) for c in local.containers if c.sidecar],
        }
        text = json.dumps(status, sort_keys=True)
        if text != local.last_status:
            status["startTime"] = started
            for cnd in status["conditions"]:
                cnd["lastTransitionTime"] = started
            if self._patch_status(local.namespace, local.name, status):
                local.last_status = text

    def _patch_status(self, ns: str, name: str, status: dict) -> bool:
        try:
            self.client.patch(Pod.Status, name, {"status": status}, namespace=ns, patch_type=PatchType.MERGE)
            return True
        except ApiError as e:
            if e.status.code != 404:
                raise
            return False

    # ------------------------------------------------------------------------------- stopping

    def _stop_pod(self, local: LocalPod) -> None:
        log.info("stopping pod %s", local.key)
        for c in reversed(local.containers):  # main containers first, sidecars last (as kubelet)
            if c.proc:
                c.proc.stop()
                c.proc = None

    def _finalize_delete(self, pod: Pod) -> None:
        try:
            self.client.delete(Pod, pod.metadata.name, namespace=pod.metadata.namespace, grace_period=0)
        except ApiError as e:
            if e.status.code != 404:
                raise

    def logs_of(self, namespace: str, name: str, container: str) -> Path:
        return self.workdir / namespace / name / "logs" / f"{container}.log"


def prestop_sleep(pod: Pod) -> float:
    """Seconds of the pod's ``lifecycle.preStop.sleep`` hooks (the longest; the containers' hooks run
    at once), within its termination grace period. Other hook kinds are not run here."""
    longest = 0.0
    for c in list(pod.spec.initContainers or []) + list(pod.spec.containers or []):
        hook = c.lifecycle.preStop if c.lifecycle is not None else None
        if hook is not None and hook.sleep is not None:
            longest = max(longest, float(hook.sleep.seconds))
    grace = pod.spec.terminationGracePeriodSeconds
    return min(longest, float(grace)) if grace is not None else longest


def parse_image_bins(items: list[str], error) -> dict[str, Path]:
    """``REPOSITORY=DIR`` items as a map; ``error`` is called naming a bad one (argparse's ``error``)."""
    out = {}
    for item in items:
        repo, sep, d = item.partition("=")
        if not sep or not repo or not d or not Path(d).is_dir():
            error(f"--image-bin {item!r}: expected REPOSITORY=DIR with DIR an existing folder, "
                  "e.g. lorafleet/runtime-vllm=/path/to/venv/bin")
        out[repo] = Path(d)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m lorafleet.localstack.podrunner", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), required=not os.environ.get("KUBECONFIG"))
    p.add_argument("--workdir", required=True)
    p.add_argument("--image-bin", action="append", default=[], metavar="REPOSITORY=DIR",
                   help="run the commands of containers of this image repository from DIR (repeatable), e.g. "
                        "lorafleet/runtime-vllm=$(tools/venv-vllm)/bin")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    runner = PodRunner(Path(args.kubeconfig), Path(args.workdir), image_bins=parse_image_bins(args.image_bin, p.error))
    import signal

    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

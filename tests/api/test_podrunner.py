"""The local stack's kubelet stand-in runs Deployment pods as processes against the real control plane:
the controller manager creates the pods, the runner starts them with the environment the template
gives, readiness flows back into Pod and Deployment status, and deleted pods' processes end."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request

import pytest
from lightkube.models.apps_v1 import DeploymentSpec
from lightkube.models.core_v1 import (
    Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSpec, PodTemplateSpec,
    Probe, SecretKeySelector, VolumeMount, Volume, EmptyDirVolumeSource,
)
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import Pod, Secret

from lorafleet.localstack.podrunner import LOCAL_PORTS_ANNOTATION, PodRunner
from lorafleet.localstack.procs import wait_for

# A container that serves its own environment as JSON on port 8000, and writes into its volume.
SERVER = """
import http.server, json, os, pathlib
pathlib.Path(os.environ["DATA"]).mkdir(parents=True, exist_ok=True)
pathlib.Path(os.environ["DATA"], "hello").write_text("hi")
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(dict(os.environ)).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"""


@pytest.fixture
def runner(control_plane, tmp_path):
    r = PodRunner(control_plane.kubeconfig, tmp_path / "node", selector={"app": "echo"})
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    yield r
    r.stop()
    t.join(20)


def deployment(namespace: str, replicas: int) -> Deployment:
    labels = {"app": "echo"}
    c = Container(
        name="echo", image="local/echo", command=[sys.executable, "-c", SERVER],
        ports=[ContainerPort(containerPort=8000, name="http")],
        env=[EnvVar(name="PORT", value="8000"),
             EnvVar(name="POD_NAME", valueFrom=EnvVarSource(fieldRef=ObjectFieldSelector(fieldPath="metadata.name"))),
             EnvVar(name="TOKEN", valueFrom=EnvVarSource(secretKeyRef=SecretKeySelector(name="creds", key="token"))),
             EnvVar(name="DATA", value="/data/sub")],
        volumeMounts=[VolumeMount(name="cache", mountPath="/data")],
        readinessProbe=Probe(httpGet=HTTPGetAction(path="/", port="http"), periodSeconds=1),
    )
    return Deployment(
        metadata=ObjectMeta(name="echo", namespace=namespace),
        spec=DeploymentSpec(replicas=replicas, selector=LabelSelector(matchLabels=labels),
                            template=PodTemplateSpec(metadata=ObjectMeta(labels=labels),
                                                     spec=PodSpec(containers=[c], volumes=[
                                                         Volume(name="cache", emptyDir=EmptyDirVolumeSource())]))))


def test_deployment_pods_run_as_processes_and_report_ready(kube, namespace, runner):
    kube.create(Secret(metadata=ObjectMeta(name="creds", namespace=namespace), stringData={"token": "s3cret"}))
    kube.create(deployment(namespace, 2))
    wait_for(lambda: (kube.get(Deployment, "echo", namespace=namespace).status.readyReplicas or 0) == 2,
             timeout=60, what="2 ready replicas")
    pods = list(kube.list(Pod, namespace=namespace, labels={"app": "echo"}))
    assert len(pods) == 2
    seen_ports = set()
    for pod in pods:
        assert pod.spec.nodeName == "lorafleet-local"
        port = json.loads(pod.metadata.annotations[LOCAL_PORTS_ANNOTATION])["8000"]
        seen_ports.add(port)
        env = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5))
        assert env["POD_NAME"] == pod.metadata.name  # downward API
        assert env["TOKEN"] == "s3cret"  # secretKeyRef
        assert env["PORT"] == str(port)  # container port mapped to a free local port
        assert (runner.workdir / namespace / pod.metadata.name / "volumes" / "cache" / "sub" / "hello").read_text() == "hi"
    assert len(seen_ports) == 2

    # Scale to zero: the controller deletes the pods, the runner ends their processes.
    kube.patch(Deployment, "echo", {"spec": {"replicas": 0}}, namespace=namespace)
    wait_for(lambda: not list(kube.list(Pod, namespace=namespace, labels={"app": "echo"})), timeout=60,
             what="pods to be gone")
    for port in seen_ports:
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)


def test_a_crashing_container_is_restarted_and_counted(kube, namespace, runner):
    kube.create(Secret(metadata=ObjectMeta(name="creds", namespace=namespace), stringData={"token": "x"}))
    d = deployment(namespace, 1)
    d.spec.template.spec.containers[0].command = [sys.executable, "-c", "import sys; sys.exit(3)"]
    kube.create(d)

    def restarted():
        pods = list(kube.list(Pod, namespace=namespace, labels={"app": "echo"}))
        statuses = pods[0].status.containerStatuses if pods and pods[0].status else None
        return statuses and statuses[0].restartCount >= 2 and not statuses[0].ready

    wait_for(restarted, timeout=60, what="restartCount >= 2")


def test_local_ingress_routes_by_ingress_objects_to_ready_pods(kube, namespace, runner):
    import asyncio

    from lightkube import Client, KubeConfig
    from lightkube.models.core_v1 import ServicePort, ServiceSpec
    from lightkube.models.networking_v1 import (
        HTTPIngressPath, HTTPIngressRuleValue, IngressBackend, IngressRule, IngressServiceBackend, IngressSpec,
        ServiceBackendPort,
    )
    from lightkube.resources.core_v1 import Service
    from lightkube.resources.networking_v1 import Ingress

    from lorafleet.localstack.ingress import LocalIngress
    from lorafleet.localstack.procs import free_port

    kube.create(Secret(metadata=ObjectMeta(name="creds", namespace=namespace), stringData={"token": "t"}))
    kube.create(deployment(namespace, 2))
    kube.create(Service(metadata=ObjectMeta(name="echo", namespace=namespace), spec=ServiceSpec(
        selector={"app": "echo"}, ports=[ServicePort(port=80, targetPort=8000)])))
    kube.create(Ingress(metadata=ObjectMeta(name="echo", namespace=namespace), spec=IngressSpec(rules=[IngressRule(
        host="echo.example", http=HTTPIngressRuleValue(paths=[HTTPIngressPath(
            path="/", pathType="Prefix", backend=IngressBackend(service=IngressServiceBackend(
                name="echo", port=ServiceBackendPort(number=80))))]))])))
    wait_for(lambda: (kube.get(Deployment, "echo", namespace=namespace).status.readyReplicas or 0) == 2,
             timeout=60, what="2 ready replicas")

    port = free_port()

    async def scenario():
        import aiohttp

        ing = LocalIngress(Client(config=KubeConfig.from_file(str(runner.kubeconfig))), refresh=0.2)
        web_runner = await ing.serve(port)
        try:
            async with aiohttp.ClientSession() as s:
                pods = set()
                for _ in range(40):
                    async with s.get(f"http://127.0.0.1:{port}/", headers={"Host": "echo.example"}) as r:
                        if r.status == 200:
                            pods.add((await r.json(content_type=None))["POD_NAME"])
                    if len(pods) == 2:
                        break
                    await asyncio.sleep(0.1)
                async with s.get(f"http://127.0.0.1:{port}/", headers={"Host": "other.example"}) as r:
                    unknown = r.status, await r.json()
            return pods, unknown
        finally:
            await web_runner.cleanup()

    pods, unknown = asyncio.run(scenario())
    assert len(pods) == 2, pods  # both ready pods answer (round robin)
    assert unknown[0] == 404 and "no Ingress rule" in unknown[1]["error"]["message"]


def test_a_container_path_is_rewritten_by_its_one_mount(runner, tmp_path):
    """A pool pod mounts its cache and /tmp; with the runner's folder under /tmp, the cache path once
    rewritten lay under the /tmp mount too and was rewritten again (a path no other container had).
    Here the second mount is the test's own temporary folder, which holds the runner's."""
    from lightkube.models.core_v1 import Container as C

    from lorafleet.localstack.podrunner import LocalPod

    local = LocalPod("ns", "p", "uid", tmp_path / "node" / "ns" / "p", ports={8000: 31000})
    c = C(name="c", volumeMounts=[VolumeMount(name="cache", mountPath="/var/lib/lorafleet"),
                                  VolumeMount(name="scratch", mountPath=str(tmp_path)),
                                  VolumeMount(name="models", mountPath="/var/lib/lorafleet/models")])
    volumes = local.root / "volumes"
    assert runner._localize("/var/lib/lorafleet/adapters/x", c, local) == str(volumes / "cache" / "adapters" / "x")
    assert runner._localize("/var/lib/lorafleet", c, local) == str(volumes / "cache")
    assert runner._localize("/var/lib/lorafleet/models/m", c, local) == str(volumes / "models" / "m")
    assert runner._localize(f"{tmp_path}/a", c, local) == str(volumes / "scratch" / "a")
    assert runner._localize("http://127.0.0.1:8000/x", c, local) == "http://127.0.0.1:31000/x"


def test_an_images_commands_come_from_its_own_folder(kube, namespace, control_plane, tmp_path):
    """``image_bins``: a container of a mapped image repository runs its command from that folder (the local
    stack's stand-in for an image, e.g. lorafleet/runtime-vllm -> the vLLM virtualenv), any tag or digest."""
    other = tmp_path / "other-bin"
    other.mkdir()
    script = other / "echo-server"
    script.write_text(f"#!{sys.executable}\n{SERVER}")
    script.chmod(0o755)
    r = PodRunner(control_plane.kubeconfig, tmp_path / "node", selector={"app": "echo"},
                  image_bins={"local/other": other})
    assert r.bin_for("local/other:1.2") == r.bin_for("local/other@sha256:" + "0" * 64) == other
    assert r.bin_for("local/other") == other and r.bin_for("local/echo:1") == r.bin_for(None) == r.bin
    assert r.bin_for("registry:5000/local/other") == r.bin  # another repository (a registry with a port)
    t = threading.Thread(target=r.run, daemon=True)
    t.start()
    try:
        kube.create(Secret(metadata=ObjectMeta(name="creds", namespace=namespace), stringData={"token": "t"}))
        d = deployment(namespace, 1)
        c = d.spec.template.spec.containers[0]
        c.image, c.command = "local/other:1.2", ["echo-server"]  # found only in the mapped folder
        kube.create(d)
        wait_for(lambda: (kube.get(Deployment, "echo", namespace=namespace).status.readyReplicas or 0) == 1,
                 timeout=60, what="the pod of the mapped image ready")
        [pod] = kube.list(Pod, namespace=namespace, labels={"app": "echo"})
        port = json.loads(pod.metadata.annotations[LOCAL_PORTS_ANNOTATION])["8000"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert json.loads(resp.read())["TOKEN"] == "t"
    finally:
        r.stop()
        t.join(20)


def test_a_deleted_pod_keeps_serving_through_its_prestop_sleep_then_ends(kube, namespace, runner):
    """As kubelet: a pod being deleted runs its preStop sleep (it still answers while endpoints and
    ingresses drop it: it is no longer Ready for them, having a deletionTimestamp), then its processes
    get SIGTERM and the pod object goes."""
    import time

    from lightkube.models.core_v1 import Lifecycle, LifecycleHandler, SleepAction

    from lorafleet.contracts.kubeio import pod_ready

    kube.create(Secret(metadata=ObjectMeta(name="creds", namespace=namespace), stringData={"token": "t"}))
    d = deployment(namespace, 1)
    d.spec.template.spec.containers[0].lifecycle = Lifecycle(preStop=LifecycleHandler(sleep=SleepAction(seconds=3)))
    kube.create(d)
    wait_for(lambda: (kube.get(Deployment, "echo", namespace=namespace).status.readyReplicas or 0) == 1,
             timeout=60, what="1 ready replica")
    [pod] = kube.list(Pod, namespace=namespace, labels={"app": "echo"})
    port = json.loads(pod.metadata.annotations[LOCAL_PORTS_ANNOTATION])["8000"]
    kube.delete(Pod, pod.metadata.name, namespace=namespace)  # the default grace period (30 s)
    deleted = time.monotonic()
    terminating = kube.get(Pod, pod.metadata.name, namespace=namespace)
    assert terminating.metadata.deletionTimestamp and not pod_ready(terminating)
    answered_after = 0.0
    while time.monotonic() - deleted < 10:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            answered_after = time.monotonic() - deleted
        except OSError:
            break
        time.sleep(0.2)
    assert 2.0 <= answered_after < 6, answered_after  # served through the 3 s sleep, not much longer
    wait_for(lambda: not any(p.metadata.name == pod.metadata.name
                             for p in kube.list(Pod, namespace=namespace, labels={"app": "echo"})),
             timeout=30, what="the deleted pod gone")


def _service_of_local_pods(kube, namespace: str, name: str, labels: dict[str, str], pods: dict[str, int],
                           ready: list[str]) -> None:
    """A Service selecting ``labels`` and the pods ``pods`` (name -> the local port of their 8000), of
    which ``ready`` get a Ready status, as the pod runner gives them (no process behind: the caller serves
    each port)."""
    from lightkube.models.core_v1 import ServicePort, ServiceSpec
    from lightkube.resources.core_v1 import Service

    kube.create(Service(metadata=ObjectMeta(name=name, namespace=namespace), spec=ServiceSpec(
        selector=labels, ports=[ServicePort(port=80, targetPort=8000)])))
    for pod, local in pods.items():
        kube.create(Pod(metadata=ObjectMeta(name=pod, namespace=namespace, labels=labels, annotations={
            LOCAL_PORTS_ANNOTATION: json.dumps({"8000": local})}),
            spec=PodSpec(containers=[Container(name="c", image=f"local/{name}")])))
    for pod in ready:
        _set_ready(kube, namespace, pod)


def _set_ready(kube, namespace: str, pod: str) -> None:
    from lightkube.types import PatchType

    kube.patch(Pod.Status, pod, {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}},
               namespace=namespace, patch_type=PatchType.MERGE)


def test_local_ingress_sends_again_where_a_pod_dropped_a_kept_alive_connection(kube, namespace, control_plane):
    """A pod's server that closes a kept-alive connection as idle just as the ingress reuses it
    (uvicorn's keep-alive timeout against aiohttp's pool) costs the client nothing: the ingress sends
    the request again on a new connection, to the same pod, rather than answering from another pod
    (which, with placement, may not hold the adapter)."""
    import asyncio

    from lightkube import Client, KubeConfig
    from support.keepalive import DroppingServer

    from lorafleet.localstack.ingress import LocalIngress
    from lorafleet.localstack.procs import free_port

    pod_server = DroppingServer()
    _service_of_local_pods(kube, namespace, "keepalive", {"app": "keepalive"}, {"keepalive-0": pod_server.port},
                           ready=["keepalive-0"])
    port = free_port()

    async def scenario():
        import aiohttp

        ing = LocalIngress(Client(config=KubeConfig.from_file(str(control_plane.kubeconfig))),
                           default_backend=(namespace, "keepalive"), refresh=0.2)
        web_runner = await ing.serve(port)
        try:
            async with aiohttp.ClientSession() as s:
                answers = []
                for _ in range(3):
                    async with s.post(f"http://127.0.0.1:{port}/v1/classify", data=b"{}") as r:
                        answers.append((r.status, await r.text()))
            return answers
        finally:
            await web_runner.cleanup()

    try:
        answers = asyncio.run(scenario())
    finally:
        pod_server.close()
    assert answers == [(200, '{"ok": true}')] * 3, answers
    # Each reuse dropped, each sent again to the same pod.
    assert (pod_server.dropped, pod_server.served) == (2, 3), (pod_server.dropped, pod_server.served)


def test_local_ingress_looks_again_when_a_placed_adapters_holder_is_not_among_its_ready_pods(
        kube, namespace, control_plane):
    """The ingress polls the pods; a request for an adapter placed on a pod its last poll did not see
    Ready looks at the pods again first, so a holder that turned Ready since answers (not the other
    pods' 503 adapter_elsewhere until the next poll)."""
    import asyncio
    import http.server

    from lightkube import Client, KubeConfig
    from lightkube.resources.core_v1 import ConfigMap

    from lorafleet.contracts import names
    from lorafleet.contracts.routes import RouteEntry, RoutesTable, RouteVersion
    from lorafleet.localstack.ingress import LocalIngress
    from lorafleet.localstack.procs import free_port

    def server(status: int, body: bytes) -> http.server.ThreadingHTTPServer:
        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=s.serve_forever, daemon=True).start()
        return s

    other = server(503, b'{"error": {"code": "adapter_elsewhere"}}')
    holder = server(200, b'{"replica": "holder"}')
    pool = "looked"
    _service_of_local_pods(kube, namespace, "looked", {names.LABEL_POOL: pool},
                           {"looked-0": other.server_address[1], "looked-1": holder.server_address[1]},
                           ready=["looked-0"])
    table = RoutesTable(pool=pool, generation=1, placed_on=["looked-0", "looked-1"], adapters={"a": RouteEntry(
        tenant="t", versions=[RouteVersion(version="1", uri="s3://b/a/", sha256="0" * 64)], holders={"looked-1": 1})})
    kube.create(ConfigMap(metadata=ObjectMeta(name="looked-routes", namespace=namespace,
                                              labels={names.LABEL_ROUTES_FOR: pool}),
                          data={names.ROUTES_KEY: table.to_json()}))
    port = free_port()

    async def scenario():
        import aiohttp

        # Polled once an hour: only a request's own look can see the holder turn Ready.
        ing = LocalIngress(Client(config=KubeConfig.from_file(str(control_plane.kubeconfig))),
                           default_backend=(namespace, "looked"), refresh=3600)
        web_runner = await ing.serve(port)
        try:
            async with aiohttp.ClientSession() as s:
                async def ask():
                    async with s.post(f"http://127.0.0.1:{port}/v1/classify", json={"model": "a", "input": "x"}) as r:
                        return r.status, await r.json()

                before = await ask()  # the holder is not Ready: the other pod's 503
                await asyncio.to_thread(_set_ready, kube, namespace, "looked-1")
                await asyncio.sleep(0.1)
                return before, await ask()
        finally:
            await web_runner.cleanup()

    try:
        before, after = asyncio.run(scenario())
    finally:
        other.shutdown()
        holder.shutdown()
    assert before == (503, {"error": {"code": "adapter_elsewhere"}}), before
    assert after == (200, {"replica": "holder"}), after

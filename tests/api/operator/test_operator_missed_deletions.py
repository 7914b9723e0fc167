"""A pod deleted while the operator's watches were away (the stream broke, and by the time it came
back the API server had compacted past it: 410 Gone, kopf lists again and reports no deletion) is
swept by the operator's periodic full listing instead of counting as a Ready replica for ever; an owned
Deployment, Service or routes ConfigMap deleted in the same gap is made again.

The shared control plane serves watches from its watch cache, whose window is minutes long; this
module runs its own API server with the cache off, so compacting etcd expires a watch at once."""

from __future__ import annotations

from lf_operator_kit import CuttableProxy, Operator, apply, make_pod, pool_doc, wait_status
from support.apiserver_faults import compact_etcd

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for


def _exists(kube, res, name: str, namespace: str) -> bool:
    from lightkube.core.exceptions import ApiError

    try:
        kube.get(res, name, namespace=namespace)
        return True
    except ApiError as e:
        if e.status.code == 404:
            return False
        raise


def _routes(kube, namespace: str, pool: str = "p") -> list[str]:
    from lightkube.resources.core_v1 import ConfigMap

    return sorted(cm.metadata.name for cm in kube.list(ConfigMap, namespace=namespace,
                                                        labels={names.LABEL_ROUTES_FOR: pool}))


def test_a_pod_deleted_while_the_watch_was_away_is_swept(uncached_control_plane, uncached_kube, tmp_path):
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.apps_v1 import Deployment
    from lightkube.resources.core_v1 import ConfigMap, Namespace, Pod, Service, ServiceAccount

    cp, kube = uncached_control_plane, uncached_kube
    namespace = "ghosts"
    kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    # No controller manager here: the ServiceAccount admission wants for pods is made by hand.
    kube.create(ServiceAccount(metadata=ObjectMeta(name="default", namespace=namespace)))
    proxy = CuttableProxy(cp.api_port)
    op = Operator(proxy.kubeconfig(cp.kubeconfig, tmp_path / "proxied.kubeconfig"), tmp_path / "operator.log",
                  args=("--resync-interval", "2")).start()
    try:
        apply(cp, namespace, pool_doc("p", replicas=2))
        for pod in ("p-0", "p-1"):
            make_pod(kube, namespace, "p", pod, sync={"generation": 1, "loaded": 0})
        wait_status(cp, namespace, "lfpool", "p", lambda s: s.get("readyReplicas") == 2, what="2 ready replicas")

        deployment = names.deployment_name("p")
        wait_for(lambda: _exists(kube, Deployment, deployment, namespace) and _routes(kube, namespace),
                 timeout=30, what="the pool's Deployment and routes ConfigMap")
        routes = _routes(kube, namespace)

        proxy.cut()  # the operator's watches break ...
        kube.delete(Pod, "p-1", namespace=namespace, grace_period=0)
        kube.delete(Deployment, deployment, namespace=namespace)
        kube.delete(Service, names.service_name("p"), namespace=namespace)
        for cm in routes:
            kube.delete(ConfigMap, cm, namespace=namespace)
        compact_etcd(cp)  # ... and when they come back, the API server has forgotten the deletions
        proxy.restore()

        st = wait_status(cp, namespace, "lfpool", "p", lambda s: s.get("readyReplicas") == 1, timeout=60,
                         what="the deleted pod no longer counted")
        assert st["ready"] == "1/2"
        # What the operator owns and missed the deletion of is made again.
        wait_for(lambda: _exists(kube, Deployment, deployment, namespace), timeout=30,
                 what="the Deployment made again")
        wait_for(lambda: _routes(kube, namespace) == routes, timeout=30, what="the routes ConfigMaps written again")
        wait_for(lambda: _exists(kube, Service, names.service_name("p"), namespace), timeout=30,
                 what="the Service made again")
        log = op.text()
        assert f"pod {namespace}/p-1 of pool p is gone (its deletion was missed)" in log
        assert f"Deployment {namespace}/{deployment} of pool p is gone (its deletion was missed)" in log
        assert "(their deletion was missed): writing them again" in log
        assert f"Service {names.service_name('p')} of pool {namespace}/p: gone (their deletion was missed)" in log
    finally:
        op.stop()
        proxy.close()
    assert "Traceback" not in op.text(), op.text()[-5000:]


def test_events_posted_after_a_sweep(uncached_control_plane, uncached_kube, tmp_path):
    """An idle restart writes nothing, so the first status writes can be the ones a sweep causes: the
    tasks it starts post Kubernetes Events like any other (kopf's context reaches them)."""
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Event, Namespace, Pod, ServiceAccount

    from lf_operator_kit import adapter_doc, tenant_doc, wait_routes

    cp, kube = uncached_control_plane, uncached_kube
    namespace = "ghost-events"
    kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    kube.create(ServiceAccount(metadata=ObjectMeta(name="default", namespace=namespace)))
    proxy = CuttableProxy(cp.api_port)
    kubeconfig = proxy.kubeconfig(cp.kubeconfig, tmp_path / "proxied.kubeconfig")
    op = Operator(kubeconfig, tmp_path / "operator.log", args=("--resync-interval", "2")).start()

    def ready_events() -> int:
        return sum(1 for e in kube.list(Event, namespace=namespace)
                   if e.reason == "Ready" and e.involvedObject.name == "a")

    try:
        apply(cp, namespace, pool_doc("q", replicas=1))
        apply(cp, namespace, tenant_doc())
        apply(cp, namespace, adapter_doc("a", "q"))
        gen = wait_routes(kube, namespace, "q", lambda t: "a" in t.adapters, "a in the routes").generation
        make_pod(kube, namespace, "q", "q-0", sync={"generation": gen, "loaded": 1})
        wait_status(cp, namespace, "lora", "a", lambda s: s.get("phase") == "Ready", what="a Ready")
        wait_for(lambda: ready_events() == 1, timeout=30, what="a's Ready Event")
        op.stop()
        op.start()  # nothing to write: no status writer runs yet

        proxy.cut()
        kube.delete(Pod, "q-0", namespace=namespace, grace_period=0)
        compact_etcd(cp)
        proxy.restore()
        wait_status(cp, namespace, "lora", "a", lambda s: s.get("phase") == "Pending", timeout=60,
                    what="a Pending once q-0 is swept")

        make_pod(kube, namespace, "q", "q-1", sync={"generation": gen, "loaded": 1})
        wait_status(cp, namespace, "lora", "a", lambda s: s.get("phase") == "Ready", what="a Ready again")
        wait_for(lambda: ready_events() == 2, timeout=30, what="a's second Ready Event")
    finally:
        op.stop()
        proxy.close()
    assert "Traceback" not in op.text(), op.text()[-5000:]


def test_a_tenant_deleted_while_the_watch_was_away_allows_nothing(uncached_control_plane, uncached_kube, tmp_path):
    """A LoRATenant deleted in the gap would go on allowing its storage prefixes: the full listing
    sweeps it, and its adapters leave the routes."""
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.resources.core_v1 import Namespace

    from lf_operator_kit import adapter_doc, cond, tenant_doc, wait_routes

    from lorafleet.gateway.kube import LoRATenantResource

    cp, kube = uncached_control_plane, uncached_kube
    namespace = "ghost-tenant"
    kube.create(Namespace(metadata=ObjectMeta(name=namespace)))
    proxy = CuttableProxy(cp.api_port)
    op = Operator(proxy.kubeconfig(cp.kubeconfig, tmp_path / "proxied.kubeconfig"), tmp_path / "operator.log",
                  args=("--resync-interval", "2")).start()
    try:
        apply(cp, namespace, pool_doc("t", replicas=1))
        apply(cp, namespace, tenant_doc("acme"))
        apply(cp, namespace, adapter_doc("a", "t"))
        wait_routes(kube, namespace, "t", lambda t: "a" in t.adapters, "a in the routes")

        proxy.cut()
        kube.delete(LoRATenantResource, "acme", namespace=namespace)
        compact_etcd(cp)
        proxy.restore()

        wait_routes(kube, namespace, "t", lambda t: "a" not in t.adapters, "a out of the routes", timeout=60)
        st = wait_status(cp, namespace, "lora", "a", lambda s: cond(s, "Valid").get("status") == "False",
                         what="a Valid=False")
        assert cond(st, "Valid")["message"].startswith("spec.tenant: ")
        assert f"LoRATenant {namespace}/acme is gone (its deletion was missed): removed" in op.text()
    finally:
        op.stop()
        proxy.close()

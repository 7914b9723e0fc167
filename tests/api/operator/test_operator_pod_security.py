"""A pool's pods in a namespace that enforces Pod Security ``restricted``: the real API server's
PodSecurity admission admits the pods the real ReplicaSet controller creates from the operator's
Deployment, and the pool's placement fields land on them. The pool's PodDisruptionBudget is owned
and put back when edited or deleted."""

from __future__ import annotations

import json
import uuid

from lf_operator_kit import apply, get_json, pool_doc

from lorafleet.localstack.procs import wait_for


def _pods(control_plane, namespace):
    got = get_json(control_plane, namespace, "pods", "-l", "lorafleet.io/pool=p") or {}
    return got.get("items") or []


def _replica_failure(control_plane, namespace):
    for rs in (get_json(control_plane, namespace, "replicasets") or {}).get("items") or []:
        for c in rs.get("status", {}).get("conditions") or []:
            if c["type"] == "ReplicaFailure" and c["status"] == "True":
                return c.get("message")
    return None


def test_pool_pods_are_admitted_under_restricted_and_carry_the_pools_placement(control_plane, operator, namespace):
    control_plane.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted",
                          "pod-security.kubernetes.io/enforce-version=latest")
    priority = f"serving-{uuid.uuid4().hex[:8]}"
    control_plane.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": priority},
        "value": 1000}))
    try:
        apply(control_plane, namespace, pool_doc(
            "p", replicas=2,
            nodeSelector={"gpu": "h100"},
            tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            affinity={"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname", "labelSelector": {
                    "matchLabels": {"lorafleet.io/pool": "p"}}}}]}},
            imagePullSecrets=[{"name": "registry"}],
            podAnnotations={"team": "ml"},
            priorityClassName=priority,
            sidecar={"resources": {"requests": {"cpu": "50m"}},
                     "livenessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 7}}))

        def admitted():
            failure = _replica_failure(control_plane, namespace)
            assert failure is None, f"the ReplicaSet could not create the pool's pods: {failure}"
            pods = _pods(control_plane, namespace)
            return pods if len(pods) == 2 else None

        pods = wait_for(admitted, timeout=60, what="both pool pods created in the restricted namespace")
        for pod in pods:
            spec = pod["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["nodeSelector"] == {"gpu": "h100"} and spec["priorityClassName"] == priority
            assert spec["priority"] == 1000  # the Priority admission plugin resolved the class
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0][
                "weight"] == 100
            assert spec["imagePullSecrets"] == [{"name": "registry"}]
            ann = pod["metadata"]["annotations"]
            assert ann["team"] == "ml" and ann["prometheus.io/port"] == "9100"
            [sidecar] = spec["initContainers"]
            assert sidecar["resources"] == {"requests": {"cpu": "50m"}}
            assert sidecar["livenessProbe"]["tcpSocket"] == {"port": 9090}
            for c in spec["containers"] + spec["initContainers"]:
                assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, c["name"]

        # The pool's PodDisruptionBudget: owned, and put back when edited or deleted.
        def pdb():
            return get_json(control_plane, namespace, "pdb", "lorafleet-p")

        wait_for(lambda: pdb(), timeout=30, what="the pool's PodDisruptionBudget")
        assert pdb()["spec"]["maxUnavailable"] == 1
        assert pdb()["metadata"]["ownerReferences"][0]["kind"] == "BaseModelPool"
        control_plane.kubectl("patch", "pdb", "lorafleet-p", "-n", namespace, "--type=merge", "-p",
                              json.dumps({"spec": {"maxUnavailable": 2}}))
        wait_for(lambda: pdb()["spec"]["maxUnavailable"] == 1, timeout=30, what="maxUnavailable put back")
        control_plane.kubectl("delete", "pdb", "lorafleet-p", "-n", namespace)
        wait_for(lambda: pdb(), timeout=30, what="the PodDisruptionBudget made again")
        # Scaled to 1 replica: no budget (0 unavailable would block every drain).
        apply(control_plane, namespace, pool_doc("p", replicas=1))
        wait_for(lambda: pdb() is None, timeout=30, what="the PodDisruptionBudget removed at 1 replica")
    finally:
        control_plane.kubectl("delete", "priorityclass", priority, "--ignore-not-found", check=False)

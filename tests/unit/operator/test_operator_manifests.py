"""Pool manifests built from a spec, without a cluster: what the Deployment, RBAC, Service and
Ingress say, and that adapters never reach the pod template."""

from __future__ import annotations

from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.operator import manifests

SPEC = BaseModelPoolSpec.model_validate({
    "model": {"uri": "s3://models/minilm/", "sha256": "a" * 64, "task": "text-generation", "dtype": "bfloat16"},
    "replicas": 3,
    "runtime": {"image": "rt:1", "resources": {"limits": {"nvidia.com/gpu": 1}}, "maxBatchSize": 8,
                "maxQueueDelayMs": 750, "engine": "vllm"},
    "sidecar": {"image": "sc:1"},
    "cache": {"diskBytes": "1Gi", "maxAdapterBytes": "64Mi", "deviceSlots": 4},
    "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "creds"}, "region": "eu-1"},
})


def _env(c):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_deployment_has_runtime_and_native_sidecar_sharing_the_cache():
    d = manifests.deployment("gen", "ns", "uid-1", SPEC)
    assert d["metadata"]["name"] == "lorafleet-gen" and d["spec"]["replicas"] == 3
    assert d["metadata"]["ownerReferences"] == [{"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool",
                                                 "name": "gen", "uid": "uid-1", "controller": True,
                                                 "blockOwnerDeletion": True}]
    pod = d["spec"]["template"]["spec"]
    [rt], [sc] = pod["containers"], pod["initContainers"]
    assert sc["restartPolicy"] == "Always" and "restartPolicy" not in rt
    assert rt["image"] == "rt:1" and sc["image"] == "sc:1"
    assert rt["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    env, senv = _env(rt), _env(sc)
    assert env["LORAFLEET_DTYPE"] == "bfloat16" and env["LORAFLEET_MAX_BATCH_SIZE"] == "8"
    assert env["LORAFLEET_MAX_QUEUE_DELAY_MS"] == "750.0"
    assert env["LORAFLEET_ENGINE"] == "vllm"  # spec.runtime.engine: the runtime picks its engine by it
    assert env["LORAFLEET_DEVICE_SLOTS"] == "4" and env["LORAFLEET_CACHE_DIR"] == "/var/lib/lorafleet"
    assert env["LORAFLEET_SERVED_MODEL_NAME"] == "gen"  # the base model's id in /v1/models, not a digest
    assert senv["LORAFLEET_MAX_ADAPTER_BYTES"] == str(64 * 2**20) and senv["S3_REGION"] == "eu-1"
    assert senv["MODEL_URI"] == "s3://models/minilm/" and senv["MODEL_SHA256"] == "a" * 64
    assert senv["LORAFLEET_TASK"] == env["LORAFLEET_TASK"]  # the sidecar refuses adapters of another task
    assert not {k for k in env if k.startswith("AWS_")}
    assert senv["AWS_ACCESS_KEY_ID"]["secretKeyRef"] == {"name": "creds", "key": "AWS_ACCESS_KEY_ID"}
    assert pod["volumes"] == [{"name": "cache", "emptyDir": {"sizeLimit": "1Gi"}},
                              {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()


def test_no_secret_ref_means_no_credentials_in_the_pod():
    spec = SPEC.model_copy(update={"storage": SPEC.storage.model_copy(update={"secret_ref": None})})
    sc = manifests.deployment("gen", "ns", "u", spec)["spec"]["template"]["spec"]["initContainers"][0]
    assert "AWS_ACCESS_KEY_ID" not in _env(sc)


def test_sidecar_role_reads_only_its_routes_and_patches_pods():
    role = manifests.role("gen", "ns", "u", shards=2)
    cms, pods = role["rules"]
    assert cms["verbs"] == ["get", "list", "watch"] and cms["resources"] == ["configmaps"]
    assert cms["resourceNames"][0] == "lorafleet-routes-gen"
    assert {"lorafleet-routes-gen-0", "lorafleet-routes-gen-3"} <= set(cms["resourceNames"])
    assert all(n.startswith("lorafleet-routes-gen") for n in cms["resourceNames"])
    assert pods["verbs"] == ["get", "patch"] and pods["resources"] == ["pods"]


def test_ingress_only_when_asked():
    assert manifests.ingress("gen", "ns", "u", SPEC) is None
    spec = BaseModelPoolSpec.model_validate({**SPEC.wire(), "ingress": {"host": "h", "path": "/v1",
                                                                       "tls": [{"secretName": "t"}]}})
    ing = manifests.ingress("gen", "ns", "u", spec)
    assert ing["spec"]["rules"][0]["host"] == "h" and ing["spec"]["tls"] == [{"secretName": "t"}]
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["path"] == "/v1"
    assert "ingressClassName" not in ing["spec"]
    kinds = [m["kind"] for m in manifests.pool_children("gen", "ns", "u", spec)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Service", "Ingress", "PodDisruptionBudget",
                     "Deployment"]


def test_http_route_only_when_asked_to_the_gateways_named_and_the_same_backend_as_the_ingress():
    assert manifests.http_route("gen", "ns", "u", SPEC) is None
    assert ("HTTPRoute", "lorafleet-gen") in manifests.stale_children("gen", SPEC)
    spec = BaseModelPoolSpec.model_validate({**SPEC.wire(), "ingress": {"path": "/"}, "httpRoute": {
        "parentRefs": [{"name": "eg", "namespace": "infra", "sectionName": "http"}, {"name": "local"}],
        "hostnames": ["gen.example"], "path": "/v1"}})
    route = manifests.http_route("gen", "ns", "u", spec)
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1" and route["kind"] == "HTTPRoute"
    assert route["metadata"]["name"] == "lorafleet-gen" and route["metadata"]["ownerReferences"][0]["controller"]
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "eg", "namespace": "infra",
         "sectionName": "http"},
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "local"}]
    assert route["spec"]["hostnames"] == ["gen.example"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "lorafleet-gen", "port": 80, "weight": 1}]
    kinds = [m["kind"] for m in manifests.pool_children("gen", "ns", "u", spec)]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding", "Service", "Ingress", "HTTPRoute",
                     "PodDisruptionBudget", "Deployment"]
    assert not {k for k, _ in manifests.stale_children("gen", spec)} & {"Ingress", "HTTPRoute"}
    # With the gateway on, the route goes to the gateway's Service, as the Ingress does.
    gw = BaseModelPoolSpec.model_validate({**spec.wire(), "gateway": {"enabled": True}})
    assert manifests.http_route("gen", "ns", "u", gw)["spec"]["rules"][0]["backendRefs"][0]["name"] == \
        "lorafleet-gen-gateway"
    # An HTTPRoute without a Gateway to attach to is refused.
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="parent_refs|parentRefs"):
        BaseModelPoolSpec.model_validate({**SPEC.wire(), "httpRoute": {"parentRefs": []}})


def test_routes_configmap_is_labelled_for_its_pool():
    cm = manifests.routes_configmap("gen", "ns", "u", "lorafleet-routes-gen", "{}")
    assert cm["metadata"]["labels"]["lorafleet.io/routes-for"] == "gen"
    assert cm["data"] == {"routes.json": "{}"}


def test_a_merged_pools_pod_template_carries_its_adapter_version_and_rolls_with_it():
    from lorafleet.contracts.resources import BaseModelPoolSpec
    from lorafleet.operator import manifests
    from lorafleet.operator.routing import MergedRef

    spec = BaseModelPoolSpec.model_validate({"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation",
                                                       "mergedAdapter": {"name": "chat"}}})
    v2 = MergedRef("chat", "acme-chat", "2", "s3://a/chat/2/", "c" * 64, "acme", "shared")
    v3 = MergedRef("chat", "acme-chat", "3", "s3://a/chat/3/", "d" * 64, "acme", "shared")
    d2 = manifests.deployment("hot", "ns", "u", spec, v2)
    env = {e["name"]: e.get("value") for e in d2["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LORAFLEET_MERGED_ADAPTER_DIR"] == f"/var/lib/lorafleet/adapters/{'c' * 64}"
    assert (env["LORAFLEET_MERGED_ADAPTER_NAME"], env["LORAFLEET_MERGED_ADAPTER_VERSION"],
            env["LORAFLEET_MERGED_ADAPTER_TENANT"]) == ("acme-chat", "2", "acme")
    side = {e["name"]: e.get("value") for e in d2["spec"]["template"]["spec"]["initContainers"][0]["env"]}
    assert (side["MERGED_ADAPTER_URI"], side["MERGED_ADAPTER_SHA256"]) == ("s3://a/chat/2/", "c" * 64)
    # A new version is a new pod template: the Deployment controller rolls the pods.
    assert manifests.deployment("hot", "ns", "u", spec, v3)["spec"]["template"] != d2["spec"]["template"]
    # Nothing resolved to merge: no Deployment at all (plain base pods would answer as the adapter).
    kinds = [m["kind"] for m in manifests.pool_children("hot", "ns", "u", spec, merged=None)]
    assert "Deployment" not in kinds
    assert "Deployment" in [m["kind"] for m in manifests.pool_children("hot", "ns", "u", spec, merged=v2)]
    # A pool without mergedAdapter has none of these variables.
    plain = BaseModelPoolSpec.model_validate({"model": {"uri": "s3://m/", "sha256": "a" * 64, "task": "text-generation"}})
    names_ = {e["name"] for e in manifests.deployment("p", "ns", "u", plain)["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not any("MERGED" in n for n in names_)


def test_every_container_is_pod_security_restricted_with_writable_paths_on_empty_dirs():
    pod = manifests.deployment("gen", "ns", "u", SPEC)["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"]}}, c["name"]
        # The read-only root leaves the cache and $HOME (/tmp in the images) writable, both emptyDirs.
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/var/lib/lorafleet", "/tmp"}
    assert all("emptyDir" in v for v in pod["volumes"])


def test_the_runtime_serves_metrics_on_its_own_port_which_the_pod_announces():
    d = manifests.deployment("gen", "ns", "u", SPEC)
    [rt] = d["spec"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in rt["ports"]} == {"http": 8000, "runtime-metrics": 9100}
    assert _env(rt)["LORAFLEET_METRICS_PORT"] == "9100"
    assert d["spec"]["template"]["metadata"]["annotations"] == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "9100", "prometheus.io/path": "/metrics"}


PLACED = BaseModelPoolSpec.model_validate({
    **SPEC.wire(),
    "nodeSelector": {"gpu": "h100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                    {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                     "tolerationSeconds": 30}],
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                            "labelSelector": {"matchLabels": {"lorafleet.io/pool": "gen"}}}}]}},
    "imagePullSecrets": [{"name": "registry"}],
    "podAnnotations": {"team": "ml", "prometheus.io/port": "1"},
    "priorityClassName": "serving",
    "sidecar": {"image": "sc:1", "resources": {"requests": {"cpu": "100m"}},
                "livenessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 7},
                "readinessProbe": {"httpGet": {"path": "/metrics", "port": 9090}}},
})


def test_placement_fields_pass_through_to_the_pod_template():
    t = manifests.deployment("gen", "ns", "u", PLACED)["spec"]["template"]
    pod = t["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                  {"key": "spot", "operator": "Equal", "value": "yes", "effect": "NoExecute",
                                   "tolerationSeconds": 30}]
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    assert pod["imagePullSecrets"] == [{"name": "registry"}] and pod["priorityClassName"] == "serving"
    # The pool's annotations, but not over where the runtime's metrics are.
    assert t["metadata"]["annotations"]["team"] == "ml" and t["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    [sc] = pod["initContainers"]
    assert sc["resources"] == {"requests": {"cpu": "100m"}}
    assert sc["livenessProbe"] == {"tcpSocket": {"port": 9090}, "periodSeconds": 7}
    assert sc["readinessProbe"] == {"httpGet": {"path": "/metrics", "port": 9090}}
    # Unset: none of these keys, and the sidecar's default probes on its health endpoint (a port of its own).
    plain = manifests.deployment("gen", "ns", "u", SPEC)["spec"]["template"]["spec"]
    assert not {"nodeSelector", "tolerations", "affinity", "imagePullSecrets", "priorityClassName"} & plain.keys()
    sc = plain["initContainers"][0]
    assert sc["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert sc["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert {"name": "health", "containerPort": 9091, "protocol": "TCP"} in sc["ports"]
    assert {"name": "LORAFLEET_HEALTH_PORT", "value": "9091"} in sc["env"]


def _pdb(spec_patch):
    spec = BaseModelPoolSpec.model_validate({**SPEC.wire(), **spec_patch})
    children = manifests.pool_children("gen", "ns", "u", spec)
    pdbs = [m for m in children if m["kind"] == "PodDisruptionBudget"]
    stale = ("PodDisruptionBudget", "lorafleet-gen") in manifests.stale_children("gen", spec)
    assert stale == (not pdbs)  # one the pool no longer renders is deleted
    return pdbs[0] if pdbs else None


def test_a_pool_of_two_or_more_replicas_gets_a_disruption_budget_of_one_by_default():
    pdb = _pdb({"replicas": 3})
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == "lorafleet-gen"
    assert pdb["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": {
        "app.kubernetes.io/name": "lorafleet", "lorafleet.io/pool": "gen", "app.kubernetes.io/component": "runtime"}}}
    assert _pdb({"replicas": 1}) is None  # a budget of 0 unavailable would block every drain
    assert _pdb({"replicas": 4, "disruption": {"maxUnavailable": "50%"}})["spec"]["maxUnavailable"] == "50%"
    assert _pdb({"replicas": 1, "disruption": {"maxUnavailable": 1}})["spec"]["maxUnavailable"] == 1
    assert _pdb({"replicas": 4, "disruption": {"enabled": False}}) is None

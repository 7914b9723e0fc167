"""A BaseModelPool becomes a Deployment, a Service, the sidecar's ServiceAccount/Role/RoleBinding, an
optional Ingress and its routes, all owned by the pool; deleting the pool removes everything."""

from __future__ import annotations

import time

from lorafleet.contracts import names
from lorafleet.localstack.procs import wait_for

from lf_operator_kit import SHA, adapter_doc, apply, get_json, pool_doc, wait_routes, wait_status

KINDS = ["deployment", "service", "serviceaccount", "role", "rolebinding", "ingress"]


def _env(container):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_pool_creates_everything_it_owns_and_takes_it_away(control_plane, operator, namespace, kube):
    apply(control_plane, namespace, pool_doc("minilm", replicas=2, cache={"diskBytes": "5Gi", "maxRank": 16},
                                             ingress={"host": "lf.example", "className": "nginx"}))
    pool = wait_for(lambda: get_json(control_plane, namespace, "lfpool", "minilm"), what="the pool")
    uid = pool["metadata"]["uid"]
    dep = wait_for(lambda: get_json(control_plane, namespace, "deployment", "lorafleet-minilm"), timeout=30,
                   what="Deployment lorafleet-minilm")

    owner = dep["metadata"]["ownerReferences"][0]
    assert owner == {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "name": "minilm", "uid": uid,
                     "controller": True, "blockOwnerDeletion": True}
    assert dep["spec"]["replicas"] == 2
    tpl = dep["spec"]["template"]["spec"]
    assert tpl["serviceAccountName"] == "lorafleet-minilm-sidecar"
    [runtime] = tpl["containers"]
    [sidecar] = tpl["initContainers"]
    assert runtime["name"] == "runtime" and runtime["command"] == ["lorafleet", "runtime"]
    assert runtime["ports"][0]["containerPort"] == 8000
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert runtime["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = _env(runtime)
    assert env["LORAFLEET_MODEL_DIR"] == f"/var/lib/lorafleet/models/{SHA['a']}"
    assert env["LORAFLEET_TASK"] == "sequence-classification" and env["LORAFLEET_MAX_RANK"] == "16"
    assert env["LORAFLEET_PORT"] == "8000" and env["LORAFLEET_ADMIN_PORT"] == "8001"
    # The storage credentials are in the sidecar only.
    assert not any("AWS" in k for k in env)
    assert sidecar["name"] == "sidecar" and sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["lorafleet", "sidecar"]
    senv = _env(sidecar)
    assert senv["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    assert senv["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert senv["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "storage-creds", "key": "AWS_ACCESS_KEY_ID"}}
    assert senv["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "storage-creds",
                                                             "key": "AWS_SECRET_ACCESS_KEY"}}
    assert senv["POOL"] == "minilm" and senv["RUNTIME_ADMIN_URL"] == "http://127.0.0.1:8001"
    assert senv["S3_ENDPOINT"] == "http://minio.example:9000" and senv["LORAFLEET_DISK_BYTES"] == str(5 * 2**30)
    assert {"name": "cache", "emptyDir": {"sizeLimit": "5Gi"}} in tpl["volumes"]
    for c in (runtime, sidecar):
        assert {"name": "cache", "mountPath": "/var/lib/lorafleet"} in c["volumeMounts"]
    selector = dep["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "lorafleet", "lorafleet.io/pool": "minilm",
                        "app.kubernetes.io/component": "runtime"}

    svc = get_json(control_plane, namespace, "service", "lorafleet-minilm")
    assert svc["spec"]["selector"] == selector
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(80, "http")]
    ing = get_json(control_plane, namespace, "ingress", "lorafleet-minilm")
    assert ing["spec"]["ingressClassName"] == "nginx" and ing["spec"]["rules"][0]["host"] == "lf.example"
    assert ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {
        "name": "lorafleet-minilm", "port": {"number": 80}}

    role = get_json(control_plane, namespace, "role", "lorafleet-minilm-sidecar")
    cm_rule, pod_rule = role["rules"]
    assert cm_rule["resources"] == ["configmaps"] and sorted(cm_rule["verbs"]) == ["get", "list", "watch"]
    assert "lorafleet-routes-minilm" in cm_rule["resourceNames"]
    assert pod_rule == {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "patch"]}
    rb = get_json(control_plane, namespace, "rolebinding", "lorafleet-minilm-sidecar")
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet-minilm-sidecar",
                               "namespace": namespace}]
    assert rb["roleRef"]["name"] == "lorafleet-minilm-sidecar"
    assert get_json(control_plane, namespace, "serviceaccount", "lorafleet-minilm-sidecar")

    # The routes exist, empty, owned by the pool, with the label the sidecar selects on.
    cm = wait_for(lambda: get_json(control_plane, namespace, "configmap", "lorafleet-routes-minilm"),
                  what="routes ConfigMap")
    assert cm["metadata"]["labels"][names.LABEL_ROUTES_FOR] == "minilm"
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid
    for kind in KINDS:
        got = get_json(control_plane, namespace, kind, "lorafleet-minilm" + ("-sidecar" if "role" in kind or
                                                                            kind == "serviceaccount" else ""))
        assert got["metadata"]["ownerReferences"][0]["uid"] == uid, kind

    st = wait_status(control_plane, namespace, "lfpool", "minilm", lambda s: s.get("replicas") == 2,
                     what="pool status")
    assert st["readyReplicas"] == 0 and st["ready"] == "0/2" and st["adapters"] == 0
    assert st["phase"] == "Pending"

    # Changing replicas rolls the Deployment; changing adapters never touches the pod template.
    apply(control_plane, namespace, adapter_doc("acme", "minilm"))
    wait_routes(kube, namespace, "minilm", lambda t: "acme" in t.adapters, "acme in the routes")
    template_before = get_json(control_plane, namespace, "deployment", "lorafleet-minilm")["spec"]["template"]
    apply(control_plane, namespace, adapter_doc("acme", "minilm", version="2", sha=SHA["c"]))
    wait_routes(kube, namespace, "minilm", lambda t: t.adapters["acme"].versions[0].version == "2", "acme@2")
    assert get_json(control_plane, namespace, "deployment", "lorafleet-minilm")["spec"]["template"] == template_before
    apply(control_plane, namespace, pool_doc("minilm", replicas=3, cache={"diskBytes": "5Gi", "maxRank": 16},
                                             runtime={"image": "lorafleet/runtime:0.2.0"}))
    dep = wait_for(lambda: (d := get_json(control_plane, namespace, "deployment", "lorafleet-minilm"))
                   ["spec"]["replicas"] == 3 and d, what="replicas 3")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "lorafleet/runtime:0.2.0"
    # The ingress left the spec, so it is gone.
    wait_for(lambda: get_json(control_plane, namespace, "ingress", "lorafleet-minilm") is None,
             what="the Ingress to be removed")

    control_plane.kubectl("delete", "lfpool", "minilm", "-n", namespace, "--wait=true", "--timeout=30s")
    t0 = time.monotonic()
    # The garbage collector learns of a CRD created after it started at its next discovery sync
    # (every 30 s), so the first deletion after the CRDs were installed may take that long.
    for kind in KINDS + ["configmap"]:
        wait_for(lambda: not control_plane.kubectl("get", kind, "-n", namespace, "-l", "lorafleet.io/pool=minilm",
                                                   "-o", "name").stdout.strip(),
                 timeout=90, what=f"every {kind} of the pool to be garbage collected")
    print(f"garbage collected in {time.monotonic() - t0:.1f} s")
    # The adapter waits for its pool again.
    wait_status(control_plane, namespace, "lora", "acme", lambda s: s.get("phase") == "Pending",
                what="acme to wait for its pool")

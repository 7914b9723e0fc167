"""The sidecar keeps the cache and the runtime in step with the routes: three adapters in, a version
rollout, an adapter removed and later collected, shared content stored once."""

from __future__ import annotations

from lorafleet.localstack.procs import wait_for

from sidecar_api_support import digest, sync_report, upload_dir
from support.peft_dirs import write_adapter


def synced(kube, namespace, pod, generation, **want):
    def check():
        r = sync_report(kube, namespace, pod)
        if r and r.generation >= generation and all(getattr(r, k) == v for k, v in want.items()):
            return r
    return check


def test_routes_drive_downloads_loads_unloads_and_collection(kube, namespace, pod, s3, bucket, tmp_path,
                                                             cache_dir, runtime, routes, start_sidecar):
    ads = {}
    for i, name in enumerate(["support", "billing", "legal", "support-v2"]):
        d = write_adapter(tmp_path / name, seed=i)
        ads[name] = (upload_dir(s3, bucket, d, f"acme/{name}/"), digest(d))
    for name in ["support", "billing", "legal"]:
        routes.set(name, [("1", *ads[name], 100)])
    g = routes.write()
    start_sidecar("--collect-after", "1")

    report = wait_for(synced(kube, namespace, pod, g, loaded=3, pending=[], failed={}), 60, what="3 adapters loaded")
    assert report.has_loaded("billing", "1", since=g)
    assert runtime.loaded() == {f"{n}@1": ads[n][1] for n in ["support", "billing", "legal"]}
    assert {p.name for p in (cache_dir / "adapters").iterdir()} == {ads[n][1] for n in ["support", "billing", "legal"]}
    assert runtime.sync.routes_generation == g and runtime.sync.preload_pending == 0
    assert runtime.sync.fallback == {}

    # An adapter that opts into the base-model fallback: the runtime is told its name and tenant.
    routes.table.adapters["billing"].fallback = "base"
    g = routes.write()
    wait_for(lambda: runtime.sync is not None and runtime.sync.fallback == {"billing": "acme"}, 30,
             what="the fallback opt-in sent to the runtime")

    # Rollout: version 2 takes the weight, version 1 stays loaded (draining) until the routes drop it.
    routes.set("support", [("2", *ads["support-v2"], 100), ("1", *ads["support"], 0)])
    g = routes.write()
    wait_for(synced(kube, namespace, pod, g, loaded=4), 60, what="support@2 loaded next to support@1")
    assert runtime.adapters["support@1"].weight == 0 and runtime.adapters["support@2"].weight == 100
    assert "support@1" not in runtime.unloads

    routes.set("support", [("2", *ads["support-v2"], 100)])
    routes.drop("legal")
    g = routes.write()
    wait_for(synced(kube, namespace, pod, g, loaded=2), 60, what="support@1 and legal@1 unloaded")
    assert sorted(runtime.unloads) == ["legal@1", "support@1"]
    assert set(runtime.loaded()) == {"billing@1", "support@2"}
    # ... and their content is garbage-collected once unreferenced for --collect-after.
    wait_for(lambda: {p.name for p in (cache_dir / "adapters").iterdir()} == {ads["billing"][1], ads["support-v2"][1]},
             30, what="unreferenced content collected")


def test_two_routes_with_the_same_digest_share_one_directory(kube, namespace, pod, s3, bucket, tmp_path,
                                                             cache_dir, runtime, routes, start_sidecar):
    d = write_adapter(tmp_path / "same")
    uri, sha = upload_dir(s3, bucket, d, "shared/"), digest(d)
    routes.set("one", [("1", uri, sha, 100)], tenant="acme")
    routes.set("two", [("7", uri, sha, 100)], tenant="globex")
    g = routes.write()
    start_sidecar()
    wait_for(synced(kube, namespace, pod, g, loaded=2), 60, what="both served names loaded")
    assert [p.name for p in (cache_dir / "adapters").iterdir()] == [sha]
    assert runtime.adapters["two@7"].tenant == "globex"
    assert not list((cache_dir / "tmp").iterdir())


def test_sharded_routes_are_merged_and_followed_through_reshards(kube, namespace, pod, s3, bucket, tmp_path,
                                                                   runtime, routes, start_sidecar):
    from lightkube.resources.core_v1 import ConfigMap

    routes.budget = 700  # a few adapters per ConfigMap
    for i in range(8):
        d = write_adapter(tmp_path / f"a{i}", seed=i)
        routes.set(f"a{i}", [("1", upload_dir(s3, bucket, d, f"a{i}/"), digest(d), 100)])
    g = routes.write()
    shards = [cm.metadata.name for cm in kube.list(ConfigMap, namespace=namespace)
              if (cm.metadata.labels or {}).get("lorafleet.io/routes-for") == "tiny"]
    assert len(shards) > 2
    start_sidecar()
    wait_for(synced(kube, namespace, pod, g, loaded=8), 60, what="adapters from every shard loaded")
    # The table shrinks to one ConfigMap; the old shards linger (older generation) and are ignored.
    for i in range(2, 8):
        routes.drop(f"a{i}")
    routes.budget = None
    g = routes.write()
    wait_for(synced(kube, namespace, pod, g, loaded=2), 60, what="only the newest shard count used")
    assert set(runtime.loaded()) == {"a0@1", "a1@1"}


def test_least_privilege_service_account_is_enough(kube, namespace, pod, s3, bucket, tmp_path, cache_dir, runtime,
                                                   routes, control_plane, minio_server, monkeypatch):
    """With only the rights the operator's Role gives the sidecar (its routes ConfigMaps by name, get
    and patch on pods), the sidecar watches routes and reports; it never lists other ConfigMaps."""
    from lightkube.models.authentication_v1 import TokenRequestSpec
    from lightkube.models.meta_v1 import ObjectMeta
    from lightkube.models.rbac_v1 import PolicyRule, RoleRef, Subject
    from lightkube.resources.core_v1 import ServiceAccount
    from lightkube.resources.rbac_authorization_v1 import Role, RoleBinding

    from lorafleet.contracts import names
    from lorafleet.sidecar.app import Sidecar
    from lorafleet.sidecar.cli import parse_args
    from sidecar_api_support import POOL, sidecar_argv

    sa = names.sidecar_service_account(POOL)
    cms = [names.routes_configmap_name(POOL)] + [names.routes_configmap_name(POOL, i) for i in range(4)]
    kube.create(ServiceAccount(metadata=ObjectMeta(name=sa, namespace=namespace)))
    kube.create(Role(metadata=ObjectMeta(name=sa, namespace=namespace), rules=[
        PolicyRule(apiGroups=[""], resources=["configmaps"], verbs=["get", "list", "watch"], resourceNames=cms),
        PolicyRule(apiGroups=[""], resources=["pods"], verbs=["get", "patch"])]))
    kube.create(RoleBinding(metadata=ObjectMeta(name=sa, namespace=namespace),
                            roleRef=RoleRef(apiGroup="rbac.authorization.k8s.io", kind="Role", name=sa),
                            subjects=[Subject(kind="ServiceAccount", name=sa, namespace=namespace)]))
    token = kube.create(ServiceAccount.Token(metadata=ObjectMeta(name=sa, namespace=namespace),
                                             spec=TokenRequestSpec(audiences=[], expirationSeconds=3600)),
                        sa, namespace=namespace).status.token
    kubeconfig = control_plane.kubeconfig_for_token(token, tmp_path / "sa.kubeconfig", namespace)

    d = write_adapter(tmp_path / "a")
    routes.set("a", [("1", upload_dir(s3, bucket, d, "a/"), digest(d), 100)])
    g = routes.write()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", minio_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", minio_server.secret_key)
    argv = sidecar_argv(control_plane, minio_server, namespace, pod, cache_dir, runtime)
    argv[argv.index("--kubeconfig") + 1] = str(kubeconfig)
    sc = Sidecar.from_args(parse_args(argv)).start()
    try:
        wait_for(synced(kube, namespace, pod, g, loaded=1), 60, what="a loaded with least privilege")
        routes.set("a", [("2", upload_dir(s3, bucket, d, "a2/"), digest(d), 100)])
        g = routes.write()
        wait_for(synced(kube, namespace, pod, g, loaded=1), 60, what="the change seen through the watch")
        assert set(runtime.loaded()) == {"a@2"}
    finally:
        sc.stop()

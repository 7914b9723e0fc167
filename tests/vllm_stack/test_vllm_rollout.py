"""A v1 -> v2 rollout under load on a vLLM pool through the local stack: kubectl apply -> operator (which
gives the pool the vLLM runtime image: engine vllm, no image named) -> pod (sidecar + the vLLM engine's
runtime) -> ingress. Every answer is PEFT's greedy text for acme's v1 or v2 (the version the answer
names) or globex's own: no failed request, no third version, no other tenant's answer."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import wait_for
from support.models import PeftOracle, make_generation_adapter, make_tiny_llama

NS, POOL, HOST = "vllm-e2e", "tiny", "tiny.vllm.local"
PROMPTS = ["hello world , how are", "please refund me , the invoice"]
NEW = 6


def kubectl(state, *args, input=None) -> str:
    r = subprocess.run([str(Path.home() / ".cache/lorafleet/bin/kubectl"), "--kubeconfig", state["kubeconfig"], *args],
                       input=input, capture_output=True, text=True)
    assert r.returncode == 0, f"kubectl {' '.join(args)}: {r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-rollout")
    # head_dim 64: a head size vLLM's CPU attention kernels take.
    base = make_tiny_llama(root / "base", hidden=256, layers=2, heads=4, kv_heads=2, seed=3)
    adapters = {key: make_generation_adapter(base, root / key, seed=seed, r=8)
                for key, seed in (("acme-v1", 41), ("acme-v2", 42), ("globex-v1", 43))}
    oracle = PeftOracle(base, "text-generation")
    expected = {key: oracle.greedy_texts(d, PROMPTS, NEW) for key, d in adapters.items()}
    for p in PROMPTS:  # the three answer differently: a wrong version or tenant cannot pass as the right one
        assert len({e[p] for e in expected.values()}) == 3
    return base, adapters, expected


def push(state, adapter_dir: Path, tenant: str, name: str, version: str) -> str:
    r = subprocess.run([str(Path(sys.executable).parent / "lorafleet"), "push", str(adapter_dir),
                        f"s3://adapters/{tenant}/{name}/{version}/", "--pool", POOL, "--tenant", tenant,
                        "--version", version, "--name", name, "--namespace", NS, "--no-progress"],
                       capture_output=True, text=True, env={**__import__("os").environ, **state["s3"]})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def pool(stack, models):
    from minio import Minio

    _, state = stack
    base, adapters, _ = models
    s3env = state["s3"]
    s3 = Minio(f"127.0.0.1:{state['minio_port']}", access_key=s3env["AWS_ACCESS_KEY_ID"],
               secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=False)
    for b in ("models", "adapters"):
        if not s3.bucket_exists(b):
            s3.make_bucket(b)
    for f in sorted(base.rglob("*")):
        if f.is_file():
            s3.fput_object("models", f"tiny/{f.relative_to(base).as_posix()}", str(f))
    kubectl(state, "create", "namespace", NS)
    kubectl(state, "create", "secret", "generic", "storage-creds", "-n", NS,
            f"--from-literal=AWS_ACCESS_KEY_ID={s3env['AWS_ACCESS_KEY_ID']}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3env['AWS_SECRET_ACCESS_KEY']}")
    for tenant in ("acme", "globex"):
        kubectl(state, "apply", "-f", "-", input=json.dumps({
            "apiVersion": "lorafleet.io/v1alpha1", "kind": "LoRATenant", "metadata": {"name": tenant, "namespace": NS},
            "spec": {"sources": [f"s3://adapters/{tenant}/"]}}))
    kubectl(state, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": POOL, "namespace": NS},
        "spec": {"model": {"uri": "s3://models/tiny/", "sha256": directory_digest(base), "task": "text-generation"},
                 "replicas": 1, "runtime": {"engine": "vllm", "maxBatchSize": 8, "maxQueueDelayMs": 0},
                 "cache": {"deviceSlots": 2, "hostAdapters": 4, "maxRank": 16, "diskBytes": "1Gi"},
                 "storage": {"endpoint": s3env["S3_ENDPOINT"], "secretRef": {"name": "storage-creds"}},
                 "ingress": {"host": HOST}}}))
    kubectl(state, "apply", "-f", "-", input=push(state, adapters["acme-v1"], "acme", "acme-chat", "1"))
    kubectl(state, "apply", "-f", "-", input=push(state, adapters["globex-v1"], "globex", "globex-chat", "1"))
    return state


def lora_status(state, name: str) -> dict:
    return json.loads(kubectl(state, "get", "lora", name, "-n", NS, "-o", "json")).get("status") or {}


def ask(c: httpx.Client, state, model: str, prompt: str) -> httpx.Response:
    return c.post(f"http://127.0.0.1:{state['ingress_port']}/v1/completions", headers={"Host": HOST}, timeout=120,
                  json={"model": model, "prompt": prompt, "max_tokens": NEW, "temperature": 0})


def test_rollout_under_load_on_a_vllm_pool_fails_nothing_and_serves_no_third_version(stack, pool, models):
    state = pool
    _, adapters, expected = models
    for name in ("acme-chat", "globex-chat"):
        wait_for(lambda: lora_status(state, name).get("phase") == "Ready", timeout=600, interval=1,
                 what=f"{name} Ready on the vLLM pool")
    dep = json.loads(kubectl(state, "get", "deployment", f"lorafleet-{POOL}", "-n", NS, "-o", "json"))
    [rt] = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "runtime"]
    assert rt["image"] == "lorafleet/runtime-vllm:0.1.0"  # engine vllm, no image named: the operator's vLLM image
    [pod] = json.loads(kubectl(state, "get", "pods", "-n", NS, "-l", f"lorafleet.io/pool={POOL}", "-o",
                               "json"))["items"]
    log = stack[0].root / "node" / NS / pod["metadata"]["name"] / "logs" / "runtime.log"
    assert "engine: vllm" in log.read_text() and "vLLM engine started" in log.read_text()

    answers, stop = [], threading.Event()

    def client_loop(n: int):
        with httpx.Client() as c:
            i = n
            while not stop.is_set():
                name, prompt = ("acme-chat", "globex-chat")[i % 2], PROMPTS[(i // 2) % 2]
                i += 1
                try:
                    r = ask(c, state, name, prompt)
                    body = r.json() if r.status_code == 200 else r.text
                    answers.append((name, prompt, r.status_code, body))
                except httpx.HTTPError as e:
                    answers.append((name, prompt, -1, repr(e)))

    threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 20, timeout=120, what="load before the change")
        kubectl(state, "apply", "-f", "-", input=push(state, adapters["acme-v2"], "acme", "acme-chat", "2"))
        wait_for(lambda: lora_status(state, "acme-chat").get("servedVersion") == "2"
                 and lora_status(state, "acme-chat").get("phase") == "Ready", timeout=600, interval=0.5,
                 what="acme-chat rolled out to v2")
        seen = len(answers)
        wait_for(lambda: len(answers) >= seen + 20, timeout=120, what="load after the change")
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    failed = [a for a in answers if a[2] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the rollout: {failed[:3]}"
    by_served = {"acme-chat@1": "acme-v1", "acme-chat@2": "acme-v2", "globex-chat@1": "globex-v1"}
    seen_versions = {}
    for name, prompt, _, body in answers:
        served, text = body["model"], body["choices"][0]["text"]
        assert served in by_served and served.split("@")[0] == name, (name, served)  # no third version
        assert text == expected[by_served[served]][prompt], (name, served, prompt, text)
        seen_versions[served] = seen_versions.get(served, 0) + 1
    assert seen_versions.get("acme-chat@1") and seen_versions.get("acme-chat@2"), seen_versions
    print(f"rollout under load on the vLLM pool: {len(answers)} answers, {seen_versions}")
    with httpx.Client() as c:  # after the rollout: v2
        assert ask(c, state, "acme-chat", PROMPTS[0]).json()["model"] == "acme-chat@2"

"""A text-to-image pool end to end: the pipeline folder in MinIO, `kubectl apply` of the pool and of two
tenants' LoRAs (pushed with `lorafleet push`: a diffusers file and a kohya file), then images through
the ingress, each equal to diffusers' own with that adapter."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest

from lorafleet.contracts.digest import directory_digest

NS = "e2e-images"
POOL = "tiny-sd"
HOST = "tiny-sd.e2e.local"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from support.diffusion_models import DiffusersOracle, make_diffusers_lora, make_kohya_lora, make_tiny_pipeline

    root = tmp_path_factory.mktemp("e2e-sd")
    base = make_tiny_pipeline(root / "tiny-sd")
    oracle = DiffusersOracle(base)
    watercolor = make_diffusers_lora(base, root / "watercolor", seed=71, r=4, alpha=8, pipe=oracle.pipe)
    ink = make_kohya_lora(base, root / "ink" / "ink.safetensors", seed=72, r=4, alpha=2, pipe=oracle.pipe).parent
    return base, oracle, {"acme-watercolor": watercolor, "globex-ink": ink / "ink.safetensors"}, \
        {"acme-watercolor": watercolor, "globex-ink": ink}


@pytest.fixture(scope="module")
def pool(e2e, sd):
    base = sd[0]
    s3 = e2e.s3()
    for f in sorted(base.rglob("*")):
        if f.is_file():
            s3.fput_object("models", f"tiny-sd/{f.relative_to(base).as_posix()}", str(f))
    e2e.kubectl("create", "namespace", NS)
    e2e.kubectl("create", "secret", "generic", "storage-creds", "-n", NS,
                f"--from-literal=AWS_ACCESS_KEY_ID={e2e.s3env['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={e2e.s3env['AWS_SECRET_ACCESS_KEY']}")
    doc = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": POOL, "namespace": NS},
           "spec": {"model": {"uri": "s3://models/tiny-sd/", "sha256": directory_digest(base), "task": "text-to-image"},
                    "replicas": 1, "runtime": {"maxBatchSize": 4},
                    "cache": {"deviceSlots": 2, "hostAdapters": 8, "diskBytes": "1Gi"},
                    "storage": {"endpoint": e2e.s3env["S3_ENDPOINT"], "secretRef": {"name": "storage-creds"}},
                    "ingress": {"host": HOST}}}
    e2e.kubectl("apply", "-f", "-", input=json.dumps(doc))
    return doc


def test_apply_a_text_to_image_pool_and_two_loras_then_images_through_the_ingress(e2e, pool, sd):
    from PIL import Image

    _, oracle, sources, dirs = sd
    for name, tenant in (("acme-watercolor", "acme"), ("globex-ink", "globex")):
        e2e.kubectl("apply", "-f", "-", input=e2e.push(dirs[name], f"s3://adapters/{tenant}/{name}/1/", pool=POOL,
                                                       tenant=tenant, version="1", name=name, ns=NS))
    for name in dirs:
        e2e.wait_adapter(name, NS, "Ready", "1/1", timeout=300)
    with httpx.Client(timeout=120) as c:
        for name in dirs:
            body = {"inputs": "elephant", "parameters": {"num_inference_steps": 3, "seed": 5}}
            r = c.post(f"{e2e.url}/", json=body, headers={"Host": HOST, "lora": name})
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text[:300]
            got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)
            want = (oracle.image(sources[name], "elephant", seed=5, steps=3)[0] * 255).round().astype(int)
            assert int(np.abs(got - want).max()) <= 1, name
        r = c.post(f"{e2e.url}/v1/images/generations", json={"model": "nobody", "prompt": "x"}, headers={"Host": HOST})
        assert r.status_code == 404

"""A text-to-image pool over real HTTP: OpenAI's images API (through the openai client) and the hosted
API's shape (``POST /`` and ``/models/{name}``, adapter in the ``lora`` header, image bytes back), each
image checked against diffusers with that adapter alone; progress on /metrics; the documented errors."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from support.diffusion_models import DiffusersOracle, make_diffusers_lora, make_kohya_lora, make_tiny_pipeline
from support.models import put_adapter, start_runtime


def _pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _expected(oracle, adapter, prompt, **kw) -> np.ndarray:
    """diffusers' image as the 8-bit pixels its numpy_to_pil would save."""
    return (oracle.image(adapter, prompt, **kw) * 255).round().astype("uint8")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-http")
    base = make_tiny_pipeline(root / "tiny-sd")
    oracle = DiffusersOracle(base)
    adapters = {}
    for i in range(4):
        if i % 2:
            f = make_kohya_lora(base, root / f"k{i}" / f"style{i}.safetensors", seed=50 + i, r=4, alpha=2,
                                pipe=oracle.pipe)
            adapters[f"style{i}"] = (f.parent, f)
        else:
            d = make_diffusers_lora(base, root / f"p{i}", seed=50 + i, r=4, alpha=8, pipe=oracle.pipe)
            adapters[f"style{i}"] = (d, d)
    return base, oracle, adapters


@pytest.fixture(scope="module")
def server(sd):
    base, _, adapters = sd
    srv = start_runtime(base, device_slots=2, max_batch_size=8, served_model_name="tiny-sd")
    with httpx.Client(base_url=srv.admin_url) as admin:
        for name, (d, _) in adapters.items():
            r = put_adapter(admin, name, "1", d)
            assert r.status_code == 200, r.text
        admin.put("/admin/sync", json={"preloadPending": 0})
    yield srv
    srv.stop()


def test_openai_images_api_matches_diffusers_with_seed_n_and_size(server, sd):
    from openai import OpenAI

    _, oracle, adapters = sd
    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.images.generate(model="style0@1", prompt="a red cat", n=2, size="40x48", response_format="b64_json",
                               extra_body={"seed": 7, "num_inference_steps": 4})
    want = _expected(oracle, adapters["style0"][1], "a red cat", seed=7, steps=4, n=2, height=48, width=40)
    assert len(r.data) == 2
    for i, item in enumerate(r.data):
        got = _pixels(base64.b64decode(item.b64_json))
        assert got.shape == (48, 40, 3)
        # 8-bit pixels from fp32 images equal to 1e-4: at most one level apart where a value sits on a
        # rounding edge.
        assert int(np.abs(got.astype(int) - want[i]).max()) <= 1
    again = client.images.generate(model="style0", prompt="a red cat", n=2, size="40x48",
                                   extra_body={"seed": 7, "num_inference_steps": 4})
    assert again.data[0].b64_json == r.data[0].b64_json, "the same seed gives the same image"


def test_hosted_api_shape_with_lora_header_png_and_jpeg(server, sd):
    _, oracle, adapters = sd
    body = {"inputs": "elephant", "parameters": {"num_inference_steps": 3, "seed": 11, "guidance_scale": 5.0}}
    want = _expected(oracle, adapters["style1"][1], "elephant", seed=11, steps=3, guidance=5.0)
    r = httpx.post(server.url + "/", json=body, headers={"lora": "style1"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert int(np.abs(_pixels(r.content).astype(int) - want[0]).max()) <= 1
    r = httpx.post(server.url + "/models/tiny-sd", json=body, headers={"lora": "style1", "accept": "image/jpeg"},
                   timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content[:2] == b"\xff\xd8"
    r = httpx.post(server.url + "/models/style1", json=body, timeout=60)
    assert r.status_code == 200 and int(np.abs(_pixels(r.content).astype(int) - want[0]).max()) <= 1
    base = httpx.post(server.url + "/", json=body, timeout=60)  # no lora header: the base pipeline
    want_base = _expected(oracle, None, "elephant", seed=11, steps=3, guidance=5.0)
    assert int(np.abs(_pixels(base.content).astype(int) - want_base[0]).max()) <= 1


def test_concurrent_tenants_over_http_get_their_own_images(server, sd):
    _, oracle, adapters = sd
    jobs = [(f"style{i % 4}", f"prompt {i}", 100 + i) for i in range(8)]

    def one(job):
        name, prompt, seed = job
        r = httpx.post(server.url + "/", headers={"lora": name}, timeout=120,
                       json={"inputs": prompt, "parameters": {"num_inference_steps": 3, "seed": seed}})
        assert r.status_code == 200, r.text
        return _pixels(r.content)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    for (name, prompt, seed), img in zip(jobs, got):
        want = _expected(oracle, adapters[name][1], prompt, seed=seed, steps=3)
        assert int(np.abs(img.astype(int) - want[0]).max()) <= 1, f"{name} seed {seed}"
    metrics = httpx.get(server.metrics_url + "/metrics").text
    steps = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("lorafleet_runtime_denoising_steps_total{")}
    assert steps.get('tenant="style0"', 0) >= 6, steps


def test_errors_unknown_adapter_bad_parameters_and_wrong_format(server):
    r = httpx.post(server.url + "/v1/images/generations", json={"model": "nobody", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server.url + "/", json={"inputs": "x"}, headers={"lora": "nobody"})
    assert r.status_code == 404
    r = httpx.post(server.url + "/", json={"inputs": "x", "parameters": {"clip_skip": 2}}, headers={"lora": "style0"})
    assert r.status_code == 400 and "clip_skip" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/images/generations",
                   json={"model": "style0", "prompt": "x", "size": "30x30", "num_inference_steps": 0})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and "height 30" in msg and "num_inference_steps 0" in msg
    r = httpx.post(server.url + "/v1/images/generations",
                   json={"model": "style0", "prompt": "x", "response_format": "url"})
    assert r.status_code == 400 and "b64_json" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"model": "style0", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_task"


def test_lorafleet_serve_a_pipeline_folder_and_a_folder_of_loras(sd, tmp_path):
    """The command as a user runs it: a pipeline folder and a folder of LoRA folders (both layouts)."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import sys

    from lorafleet.localstack.procs import wait_for

    base, oracle, adapters = sd
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in ("style0", "style1"):
        shutil.copytree(adapters[name][0], folder / name)
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with open(tmp_path / "serve.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "lorafleet", "serve", "--model", str(base), "--adapters",
                              str(folder), "--port", str(ports[0]), "--admin-port", str(ports[1]),
                              "--metrics-port", str(ports[2]), "--host", "127.0.0.1"], env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=log,
                             stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ports[0]}"
    try:
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=120, what="lorafleet serve ready")
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"style0", "style1"} <= ids
        r = httpx.post(url + "/", headers={"lora": "style1"}, timeout=60,
                       json={"inputs": "a red cat", "parameters": {"num_inference_steps": 2, "seed": 3}})
        assert r.status_code == 200, r.text
        want = _expected(oracle, adapters["style1"][1], "a red cat", seed=3, steps=2)
        assert int(np.abs(_pixels(r.content).astype(int) - want[0]).max()) <= 1
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()[-2000:]

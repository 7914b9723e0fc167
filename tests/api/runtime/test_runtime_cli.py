"""The two commands as users run them: ``lorafleet runtime`` (pod mode: waits for its model, takes adapters
from the admin API) and ``lorafleet serve`` (a folder of adapters, no cluster)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx

from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import wait_for
from support.metrics import metric_in


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict | None = None, log=None) -> subprocess.Popen:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "lorafleet", *args], env=full, stdout=log, stderr=subprocess.STDOUT)


def _stop(p: subprocess.Popen) -> int:
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        raise


def test_serve_a_folder_of_adapters(tiny_llama, gen_adapters, tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("gen0", "gen1"):
        shutil.copytree(gen_adapters[name], folder / f"tenant-{name}")
    port, admin = _free_port(), _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        p = _start(["serve", "--model", str(tiny_llama), "--adapters", str(folder), "--port", str(port),
                    "--admin-port", str(admin), "--metrics-port", str(_free_port()), "--host", "127.0.0.1"],
                   log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=120, what="lorafleet serve ready")
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"tenant-gen0", "tenant-gen1"} <= ids
        r = httpx.post(url + "/v1/completions", json={"model": "tenant-gen1", "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        listing = httpx.get(f"http://127.0.0.1:{admin}/admin/adapters").json()
        assert {a["name"] for a in listing["adapters"]} == {"tenant-gen0", "tenant-gen1"}
    finally:
        assert _stop(p) == 0, (tmp_path / "serve.log").read_text()[-2000:]


def test_runtime_waits_for_its_model_then_loads_adapters_from_the_cache(tiny_llama, gen_adapters, tmp_path):
    cache = tmp_path / "cache"
    model_dir = cache / "models" / "m"
    digest = directory_digest(gen_adapters["gen2"])
    shutil.copytree(gen_adapters["gen2"], cache / "adapters" / digest)
    port, admin_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = {"LORAFLEET_MODEL_DIR": str(model_dir), "LORAFLEET_CACHE_DIR": str(cache), "LORAFLEET_PORT": str(port),
           "LORAFLEET_ADMIN_PORT": str(admin_port),
           "LORAFLEET_METRICS_PORT": str(metrics_port), "LORAFLEET_DEVICE_SLOTS": "2", "LORAFLEET_MAX_BATCH_SIZE": "4"}
    with open(tmp_path / "runtime.log", "wb") as log:
        p = _start(["runtime", "--host", "127.0.0.1"], env=env, log=log)
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        wait_for(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=120, what="runtime liveness")
        r = httpx.get(url + "/readyz")
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        assert httpx.put(admin + "/admin/adapters/acme/1", json={
            "path": f"adapters/{digest}", "sha256": digest, "tenant": "acme"}).status_code == 503
        tmp_model = cache / "tmp" / "m"
        shutil.copytree(tiny_llama, tmp_model)
        model_dir.parent.mkdir(parents=True)
        tmp_model.rename(model_dir)  # as the sidecar does: complete, then renamed into place
        wait_for(lambda: httpx.put(admin + "/admin/adapters/acme/1", json={
            "path": f"adapters/{digest}", "sha256": digest, "tenant": "acme"}).status_code == 200,
            timeout=120, what="model loaded and adapter registered")
        assert httpx.get(url + "/readyz").status_code == 503, "not ready before the sidecar's sync"
        httpx.put(admin + "/admin/sync", json={"routesGeneration": 1, "preloadPending": 0})
        assert httpx.get(url + "/readyz").status_code == 200
        r = httpx.post(url + "/v1/chat/completions", json={"model": "acme", "max_tokens": 2,
                                                            "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["model"] == "acme@1"
        assert httpx.get(url + "/metrics").status_code == 404, "/metrics is not on the public port"
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert "lorafleet_runtime_adapters" in metrics
        # The model's objects are out of the collector's reach: full collections stay short.
        frozen = next(float(line.split()[-1]) for line in metrics.splitlines()
                      if line.startswith("lorafleet_runtime_gc_frozen_objects "))
        assert frozen > 100_000
        assert 'python_gc_collections_total{generation="2"}' in metrics
        # The collection before the freeze is timed: an operator sees how long full collections hold the loop.
        assert metric_in(metrics, "lorafleet_runtime_gc_pause_seconds_count", generation="2") >= 1
        assert metric_in(metrics, "lorafleet_runtime_gc_pause_seconds_sum", generation="2") > 0
    finally:
        assert _stop(p) == 0, (tmp_path / "runtime.log").read_text()[-2000:]


def _child_of(pid: int, module: str) -> int | None:
    from pathlib import Path

    for task in Path(f"/proc/{pid}/task").iterdir():  # the thread that started it has it in its own children list
        for child in (task / "children").read_text().split():
            if module.encode() in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    return None


def _model_process_of(pid: int) -> int:
    child = _child_of(pid, "lorafleet.runtime.model_process")
    assert child is not None, f"process {pid} has no model process"
    return child


def test_serve_exits_1_when_its_model_process_dies(tiny_llama, tmp_path):
    """The model in a process of its own: answered through it, and if it dies the server says why and exits
    1 (its container restarts) instead of serving errors."""
    port = _free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        p = _start(["serve", "--model", str(tiny_llama), "--port", str(port), "--admin-port", str(_free_port()),
                    "--metrics-port", str(_free_port()), "--host", "127.0.0.1", "--model-process", "process"], log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/readyz").status_code == 200, timeout=120, what="lorafleet serve ready")
        base = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        r = httpx.post(url + "/v1/completions", json={"model": base, "prompt": "hello", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # On CPU with the model in a model process, the public port is the HTTP front process's (--front auto).
        assert _child_of(p.pid, "lorafleet.runtime.front") is not None
        child = _model_process_of(p.pid)
        os.kill(child, signal.SIGKILL)
        assert p.wait(timeout=60) == 1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = (tmp_path / "serve.log").read_text()
    assert f"the text-generation model process {child} died (signal 9)" in text
    assert "stops with exit code 1 so that its container restarts" in text, text[-2000:]

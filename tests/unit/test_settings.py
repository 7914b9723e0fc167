"""Every component's settings (contracts/settings.py): a bad value stops the real command with exit code
2 and one line naming the component, the variable, the value and what it must be; the defaults are the
documented ones; a flag beats its variable; the variables the operator sets are the ones read; and
docs/configuration.md is the rendering of the classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafleet.contracts import names
from lorafleet.contracts.names import RuntimeEnv, SidecarEnv
from lorafleet.contracts.resources import BaseModelPoolSpec
from lorafleet.contracts.settings import (
    COMPONENTS,
    GatewaySettings,
    OperatorSettings,
    RuntimeSettings,
    SettingsError,
    SidecarSettings,
    render_reference,
)

REPO = Path(__file__).resolve().parents[2]
SIDECAR_POD = {SidecarEnv.POOL: "minilm", SidecarEnv.POD_NAMESPACE: "team-a", SidecarEnv.POD_NAME: "pod-1"}
GATEWAY_POD = {"POOL": "minilm", "POD_NAMESPACE": "team-a"}
SHA = "a" * 64


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any setting a component reads, plus ``extra``."""
    read = {(f.json_schema_extra or {}).get("env") for cls in COMPONENTS for f in cls.model_fields.values()}
    env = {k: v for k, v in os.environ.items() if k not in read}
    return {**env, **extra}


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafleet", *argv], env=_clean_env(**env), capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("component, env, variable, value, expected", [
    ("operator", {"LORAFLEET_OPERATOR_RESYNC_S": "soon"}, "LORAFLEET_OPERATOR_RESYNC_S", "soon",
     "a number of at least 0"),
    ("operator", {"LORAFLEET_OPERATOR_LEASE_DURATION_S": "1"}, "LORAFLEET_OPERATOR_LEASE_DURATION_S", "1",
     "a number from 3 to 300"),
    ("sidecar", {**SIDECAR_POD, "LORAFLEET_MAX_RANK": "abc"}, "LORAFLEET_MAX_RANK", "abc",
     "an integer of at least 1"),
    ("sidecar", {**SIDECAR_POD, "LORAFLEET_DISK_BYTES": "20 gigs"}, "LORAFLEET_DISK_BYTES", "20 gigs",
     "a byte quantity such as 512Mi"),
    ("sidecar", {**SIDECAR_POD, "LORAFLEET_HEALTH_PORT": "70000"}, "LORAFLEET_HEALTH_PORT", "70000",
     "an integer from 0 to 65535"),
    ("gateway", {**GATEWAY_POD, "LORAFLEET_GATEWAY_PORT": "0"}, "LORAFLEET_GATEWAY_PORT", "0",
     "an integer from 1 to 65535"),
    ("runtime", {"LORAFLEET_MAX_BATCH_SIZE": "lots"}, "LORAFLEET_MAX_BATCH_SIZE", "lots",
     "an integer of at least 1"),
    ("runtime", {"LORAFLEET_ENGINE": "tgi"}, "LORAFLEET_ENGINE", "tgi", "one of auto, torch, vllm"),
    ("runtime", {"LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION": "90"}, "LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION", "90",
     "a fraction greater than 0 and at most 1"),
    ("serve", {"LORAFLEET_QUANTIZATION": "fp8"}, "LORAFLEET_QUANTIZATION", "fp8", "one of none, int8, nf4"),
])
def test_a_bad_variable_stops_the_command_with_one_line_naming_it(component, env, variable, value, expected):
    r = _run(component, **env)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"lorafleet {component}: ")
    assert f"{variable}={value!r}: expected {expected}" in line


def test_a_bad_flag_is_named_as_the_flag_and_every_problem_is_in_the_one_line(tmp_path):
    r = _run("push", str(tmp_path), "s3://adapters/x/", "--pool", "p", "--tenant", "t", "--version", "1",
             "--max-adapter-bytes", "lots", "--max-rank", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line == ("lorafleet push: --max-rank='0': expected an integer of at least 1; "
                    "--max-adapter-bytes='lots': expected a byte quantity such as 512Mi, 20Gi or 1000000")


def test_missing_settings_are_named_with_their_variables():
    r = _run("sidecar")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("lorafleet sidecar: missing settings: --pool (POOL), --namespace (POD_NAMESPACE), "
                                "--pod (POD_NAME)")


def test_the_defaults_are_the_documented_values():
    op = OperatorSettings.from_env({})
    assert (op.namespace, op.all_namespaces, op.liveness, op.sidecar_cluster_role) == ([], False, "", "")
    assert (op.runtime_image, op.runtime_vllm_image) == ("lorafleet/runtime:0.1.0", "lorafleet/runtime-vllm:0.1.0")
    assert (op.resync_interval, op.lease_namespace, op.lease_name, op.lease_duration) == (
        300.0, "", "lorafleet-operator", 10.0)
    assert (op.no_leader_election, op.verbose, op.debug) == (False, False, False)
    assert op.pod_name is None

    sc = SidecarSettings.from_env(SIDECAR_POD)
    assert (sc.cache_dir, sc.runtime_admin_url) == ("/var/lib/lorafleet", "http://127.0.0.1:8001")
    assert (sc.model_uri, sc.model_sha256, sc.s3_endpoint, sc.s3_region, sc.task) == ("", "", None, None, "")
    assert (sc.max_rank, sc.max_adapter_bytes, sc.disk_bytes) == (64, 512 * 2**20, None)
    assert (sc.metrics_port, sc.health_port, sc.health_host) == (9090, 9091, "0.0.0.0")
    assert (sc.concurrency, sc.collect_after, sc.poll_interval, sc.rate_window) == (4, 600.0, 2.0, 30.0)
    assert (sc.retry_base, sc.retry_max, sc.log_level, sc.kubeconfig) == (0.5, 60.0, "info", None)

    gw = GatewaySettings.from_env(GATEWAY_POD)
    assert (gw.host, gw.port, gw.metrics_port, gw.policy) == ("0.0.0.0", 8080, 9090, "affinity")
    assert (gw.spill_inflight, gw.retries, gw.poll_s, gw.watch_timeout_s, gw.replica_poll_s) == (8, 2, 1.0, 60, 0.5)

    rt = RuntimeSettings.from_env({})
    assert (rt.model_dir, rt.task, rt.dtype, rt.quantization, rt.device, rt.engine) == (
        "", "", "float32", "none", "cpu", "auto")
    assert (rt.host, rt.port, rt.admin_port, rt.metrics_port) == ("0.0.0.0", 8000, 8001, 9100)
    assert (rt.max_batch_size, rt.max_batch_delay_ms, rt.max_queue, rt.max_queue_delay_ms) == (32, 5.0, 1024, 2000.0)
    assert (rt.per_tenant_max_inflight, rt.device_slots, rt.host_adapters, rt.max_rank) == (64, 32, 512, 64)
    assert (rt.max_new_tokens, rt.max_model_len, rt.torch_threads, rt.vllm_gpu_memory_utilization) == (
        256, 0, 0, 0.9)


def test_a_flag_beats_its_variable_and_the_variable_beats_the_default():
    from lorafleet.gateway.cli import parse as gateway
    from lorafleet.operator.cli import parse as operator
    from lorafleet.sidecar.cli import parse_args as sidecar

    env = {"LORAFLEET_OPERATOR_RESYNC_S": "60", "LORAFLEET_OPERATOR_LEASE_NAME": "from-env"}
    assert (operator([], env).resync_interval, operator([], env).lease_name) == (60.0, "from-env")
    assert operator(["--resync-interval", "5", "--lease-name", "from-flag"], env).resync_interval == 5.0
    assert operator(["--lease-name", "from-flag"], env).lease_name == "from-flag"

    env = {**SIDECAR_POD, "LORAFLEET_MAX_RANK": "32", "LORAFLEET_DISK_BYTES": "20Gi", "LORAFLEET_LOG_LEVEL": "DEBUG"}
    assert (sidecar([], env).max_rank, sidecar([], env).disk_bytes, sidecar([], env).log_level) == (
        32, 20 << 30, "debug")
    flagged = sidecar(["--max-rank", "8", "--disk-bytes", "1Gi", "--pool", "other"], env)
    assert (flagged.max_rank, flagged.disk_bytes, flagged.pool) == (8, 1 << 30, "other")

    env = {**GATEWAY_POD, "LORAFLEET_GATEWAY_PORT": "8081"}
    assert gateway([], env).port == 8081 and gateway(["--port", "9000"], env).port == 9000
    with pytest.raises(SettingsError, match=r"--port='x': expected an integer from 1 to 65535"):
        gateway(["--port", "x"], env)


def test_a_runtime_flag_beats_its_variable(monkeypatch):
    import argparse

    from lorafleet.contracts.settings import add_flags

    monkeypatch.setenv(RuntimeEnv.DEVICE_SLOTS, "4")
    monkeypatch.setenv(RuntimeEnv.MAX_QUEUE_DELAY_MS, "250")
    p = argparse.ArgumentParser()
    add_flags(p, RuntimeSettings)
    assert (RuntimeSettings.from_args(p.parse_args([])).device_slots, RuntimeSettings.from_args(p.parse_args([])).max_queue_delay_ms) == (
        4, 250.0)
    s = RuntimeSettings.from_args(p.parse_args(["--device-slots", "16", "--max-queue-delay-ms", "0"]))
    assert (s.device_slots, s.max_queue_delay_ms) == (16, 0.0)


def test_every_variable_the_operator_sets_is_read_and_parses():
    """The pool pods' environment is the operator's (operator/manifests.py): each variable it sets is a
    setting of the container it is set on, and the values it writes are valid settings."""
    from lorafleet.operator import manifests

    spec = BaseModelPoolSpec.model_validate({
        "model": {"uri": "s3://m/", "sha256": SHA, "task": "text-generation"},
        "storage": {"endpoint": "http://minio:9000", "secretRef": {"name": "s3"}},
        "cache": {"diskBytes": "20Gi", "maxAdapterBytes": "64Mi"}})
    read = {cls: {(f.json_schema_extra or {}).get("env") for f in cls.model_fields.values()}
            for cls in (RuntimeSettings, SidecarSettings)}
    for cls, env in ((RuntimeSettings, manifests.runtime_env("gen", spec)),
                     (SidecarSettings, manifests.sidecar_env("gen", spec))):
        assert {e["name"] for e in env} <= read[cls], {e["name"] for e in env} - read[cls]
        values = {e["name"]: str(e["value"]) for e in env if "value" in e}
        values.update({SidecarEnv.POD_NAME: "gen-abc", SidecarEnv.POD_NAMESPACE: "team-a"})
        cls.from_env(values)  # raises SettingsError naming what the operator wrote wrong
    s = SidecarSettings.from_env({**{e["name"]: str(e["value"]) for e in manifests.sidecar_env("gen", spec)
                                     if "value" in e}, SidecarEnv.POD_NAME: "p", SidecarEnv.POD_NAMESPACE: "n"})
    assert (s.disk_bytes, s.max_adapter_bytes, s.metrics_port) == (20 << 30, 64 << 20, names.SIDECAR_METRICS_PORT)


def test_the_configuration_reference_is_current():
    r = subprocess.run([sys.executable, "-m", "lorafleet", "gen-settings-doc", "--check",
                        "--out", str(REPO / "docs" / "configuration.md")], capture_output=True, text=True)
    assert r.returncode == 0, f"docs/configuration.md is stale: run `lorafleet gen-settings-doc`\n{r.stderr}"


def test_the_reference_check_detects_a_stale_file_and_lists_every_variable(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(render_reference().replace("LORAFLEET_MAX_RANK", "LORAFLEET_MAX_RANKS", 1))
    r = subprocess.run([sys.executable, "-m", "lorafleet", "gen-settings-doc", "--check", "--out", str(stale)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "stale" in r.stderr
    text = render_reference()
    for env in [v for k, v in vars(RuntimeEnv).items() if k.isupper()] + [
            v for k, v in vars(SidecarEnv).items() if k.isupper()]:
        assert f"`{env}`" in text, env


def test_the_operators_lease_identity_starts_with_its_pod_name():
    from lorafleet.operator.leader import default_identity

    pod = OperatorSettings.from_env({"POD_NAME": "lorafleet-operator-7d9f-abcde"}).pod_name
    one, other = default_identity(pod), default_identity(pod)
    assert one.startswith("lorafleet-operator-7d9f-abcde_") and other.startswith("lorafleet-operator-7d9f-abcde_")
    assert one != other  # a restarted container is a new candidate

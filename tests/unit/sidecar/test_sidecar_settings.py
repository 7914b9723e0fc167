"""Settings come from the pod environment (contracts.names.SidecarEnv), flags override; retries back
off exponentially with jitter."""

from __future__ import annotations

import pytest

from lorafleet.contracts.names import SidecarEnv as E
from lorafleet.sidecar.cli import parse_args
from lorafleet.sidecar.sync import RetryPolicy

POD_ENV = {E.POOL: "minilm", E.POD_NAMESPACE: "team-a", E.POD_NAME: "lorafleet-minilm-abc",
           E.CACHE_DIR: "/cache", E.RUNTIME_ADMIN_URL: "http://127.0.0.1:8001", E.MODEL_URI: "s3://models/minilm/",
           E.MODEL_SHA256: "a" * 64, E.S3_ENDPOINT: "http://minio:9000", E.MAX_RANK: "32",
           E.MAX_ADAPTER_BYTES: "64Mi", E.DISK_BYTES: "20Gi", E.METRICS_PORT: "9191"}


def test_environment_sets_everything_and_flags_override(monkeypatch):
    for k, v in POD_ENV.items():
        monkeypatch.setenv(k, v)
    a = parse_args([])
    assert (a.pool, a.namespace, a.pod, a.cache_dir) == ("minilm", "team-a", "lorafleet-minilm-abc", "/cache")
    assert (a.model_uri, a.model_sha256, a.s3_endpoint) == ("s3://models/minilm/", "a" * 64, "http://minio:9000")
    assert (a.max_rank, a.max_adapter_bytes, a.disk_bytes, a.metrics_port) == (32, 64 << 20, 20 << 30, 9191)
    assert parse_args(["--pool", "other", "--disk-bytes", "1Gi"]).pool == "other"


def test_missing_settings_are_named(monkeypatch, capsys):
    for k in POD_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        parse_args([])
    err = capsys.readouterr().err
    assert "--pool (POOL)" in err and "--namespace (POD_NAMESPACE)" in err and "--pod (POD_NAME)" in err


def test_a_model_uri_needs_its_digest(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--pool", "p", "--namespace", "n", "--pod", "x", "--model-uri", "s3://m/x/", "--model-sha256", ""])
    assert "MODEL_SHA256" in capsys.readouterr().err


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    r = RetryPolicy(base=1.0, cap=8.0)
    for attempt, full in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = [r.delay(attempt) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 100  # replicas do not retry in step

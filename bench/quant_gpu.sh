#!/usr/bin/env bash
# NF4 and int8 vs bfloat16 on a GPU: base weight bytes, CUDA memory and the decode step of the torch
# engine with every row a different adapter (bench/quant_bench.py), as one command.
#
#   bench/quant_gpu.sh prepare   here (PyPI reachable): puts what the GPU machine's Python 3.12 lacks
#                                (bitsandbytes with its CUDA 13.0 library only, pydantic) into .qdeps/,
#                                ignored by git, about 20 MiB: carry it with the run
#   bench/quant_gpu.sh           on the GPU machine: writes the JSON line to $OUT/quant_gpu.json
#                                (or ./quant_gpu.json) and its log beside it
#
# The shape is Llama-3-8B's layer (hidden 4096, 32 heads, 8 KV heads, MLP 14336) with 8 layers
# (about 1.7 B parameters in the decoder: ~3.5 GB in bfloat16), 32 rows of 512 prompt tokens,
# rank-16 adapters on q/k/v/o, 50 timed steps per engine; writing the model and loading it three
# times takes a few minutes, most of it on the CPU.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
BNB=bitsandbytes==0.50.2
PYDANTIC="pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5"

if [ "${1:-}" = prepare ]; then
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.qdeps/' "$exclude" 2>/dev/null || echo '/.qdeps/' >>"$exclude"
  rm -rf .qdeps
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --target .qdeps $BNB $PYDANTIC
  # The GPU machine's torch is built for CUDA 13.0: keep that library and the CPU one.
  find .qdeps/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
    ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete
  du -sh .qdeps
  exit 0
fi

[ -d .qdeps/bitsandbytes ] || { echo "no .qdeps/: run 'bench/quant_gpu.sh prepare' first and carry .qdeps" >&2; exit 2; }
out=${OUT:-.}
export PYTHONPATH="$root/.qdeps:$root/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/quant_gpu.log"
python3 -c 'import torch, bitsandbytes, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "bnb", bitsandbytes.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1 | tee -a "$out/quant_gpu.log"
python3 bench/quant_bench.py --device cuda --dtype bfloat16 --quantizations none,nf4,int8 \
  --hidden 4096 --heads 32 --kv-heads 8 --intermediate 14336 --layers 8 --max-len 1024 \
  --rows 32 --rank 16 --ctx 512 --steps 50 --threads 8 "${@}" \
  2>>"$out/quant_gpu.log" | tee "$out/quant_gpu.json"

#!/usr/bin/env bash
# The GPU check run on a lent CUDA machine (no network there): the test suite with CUDA visible (the
# trainer then runs on the GPU), then the speed benchmarks against PEFT on the same GPU.
# Wheels missing on that machine travel in .whl/ (see docs/benchmarks.md, "On a GPU").
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/gpu.txt"
# Tests that need the packaged real models (not carried: too large) are left out by name.
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -k "not smollm2 and not minilm and not examples and not demo" \
  -n 8 2>&1 | tee "$OUT/tests.txt" | tail -25
timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks --device cuda --repeats 1 --no-docs \
  --case gpt2-small --case llama-220m --case mixed-batch 2>&1 | tee "$OUT/bench.txt" | tail -40
cp benchmarks/results/latest.json "$OUT/cuda-latest.json"; cp benchmarks/results/latest.md "$OUT/cuda-latest.md"

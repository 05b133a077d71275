#!/usr/bin/env bash
# Run ON the lent GPU (device tool), from the repo root, with .whl carried (scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=540)
# Writes bench tables and JSON to $OUT. Three configurations of the sdxl-realism iteration at
# micro-batch 5, 1024px: the preset as is, with 8-bit AdamW, and at micro-batch 4 (for comparison).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m nitrofusion bench --out "$OUT/bench-preset.json" 2>&1 | tee "$OUT/bench-preset.md"
python3 -m nitrofusion bench --set student_optim.kind=adamw8bit --out "$OUT/bench-8bit.json" 2>&1 \
  | tee "$OUT/bench-8bit.md"

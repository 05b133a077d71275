#!/usr/bin/env bash
# Run ON the lent GPU (device tool), from the repo root, with .whl carried (scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=580)
# Writes bench tables and JSON to $OUT, each command bounded so the whole stays under 9 minutes and what
# finished comes back: the sdxl-realism iteration at micro-batch 5, 1024px (its table, then the step part by
# part); a LoRA student at micro-batch 2; the memory model's prediction beside them; stock diffusers vs the
# fast 1-step path; 8-bit AdamW last.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 150 python3 -m nitrofusion bench --out "$OUT/bench-preset.json" 2>&1 | tee "$OUT/bench-preset.md"
# LoRA student (issue 13): sdxl-realism-lora's setting (rank 64, micro-batch 2) on the same iteration
timeout 120 python3 -m nitrofusion bench --set student.kind=lora --set student.rank=64 --set student.alpha=64 \
  --set micro_batch=2 --out "$OUT/bench-lora.json" 2>&1 | tee "$OUT/bench-lora.md"
timeout 40 python3 -m nitrofusion bench --memory --out "$OUT/memory.json" 2>&1 | tee "$OUT/memory.md"
# fast one-step inference (issue 14): compiles take minutes, so bounded
timeout 180 python3 -m nitrofusion bench --inference --out "$OUT/inference.json" 2>&1 | tee "$OUT/inference.md"
timeout 80 python3 -m nitrofusion bench --set student_optim.kind=adamw8bit --out "$OUT/bench-8bit.json" 2>&1 \
  | tee "$OUT/bench-8bit.md"

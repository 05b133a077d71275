#!/usr/bin/env bash
# Run ON the lent GPU (device tool), from the repo root, with .whl carried (scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=540)
# Writes bench tables and JSON to $OUT. Three configurations of the sdxl-realism iteration at
# micro-batch 5, 1024px: the preset as is and with 8-bit AdamW; a LoRA student at micro-batch 2; the memory model.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m nitrofusion bench --out "$OUT/bench-preset.json" 2>&1 | tee "$OUT/bench-preset.md"
python3 -m nitrofusion bench --set student_optim.kind=adamw8bit --out "$OUT/bench-8bit.json" 2>&1 \
  | tee "$OUT/bench-8bit.md"
# LoRA student (issue 13): the sdxl-realism-lora setting (rank 64, micro-batch 2) on the same iteration, and the
# memory model's prediction for every preset (meta device, CPU seconds) to set beside the measured peaks
python3 -m nitrofusion bench --set student.kind=lora --set student.rank=64 --set student.alpha=64 \
  --set micro_batch=2 --out "$OUT/bench-lora.json" 2>&1 | tee "$OUT/bench-lora.md"
python3 -m nitrofusion bench --memory --out "$OUT/memory.json" 2>&1 | tee "$OUT/memory.md"
# Fast one-step inference (issue 14): stock diffusers eager vs generate --fast, 1024 and 512 px (compiles take
# minutes: last, and bounded, so the tables above come back whatever happens here)
timeout 300 python3 -m nitrofusion bench --inference --out "$OUT/inference.json" 2>&1 | tee "$OUT/inference.md"

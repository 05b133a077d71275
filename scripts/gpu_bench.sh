#!/usr/bin/env bash
# Run ON the lent GPU (device tool), from the repo root, with .whl carried (scripts/gpu_wheels.sh):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=540)
# One log (bench.md) and one JSON per bench come back in $OUT (the device tool returns at most 8 files). Each
# command is bounded so the whole stays under 9 minutes and what finished comes back, most wanted first: the first
# real end-to-end run (scripts/gpu_e2e.py: sdxl-realism-lora as shipped through accelerate launch, SIGKILL and
# resume, every export, generate --fast; its steps run at --size tiny in the test suite), then 1-step
# generation , stock diffusers eager against our runtime (runtime.py, the stock images without the
# pipeline's per-call module walks), the fast path (compiled by region: 27 s at 1024 px on an H100), the fast path
# replayed from CUDA graphs, and that with a tiny VAE; each row printed as measured, batch 8 last, with each path's
# largest pixel difference from stock. Then the LoRA student's iteration at micro-batch 2 (its 70 and 150 s bounds
# ran out twice, building the models twice: the iteration table, then the step profile). Measured on H100s on
# 2026-11-27 (docs/guide/bench.md), so not repeated: the sdxl-realism iteration with AdamW at micro-batch 2 and with 8-bit
# AdamW at micro-batch 5 (`bench --set student_optim.kind=adamw8bit`); the memory model runs on the meta device
# (`bench --memory`). `bash scripts/gpu_bench.sh sd3` runs the SD3.5 medium LoRA iteration instead, beside its
# memory model (not yet run on a GPU). `bash scripts/gpu_bench.sh flux [MB]` runs the flux-dev-lora iteration on
# random-weight FLUX.1-dev architectures (the 11.9B transformer built in fp32 on the GPU, then bf16; T5-XXL released
# after the pairs) at micro-batch MB (default 2, the preset's; 1 if 2 runs out of memory), its memory model printed
# first (CPU, seconds; it predicts 40.3 GiB at micro-batch 2). NEVER RUN YET: written without a GPU, so its time
# bound (420 s: the build, 28-step teacher pairs, the iteration) is a guess.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
LOG=$OUT/bench.md
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$LOG"
# diffusers warns at every .to(dtype) of a model built in fp32 ("modules ... kept in float32: []"): noise here
quiet() { grep --line-buffered -v "should be kept in float32"; }
section() { printf '\n## %s\n\n' "$1" | tee -a "$LOG"; }
if [ "${1:-}" = sd3 ]; then  # `bash scripts/gpu_bench.sh sd3`: only the SD3.5 medium iteration (never run yet)
  section "training iteration: sd35-medium-lora on SD3.5 medium's architectures, T5 released (micro-batch 2)"
  timeout 400 python3 -m nitrofusion bench --family sd3 --set student.kind=lora --set student.rank=64 \
    --set student.alpha=64 --set micro_batch=2 --out "$OUT/bench-sd3-lora.json" 2>&1 | quiet | tee -a "$LOG"
  python3 -m nitrofusion bench --family sd3 --memory 2>&1 | quiet | tee -a "$LOG"
  exit 0
fi
if [ "${1:-}" = flux ]; then  # `bash scripts/gpu_bench.sh flux [MB]`: only the FLUX.1-dev iteration (never run yet)
  MB=${2:-2}
  section "memory model: flux-dev-lora (T5 cached, resident) and a full student under FSDP x8 (per GPU)"
  python3 -m nitrofusion bench --family flux --memory --fsdp 8 --set micro_batch="$MB" \
    --out "$OUT/memory-flux.json" 2>&1 | quiet | tee -a "$LOG"
  section "training iteration: flux-dev-lora on FLUX.1-dev's architectures, T5 released (micro-batch $MB)"
  timeout 420 python3 -m nitrofusion bench --family flux --iters 2 --set micro_batch="$MB" \
    --out "$OUT/bench-flux-lora-mb$MB.json" 2>&1 | quiet | tee -a "$LOG"
  exit 0
fi
section "end to end: sdxl-realism-lora as shipped, killed and resumed, exported, generated (scripts/gpu_e2e.py)"
timeout 400 python3 scripts/gpu_e2e.py --out /tmp/e2e 2>&1 | quiet | tee -a "$LOG"
cp /tmp/e2e/e2e.json "$OUT/e2e.json" 2>/dev/null
section "inference: stock eager vs fast"
timeout 150 python3 -m nitrofusion bench --inference --out "$OUT/inference.json" 2>&1 | quiet | tee -a "$LOG"
section "training iteration: LoRA student (rank 64, micro-batch 2)"
timeout 190 python3 -m nitrofusion bench --set student.kind=lora --set student.rank=64 --set student.alpha=64 \
  --set micro_batch=2 --out "$OUT/bench-lora.json" 2>&1 | quiet | tee -a "$LOG"

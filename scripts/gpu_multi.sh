#!/usr/bin/env bash
# Several GPUs (the device tool's nvidia-h200-x2): LoRA scaling 1 -> N GPUs and FSDP2 full
# fine-tuning through `sloth bench train --nproc`, then (TESTS) the distributed tests on NCCL.
# Usage: [SHAPE=llama-8b SEQ=2048 BATCH=4 NPROC=1,2 FULL_NPROC=2 FULL_BATCH=4 PART=bench|tests]
#        bash scripts/gpu_multi.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache} NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpus.txt"
if [ "${PART:-bench}" = bench ]; then
  python3 -m sloth_core bench train --shape "${SHAPE:-llama-8b}" --seq "${SEQ:-2048}" \
    --batch "${BATCH:-4}" --systems sloth --nproc "${NPROC:-1,2}" \
    --json "$out/bench-multi.json" --markdown "$out/bench-multi.md" 2>&1 | tail -12
  python3 -m sloth_core bench train --shape "${SHAPE:-llama-8b}" --seq "${SEQ:-2048}" \
    --batch "${FULL_BATCH:-4}" --systems sloth:on --full --nproc "${FULL_NPROC:-2}" \
    --json "$out/bench-fsdp.json" --markdown "$out/bench-fsdp.md" 2>&1 | tail -12
  cat "$out/bench-multi.md" "$out/bench-fsdp.md"
else
  python3 -m pytest ${TESTS:-tests/train/test_train_distributed.py} -q -p no:cacheprovider \
    2>&1 | tee "$out/tests-multi.log" | tail -15
fi

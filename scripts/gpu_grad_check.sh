#!/usr/bin/env bash
# Do sloth's LoRA gradients on CUDA agree with the float32 reference (transformers + PEFT)?
# Session 23 found sloth bf16's far off on CUDA (cosine 0.32) where on the CPU they agree
# (0.99997), and traced it to the kept attention (now off on CUDA unless asked). The kept
# attention's tests at a real head size, the gradient check of each run in RUNS (see
# scripts/fp8_grad_check.py --runs: -kept/-nokept, -clone, -sync), the op references
# (SLOTH_KERNELS=torch) beside the kernels, and the bf16 training over 40 steps against hf's.
#   [RUNS=...] [REPEATS=2] [SKIP=tests,torch,bench] bash scripts/gpu_grad_check.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/dev/shm/sloth-cache} TOKENIZERS_PARALLELISM=false
skip() { [[ ",${SKIP:-}," == *",$1,"* ]]; }
if ! skip tests; then
  timeout 120 python3 -m pytest -p no:cacheprovider -q tests/test_kept_attention.py \
    > "$out/kept-attention-tests.txt" 2>&1
  echo "kept attention tests: rc=$? $(tail -1 "$out/kept-attention-tests.txt")"
  grep "^FAILED\|AssertionError" "$out/kept-attention-tests.txt" | cut -c1-300 | head -8
fi
small="--layers 2 --vocab 32000 --seq 128 --batch 2 --by-layer"
timeout 150 python3 scripts/fp8_grad_check.py $small \
  --runs "${RUNS:-hf,sloth,sloth-nokept,sloth-kept,sloth:on,sloth:off}" \
  --repeats "${REPEATS:-2}" > "$out/grads-kernels.txt" 2>&1
echo "kernels: rc=$?"; grep "^|\|^llama\|^rel\|Error" "$out/grads-kernels.txt" | cut -c1-170
if ! skip torch; then
  SLOTH_KERNELS=torch timeout 100 python3 scripts/fp8_grad_check.py $small --runs sloth \
    > "$out/grads-torch.txt" 2>&1
  echo "op references: rc=$?"; grep "^|\|^llama\|^rel\|Error" "$out/grads-torch.txt" | cut -c1-170
fi
if ! skip bench; then
  timeout 300 python3 -m sloth_core bench train --shape llama-8b --seq 2048 --batch 4 \
    --steps 40 --warmup 2 --systems 'sloth[SLOTH_KEPT_ATTENTION=0],sloth[SLOTH_KEPT_ATTENTION=1],hf' \
    --json "$out/bf16-40.json" --markdown "$out/bf16-40.md" > "$out/bf16-40.log" 2>&1
  echo "bf16 40 steps: rc=$?"; grep "^|" "$out/bf16-40.md"
fi
exit 0

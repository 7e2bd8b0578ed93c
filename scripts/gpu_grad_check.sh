#!/usr/bin/env bash
# Do sloth's LoRA gradients on CUDA agree with the float32 reference (transformers + PEFT)?
# Session 23 found sloth bf16's far off on CUDA (cosine 0.32) where on the CPU they agree
# (0.99997): each checkpointing mode, each run twice, the op references (SLOTH_KERNELS=torch)
# beside the kernels, and the bf16 training over 40 steps against hf's.
#   bash scripts/gpu_grad_check.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/dev/shm/sloth-cache} TOKENIZERS_PARALLELISM=false
timeout 120 python3 -m pytest -p no:cacheprovider -q tests/test_kept_attention.py \
  > "$out/kept-attention-tests.txt" 2>&1
echo "kept attention tests: rc=$? $(tail -1 "$out/kept-attention-tests.txt")"
grep "^FAILED\|^E  .*errors\|AssertionError" "$out/kept-attention-tests.txt" | cut -c1-300 | head -8
small="--layers 2 --vocab 32000 --seq 128 --batch 2 --by-layer"
timeout 150 python3 scripts/fp8_grad_check.py $small --runs hf,sloth,sloth-nokept,sloth:on,sloth:off \
  --repeats 2 > "$out/grads-kernels.txt" 2>&1
echo "kernels: rc=$?"; grep "^|\|^llama\|^rel\|Error" "$out/grads-kernels.txt" | cut -c1-170
SLOTH_KERNELS=torch timeout 100 python3 scripts/fp8_grad_check.py $small --runs sloth \
  > "$out/grads-torch.txt" 2>&1
echo "op references: rc=$?"; grep "^|\|^llama\|^rel\|Error" "$out/grads-torch.txt" | cut -c1-170
timeout 300 python3 -m sloth_core bench train --shape llama-8b --seq 2048 --batch 4 --steps 40 \
  --warmup 2 --systems sloth,sloth:off,hf --json "$out/bf16-40.json" \
  --markdown "$out/bf16-40.md" > "$out/bf16-40.log" 2>&1
echo "bf16 40 steps: rc=$?"; grep "^|" "$out/bf16-40.md"
exit 0

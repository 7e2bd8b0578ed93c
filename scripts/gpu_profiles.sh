#!/usr/bin/env bash
# Where sloth's training step goes on a CUDA machine, for the rows that miss: the bf16 row
# (its MFU) and the fp8 row, llama-8b 2048x4 (scripts/profile_train.py, sloth only; its
# baseline's profile is in docs/profile-train-llama-8b-h100.txt).
# Usage: [QUANTS="bf16 fp8"] bash scripts/gpu_profiles.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}
for quant in ${QUANTS:-bf16 fp8}; do
  option=(); [ "$quant" != bf16 ] && option=(--quantization "$quant")
  timeout 280 python3 scripts/profile_train.py --systems sloth "${option[@]}" \
    > "$out/profile-train-$quant.txt" 2>&1
  echo "$quant: rc=$?"; grep -A12 "^==== " "$out/profile-train-$quant.txt" | cut -c1-150
done
exit 0

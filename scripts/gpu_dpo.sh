#!/usr/bin/env bash
# The DPO row on a CUDA machine (the device tool's GPU): the shared-prompt and kept-varlen
# tests on CUDA (bf16 through the flash varlen path), then `sloth bench dpo` with the prompt shared
# (sloth's default), the rows apart (sloth[SLOTH_BENCH_SHARE_PROMPT=0]) and TRL's
# DPOTrainer (hf), in one run; with PROFILE=1 then scripts/profile_dpo.py (where the step's
# time goes, the prompt shared against the rows apart) into OUT_DIR/profile-dpo.txt.
# QUANT=fp8 (or nf4): the base weights so (sloth bench dpo --quantization).
# SYSTEMS: other systems to run, e.g. 'sloth,sloth[SLOTH_SHARED_ATTENTION=split],hf' (the
# shared rows' attention as whole causal sequences on cuDNN, against the varlen segments).
# Usage: [BUDGET=20] [QUANT=fp8] [SKIP_TESTS=1] [PROFILE=1] [SYSTEMS=...] bash scripts/gpu_dpo.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export TOKENIZERS_PARALLELISM=false SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python3 -m pytest -p no:cacheprovider -q -rs tests/test_shared_prompt.py \
    tests/test_kept_varlen.py > "$out/shared-prompt-tests.txt" 2>&1
  echo "shared-prompt tests: rc=$? $(tail -1 "$out/shared-prompt-tests.txt")"
fi
options=()
[ -n "${BUDGET:-}" ] && options+=(--memory-budget-gib "$BUDGET")
[ -n "${QUANT:-}" ] && options+=(--quantization "$QUANT")
tag=dpo${BUDGET:+-b$BUDGET}${QUANT:+-$QUANT}
timeout 420 python3 -m sloth_core bench dpo --shape llama-8b --seq 1024 --batch 4 --steps 10 \
  --warmup 3 --systems "${SYSTEMS:-sloth,sloth[SLOTH_BENCH_SHARE_PROMPT=0],hf}" "${options[@]}" \
  --json "$out/$tag.json" --markdown "$out/$tag.md" --plot "$out/$tag.png" > "$out/$tag.log" 2>&1
tail -20 "$out/$tag.log"  # a file, not a pipe: a call stopped by its limit still brings it
if [ -n "${PROFILE:-}" ]; then
  timeout 300 python3 scripts/profile_dpo.py ${BUDGET:+--budget-gib "$BUDGET"} \
    > "$out/profile-dpo.txt" 2>&1
  echo "profile: rc=$?"; grep -A3 "^==== " "$out/profile-dpo.txt" | grep -v "^--" | head -20
fi
exit 0

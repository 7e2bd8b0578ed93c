#!/usr/bin/env bash
# `sloth bench train` on a CUDA machine (the device tool's H200), repo installed in place.
# Usage: [SHAPE=llama-8b SEQ=2048 BATCH=4 QUANT=nf4 SYSTEMS=sloth,sloth:on,hf]
#        [TESTS="plugins/sloth-llama/tests"] bash scripts/gpu_train_bench.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}  # the bench model, written once
if [ -n "${TESTS:-}" ]; then
  python3 -m pytest $TESTS -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -5
fi
python3 -m sloth_core bench train --shape "${SHAPE:-llama-8b}" --seq "${SEQ:-2048}" \
  --batch "${BATCH:-4}" --systems "${SYSTEMS:-sloth,hf}" ${QUANT:+--quantization "$QUANT"} --json "$out/bench-train.json" --markdown "$out/bench-train.md" 2>&1 \
  | tail -15
cat "$out/bench-train.md"

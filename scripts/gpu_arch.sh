#!/usr/bin/env bash
# The architecture plugins' tests on a CUDA machine (real Triton kernels, LLM-length rows,
# Gemma 2's flex-attention softcap path), then `sloth bench train` for the given shapes.
# Usage: [TESTS="plugins/sloth-gemma ..."] [SHAPES="qwen3-8b gemma2-9b"] bash scripts/gpu_arch.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}
if [ -n "${TESTS:-}" ]; then
  timeout "${TEST_TIMEOUT:-300}" python3 -m pytest $TESTS -q -p no:cacheprovider -x \
    2>&1 | tee "$out/tests.log" | tail -8
fi
for shape in ${SHAPES:-}; do
  timeout "${BENCH_TIMEOUT:-540}" python3 -m sloth_core bench train --shape "$shape" \
    --seq "${SEQ:-2048}" --batch "${BATCH:-4}" --json "$out/bench-train-$shape.json" \
    --markdown "$out/bench-train-$shape.md" 2>&1 | tail -12
  cat "$out/bench-train-$shape.md" 2>/dev/null
  rm -rf "$SLOTH_CACHE/bench-models/$shape"  # the next shape needs the disk
done

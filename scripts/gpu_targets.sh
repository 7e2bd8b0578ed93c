#!/usr/bin/env bash
# The performance targets on a CUDA machine (the device tool's H200): sloth vs hf, each row
# of `sloth bench train --targets`. Usage: [ROWS=bf16,nf4] bash scripts/gpu_targets.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}  # the bench models, written once
tag=${ROWS:-all}; tag=${tag//,/-}
python3 -m sloth_core bench train --targets "${ROWS:-all}" --json "$out/targets-$tag.json" \
  --markdown "$out/targets-$tag.md" 2>&1 | tail -25

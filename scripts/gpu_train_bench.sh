#!/usr/bin/env bash
# `sloth bench train` on a CUDA machine (the device tool's H200), repo installed in place.
# Usage: [SHAPE=llama-8b SEQ=2048 BATCH=4] [TESTS="plugins/sloth-llama/tests"] bash scripts/gpu_train_bench.sh [OUT_DIR]
set -uo pipefail
out=${1:-${OUT:-/tmp/sloth-gpu}}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
editable=$(for d in . kernels plugins/*/; do [ -f "$d/pyproject.toml" ] && printf -- '-e %s ' "$d"; done)
python3 -m pip install -q --no-deps --no-build-isolation $editable > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}
if [ -n "${TESTS:-}" ]; then
  python3 -m pytest $TESTS -q -p no:cacheprovider 2>&1 | tee "$out/tests.log" | tail -5
fi
python3 -m sloth_core bench train --shape "${SHAPE:-llama-8b}" --seq "${SEQ:-2048}" \
  --batch "${BATCH:-4}" --json "$out/bench-train.json" --markdown "$out/bench-train.md" 2>&1 \
  | tail -15
cat "$out/bench-train.md"

#!/usr/bin/env bash
# The MoE row on a CUDA machine: the grouped-GEMM kernels' tests on CUDA, their tiles timed
# (scripts/moe_tiles_gpu.py), then the qwen3-30b-a3b row of `sloth bench train --targets`
# (sloth and hf + PEFT; the model, 57 GiB, under SLOTH_CACHE, /dev/shm by default).
# MEMORY=1: then what the step's peak memory is made of (scripts/memory_peak_gpu.py, sloth).
# Usage: [SKIP_TESTS=1] [SKIP_TILES=1] [SKIP_ROW=1] [MEMORY=1] [SYSTEMS=sloth] [BATCH=2] [QUANTIZATION=fp8] [NAME=moe] bash scripts/gpu_moe.sh [OUT_DIR]
# SYSTEMS: `sloth bench train` on the shape with those systems instead of the targets row
# (sloth alone where hf + PEFT cannot fit, as on an 80 GB H100 at batch 2; BATCH=1
# SYSTEMS=sloth,hf may fit both there: a figure beside the row, not the row).
# QUANTIZATION=fp8: sloth's base weights, the experts' included, in FP8 (hf stays bf16);
# NAME: the stem of that run's files ($out/NAME.json, .md, .log).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/dev/shm/sloth-cache}
df -h / /dev/shm > "$out/disk.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  # About 165 s on a fresh H100 (Triton compiles every kernel variant once), 75 s warm.
  timeout 200 python3 -m pytest -p no:cacheprovider -q kernels/tests/test_moe.py \
    > "$out/moe-tests.txt" 2>&1
  echo "moe kernel tests: rc=$? $(tail -1 "$out/moe-tests.txt")"
fi
if [ -z "${SKIP_TILES:-}" ]; then
  timeout 200 python3 scripts/moe_tiles_gpu.py --json "$out/moe-tiles.json" \
    > "$out/moe-tiles.txt" 2>&1
  echo "tiles: rc=$?"; grep -o '"variant[^{]*"ms": [0-9.]*' "$out/moe-tiles.txt"; tail -2 "$out/moe-tiles.txt"
fi
# The fastest variant of the timing above, for the row (SLOTH_MOE_TILE and SLOTH_MOE_GEMM;
# the defaults otherwise).
best=$(python3 -c "
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))['results'] if 'ms' in r and 'fp32' not in r['variant']]
b = min(rows, key=lambda r: r['ms'])
print(','.join(map(str, b['tile'])), 'grouped_mm' if 'grouped_mm' in b['variant'] else 'triton')
" "$out/moe-tiles.json" 2>/dev/null)
if [ -n "$best" ]; then
  export SLOTH_MOE_TILE=${best% *} SLOTH_MOE_GEMM=${best#* }
  echo "SLOTH_MOE_TILE=$SLOTH_MOE_TILE SLOTH_MOE_GEMM=$SLOTH_MOE_GEMM"
fi
if [ -n "${SKIP_ROW:-}" ]; then
  :  # the tests and tiles alone: the row in a call of its own (SLOTH_MOE_TILE/GEMM set)
elif [ -n "${SYSTEMS:-}" ]; then
  name=${NAME:-moe}
  python3 -m sloth_core bench train --shape qwen3-30b-a3b --seq 2048 --batch "${BATCH:-2}" --steps 10 \
    --warmup 3 --systems "$SYSTEMS" ${QUANTIZATION:+--quantization "$QUANTIZATION"} \
    --json "$out/$name.json" --markdown "$out/$name.md" > "$out/$name.log" 2>&1
  tail -12 "$out/$name.log"
else
  ROWS=moe bash "$(dirname "$0")/gpu_targets.sh" "$out"
fi
if [ -n "${MEMORY:-}" ]; then
  timeout 300 python3 scripts/memory_peak_gpu.py --shape qwen3-30b-a3b --batch "${BATCH:-2}" \
    > "$out/moe-memory.txt" 2>&1
  echo "memory: rc=$?"; grep -A12 "^==== " "$out/moe-memory.txt" | cut -c1-160
fi
exit 0

#!/usr/bin/env bash
# Kernel tests and `sloth bench kernels` on a CUDA machine, in its own python3 (the
# device tool's H200: torch 2.11, triton 3.6). Carry bitsandbytes as a wheel in .whl/.
# Usage: [TESTS="kernels/tests/test_x.py ..."] [OPS=case,case] bash scripts/gpu_kernels.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m sloth_core doctor --json > "$out/doctor.json"
# Every kernel test, the LLM-sized `gpu` ones included, on the real GPU.
python3 -m pytest ${TESTS:-kernels/tests} -q -p no:cacheprovider --junitxml="$out/kernel-tests.xml" \
  2>&1 | tee "$out/kernel-tests.log" | tail -15
python3 -m sloth_core bench kernels ${OPS:+--ops $OPS} --json "$out/bench-kernels.json" \
  --markdown "$out/bench-kernels.md" 2>"$out/bench-progress.log"
cat "$out/bench-kernels.md"

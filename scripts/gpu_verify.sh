#!/usr/bin/env bash
# The performance issue's re-verification on one GPU (the device tool's H200), in two parts
# that each fit one 10-minute call: PART=gpu runs every `gpu`-marked test (kernels at LLM
# sizes, the architectures' GPU checks, inference, sloth-bnb) and then the demo's DPO and
# GRPO on CUDA; PART=models runs every parity and convergence test of the suite on the GPU
# (`nox -s gpu`'s second half: real Triton kernels, bf16 bounds). Usage:
# PART=gpu|models [K="pytest -k expression"] bash scripts/gpu_verify.sh [OUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export TOKENIZERS_PARALLELISM=false SLOTH_CACHE=/tmp/sloth-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
python3 -c "import torch, triton, transformers, peft; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__)" >> "$out/gpu.txt"
# The device image has no gguf unless .whl/ carries it (sloth-gguf's tests import it at
# collection): without it, leave them out rather than stop the whole collection.
ignore=()
python3 -c "import gguf" 2>/dev/null || ignore+=(--ignore=plugins/sloth-gguf/tests)
if [ "${PART:-gpu}" = gpu ]; then
  timeout "${TEST_TIMEOUT:-420}" python3 -m pytest -p no:cacheprovider -q -m gpu -rs \
    "${ignore[@]}" --junitxml="$out/gpu-tests.xml" > "$out/gpu-tests.txt" 2>&1
  echo "gpu tests: rc=$? $(tail -1 "$out/gpu-tests.txt")"
  for method in dpo grpo; do
    timeout 60 python3 -m sloth_core train --demo --method "$method" --output-dir "/tmp/demo-$method" \
      --save-method none --quiet > "$out/demo-$method.txt" 2>&1
    echo "demo $method: rc=$? $(grep -E 'eval after' "$out/demo-$method.txt")"
    cp "/tmp/demo-$method/metrics.jsonl" "$out/demo-$method-metrics.jsonl" 2>/dev/null
  done
else
  # Four workers on the one card where pytest-xdist came in .whl/ (session 22: 271 tests).
  workers=()
  python3 -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-4}")
  timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -p no:cacheprovider -q -m "not gpu" "${ignore[@]}" "${workers[@]}" \
    -k "${K:-parity or converg}" -rs --junitxml="$out/model-tests.xml" > "$out/model-tests.txt" 2>&1
  echo "model tests: rc=$? $(tail -1 "$out/model-tests.txt")"
fi
grep -E "FAILED|ERROR" "$out"/*-tests.txt | head -30
exit 0  # the grep above finds nothing when every test passed

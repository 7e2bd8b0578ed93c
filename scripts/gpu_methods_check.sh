#!/usr/bin/env bash
# On the GPU machine (issues 17-19): the Triton kernels' GPU tests for token_log_probs,
# moe_experts, the norms and the losses; sloth bench kernels for token_log_probs; the
# demo's DPO and GRPO runs on CUDA (the Triton log-prob kernel inside a training run,
# sampling with a KV cache on the GPU). Writes everything under $OUT (or $1).
set -u
source scripts/gpu_env.sh "${1:-${OUT:-/tmp/sloth-gpu}}"
export TOKENIZERS_PARALLELISM=false SLOTH_CACHE=/tmp/sloth-cache
python3 -m pytest -p no:cacheprovider -q -m gpu kernels/tests/test_log_probs.py \
  kernels/tests/test_moe.py kernels/tests/test_norms.py kernels/tests/test_cross_entropy.py \
  kernels/tests/test_fused_linear_cross_entropy.py > "$out/gpu-kernels.txt" 2>&1
echo "gpu kernel tests: rc=$? $(tail -1 "$out/gpu-kernels.txt")"
python3 -m sloth_core bench kernels --ops token_log_probs,fused_linear_cross_entropy --no-compile \
  --json "$out/bench-kernels-logprobs.json" --markdown "$out/bench-kernels-logprobs.md" \
  > "$out/bench.txt" 2>&1
echo "bench: rc=$?"
for method in dpo grpo; do
  python3 -m sloth_core train --demo --method "$method" --output-dir "/tmp/demo-$method" \
    --save-method none --quiet > "$out/demo-$method.txt" 2>&1
  echo "demo $method: rc=$? $(grep -E 'eval after' "$out/demo-$method.txt")"
  cp "/tmp/demo-$method/metrics.jsonl" "$out/demo-$method-metrics.jsonl" 2>/dev/null
done

#!/usr/bin/env bash
# The performance targets on a CUDA machine (the device tool's H200): sloth vs hf, each row
# of `sloth bench train --targets`. Usage:
#   [ROWS=bf16,nf4] [JOURNAL=docs/context-journal.jsonl] [TIME_LIMIT=500] \
#     bash scripts/gpu_targets.sh [OUT_DIR]
# A context row's search runs for many minutes: with JOURNAL (a path in the repo, so that
# it travels to the next call) every probe's answer is kept there and copied to OUT_DIR,
# and TIME_LIMIT seconds stop the search in time to write the report; the next call with
# the journal brought back goes on where this one stopped. The moe row's model is 57 GiB:
# on a machine whose disk has less free, SLOTH_CACHE=/dev/shm/sloth-cache (a tmpfs).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" "$@"
export SLOTH_CACHE=${SLOTH_CACHE:-/tmp/sloth-cache}  # the bench models, written once
tag=${ROWS:-all}; tag=${tag//,/-}
extra=()
[ -n "${JOURNAL:-}" ] && extra+=(--journal "$JOURNAL")
[ -n "${TIME_LIMIT:-}" ] && extra+=(--time-limit-s "$TIME_LIMIT")
# Into a file under OUT_DIR, not a pipe: a call stopped by its time limit still brings back
# what the bench printed so far (a pipe's tail is killed with it and shows nothing).
python3 -m sloth_core bench train --targets "${ROWS:-all}" --json "$out/targets-$tag.json" \
  --markdown "$out/targets-$tag.md" --plot "$out/targets-$tag.png" "${extra[@]}" \
  > "$out/targets-$tag.log" 2>&1
tail -40 "$out/targets-$tag.log"
[ -n "${JOURNAL:-}" ] && [ -f "$JOURNAL" ] && cp "$JOURNAL" "$out/"
exit 0

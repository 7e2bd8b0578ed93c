# Sourced by the scripts/gpu_*.sh: carried wheels (.whl/) and every distribution of the
# repo installed in place into the GPU machine's own python3; sets $out.
out=${1:-${OUT:-/tmp/sloth-gpu}}
mkdir -p "$out"
# Sourced again by a script another one runs (gpu_next.sh): installed once a call.
[ -n "${SLOTH_GPU_ENV:-}" ] && return 0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
editable=$(for d in . kernels plugins/*/; do [ -f "$d/pyproject.toml" ] && printf -- '-e %s ' "$d"; done)
python3 -m pip install -q --no-deps --no-build-isolation $editable > "$out/install.log" 2>&1 \
  || { tail -20 "$out/install.log"; exit 1; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 SLOTH_GPU_ENV=1

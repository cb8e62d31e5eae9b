#!/usr/bin/env bash
# Stronger diffusion priors on one GPU in ≤ 9 min (see bench/gpu_prior.py). Usage, with carry=["carry/prior"]:
#   bash bench/gpu_prior.sh [OUT_DIR] [flags for bench/gpu_prior.py]
# Data first, here: python bench/gpu_prior.py --prepare carry/prior. Writes OUT_DIR (default $OUT, else runs/gpu_prior).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_prior}}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
if ! python3 -c "import pytorch_msssim" 2>/dev/null && ls carry/prior/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site carry/prior/whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec timeout 560 python3 bench/gpu_prior.py --out "$out" "$@"

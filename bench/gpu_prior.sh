#!/usr/bin/env bash
# Stronger diffusion priors on one GPU in ≤ 9 min (see bench/gpu_prior.py). Usage, with carry=["carry/prior"]:
#   bash bench/gpu_prior.sh [OUT_DIR] [flags for bench/gpu_prior.py]
# Data first, here: python bench/gpu_prior.py --prepare carry/prior. Writes OUT_DIR (default $OUT, else runs/gpu_prior).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-runs/gpu_prior}}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv 2>/dev/null || echo "no nvidia-smi"
# pytorch-msssim is not in the GPU machine's image: its pure-Python wheel imports straight from PYTHONPATH
for whl in carry/prior/whl/*.whl; do
  [ -e "$whl" ] && export PYTHONPATH="$PWD/$whl${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONUNBUFFERED=1
exec timeout 560 python3 bench/gpu_prior.py --out "$out" "$@"

#!/usr/bin/env bash
# GPU figures in one run (≤ 8 min on one H100; see bench/gpu_suite.py). Usage: bash bench/gpu_suite.sh [OUT_DIR] [flags]
# Writes OUT_DIR/gpu_suite.jsonl (default $OUT, else bench/measured/). Extra flags go to bench/gpu_suite.py.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/measured}}"
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv 2>/dev/null || echo "no nvidia-smi"
exec timeout 480 python3 bench/gpu_suite.py --out "$out" --budget_s 420 "$@"

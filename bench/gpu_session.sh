#!/usr/bin/env bash
# What a lent GPU runs, in one device call of ≤ 10 min: the stronger prior first (issue 8), then the speed suite
# (issue 12) with the time left. Prepare here, in the checkout the device tool sends, then call it there:
#   python bench/gpu_prior.py --prepare carry/prior
#   run(command="bash bench/gpu_session.sh", carry=["carry/prior"], timeout_s=600)
# Returns in $OUT (≤ 8 files): gpu_prior.jsonl, logs.tar.gz, prior_same.pt, prior_big.pt.part*, gpu_suite.jsonl,
# session.log. Here: python bench/gpu_prior.py --unpack <files_at> --to DEST joins the big prior's parts.
set -uo pipefail  # no -e: the suite runs even when the prior step fails
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu_session}"
mkdir -p "$out"
{
  date
  timeout 400 bash bench/gpu_prior.sh "$out" --budget_s 380 --train_minutes 4 || echo "gpu_prior ended with status $?"
  date
  timeout 170 bash bench/gpu_suite.sh "$out" --device cuda --budget_s 130 --quality_dir carry/prior/eval \
    --quality_images 4 || echo "gpu_suite ended with status $?"
  date
  ls -la "$out"
} 2>&1 | tee "$out/session.log"

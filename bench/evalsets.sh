#!/usr/bin/env bash
# Rebuild the team's evaluation and dev sets, byte-identical (make_testset is seeded), from ../shared:
#   synth24        24 cases, 256², circular: 15 BSDS500 test crops + the 9 FFHQ faces, generated + Levin kernels,
#                  σ 5/10/20 /255 (the evaluation set of docs/benchmarks.md; blurry input 22.08 dB aligned)
#   synth24_valid  the same images and kernels with valid (non-periodic) blur (blurry 22.21 dB aligned)
#   dev256         10 cases, 256², circular: BSDS500 test images not in synth24, generated kernels 9–25 px
#                  (the dev set "DEV256" of docs/choices.md and docs/speed.md; blurry 21.50 dB aligned)
# Usage: bash bench/evalsets.sh [OUT_ROOT [SET ...]]   (default /work/evalsets, all three sets; then e.g.
#        --input_dir OUT_ROOT/synth24). dev256 needs synth24 (it avoids synth24's images): it is made too.
# The 128² dev set "DEV128" of earlier screens was made by a scratch script that was not kept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/work/evalsets}
SETS=" ${*:2} "
[ "$SETS" = "  " ] && SETS=" synth24 synth24_valid dev256 "
want() { case "$SETS" in *" $1 "*) return 0;; *) return 1;; esac; }
SHARED=../shared/data
mkdir -p "$OUT"
if want synth24 || want dev256; then
python -m diffusion_em.make_testset --images $SHARED/bsds500/test:15 $SHARED/ffhq \
    --kernels generate $SHARED/kernels/levin09 --seed 0 --boundary circular --out "$OUT/synth24"
fi
if want synth24_valid; then
python -m diffusion_em.make_testset --images $SHARED/bsds500/test:15 $SHARED/ffhq \
    --kernels generate $SHARED/kernels/levin09 --seed 0 --boundary valid --out "$OUT/synth24_valid"
fi
want dev256 || exit 0
# dev256 draws from the BSDS500 test images that synth24 does not use (its case names end in the image id)
SRC="$OUT/dev256_sources"
rm -rf "$SRC" && mkdir -p "$SRC"
used=" $(ls "$OUT/synth24/blurry" | sed -n 's/^[0-9]*_\([0-9]*\)\.npy$/\1/p' | tr '\n' ' ') "
for f in $SHARED/bsds500/test/*.jpg; do
    b=$(basename "$f" .jpg)
    case "$used" in *" $b "*) ;; *) ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$SRC/";; esac
done
python -m diffusion_em.make_testset --images "$SRC:10" --kernels generate --kernel_sizes 9,13,17,21,25 \
    --sigmas 5,10,20 --size 256 --crop random --boundary circular --seed 7 --out "$OUT/dev256"
echo "sets in $OUT:$SETS"

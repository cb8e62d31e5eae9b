"""Aligned PSNR of (1 − w)·A + w·B for a grid of w, where A and B are two result folders on one test set.

How the default `classical_blend` was chosen (docs/choices.md "Blending with a classical deconvolution"): A = a
diffusion run (its images/NAME_diffusion.png when present, else images/NAME.png), B = the hyper-Laplacian
deconvolution with that run's own kernels (`bench/set_with_kernels.py --run A`, then `python -m
diffusion_em.baselines --method hyper_laplacian` on the copy). Both are read as the 8-bit PNGs the runs wrote,
so a figure here can differ from the runner's blend (done before quantisation) by ~0.01 dB.

    python bench/blend_weights.py --set SET --a RUN_A --b RUN_B [--weights 0,0.25,0.5,0.75,1]

Prints one line per case (the PSNR at each w, then the blurry input's) and the means; cases missing from
either folder are skipped and counted.

`--residual_pick` adds a per-image weight chosen without the ground truth: the w of the grid whose blend has
the smallest re-blur residual ‖k ⊛ x_w − y‖² with run A's kernel (kernels/NAME.npy; circular blur, so for
circular test sets), printed as two more columns (the w, its PSNR) and compared with w = 0.5 in the means
(docs/choices.md "Blending with a classical deconvolution": tried, not kept).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.blur import BlurOperator  # noqa: E402
from diffusion_em.results import diffusion_image_file  # noqa: E402
from util.images import image_to_tensor, read_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import aligned_scores  # noqa: E402


def image_of(run: Path, name: str):
    """A run's diffusion image of `name` (before any blend), or None when the run has none."""
    f = diffusion_image_file(run, name)
    return None if f is None else read_image(f)


def residual_pick(run: Path, name: str, y: np.ndarray, mixes: list) -> int:
    """Index of the mixture with the smallest mean squared re-blur residual under run's kernel (circular)."""
    k = torch.from_numpy(np.load(run / "kernels" / f"{name}.npy")).double()
    op = BlurOperator.from_kernel(k, y.shape[:2], 0.0)
    yt = image_to_tensor(y, dtype=torch.float64)
    return int(np.argmin([float(((op.A(image_to_tensor(x, dtype=torch.float64)) - yt) ** 2).mean()) for x in mixes]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="test-set folder with sharp/ and kernel/")
    p.add_argument("--a", required=True, help="result folder A (weight 1 − w)")
    p.add_argument("--b", required=True, help="result folder B (weight w)")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="comma-separated w in [0, 1]")
    p.add_argument("--residual_pick", action="store_true",
                   help="also pick w per image by the smallest re-blur residual with run A's kernel (circular sets)")
    args = p.parse_args(argv)
    ws = [float(w) for w in args.weights.split(",")]
    scores, blurry, picked, skipped = [], [], [], 0
    print("case " + " ".join(f"w={w:g}" for w in ws) + " blurry" + (" picked_w picked" if args.residual_pick else ""))
    for sample in list_inputs(args.set):
        s = load_sample(sample)
        a, b = image_of(Path(args.a), sample.name), image_of(Path(args.b), sample.name)
        if a is None or b is None or s.x_true is None or s.k_true is None:
            skipped += 1
            continue
        ks = int(max(s.k_true.shape))
        mixes = [np.clip((1 - w) * a + w * b, 0, 1) for w in ws]
        row = [aligned_scores(x, s.x_true, ks)["psnr_aligned"] for x in mixes]
        scores.append(row)
        blurry.append(aligned_scores(np.clip(s.y, 0, 1), s.x_true, ks)["psnr_aligned"])
        extra = ""
        if args.residual_pick:
            i = residual_pick(Path(args.a), sample.name, np.clip(s.y, 0, 1), mixes)
            picked.append(row[i])
            extra = f" {ws[i]:g} {row[i]:.2f}"
        print(sample.name + " " + " ".join(f"{v:.2f}" for v in row) + f" {blurry[-1]:.2f}" + extra, flush=True)
    if not scores:
        raise SystemExit("no case has images in both folders")
    m = np.mean(scores, 0)
    below = (np.asarray(scores) < np.asarray(blurry)[:, None]).sum(0)
    print(f"mean ({len(scores)} cases, {skipped} skipped) " + " ".join(f"{v:.2f}" for v in m) + f" {np.mean(blurry):.2f}")
    print("below blurry " + " ".join(str(int(v)) for v in below))
    if picked and 0.5 in ws:
        d = np.asarray(picked) - np.asarray(scores)[:, ws.index(0.5)]
        print(f"residual-picked w: mean {np.mean(picked):.2f}, vs w=0.5 {np.mean(d):+.2f} "
              f"(better on {int((d > 0).sum())} of {len(d)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fit the constants of the practical λ rules of classical.nonblind (λ = C σ² for Tikhonov, λ = C / σ² for
the hyper-Laplacian solver) on BSDS500 *train* crops — never on evaluation images — with the true kernel.

    python bench/calibrate_lambda.py [--n 8] [--out bench/measured/calibrate_lambda.json]

Cases: n train images (seeded 256² crops) × σ ∈ {5, 10, 20}/255 × Levin kernels (round-robin), circular blur.
Prints and writes the mean aligned PSNR for each C on a log grid, and the best C per solver.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from classical import nonblind as NB  # noqa: E402
from util.fft import conv_circular  # noqa: E402
from util.images import read_image, read_kernel  # noqa: E402
from util.outputs import save_json  # noqa: E402
from util.metrics import psnr  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "measured" / "calibrate_lambda.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    files = sorted((args.shared / "data" / "bsds500" / "train").glob("*.jpg"))
    files = [files[i] for i in rng.choice(len(files), args.n, replace=False)]
    kernels = [read_kernel(args.shared / "data" / "kernels" / "levin09" / f"levin_{i}.npy") for i in range(1, 9)]
    grids = {"tikhonov": NB.log_grid(5.0, 1000.0, 4), "hyper_laplacian": NB.log_grid(0.03, 3.0, 2)}
    scores = {m: {c: [] for c in g} for m, g in grids.items()}
    t0 = time.time()
    for i, f in enumerate(files):
        img = read_image(f, clip=True)
        r0, c0 = rng.integers(0, img.shape[0] - 255), rng.integers(0, img.shape[1] - 255)
        x = torch.from_numpy(img[r0:r0 + 256, c0:c0 + 256].transpose(2, 0, 1).astype(np.float64))
        for j, s255 in enumerate((5, 10, 20)):
            k = torch.from_numpy(kernels[(3 * i + j) % 8].astype(np.float64))
            sigma = s255 / 255
            y = conv_circular(x, k) + torch.from_numpy(rng.normal(0, sigma, x.shape))
            for c in grids["tikhonov"]:
                scores["tikhonov"][c].append(psnr(NB.tikhonov(y, k, NB.tikhonov_lambda(sigma, c)), x))
            for c in grids["hyper_laplacian"]:
                scores["hyper_laplacian"][c].append(psnr(NB.hyper_laplacian(y, k, NB.hyper_laplacian_lambda(sigma, c)), x))
        print(f"{i + 1}/{len(files)} images, {time.time() - t0:.0f} s", flush=True)
    out = {"cases": 3 * len(files), "files": [f.name for f in files], "seed": args.seed}
    for m, d in scores.items():
        means = {f"{c:.4g}": float(np.mean(v)) for c, v in d.items()}
        best = max(means, key=means.get)
        out[m] = {"mean_psnr_by_C": means, "best_C": float(best), "best_mean_psnr": means[best]}
        print(m, "best C", best, f"{means[best]:.2f} dB", flush=True)
    save_json(args.out, out)


if __name__ == "__main__":
    main()

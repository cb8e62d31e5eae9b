"""Denoising PSNR of kernel denoisers on held-out generated kernels and Levin's 8 kernels.

    python -m bench.kernel_denoiser_eval [--models models/kernel_denoiser_33.pth:33 models/kernel_denoiser_64.pth:64 ...]

For each `path:size`: kernels = 256 held-out generated kernels of that size (seed 10⁶, disjoint from
training) and Levin's 8 zero-padded centred to size×size; noise σ ∈ {1e-3, 3.16e-3 (= the M-step's
sqrt(λ/β)), 1e-2} (seeded). PSNR per kernel = 10·log10(max(k)²/MSE), averaged, for: the noisy kernel,
its simplex projection P (itself a strong denoiser), and P(D(P(noisy), σ)) — exactly how the M-step uses D.
JSON lines on stdout.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from kernel_denoiser.network import load_kernel_denoiser
from kernel_denoiser.train import evaluate, heldout_kernels, levin_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["models/kernel_denoiser_33.pth:33", "models/kernel_denoiser_64.pth:64",
                                                    "models/kernel_denoiser_33.pth:64"])
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for spec in a.models:
        path, size = spec.rsplit(":", 1)
        size = int(size)
        full = path if os.path.isabs(path) else os.path.join(ROOT, path)
        if not os.path.isfile(full):
            print(json.dumps({"model": path, "skipped": "file not found"}))
            continue
        net = load_kernel_denoiser(full)
        rec = {"model": path, "arch": net.arch, "receptive_field": net.receptive_field, "kernel_size": size,
               "heldout": evaluate(net, heldout_kernels(size))}
        lev = levin_kernels(size, SHARED)
        if lev is not None:
            rec["levin"] = evaluate(net, lev)
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()

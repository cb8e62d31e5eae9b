"""Statistics of generated camera-shake kernels vs real ones (Levin's 8, the authors' 3 samples).

    python -m bench.kernel_stats [--n 1000] [--size 33]

Per kernel (normalised to sum 1): non-zero taps (> 1e-3·max), support extent (larger of the rows/columns
spans of those taps, px) and peak tap. JSON lines: one per real kernel, then percentiles (5/25/50/75/95)
for each set. The authors' pickles are read with util.io.load_pickle_sample (restricted unpickler).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from kernel_denoiser.kernels import camera_shake_kernels, kernel_stats
from util.safe_pickle import load_pickle_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def summary(name, stats):
    out = {"kind": "summary", "set": name, "n": len(stats)}
    for key in ("taps", "extent", "peak"):
        v = np.array([s[key] for s in stats], float)
        out[key] = {"p5": float(np.percentile(v, 5)), "p25": float(np.percentile(v, 25)),
                    "median": float(np.median(v)), "p75": float(np.percentile(v, 75)),
                    "p95": float(np.percentile(v, 95)), "min": float(v.min()), "max": float(v.max())}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--size", type=int, default=33)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sets = {}
    if os.path.isdir(SHARED):
        lev = []
        for f in sorted(glob.glob(os.path.join(SHARED, "data", "kernels", "levin09", "levin_*.npy"))):
            st = kernel_stats(np.load(f))
            lev.append(st)
            print(json.dumps({"kind": "kernel", "set": "levin", "name": os.path.basename(f), **st}))
        sets["levin"] = lev
        au = []
        for f in sorted(glob.glob(os.path.join(SHARED, "data", "paper_testset", "*.pickle"))):
            k = load_pickle_sample(f)["kernel"].numpy().reshape(-1)
            s = int(round(k.size ** 0.5))
            k = k.reshape(s, s)
            st = kernel_stats(k)
            au.append(st)
            print(json.dumps({"kind": "kernel", "set": "authors", "name": os.path.basename(f), "stored_sum": float(k.sum()),
                              **st}))
        sets["authors"] = au
    else:
        print(json.dumps({"kind": "skipped", "why": f"{SHARED} not found: no real kernels to compare"}))
    g = np.random.default_rng(a.seed)
    sets["generated"] = [kernel_stats(k) for k in camera_shake_kernels(a.n, a.size, g)]
    sets["generated_exposure_weighted"] = [kernel_stats(k) for k in
                                           camera_shake_kernels(a.n, a.size, g, exposure_weighting=True)]
    for name, st in sets.items():
        if st:
            print(json.dumps(summary(name, st)))


if __name__ == "__main__":
    main()

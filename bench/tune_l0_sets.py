#!/usr/bin/env python3
"""Screen classical.blind_l0 settings on whole evaluation sets through the baselines harness (1 thread).

    python bench/tune_l0_sets.py run --tag T --l0 '{"iters": 8}' [--sets levin_real,synth24] [--root DIR]
        runs `python -m diffusion_em.baselines --method l0_blind --l0 ...` on each set into ROOT/T/<set>
        and prints that run's summary line per set.
    python bench/tune_l0_sets.py compare --before ROOT/A/<set> --after ROOT/B/<set>
        per case: kernel MSE, aligned PSNR and gain over the blurry input, before and after, then the means.
Summary line: mean kernel MSE, mean aligned PSNR, mean aligned gain over the blurry input, number of cases
with gain > 0, and the same gain on the cases whose true kernel is ≥ 23 px ("large").
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = {"levin_real": ROOT.parent / "shared" / "data" / "levin_real", "synth24": Path("/work/evalsets/synth24"),
        "dev128": Path("/work/scratch/quality/dev128")}


def read(run: Path) -> dict:
    with open(run / "metrics.csv", newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f) if r["status"] == "ok"}


def true_size(data: Path, name: str) -> int:
    return int(np.load(data / "kernel" / f"{name}.npy").shape[0])


def summary(run: Path, data: Path) -> str:
    rows = read(run)
    km = np.array([float(r["kernel_mse"]) for r in rows.values()])
    pa = np.array([float(r["psnr_aligned"]) for r in rows.values()])
    gain = pa - np.array([float(r["psnr_blurry_aligned"]) for r in rows.values()])
    large = np.array([true_size(data, n) >= 23 for n in rows])
    return (f"n {len(rows)} kmse {km.mean():.2e} psnr_al {pa.mean():.2f} gain {gain.mean():+.2f} "
            f"gain>0 {int((gain > 0).sum())}/{len(rows)} | large({int(large.sum())}) kmse {km[large].mean():.2e} "
            f"gain {gain[large].mean():+.2f} | small kmse {km[~large].mean():.2e} gain {gain[~large].mean():+.2f}")


def run(args) -> None:
    from diffusion_em import baselines
    for s in args.sets.split(","):
        out = Path(args.root) / args.tag / s
        argv = ["--method", "l0_blind", "--input_dir", str(SETS[s]), "--save_dir", str(out), "--threads", "1",
                "--l0", args.l0]
        if s == "dev128":
            argv += ["--boundary", "circular"]
        baselines.main(argv)
        print(f"{args.tag} {s} {args.l0}: {summary(out, SETS[s])}", flush=True)


def compare(args) -> None:
    a, b = read(Path(args.before)), read(Path(args.after))
    g = lambda r: float(r["psnr_aligned"]) - float(r["psnr_blurry_aligned"])  # noqa: E731
    print("| case | kernel MSE before | after | aligned PSNR before | after | gain before | after |")
    print("|---|---|---|---|---|---|---|")
    for n in sorted(a):
        if n in b:
            print(f"| {n} | {float(a[n]['kernel_mse']):.2e} | {float(b[n]['kernel_mse']):.2e} | "
                  f"{float(a[n]['psnr_aligned']):.2f} | {float(b[n]['psnr_aligned']):.2f} | {g(a[n]):+.2f} | {g(b[n]):+.2f} |")
    both = [n for n in a if n in b]
    m = lambda d, f: np.mean([f(d[n]) for n in both])  # noqa: E731
    print(f"| mean ({len(both)}) | {m(a, lambda r: float(r['kernel_mse'])):.2e} | {m(b, lambda r: float(r['kernel_mse'])):.2e} | "
          f"{m(a, lambda r: float(r['psnr_aligned'])):.2f} | {m(b, lambda r: float(r['psnr_aligned'])):.2f} | "
          f"{m(a, g):+.2f} | {m(b, g):+.2f} |")
    print(f"gain > 0: before {sum(g(a[n]) > 0 for n in both)}/{len(both)}, after {sum(g(b[n]) > 0 for n in both)}/{len(both)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--tag", required=True)
    r.add_argument("--l0", default="{}")
    r.add_argument("--sets", default="levin_real,synth24")
    r.add_argument("--root", default="/work/scratch/l0")
    c = sub.add_parser("compare")
    c.add_argument("--before", required=True)
    c.add_argument("--after", required=True)
    args = p.parse_args()
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()

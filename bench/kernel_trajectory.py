"""How the blind kernel's error evolves along a Fast EM run: would stopping the M-step earlier give a better kernel?

Reads a run made with `--save_progress` on a test set with true kernels (the runner saves every step's kernel as
RESULTS/progress/NAME_kernels.npy) and prints, per case and on average, the aligned kernel MSE after step n.
The kernel after step n is exactly the kernel a run whose M-step stopped at n would keep, so the curve's
minimum says whether an earlier stop (or an average over the last steps) could help, without extra runs.

    torchrun --nproc_per_node=2 test_FastDiffEM.py --input_dir SET --save_dir R --threads 1 --device cpu --save_progress
    python bench/kernel_trajectory.py --set SET --run R [--every 5] [--from 40]

With `--final_pass` the saved trajectory holds both runs (the second keeps the first's final kernel).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.metrics import kernel_mse  # noqa: E402


def trajectory_errors(kernels: np.ndarray, k_true: np.ndarray, steps: list) -> list:
    """Aligned kernel MSE of kernels[n] (steps, s, s) against k_true for each n in steps."""
    return [kernel_mse(kernels[n], k_true)[0] for n in steps]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="test-set folder with kernel/NAME.npy (true kernels)")
    p.add_argument("--run", required=True, help="a run's --save_dir made with --save_progress")
    p.add_argument("--every", type=int, default=5, help="print every k-th step")
    p.add_argument("--from", dest="first", type=int, default=0, help="first step printed")
    args = p.parse_args(argv)
    files = sorted((Path(args.run) / "progress").glob("*_kernels.npy"))
    if not files:
        raise SystemExit(f"{args.run}/progress: no *_kernels.npy (run with --save_progress)")
    curves, names = [], []
    for f in files:
        name = f.name[: -len("_kernels.npy")]
        truth = Path(args.set) / "kernel" / f"{name}.npy"
        if not truth.is_file():
            print(f"{name}: no true kernel in {truth.parent}, skipped", file=sys.stderr)
            continue
        K = np.load(f)
        steps = sorted(set(range(args.first, len(K), args.every)) | {len(K) - 1})
        if curves and len(steps) != len(curves[0]):
            raise SystemExit(f"{f}: {len(K)} steps, the first case had another count (mixed runs?)")
        curves.append(trajectory_errors(K, np.load(truth), steps))
        names.append(name)
    if not curves:
        raise SystemExit("no case with a true kernel")
    C = np.asarray(curves)
    print("kernel MSE (1e-5) after step:", " ".join(f"{n + 1:>5d}" for n in steps))
    for name, c in zip(names, C):
        print(f"{name:<32s}", " ".join(f"{v * 1e5:5.2f}" for v in c))
    mean = C.mean(0)
    print(f"{'mean of ' + str(len(C)):<32s}", " ".join(f"{v * 1e5:5.2f}" for v in mean))
    best = int(np.argmin(mean))
    print(f"lowest mean after step {steps[best] + 1}: {mean[best]:.3e}; final {mean[-1]:.3e} "
          f"({mean[-1] - mean[best]:+.1e}); cases with a lower error before the end: "
          f"{int((C[:, :-1].min(1) < C[:, -1]).sum()) if C.shape[1] > 1 else 0}/{len(C)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Average the blind kernel a run found with the classical ℓ0 kernel of the same image: kernel MSE and image.

Two estimates of one kernel made by different means (Fast EM's M-step on the diffusion trajectory, the
multi-scale ℓ0 MAP method) have errors that are not the same; their average can be closer to the truth than
either, as the average of two images is (`classical_blend`). For each case of a run on a test set with true
kernels: the ℓ0 kernel (from an `l0_blind` baseline folder on the same set) is moved by the integer shift that
best matches the run's kernel (the average of misaligned kernels would be a wider kernel), then
k_w = (1 − w)·k_run + w·k_ℓ0 for each w. Printed per case and on average: the aligned kernel MSE of k_w, and the
aligned PSNR of the output the default would make with k_w as its classical half,
(1 − b)·diffusion image + b·hyper-Laplacian(y, k_w), b = the blend weight (0.5: the default).
w = 0 reproduces the run's own output up to the 8-bit rounding of its saved diffusion image.

    python bench/kernel_average.py --set SET --run RUN --l0 L0_RUN [--weights 0,0.25,0.5,0.75,1] [--blend 0.5]

Circular sets only (the hyper-Laplacian solve here is circular on the unpadded image). Measured on DEV256 and
synth24 (`bench/measured/kernel_average.txt`): a small kernel gain at w = 0.25, not adopted (docs/choices.md, "Where
the remaining kernel error comes from").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda  # noqa: E402
from diffusion_em.results import diffusion_image_file  # noqa: E402
from util.images import image_to_tensor, read_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import aligned_scores, kernel_mse  # noqa: E402


def shifted(k: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """k moved by (dy, dx) taps inside its own frame, zero-filled (no wrap-around)."""
    out = np.zeros_like(k)
    h, w = k.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = k[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def aligned_to(k: np.ndarray, ref: np.ndarray, max_shift: int = 4) -> np.ndarray:
    """k moved by the integer shift within ±max_shift that minimises ‖ref − shift(k)‖², renormalised."""
    best = min(((dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)),
               key=lambda d: float(((ref - shifted(k, *d)) ** 2).sum()))
    out = shifted(k, *best)
    return out / out.sum()


def average(k_run: np.ndarray, k_l0: np.ndarray, w: float) -> np.ndarray:
    """(1 − w)·k_run + w·(k_l0 aligned to k_run), both s×s and summing to 1."""
    if k_l0.shape != k_run.shape:
        raise ValueError(f"kernel sizes differ: {k_l0.shape} vs {k_run.shape}")
    return (1 - w) * k_run + w * aligned_to(k_l0, k_run)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="circular test-set folder with sharp/ and kernel/")
    p.add_argument("--run", required=True, help="a Fast EM run's --save_dir on that set (kernels/, images/)")
    p.add_argument("--l0", required=True, help="an l0_blind baseline's --save_dir on the same set (kernels/)")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1", help="comma-separated w (weight of the ℓ0 kernel)")
    p.add_argument("--blend", type=float, default=0.5, help="weight of the classical half of the output")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    ws = [float(w) for w in args.weights.split(",")]
    run, l0 = Path(args.run), Path(args.l0)
    kmse, psnr, names = [], [], []
    print("case", *(f"kmse_w{w:g}" for w in ws), *(f"psnr_w{w:g}" for w in ws))
    for sample in list_inputs(args.set):
        s = load_sample(sample)
        img = diffusion_image_file(run, sample.name)
        kf, lf = run / "kernels" / f"{sample.name}.npy", l0 / "kernels" / f"{sample.name}.npy"
        if s.k_true is None or s.x_true is None or img is None or not kf.exists() or not lf.exists():
            continue
        k_run, k_l0 = np.load(kf).astype(np.float64), np.load(lf).astype(np.float64)
        y = image_to_tensor(s.y, dtype=torch.float64)
        d = np.asarray(read_image(img), np.float64)
        ks = max(s.k_true.shape)
        row_k, row_p = [], []
        for w in ws:
            k = average(k_run, k_l0, w)
            row_k.append(kernel_mse(k, s.k_true)[0])
            x = hyper_laplacian(y, torch.from_numpy(k), hyper_laplacian_lambda(s.sigma)).clamp(0, 1)
            x = x[0].permute(1, 2, 0).numpy()
            row_p.append(aligned_scores((1 - args.blend) * d + args.blend * x, s.x_true, ks)["psnr_aligned"])
        names.append(sample.name), kmse.append(row_k), psnr.append(row_p)
        print(sample.name, *(f"{v:.2e}" for v in row_k), *(f"{v:.2f}" for v in row_p), flush=True)
    if not names:
        raise SystemExit("no case with a true kernel, a run kernel, an ℓ0 kernel and a diffusion image")
    kmse, psnr = np.array(kmse), np.array(psnr)
    print(f"mean ({len(names)} cases)", *(f"{v:.2e}" for v in kmse.mean(0)), *(f"{v:.2f}" for v in psnr.mean(0)))
    for j, w in enumerate(ws[1:], 1):
        dk, dp = kmse[:, j] - kmse[:, 0], psnr[:, j] - psnr[:, 0]
        print(f"w={w:g} vs w=0: kernel MSE lower on {int((dk < 0).sum())}/{len(names)}; PSNR {dp.mean():+.2f} dB "
              f"(s.e. {dp.std(ddof=1) / np.sqrt(len(dp)) if len(dp) > 1 else float('nan'):.2f}), better on "
              f"{int((dp > 0).sum())}/{len(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

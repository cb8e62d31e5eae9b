"""Can a classical step polish the blind kernel a run found? Offline, on a test set with true kernels.

For each case of a run: the run's kernel, then kernels made from it or from its image by classical means, all
scored by the aligned kernel MSE against the truth:
  - `clean T`: taps below T·max zeroed, renormalised (Cho & Lee 2009's clean-up);
  - `ls_image`: gradient-domain least squares for k given the run's image (Pan et al. 2014 eq. 12; γ = 30, the
    ℓ0 method's clean-up) — the kernel step of a classical method, with the diffusion image as its x;
  - `ls_l0_image L`: the same after ℓ0-gradient smoothing of that image (λ = L; salient edges only,
    Xu et al. 2013);
  - `alternate L`: 5 classical alternations (ℓ0 deconvolution of y with the current kernel, then the kernel
    step) starting from the run's kernel.
Last line: the shape of the run's kernels against the truth (extent of the taps above 5 % of the maximum, energy
Σk²): too wide, or right-sized but filled in. Grayscale (the channel mean), float64, circular (synthetic sets). Reads images/NAME_diffusion.png when present
(the image before a classical blend), else images/NAME.png, and kernels/NAME.npy.

    python bench/kernel_refine.py --set SET --run RUN [--names a,b]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from classical.blind_l0 import L0Config, estimate_kernel_ls, l0_restore  # noqa: E402
from diffusion_em.results import diffusion_image_file  # noqa: E402
from util.geometry import dirac  # noqa: E402
from util.images import read_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import kernel_mse  # noqa: E402

GAMMA, CLEAN = 30.0, 0.05  # the ℓ0 method's kernel-step ridge and a mild clean-up (classical.blind_l0.L0Config)


def extent(k: np.ndarray, rel: float = 0.05) -> np.ndarray:
    """(rows, cols) of the box holding the taps above rel·max."""
    on = k > rel * k.max()
    return np.array([np.ptp(np.nonzero(on.any(1 - d))[0]) + 1 for d in (0, 1)])


def variants(y: torch.Tensor, x: torch.Tensor, k: torch.Tensor) -> dict:
    """The candidate kernels (s×s, sum 1) for one case: y, x (H, W) float64 grey, k the run's kernel (s, s)."""
    s, cfg = k.shape[-1], L0Config()
    out = {"run": k}
    for t in (0.05, 0.1, 0.2):
        c = torch.where(k >= t * k.max(), k, torch.zeros_like(k))
        out[f"clean {t:g}"] = c / c.sum()
    out["ls_image"] = estimate_kernel_ls(x, y, s, GAMMA, CLEAN)
    for lam in (2e-3, 8e-3):
        out[f"ls_l0_image {lam:g}"] = estimate_kernel_ls(l0_restore(x, dirac(3, dtype=x.dtype)[0, 0], cfg, lam), y,
                                                         s, GAMMA, CLEAN)
    for lam in (1e-3, 4e-3):
        kk = k.clone()
        for _ in range(5):
            kk = estimate_kernel_ls(l0_restore(y, kk, cfg, lam), y, s, GAMMA, CLEAN)
        out[f"alternate {lam:g}"] = kk
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="test-set folder with kernel/NAME.npy (circular blur)")
    p.add_argument("--run", required=True, help="a run's --save_dir on that set")
    p.add_argument("--names", default=None, help="comma-separated case names (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, scores, shape = Path(args.run), {}, {}
    for sample in list_inputs(args.set):
        if args.names and sample.name not in args.names.split(","):
            continue
        s = load_sample(sample)
        if s.k_true is None:
            continue
        img = diffusion_image_file(run, sample.name)
        if img is None:
            raise SystemExit(f"{run}/images: no image of {sample.name}")
        grey = lambda a: torch.from_numpy(np.asarray(a, np.float64)).mean(-1)  # noqa: E731
        k = torch.from_numpy(np.load(run / "kernels" / f"{sample.name}.npy").astype(np.float64))
        found = variants(grey(s.y), grey(read_image(img)), k)
        scores[sample.name] = {n: kernel_mse(v.numpy(), s.k_true)[0] for n, v in found.items()}
        shape[sample.name] = (extent(k.numpy()) - extent(s.k_true), float((k.numpy() ** 2).sum() / (s.k_true ** 2).sum()))
        if len(scores) == 1:
            print("case", *(n.replace(" ", "_") for n in scores[sample.name]))
        print(sample.name, *(f"{v:.2e}" for v in scores[sample.name].values()), flush=True)
    if not scores:
        raise SystemExit(f"{args.set}: no case with a true kernel")
    names = list(next(iter(scores.values())))
    print(f"mean ({len(scores)} cases)", *(f"{np.mean([c[n] for c in scores.values()]):.2e}" for n in names))
    d = np.array([e for e, _ in shape.values()])
    r = np.array([q for _, q in shape.values()])
    print(f"the run's kernels against the truth: extent (taps > 5 % of max) within 2 px on "
          f"{int((np.abs(d).max(1) <= 2).sum())}/{len(d)} (differences {d.min()}..{d.max()} px, mean {d.mean():+.1f}); "
          f"energy sum(k^2) {r.mean():.2f}x the truth's on average, below it on {int((r < 1).sum())}/{len(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

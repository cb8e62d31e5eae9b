"""Is the M-step the limit of the blind kernels? On a circular test set, the M-step alone from a Dirac, given
the TRUE sharp image and given a run's restored image, beside the kernel that run found.

For each case: `--calls` M-step calls (J = 10, the bundled 33×33 kernel denoiser, the case's σ, the
config's M-step settings) from a Dirac with the image held fixed, then the aligned kernel MSE. If the true
image gives a far better kernel than the restored one, the image estimate (the prior), not the M-step, limits
the kernels. Last column: the run's own kernel after `--calls` more M-step calls given its final particles
(images/NAME_p*.png, else its image) — whether the run stopped before its kernel settled.

    python bench/mstep_given_truth.py --set SET --run RESULTS [--calls 30] [--names a,b]

Reads the run's images/NAME_diffusion.png when present (the image before a classical blend), else
images/NAME.png, and kernels/NAME.npy. Output: one line per case, then the means.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.mstep import MStepConfig, m_step  # noqa: E402
from diffusion_em.results import diffusion_image_file  # noqa: E402
from kernel_denoiser.network import load_kernel_denoiser  # noqa: E402
from util.geometry import RECENTER_SHIFTS, dirac, recenter  # noqa: E402
from util.images import read_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import kernel_mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def kernel_given(y: torch.Tensor, x: torch.Tensor, sigma: float, size: int, calls: int, denoiser,
                 k0: torch.Tensor = None, shift: str = "bilinear") -> torch.Tensor:
    """The kernel after `calls` M-step calls from k0 (default a Dirac) with the images x (n, C, H, W) held fixed,
    re-centred after each call as Fast EM does (`shift`: its `mstep.recenter_shift`)."""
    k = dirac(size)[0, 0] if k0 is None else k0
    for _ in range(calls):
        k = recenter(m_step(y, x, k, sigma, MStepConfig(), denoiser), shift)
    return k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="circular test-set folder (blurry/ sharp/ kernel/ meta.csv)")
    p.add_argument("--run", required=True, help="a run's --save_dir on that set")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--recenter_shift", default="bilinear", choices=RECENTER_SHIFTS,
                   help="re-centring after each call (the config's mstep.recenter_shift)")
    p.add_argument("--names", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--denoiser", default=str(REPO / "models/kernel_denoiser_33.pth"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    den = load_kernel_denoiser(args.denoiser)
    run = Path(args.run)
    chw = lambda a: torch.from_numpy(np.asarray(a, np.float32)).permute(2, 0, 1)[None]  # noqa: E731
    rows = []
    for sample in list_inputs(args.set):
        if args.names and sample.name not in args.names.split(","):
            continue
        s = load_sample(sample)
        restored = diffusion_image_file(run, sample.name)
        if restored is None:
            raise SystemExit(f"{run}/images: no image of {sample.name}")
        k_run = np.load(run / "kernels" / f"{sample.name}.npy")
        y = chw(s.y)
        row = [kernel_mse(k_run, s.k_true)[0]]
        for x in (chw(s.x_true), chw(read_image(restored))):
            row.append(kernel_mse(kernel_given(y, x, s.sigma, k_run.shape[-1], args.calls, den,
                                              shift=args.recenter_shift).numpy(), s.k_true)[0])
        # the run's own fixed point: its kernel, more M-step calls given its final particles (as its last step saw)
        parts = sorted((run / "images").glob(f"{sample.name}_p[0-9]*.png")) or [restored]
        xs = torch.cat([chw(read_image(f)) for f in parts])
        row.append(kernel_mse(kernel_given(y, xs, s.sigma, k_run.shape[-1], args.calls, den,
                                           torch.from_numpy(k_run), args.recenter_shift).numpy(), s.k_true)[0])
        rows.append(row)
        print(f"{sample.name}: kernel MSE run {row[0]:.2e}, M-step given the true image {row[1]:.2e}, "
              f"given the run's image {row[2]:.2e}, the run's kernel continued on its particles {row[3]:.2e}",
              flush=True)
    m = np.mean(rows, 0)
    print(f"mean of {len(rows)}: run {m[0]:.2e}, given the true image {m[1]:.2e}, given the run's image {m[2]:.2e}, "
          f"continued {m[3]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

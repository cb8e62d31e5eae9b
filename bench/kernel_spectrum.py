"""Where a run's blind kernels differ from the true ones: by frequency band, and by sub-pixel position.

For each case of a run on a test set with true kernels (both normalised to sum 1):
- the amplitude ratio per radial frequency band, sqrt(Σ|K̂|² / Σ|K|²) over the band (1 = the right energy;
  < 1 at high frequencies = a blob where the truth is a thin stroke), and the median over the cases;
- with `--subpixel`, the kernel MSE after the best 0.25-px Fourier shift of the estimate within ±0.5 px, beside
  `util.metrics.kernel_mse` (whole-pixel alignment, the metric we report): how much of the error is position;
- with `--compensate_from DEV_SET DEV_RUN`, the estimate divided by the median band ratio measured on a dev run,
  raised to α (a linear de-attenuation; negative taps clipped, sum 1), and its kernel MSE per α.

    python bench/kernel_spectrum.py --set SET --run RUN [--subpixel] [--compensate_from DEV_SET DEV_RUN]

Measured on the default's DEV256 and synth24 runs (bench/measured/kernel_spectrum.txt; docs/choices.md "Where
the remaining kernel error comes from").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util.geometry import pad_centred  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import kernel_mse  # noqa: E402

N = 64  # FFT frame for kernels up to 33 taps (no wrap of the zero-padded kernel)
BANDS = np.linspace(0.0, 0.5, 11)  # radial frequency, cycles per pixel
_R = np.hypot(np.fft.fftfreq(N)[:, None], np.fft.fftfreq(N)[None, :])


def load_cases(set_dir: str, run: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, estimated kernel, true kernel), float64, each summing to 1; cases without the run's kernel file or a
    true kernel skipped."""
    out = []
    for smp in list_inputs(set_dir):
        f = Path(run) / "kernels" / f"{smp.name}.npy"
        if not f.exists():
            continue
        k_true = load_sample(smp).k_true
        if k_true is None:  # a photo or a case without kernel/<name>.npy: nothing to compare with
            continue
        ke = np.load(f).astype(np.float64)
        kt = np.asarray(k_true, np.float64)
        out.append((smp.name, ke / ke.sum(), kt / kt.sum()))
    return out


def spectrum(k: np.ndarray) -> np.ndarray:
    """The kernel's DFT on the N×N frame, its centre at the origin (so phases are those of a centred kernel)."""
    return np.fft.fft2(np.fft.ifftshift(pad_centred(k, (N, N))))


def band_ratio(ke: np.ndarray, kt: np.ndarray) -> np.ndarray:
    """sqrt(Σ|K̂|² / Σ|K|²) in each radial band."""
    ae, at = np.abs(spectrum(ke)) ** 2, np.abs(spectrum(kt)) ** 2
    return np.array([np.sqrt(ae[m].sum() / at[m].sum())
                     for m in ((_R >= a) & (_R < b) for a, b in zip(BANDS[:-1], BANDS[1:]))])


def from_spectrum(K: np.ndarray, size: int) -> np.ndarray:
    """Back to a size×size kernel: real part, negative taps clipped, sum 1."""
    k = np.fft.fftshift(np.real(np.fft.ifft2(K)))
    c = N // 2 - size // 2  # where pad_centred put the kernel
    k = np.maximum(k[c:c + size, c:c + size], 0.0)
    return k / k.sum()


def compensated(ke: np.ndarray, ratio: np.ndarray, alpha: float) -> np.ndarray:
    """ke divided by the band ratio (interpolated between band centres, 1 at DC) to the power α."""
    centres = np.r_[0.0, (BANDS[:-1] + BANDS[1:]) / 2]
    gain = np.interp(np.minimum(_R, 0.5), centres, np.r_[1.0, ratio]) ** (-alpha)
    return from_spectrum(spectrum(ke) * gain, ke.shape[0])


def subpixel_mse(ke: np.ndarray, kt: np.ndarray, step: float = 0.25) -> float:
    """min over Fourier shifts of the estimate (dy, dx) ∈ {−0.5, …, 0.5}² of the whole-pixel-aligned kernel MSE."""
    f = np.fft.fftfreq(N)
    K = spectrum(ke)
    grid = np.arange(-0.5, 0.5 + 1e-9, step)
    return min(kernel_mse(from_spectrum(K * np.exp(-2j * np.pi * (f[:, None] * dy + f[None, :] * dx)), ke.shape[0]),
                          kt)[0] for dy in grid for dx in grid)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="test set with true kernels (make_testset layout)")
    p.add_argument("--run", required=True, help="a runner's --save_dir on that set (kernels/NAME.npy)")
    p.add_argument("--subpixel", action="store_true", help="also the kernel MSE after the best 0.25-px shift")
    p.add_argument("--compensate_from", nargs=2, metavar=("DEV_SET", "DEV_RUN"),
                   help="divide by the median band ratio of this dev run; kernel MSE for α in --alphas")
    p.add_argument("--alphas", default="0,0.25,0.5,1", help="comma-separated exponents for --compensate_from")
    a = p.parse_args(argv)
    cases = load_cases(a.set, a.run)
    if not cases:
        raise SystemExit(f"error: no kernels of {a.set}'s cases in {a.run}/kernels")
    print(f"{a.run} on {a.set}: {len(cases)} cases; band edges (cycles/px) {' '.join(f'{b:.2f}' for b in BANDS)}")
    ratios, mse, sub = [], [], []
    for name, ke, kt in cases:
        ratios.append(band_ratio(ke, kt))
        mse.append(kernel_mse(ke, kt)[0])
        extra = ""
        if a.subpixel:
            sub.append(subpixel_mse(ke, kt))
            extra = f"  0.25-px {sub[-1]:.2e}"
        print(f"{name:24s} {' '.join(f'{v:5.2f}' for v in ratios[-1])}  energy {(ke ** 2).sum() / (kt ** 2).sum():.2f}"
              f"  kernel MSE {mse[-1]:.2e}{extra}")
    print(f"{'median band ratio':24s} {' '.join(f'{v:5.2f}' for v in np.median(ratios, 0))}")
    print(f"mean kernel MSE {np.mean(mse):.3e}" + (f"; after the best 0.25-px shift {np.mean(sub):.3e}" if sub else ""))
    if a.compensate_from:
        ref = np.median([band_ratio(ke, kt) for _, ke, kt in load_cases(*a.compensate_from)], 0)
        print(f"compensation curve from {a.compensate_from[1]}: {' '.join(f'{v:.2f}' for v in ref)}")
        for alpha in (float(s) for s in a.alphas.split(",")):
            print(f"  alpha {alpha:g}: mean kernel MSE {np.mean([kernel_mse(compensated(ke, ref, alpha), kt)[0] for _, ke, kt in cases]):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

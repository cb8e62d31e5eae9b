"""Evaluation metrics, defined once so every number the project reports means the same thing (docs/algorithm.md §5).

Array conventions: numpy images are H×W×C (the I/O layer's layout); torch images are (..., C, H, W).
Kernels are 2-D (s1×s2), numpy or torch. All metrics are computed in float64 on the CPU so that they do
not depend on the device or dtype the algorithm ran in.

- PSNR: RGB in [0, 1], both images clipped to [0, 1], data range 1, MSE over all pixels and channels.
- SSIM: pytorch_msssim.ssim, Gaussian window 11, σ 1.5, data range 1, per channel then averaged.
- Kernel MSE: both kernels normalised to sum 1, zero-padded (centred) to one common size, aligned by the
  integer shift within ±max_shift px minimising the error; sum of squared differences divided by the
  number of taps of the ESTIMATED kernel. The unaligned (zero-shift) value is returned alongside.
- Re-blur error: mean((k̂ ⊛ x̂ − y)²) − σ², circular convolution (util.fft.conv_circular).
- Aligned PSNR / SSIM (Levin et al. 2009; Köhler et al. 2012): blind deconvolution cannot fix the image's
  position, so the estimate is compared after the best shift. Both images clipped to [0, 1]; a border of
  max(15, kernel radius) px is cropped; the shift minimising the MSE on the crop is searched over integers
  within ±min(kernel radius, border − 1) px, then refined on the 0.25-px grid within ±0.75 px of the best
  integer (coarse to fine: the best 0.5-px step, then its 0.25-px neighbours).
  Sub-pixel shifts are Fourier phase ramps of the mirrored estimate, not Levin's bilinear interpolation:
  bilinear averaging removes up to half of a noisy estimate's error energy at half-pixel shifts and so
  would favour noisy results (tests/test_metrics.py measures it). PSNR and SSIM
  are then computed on the crop at that shift (SSIM at the MSE-optimal shift, not optimised on its own).
- Error ratio (Levin et al. 2009): aligned SSE of the estimate over the aligned SSE of the same non-blind
  solver run with the true kernel (the oracle); success = ratio ≤ 2 (or ≤ 3). SSE is the squared L2 norm
  (Levin's SSD), so a ratio of 2 is 3 dB of aligned PSNR.
- LPIPS (VGG): only when the `lpips` package and the user's VGG16 backbone weights are present; never
  downloads anything, and returns (None, reason) otherwise.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .fft import conv_circular
from .geometry import pad_centred

ArrayLike = Union[np.ndarray, torch.Tensor]


# ----------------------------------------------------------------------------------------------- helpers
def _image_to_nchw(img: ArrayLike, name: str) -> torch.Tensor:
    """numpy H×W×C / H×W -> float64 (1, C, H, W); torch (C,H,W)/(N,C,H,W)/(H,W) -> float64 NCHW."""
    if isinstance(img, np.ndarray):
        a = np.asarray(img, dtype=np.float64)
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3:
            raise ValueError(f"{name}: expected a numpy image H×W×C, got shape {a.shape}")
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu", torch.float64)
        if t.ndim == 2:
            t = t[None, None]
        elif t.ndim == 3:
            t = t[None]
        if t.ndim != 4:
            raise ValueError(f"{name}: expected a tensor (N,C,H,W), got shape {tuple(t.shape)}")
        return t
    raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(img).__name__}")


def _pair(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _image_to_nchw(x, "x"), _image_to_nchw(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _kernel_to_np(k: ArrayLike, name: str) -> np.ndarray:
    a = k.detach().to("cpu", torch.float64).numpy() if isinstance(k, torch.Tensor) else np.asarray(k, np.float64)
    a = _drop_unit_dims(a)  # accept 1×1×s×s as stored in the authors' pickles
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D kernel, got shape {np.shape(k)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: kernel contains NaN or inf")
    s = a.sum()
    if not s > 0:
        raise ValueError(f"{name}: kernel sum is {s:.3g}, cannot normalise to 1")
    return a / s


def _drop_unit_dims(a):
    """Drop leading size-1 axes only (squeeze() would also flatten a legitimate 1×1 kernel)."""
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    return a


# ----------------------------------------------------------------------------------------------- images
def psnr(x: ArrayLike, y: ArrayLike) -> float:
    """PSNR in dB of images in [0, 1] (both clipped), data range 1; +inf when identical after clipping."""
    a, b = _pair(x, y)
    mse = torch.mean((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).item()
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(x: ArrayLike, y: ArrayLike) -> float:
    """SSIM (Gaussian window 11, σ 1.5, data range 1) per channel, averaged; images clipped to [0, 1]."""
    from pytorch_msssim import ssim as _ssim  # imported here so util imports stay cheap for the rest

    a, b = _pair(x, y)
    if min(a.shape[-2:]) < 11:
        raise ValueError(f"SSIM needs images of at least 11×11 pixels, got {tuple(a.shape[-2:])}")
    return float(_ssim(a.clamp(0, 1), b.clamp(0, 1), data_range=1.0, win_size=11, win_sigma=1.5,
                       size_average=True))


# ----------------------------------------------------------------------------------------------- kernels
def kernel_mse(k_est: ArrayLike, k_true: ArrayLike, max_shift: int = 4) -> tuple[float, float]:
    """Kernel MSE (aligned, raw) per docs/algorithm.md §5.

    Both kernels are normalised to sum 1 and zero-padded, centred, to the larger of the two sizes. The
    aligned value is the minimum over all integer shifts (dy, dx) in [-max_shift, max_shift]² of
    Σ(k_est − shift(k_true))² / (number of taps of k_est); shifting pads with zeros (no wrap-around, no
    mass lost). `raw` is the zero-shift value. Shifts are evaluated all at once (sliding windows).
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    ke = _kernel_to_np(k_est, "k_est")
    kt = _kernel_to_np(k_true, "k_true")
    n_taps = ke.size
    shape = (max(ke.shape[0], kt.shape[0]), max(ke.shape[1], kt.shape[1]))
    ke, kt = pad_centred(ke, shape), pad_centred(kt, shape)
    m = max_shift
    # compare on a frame enlarged by m so no mass of the shifted kernel falls off the edge
    ke_big = np.pad(ke, m)
    kt_big = np.pad(kt, 2 * m)
    # windows[i, j] = k_true shifted by (m - i, m - j); the (m, m) window is the unshifted one
    windows = np.lib.stride_tricks.sliding_window_view(kt_big, ke_big.shape)
    err = ((windows - ke_big[None, None]) ** 2).sum(axis=(-2, -1)) / n_taps
    return float(err.min()), float(err[m, m])


# ----------------------------------------------------------------------------------------------- re-blur
def reblur_error(k_est: ArrayLike, x_est: ArrayLike, y: ArrayLike, sigma: float) -> float:
    """mean((k̂ ⊛ x̂ − y)²) − σ², with circular true convolution (docs/algorithm.md §2).

    Close to 0 for a consistent estimate, negative when over-fitting the noise, large when the kernel or
    the image is off. The kernel is used as given (not renormalised): it is the model's own estimate.
    y is not clipped (observations may be unclipped); x̂ is used as given.
    """
    x, yy = _pair(x_est, y)
    k = k_est.detach().to("cpu", torch.float64) if isinstance(k_est, torch.Tensor) else \
        torch.from_numpy(np.asarray(k_est, np.float64))
    k = _drop_unit_dims(k)
    if k.ndim != 2:
        raise ValueError(f"k_est: expected a 2-D kernel, got shape {tuple(k.shape)}")
    r = conv_circular(x, k) - yy
    return float(torch.mean(r ** 2).item() - float(sigma) ** 2)


# ----------------------------------------------------------------------------------------------- aligned
ALIGN_MIN_BORDER = 15  # px, Levin et al. 2009
SUBPIXEL_STEP = 0.25  # px


def align_border(kernel_size: int) -> int:
    """Border cropped before comparing: 15 px or the kernel radius, whichever is larger."""
    return max(ALIGN_MIN_BORDER, int(kernel_size) // 2)


def _crop(x: torch.Tensor, iy: int, ix: int, b: int) -> torch.Tensor:
    """x[i + iy, j + ix] for i, j on the crop [b, H−b) × [b, W−b) (needs |iy|, |ix| ≤ b)."""
    H, W = x.shape[-2:]
    return x[..., b + iy: H - b + iy, b + ix: W - b + ix]


def _fractional_shifter(x: torch.Tensor, pad: int):
    """f(fy, fx) -> x(i + fy, j + fx) on the whole grid, by a Fourier phase ramp on the mirror-padded image.

    A Fourier shift is all-pass: unlike bilinear interpolation it does not average away the estimate's
    noise (which would reward noisy results by up to 3 dB at half-pixel shifts). Mirror padding keeps the
    image continuous at its border and puts the periodic seam `pad` px further out, away from the crop.
    """
    H, W = x.shape[-2:]
    ext = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    Hp, Wp = ext.shape[-2:]
    X = torch.fft.rfft2(ext)
    ky = torch.fft.fftfreq(Hp, dtype=x.dtype)[:, None]
    kx = torch.fft.rfftfreq(Wp, dtype=x.dtype)[None, :]

    def shift(fy: float, fx: float) -> torch.Tensor:
        if fy == 0 and fx == 0:
            return x
        ramp = torch.exp(2j * math.pi * (fy * ky + fx * kx))
        return torch.fft.irfft2(X * ramp, s=(Hp, Wp))[..., pad:pad + H, pad:pad + W]
    return shift


def _integer_mse(a: torch.Tensor, ref_c: torch.Tensor, b: int, m: int) -> torch.Tensor:
    """MSE between _crop(a, dy, dx, b) and ref_c for all |dy|, |dx| ≤ m, as a (2m+1)² table (dy, dx).

    Σ(a_w − r)² = Σa_w² − 2Σa_w·r + Σr²: the cross term is one FFT correlation, Σa_w² an integral image.
    """
    H, W = a.shape[-2:]
    h, w = ref_c.shape[-2:]
    A = a.reshape(-1, H, W)
    R = ref_c.reshape(-1, h, w)
    corr = torch.fft.irfft2(torch.fft.rfft2(A) * torch.fft.rfft2(R, s=(H, W)).conj(), s=(H, W)).sum(0)
    sq = torch.nn.functional.pad((A ** 2).sum(0).cumsum(0).cumsum(1), (1, 0, 1, 0))
    d = torch.arange(-m, m + 1)
    r0, c0 = (b + d)[:, None], (b + d)[None, :]
    energy = sq[r0 + h, c0 + w] - sq[r0, c0 + w] - sq[r0 + h, c0] + sq[r0, c0]
    cross = corr[r0, c0]  # corr[p, q] = Σ A[i + p, j + q] R[i, j]: no wrap since p + h ≤ H
    return (energy - 2 * cross + (R ** 2).sum()) / R.numel()


def _search(a: torch.Tensor, ref: torch.Tensor, kernel_size: int):
    """Best (MSE) integer then 0.25-px shift; returns (ty, tx), the shifted crop of a, and the crop of ref."""
    b = align_border(kernel_size)
    if min(a.shape[-2:]) - 2 * b < 11:
        raise ValueError(f"image {tuple(a.shape[-2:])} too small for a {b}-px border crop")
    ref_c = _crop(ref, 0, 0, b)
    m = min(int(kernel_size) // 2, b - 1)  # b − 1: the sub-pixel step may still move one more pixel
    table = _integer_mse(a, ref_c, b, m)
    idx = int(torch.argmin(table))
    iy, ix = idx // (2 * m + 1) - m, idx % (2 * m + 1) - m
    shifter = _fractional_shifter(a, b)
    cache = {}

    def err(fy, fx):
        if (fy, fx) not in cache:
            est = _crop(shifter(fy, fx), iy, ix, b)
            cache[(fy, fx)] = (torch.mean((est - ref_c) ** 2).item(), est)
        return cache[(fy, fx)][0]
    # coarse to fine on the 0.25-px grid within ±0.75: best of the 0.5-px steps, then its 0.25-px neighbours
    # (the MSE is smooth in the shift; 17 evaluations instead of 49)
    cy, cx = min(((fy, fx) for fy in (-0.5, 0.0, 0.5) for fx in (-0.5, 0.0, 0.5)), key=lambda t: err(*t))
    fy, fx = min(((cy + dy, cx + dx) for dy in (-SUBPIXEL_STEP, 0.0, SUBPIXEL_STEP)
                  for dx in (-SUBPIXEL_STEP, 0.0, SUBPIXEL_STEP)), key=lambda t: err(*t))
    return (iy + fy, ix + fx), cache[(fy, fx)][1], ref_c


def best_shift(x_est: ArrayLike, x_true: ArrayLike, kernel_size: int) -> tuple[float, float]:
    """(ty, tx) such that x_est(i + ty, j + tx) best matches x_true(i, j) on the cropped interior (min MSE).

    Integer search within ±min(kernel radius, border − 1), then 0.25-px refinement within ±0.75 px.
    """
    a, ref = _pair(x_est, x_true)
    return _search(a.clamp(0, 1), ref.clamp(0, 1), kernel_size)[0]


def aligned_scores(x_est: ArrayLike, x_true: ArrayLike, kernel_size: int) -> dict:
    """PSNR, SSIM and SSE of x_est against x_true after border crop and the best (sub-pixel) shift.

    Returns dict(psnr_aligned, ssim_aligned, sse_aligned, shift=(ty, tx)); see the module docstring.
    """
    a, ref = _pair(x_est, x_true)
    (ty, tx), est, ref_c = _search(a.clamp(0, 1), ref.clamp(0, 1), kernel_size)
    est = est.clamp(0, 1)  # the Fourier shift may overshoot [0, 1] slightly at edges
    sse = torch.sum((est - ref_c) ** 2).item()
    return {"psnr_aligned": psnr(est, ref_c), "ssim_aligned": ssim(est, ref_c), "sse_aligned": sse,
            "shift": (ty, tx)}


def error_ratio(x_est: ArrayLike, x_oracle: ArrayLike, x_true: ArrayLike, kernel_size: int) -> float:
    """Levin's error ratio: aligned SSE of x_est over aligned SSE of the true-kernel (oracle) result."""
    num = aligned_scores(x_est, x_true, kernel_size)["sse_aligned"]
    den = aligned_scores(x_oracle, x_true, kernel_size)["sse_aligned"]
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def success_rates(ratios, thresholds=(2.0, 3.0)) -> dict:
    """Fraction of cases with error ratio ≤ each threshold (Levin's cumulative histogram at 2 and 3)."""
    r = [float(v) for v in ratios if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return {f"success_le{t:g}": (sum(v <= t for v in r) / len(r) if r else None) for t in thresholds}


# ----------------------------------------------------------------------------------------------- all
METRIC_FIELDS = ("psnr", "ssim", "psnr_aligned", "ssim_aligned", "shift_y", "shift_x", "kernel_mse",
                 "kernel_mse_raw", "reblur_error")
BLURRY_FIELDS = ("psnr_blurry", "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned")
ALL_FIELDS = METRIC_FIELDS + BLURRY_FIELDS + ("psnr_particles", "lpips")


def _fits_alignment(img: ArrayLike, kernel_size: int) -> bool:
    return min(_image_to_nchw(img, "x").shape[-2:]) - 2 * align_border(kernel_size) >= 11


def evaluate(x_est: ArrayLike, y: ArrayLike, k_est: Optional[ArrayLike], sigma: float,
             x_true: Optional[ArrayLike] = None, k_true: Optional[ArrayLike] = None,
             max_shift: int = 4, particles: Optional[list] = None, align_kernel_size: Optional[int] = None,
             with_blurry: bool = True) -> dict:
    """Every metric of one restored image, keyed by ALL_FIELDS; None where what it needs is unknown
    (ground truth for real photos; k_est for methods that output no kernel: no kernel MSE, no re-blur
    error). Aligned scores use `align_kernel_size`, else the true kernel's size, else the estimate's, and
    are None for images too small for the border crop (under 2·border + 11 px). With ground truth: the
    blurry input's scores (unless with_blurry=False: a caller scoring many methods on one case reuses them),
    each particle's PSNR (';'-joined, when there are several) and LPIPS when available."""
    out = dict.fromkeys(ALL_FIELDS)
    k_ref = k_true if k_true is not None else k_est
    ks = align_kernel_size or (max(k_ref.shape[-2:]) if k_ref is not None else None)
    out.update(_restoration_scores(x_est, y, k_est, sigma, x_true, k_true, max_shift, ks))
    if x_true is not None:
        if with_blurry:
            out.update(blurry_scores(np.clip(to_numpy_image(y), 0, 1), x_true, ks or 2 * ALIGN_MIN_BORDER + 1))
        if particles is not None and len(particles) > 1:
            out["psnr_particles"] = ";".join(f"{psnr(p, x_true):.3f}" for p in particles)
        rgb = lambda a: np.repeat(a, 3, 2) if np.shape(a)[-1] == 1 else a  # noqa: E731 — LPIPS wants RGB
        out["lpips"], _ = lpips_distance(rgb(to_numpy_image(x_est)), rgb(to_numpy_image(x_true)))
    return out


def to_numpy_image(a: ArrayLike) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def _restoration_scores(x_est, y, k_est, sigma, x_true, k_true, max_shift, ks) -> dict:
    out = dict.fromkeys(METRIC_FIELDS)
    if x_true is not None:
        out["psnr"], out["ssim"] = psnr(x_est, x_true), ssim(x_est, x_true)
        if ks is not None and _fits_alignment(x_true, ks):
            a = aligned_scores(x_est, x_true, ks)
            out["psnr_aligned"], out["ssim_aligned"] = a["psnr_aligned"], a["ssim_aligned"]
            out["shift_y"], out["shift_x"] = a["shift"]
    if k_est is not None:
        if k_true is not None:
            out["kernel_mse"], out["kernel_mse_raw"] = kernel_mse(k_est, k_true, max_shift)
        out["reblur_error"] = reblur_error(k_est, x_est, y, sigma)
    return out


def blurry_scores(y: ArrayLike, x_true: ArrayLike, kernel_size: int) -> dict:
    """The blurry input's plain and aligned PSNR/SSIM (keys BLURRY_FIELDS): the baseline every method must beat."""
    out = {"psnr_blurry": psnr(y, x_true), "ssim_blurry": ssim(y, x_true),
           "psnr_blurry_aligned": None, "ssim_blurry_aligned": None}
    if _fits_alignment(x_true, kernel_size):
        a = aligned_scores(y, x_true, kernel_size)
        out["psnr_blurry_aligned"], out["ssim_blurry_aligned"] = a["psnr_aligned"], a["ssim_aligned"]
    return out


# ----------------------------------------------------------------------------------------------- LPIPS
# torchvision's file name for the ImageNet VGG16 weights; looked up, never fetched
_VGG_FILE = "vgg16-397923af.pth"
_VGG_ENV = "LPIPS_VGG_WEIGHTS"


def _find_vgg_weights(vgg_weights: Optional[Union[str, Path]]) -> Optional[Path]:
    cands = []
    if vgg_weights:
        cands.append(Path(vgg_weights))
    if os.environ.get(_VGG_ENV):
        cands.append(Path(os.environ[_VGG_ENV]))
    cands.append(Path(torch.hub.get_dir()) / "checkpoints" / _VGG_FILE)
    for c in cands:
        if c.is_file():
            return c
    return None


def lpips_available(vgg_weights: Optional[Union[str, Path]] = None) -> tuple[bool, str]:
    """(available, reason). Needs the `lpips` package and a VGG16 state_dict file supplied by the user.

    The weights are searched at `vgg_weights`, then $LPIPS_VGG_WEIGHTS, then the torch hub cache
    (checkpoints/vgg16-397923af.pth). Nothing is ever downloaded.
    """
    try:
        import lpips  # noqa: F401
    except Exception as e:  # ImportError, or lpips failing on a missing torchvision
        return False, f"LPIPS skipped: the 'lpips' package is not importable ({type(e).__name__}: {e})"
    path = _find_vgg_weights(vgg_weights)
    if path is None:
        return False, (f"LPIPS skipped: VGG16 backbone weights not found (pass vgg_weights, set ${_VGG_ENV}, "
                       f"or place {_VGG_FILE} in {Path(torch.hub.get_dir()) / 'checkpoints'})")
    return True, f"LPIPS (VGG) with backbone weights {path}"


_LPIPS_CACHE: dict = {}


def _lpips_model(path: Path):
    key = str(path)
    if key not in _LPIPS_CACHE:
        import lpips

        # pnet_rand=True builds the backbone without fetching torchvision weights; we load the user's file
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        sd = torch.load(path, map_location="cpu", weights_only=True)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        # lpips splits vgg16.features into slice1..5 at layer indices 4, 9, 16, 23, 30, keeping the indices
        bounds = [(1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30)]
        mapped = {}
        for k, v in feats.items():
            idx = int(k.split(".")[0])
            for s, lo, hi in bounds:
                if lo <= idx < hi:
                    mapped[f"slice{s}.{k}"] = v
        model.net.load_state_dict(mapped, strict=True)
        model.eval()
        _LPIPS_CACHE[key] = model
    return _LPIPS_CACHE[key]


def lpips_distance(x: ArrayLike, y: ArrayLike,
                   vgg_weights: Optional[Union[str, Path]] = None) -> tuple[Optional[float], str]:
    """LPIPS (VGG) between images in [0, 1] (clipped), or (None, reason) when it cannot be computed."""
    ok, reason = lpips_available(vgg_weights)
    if not ok:
        return None, reason
    a, b = _pair(x, y)
    try:
        model = _lpips_model(_find_vgg_weights(vgg_weights))
        with torch.no_grad():
            d = model(a.float().clamp(0, 1) * 2 - 1, b.float().clamp(0, 1) * 2 - 1)
        return float(d.mean()), reason
    except Exception as e:  # a wrong weights file must not abort a whole evaluation run
        return None, f"LPIPS skipped: {type(e).__name__}: {e}"

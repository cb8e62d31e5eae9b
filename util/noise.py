"""The noise level σ of an observation when none is given (issue 13), in [0, 1] units.

Rule (`estimate_noise_sigma`; util.inputs.resolve_sigma uses it only when neither `--sigma` nor meta.csv /
the pickle gives σ):

1. Pixel noise σ_pix: Donoho's robust estimator median(|HH|)/0.6745 on the finest diagonal Haar
   coefficients HH = (a − b − c + d)/2 of each 2×2 block. On a quantised image HH only takes multiples of
   Δ/2 (Δ = the quantisation step, 1/255 for 8 bits), so the plain median sticks to a bin edge: every
   8-bit capture of Levin et al. came out at exactly 0.5/255/0.6745 = 0.74/255. We take the median of
   the grouped data instead (linear interpolation inside the median's bin, the textbook grouped median),
   which is continuous in the noise level.
2. Quantisation floor: rounding adds a uniform error of variance Δ²/12, so σ ≥ Δ/√12 (0.29/255 for 8 bits,
   0 for float input). With floor=0 a flat 8-bit image still gets Δ/√12, never 0.
3. Model floor σ_model = `FLOOR` (2/255, 0.8 % of the range, whatever the bit depth): a real capture departs
   from `y = k ⊛ x + n` (sensor non-linearity, slightly non-uniform blur, demosaicing, compression), and the
   best true blur fits the 24 Levin captures only to 1.35–4.44/255 RMS (`bench/real_captures.py` measures
   it), far above their σ_pix of 0.62–0.81/255. The data term must not be asked to explain that misfit as
   signal, so an estimated σ is never below FLOOR. A given σ (meta.csv, `--sigma`) is used as it is.

σ = max(σ_pix, Δ/√12, FLOOR). The quantisation step Δ is read from the values (all multiples of 1/255:
8 bits; of 1/65535: 16 bits; otherwise 0, float input).
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

MAD_TO_STD = 0.6745           # median(|N(0,1)|)
FLOOR = 2.0 / 255             # σ_model, rule 3 of the module doc
SIGMA_UNITS = "σ is in [0, 1] units, e.g. 10/255"


def sigma_in_range(s: float) -> bool:
    """The rule for every given σ (meta.csv, a pickle's `sigma`, --sigma): finite and in [0, 1) (a value ≥ 1
    was most likely given in /255)."""
    return math.isfinite(s) and 0 <= s < 1


def _as_hwc(y: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        t = y.detach().to("cpu", torch.float64)
        while t.ndim > 3 and t.shape[0] == 1:
            t = t[0]
        a = t.numpy().transpose(1, 2, 0) if t.ndim == 3 else t.numpy()
    else:
        a = np.asarray(y, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"noise estimation needs an image of at least 2×2 pixels, got shape {a.shape}")
    return a


def quantisation_step(y: Union[np.ndarray, torch.Tensor]) -> float:
    """Δ: 1/255 if every value is a multiple of it (8 bits), 1/65535 likewise (16 bits), else 0 (float)."""
    a = _as_hwc(y)
    for levels in (255, 65535):
        v = a * levels
        if np.all(np.abs(v - np.round(v)) < 1e-3):
            return 1.0 / levels
    return 0.0


def _grouped_median(v: np.ndarray, q: float) -> float:
    """Median of non-negative values v that are multiples of q (bins [jq − q/2, jq + q/2), the first [0, q/2)),
    interpolated linearly inside the median's bin; q = 0: the plain median."""
    if q <= 0:
        return float(np.median(v))
    j = np.round(v / q).astype(np.int64)
    counts = np.bincount(j)
    cum = np.cumsum(counts)
    half = 0.5 * len(v)
    m = int(np.searchsorted(cum, half, side="left"))  # first bin whose cumulative count reaches n/2
    below = cum[m - 1] if m > 0 else 0
    lo, width = (0.0, q / 2) if m == 0 else ((m - 0.5) * q, q)
    return lo + width * (half - below) / counts[m]


def pixel_sigma(y: Union[np.ndarray, torch.Tensor], q: float | None = None) -> float:
    """Rule 1: wavelet-MAD σ with the grouped median (one estimate per channel, averaged).
    Identical channels (a grayscale image stored as RGB) count once."""
    a = _as_hwc(y)
    q = quantisation_step(a) if q is None else q
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    chans = [c for c in range(a.shape[2]) if c == 0 or not np.array_equal(a[..., c], a[..., 0])]
    return float(np.mean([_grouped_median(np.abs(hh[..., c]).ravel(), q / 2) for c in chans])) / MAD_TO_STD


def estimate_noise_sigma(y: Union[np.ndarray, torch.Tensor], floor: float = FLOOR) -> float:
    """σ = max(σ_pix, Δ/√12, floor) (module doc): finite and > 0 for any finite image (flat ones too)."""
    a = _as_hwc(y)
    q = quantisation_step(a)
    s = max(pixel_sigma(a, q), q / math.sqrt(12.0), floor)
    if not math.isfinite(s):
        raise ValueError("noise estimate is not finite (does the image contain NaN or inf?)")
    return s


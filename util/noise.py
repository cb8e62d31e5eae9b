"""Blind estimation of the noise level of an observation (used when no σ is given)."""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

MAD_TO_STD = 0.6745  # median(|N(0,1)|)


def estimate_noise_sigma(y: Union[np.ndarray, torch.Tensor]) -> float:
    """Blind estimate of the white Gaussian noise std of an image, in the image's units ([0, 1]).

    Donoho's robust estimator: median(|HH|) / 0.6745 over the finest diagonal Haar wavelet coefficients
    HH = (a − b − c + d) / 2 of each 2×2 block (orthonormal, so pure noise of std σ gives std σ), one
    estimate per channel, averaged. HH of a smooth (e.g. blurred) image is nearly zero, so the median
    sees mostly noise; texture biases the estimate up. Accepts numpy H×W×C / H×W or torch (C,H,W)/(1,C,H,W).
    """
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
        raise ValueError(f"estimate_noise_sigma needs an image of at least 2×2 pixels, got shape {a.shape}")
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(hh).reshape(-1, a.shape[2]), axis=0) / MAD_TO_STD
    return float(per_channel.mean())

"""Padding is not data: the unknown-boundary data term for non-periodic photos (issue 13).

A real photo is blurred by its true, non-circular boundary: the pixels just outside the frame, which we
never saw, were blurred into the border. The runner pads y (util.geometry.pad_for_boundary, e.g. the taper) so that the
circular FFT model can run on a larger domain, but the padded band is not an observation: a mirrored band
of a camera-shake blur is the mirror image blurred by the MIRRORED kernel, which no single kernel explains.
Used as data, the band pulls the M-step towards symmetrised kernels and the guidance towards ringing at the
frame (docs/real_captures.md: with the true kernel, 20.3 dB with the band as data, 23.6 dB filled).

The fix is the data term of the frame only, Σ_{p ∈ frame} (y − k ⊛ x)_p². It is the complete-data term of
an EM for the missing band: fill the band with the current prediction k ⊛ x̂0 (`fill_padding`), then run the
usual circular M-step and guidance on the filled y, whose band residual is then zero. Iterated, as Fast EM
does at every diffusion step, the fill-then-solve step converges to the frame-only least squares kernel
(tests/test_boundary.py: noise-free frame, where that solution is the true kernel).
"""
from __future__ import annotations

from typing import Optional

import torch


def data_mask(shape: tuple, box: Optional[tuple], device=None, dtype=torch.float32) -> Optional[torch.Tensor]:
    """(1, 1, H, W) mask of the observed frame box=(top, left, h, w) inside the padded H×W domain;
    None when the frame is the whole domain (circular model: nothing to fill)."""
    H, W = shape
    if box is None or tuple(box) == (0, 0, H, W):
        return None
    t, l, h, w = box
    m = torch.zeros(1, 1, H, W, device=device, dtype=dtype)
    m[..., t:t + h, l:l + w] = 1
    return m


def fill_padding(y: torch.Tensor, mask: Optional[torch.Tensor], prediction: torch.Tensor) -> torch.Tensor:
    """y on the frame, the model's prediction k ⊛ x̂0 (averaged over particles) on the padding."""
    if mask is None:
        return y
    return mask * y + (1 - mask) * prediction.mean(0, keepdim=True)


def frame_mean(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of y over the frame (1, C, 1, 1): a fill that knows nothing of the padding."""
    return (y * mask).sum((-2, -1), keepdim=True) / mask.sum()

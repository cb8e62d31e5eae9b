"""Unknown-boundary data term (diffusion_em/boundary.py): fill-then-solve is the frame-only least squares."""
from __future__ import annotations

import numpy as np
import torch

from diffusion_em.boundary import data_mask, fill_padding
from diffusion_em.mstep import MStepConfig, m_step
from util.geometry import dirac
from util.fft import conv_circular
from util.geometry import pad_for_boundary


def _case(seed=0, n=24, s=5, pad=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, n + 2 * pad, n + 2 * pad, generator=g, dtype=torch.float64)
    k = torch.rand(s, s, generator=g, dtype=torch.float64) ** 3  # asymmetric, all taps > 0
    k = k / k.sum()
    y_frame = conv_circular(x, k)[..., pad:pad + n, pad:pad + n]  # what a camera sees: no wrap-around
    y, box = pad_for_boundary(y_frame, pad, "taper")
    return x, k, y, box


def test_mask_and_fill():
    assert data_mask((8, 8), (0, 0, 8, 8)) is None and data_mask((8, 8), None) is None
    m = data_mask((8, 9), (2, 3, 4, 5))
    assert m.shape == (1, 1, 8, 9) and m.sum() == 20 and m[0, 0, 2, 3] == 1 and m[0, 0, 1, 3] == 0
    y, p = torch.zeros(1, 1, 8, 9), torch.ones(2, 1, 8, 9)
    f = fill_padding(y, m, p)
    assert torch.equal(f, 1 - m)
    assert fill_padding(y, None, p) is y


def test_iterated_fill_recovers_the_kernel_the_padded_band_biases():
    """Noise-free frame, taper-padded band: the frame-only least squares is the true kernel. The circular
    M-step on the padded y is biased by the band; filling the band with k ⊛ x at each call removes it."""
    x, k, y, box = _case()
    cfg = MStepConfig(J=1, beta=1e-6)  # ρ = βσ² ≈ 0: plain least squares + simplex
    mask = data_mask(tuple(y.shape[-2:]), box, dtype=y.dtype)
    K_plain = m_step(y, x, dirac(5, dtype=y.dtype), 0.01, cfg)
    K = dirac(5, dtype=y.dtype)
    for _ in range(40):
        K = m_step(fill_padding(y, mask, conv_circular(x, K[0, 0])), x, K, 0.01, cfg)
    err_plain = float((K_plain[0, 0] - k).abs().max())
    err_fill = float((K[0, 0] - k).abs().max())
    assert err_plain > 1e-2, err_plain
    assert err_fill < 1e-6, err_fill


class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return 0 * x


def test_drivers_ignore_the_padded_band_given_its_box():
    """With data_box, y's padding never reaches the M-step or the guidance: two observations that differ
    only in the band give the same kernel and image (without the box they do not)."""
    from diffusion_em.em import diffusion_em, fast_diffusion_em
    from guided_diffusion.denoiser import EpsDenoiser
    from guided_diffusion.guidance import PiGDM
    from guided_diffusion.schedule import Schedule

    den = EpsDenoiser(_Zero(), Schedule.create(4))
    y1 = 0.3 + 0.4 * torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    y2 = y1.clone()
    y2[..., :4, :] = 1.0
    box = (4, 4, 16, 16)

    def run(drv, y, b, **kw):
        return drv(den, y, 0.02, PiGDM(), MStepConfig(J=1), 5, torch.Generator().manual_seed(1), guard=None,
                   data_box=b, **kw)
    for drv, kw in ((fast_diffusion_em, {}), (diffusion_em, {"rounds": 2})):
        a, b = run(drv, y1, box, **kw), run(drv, y2, box, **kw)
        assert torch.equal(a.kernel, b.kernel) and torch.equal(a.x, b.x)
        assert not torch.equal(run(drv, y1, None, **kw).x, run(drv, y2, None, **kw).x)

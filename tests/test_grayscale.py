"""Grayscale path (diffusion_em/grayscale.py): detection, the σ·√C equivalence, grey output."""
from __future__ import annotations

import numpy as np
import torch

from diffusion_em import grayscale
from util.fft import conv_circular


def test_detection():
    g = np.random.default_rng(0).random((8, 9, 1))
    assert grayscale.is_grayscale(np.repeat(g, 3, 2))
    rgb = np.repeat(g, 3, 2)
    rgb[0, 0, 1] += 1e-3
    assert not grayscale.is_grayscale(rgb)
    assert not grayscale.is_grayscale(g)


def test_replicated_likelihood_at_sqrt3_sigma_is_the_grey_one_plus_a_colour_term():
    """Σ_c‖y − k⊛x_c‖²/(3σ²) = ‖y − k⊛x̄‖²/σ² + Σ_c‖k⊛(x_c − x̄)‖²/(3σ²) for any RGB x."""
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.random((1, 1, 16, 16)))
    x = torch.from_numpy(rng.random((1, 3, 16, 16)))
    k = torch.from_numpy(rng.random((5, 5)))
    k = k / k.sum()
    sigma = 0.03
    s3 = grayscale.replicated_sigma(sigma, 3)
    rep = ((y - conv_circular(x, k)) ** 2).sum() / s3 ** 2
    xbar = x.mean(1, keepdim=True)
    grey = ((y - conv_circular(xbar, k)) ** 2).sum() / sigma ** 2
    colour = (conv_circular(x - xbar, k) ** 2).sum() / s3 ** 2
    assert torch.allclose(rep, grey + colour)


def test_to_gray_is_the_channel_mean():
    x = np.random.default_rng(2).random((4, 5, 3)).astype(np.float32)
    g = grayscale.to_gray(x)
    assert g.shape == (4, 5, 1) and g.dtype == np.float32
    np.testing.assert_allclose(g[..., 0], x.mean(2), rtol=1e-6)

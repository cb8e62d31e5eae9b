"""The σ rule of util/noise.py: quantised noise-free input, known noise, flat images."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from util import noise


def _smooth(n=128):
    yy, xx = np.mgrid[0:n, 0:n] / n
    return 0.5 + 0.3 * np.sin(2 * np.pi * xx) * np.cos(3 * np.pi * yy)


def _quantise(a, levels=255):
    return np.clip(np.round(a * levels), 0, levels) / levels


@pytest.mark.parametrize("levels", [255, 65535])
def test_quantisation_step_is_detected(levels):
    assert noise.quantisation_step(_quantise(_smooth(), levels)) == pytest.approx(1 / levels)
    assert noise.quantisation_step(_smooth()) == 0.0
    assert noise.quantisation_step(_quantise(_smooth()).astype(np.float32)) == pytest.approx(1 / 255)


def test_quantised_noise_free_gives_the_rounding_error_not_zero():
    y = _quantise(_smooth())
    # rounding error is uniform of std Δ/√12; the plain median of |HH| would give 0 here
    assert noise.pixel_sigma(y) == pytest.approx(1 / 255 / math.sqrt(12), rel=0.25)
    assert noise.estimate_noise_sigma(y) == pytest.approx(noise.FLOOR)


@pytest.mark.parametrize("sigma255", [0.5, 1.0, 1.5, 3.0, 10.0])
def test_known_noise_through_8bit_quantisation(sigma255):
    """The grouped median follows σ continuously below and between the 8-bit bins (the plain median
    jumps between 0, 0.74 and 1.48/255); quantisation adds Δ²/12 to the variance."""
    rng = np.random.default_rng(int(sigma255 * 10))
    y = _quantise(np.repeat(_smooth(256)[..., None], 3, 2) + rng.normal(0, sigma255 / 255, (256, 256, 3)))
    expect = math.sqrt(sigma255 ** 2 + 1 / 12) / 255
    assert noise.pixel_sigma(y) == pytest.approx(expect, rel=0.1)
    assert noise.estimate_noise_sigma(y) == pytest.approx(max(expect, noise.FLOOR), rel=0.1)


def test_float_input_known_noise_and_tensor_layout():
    y = _smooth(256) + np.random.default_rng(1).normal(0, 8 / 255, (256, 256))
    est = noise.estimate_noise_sigma(y)
    assert est == pytest.approx(8 / 255, rel=0.1)
    assert noise.estimate_noise_sigma(torch.from_numpy(y)[None, None]) == pytest.approx(est)


def test_grayscale_stored_as_rgb_counts_once():
    g = _quantise(_smooth(64) + np.random.default_rng(2).normal(0, 2 / 255, (64, 64)))
    assert noise.pixel_sigma(np.repeat(g[..., None], 3, 2)) == pytest.approx(noise.pixel_sigma(g))


@pytest.mark.parametrize("value", [0.0, 0.5, 128 / 255, 1.0])
def test_flat_image_is_positive_and_finite(value):
    s = noise.estimate_noise_sigma(np.full((16, 16, 3), value))
    assert math.isfinite(s) and s > 0


def test_bad_input():
    with pytest.raises(ValueError, match="2×2"):
        noise.estimate_noise_sigma(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="finite"):
        noise.estimate_noise_sigma(np.full((4, 4), np.nan))


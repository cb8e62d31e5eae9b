"""Centred kernel padding/cropping and the edge taper: one copy, used by the runner, metrics, M-step and generators."""
import numpy as np
import pytest
import torch

from util.fft import p2o
from util.geometry import edge_taper, pad_centred, pad_for_boundary


@pytest.mark.parametrize("a,b,size", [(5, 5, 9), (4, 6, 9), (5, 5, 8), (6, 6, 64), (9, 9, 5), (8, 7, 4)])
def test_pad_centred_keeps_the_centre_tap_where_the_fft_model_puts_it(a, b, size):
    """A kernel and its centred pad/crop give the same OTF whenever no tap is cropped (p2o centres at s//2)."""
    g = torch.Generator().manual_seed(a * 100 + b)
    k = torch.zeros(a, b, dtype=torch.float64)
    r0, c0 = max(0, a // 2 - size // 2), max(0, b // 2 - size // 2)  # taps that survive a crop
    k[r0:r0 + min(a, size), c0:c0 + min(b, size)] = torch.rand(min(a, size), min(b, size), generator=g)
    out = pad_centred(k, size)
    assert out.shape == (size, size) and float(out.sum()) == pytest.approx(float(k.sum()))
    torch.testing.assert_close(p2o(out, (72, 72)), p2o(k, (72, 72)))
    np.testing.assert_array_equal(pad_centred(k.numpy(), size), out.numpy())  # numpy and torch agree


def test_edge_taper_blends_the_border_to_the_mean_and_keeps_the_interior():
    x = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = edge_taper(x, 4)
    torch.testing.assert_close(t[..., 4:-4, 4:-4], x[..., 4:-4, 4:-4], rtol=0, atol=0)
    mean = x.mean((-2, -1))[..., None]  # (1, 3, 1): one value per channel, against a row (1, 3, W)
    assert ((t[..., 0, :] - mean).abs() < 0.1 * (x[..., 0, :] - mean).abs() + 1e-12).all()  # outer row ≈ mean
    assert ((t[..., 3, 4:-4] - mean).abs() > 0.9 * (x[..., 3, 4:-4] - mean).abs()).all()  # inner band row: mostly image
    yp, box = pad_for_boundary(x, 5, "taper")
    # padded band: reflection blended to the image mean, weight ~0 at the outer edge
    assert (yp[..., 0, :] - mean).abs().max() < 0.05 and torch.equal(yp[..., 5:25, 5:35], x)

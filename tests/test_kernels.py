"""Kernel generator, simplex projection and re-centring: the math."""
import itertools

import numpy as np
import pytest
import torch

from kernel_denoiser.kernels import camera_shake_kernels, kernel_stats
from util.geometry import center_of_mass, project_simplex, project_simplex_on, recenter


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: thread start-up dominates


# ------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("size", [9, 33, 64])
def test_generated_kernels_are_valid_and_centred(size):
    k = camera_shake_kernels(16, size, np.random.default_rng(3))
    assert k.shape == (16, size, size) and k.dtype == np.float32
    assert (k >= 0).all()
    np.testing.assert_allclose(k.sum((1, 2)), 1.0, atol=1e-5)
    com = center_of_mass(torch.from_numpy(k).double())
    np.testing.assert_allclose(com.numpy(), size // 2, atol=1e-3)
    # a camera-shake PSF is not a Dirac: it spreads over several taps
    assert min(kernel_stats(kk)["taps"] for kk in k) >= 3


def test_generator_seeded_reproducibility():
    a = camera_shake_kernels(8, 33, np.random.default_rng(7))
    b = camera_shake_kernels(8, 33, np.random.default_rng(7))
    c = camera_shake_kernels(8, 33, np.random.default_rng(8))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)
    np.testing.assert_array_equal(camera_shake_kernels(2, 33, 5, exposure_weighting=True),
                                  camera_shake_kernels(2, 33, 5, exposure_weighting=True))


def test_generator_size_range():
    with pytest.raises(ValueError):
        camera_shake_kernels(1, 8, 0)
    with pytest.raises(ValueError):
        camera_shake_kernels(1, 65, 0)


def test_generated_33_statistics_near_real_kernels():
    st = [kernel_stats(k) for k in camera_shake_kernels(200, 33, np.random.default_rng(0))]
    taps = np.median([s["taps"] for s in st])
    ext = np.median([s["extent"] for s in st])
    # Levin's 8: median 69 taps, extents 11–22; the authors' samples: 46–67 taps, extents 14–15
    assert 45 <= taps <= 90, taps
    assert 11 <= ext <= 20, ext


# ------------------------------------------------------------------------------------ simplex projection
def brute_force_simplex_projection(v: np.ndarray) -> np.ndarray:
    """Exact projection by enumerating supports: on support S, p = v - θ with θ = (Σ_S v - 1)/|S|."""
    best, best_d = None, np.inf
    n = len(v)
    for r in range(1, n + 1):
        for S in itertools.combinations(range(n), r):
            S = list(S)
            theta = (v[S].sum() - 1) / len(S)
            p = np.zeros(n)
            p[S] = v[S] - theta
            if (p >= -1e-12).all():
                d = ((p - v) ** 2).sum()
                if d < best_d:
                    best, best_d = p, d
    return best


def test_project_simplex_is_the_euclidean_projection():
    g = np.random.default_rng(0)
    V = g.normal(size=(40, 6)) * g.uniform(0.05, 2, size=(40, 1))
    P = project_simplex(torch.from_numpy(V).reshape(40, 2, 3)).reshape(40, 6).numpy()
    for v, p in zip(V, P):
        np.testing.assert_allclose(p, brute_force_simplex_projection(v), atol=1e-12)


def test_project_simplex_known_cases_and_validity():
    t = torch.tensor([[0.5, 0.5, 0.5], [2.0, 0.0, 0.0], [0.2, 0.3, 0.5], [-1.0, -1.0, 5.0]], dtype=torch.float64)
    p = project_simplex(t.reshape(4, 1, 3))[:, 0]
    expect = torch.tensor([[1 / 3] * 3, [1.0, 0, 0], [0.2, 0.3, 0.5], [0, 0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(p, expect)
    k = torch.randn(3, 1, 33, 33) * 0.01 + 0.001
    q = project_simplex(k)
    assert (q >= 0).all()
    torch.testing.assert_close(q.sum((-2, -1)), torch.ones(3, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(project_simplex(q), q, atol=1e-7, rtol=0)  # idempotent on valid kernels


def test_project_simplex_on_a_support_is_the_constrained_projection():
    """Onto {k ≥ 0, Σk = 1, k = 0 outside the support}: the brute-force projection of the inside taps."""
    g = np.random.default_rng(1)
    V = g.normal(size=(30, 2, 4)) * g.uniform(0.05, 3, size=(30, 1, 1)) + g.uniform(-2, 2, size=(30, 1, 1))
    support = torch.tensor([[True, False, True, True], [False, True, True, False]])
    P = project_simplex_on(torch.from_numpy(V), support).numpy()
    inside = support.numpy()
    for v, p in zip(V, P):
        assert (p[~inside] == 0).all()
        np.testing.assert_allclose(p[inside], brute_force_simplex_projection(v[inside]), atol=1e-12)

# -------------------------------------------------------------------------------------------- recenter
def _offcentre_batch():
    k = torch.from_numpy(camera_shake_kernels(4, 33, np.random.default_rng(1))).double()
    # move each kernel off centre by a different sub-pixel amount (bilinear, well inside the grid)
    out = []
    for i, (dr, dc) in enumerate([(3.3, -2.6), (-4.75, 1.2), (0.5, 0.5), (2.0, -5.0)]):
        kk = torch.roll(k[i], (int(np.floor(dr)), int(np.floor(dc))), (0, 1))
        a, b = dr - np.floor(dr), dc - np.floor(dc)
        kk = (1 - a) * kk + a * torch.roll(kk, 1, 0)
        kk = (1 - b) * kk + b * torch.roll(kk, 1, 1)
        out.append(kk * (1.0 + 0.3 * i))  # sums differ from 1: recenter must keep each one
    return torch.stack(out)


def test_recenter_moves_com_to_the_middle_and_keeps_the_sum():
    k = _offcentre_batch()
    assert (center_of_mass(k) - 16).abs().max() > 1.0
    r = recenter(k[:, None])[:, 0]
    assert r.shape == k.shape and r.dtype == k.dtype
    torch.testing.assert_close(center_of_mass(r), torch.full((4, 2), 16.0, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(r.sum((-2, -1)), k.sum((-2, -1)), atol=1e-12, rtol=0)
    assert (r >= 0).all()


def test_recenter_identity_on_centred_and_even_sizes():
    k = torch.from_numpy(camera_shake_kernels(2, 33, np.random.default_rng(2))).double()
    torch.testing.assert_close(recenter(k), k, atol=1e-6, rtol=0)
    k64 = torch.zeros(64, 64, dtype=torch.float64)
    k64[10:13, 40:44] = 1.0
    r = recenter(k64)
    torch.testing.assert_close(center_of_mass(r), torch.tensor([32.0, 32.0], dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(r.sum().item() - 12.0) < 1e-9


def test_integer_recenter_moves_whole_pixels_only_and_copies_the_taps():
    """'integer' shifts by the integer part of the offset: the taps are an exact copy, the centre of mass ends
    within 1 px of the middle, and a kernel less than 1 px off is left as it is (no back-and-forth)."""
    k = _offcentre_batch()
    r = recenter(k[:, None], "integer")[:, 0]
    off = 16 - center_of_mass(k)
    moved = torch.trunc(off)
    assert (moved.abs().sum(-1) > 0).any()  # some kernels were moved
    for i in range(len(k)):
        expect = torch.roll(k[i], (int(moved[i, 0]), int(moved[i, 1])), (0, 1))  # well inside: no wrap-around
        torch.testing.assert_close(r[i], expect, atol=1e-12, rtol=0)
    assert ((center_of_mass(r) - 16).abs() < 1.0).all()
    torch.testing.assert_close(r.sum((-2, -1)), k.sum((-2, -1)), atol=1e-12, rtol=0)
    centred = recenter(k[0])
    near = 0.6 * centred + 0.4 * torch.roll(centred, 1, 1)  # centre of mass 0.4 px off
    torch.testing.assert_close(recenter(near, "integer"), near, atol=0, rtol=0)
    with pytest.raises(ValueError, match="recenter shift"):
        recenter(k, "cubic")

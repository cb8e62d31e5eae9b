"""Tests for util/metrics.py (docs/algorithm.md §5)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from util import metrics as M
from util.fft import conv_circular


def _img(h=32, w=32, seed=0, lo=0.2, hi=0.8):
    return (lo + (hi - lo) * np.random.default_rng(seed).random((h, w, 3))).astype(np.float64)


# ------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_known_values():
    x = _img()
    assert M.psnr(x, x) == math.inf
    assert M.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 20 dB
    assert M.psnr(x, x + 0.01) == pytest.approx(40.0, abs=1e-9)
    # clipping: values above 1 count as 1
    assert M.psnr(np.ones((4, 4, 3)), np.full((4, 4, 3), 1.7)) == math.inf
    t = torch.from_numpy(x).permute(2, 0, 1)[None]
    assert M.psnr(t, t + 0.1) == pytest.approx(20.0, abs=1e-9)  # tensors (N,C,H,W) accepted
    with pytest.raises(ValueError, match="shapes differ"):
        M.psnr(x, x[:-1])


def test_ssim_identical_and_constant_offset():
    x = _img()
    assert M.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    # constant images: SSIM = luminance term (2ab + C1)/(a² + b² + C1), C1 = 0.01², per channel averaged
    a, b = np.array([0.3, 0.5, 0.7]), np.array([0.5, 0.5, 0.2])
    c1 = 0.01 ** 2
    expected = np.mean((2 * a * b + c1) / (a ** 2 + b ** 2 + c1))
    got = M.ssim(np.broadcast_to(a, (24, 24, 3)), np.broadcast_to(b, (24, 24, 3)))
    assert got == pytest.approx(expected, abs=1e-5)  # pytorch_msssim builds its window in float32
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)
    assert 0 < M.ssim(x, noisy) < 0.9
    with pytest.raises(ValueError, match="11"):
        M.ssim(x[:8, :8], x[:8, :8])


# ------------------------------------------------------------------------------------------ kernel MSE
def _brute_kernel_mse(ke, kt, m):
    """Loop reference: explicit zero-filled shifts of the true kernel."""
    ke, kt = ke / ke.sum(), kt / kt.sum()
    n = ke.size
    S = (max(ke.shape[0], kt.shape[0]), max(ke.shape[1], kt.shape[1]))
    big = (S[0] + 2 * m, S[1] + 2 * m)

    def place(k, dy=0, dx=0):
        out = np.zeros(big)
        t0 = big[0] // 2 - k.shape[0] // 2 + dy
        t1 = big[1] // 2 - k.shape[1] // 2 + dx
        out[t0:t0 + k.shape[0], t1:t1 + k.shape[1]] = k
        return out

    E = place(ke)
    errs = {(dy, dx): ((E - place(kt, dy, dx)) ** 2).sum() / n for dy in range(-m, m + 1) for dx in range(-m, m + 1)}
    return min(errs.values()), errs[(0, 0)]


@pytest.mark.parametrize("se,st", [(33, 33), (33, 17), (17, 33), (32, 33), (33, 64)])
def test_kernel_mse_matches_loop(se, st):
    rng = np.random.default_rng(se * 100 + st)
    ke, kt = rng.random((se, se)) ** 8, rng.random((st, st)) ** 8
    got = M.kernel_mse(ke, kt)
    ref = _brute_kernel_mse(ke, kt, 4)
    assert got == pytest.approx(ref, rel=1e-10)


def test_kernel_mse_shift_alignment():
    k = np.zeros((33, 33))
    k[12:20, 14] = 1.0
    k[19, 14:22] = 0.5
    for dy, dx in [(4, -4), (-3, 2), (0, 1)]:
        shifted = np.roll(k, (dy, dx), axis=(0, 1))
        aligned, raw = M.kernel_mse(shifted, k)
        assert aligned == pytest.approx(0.0, abs=1e-15) and raw > 1e-5
    aligned, raw = M.kernel_mse(np.roll(k, 5, axis=0), k)  # outside ±4: no longer aligned to zero
    assert aligned > 1e-6
    assert M.kernel_mse(np.roll(k, 5, axis=0), k, max_shift=5)[0] == pytest.approx(0.0, abs=1e-15)


def test_kernel_mse_normalisation_and_taps():
    d_est = np.zeros((33, 33))
    d_est[16, 16] = 3.0  # unnormalised on purpose
    d_true = np.zeros((17, 17))
    d_true[8, 9] = 1.0  # a Dirac one px to the right of centre
    aligned, raw = M.kernel_mse(d_est, d_true)
    assert aligned == 0.0
    assert raw == pytest.approx(2 / 33 ** 2)  # two unit taps differ, divided by the ESTIMATE's 33² taps
    assert M.kernel_mse(d_true, d_est)[1] == pytest.approx(2 / 17 ** 2)
    assert M.kernel_mse(torch.tensor(d_est)[None, None], d_true)[1] == pytest.approx(raw)
    with pytest.raises(ValueError, match="sum"):
        M.kernel_mse(-d_est, d_true)
    with pytest.raises(ValueError, match="2-D"):
        M.kernel_mse(np.ones((2, 3, 3)), d_true)
    with pytest.raises(ValueError, match="NaN"):
        M.kernel_mse(np.full((3, 3), np.nan), d_true)


# ------------------------------------------------------------------------------------------ re-blur
def test_reblur_error():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g, dtype=torch.float64)
    k = torch.rand(9, 9, generator=g, dtype=torch.float64)
    k = k / k.sum()
    sigma = 10 / 255
    clean = conv_circular(x, k)
    assert M.reblur_error(k, x, clean, sigma) == pytest.approx(-sigma ** 2, abs=1e-15)
    y = clean + sigma * torch.randn(x.shape, generator=g, dtype=torch.float64)
    e = M.reblur_error(k, x, y, sigma)
    assert abs(e) < 0.05 * sigma ** 2  # the true pair explains the data up to the noise
    # numpy H×W×3 inputs give the same number
    e_np = M.reblur_error(k.numpy(), x[0].permute(1, 2, 0).numpy(), y[0].permute(1, 2, 0).numpy(), sigma)
    assert e_np == pytest.approx(e, rel=1e-12)
    # a wrong kernel (Dirac) leaves a large residual
    dirac = torch.zeros(9, 9, dtype=torch.float64)
    dirac[4, 4] = 1
    assert M.reblur_error(dirac, x, y, sigma) > 10 * sigma ** 2


# ------------------------------------------------------------------------------------------ LPIPS
def test_lpips_missing_is_clean(monkeypatch, tmp_path):
    monkeypatch.delenv("LPIPS_VGG_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache: no weights
    ok, reason = M.lpips_available()
    assert not ok and reason.startswith("LPIPS skipped")
    val, why = M.lpips_distance(_img(), _img(seed=1))
    assert val is None and why == reason
    assert not any(tmp_path.rglob("*"))  # nothing was downloaded into the cache


def test_evaluate_fields():
    x = _img(24, 24)
    k = np.zeros((5, 5))
    k[2, 2] = 1
    full = M.evaluate(x, x, k, 0.01, x_true=x, k_true=k, particles=[x, 0.5 * x])
    assert set(full) == set(M.ALL_FIELDS) == set(M.METRIC_FIELDS) | set(M.BLURRY_FIELDS) | {"psnr_particles", "lpips"}
    assert full["psnr_blurry"] == math.inf and full["psnr_particles"].split(";")[0] == "inf"
    assert float(full["psnr_particles"].split(";")[1]) == pytest.approx(M.psnr(0.5 * x, x), abs=1e-3)
    assert full["psnr"] == math.inf and full["ssim"] == pytest.approx(1.0) and full["kernel_mse"] == 0.0
    assert full["reblur_error"] == pytest.approx(-1e-4)
    assert full["psnr_aligned"] is None  # 24 px: too small for the 15-px border crop
    photo = M.evaluate(x, x, k, 0.01)
    assert photo["psnr"] is None and photo["kernel_mse"] is None and photo["reblur_error"] is not None
    assert photo["psnr_blurry"] is None and photo["psnr_particles"] is None and photo["lpips"] is None
    big = _img(64, 64)
    shifted = np.roll(big, (1, -2), (0, 1))
    full = M.evaluate(shifted, shifted, k, 0.0, x_true=big, k_true=k)
    assert full["psnr_aligned"] == math.inf and (full["shift_y"], full["shift_x"]) == (1.0, -2.0)
    b = M.blurry_scores(shifted, big, kernel_size=5)
    assert set(b) == set(M.BLURRY_FIELDS) and b["psnr_blurry_aligned"] == math.inf > b["psnr_blurry"]


# ------------------------------------------------------------------------------------------ aligned metrics
def _smooth_scene(h, w, oy=0.0, ox=0.0):
    """A band-limited test scene sampled at (i + oy, j + ox): sub-pixel shifts of it are exact."""
    i, j = np.meshgrid(np.arange(h) + oy, np.arange(w) + ox, indexing="ij")
    chans = [0.5 + 0.2 * np.sin(2 * np.pi * (i / 17.0 + c * 0.1)) * np.cos(2 * np.pi * (j / 23.0 - c * 0.2))
             + 0.1 * np.sin(2 * np.pi * (0.7 * i + 1.3 * j) / 31.0) for c in range(3)]
    return np.stack(chans, -1)


def test_aligned_recovers_integer_shift():
    x = _img(96, 96, seed=3)
    est = np.roll(x, (3, -5), axis=(0, 1))  # est(i, j) = x(i − 3, j + 5)
    r = M.aligned_scores(est, x, kernel_size=17)
    assert r["shift"] == (3.0, -5.0)
    assert r["psnr_aligned"] == math.inf and r["ssim_aligned"] == pytest.approx(1.0, abs=1e-9)
    assert M.psnr(est, x) < 15  # plain PSNR punishes the shift


def test_aligned_recovers_subpixel_shift():
    x = _smooth_scene(80, 80)
    est = _smooth_scene(80, 80, oy=-1.25, ox=0.5)  # est(i, j) = x(i − 1.25, j + 0.5)
    r = M.aligned_scores(est, x, kernel_size=9)
    assert r["shift"] == (1.25, -0.5)
    assert r["psnr_aligned"] > 45 and r["psnr_aligned"] > M.psnr(est, x) + 15
    # a shift beyond ±kernel radius is not searched: aligned PSNR stays low
    far = np.roll(x, 12, axis=0)
    assert M.aligned_scores(far, x, kernel_size=9)["shift"][0] <= 4.75


def test_integer_mse_table_matches_loop():
    rng = np.random.default_rng(5)
    a, r = torch.from_numpy(rng.random((1, 3, 50, 47))), torch.from_numpy(rng.random((1, 3, 50, 47)))
    b, m = 15, 6
    table = M._integer_mse(a, M._crop(r, 0, 0, b), b, m)
    for dy in (-6, -1, 0, 4, 6):
        for dx in (-6, 0, 3, 6):
            ref = torch.mean((M._crop(a, dy, dx, b) - M._crop(r, 0, 0, b)) ** 2).item()
            assert table[dy + m, dx + m].item() == pytest.approx(ref, rel=1e-9)


def test_aligned_border_and_errors():
    assert M.align_border(9) == 15 and M.align_border(33) == 16 and M.align_border(64) == 32
    with pytest.raises(ValueError, match="too small"):
        M.aligned_scores(_img(40, 40), _img(40, 40), kernel_size=33)


def test_error_ratio_known_values():
    x = _smooth_scene(64, 64)
    rng = np.random.default_rng(0)
    e = rng.choice([-1.0, 1.0], x.shape)  # same |error| everywhere: SSE ratios exact up to the sign pattern
    est, orc = x + 0.04 * e, x + 0.02 * e
    ratio = M.error_ratio(est, orc, x, kernel_size=5)
    assert ratio == pytest.approx(4.0, rel=1e-2)  # twice the error amplitude = 4x the SSE
    # the ratio is invariant to a shift of the estimate (within the search)
    noisy = x + 0.02 * e
    assert M.error_ratio(np.roll(noisy, (2, 1), (0, 1)), noisy, x, kernel_size=9) == pytest.approx(1.0, rel=0.05)
    assert M.error_ratio(x, x, x, kernel_size=9) == 1.0
    assert M.success_rates([1.0, 2.0, 2.5, 4.0, None]) == {"success_le2": 0.5, "success_le3": 0.75}

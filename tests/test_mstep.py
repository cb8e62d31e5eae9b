"""M-step (HQS kernel update): exactness of the fast data step, known-kernel recovery, options, errors."""
import dataclasses

import numpy as np
import pytest
import torch

from diffusion_em.mstep import MStepConfig, data_step, m_step, m_step_coarse, precompute, resize_kernel, support_box
from util.geometry import dirac
from kernel_denoiser.kernels import camera_shake_kernels
from util.fft import conv_circular, o2p, p2o
from util.metrics import kernel_mse


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: thread start-up dominates


def _textured(n, C, H, W, seed, dtype=torch.float64):
    """Random texture with a natural-ish spectrum (white noise + a smoothed copy), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, C, H, W, generator=g, dtype=dtype)
    smooth = conv_circular(w, torch.ones(5, 5, dtype=dtype) / 25)
    return (0.5 * w + 0.5 * smooth).clamp(0, 1)


def _naive_data_step(y, x, K, sigma, cfg, r2):
    """docs/algorithm.md §1 formula at full image size, channel by channel, then crop."""
    H, W = y.shape[-2:]
    Y, X = torch.fft.rfft2(y), torch.fft.rfft2(x)
    num = (Y * X.conj()).mean(0)
    den = (X.abs() ** 2).mean(0) + (0.0 if r2 is None else r2 * H * W)
    if cfg.domain == "gradient":  # Σ_d |F∂_d|², the forward differences' transfer functions
        from classical.nonblind import grad_otfs
        Dh, Dv = grad_otfs((H, W), torch.float64, "cpu")
        w = Dh.abs() ** 2 + Dv.abs() ** 2
        num, den = num * w, den * w
    rho = cfg.beta * sigma ** 2
    FK = p2o(K, (H, W))
    if cfg.colour == "joint":
        Zf = (num.sum(0) + rho * FK) / (den.sum(0) + rho)
        return o2p(Zf, (H, W), K.shape)
    Zc = o2p((num + rho * FK) / (den + rho), (H, W), K.shape)
    return Zc.mean(0)


@pytest.mark.parametrize("H,W,s,colour,r2,domain", [(96, 80, 33, "joint", None, "pixel"),
                                                    (40, 48, 33, "joint", 1e-3, "pixel"),
                                                    (64, 64, 33, "per_channel_mean", None, "pixel"),
                                                    (128, 72, 16, "per_channel_mean", 2e-3, "pixel"),
                                                    (130, 140, 64, "joint", None, "pixel"),
                                                    (96, 81, 33, "joint", 1e-3, "gradient"),
                                                    (64, 64, 17, "per_channel_mean", None, "gradient")])
def test_fast_data_step_equals_the_formula(H, W, s, colour, r2, domain):
    x = _textured(2, 3, H, W, 0)
    y = _textured(1, 3, H, W, 1)
    K = torch.rand(s, s, dtype=torch.float64)
    cfg = MStepConfig(colour=colour, domain=domain)
    st = precompute(y, x, 0.05, cfg, s, r2)
    fast = data_step(K[None], st)[0]
    ref = _naive_data_step(y, x, K, 0.05, cfg, r2)
    assert fast.shape == (s, s)
    torch.testing.assert_close(fast, ref, atol=1e-12 * ref.abs().max().item() + 1e-14, rtol=1e-10)


def _true_kernel(seed=0):
    return torch.from_numpy(camera_shake_kernels(1, 33, np.random.default_rng(seed))[0]).double()


def test_noise_free_recovery_without_prior_sigma_zero():
    k = _true_kernel()
    x = _textured(1, 3, 64, 64, 2)
    y = conv_circular(x, k)
    est = m_step(y, x, dirac(33, dtype=torch.float64), 0.0, MStepConfig(J=1))
    assert kernel_mse(est, k)[0] <= 1e-7
    assert kernel_mse(est, k)[1] <= 1e-20  # exact up to float64 round-off, without any shift


@pytest.mark.parametrize("colour,domain", [("joint", "pixel"), ("per_channel_mean", "pixel"), ("joint", "gradient")])
def test_noise_free_recovery_with_prox_from_dirac(colour, domain):
    # σ > 0 activates the HQS prox (slow convergence from the Dirac); with noise-free data the true kernel
    # is the fixed point, reached over a few outer calls as in Fast EM
    k = _true_kernel(1)
    x = _textured(1, 3, 64, 64, 3)
    y = conv_circular(x, k)
    cfg = MStepConfig(colour=colour, domain=domain)
    K = m_step(y, x, dirac(33, dtype=torch.float64), 20 / 255, cfg)
    assert kernel_mse(K, k)[0] > 1e-7  # one call is not enough: the prox really holds K back
    for _ in range(7):
        K = m_step(y, x, K, 20 / 255, cfg)
    aligned, raw = kernel_mse(K, k)
    assert aligned <= 1e-7 and raw <= 1e-7, (aligned, raw)


def test_noisy_recovery_float32_beats_dirac():
    k = _true_kernel(2).float()
    x = _textured(1, 3, 64, 64, 4, torch.float32)
    g = torch.Generator().manual_seed(0)
    y = conv_circular(x, k) + 10 / 255 * torch.randn(x.shape, generator=g)
    K = dirac(33)
    for _ in range(10):
        K = m_step(y, x, K, 10 / 255, MStepConfig())
    assert K.dtype == torch.float32 and K.shape == (1, 1, 33, 33)
    assert kernel_mse(K, k)[0] < 0.1 * kernel_mse(dirac(33), k)[0]


def test_output_is_a_valid_kernel_in_the_input_layout():
    x = _textured(3, 3, 48, 48, 5, torch.float32)
    y = _textured(1, 3, 48, 48, 6, torch.float32)
    k2d = dirac(33)[0, 0]
    out = m_step(y, x, k2d, 0.05, MStepConfig(J=2))
    assert out.shape == (33, 33) and out.dtype == torch.float32 and out.device == y.device
    assert (out >= 0).all() and abs(out.sum().item() - 1) < 1e-5


def test_denoiser_is_called_with_sqrt_lambda_over_beta():
    calls = []

    def fake_denoiser(z, sig):
        calls.append((tuple(z.shape), sig, z.min().item(), z.sum().item()))
        return 2.0 * z - 0.001  # not a valid kernel: the M-step must project it again

    x = _textured(1, 3, 40, 40, 7, torch.float32)
    cfg = MStepConfig(lam=4.0, beta=1e4, J=3)
    out = m_step(x, x, dirac(33), 0.02, cfg, denoiser=fake_denoiser)
    assert len(calls) == 3
    for shape, sig, zmin, zsum in calls:
        assert shape == (1, 1, 33, 33) and sig == pytest.approx(0.02)  # sqrt(4/1e4)
        assert zmin >= 0 and zsum == pytest.approx(1.0, abs=1e-5)  # denoiser sees a projected Z
    assert (out >= 0).all() and abs(out.sum().item() - 1) < 1e-5


def test_pigdm_r2_has_an_effect():
    x = _textured(1, 3, 48, 48, 8)
    y = _textured(1, 3, 48, 48, 9)
    k0 = dirac(33, dtype=torch.float64)
    a = m_step(y, x, k0, 0.05, MStepConfig(J=1), r2=0.01)
    c = m_step(y, x, k0, 0.05, MStepConfig(J=1))
    assert (a - c).abs().max() > 1e-6


def test_config_is_strict_and_frozen():
    from util.config import ConfigError, build
    with pytest.raises(ConfigError, match="bogus"):
        build(MStepConfig, {"lam": 1.0, "bogus": 3}, "mstep")
    with pytest.raises(ValueError, match="key 'colour'"):
        MStepConfig(colour="rgb")
    with pytest.raises(ValueError, match="key 'J' must be >= 1, got 0"):
        MStepConfig(J=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MStepConfig().J = 3
    assert build(MStepConfig, {"J": 4}, "mstep").J == 4


def test_errors():
    x = torch.rand(1, 3, 20, 20)
    with pytest.raises(ValueError, match="larger than the image"):
        m_step(x, x, dirac(33), 0.01, MStepConfig())
    with pytest.raises(ValueError, match="previous kernel"):
        m_step(x, x, torch.ones(1, 1, 9, 11) / 99, 0.01, MStepConfig())
    with pytest.raises(ValueError, match="matching y"):
        m_step(x, torch.rand(1, 3, 20, 21), dirac(9), 0.01, MStepConfig())


def test_estimate_kernel_cli(tmp_path, capsys):
    from diffusion_em.estimate_kernel import main
    k = _true_kernel(3).float()
    x = _textured(1, 3, 64, 64, 10, torch.float32)
    y = conv_circular(x, k)
    np.save(tmp_path / "sharp.npy", x[0].permute(1, 2, 0).numpy())
    np.save(tmp_path / "blurry.npy", y[0].permute(1, 2, 0).numpy())
    out = tmp_path / "est" / "k.npy"
    rc = main(["--sharp", str(tmp_path / "sharp.npy"), "--blurry", str(tmp_path / "blurry.npy"), "--sigma", "0.001",
               "--out", str(out), "--denoiser", "none", "--calls", "5"])
    assert rc == 0 and (tmp_path / "est" / "k.png").is_file()
    assert kernel_mse(np.load(out), k)[0] <= 1e-7
    np.save(tmp_path / "small.npy", x[0, :, :60].permute(1, 2, 0).numpy())
    rc = main(["--sharp", str(tmp_path / "small.npy"), "--blurry", str(tmp_path / "blurry.npy"), "--sigma", "0.01",
               "--out", str(out), "--denoiser", "none"])
    assert rc == 2 and "must match" in capsys.readouterr().err


def test_resize_kernel_keeps_the_centre_and_the_mass():
    d = resize_kernel(dirac(33, dtype=torch.float64), 17)
    assert d.shape == (1, 1, 17, 17) and d[0, 0, 8, 8] == 1  # the centre tap maps to the centre tap
    k = _true_kernel(3)
    back = resize_kernel(resize_kernel(k[None, None], 17), 33)[0, 0]
    assert float(back.sum()) == pytest.approx(1.0) and back.min() >= 0
    com = lambda a: [float((a.sum(1 - ax) * torch.arange(33.0)).sum() / a.sum()) for ax in (0, 1)]  # noqa: E731
    assert np.allclose(com(back), com(k), atol=0.3)


def test_coarse_m_step_recovers_a_large_smooth_kernel():
    """At half resolution a 25-px kernel has 13 taps a side; y and x̂0 are averaged alike, so no shift."""
    k = torch.from_numpy(camera_shake_kernels(1, 33, rng=5, extent=(0.75, 0.75), optics_sigma=(1.0, 1.0))[0]).double()
    x = _textured(1, 3, 96, 96, 7)
    y = conv_circular(x, k) + 1 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    K = dirac(33, dtype=torch.float64)
    for _ in range(8):
        K = m_step_coarse(y, x, K, 1 / 255, MStepConfig())
    assert K.shape == (1, 1, 33, 33) and float(K.sum()) == pytest.approx(1.0)
    aligned, raw = kernel_mse(K, k)
    resolution_limit = kernel_mse(resize_kernel(resize_kernel(k[None, None], 17), 33), k)[0]
    assert aligned < 2 * resolution_limit, (aligned, resolution_limit)  # as good as half resolution allows
    assert raw == aligned  # centred like the truth: the two scales' grids agree


def test_support_box_holds_the_kernel_with_a_margin():
    k = torch.zeros(33, 33, dtype=torch.float64)
    k[15:18, 14:19] = 1.0  # rows 16 ± 1, cols 16 − 2 … 16 + 2
    k[10, 16] = 0.01       # a faint tap below 5 % of the maximum does not count
    box = support_box(k / k.sum())
    rows, cols = torch.nonzero(box.any(1)).flatten(), torch.nonzero(box.any(0)).flatten()
    assert (rows.min().item(), rows.max().item()) == (16 - 3, 16 + 3)  # half-extent 1 + margin 2
    assert (cols.min().item(), cols.max().item()) == (16 - 4, 16 + 4)  # 2 + 2 (+ 0.25·2 rounds to 0)
    assert box.sum().item() == 7 * 9
    big = support_box(torch.ones(33, 33))
    assert big.all()  # clipped to the array


def test_m_step_inside_a_support_box():
    """The kernel never leaves the box; noise-free, a kernel that fits the box is still recovered."""
    k = torch.zeros(33, 33, dtype=torch.float64)
    k[14:19, 13:20] = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    k /= k.sum()
    x = _textured(1, 3, 64, 64, 8)
    y = conv_circular(x, k)
    box = support_box(k)
    K = dirac(33).double()
    for _ in range(20):
        K = m_step(y, x, K, 1e-3, MStepConfig(), support=box)
        assert (K[0, 0][~box] == 0).all() and abs(K.sum().item() - 1) < 1e-9
    assert kernel_mse(K, k)[0] < 1e-3 * kernel_mse(dirac(33).double(), k)[0]


def test_integer_recentring_keeps_a_sharp_kernel_that_bilinear_recentring_smears():
    """Fast EM re-centres the kernel after each M-step. A kernel whose centre of mass lies between pixels is moved
    by a sub-pixel bilinear shift — an average of neighbouring taps — each call, and the data pull it back: given
    the true image the fixed point is a smeared kernel. Whole-pixel re-centring leaves it exact."""
    from util.geometry import center_of_mass, recenter
    k = recenter(_true_kernel(3))
    k = 0.5 * k + 0.5 * torch.roll(k, 1, 1)  # centre of mass half a pixel off, a sharp kernel still
    assert abs(center_of_mass(k)[1].item() - 16.5) < 1e-9
    x = _textured(1, 3, 64, 64, 5)
    y = conv_circular(x, k)
    found = {}
    for shift in ("bilinear", "integer"):
        K = dirac(33, dtype=torch.float64)
        for _ in range(10):
            K = recenter(m_step(y, x, K, 20 / 255, MStepConfig()), shift)
        found[shift] = kernel_mse(K, k)[0]
    assert found["integer"] <= 1e-7, found
    assert found["bilinear"] > 20 * found["integer"], found


def test_recenter_shift_must_be_known():
    with pytest.raises(ValueError, match="recenter_shift"):
        MStepConfig(recenter_shift="cubic")

"""ΠGDM with the exact step samples the exact Gaussian posterior (Wiener filter) of a blurred image."""
import torch

from diffusion_em.blur import BlurOperator
from guided_diffusion.denoiser import EpsDenoiser, to_model
from guided_diffusion.guidance import PiGDM
from guided_diffusion.sampler import sample
from guided_diffusion.schedule import Schedule
from tests.gaussian_prior import GaussianEps


def test_pigdm_exact_step_matches_wiener_posterior():
    g = torch.Generator().manual_seed(0)
    H, s, sigma, n = 16, 0.15, 0.05, 1500
    m = 0.3 + 0.4 * torch.rand(1, 1, H, H, generator=g)  # prior mean (physics units), prior N(m, s² I)
    k = torch.rand(5, 5, generator=g)
    k /= k.sum()
    op = BlurOperator.from_kernel(k, (H, H), sigma)
    y = op.A(m + s * torch.randn(1, 1, H, H, generator=g)) + sigma * torch.randn(1, 1, H, H, generator=g)
    # closed form: mean m + s²Aᵀ(s²AAᵀ+σ²)⁻¹(y − Am); pixel variance = spatial mean of s²σ²/(s²|K|²+σ²)
    wiener = m + s ** 2 * op.A_adjoint(torch.fft.irfft2(torch.fft.rfft2(y - op.A(m)) / (s ** 2 * op.K.abs() ** 2 + sigma ** 2), s=(H, H)))
    Kfull = torch.fft.fft2(torch.roll(torch.nn.functional.pad(k, (0, H - 5, 0, H - 5)), (-2, -2), (0, 1)))
    post_var = (s ** 2 * sigma ** 2 / (s ** 2 * Kfull.abs() ** 2 + sigma ** 2)).mean().item()

    prior = GaussianEps(to_model(m), 2 * s)  # the same prior in [-1, 1] units
    sched = Schedule.create(1000)
    den = EpsDenoiser(prior, sched, clip=False)
    rule = PiGDM(rule="exact", r2_fn=lambda i: prior.var_x0(int(sched.timesteps[i])) / 4)  # Var in [0,1] units
    xs = sample(den, (n, 1, H, H), torch.Generator().manual_seed(1), torch.device("cpu"),
                   guidance=rule, op=op, y=y)
    z = (xs.mean(0, keepdim=True) - wiener) / (post_var / n) ** 0.5  # Monte-Carlo z-scores per pixel
    assert z.abs().max() < 5.0, f"posterior mean off by {z.abs().max():.2f} standard errors"
    emp_var = xs.var(0).mean().item()
    # 1000-step discretisation leaves ≈3 % bias in variance; MC error on it is ≈1 %
    assert abs(emp_var / post_var - 1) < 0.07, f"variance {emp_var:.5f} vs exact {post_var:.5f}"
    # and the guidance matters: the same sampler without it draws from the prior (variance s², mean m)
    free = sample(den, (100, 1, H, H), torch.Generator().manual_seed(2), torch.device("cpu"))
    assert abs(free.var(0).mean().item() / s ** 2 - 1) < 0.1 and emp_var < 0.9 * free.var(0).mean().item()

"""Smoke tests of both guidance rules with a tiny random UNet, the pull of guidance towards y, and the step API."""
import pytest
import torch

from diffusion_em.blur import BlurOperator
from diffusion_em.nonblind import deblur_nonblind
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import DPS, PiGDM, make_guidance
from guided_diffusion.sampler import ddpm_step, ddpm_update, predict_x0, sample
from guided_diffusion.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: thread start-up dominates


@pytest.mark.parametrize("rule", [PiGDM(), PiGDM(rule="exact", r2_fn=lambda i: 0.1), DPS(zeta=1.0)])
def test_guided_sampling_runs_and_is_seeded(tiny_unet, rule):
    den = EpsDenoiser(tiny_unet, Schedule.create(5))
    k = torch.ones(5, 5) / 25
    y = torch.rand(1, 3, 32, 32)
    a = deblur_nonblind(den, y, k, 0.05, rule, torch.Generator().manual_seed(3), n_particles=2)
    b = deblur_nonblind(den, y, k, 0.05, rule, torch.Generator().manual_seed(3), n_particles=2)
    c = deblur_nonblind(den, y, k, 0.05, rule, torch.Generator().manual_seed(4), n_particles=2)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)  # the seed, and only the seed, decides
    assert not torch.allclose(a[0], a[1])  # particles draw their own noise


def test_guidance_reduces_data_misfit(tiny_unet):
    torch.manual_seed(0)
    den = EpsDenoiser(tiny_unet, Schedule.create(20))
    k = torch.ones(3, 3) / 9
    op = BlurOperator.from_kernel(k, (32, 32), 0.02)
    y = op.A(torch.rand(1, 3, 32, 32).clamp(0.2, 0.8))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    free = sample(den, (2, 3, 32, 32), gen(), torch.device("cpu"))
    for rule in (PiGDM(), DPS(zeta=10.0)):  # a random UNet: a strong DPS step to see the pull in 20 steps
        guided = sample(den, (2, 3, 32, 32), gen(), torch.device("cpu"), guidance=rule, op=op, y=y)
        assert ((op.A(guided) - y) ** 2).mean() < 0.6 * ((op.A(free) - y) ** 2).mean()


def test_step_halves_compose_and_callback_gets_a_dict(tiny_unet):
    """ddpm_step = predict_x0 + ddpm_update; sample() is the plain loop over it and reports each step."""
    den = EpsDenoiser(tiny_unet, Schedule.create(4))
    op = BlurOperator.from_kernel(torch.ones(3, 3) / 9, (32, 32), 0.05)
    y = torch.rand(1, 3, 32, 32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    whole, x0 = ddpm_step(den, x, 2, torch.Generator().manual_seed(2), PiGDM(), op, y)
    pred = predict_x0(den, x, 2, track_grad=True)
    halves = ddpm_update(den, pred, 2, torch.Generator().manual_seed(2), PiGDM(), op, y)
    assert torch.equal(whole, halves) and torch.equal(x0, pred.x0.detach()) and not x0.requires_grad
    assert not torch.equal(whole, ddpm_update(den, pred, 2, torch.Generator().manual_seed(2)))  # guidance acts
    seen = []
    out = sample(den, (1, 3, 32, 32), torch.Generator().manual_seed(0), torch.device("cpu"), guidance=PiGDM(),
                 op=op, y=y, callback=seen.append)
    assert [d["i"] for d in seen] == [3, 2, 1, 0]
    assert [d["t"] for d in seen] == [int(t) for t in den.schedule.timesteps[::-1]]
    assert all(set(d) == {"i", "t", "x", "x0", "kernel"} and d["kernel"] is op.kernel for d in seen)
    assert torch.equal(out, ((seen[-1]["x"] + 1) / 2).clamp(0, 1))  # the last reported state is the result


def test_make_guidance():
    assert isinstance(make_guidance("pigdm"), PiGDM) and isinstance(make_guidance("DPS", zeta=0.5), DPS)
    with pytest.raises(ValueError, match="unknown guidance"):
        make_guidance("ddrm")
    with pytest.raises(ValueError, match="rule"):
        PiGDM(rule="magic")


def test_pigdm_without_jacobian_is_a_ddpm_step_from_the_gaussian_posterior_mean(tiny_unet):
    """jacobian='none': no backward pass, and the step equals the unguided DDPM step taken from
    x̂0 + r²·Aᵀ(r²AAᵀ + σ²)⁻¹(y − A x̂0) (ΠGDM's Gaussian p(x0 | x_t) = N(x̂0, r²I) conditioned on y)."""
    den = EpsDenoiser(tiny_unet, Schedule.create(6))
    op = BlurOperator.from_kernel(torch.ones(3, 3) / 9, (32, 32), 0.05)
    y = torch.rand(1, 3, 32, 32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rule = PiGDM(jacobian="none", zeta=2.0)
    assert not rule.needs_grad and PiGDM().needs_grad
    pred = predict_x0(den, x, 3, track_grad=False)
    assert not pred.x0.requires_grad  # forward only
    r2 = 2.0 * rule.r2(den.schedule, 3)
    x0_y = (pred.x0 + r2 * op.pigdm_solve(y, pred.x0, r2)).clamp(0, 1)
    moved = pred._replace(x0_model=2 * x0_y - 1, x0=x0_y)
    for eta in (1.0, 0.5, 0.0):  # DDPM and DDIM steps alike (their x̂0 coefficients differ)
        guided = ddpm_update(den, pred, 3, torch.Generator().manual_seed(2), rule, op, y, eta=eta)
        plain = ddpm_update(den, moved, 3, torch.Generator().manual_seed(2), eta=eta)
        assert torch.allclose(guided, plain, atol=1e-6) and not torch.allclose(guided, ddpm_update(
            den, pred, 3, torch.Generator().manual_seed(2), eta=eta))
    # with an identity blur and tiny noise the data-consistent x̂0 is y itself (inside [0, 1])
    ident = BlurOperator.from_kernel(torch.ones(1, 1), (32, 32), 1e-4)
    y_in = y.clamp(0.05, 0.95)
    x0_id = (pred.x0 + r2 * ident.pigdm_solve(y_in, pred.x0, r2)).clamp(0, 1)
    assert torch.allclose(x0_id, y_in, atol=1e-4)
    with pytest.raises(ValueError, match="jacobian"):
        PiGDM(jacobian="identity")


def test_max_batch_evaluates_rows_alone(tiny_unet):
    """max_batch=n: the UNet sees chunks of n rows; each row gets exactly its own single-row result (and the
    gradient flows through all chunks)."""
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    whole, chunked = EpsDenoiser(tiny_unet, Schedule.create(4)), EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=2)
    rows = torch.cat([whole.eps(x[j:j + 1], 2) for j in range(5)])
    assert torch.equal(EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=1).eps(x, 2), rows)
    assert torch.allclose(chunked.eps(x, 2), whole.eps(x, 2), atol=1e-5)
    xg = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(chunked.x0(xg, 2).sum(), xg)
    assert g.shape == x.shape and (g.flatten(1).abs().sum(1) > 0).all()
    with pytest.raises(ValueError, match="max_batch"):
        EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=0)

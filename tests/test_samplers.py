"""Smoke tests of both guidance rules with a tiny random UNet, and the pull of guidance towards y."""
import pytest
import torch

from diffusion_em.blur import BlurOperator
from diffusion_em.nonblind import deblur_nonblind
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import DPS, PiGDM, make_guidance
from guided_diffusion.sampler import sample
from guided_diffusion.schedule import Schedule


@pytest.mark.parametrize("rule", [PiGDM(), PiGDM(rule="exact", r2_fn=lambda i: 0.1), DPS(zeta=1.0)])
def test_guided_sampling_runs_and_is_seeded(tiny_unet, rule):
    den = EpsDenoiser(tiny_unet, Schedule.create(5))
    k = torch.ones(5, 5) / 25
    y = torch.rand(1, 3, 32, 32)
    a = deblur_nonblind(den, y, k, 0.05, rule, torch.Generator().manual_seed(3), n_particles=2)
    b = deblur_nonblind(den, y, k, 0.05, rule, torch.Generator().manual_seed(3), n_particles=2)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)


def test_guidance_reduces_data_misfit(tiny_unet):
    torch.manual_seed(0)
    den = EpsDenoiser(tiny_unet, Schedule.create(20))
    k = torch.ones(3, 3) / 9
    op = BlurOperator.from_kernel(k, (32, 32), 0.02)
    y = op.A(torch.rand(1, 3, 32, 32).clamp(0.2, 0.8))
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    free, _ = sample(den, (2, 3, 32, 32), gen(), torch.device("cpu"))
    for rule in (PiGDM(), DPS(zeta=10.0)):  # a random UNet: a strong DPS step to see the pull in 20 steps
        guided, _ = sample(den, (2, 3, 32, 32), gen(), torch.device("cpu"), guidance=rule, op=op, y=y)
        assert ((op.A(guided) - y) ** 2).mean() < 0.6 * ((op.A(free) - y) ** 2).mean()


def test_update_operator_hook_called_every_step(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(4))
    op = BlurOperator.from_kernel(torch.ones(3, 3) / 9, (32, 32), 0.05)
    seen = []

    def hook(i, x0, op_):
        seen.append(i)
        assert x0.shape == (1, 3, 32, 32) and not x0.requires_grad
        return op_.with_kernel(op_.kernel)

    _, op_out = sample(den, (1, 3, 32, 32), torch.Generator().manual_seed(0), torch.device("cpu"),
                       guidance=PiGDM(), op=op, y=torch.rand(1, 3, 32, 32), update_operator=hook)
    assert seen == [3, 2, 1, 0] and op_out is not op


def test_make_guidance():
    assert isinstance(make_guidance("pigdm"), PiGDM) and isinstance(make_guidance("DPS", zeta=0.5), DPS)
    with pytest.raises(ValueError, match="unknown guidance"):
        make_guidance("ddrm")
    with pytest.raises(ValueError, match="rule"):
        PiGDM(rule="magic")

"""The options that move the output towards the posterior mean: DDIM η, late-branching particles, output mode."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_em.config import ConfigError, load_diffusion_config
from diffusion_em.blur import BlurOperator
from diffusion_em.em import EMResult, fast_diffusion_em, fast_diffusion_em_batch
from diffusion_em.mstep import MStepConfig
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import PiGDM
from guided_diffusion.sampler import branch_start, ddpm_update, predict_x0, sample
from guided_diffusion.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


def _setup(tiny_unet, steps=6):
    den = EpsDenoiser(tiny_unet, Schedule.create(steps))
    op = BlurOperator.from_kernel(torch.ones(3, 3) / 9, (32, 32), 0.05)
    y = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return den, op, y


def test_eta_one_is_the_ddpm_step_bitwise(tiny_unet):
    den, op, y = _setup(tiny_unet)
    s, i = den.schedule, 3
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pred = predict_x0(den, x, i, track_grad=True)
    got = ddpm_update(den, pred, i, torch.Generator().manual_seed(2), PiGDM(), op, y, eta=1.0)
    g = torch.Generator().manual_seed(2)
    ref = float(s.posterior_mean_coef1[i]) * pred.x0_model.detach() + float(s.posterior_mean_coef2[i]) * x
    ref = ref + math.sqrt(float(s.posterior_variance[i])) * torch.randn(ref.shape, generator=g)
    again = predict_x0(den, x, i, track_grad=True)  # guidance consumes the graph: a fresh one, same values
    ref = ref + PiGDM().correction(again.x_t, again.x0, s, i, op, y)
    assert torch.equal(got, ref)


def test_ddim_coefficients():
    s = Schedule.create(20)
    for i in (1, 7, 19):
        # η → 1 joins the DDPM posterior (the η = 1 branch is not taken for 1 − 1e-12)
        a, b, sd = s.step_coefs(i, 1 - 1e-12)
        assert a == pytest.approx(s.posterior_mean_coef1[i], rel=1e-6)
        assert b == pytest.approx(s.posterior_mean_coef2[i], rel=1e-6)
        assert sd == pytest.approx(math.sqrt(s.posterior_variance[i]), rel=1e-6)
        # η = 0 with the exact x̂0 maps x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε to √ᾱ_{t−1} x0 + √(1−ᾱ_{t−1}) ε (same ε)
        a, b, sd = s.step_coefs(i, 0.0)
        ac, acp = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        x0, eps = 0.3, -1.7
        assert sd == 0.0
        assert a * x0 + b * (math.sqrt(ac) * x0 + math.sqrt(1 - ac) * eps) == pytest.approx(
            math.sqrt(acp) * x0 + math.sqrt(1 - acp) * eps, rel=1e-9)
    with pytest.raises(ValueError, match="eta"):
        s.step_coefs(3, 1.5)


def test_eta_zero_step_ignores_the_noise_source(tiny_unet):
    den, op, y = _setup(tiny_unet)
    x = torch.randn(1, 3, 32, 32)
    step = lambda seed, eta: ddpm_update(den, predict_x0(den, x, 4, True), 4,  # noqa: E731
                                         torch.Generator().manual_seed(seed), PiGDM(), op, y, eta=eta)
    a, b, c = step(1, 0.0), step(2, 0.0), step(2, 0.5)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_branch_start():
    assert branch_start(100, 1.0) == 0 and branch_start(100, 0.3) == 70
    assert branch_start(100, 0.001) == 98  # at least two separate steps: the last one adds no noise
    assert branch_start(1, 0.5) == 0
    with pytest.raises(ValueError, match="branch"):
        branch_start(10, 0.0)


def test_particles_share_the_trajectory_until_they_branch(tiny_unet):
    den, op, y = _setup(tiny_unet, steps=6)
    seen = []
    res = fast_diffusion_em(den, y, 0.05, PiGDM(), MStepConfig(J=1), 5, torch.Generator().manual_seed(0),
                            n_particles=3, branch_fraction=0.5, guard=None, callback=seen.append)
    assert [d["x"].shape[0] for d in seen] == [1, 1, 1, 3, 3, 3]  # branch_start(6, 0.5) = 3
    assert res.x.shape[0] == 3 and not torch.allclose(res.x[0], res.x[1])
    # the same seed gives the same particles and kernel
    again = fast_diffusion_em(den, y, 0.05, PiGDM(), MStepConfig(J=1), 5, torch.Generator().manual_seed(0),
                              n_particles=3, branch_fraction=0.5, guard=None)
    assert torch.equal(res.x, again.x) and torch.equal(res.kernel, again.kernel)


def test_branch_fraction_one_keeps_independent_particles(tiny_unet):
    """fraction 1 draws x_T for all particles at once, exactly as before the option existed."""
    den, op, y = _setup(tiny_unet, steps=4)
    got = sample(den, (2, 3, 32, 32), torch.Generator().manual_seed(3), torch.device("cpu"), PiGDM(), op, y,
                 branch_fraction=1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    for i in range(3, -1, -1):
        x = ddpm_update(den, predict_x0(den, x, i, True), i, g, PiGDM(), op, y)
    assert torch.equal(got, ((x + 1) / 2).clamp(0, 1))


def test_output_mean_is_the_particle_average():
    x = torch.rand(4, 3, 8, 8)
    r = EMResult(x=x, kernel=torch.ones(3, 3) / 9, nfe=1)
    assert torch.equal(r.image("sample"), x[:1])
    assert torch.allclose(r.image("mean")[0], sum(x[j] for j in range(4)) / 4, atol=1e-7)
    with pytest.raises(ValueError, match="output"):
        r.image("mode")


def test_coarse_m_steps_run_in_fast_em(tiny_unet):
    """mstep.coarse: the first steps' M-steps run one scale down; the kernel stays valid and differs."""
    den, op, y = _setup(tiny_unet, steps=4)
    run = lambda c: fast_diffusion_em(den, y, 0.05, PiGDM(), MStepConfig(J=2, coarse=c), 9,  # noqa: E731
                                      torch.Generator().manual_seed(0), guard=None)
    fine, coarse = run(0.0), run(0.5)
    assert coarse.kernel.shape == (9, 9) and float(coarse.kernel.sum()) == pytest.approx(1.0)
    assert not torch.allclose(fine.kernel, coarse.kernel)


@pytest.mark.parametrize("change,message", [
    ({"output": "mode"}, "key 'output' must be one of"),
    ({"eta": 1.5}, "key 'eta' must be in"),
    ({"branch_fraction": 0.0}, "key 'branch_fraction' must be in"),
    ({"mstep": {"coarse": 2.0}}, "key 'coarse' must be in"),
])
def test_new_config_keys_are_checked(tmp_path, change, message):
    d = yaml.safe_load((ROOT / "configs" / "diffusion_config_fastem_pigdm.yaml").read_text())
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) else v
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=message):
        load_diffusion_config(p)


def test_coarse_is_a_fast_em_key(tmp_path):
    d = yaml.safe_load((ROOT / "configs" / "diffusion_config_pigdm.yaml").read_text())
    d["mstep"]["coarse"] = 0.3
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="key 'mstep.coarse' applies only to method 'fast_em'"):
        load_diffusion_config(p)


def test_paper_config_is_the_papers_algorithm():
    """The paper's Fast EM ΠGDM stays one config away: one particle, its sample, DDPM steps, full-scale M-step."""
    cfg = load_diffusion_config(ROOT / "configs" / "diffusion_config_fastem_pigdm_paper.yaml")
    assert (cfg.method, cfg.guidance, cfg.steps, cfg.n_particles, cfg.output, cfg.eta, cfg.branch_fraction,
            cfg.mstep.coarse) == ("fast_em", "pigdm", 100, 1, "sample", 1.0, 1.0, 0.0)


def test_branching_batch_equals_one_by_one(tiny_unet):
    """Late-branching particles in the multi-image batch: each image gets exactly its one-by-one run."""
    from tests.test_batch import S, _problem
    den = EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=1)
    ys, ks, sigmas = _problem()
    gens = lambda: [torch.Generator().manual_seed(20 + b) for b in range(3)]  # noqa: E731
    batch = fast_diffusion_em_batch(den, ys, sigmas, PiGDM(), MStepConfig(J=2), S, gens(), n_particles=3,
                                    guard=None, branch_fraction=0.5)
    for b, g in enumerate(gens()):
        one = fast_diffusion_em(den, ys[b], sigmas[b], PiGDM(), MStepConfig(J=2), S, g, n_particles=3, guard=None,
                                branch_fraction=0.5)
        assert batch[b].x.shape == (3, 3, 32, 32)
        assert torch.equal(batch[b].x, one.x) and torch.equal(batch[b].kernel, one.kernel)
    assert not torch.allclose(batch[0].x[0], batch[0].x[1])

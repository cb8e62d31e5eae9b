"""The EM drivers as loops: where the M-step runs, what callbacks see, and how the guard names a step."""
import pytest
import torch

from diffusion_em.em import DivergenceError, EMResult, Guard, diffusion_em, fast_diffusion_em
from diffusion_em.mstep import MStepConfig
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import DPS, PiGDM
from guided_diffusion.schedule import Schedule

pytestmark = pytest.mark.usefixtures("one_thread")


class WhiteOut(torch.nn.Module):
    """ε so negative that x̂0 clips to white at every step: a run that saturates from its first step."""

    def forward(self, x, t):
        return -100 * torch.ones_like(x) + 0 * x


def _y(seed=0, size=24):
    return 0.3 + 0.4 * torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_divergence_message_counts_steps_forwards():
    """Messages used to count backwards ('first saturated at step 4 (t=999)' out of 5)."""
    den = EpsDenoiser(WhiteOut(), Schedule.create(5))
    y = _y()
    res = fast_diffusion_em(den, y, 0.02, PiGDM(), MStepConfig(J=1), 5, torch.Generator().manual_seed(0),
                            guard=None)
    with pytest.raises(DivergenceError, match=r"saturated from step 1/5 \(t=999\) on"):
        Guard().check_result(res, y, 0.02)


def test_divergence_names_the_final_saturated_streak_not_the_noisy_start():
    """x̂0 of the first steps (pure noise, clipped) is always saturated; naming step 1 said nothing."""
    y = _y()
    sat = [0.9, 0.5, 0.0, 0.0, 0.3, 0.6]
    trace = [{"where": f"step {n + 1}/6", "saturation": s} for n, s in enumerate(sat)]
    res = EMResult(x=torch.ones(1, 3, 24, 24), kernel=torch.ones(1, 1) , nfe=6, trace=trace)
    with pytest.raises(DivergenceError, match=r"saturated from step 5/6 on"):
        Guard().check_result(res, y, 0.02)


def test_guard_judges_the_data_region_only():
    """A padded band full of saturated pixels and misfit is not data: with its box the result passes."""
    y = torch.full((1, 3, 30, 30), 0.5)
    x = torch.ones(1, 3, 30, 30)
    x[..., 5:25, 5:25] = 0.5
    res = EMResult(x=x, kernel=torch.ones(1, 1), nfe=1, trace=[])
    with pytest.raises(DivergenceError):
        Guard().check_result(res, y, 0.02)
    Guard().check_result(res, y, 0.02, box=(5, 5, 20, 20))


def test_diffusion_em_divergence_names_round_and_step():
    """Diffusion EM passed the round as the time argument, so its messages mislabelled the step."""
    den = EpsDenoiser(WhiteOut(), Schedule.create(4))
    y = _y()
    res = diffusion_em(den, y, 0.02, PiGDM(), MStepConfig(J=1), 5, torch.Generator().manual_seed(0), rounds=2,
                       guard=None)
    assert res.nfe == 8 and [e["where"] for e in res.trace[:2]] == ["round 1/2, step 1/4 (t=999)",
                                                                    "round 1/2, step 2/4 (t=666)"]
    with pytest.raises(DivergenceError, match=r"round 1/2, step 1/4 \(t=999\)"):
        Guard().check_result(res, y, 0.02)


def test_mstep_runs_every_k_steps_and_callbacks_see_the_kernel(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(6))
    seen = []
    res = fast_diffusion_em(den, _y(1, 32), 0.05, PiGDM(), MStepConfig(J=1, every=3), 5,
                            torch.Generator().manual_seed(0), guard=None, callback=seen.append)
    ks = [d["kernel"] for d in seen]
    assert [d["i"] for d in seen] == [5, 4, 3, 2, 1, 0] and res.nfe == 6
    changed = [not torch.equal(ks[j], ks[j - 1]) for j in range(1, 6)]
    assert changed == [False, False, True, False, False]  # new kernels at steps 1 and 4 only
    assert torch.equal(res.kernel, ks[-1][0, 0])


def test_pigdm_r2_changes_the_fast_em_kernel(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(3))
    run = lambda r2: fast_diffusion_em(den, _y(2, 32), 0.05, PiGDM(), MStepConfig(J=2, pigdm_r2=r2), 5,  # noqa: E731
                                       torch.Generator().manual_seed(0), guard=None).kernel
    assert (run(True) - run(False)).abs().max() > 1e-6
    with pytest.raises(ValueError, match="needs ΠGDM"):
        fast_diffusion_em(den, _y(), 0.05, DPS(), MStepConfig(pigdm_r2=True), 5, torch.Generator())


def test_check_result_returns_the_residual_it_judged():
    y = torch.full((1, 3, 12, 12), 0.5)
    res = EMResult(x=torch.full((1, 3, 12, 12), 0.51), kernel=torch.ones(1, 1), nfe=1, trace=[])
    assert Guard().check_result(res, y, 0.02) == pytest.approx(1e-4, rel=1e-3)


def test_mstep_start_keeps_the_initial_kernel_for_the_first_steps(tiny_unet):
    """mstep.start = 0.5 on 6 steps: the kernel is the given k_init at steps 1-3, the M-step's from step 4."""
    den = EpsDenoiser(tiny_unet, Schedule.create(6))
    k0 = torch.zeros(5, 5)
    k0[2, 1:4] = 1 / 3
    seen = []
    fast_diffusion_em(den, _y(3, 32), 0.05, PiGDM(), MStepConfig(J=1, start=0.5), 5, torch.Generator().manual_seed(0),
                      k_init=k0, guard=None, callback=seen.append)
    same = [torch.equal(d["kernel"][0, 0], k0) for d in seen]
    assert same == [True, True, True, False, False, False]


def test_mstep_start_is_a_fraction():
    with pytest.raises(ValueError, match="'start'"):
        MStepConfig(start=1.5)


@pytest.mark.parametrize("driver", ["fast", "rounds"])
@pytest.mark.parametrize("shift", ["bilinear", "integer"])
def test_both_drivers_recentre_with_the_configured_shift(tiny_unet, monkeypatch, driver, shift):
    """`mstep.recenter_shift` reaches the re-centring of Fast EM and of Diffusion EM; `recenter: false` skips it."""
    import diffusion_em.em as em
    from util.geometry import recenter
    seen = []
    monkeypatch.setattr(em, "recenter_kernel", lambda k, s: seen.append(s) or recenter(k, s))
    den = EpsDenoiser(tiny_unet, Schedule.create(3))
    run = {"fast": lambda c: fast_diffusion_em(den, _y(4, 32), 0.05, PiGDM(), c, 5, torch.Generator().manual_seed(0),
                                               guard=None),
           "rounds": lambda c: diffusion_em(den, _y(4, 32), 0.05, PiGDM(), c, 5, torch.Generator().manual_seed(0),
                                            rounds=2, guard=None)}[driver]
    run(MStepConfig(J=1, recenter_shift=shift))
    assert seen and set(seen) == {shift}
    seen.clear()
    run(MStepConfig(J=1, recenter=False, recenter_shift=shift))
    assert seen == []

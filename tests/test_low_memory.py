"""The low-memory mode (x̂0 without the UNet's graph, then each row's pass again with its graph for its guidance)
gives the same result as keeping every row's graph, and never holds more than one row's graph."""
import pytest
import torch

from diffusion_em.em import diffusion_em, fast_diffusion_em, fast_diffusion_em_batch
from diffusion_em.mstep import MStepConfig
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import DPS, PiGDM
from guided_diffusion.schedule import Schedule
from kernel_denoiser.network import FDnCNN

pytestmark = pytest.mark.usefixtures("one_thread")
S = 7


def _problem(B=2, size=32):
    g = torch.Generator().manual_seed(0)
    ys = [torch.rand(1, 3, size, size, generator=g) for _ in range(B)]
    return ys, [0.03, 0.08][:B]


@pytest.mark.parametrize("guidance", [PiGDM(), DPS(zeta=0.5)])
def test_low_memory_fast_em_equals_the_normal_run_bit_for_bit(tiny_unet, guidance):
    # one image per UNet call (the CPU default) makes the recomputed pass the same computation as the first
    den = EpsDenoiser(tiny_unet, Schedule.create(5), max_batch=1)
    kd = FDnCNN().eval()
    ys, sigmas = _problem()
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(2)]  # noqa: E731
    kw = dict(n_particles=3, guard=None, branch_fraction=0.6, data_boxes=[(4, 4, 24, 24), None])
    normal = fast_diffusion_em_batch(den, ys, sigmas, guidance, MStepConfig(J=2), S, gens(), kd, **kw)
    low = fast_diffusion_em_batch(den, ys, sigmas, guidance, MStepConfig(J=2), S, gens(), kd, low_memory=True, **kw)
    for a, b in zip(normal, low):
        assert a.x.shape == (3, 3, 32, 32) and torch.equal(a.x, b.x) and torch.equal(a.kernel, b.kernel)
    assert (normal[0].x[0] - normal[0].x[1]).abs().max() > 1e-3  # the particles differ: rows were not mixed up
    one = fast_diffusion_em(den, ys[1], sigmas[1], guidance, MStepConfig(J=2), S, gens()[1], kd, n_particles=3,
                            guard=None, branch_fraction=0.6, low_memory=True)
    assert torch.equal(one.x, normal[1].x)


def test_low_memory_diffusion_em_equals_the_normal_run(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(3), max_batch=1)
    ys, sigmas = _problem(1)
    runs = [diffusion_em(den, ys[0], sigmas[0], PiGDM(), MStepConfig(J=2), S, torch.Generator().manual_seed(3),
                         n_particles=2, rounds=2, guard=None, low_memory=low) for low in (False, True)]
    assert torch.equal(runs[0].x, runs[1].x) and torch.equal(runs[0].kernel, runs[1].kernel)


def test_low_memory_holds_one_rows_graph(tiny_unet):
    """With every row in one UNet call (max_batch None, as on a GPU): the normal run differentiates through
    calls of all rows; the low-memory run evaluates all rows without a graph and each row alone with one."""
    calls = []

    def net(x, t):
        calls.append((x.shape[0], torch.is_grad_enabled() and x.requires_grad))
        return tiny_unet(x, t)

    den = EpsDenoiser(net, Schedule.create(4), max_batch=None)
    ys, sigmas = _problem(1)
    runs = {}
    for low in (False, True):
        calls.clear()
        runs[low] = fast_diffusion_em(den, ys[0], sigmas[0], PiGDM(), MStepConfig(J=2), S,
                                      torch.Generator().manual_seed(1), n_particles=3, guard=None,
                                      branch_fraction=0.5, low_memory=low)
        seen = list(calls)
        if low:
            assert all(rows == 1 for rows, grad in seen if grad) and any(rows == 3 and not grad for rows, grad in seen)
            # 2 shared steps (one row: its graph kept, nothing recomputed), then 2 steps of 3 particles
            assert sum(grad for _, grad in seen) == 1 + 1 + 3 + 3 and len(seen) == 1 + 1 + 2 * (1 + 3)
        else:
            assert any(rows == 3 and grad for rows, grad in seen) and all(grad for _, grad in seen)
    # batched and one-row UNet calls round differently (oneDNN); the results agree to that
    assert torch.allclose(runs[False].x, runs[True].x, atol=1e-4)

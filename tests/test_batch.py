"""Several images in one UNet batch (each with its own kernel, σ, M-step and generator) equal one-by-one runs."""
import pytest
import torch

from diffusion_em.em import DivergenceError, Guard, fast_diffusion_em, fast_diffusion_em_batch
from diffusion_em.mstep import MStepConfig
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import DPS, PiGDM
from guided_diffusion.schedule import Schedule
from kernel_denoiser.network import FDnCNN

pytestmark = pytest.mark.usefixtures("one_thread")
S = 7  # kernel size


# oneDNN's convolutions and GEMMs round differently for different batch sizes (~1e-7 per layer); a denoiser
# that evaluates one image per UNet call (max_batch=1, the CPU default of the scripts) isolates the driver:
# with it, batched == one-by-one, bit for bit.


def _problem(B=3, size=32):
    g = torch.Generator().manual_seed(0)
    ys = [torch.rand(1, 3, size, size, generator=g) for _ in range(B)]
    ks = [torch.rand(S, S, generator=g) for _ in range(B)]
    return ys, [k / k.sum() for k in ks], [0.02, 0.05, 0.1][:B]


@pytest.mark.parametrize("guidance,n,blind", [(PiGDM(), 1, True), (DPS(zeta=0.5), 2, True), (PiGDM(), 2, False)])
def test_batch_equals_one_by_one(tiny_unet, guidance, n, blind):
    torch.manual_seed(0)
    den = EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=1)
    kd = FDnCNN().eval()
    ys, ks, sigmas = _problem()
    mcfg = MStepConfig(J=3)
    fixed = None if blind else ks
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(3)]  # noqa: E731
    seen = [[] for _ in range(3)]
    cbs = [lambda info, b=b: seen[b].append(info["kernel"].clone()) for b in range(3)]
    batch = fast_diffusion_em_batch(den, ys, sigmas, guidance, mcfg, S, gens(), kd, n_particles=n,
                                    fixed_kernels=fixed, guard=None, callbacks=cbs)
    for b, g in enumerate(gens()):
        one = fast_diffusion_em(den, ys[b], sigmas[b], guidance, mcfg, S, g, kd, n_particles=n,
                                fixed_kernel=None if blind else ks[b], guard=None)
        assert batch[b].x.shape == one.x.shape == (n, 3, 32, 32)
        assert torch.equal(batch[b].x, one.x) and torch.equal(batch[b].kernel, one.kernel)
        assert batch[b].nfe == one.nfe == 4 and len(seen[b]) == 4
        assert [r["where"] for r in batch[b].trace] == [r["where"] for r in one.trace]
    # the images really differ (own kernels / σ / noise), so the check above is not trivial
    assert not torch.equal(batch[0].kernel, batch[1].kernel) and (batch[0].x - batch[1].x).abs().max() > 1e-3


def test_batch_with_padded_frames_equals_one_by_one(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(3), max_batch=1)
    ys, ks, sigmas = _problem(2)
    boxes = [(4, 4, 24, 24), None]  # a photo's frame inside its padding; a circular (synthetic) image
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(2)]  # noqa: E731
    batch = fast_diffusion_em_batch(den, ys, sigmas, PiGDM(), MStepConfig(J=2), S, gens(), guard=None,
                                    data_boxes=boxes)
    for b, g in enumerate(gens()):
        one = fast_diffusion_em(den, ys[b], sigmas[b], PiGDM(), MStepConfig(J=2), S, g, guard=None,
                                data_box=boxes[b])
        assert torch.equal(batch[b].x, one.x) and torch.equal(batch[b].kernel, one.kernel)


def test_a_diverging_image_leaves_the_batch(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(4), max_batch=1)
    ys, ks, sigmas = _problem(2)
    ys[1] = ys[1] * float("nan")  # non-finite observation: its x̂0 stays finite, its kernel does not
    gens = lambda: [torch.Generator().manual_seed(10 + b) for b in range(2)]  # noqa: E731
    out = fast_diffusion_em_batch(den, ys, sigmas, PiGDM(), MStepConfig(J=2), S, gens(), guard=Guard())
    assert isinstance(out[1], DivergenceError) and "step 1/4" in str(out[1])
    alone = fast_diffusion_em(den, ys[0], sigmas[0], PiGDM(), MStepConfig(J=2), S, gens()[0], guard=Guard())
    assert torch.equal(out[0].x, alone.x)


def test_batch_rejects_mixed_sizes(tiny_unet):
    den = EpsDenoiser(tiny_unet, Schedule.create(2))
    ys = [torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 48)]
    with pytest.raises(ValueError, match="one size"):
        fast_diffusion_em_batch(den, ys, [0.1, 0.1], PiGDM(), MStepConfig(), S, [torch.Generator()] * 2)



def test_batch_equals_one_by_one_in_bf16_channels_last(tiny_unet):
    """The CPU default path (bf16 autocast, channels-last, one image per UNet call: the NHWC GroupNorm of
    guided_diffusion/nhwc_norm.py) keeps a batched run equal to the one-by-one runs, bit for bit."""
    den = EpsDenoiser(tiny_unet, Schedule.create(3), max_batch=1, autocast_dtype=torch.bfloat16, channels_last=True)
    ys, ks, sigmas = _problem(2)
    gens = lambda: [torch.Generator().manual_seed(20 + b) for b in range(2)]  # noqa: E731
    batch = fast_diffusion_em_batch(den, ys, sigmas, PiGDM(), MStepConfig(J=2), S, gens(), n_particles=2, guard=None)
    for b, g in enumerate(gens()):
        one = fast_diffusion_em(den, ys[b], sigmas[b], PiGDM(), MStepConfig(J=2), S, g, n_particles=2, guard=None)
        assert torch.equal(batch[b].x, one.x) and torch.equal(batch[b].kernel, one.kernel)
    assert (batch[0].x - batch[1].x).abs().max() > 1e-3

"""The channels-last bf16 CPU path: GroupNorm of one NHWC image (guided_diffusion/nhwc_norm.py) and the layout
kept through the UNet."""
import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import nhwc_norm
from guided_diffusion.unet import GroupNorm32, cat_channels, create_model, same_layout

CL = torch.channels_last


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a − b| in units of b's bf16 spacing."""
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    return ((a - b).abs() / spacing).max().item()


@pytest.mark.parametrize("channels,groups", [(6, 6), (8, 4), (12, 4), (9, 3)])
def test_group_norm_nhwc_is_group_norm_with_its_exact_gradient(channels, groups):
    """float64: the output equals F.group_norm, and autograd's numerical check passes for x, weight and bias
    (groups of one channel: batch norm's kernels; larger groups: the combined statistics and our backward)."""
    torch.manual_seed(0)
    x = (torch.randn(1, channels, 5, 7, dtype=torch.float64) * 2 + 1).contiguous(memory_format=CL).requires_grad_(True)
    w = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    b = torch.randn(channels, dtype=torch.float64, requires_grad=True)
    out = nhwc_norm._GroupNormNHWC.apply(x, groups, w, b, 1e-5)
    assert out.is_contiguous(memory_format=CL)
    assert torch.allclose(out, F.group_norm(x, groups, w, b, 1e-5), atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b: nhwc_norm._GroupNormNHWC.apply(x, groups, w, b, 1e-5), (x, w, b))
    # only the input's gradient asked for (frozen weights, as in guidance)
    g, = torch.autograd.grad((out * out).sum(), x)
    xr = x.detach().contiguous().requires_grad_(True)
    g_ref, = torch.autograd.grad((F.group_norm(xr, groups, w, b, 1e-5) ** 2).sum(), xr)
    assert torch.allclose(g, g_ref, atol=1e-10)


@pytest.mark.parametrize("channels", [32, 64, 96])
def test_group_norm_nhwc_bf16_as_accurate_as_torch_group_norm(channels):
    """bf16: within one rounding of the float32 GroupNorm (statistics and affine map in float32), and an input
    gradient about as close to float32's as torch's own bf16 GroupNorm on NCHW."""
    torch.manual_seed(1)
    gn = GroupNorm32(32, channels)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5), gn.bias.normal_()
    x = (torch.randn(1, channels, 16, 12) * 3 + 1).bfloat16()
    ref = F.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps)
    xc = x.contiguous(memory_format=CL).requires_grad_(True)
    out = gn(xc)
    assert type(out.grad_fn).__name__ == "_GroupNormNHWCBackward"  # the NHWC path ran
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL) and _bf16_ulps(out.float(), ref) <= 1.0
    # upstream gradients: random; along the normalised output; nearly constant. In the last two the backward's
    # terms for groups of several channels cancel, and they are rounded separately in bf16 (nhwc_norm.py): there
    # its error is 2-3x and 6-7x torch's own kernel's (measured 0.46 % and 1.2 % against 0.17 %), the known cost
    # of the fast path (summing in float32 costs 11 % of a call; the whole UNet's gradient did not move)
    for u, factor in ((torch.randn(ref.shape), 1.5), (ref + 0.01 * torch.randn(ref.shape), 3.0),
                      (1 + 0.01 * torch.randn(ref.shape), 8.0)):
        xc = x.contiguous(memory_format=CL).requires_grad_(True)
        g, = torch.autograd.grad((gn(xc).float() * u.bfloat16().float()).sum(), xc)
        xr = x.float().requires_grad_(True)
        g_ref, = torch.autograd.grad((F.group_norm(xr, 32, gn.weight, gn.bias, gn.eps) * u.bfloat16().float()).sum(), xr)
        xn = x.clone().requires_grad_(True)
        g_nchw, = torch.autograd.grad((gn(xn).float() * u.bfloat16().float()).sum(), xn)  # torch's bf16 kernel, NCHW
        err = ((g.float() - g_ref).norm() / g_ref.norm()).item()
        err_nchw = ((g_nchw.float() - g_ref).norm() / g_ref.norm()).item()
        assert err < 2e-2 and err <= factor * err_nchw + 1e-4, (channels, factor, err, err_nchw)


def test_group_norm_nhwc_only_for_one_channels_last_bf16_image_on_a_cpu():
    gn = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).bfloat16()
    assert nhwc_norm.applies(x[:1].contiguous(memory_format=CL))
    assert not nhwc_norm.applies(x.contiguous(memory_format=CL))  # two images: statistics are per image
    assert not nhwc_norm.applies(x[:1])                            # NCHW
    assert not nhwc_norm.applies(x[:1].float().contiguous(memory_format=CL))  # float32: torch's GroupNorm
    assert type(gn(x.contiguous(memory_format=CL).requires_grad_(True)).grad_fn).__name__ == "ToCopyBackward0"
    with pytest.raises(ValueError, match="one image"):
        nhwc_norm.group_norm_nhwc(x.contiguous(memory_format=CL), 32, gn.weight, gn.bias, gn.eps)


def test_modulated_norm_folds_scale_and_shift_into_the_affine_map():
    """GroupNorm(x)·(1 + scale) + shift: folded on the NHWC path (within a bf16 rounding of float32), the
    unfolded expression elsewhere (float32: exactly it)."""
    torch.manual_seed(2)
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5), gn.bias.normal_()
    x = torch.randn(1, 64, 8, 6) * 2
    scale, shift = torch.randn(1, 64, 1, 1) * 0.3, torch.randn(1, 64, 1, 1)
    ref = F.group_norm(x, 32, gn.weight, gn.bias, gn.eps) * (1 + scale) + shift
    assert torch.equal(gn.modulated(x, scale, shift), gn(x) * (1 + scale) + shift)
    xb = x.bfloat16().contiguous(memory_format=CL)
    ref_b = F.group_norm(xb.float(), 32, gn.weight, gn.bias, gn.eps) * (1 + scale.bfloat16().float()) + shift.bfloat16().float()
    out = gn.modulated(xb.requires_grad_(True), scale.bfloat16(), shift.bfloat16())
    assert type(out.grad_fn).__name__ == "_GroupNormNHWCBackward"  # one NHWC GroupNorm, no multiply and add after
    assert out.dtype == torch.bfloat16 and _bf16_ulps(out.float(), ref_b) <= 1.0
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_channels_last_is_kept_through_concatenation_upsampling_and_attention(tiny_unet_config):
    """In a channels-last bf16 CPU call every convolution sees channels-last input (an NCHW tensor in between
    costs layout conversions in every op after it)."""
    a = torch.randn(1, 8, 4, 4).contiguous(memory_format=CL)
    b = torch.randn(1, 4, 4, 4).contiguous(memory_format=CL)
    c = cat_channels(a, b)
    assert c.is_contiguous(memory_format=CL) and torch.equal(c, torch.cat([a, b], 1))
    assert torch.equal(cat_channels(a.contiguous(), b), torch.cat([a, b], 1))
    up = F.interpolate(a, scale_factor=2)
    assert same_layout(up, a).is_contiguous(memory_format=CL) and torch.equal(same_layout(up, a), up)
    assert same_layout(up, a.contiguous()) is up
    torch.manual_seed(0)
    model = create_model(**tiny_unet_config).eval().requires_grad_(False).to(memory_format=CL)
    layouts = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            m.register_forward_hook(lambda mod, inp, out: layouts.append(nhwc_norm.is_nhwc(inp[0])))
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=CL).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, torch.tensor([10])).float().sum().backward()
    # the first convolution sees the 3-channel input; every other one channels-last
    assert len(layouts) > 10 and all(layouts[1:])


def test_unet_bf16_channels_last_as_accurate_as_nchw(tiny_unet_config):
    """The whole tiny UNet (scale-shift norm, up/down ResBlocks, attention) in bf16: channels-last (NHWC
    GroupNorm, folded modulation) is as close to float32 as NCHW bf16, output and input gradient."""
    torch.manual_seed(0)
    model = create_model(**tiny_unet_config).eval().requires_grad_(False)
    for p in model.parameters():  # zero-initialised output layers would make the output 0
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t, u = torch.randn(1, 3, 32, 32), torch.tensor([300]), torch.randn(1, 6, 32, 32)
    xr = x.clone().requires_grad_(True)
    ref = model(xr, t)
    g_ref, = torch.autograd.grad((ref * u).sum(), xr)

    def errors(layout):
        m = model.to(memory_format=layout)
        xb = x.contiguous(memory_format=layout).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xb, t).float()
        g, = torch.autograd.grad((out * u).sum(), xb)
        return ((out - ref).norm() / ref.norm()).item(), ((g - g_ref).norm() / g_ref.norm()).item()

    nhwc, nchw = errors(CL), errors(torch.contiguous_format)
    assert nhwc != nchw  # different kernels ran
    assert all(0 < a <= 1.25 * b + 1e-3 for a, b in zip(nhwc, nchw)) and nhwc[0] < 0.05 and nhwc[1] < 0.1


def test_bf16_on_a_cpu_runs_channels_last():
    from diffusion_em.restore import prefers_channels_last
    from guided_diffusion.model_config import load_model_config
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    bundled = load_model_config(root / "configs/model_config_bundled.yaml")
    ffhq = load_model_config(root / "configs/model_config.yaml")
    cpu = torch.device("cpu")
    assert prefers_channels_last(bundled, cpu, "bf16") and not prefers_channels_last(bundled, cpu, "fp32")
    assert prefers_channels_last(ffhq, cpu, "fp32") and prefers_channels_last(ffhq, cpu, "bf16")

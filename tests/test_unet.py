import json

import pytest
import torch

from guided_diffusion.unet import create_model, load_weights
from util.checkpoint import CheckpointError


def test_reference_fixture_reproduced(shared_path):
    ref = torch.load(shared_path("reference", "unet_reference_small.pt"), weights_only=True)
    model = create_model(**ref["config"])
    model.load_state_dict(ref["state_dict"], strict=True)
    model.eval()
    with torch.no_grad():
        for case in ref["cases"]:
            out = model(case["x"], case["t"])
            assert out.shape == case["out"].shape
            assert (out - case["out"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["ffhq_10m", "imagenet256_uncond"])
def test_public_checkpoint_layout(name, shared_path):
    manifest = json.loads(shared_path("reference", "guided_diffusion_checkpoint_manifest.json").read_text())[name]
    with torch.device("meta"):  # no memory for 550M parameters
        model = create_model(**manifest["config"])
    sd = model.state_dict()
    assert list(sd) == [n for n, _ in manifest["tensors"]]
    assert all(list(sd[n].shape) == shape for n, shape in manifest["tensors"])
    assert sum(p.numel() for p in model.parameters()) == manifest["num_params"]


def test_loader_errors(tmp_path, tiny_unet, tiny_unet_config):
    with pytest.raises(CheckpointError, match="not found"):
        load_weights(tiny_unet, tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_weights(tiny_unet, bad)
    other = create_model(**{**tiny_unet_config, "num_channels": 64})
    wrong = tmp_path / "wrong.pt"
    torch.save(other.state_dict(), wrong)
    with pytest.raises(CheckpointError, match="wrong shape.*time_embed.0.weight"):
        load_weights(tiny_unet, wrong)
    sd = dict(tiny_unet.state_dict())
    sd.pop("out.2.bias")
    torch.save(sd, wrong)
    with pytest.raises(CheckpointError, match="missing.*out.2.bias"):
        load_weights(tiny_unet, wrong)
    good = tmp_path / "good.pt"
    torch.save(tiny_unet.state_dict(), good)
    fresh = create_model(**tiny_unet_config)
    load_weights(fresh, good)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tiny_unet.state_dict().values()))


def test_any_size_and_batch(tiny_unet):
    with torch.no_grad():
        for shape in [(1, 3, 32, 32), (3, 3, 16, 48), (2, 3, 40, 24)]:
            out = tiny_unet(torch.randn(shape), torch.full((shape[0],), 500))
            assert out.shape == (shape[0], 6) + shape[2:]
        # batched result equals one-by-one (no cross-talk between images)
        x = torch.randn(2, 3, 32, 32)
        t = torch.tensor([10, 900])
        both = tiny_unet(x, t)
        one = torch.cat([tiny_unet(x[i:i + 1], t[i:i + 1]) for i in range(2)])
        assert torch.allclose(both, one, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 8"):
        tiny_unet(torch.randn(1, 3, 33, 32), torch.tensor([1]))


def test_new_attention_order_differs_but_runs(tiny_unet_config):
    torch.manual_seed(0)
    cfg = {**tiny_unet_config, "num_head_channels": 16}
    new = create_model(**{**cfg, "use_new_attention_order": True})
    for p in new.parameters():  # zero-initialised output layers would make both outputs 0
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    legacy = create_model(**{**cfg, "use_new_attention_order": False})
    legacy.load_state_dict(new.state_dict())  # same tensors, read in another head/qkv order
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([3])
    with torch.no_grad():
        a, b = new(x, t), legacy(x, t)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


def test_conv1x1_gemm_matches_conv2d():
    from guided_diffusion.unet import Conv1x1
    torch.manual_seed(0)
    conv = Conv1x1(6, 4)
    assert list(conv.state_dict()) == ["weight", "bias"] and conv.weight.shape == (4, 6, 1, 1)
    x = torch.randn(2, 6, 5, 7)
    ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias)
    for fmt in (torch.contiguous_format, torch.channels_last):
        xx = x.contiguous(memory_format=fmt).requires_grad_(True)
        out = conv(xx)
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
        g, = torch.autograd.grad((out * ref).sum(), xx)
        g_ref = torch.nn.functional.conv_transpose2d(ref, conv.weight)  # adjoint of the 1x1 map
        assert torch.allclose(g, g_ref, atol=1e-4)


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a − b| in units of b's bf16 spacing (2^(e−7) for |b| in [2^e, 2^(e+1)))."""
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    return ((a - b).abs() / spacing).max().item()


def test_groupnorm_bf16_cpu_path_equals_the_float32_computation():
    """GroupNorm32 on contiguous bf16 CPU input uses torch's own mixed-precision kernel (no casts): within one bf16
    rounding of the float32 GroupNorm, and its input-gradient as close to float32's as the cast path's."""
    from guided_diffusion.unet import normalization
    torch.manual_seed(0)
    gn = normalization(64)
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5), gn.bias.normal_()
    x = (torch.randn(2, 64, 12, 10) * 3 + 1).bfloat16()
    ref = torch.nn.functional.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps)
    out = gn(x.clone().requires_grad_(True))
    assert out.dtype == torch.bfloat16 and _bf16_ulps(out.float(), ref) <= 1.0
    assert type(out.grad_fn).__name__ == "NativeGroupNormBackward0"  # no cast back: the bf16 kernel ran
    cl = gn(x.contiguous(memory_format=torch.channels_last).requires_grad_(True))  # other layouts: the cast path
    assert type(cl.grad_fn).__name__ == "ToCopyBackward0" and _bf16_ulps(cl.float(), ref) <= 1.0
    u = torch.randn(ref.shape)
    xx = x.clone().requires_grad_(True)
    g, = torch.autograd.grad((gn(xx).float() * u).sum(), xx)
    xr = x.float().requires_grad_(True)
    g_ref, = torch.autograd.grad((torch.nn.functional.group_norm(xr, 32, gn.weight, gn.bias, gn.eps) * u).sum(), xr)
    xc = x.clone().requires_grad_(True)  # the cast path (what runs on other devices / layouts)
    g_cast, = torch.autograd.grad((gn.on_float32_copy(xc).float() * u).sum(), xc)
    err, err_cast = ((g.float() - g_ref).norm() / g_ref.norm()).item(), ((g_cast.float() - g_ref).norm() / g_ref.norm()).item()
    assert err < 1e-2 and err <= 1.5 * err_cast


def test_conv1x1_nchw_under_cpu_autocast_is_a_bf16_matrix_product():
    from guided_diffusion.unet import Conv1x1
    torch.manual_seed(0)
    conv = Conv1x1(64, 32)
    x = torch.randn(2, 64, 9, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        xx = x.clone().requires_grad_(True)
        out = conv(xx)
        ref = torch.nn.functional.conv2d(x, conv.weight, conv.bias)  # autocast: bf16 conv
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape and out.is_contiguous()
    assert "Convolution" not in type(out.grad_fn).__name__ and "Convolution" in type(ref.grad_fn).__name__
    plain = conv(x.clone().requires_grad_(True))  # no autocast: conv2d, as before
    assert plain.dtype == torch.float32 and "Convolution" in type(plain.grad_fn).__name__
    # both round x, W and b to bf16, accumulate in float32 and round the result once
    exact = torch.nn.functional.conv2d(x.bfloat16().float(), conv.weight.bfloat16().float(), conv.bias.bfloat16().float())
    assert _bf16_ulps(out.float(), exact) <= 1.0 and _bf16_ulps(ref.float(), exact) <= 1.0
    g, = torch.autograd.grad((out.float() * exact).sum(), xx)
    g_ref = torch.nn.functional.conv_transpose2d(exact, conv.weight)
    assert ((g - g_ref).norm() / g_ref.norm()).item() < 1e-2


def test_avg_pool_2x2_bf16_cpu_is_bit_equal_to_avg_pool2d():
    from guided_diffusion.unet import avg_pool_2x2
    torch.manual_seed(0)
    for shape in [(2, 5, 8, 6), (1, 3, 7, 6)]:  # the odd height falls back to avg_pool2d
        x = (torch.randn(shape) * 4).bfloat16()
        a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out, ref = avg_pool_2x2(a), torch.nn.functional.avg_pool2d(b, 2)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
        assert ("AvgPool" in type(out.grad_fn).__name__) == (shape[2] % 2 == 1)  # which path ran
        u = torch.randn(ref.shape).bfloat16()
        assert torch.equal(torch.autograd.grad((out * u).sum(), a)[0], torch.autograd.grad((ref * u).sum(), b)[0])
    # avg_pool2d's summation order, also where it matters: huge and tiny values in one window
    x = (torch.randn(4, 8, 16, 12) * torch.exp2(torch.randint(-20, 21, (4, 8, 16, 12)).float())).bfloat16()
    x[0, 0, :2, :2] = torch.tensor([[2.0 ** 30, 1.0], [-2.0 ** 30, 1.0]])
    assert torch.equal(avg_pool_2x2(x), torch.nn.functional.avg_pool2d(x, 2))
    x = torch.randn(1, 2, 6, 4)
    assert torch.equal(avg_pool_2x2(x), torch.nn.functional.avg_pool2d(x, 2))  # float32: avg_pool2d itself


def _bf16_errors(model, x, t, u):
    """Relative errors of the bf16-autocast output and input-gradient against float32."""
    xr = x.clone().requires_grad_(True)
    ref = model(xr, t)
    g_ref, = torch.autograd.grad((ref * u).sum(), xr)
    xb = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xb, t).float()
    g, = torch.autograd.grad((out * u).sum(), xb)
    return ((out - ref).norm() / ref.norm()).item(), ((g - g_ref).norm() / g_ref.norm()).item()


def test_unet_bf16_cpu_paths_as_accurate_as_the_cast_paths(tiny_unet_config, monkeypatch):
    """The whole bf16 CPU UNet (autocast + the three paths above) is as close to float32 as with GroupNorm on a
    float32 copy and 1x1 convolutions through conv2d (the paths before, and elsewhere)."""
    import guided_diffusion.unet as U
    torch.manual_seed(0)
    model = create_model(**{**tiny_unet_config, "resblock_updown": True}).eval().requires_grad_(False)
    for p in model.parameters():  # zero-initialised output layers would make the output 0
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    x, t, u = torch.randn(1, 3, 32, 32), torch.tensor([300]), torch.randn(1, 6, 32, 32)
    ours = _bf16_errors(model, x, t, u)
    monkeypatch.setattr(U.GroupNorm32, "forward", U.GroupNorm32.on_float32_copy)
    monkeypatch.setattr(U.Conv1x1, "forward", torch.nn.Conv2d.forward)
    cast = _bf16_errors(model, x, t, u)
    assert ours != cast  # the fast paths ran
    assert all(0 < a <= 1.25 * b + 1e-3 for a, b in zip(ours, cast)) and ours[0] < 0.05 and ours[1] < 0.1

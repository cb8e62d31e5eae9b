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

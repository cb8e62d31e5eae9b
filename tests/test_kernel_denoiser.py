"""Kernel denoiser: manifest layout, strict loading, forward semantics, shipped weights."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernel_denoiser.kernels import camera_shake_kernels
from util.geometry import project_simplex
from kernel_denoiser.network import FDnCNN, load_kernel_denoiser, save_kernel_denoiser
from util.checkpoint import CheckpointError


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: thread start-up dominates


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
MANIFEST = os.path.join(SHARED, "reference", "kernel_denoiser_manifest.json")

# the authors' kernel_denoiser_33.pth layout (reference/kernel_denoiser_manifest.json)
AUTHORS_LAYOUT = [("model.0.weight", (32, 2, 3, 3)), ("model.0.bias", (32,)),
                  ("model.2.weight", (32, 32, 3, 3)), ("model.2.bias", (32,)),
                  ("model.4.weight", (32, 32, 3, 3)), ("model.4.bias", (32,)),
                  ("model.6.weight", (32, 32, 3, 3)), ("model.6.bias", (32,)),
                  ("model.8.weight", (1, 32, 3, 3)), ("model.8.bias", (1,))]


def _manifest_layout():
    if not os.path.isfile(MANIFEST):
        return AUTHORS_LAYOUT
    m = json.load(open(MANIFEST))["kernel_denoiser_33_and_64"]["tensors"]
    return [(n, tuple(s)) for n, s in m]


def _random_sd(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.1 * torch.randn(s, generator=g) for n, s in layout}


def test_embedded_layout_matches_shared_manifest():
    if not os.path.isfile(MANIFEST):
        pytest.skip(f"../shared not found ({MANIFEST}): cannot compare with the reference manifest")
    assert _manifest_layout() == AUTHORS_LAYOUT


def test_default_network_has_the_manifest_tensors():
    net = FDnCNN()
    assert [(n, tuple(t.shape)) for n, t in net.state_dict().items()] == _manifest_layout()


def test_authors_plain_state_dict_loads_and_computes_the_plain_conv_stack(tmp_path):
    layout = _manifest_layout()
    sd = _random_sd(layout)
    p = tmp_path / "kernel_denoiser_33.pth"
    torch.save(sd, p)
    net = load_kernel_denoiser(str(p))
    assert not net.training
    k = torch.rand(2, 1, 33, 33)
    sig = torch.tensor([0.01, 0.05])
    # reference forward written from the spec: cat(kernel, σ map) -> conv3x3+bias, ReLU between, no residual
    h = torch.cat([k, sig.reshape(2, 1, 1, 1).expand(2, 1, 33, 33)], 1)
    for i in range(5):
        h = F.conv2d(h, sd[f"model.{2 * i}.weight"], sd[f"model.{2 * i}.bias"], padding=1)
        if i < 4:
            h = F.relu(h)
    torch.testing.assert_close(net(k, sig), h, atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoints_are_refused_with_the_tensor_name(tmp_path):
    layout = _manifest_layout()
    bad_shape = _random_sd(layout)
    bad_shape["model.4.weight"] = torch.zeros(16, 32, 3, 3)
    torch.save(bad_shape, tmp_path / "a.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape.*model\.4\.weight"):
        load_kernel_denoiser(str(tmp_path / "a.pth"))
    missing = _random_sd(layout)
    del missing["model.8.bias"]
    torch.save(missing, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match=r"missing.*model\.8\.bias"):
        load_kernel_denoiser(str(tmp_path / "b.pth"))
    extra = _random_sd(layout)
    extra["model.10.weight"] = torch.zeros(1)
    torch.save(extra, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.10\.weight"):
        load_kernel_denoiser(str(tmp_path / "c.pth"))
    (tmp_path / "d.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_kernel_denoiser(str(tmp_path / "d.pth"))
    torch.save([1, 2, 3], tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_kernel_denoiser(str(tmp_path / "e.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        load_kernel_denoiser(str(tmp_path / "missing.pth"))


class _Hostile:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_hostile_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    """The refusal used to be five lines repeating torch's advice to retry with weights_only=False."""
    torch.save({"state_dict": _Hostile()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError) as e:
        load_kernel_denoiser(str(tmp_path / "evil.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "weights_only" not in msg and "evil.pth" in msg and "refused" in msg
    assert "never run" not in capsys.readouterr().out


def test_our_format_roundtrip_with_dilations_and_scale(tmp_path):
    net = FDnCNN(nb=8, dilations=[1, 2, 4, 8, 8, 4, 2, 1], scale=409.6)
    assert net.receptive_field == 61
    p = str(tmp_path / "k64.pth")
    save_kernel_denoiser(net, p, {"note": "test", "torch": torch.__version__})  # TorchVersion must not leak in
    obj = torch.load(p, weights_only=True)
    assert obj["arch"]["dilations"] == [1, 2, 4, 8, 8, 4, 2, 1] and obj["meta"]["note"] == "test"
    net2 = load_kernel_denoiser(p)
    k = torch.rand(1, 1, 64, 64) * 0.01
    torch.testing.assert_close(net2(k, 0.003), net.eval()(k, 0.003))
    # the same weights under the plain default architecture must be refused, not half-loaded
    torch.save(obj["state_dict"], tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="architecture mismatch"):
        load_kernel_denoiser(str(tmp_path / "plain.pth"))


@pytest.mark.parametrize("size", [33, 64])
def test_shipped_weights_denoise_better_than_projection(size):
    path = os.path.join(ROOT, "models", f"kernel_denoiser_{size}.pth")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not shipped in this checkout")
    net = load_kernel_denoiser(path)
    clean = torch.from_numpy(camera_shake_kernels(16, size, np.random.default_rng(424242)))[:, None]
    sigma = (1.0 / 1e5) ** 0.5  # the M-step's sqrt(λ/β)
    noisy = clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    p = project_simplex(noisy)
    with torch.no_grad():
        den = project_simplex(net(p, sigma))
    err = lambda e: ((e - clean) ** 2).mean().item()  # noqa: E731
    # better than identity and clearly better than the projection alone (itself a strong denoiser)
    assert err(den) < err(noisy)
    assert err(den) < 0.7 * err(p), (err(den), err(p))

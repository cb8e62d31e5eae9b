"""Shared fixtures (pytest injects them; tests never import this file): the repository root, ../shared
material (skipped with a message when absent), a tiny UNet and its config, one-thread runs."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(1)  # tiny problems on a shared 2-core box: a second thread mostly waits

TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,1,2,2", learn_sigma=True,
                 class_cond=False, attention_resolutions="4", num_heads=2, num_head_channels=-1,
                 num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
                 use_fp16=False, use_new_attention_order=False)


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def shared_path():
    """shared_path(*parts): a path in ../shared, or skip with a clear message (a user's clone has no ../shared)."""
    def get(*parts) -> Path:
        p = ROOT.parent.joinpath("shared", *parts)
        if not p.exists():
            pytest.skip(f"reference material {p} not present (only in the project's shared folder)")
        return p
    return get


@pytest.fixture
def tiny_unet_config() -> dict:
    """Model-config keys of a tiny UNet (32 channels, attention at the deepest level only)."""
    return dict(TINY_UNET)


@pytest.fixture
def one_thread():
    """Run a test on one thread (restored after): for tiny problems thread start-up dominates."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_tiny_unet():
    from guided_diffusion.unet import create_model
    torch.manual_seed(0)
    m = create_model(**TINY_UNET)
    # zero-initialised output layers would make ε ≡ 0: give them random weights for a real smoke test
    for p in m.parameters():
        if p.abs().sum() == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    return m.eval()


@pytest.fixture
def tiny_unet():
    return random_tiny_unet()


@pytest.fixture
def tiny_run(tmp_path, tiny_unet_config):
    """(folder, {name: diffusion config}, data folder): tiny random UNet and kernel-denoiser weights, their
    configs (4 steps, 2 rounds, 9×9 kernels, guard off: a random UNet's output is garbage, plumbing only) and
    a 2-image test-set folder (32×32, σ 0.02)."""
    from guided_diffusion.unet import create_model
    from kernel_denoiser.network import FDnCNN, save_kernel_denoiser
    torch.manual_seed(0)
    unet = create_model(**tiny_unet_config)
    for p in unet.parameters():  # the zero-initialised output layers would make ε ≡ 0
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.02)
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({**tiny_unet_config, "model_path": str(tmp_path / "unet.pt")}))
    save_kernel_denoiser(FDnCNN(), str(tmp_path / "kd.pth"))
    (tmp_path / "kernel.yaml").write_text(yaml.safe_dump({"kernel_size": 9, "denoiser_path": str(tmp_path / "kd.pth")}))
    cfgs = {}
    for name in ("fastem_pigdm", "fastem_pigdm_paper", "fastem_dps", "pigdm", "dps"):
        d = yaml.safe_load((ROOT / "configs" / f"diffusion_config_{name}.yaml").read_text())
        d["steps"] = 4
        if d["method"] == "diffusion_em":
            d["em_rounds"] = 2
        d["guard_residual"], d["guard_saturation"] = 1e9, 1.0
        d["precision"] = "fp32"  # 'auto' would differ by machine; its resolution has its own tests
        cfgs[name] = tmp_path / f"diff_{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(d))
    data = tmp_path / "set"
    g = np.random.default_rng(0)
    for sub in ("blurry", "sharp", "kernel"):
        (data / sub).mkdir(parents=True)
    for i in range(2):
        x = g.random((32, 32, 3)).astype(np.float32)
        Image.fromarray((x * 255).astype(np.uint8)).save(data / "sharp" / f"im{i}.png")
        k = g.random((5, 5)).astype(np.float32)
        np.save(data / "kernel" / f"im{i}.npy", k / k.sum())
        np.save(data / "blurry" / f"im{i}.npy", np.clip(x + 0.02 * g.standard_normal(x.shape), 0, 1).astype(np.float32))
    (data / "meta.csv").write_text("name,sigma\nim0,0.02\nim1,0.02\n")
    return tmp_path, cfgs, data

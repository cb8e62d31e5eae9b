"""Shared fixtures (pytest injects them; tests never import this file): the repository root, ../shared
material (skipped with a message when absent), a tiny UNet and its config, one-thread runs."""
import sys
from pathlib import Path

import pytest
import torch

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

"""Memory a run needs, estimated before it starts, so one large input is refused instead of killing the batch.

`estimate_run_bytes` counts what a guided step keeps alive at once: the UNet's activations saved for the
input gradient (ΠGDM and DPS both backpropagate through the UNet), attention score matrices, the weights,
and the FFT buffers of the guidance and the M-step. With `backward=False` (ΠGDM with `pigdm_jacobian: none`:
forward passes only) it counts instead the encoder outputs kept for the skip connections, the widest block's
working tensors and one attention score matrix. The per-block tensor counts are an upper-side model of
the ADM UNet (`bench/memory_estimate.py` prints the estimate next to the measured peak). `check_budget`
compares it with a budget (`--memory_budget_gb`; default: 90 % of the memory available now) and raises a
ResourceError saying what is needed and the largest square image that fits. `needs_low_memory` first tries
the drivers' low-memory mode (several particles, one UNet graph at a time: the same result, slower) and
refuses only what fits in neither.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from guided_diffusion.model_config import ModelConfig
from guided_diffusion.unet import _parse_attention, _parse_channel_mult
from util.errors import ResourceError

SAVED_PER_RESBLOCK = 10      # tensors of the block's width kept for backward (norms, activations, convs, skip)
SAVED_PER_ATTENTION = 8      # q, k, v, norm, projections, output
WORKING_TENSORS = 6          # tensors of a block alive at once in a forward pass without autograd
SAFETY = 1.25                # allocator slack and temporaries (estimate 1.3–1.8× the measured peak with the backward pass, 1.8–2.7× without; bench/measured)


def estimate_run_bytes(height: int, width: int, n_particles: int, model: ModelConfig, kernel_size: int = 33,
                       channels: int = 3, bytes_per_value: int = 4, backward: bool = True,
                       low_memory: bool = False) -> int:
    """Peak bytes of one guided diffusion step on an image of height×width (before padding) with
    `n_particles` particles, for the UNet of `model` (weights included); `backward`: the guidance
    backpropagates through the UNet (False only for ΠGDM without its Jacobian); `low_memory`: the drivers'
    low-memory mode (a pass over all particles without the graph, then one particle's graph at a time)."""
    if backward and low_memory and n_particles > 1:
        return max(estimate_run_bytes(height, width, 1, model, kernel_size, channels, bytes_per_value),
                   estimate_run_bytes(height, width, n_particles, model, kernel_size, channels, bytes_per_value,
                                      backward=False))
    mult = _parse_channel_mult(model.channel_mult, model.image_size)
    H, W = frame_size(height, width, model, kernel_size)
    attn_ds = set(_parse_attention(model.attention_resolutions, model.image_size))
    if not backward:
        return int(SAFETY * bytes_per_value * (n_particles * _forward_values(H, W, mult, attn_ds, model)
                                               + 40 * channels * H * W + _parameter_count(model)))
    values = 0.0
    for level, m in enumerate(mult):
        pixels = H * W / 4 ** level
        c = model.num_channels * m
        # encoder blocks, decoder blocks (their input is twice as wide: the skip is concatenated)
        values += pixels * c * SAVED_PER_RESBLOCK * (model.num_res_blocks + 2 * (model.num_res_blocks + 1))
        ds = 2 ** level
        if ds in attn_ds or level == len(mult) - 1:  # the middle block always has attention
            heads = model.num_heads if model.num_head_channels == -1 else max(1, int(c) // model.num_head_channels)
            blocks = 2 * model.num_res_blocks + 2 if ds in attn_ds else 1
            values += blocks * (pixels * c * SAVED_PER_ATTENTION + 2 * heads * pixels ** 2)
    values *= n_particles
    values += 40 * channels * H * W                  # FFTs of the guidance and the M-step (complex, per channel)
    weights = _parameter_count(model) * 2            # weights and their gradient buffers in autograd
    return int(SAFETY * bytes_per_value * (values + weights))


def frame_size(height: int, width: int, model: ModelConfig, kernel_size: int = 33) -> tuple:
    """The frame the runner diffuses for an image: a band of one kernel size on every side (the boundary
    model), then the UNet's multiple (restore._prepare)."""
    multiple = 2 ** (len(_parse_channel_mult(model.channel_mult, model.image_size)) - 1)
    return tuple(math.ceil((v + 2 * kernel_size) / multiple) * multiple for v in (height, width))


def _forward_values(H: int, W: int, mult: list, attn_ds: set, model: ModelConfig) -> float:
    """Values alive at the peak of a forward pass without autograd: the skips, then the widest working set."""
    skips, working = 0.0, 0.0
    for level, m in enumerate(mult):
        pixels = H * W / 4 ** level
        c = model.num_channels * m
        skips += pixels * c * (model.num_res_blocks + 1)
        heads = model.num_heads if model.num_head_channels == -1 else max(1, int(c) // model.num_head_channels)
        has_attn = 2 ** level in attn_ds or level == len(mult) - 1
        # a decoder block at this level reads a skip-concatenated input twice as wide
        working = max(working, pixels * c * 2 * WORKING_TENSORS + (2 * heads * pixels ** 2 if has_attn else 0))
    return skips + working


def _parameter_count(model: ModelConfig) -> int:
    from guided_diffusion.model_config import build_unet
    with torch.device("meta"):
        return sum(p.numel() for p in build_unet(model).parameters())


def available_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory free for this run now: the accelerator's free memory, or the host's MemAvailable (Linux)."""
    if device.type != "cpu":
        free, _ = torch.accelerator.get_memory_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else None
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else None


def default_budget_bytes(device: torch.device) -> Optional[int]:
    avail = available_memory_bytes(device)
    return None if avail is None else int(0.9 * avail)


def largest_square(budget: int, n_particles: int, model: ModelConfig, kernel_size: int, backward: bool = True,
                   low_memory: bool = False) -> int:
    """The largest side s such that an s×s image fits the budget (0 when none does)."""
    lo, hi = 0, 1 << 16
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_run_bytes(mid, mid, n_particles, model, kernel_size, backward=backward,
                              low_memory=low_memory) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def needs_low_memory(height: int, width: int, n_particles: int, model: ModelConfig, kernel_size: int,
                     budget: Optional[int], backward: bool = True) -> bool:
    """Whether the run fits `budget` only in the low-memory mode (False: it fits as it is, or there is no
    budget); raises ResourceError, with both estimates, when it fits in neither."""
    if budget is None:
        return False
    need = estimate_run_bytes(height, width, n_particles, model, kernel_size, backward=backward)
    if need <= budget:
        return False
    low = estimate_run_bytes(height, width, n_particles, model, kernel_size, backward=backward, low_memory=True)
    if low <= budget:
        return True
    side = largest_square(budget, n_particles, model, kernel_size, backward, low_memory=True)
    also = f" ({low / 2**30:.1f} GB recomputing each particle's UNet pass)" if low < need else ""
    raise _too_large(height, width, n_particles, need, budget, side, also)


def _too_large(height: int, width: int, n_particles: int, need: int, budget: int, side: int,
               also: str = "") -> ResourceError:
    return ResourceError(f"a {width}×{height} image with {n_particles} particle(s) needs about {need / 2**30:.1f} GB"
                         f"{also}, over the memory budget of {budget / 2**30:.1f} GB (--memory_budget_gb); about "
                         f"{side}×{side} px fit: downscale or crop it, or raise the budget")


def check_budget(height: int, width: int, n_particles: int, model: ModelConfig, kernel_size: int,
                 budget: Optional[int], backward: bool = True) -> None:
    """Raise ResourceError when the run would need more than `budget` bytes (None: no limit)."""
    if budget is None:
        return
    need = estimate_run_bytes(height, width, n_particles, model, kernel_size, backward=backward)
    if need > budget:
        raise _too_large(height, width, n_particles, need, budget, largest_square(budget, n_particles, model,
                                                                                  kernel_size, backward))

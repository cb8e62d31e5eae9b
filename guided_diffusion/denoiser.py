"""The ε → x̂0 adapter: the only place that knows the UNet works in [-1, 1].

Everything outside sees images in [0, 1] (`to_phys` / `to_model` convert).
"""
from __future__ import annotations

import copy

import torch

from guided_diffusion.schedule import Schedule


def to_phys(x_model: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model space -> [0, 1] physics space."""
    return (x_model + 1) / 2


def to_model(x_phys: torch.Tensor) -> torch.Tensor:
    return 2 * x_phys - 1


def in_chunks(net, x: torch.Tensor, t: torch.Tensor, n: int | None) -> torch.Tensor:
    """net(x, t) evaluated on chunks of n rows, concatenated (None, or a batch of at most n rows: one call)."""
    if n is None or x.shape[0] <= n:
        return net(x, t)
    return torch.cat([net(x[j:j + n], t[j:j + n]) for j in range(0, x.shape[0], n)])


class EpsDenoiser:
    """Wraps an ε-predictor `model(x_t, t)` (≥3 output channels; the first 3 are ε).

    x0(x_t, i) = (x_t − sqrt(1−ᾱ)·ε) / sqrt(ᾱ), clipped to [-1, 1] when `clip` (docs/algorithm.md §1).
    The model's parameters are frozen: guidance needs gradients w.r.t. the input only.
    `channels_last` runs the convolutions in NHWC (faster on CPU and GPU; bench/unet_speed.py), converting
    the model in place. `autocast_dtype` (e.g. torch.bfloat16) runs the UNet under autocast; ε is returned
    in float32 either way. `compile_backend` (e.g. 'inductor') evaluates it through `torch.compile`: a one-off
    compilation on the first calls (and per new input size), then faster calls (docs/speed.md).
    `max_batch` evaluates a larger batch in chunks of that many rows: on a CPU a batch of four 256² images
    costs more than four single ones (the activations leave the cache; docs/speed.md), and chunks of 1 make a
    batched run equal the one-by-one run bit for bit. None: one call.
    """

    def __init__(self, model, schedule: Schedule, clip: bool = True, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = True, compile_backend: str | None = None, max_batch: int | None = None):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.max_batch = max_batch
        self.model = model
        self.schedule = schedule
        self.clip = clip
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last and isinstance(model, torch.nn.Module)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if isinstance(model, torch.nn.Module):
            model.eval().requires_grad_(False)
        self.net = torch.compile(model, backend=compile_backend) if compile_backend else model

    def respaced(self, schedule: Schedule) -> "EpsDenoiser":
        """The same network (shared, not copied) on another schedule, e.g. fewer steps."""
        out = copy.copy(self)
        out.schedule = schedule
        return out

    def eps(self, x_t: torch.Tensor, i: int) -> torch.Tensor:
        t = torch.full((x_t.shape[0],), int(self.schedule.timesteps[i]), device=x_t.device, dtype=torch.long)
        x_in = x_t.contiguous(memory_format=torch.channels_last) if self.channels_last and x_t.dim() == 4 else x_t
        out = in_chunks(self._net, x_in, t, self.max_batch)
        return out[:, : x_t.shape[1]].contiguous()

    def _net(self, x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.net(x_in, t)
        with torch.autocast(x_in.device.type, dtype=self.autocast_dtype):
            return self.net(x_in, t).float()

    def x0(self, x_t: torch.Tensor, i: int) -> torch.Tensor:
        """Tweedie estimate x̂0 in model space [-1, 1]."""
        ac = float(self.schedule.alphas_cumprod[i])
        x0 = (x_t - (1 - ac) ** 0.5 * self.eps(x_t, i)) / ac ** 0.5
        return x0.clamp(-1, 1) if self.clip else x0

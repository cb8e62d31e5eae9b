"""DDPM ancestral sampling ('fixed small' variance) with optional posterior guidance.

The sampler receives the denoiser, the operator, the measurement and the noise source; it never loads
files or writes images. Two hooks keep it ignorant of EM: `update_operator(i, x0_phys, op) -> op` runs
after x̂0 is predicted and before the guided step (Fast Diffusion EM's M-step plugs in here), and
`callback(i, x_t, x0_phys, op)` reports progress.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from guided_diffusion.denoiser import EpsDenoiser, to_phys


def sample(denoiser: EpsDenoiser, shape: tuple, generator: torch.Generator, device: torch.device,
           guidance=None, op=None, y: Optional[torch.Tensor] = None, x_T: Optional[torch.Tensor] = None,
           update_operator: Optional[Callable] = None, callback: Optional[Callable] = None,
           progress: bool = False):
    """Run the reverse chain from x_T ~ N(0, I) (drawn from `generator` unless given).

    Returns (x0 in [0, 1], final operator). With `guidance`, each step adds guidance.correction(...).
    """
    sched = denoiser.schedule
    coef1, coef2 = sched.posterior_mean_coef1, sched.posterior_mean_coef2
    std = torch.as_tensor(sched.posterior_variance).sqrt()
    x = x_T if x_T is not None else torch.randn(shape, generator=generator, device=device)
    steps = range(len(sched) - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="diffusion", leave=False)
    needs_grad = guidance is not None and getattr(guidance, "needs_grad", True)
    for i in steps:
        x = x.detach().requires_grad_(needs_grad)
        with torch.set_grad_enabled(needs_grad):
            x0 = denoiser.x0(x, i)
            x0_phys = to_phys(x0)
        if update_operator is not None:
            op = update_operator(i, x0_phys.detach(), op)
        mean = float(coef1[i]) * x0.detach() + float(coef2[i]) * x.detach()
        if i > 0:
            mean = mean + float(std[i]) * torch.randn(mean.shape, generator=generator, device=device)
        if guidance is not None:
            mean = mean + guidance.correction(x, x0_phys, sched, i, op, y)
        if callback is not None:
            callback(i, mean, x0_phys.detach(), op)
        x = mean
    return to_phys(x.detach()).clamp(0, 1) if denoiser.clip else to_phys(x.detach()), op

"""Non-blind deblurring with a known kernel: the paper's ΠGDM* / DPS* upper bounds.

The EM drivers reuse the same sampler; here the operator never changes.
"""
from __future__ import annotations

import torch

from diffusion_em.blur import BlurOperator
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.sampler import sample


def deblur_nonblind(denoiser: EpsDenoiser, y: torch.Tensor, kernel: torch.Tensor, sigma: float, guidance,
                    generator: torch.Generator, n_particles: int = 1, callback=None, progress: bool = False) -> torch.Tensor:
    """Posterior samples x ~ p(x | y, k) in [0, 1], shape (n_particles, C, H, W).

    y: (1, C, H, W) in [0, 1], H and W already acceptable to the UNet; kernel: (s, s) summing to 1.
    """
    if y.dim() != 4 or y.shape[0] != 1:
        raise ValueError(f"y must be (1, C, H, W), got {tuple(y.shape)}")
    op = BlurOperator.from_kernel(kernel.to(y), tuple(y.shape[-2:]), sigma)
    return sample(denoiser, (n_particles,) + tuple(y.shape[1:]), generator, y.device,
                  guidance=guidance, op=op, y=y, callback=callback, progress=progress)

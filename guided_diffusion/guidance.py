"""Posterior guidance for one DDPM step: each rule returns a correction added to the unconditional step.

A guidance rule receives the current x_t (requires grad), x̂0 in [0, 1] computed from it (with its graph),
the operator (anything with `A(x)` and `pigdm_solve(y, x0, r2)`, e.g. diffusion_em.blur.BlurOperator; in the
low-memory mode also `row(r)`, the operator of batch row r: sampler.guidance_correction), and the measurement
y in [0, 1]. It never imports the operator's module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from guided_diffusion.schedule import Schedule


@dataclass(frozen=True)
class PiGDM:
    """ΠGDM guidance (Song et al. 2023) against a linear operator with Gaussian noise.

    rule='authors' (default, the Fast Diffusion EM code): v = β̃_t, r² = v/(1+v), weight sqrt(ᾱ_t)·r²·(1+v)^(−1/2).
    rule='exact': r² = r2_fn(i) (the true Var[x0 | x_t] in [0,1] units when known), weight ζ·β_t/sqrt(α_t),
    which adds ζ·∇log p(y | x_t) to the DDPM mean — exact for a Gaussian prior (tests/test_posterior.py).

    jacobian='unet' (the paper) back-propagates through the denoiser (a vector-Jacobian product: 1.9–2.5× the
    cost of the forward pass on a CPU, and its activations in memory). jacobian='none' uses ΠGDM's own Gaussian
    approximation p(x0 | x_t) ≈ N(x̂0, r²I) without the Jacobian: x̂0 is replaced by that Gaussian's posterior
    mean given y, x̂0 + ζr²·u (the Wiener-like data-consistent estimate, clamped to [0, 1]), before the DDPM
    step; forward passes only (docs/choices.md "ΠGDM without the Jacobian").
    """
    rule: str = "authors"
    zeta: float = 1.0
    r2_fn: Optional[Callable[[int], float]] = None
    jacobian: str = "unet"

    def __post_init__(self):
        if self.rule not in ("authors", "exact"):
            raise ValueError(f"ΠGDM rule must be 'authors' or 'exact', got {self.rule!r}")
        if self.jacobian not in ("unet", "none"):
            raise ValueError(f"ΠGDM jacobian must be 'unet' or 'none', got {self.jacobian!r}")

    @property
    def needs_grad(self) -> bool:
        return self.jacobian == "unet"

    def r2(self, schedule: Schedule, i: int) -> float:
        if self.r2_fn is not None:
            return float(self.r2_fn(i))
        v = float(schedule.posterior_variance[i])
        return v / (1 + v)

    def weight(self, schedule: Schedule, i: int) -> float:
        if self.rule == "exact":
            return self.zeta * float(schedule.betas[i]) / math.sqrt(float(schedule.alphas[i]))
        v = float(schedule.posterior_variance[i])
        return self.zeta * math.sqrt(float(schedule.alphas_cumprod[i])) * (v / (1 + v)) / math.sqrt(1 + v)

    def correction(self, x_t, x0_phys, schedule: Schedule, i: int, op, y, eta: float = 1.0) -> torch.Tensor:
        if self.jacobian == "none":
            x0 = x0_phys.detach()
            r2 = self.zeta * self.r2(schedule, i)
            x0_y = (x0 + r2 * op.pigdm_solve(y, x0, r2)).clamp(0, 1)
            # the step's x̂0 coefficient (DDPM, or DDIM for η < 1), ×2 from [0, 1] to model units
            return 2 * schedule.step_coefs(i, eta)[0] * (x0_y - x0)
        u = op.pigdm_solve(y, x0_phys.detach(), self.r2(schedule, i))
        # ∇_{x_t}⟨sg(u), x̂0⟩: a vector-Jacobian product through the denoiser (per sample: sum over batch).
        g, = torch.autograd.grad((u * x0_phys).sum(), x_t)
        return self.weight(schedule, i) * g


@dataclass(frozen=True)
class DPS:
    """DPS guidance (Chung et al. 2023): −ζ·∇_{x_t}‖y − A x̂0‖₂ (norm, not squared), in [0, 1] units, scaled
    by sqrt(ᾱ_t) as in the Fast Diffusion EM authors' code (the factor is theirs, not DPS's)."""
    zeta: float = 1.0
    needs_grad = True

    def correction(self, x_t, x0_phys, schedule: Schedule, i: int, op, y, eta: float = 1.0) -> torch.Tensor:
        residual = (y - op.A(x0_phys)).flatten(1)
        norm = residual.norm(dim=1).sum()  # per-sample norms; their sum gives per-sample gradients
        g, = torch.autograd.grad(norm, x_t)
        return -self.zeta * math.sqrt(float(schedule.alphas_cumprod[i])) * g


def make_guidance(name: str, **kw):
    """'pigdm' | 'dps' (| 'none') from a config string."""
    name = name.lower()
    if name == "pigdm":
        return PiGDM(**kw)
    if name == "dps":
        return DPS(**kw)
    if name == "none":
        return None
    raise ValueError(f"unknown guidance {name!r} (use 'pigdm', 'dps' or 'none')")

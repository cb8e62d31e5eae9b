"""The EM drivers: Fast Diffusion EM and Diffusion EM (DESIGN §1), plus the divergence guard.

Both receive a ready denoiser, guidance rule, M-step settings, the measurement and a generator; they do
no I/O. `n` particles run as one batch and share one kernel (the M-step averages over them).
`guard.check_step` runs at every step (non-finite values, invalid kernel); judging the final result
(`guard.check_result`) is the caller's, on the cropped image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from diffusion_em.blur import BlurOperator
from diffusion_em.mstep import MStepConfig, dirac_kernel, m_step
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.sampler import sample
from kernel_denoiser.kernels import recenter as recenter_kernel
from util.io import crop


class DivergenceError(RuntimeError):
    """A run went bad (non-finite values, saturated result, data misfit far above the noise)."""


@dataclass
class EMResult:
    x: torch.Tensor                 # (n, C, H, W) particles in [0, 1]
    kernel: torch.Tensor            # (s, s), sums to 1
    nfe: int                        # UNet evaluations
    trace: list = field(default_factory=list)   # per-step dicts: step, t, saturation of x̂0, kernel max

    @property
    def x_mean(self) -> torch.Tensor:
        return self.x.mean(0, keepdim=True)


def saturation(x: torch.Tensor, lo: float = 0.02, hi: float = 0.98) -> float:
    """Fraction of pixels saturated in every channel (white or black), averaged over the batch."""
    return float(((x >= hi).all(1) | (x <= lo).all(1)).float().mean())


@dataclass(frozen=True)
class Guard:
    """Divergence checks. A result fails when its re-blur residual exceeds `max_residual`·σ² + `floor`
    or it has `max_saturation_excess` more fully-saturated pixels than the observation itself."""
    max_residual: float = 25.0
    floor: float = 1e-3
    max_saturation_excess: float = 0.1

    def check_step(self, i: int, t: int, x0: torch.Tensor, kernel: torch.Tensor) -> None:
        if not torch.isfinite(x0).all():
            raise DivergenceError(f"non-finite image estimate at step {i} (t={t})")
        if not torch.isfinite(kernel).all() or abs(float(kernel.sum()) - 1) > 1e-3:
            raise DivergenceError(f"invalid kernel at step {i} (t={t}): sum {float(kernel.sum()):.4g}")

    def check_result(self, res: EMResult, y: torch.Tensor, sigma: float, box: Optional[tuple] = None) -> None:
        """Raise DivergenceError naming the step where the trajectory went bad for good.

        res.x and y on the (padded) domain the EM ran on; `box` = (top, left, h, w) of the data inside it.
        Both checks look at the data only: padding is not data, and re-blurring the cropped image instead
        would wrap a non-periodic photo's borders into each other (a misfit of the check, not of the result).
        """
        op = BlurOperator.from_kernel(res.kernel, tuple(y.shape[-2:]), sigma)
        r, x = op.A(res.x) - y, res.x
        if box is not None:
            r, x, y = crop(r, box), crop(x, box), crop(y, box)
        resid = float((r ** 2).mean())
        sat_excess = saturation(x) - saturation(y.clamp(0, 1))
        bad = []
        if not math.isfinite(resid) or resid > self.max_residual * sigma ** 2 + self.floor:
            bad.append(f"re-blur residual {resid:.3g} vs σ² {sigma ** 2:.3g}")
        if sat_excess > self.max_saturation_excess:
            bad.append(f"{100 * sat_excess:.0f}% more saturated pixels than the input")
        if bad:
            y_sat = saturation(y.clamp(0, 1))
            # x̂0 of the first, pure-noise steps is always clipped: name the start of the final saturated streak
            first = None
            for s in reversed(res.trace):
                if s["saturation"] - y_sat <= self.max_saturation_excess:
                    break
                first = s
            where = f"; x̂0 saturated from step {first['step']} (t={first['t']}) on" if first else ""
            raise DivergenceError("diverged: " + ", ".join(bad) + where)


def _kernel_prior(kernel_denoiser) -> Optional[Callable]:
    if kernel_denoiser is None:
        return None
    return lambda k, s: kernel_denoiser(k, s)


def _trace_entry(i, t, x0, op):
    """What the guard needs to name the step where a run went bad (no extra FFTs in the loop)."""
    return {"step": i, "t": t, "saturation": saturation(x0), "kernel_max": float(op.kernel.max())}


def fast_diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                      generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1,
                      k_init: Optional[torch.Tensor] = None, fixed_kernel: Optional[torch.Tensor] = None,
                      mstep_r2: bool = False, recenter: bool = True, mstep_every: int = 1,
                      guard: Optional[Guard] = Guard(), callback: Optional[Callable] = None,
                      progress: bool = False) -> EMResult:
    """One diffusion run; at every step: x̂0 → M-step on x̂0 → re-centre → guided step with the new kernel.

    y: (1, C, H, W) in [0, 1]. `fixed_kernel` turns the M-step off (then this is the non-blind sampler).
    `mstep_r2` adds ΠGDM's r_t² to the M-step (paper App. D).
    """
    s = mcfg.kernel_size
    k0 = fixed_kernel if fixed_kernel is not None else k_init
    k0 = dirac_kernel(s, y.device, y.dtype) if k0 is None else k0.to(y).reshape(1, 1, *k0.shape[-2:])
    op = BlurOperator.from_kernel(k0, tuple(y.shape[-2:]), sigma)
    prior = _kernel_prior(kernel_denoiser)
    sched = denoiser.schedule
    N = len(sched)
    trace: list = []
    nfe0 = denoiser.nfe

    def update(i, x0, op_):
        t = int(sched.timesteps[i])
        if fixed_kernel is None and (N - 1 - i) % mstep_every == 0:
            r2 = guidance.r2(sched, i) if (mstep_r2 and hasattr(guidance, "r2")) else None
            k = m_step(y, x0, op_.kernel, sigma, mcfg, prior, r2=r2)
            op_ = op_.with_kernel(recenter_kernel(k) if recenter else k)
        if guard is not None:
            guard.check_step(i, t, x0, op_.kernel)
        trace.append(_trace_entry(i, t, x0, op_))
        return op_

    x, op = sample(denoiser, (n_particles,) + tuple(y.shape[1:]), generator, y.device, guidance=guidance,
                   op=op, y=y, update_operator=update, callback=callback, progress=progress)
    return EMResult(x=x, kernel=op.kernel[0, 0], nfe=denoiser.nfe - nfe0, trace=trace)


def diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                 generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1, rounds: int = 10,
                 k_init: Optional[torch.Tensor] = None, recenter: bool = True, guard: Optional[Guard] = Guard(),
                 callback: Optional[Callable] = None, progress: bool = False) -> EMResult:
    """L rounds of {full guided sampling from fresh noise with the current kernel; M-step on the samples}."""
    s = mcfg.kernel_size
    k = dirac_kernel(s, y.device, y.dtype) if k_init is None else k_init.to(y).reshape(1, 1, s, s)
    prior = _kernel_prior(kernel_denoiser)
    trace: list = []
    nfe0 = denoiser.nfe
    x = None
    for l in range(rounds):
        op = BlurOperator.from_kernel(k, tuple(y.shape[-2:]), sigma)
        x, _ = sample(denoiser, (n_particles,) + tuple(y.shape[1:]), generator, y.device, guidance=guidance,
                      op=op, y=y, callback=None if callback is None else (lambda i, xt, x0, o, l=l: callback(i, xt, x0, o, l)),
                      progress=progress)
        if guard is not None:
            guard.check_step(0, l, x, op.kernel)
        trace.append({**_trace_entry(l, 0, x, op), "round": l})
        k = m_step(y, x, k, sigma, mcfg, prior)
        k = recenter_kernel(k) if recenter else k
    return EMResult(x=x, kernel=k[0, 0], nfe=denoiser.nfe - nfe0, trace=trace)

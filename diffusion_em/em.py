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
from diffusion_em.boundary import data_mask, fill_padding, frame_mean
from diffusion_em.mstep import MStepConfig, m_step, m_step_coarse
from util.geometry import crop, dirac
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.sampler import (branch, branch_start, ddpm_step, ddpm_update, final_image, initial_noise,
                                      needs_grad, predict_x0, step_indices)
from util.errors import ProjectError
from util.geometry import recenter as recenter_kernel


OUTPUTS = ("sample", "mean")


class DivergenceError(ProjectError, RuntimeError):
    """A run went bad (non-finite values, saturated result, data misfit far above the noise)."""


@dataclass
class EMResult:
    x: torch.Tensor                 # (n, C, H, W) particles in [0, 1]
    kernel: torch.Tensor            # (s, s), sums to 1
    nfe: int                        # UNet evaluations
    trace: list = field(default_factory=list)   # per-step dicts: where, i, t, saturation of x̂0, kernel max

    @property
    def x_mean(self) -> torch.Tensor:
        return self.x.mean(0, keepdim=True)

    def image(self, output: str = "sample") -> torch.Tensor:
        """The result (1, C, H, W): 'sample' = the first particle, a posterior sample (the paper's output);
        'mean' = the particle average, an estimate of the posterior mean (lower squared error)."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        return self.x[:1] if output == "sample" else self.x_mean


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

    def check_step(self, where: str, x0: torch.Tensor, kernel: torch.Tensor) -> None:
        """Raise DivergenceError when x̂0 or the kernel stopped being valid at `where` (e.g. 'step 3/100 (t=979)')."""
        if not torch.isfinite(x0).all():
            raise DivergenceError(f"non-finite image estimate at {where}")
        if not torch.isfinite(kernel).all() or abs(float(kernel.sum()) - 1) > 1e-3:
            raise DivergenceError(f"invalid kernel at {where}: sum {float(kernel.sum()):.4g}")

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
            where = f"; x̂0 saturated from {first['where']} on" if first else ""
            raise DivergenceError("diverged: " + ", ".join(bad) + where)


def _where(n: int, N: int, t: int, round_: Optional[int] = None, rounds: Optional[int] = None) -> str:
    """Human step label, counted forwards: 'step 3/100 (t=979)', or 'round 2/10, step 3/100 (t=979)'."""
    step = f"step {n}/{N} (t={t})"
    return step if round_ is None else f"round {round_ + 1}/{rounds}, {step}"


def _record(where: str, i: int, t: int, x0: torch.Tensor, kernel: torch.Tensor) -> dict:
    """What the guard needs to name the step where a run went bad (no extra FFTs in the loop)."""
    return {"where": where, "i": i, "t": t, "saturation": saturation(x0), "kernel_max": float(kernel.max())}


def _initial_kernel(s: int, y: torch.Tensor, k: Optional[torch.Tensor]) -> torch.Tensor:
    return dirac(s, y.device, y.dtype) if k is None else k.to(y).reshape(1, 1, s, s)


def fast_diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                      kernel_size: int, generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1,
                      k_init: Optional[torch.Tensor] = None, fixed_kernel: Optional[torch.Tensor] = None,
                      guard: Optional[Guard] = Guard(), callback: Optional[Callable[[dict], None]] = None,
                      progress: bool = False, data_box: Optional[tuple] = None, eta: float = 1.0,
                      branch_fraction: float = 1.0) -> EMResult:
    """One diffusion run; at every step: x̂0 → M-step on x̂0 → re-centre → guided step with the new kernel.

    y: (1, C, H, W) in [0, 1]. `fixed_kernel` turns the M-step off (then this is the non-blind sampler).
    `mcfg.pigdm_r2` adds ΠGDM's r_t² of the step to the M-step (paper App. D). `callback(info)` after each
    step gets {"i", "t", "x" (x_{t-1}), "x0", "kernel"}. `data_box` (top, left, h, w): y is observed there
    only; the padding around it is filled with the current prediction k ⊛ x̂0 (diffusion_em/boundary.py).
    `eta` < 1: DDIM steps (Schedule.step_coefs); the particles share one trajectory until the last
    `branch_fraction` of the steps (sampler.branch_start). `mcfg.coarse`: the first steps' M-steps run at
    half resolution (mstep.m_step_coarse).
    """
    if mcfg.pigdm_r2 and not hasattr(guidance, "r2"):
        raise ValueError("mstep.pigdm_r2 needs ΠGDM guidance (it adds ΠGDM's r_t² to the M-step)")
    k0 = fixed_kernel if fixed_kernel is not None else k_init
    op = BlurOperator.from_kernel(_initial_kernel(kernel_size, y, k0), tuple(y.shape[-2:]), sigma)
    sched = denoiser.schedule
    N = len(sched)
    trace, nfe = [], 0
    mask = data_mask(tuple(y.shape[-2:]), data_box, y.device, y.dtype)
    start = branch_start(N, branch_fraction)
    x = initial_noise(n_particles, y.shape[1:], start, generator, y.device)
    for n, i in enumerate(step_indices(N, progress)):
        x = branch(x, n_particles) if n == start else x
        pred = predict_x0(denoiser, x, i, needs_grad(guidance))
        nfe += 1
        x0 = pred.x0.detach()
        if fixed_kernel is None and n % mcfg.every == 0:  # the M-step, on this step's x̂0
            r2 = guidance.r2(sched, i) if mcfg.pigdm_r2 else None
            y_m = y if mask is None else fill_padding(y, mask, op.A(x0))
            update = m_step_coarse if n < round(mcfg.coarse * N) else m_step  # coarse-to-fine kernels
            k = update(y_m, x0, op.kernel, sigma, mcfg, kernel_denoiser, r2=r2)
            op = op.with_kernel(recenter_kernel(k) if mcfg.recenter else k)
        t = int(sched.timesteps[i])
        trace.append(_record(_where(n + 1, N, t), i, t, x0, op.kernel))
        if guard is not None:
            guard.check_step(trace[-1]["where"], x0, op.kernel)
        y_g = y if mask is None else fill_padding(y, mask, op.A(x0))
        x = ddpm_update(denoiser, pred, i, generator, guidance, op, y_g, eta)  # guided by the new kernel
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0, "kernel": op.kernel})
    return EMResult(x=final_image(denoiser, x), kernel=op.kernel[0, 0], nfe=nfe, trace=trace)


def diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                 kernel_size: int, generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1,
                 rounds: int = 10, k_init: Optional[torch.Tensor] = None, guard: Optional[Guard] = Guard(),
                 callback: Optional[Callable[[dict], None]] = None, progress: bool = False,
                 data_box: Optional[tuple] = None, eta: float = 1.0, branch_fraction: float = 1.0) -> EMResult:
    """L rounds of {full guided sampling from fresh noise with the current kernel; M-step on the samples}.

    `callback(info)` gets the Fast-EM keys plus "round" (0-based). `data_box` as in Fast EM; the guidance
    fills the padding with the previous step's prediction (each step returns its x̂0 after the update).
    `eta`, `branch_fraction` as in Fast EM.
    """
    if mcfg.pigdm_r2:
        raise ValueError("mstep.pigdm_r2 applies to Fast EM only: Diffusion EM's M-step sees finished samples")
    k = _initial_kernel(kernel_size, y, k_init)
    sched = denoiser.schedule
    N = len(sched)
    trace, nfe = [], 0
    start = branch_start(N, branch_fraction)
    x = None
    mask = data_mask(tuple(y.shape[-2:]), data_box, y.device, y.dtype)
    for l in range(rounds):
        op = BlurOperator.from_kernel(k, tuple(y.shape[-2:]), sigma)
        x = initial_noise(n_particles, y.shape[1:], start, generator, y.device)
        y_g = y if mask is None else fill_padding(y, mask, frame_mean(y, mask))  # no x̂0 yet
        for n, i in enumerate(step_indices(N, progress)):
            x = branch(x, n_particles) if n == start else x
            x, x0 = ddpm_step(denoiser, x, i, generator, guidance, op, y_g, eta)
            y_g = y if mask is None else fill_padding(y, mask, op.A(x0))
            nfe += 1
            t = int(sched.timesteps[i])
            trace.append(_record(_where(n + 1, N, t, l, rounds), i, t, x0, op.kernel))
            if guard is not None:
                guard.check_step(trace[-1]["where"], x0, op.kernel)
            if callback is not None:
                callback({"round": l, "i": i, "t": t, "x": x, "x0": x0, "kernel": op.kernel})
        x = final_image(denoiser, x)
        y_m = y if mask is None else fill_padding(y, mask, op.A(x))
        k = m_step(y_m, x, k, sigma, mcfg, kernel_denoiser)  # the M-step, on this round's samples
        k = recenter_kernel(k) if mcfg.recenter else k
    return EMResult(x=x, kernel=k[0, 0], nfe=nfe, trace=trace)

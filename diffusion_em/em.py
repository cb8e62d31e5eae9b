"""The EM drivers: Fast Diffusion EM and Diffusion EM (docs/algorithm.md §1), plus the divergence guard.

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
from guided_diffusion.sampler import (branch, branch_start, ddpm_step, ddpm_update, final_image, gaussian,
                                      keeps_graph, predict_x0, step_indices)
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
    reblur_mse: Optional[float] = None  # mean (k⊛x − y)² over the observed frame (set by the runner's guard)
    classical: Optional[torch.Tensor] = None  # (1, C, H, W) classical deconvolution with `kernel` (restore.py)
    anchored: Optional[torch.Tensor] = None   # (1, C, H, W) the `anchored_output` image fitted to the data (restore.py)
    anchored_output: str = ""       # which image ('sample' | 'mean') `anchored` was computed from
    fallback: str = ""              # why the diffusion result was replaced by the classical one ('': it was not)

    @property
    def x_mean(self) -> torch.Tensor:
        return self.x.mean(0, keepdim=True)

    def image(self, output: str = "sample", blend: float = 0.0, anchor: bool = False) -> torch.Tensor:
        """The result (1, C, H, W): 'sample' = the first particle, a posterior sample (the paper's output);
        'mean' = the particle average, an estimate of the posterior mean (lower squared error). anchor: that image
        fitted to the data (`anchored`, config key `classical_anchor`). blend = w > 0: (1 − w)·that + w·`classical`,
        the classical deconvolution of y with the same kernel (config key `classical_blend`; docs/choices.md "Blending with
        a classical deconvolution")."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        x = self.x[:1] if output == "sample" else self.x_mean
        if anchor:
            if self.anchored is None or self.anchored_output != output:
                raise ValueError(f"anchor needs the {output!r} image fitted to the data (restore computes it when the "
                                 f"config's classical_anchor applies and its output is {output!r})")
            x = self.anchored.to(x)
        if blend == 0:
            return x
        if self.classical is None:
            raise ValueError("blend > 0 needs the classical deconvolution (restore computes it when the config's "
                             "classical_blend > 0)")
        return (1 - blend) * x + blend * self.classical.to(x)


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

    def check_result(self, res: EMResult, y: torch.Tensor, sigma: float, box: Optional[tuple] = None) -> float:
        """Raise DivergenceError naming the step where the trajectory went bad for good; else return the
        mean squared re-blur residual it judged.

        res.x and y on the (padded) domain the EM ran on; `box` = (top, left, h, w) of the data inside it.
        Both checks look at the data only: padding is not data, and re-blurring the cropped image instead
        would wrap a non-periodic photo's borders into each other (a misfit of the check, not of the result).
        """
        resid = reblur_mse(res.x, res.kernel, y, box)
        x = res.x
        if box is not None:
            x, y = crop(x, box), crop(y, box)
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
        return resid


def reblur_mse(x: torch.Tensor, kernel: torch.Tensor, y: torch.Tensor, box: Optional[tuple] = None) -> float:
    """Mean (k⊛x − y)² (circular, on the domain x and y share) over the data `box` (top, left, h, w) or all."""
    r = BlurOperator.from_kernel(kernel, tuple(y.shape[-2:]), 0.0).A(x) - y
    return float((crop(r, box) if box is not None else r).pow(2).mean())


def _where(n: int, N: int, t: int, round_: Optional[int] = None, rounds: Optional[int] = None) -> str:
    """Human step label, counted forwards: 'step 3/100 (t=979)', or 'round 2/10, step 3/100 (t=979)'."""
    step = f"step {n}/{N} (t={t})"
    return step if round_ is None else f"round {round_ + 1}/{rounds}, {step}"


def _record(where: str, i: int, t: int, x0: torch.Tensor, kernel: torch.Tensor) -> dict:
    """What the guard needs to name the step where a run went bad (no extra FFTs in the loop)."""
    return {"where": where, "i": i, "t": t, "saturation": saturation(x0), "kernel_max": float(kernel.max())}


def _initial_kernel(s: int, y: torch.Tensor, k: Optional[torch.Tensor]) -> torch.Tensor:
    return dirac(s, y.device, y.dtype) if k is None else k.to(y).reshape(1, 1, s, s)


@dataclass(frozen=True)
class StackedOperator:
    """Several images' blur operators side by side in one batch: image b owns rows [b·n, (b+1)·n) (its n
    particles) and is handled by its own operator (kernel, σ), exactly as when it runs alone.

    Guidance receives y with the same rows (each image's observation repeated per particle)."""
    ops: tuple
    n: int = 1

    def _rows(self, b: int) -> slice:
        return slice(b * self.n, (b + 1) * self.n)

    @property
    def kernel(self) -> torch.Tensor:
        return torch.cat([op.kernel for op in self.ops])

    def A(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([op.A(x[self._rows(b)]) for b, op in enumerate(self.ops)])

    def pigdm_solve(self, y: torch.Tensor, x0: torch.Tensor, r2) -> torch.Tensor:
        rows = [self._rows(b) for b in range(len(self.ops))]
        return torch.cat([op.pigdm_solve(y[r][:1], x0[r], r2) for op, r in zip(self.ops, rows)])

    def row(self, r: int):
        """The operator of batch row r (its image's)."""
        return self.ops[r // self.n]


def fast_diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                      kernel_size: int, generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1,
                      k_init: Optional[torch.Tensor] = None, fixed_kernel: Optional[torch.Tensor] = None,
                      guard: Optional[Guard] = Guard(), callback: Optional[Callable[[dict], None]] = None,
                      progress: bool = False, data_box: Optional[tuple] = None, eta: float = 1.0,
                      branch_fraction: float = 1.0, support: Optional[torch.Tensor] = None,
                      low_memory: bool = False) -> EMResult:
    """One diffusion run; at every step: x̂0 → M-step on x̂0 → re-centre → guided step with the new kernel.

    y: (1, C, H, W) in [0, 1]. `fixed_kernel` turns the M-step off (then this is the non-blind sampler).
    `mcfg.pigdm_r2` adds ΠGDM's r_t² of the step to the M-step (paper App. D). `callback(info)` after each
    step gets {"i", "t", "x" (x_{t-1}), "x0", "kernel"}. `data_box` (top, left, h, w): y is observed there
    only; the padding around it is filled with the current prediction k ⊛ x̂0 (diffusion_em/boundary.py).
    `eta` < 1: DDIM steps (Schedule.step_coefs); the particles share one trajectory until the last
    `branch_fraction` of the steps (sampler.branch_start). `mcfg.coarse`: the first steps' M-steps run at
    half resolution (mstep.m_step_coarse). `support` (bool s×s): the full-resolution M-step's kernel stays
    inside it (mstep.support_box). `low_memory`: x̂0 of all particles without the UNet's graph (for the M-step),
    then each particle's pass again with its graph for its guidance (sampler.guidance_correction): the same
    result with one particle's activations in memory, for one more forward pass a particle and step.
    Raises DivergenceError when the guard fails.
    """
    res = fast_diffusion_em_batch(denoiser, [y], [sigma], guidance, mcfg, kernel_size, [generator], kernel_denoiser,
                                  n_particles, [k_init], [fixed_kernel], guard, [callback], progress, [data_box],
                                  eta, branch_fraction, [support], low_memory)[0]
    if isinstance(res, DivergenceError):
        raise res
    return res


def fast_diffusion_em_batch(denoiser: EpsDenoiser, ys: list, sigmas: list, guidance, mcfg: MStepConfig,
                            kernel_size: int, generators: list, kernel_denoiser=None, n_particles: int = 1,
                            k_inits: Optional[list] = None, fixed_kernels: Optional[list] = None,
                            guard: Optional[Guard] = Guard(), callbacks: Optional[list] = None,
                            progress: bool = False, data_boxes: Optional[list] = None, eta: float = 1.0,
                            branch_fraction: float = 1.0, supports: Optional[list] = None,
                            low_memory: bool = False) -> list:
    """Fast EM on B images of one size in one UNet batch, each with its own kernel, σ, M-step and generator.

    Equals B separate `fast_diffusion_em` runs (same generators): only the UNet evaluation is shared.
    ys: B tensors (1, C, H, W); k_inits / fixed_kernels / callbacks / data_boxes / supports: None or B entries
    (each may be None). `low_memory` as in `fast_diffusion_em` (one row's graph at a time).
    Returns B entries: an EMResult, or the DivergenceError that stopped that image (the others go on).
    """
    if mcfg.pigdm_r2 and not hasattr(guidance, "r2"):
        raise ValueError("mstep.pigdm_r2 needs ΠGDM guidance (it adds ΠGDM's r_t² to the M-step)")
    B = len(ys)
    if len({tuple(y.shape) for y in ys}) != 1 or ys[0].shape[0] != 1:
        raise ValueError(f"a batch needs images (1, C, H, W) of one size, got {[tuple(y.shape) for y in ys]}")
    k_inits, fixed_kernels = k_inits or [None] * B, fixed_kernels or [None] * B
    callbacks, supports = callbacks or [None] * B, supports or [None] * B
    shape = tuple(ys[0].shape[-2:])
    masks = [data_mask(shape, box, ys[0].device, ys[0].dtype) for box in (data_boxes or [None] * B)]
    ops = [BlurOperator.from_kernel(_initial_kernel(kernel_size, y, f if f is not None else k0), shape, s)
           for y, s, k0, f in zip(ys, sigmas, k_inits, fixed_kernels)]
    sched = denoiser.schedule
    N = len(sched)
    traces, out = [[] for _ in range(B)], [None] * B
    live = list(range(B))  # images still running; a diverged one leaves the batch
    start = branch_start(N, branch_fraction)
    p = n_particles if start == 0 else 1  # rows per image: one shared trajectory until the particles branch
    x = gaussian((B * p,) + tuple(ys[0].shape[1:]), generators, ys[0].device)
    def observed(b, x0_b):  # y on the frame, k ⊛ x̂0 on the padding around it (none for circular data)
        return ys[b] if masks[b] is None else fill_padding(ys[b], masks[b], ops[b].A(x0_b))

    for n, i in enumerate(step_indices(N, progress)):
        if n == start and p != n_particles:
            x, p = branch(x, n_particles), n_particles
        pred = predict_x0(denoiser, x, i, keeps_graph(guidance, x, low_memory))
        x0 = pred.x0.detach()
        t = int(sched.timesteps[i])
        rows = [slice(j * p, (j + 1) * p) for j in range(len(live))]
        keep = []
        for j, b in enumerate(live):
            if fixed_kernels[b] is None and n % mcfg.every == 0 and n >= round(mcfg.start * N):  # the M-step
                r2 = guidance.r2(sched, i) if mcfg.pigdm_r2 else None
                if n < round(mcfg.coarse * N):  # coarse-to-fine kernels (no support box at half resolution)
                    k = m_step_coarse(observed(b, x0[rows[j]]), x0[rows[j]], ops[b].kernel, sigmas[b], mcfg,
                                      kernel_denoiser, r2=r2)
                else:
                    k = m_step(observed(b, x0[rows[j]]), x0[rows[j]], ops[b].kernel, sigmas[b], mcfg, kernel_denoiser,
                               r2=r2, support=supports[b])
                ops[b] = ops[b].with_kernel(recenter_kernel(k, mcfg.recenter_shift) if mcfg.recenter else k)
            traces[b].append(_record(_where(n + 1, N, t), i, t, x0[rows[j]], ops[b].kernel))
            try:
                if guard is not None:
                    guard.check_step(traces[b][-1]["where"], x0[rows[j]], ops[b].kernel)
                keep.append(j)
            except DivergenceError as e:
                out[b] = e
        if not keep:
            live = []
            break
        op = StackedOperator(tuple(ops[b] for b in live), p)
        y_rows = torch.cat([observed(b, x0[rows[j]]) for j, b in enumerate(live)]).repeat_interleave(p, 0)
        x = ddpm_update(denoiser, pred, i, [generators[b] for b in live], guidance, op, y_rows, eta)
        for j in keep:
            if callbacks[live[j]] is not None:
                callbacks[live[j]]({"i": i, "t": t, "x": x[rows[j]], "x0": x0[rows[j]], "kernel": ops[live[j]].kernel})
        if len(keep) < len(live):  # a diverged image leaves the batch (samples never mix: the rest is unchanged)
            x = torch.cat([x[rows[j]] for j in keep])
            live = [live[j] for j in keep]
    if live:
        x = final_image(denoiser, x)
        for j, b in enumerate(live):
            out[b] = EMResult(x=x[j * n_particles:(j + 1) * n_particles], kernel=ops[b].kernel[0, 0], nfe=N,
                              trace=traces[b])
    return out


def diffusion_em(denoiser: EpsDenoiser, y: torch.Tensor, sigma: float, guidance, mcfg: MStepConfig,
                 kernel_size: int, generator: torch.Generator, kernel_denoiser=None, n_particles: int = 1,
                 rounds: int = 10, k_init: Optional[torch.Tensor] = None, guard: Optional[Guard] = Guard(),
                 callback: Optional[Callable[[dict], None]] = None, progress: bool = False,
                 data_box: Optional[tuple] = None, eta: float = 1.0, branch_fraction: float = 1.0,
                 support: Optional[torch.Tensor] = None, low_memory: bool = False) -> EMResult:
    """L rounds of {full guided sampling from fresh noise with the current kernel; M-step on the samples}.

    `callback(info)` gets the Fast-EM keys plus "round" (0-based). `data_box` as in Fast EM; the guidance
    fills the padding with the previous step's prediction (each step returns its x̂0 after the update).
    `eta`, `branch_fraction`, `support`, `low_memory` as in Fast EM.
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
        x = torch.randn(((n_particles if start == 0 else 1),) + tuple(y.shape[1:]), generator=generator, device=y.device)
        y_g = y if mask is None else fill_padding(y, mask, frame_mean(y, mask))  # no x̂0 yet
        for n, i in enumerate(step_indices(N, progress)):
            x = branch(x, n_particles) if n == start and start > 0 else x
            x, x0 = ddpm_step(denoiser, x, i, generator, guidance, op, y_g, eta, low_memory)
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
        k = m_step(y_m, x, k, sigma, mcfg, kernel_denoiser, support=support)  # the M-step, on this round's samples
        k = recenter_kernel(k, mcfg.recenter_shift) if mcfg.recenter else k
    return EMResult(x=x, kernel=k[0, 0], nfe=nfe, trace=trace)

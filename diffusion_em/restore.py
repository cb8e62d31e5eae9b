"""Deblurring one observation with ready models: the algorithm side of the runner (no files, no argparse).

`load_restorer` builds the models from the three configs; `restore` pads one observation for the boundary
model and the UNet, runs the configured EM driver and crops back; `restore_with_retries` redraws the noise
when the divergence guard fails a run, and `classical_fallback` restores an image classically when every run
failed (`on_divergence: classical`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch

from diffusion_em.blur import BlurOperator
from diffusion_em.config import DiffusionConfig, KernelConfig
from diffusion_em.em import (DivergenceError, EMResult, Guard, diffusion_em, fast_diffusion_em, fast_diffusion_em_batch,
                             reblur_mse)
from diffusion_em.mstep import support_box
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import make_guidance
from guided_diffusion.model_config import ModelConfig, build_unet
from guided_diffusion.schedule import Schedule
from guided_diffusion.unet import load_weights
from kernel_denoiser.network import load_kernel_denoiser
from classical.blind_l0 import estimate_kernel
from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda
from util.config import ConfigError
from util.errors import InputError
from util.geometry import crop, pad_centred, pad_for_boundary, pad_to_multiple

ROOT = Path(__file__).resolve().parents[1]
# σ below this runs at this value: ΠGDM's solve divides by r²|K|² + σ², which is 0 at the last step when σ = 0
# (NaN). 1e-3 ≈ 0.26/255, the quantisation noise of 8-bit images: a noiseless input is never cleaner than that.
SIGMA_FLOOR = 1e-3
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def repo_path(p: Optional[str]) -> Optional[str]:
    """Paths in configs are relative to the repository root unless absolute or present from the cwd."""
    if p is None or os.path.isabs(p) or os.path.exists(p):
        return p
    return str(ROOT / p)


@dataclass(frozen=True)
class Restorer:
    """Ready models and settings for deblurring observations one at a time."""
    denoiser: EpsDenoiser
    guidance: object
    kernel_denoiser: Optional[torch.nn.Module]
    dcfg: DiffusionConfig
    kernel_size: int
    device: torch.device
    guard: Guard
    schedule_kind: str = "linear"  # the β schedule of the weights (respacing for `kernel_pass_steps`)
    precision: str = "fp32"        # the UNet's autocast as run (`precision: auto` resolved for this device)

    def kernel_pass_denoiser(self) -> EpsDenoiser:
        """The denoiser of `final_pass`'s kernel-finding run: the same UNet, `kernel_pass_steps` steps."""
        n = self.dcfg.kernel_pass_steps
        return self.denoiser if n is None else self.denoiser.respaced(Schedule.create(n, self.schedule_kind))


def load_restorer(dcfg: DiffusionConfig, kcfg: KernelConfig, model_cfg: ModelConfig, device: torch.device,
                  model_config_name: str = "model config") -> Restorer:
    """Load the UNet and the kernel denoiser (strict, weights_only) and assemble the sampler's pieces."""
    if not model_cfg.model_path:
        raise ConfigError(f"{model_config_name}: missing key 'model_path'")
    model = load_weights(build_unet(model_cfg), repo_path(model_cfg.model_path)).to(device)
    sched = Schedule.create(dcfg.steps, model_cfg.schedule)  # the schedule the weights were trained with
    precision = resolve_precision(dcfg.precision, device)
    denoiser = EpsDenoiser(model, sched, clip=dcfg.clip_denoised, autocast_dtype=AUTOCAST[precision],
                           channels_last=prefers_channels_last(model_cfg, device, precision),
                           max_batch=1 if device.type == "cpu" else None,  # CPU: a batch costs more than its rows alone
                           compile_backend="inductor" if dcfg.compile else None)
    kd = None
    if kcfg.denoiser_path is not None:
        kd = load_kernel_denoiser(repo_path(kcfg.denoiser_path), device=device)
    guard = Guard(max_residual=dcfg.guard_residual, max_saturation_excess=dcfg.guard_saturation)
    return Restorer(denoiser=denoiser, guidance=guidance_for(dcfg), kernel_denoiser=kd,
                    dcfg=dcfg, kernel_size=kcfg.kernel_size, device=device, guard=guard,
                    schedule_kind=model_cfg.schedule, precision=precision)


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX); without them bf16 is emulated."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own checks (CPUID)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The config's `precision` for this device. 'auto' (the default config's) is bf16 on a CPU with BF16 units:
    there the default's synth24 results moved +0.01 dB (s.e. 0.02, largest case 0.26 dB) against fp32 at 0.6x
    the time (docs/speed.md, "Channels-last bf16 and page faults"). Elsewhere it is fp32: on GPUs bf16 against fp32 is not yet measured, CPUs
    without BF16 units emulate it, and ARM CPUs' BF16 is not detected."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_bf16_units() else "fp32"


def prefers_channels_last(model_cfg: ModelConfig, device: torch.device, precision: str = "fp32") -> bool:
    """NHWC convolutions: always on GPUs; on CPUs (one image per UNet call) for wide nets (at 256², −7 % on the
    FFHQ net, 128 channels) and in bf16 (where NCHW pays oneDNN's layout reorders around every convolution and
    GroupNorm runs through guided_diffusion/nhwc_norm.py); not for the bundled prior (32 channels) in fp32,
    +12 % (1 thread) to +14 % (2 threads). docs/speed.md."""
    return device.type != "cpu" or model_cfg.num_channels >= 64 or precision == "bf16"


def guidance_for(dcfg: DiffusionConfig, true_kernel: bool = False):
    """The guidance rule a diffusion config names, with its weight and options; with a known kernel
    (`true_kernel`) its weight is `zeta_true_kernel` where set (docs/choices.md "Guidance weight with a known kernel")."""
    extra = {"jacobian": dcfg.pigdm_jacobian} if dcfg.guidance == "pigdm" else {}
    zeta = dcfg.zeta_true_kernel if true_kernel and dcfg.zeta_true_kernel is not None else dcfg.zeta
    return make_guidance(dcfg.guidance, zeta=zeta, **extra)


def _guidance(r: Restorer, true_kernel: bool):
    return guidance_for(r.dcfg, true_kernel=True) if true_kernel else r.guidance


def boundary_mode(setting: str, kind: str, declared: Optional[str] = None) -> str:
    """The boundary model of one input: a forced `setting`, else (`auto`) what the data declares — periodic
    only when meta.csv says `circular` (or for the authors' pickles, made circularly); anything undeclared
    may be a real capture (valid blur) and gets the tapered non-periodic padding."""
    if setting != "auto":
        return setting
    return "circular" if declared == "circular" or kind == "pickle" else "taper"


def _prepare(y: torch.Tensor, mode: str, pad: int, multiple: int):
    """Pad for the boundary model and for the UNet; return the padded y and the crop box back."""
    box0 = (0, 0) + tuple(y.shape[-2:])
    if mode != "circular":
        y, box0 = pad_for_boundary(y, pad, mode)
    y, _ = pad_to_multiple(y, multiple, "circular" if mode == "circular" else "reflect")  # bottom/right: box0 still crops
    return y, box0


def _prepared(r: Restorer, y: torch.Tensor, mode: str):
    """`_prepare` with the restorer's kernel size and UNet multiple; refuses an image smaller than the kernel."""
    yp, box = _prepare(y, mode, r.kernel_size, r.denoiser.model.size_multiple)
    if min(yp.shape[-2:]) < r.kernel_size:
        raise InputError(f"image {tuple(y.shape[-2:])} is smaller than the kernel {r.kernel_size}x{r.kernel_size}")
    return yp, box


def start_kernels(r: Restorer, y: torch.Tensor, boundary: str = "circular",
                  k_true: Optional[torch.Tensor] = None) -> Start:
    """The Start of one observation, as `restore` would compute it (the ℓ0 estimate takes seconds: a retry
    after a divergence reuses it)."""
    yp, box = _prepared(r, y, boundary)
    return kernels_for(kernel_source(r.dcfg.kernel, boundary), yp, r.kernel_size, box, k_true)


def fit_kernel(k: torch.Tensor, s: int) -> torch.Tensor:
    """A kernel zero-padded or cropped, centred, to s×s and renormalised (the oracle run's fixed kernel)."""
    out = pad_centred(k, s)
    return out / out.sum()


def kernel_source(setting: str, boundary: str) -> str:
    """How one image's kernel is found (config key `kernel`): 'auto' is the classical ℓ0 kernel, held fixed,
    on photos (any non-periodic boundary) and the paper's M-step from a Dirac, confined to the ℓ0 kernel's
    size box ('l0_box'), on periodic (synthetic) sets. Measured (docs/choices.md "Where the kernel comes from"): on
    real camera-shake captures the M-step's trajectory drifts to thick kernels that the ℓ0 estimate avoids;
    on circular synthetic sets the M-step's kernels are the better ones, and the box stops small kernels
    growing into strokes (synth24: +0.4 dB, 3 cases below the blurry input instead of 4)."""
    if setting != "auto":
        return setting
    return "l0_box" if boundary == "circular" else "l0"


def l0_kernel(y: torch.Tensor, s: int, box: Optional[tuple] = None) -> torch.Tensor:
    """The classical ℓ0 blind estimate (s×s) of a padded observation y (1, C, H, W), fitted on its data `box`
    (top, left, h, w) only, with the classical method's default settings (classical.blind_l0)."""
    return estimate_kernel(y[0].clamp(0, 1).to(torch.float64), s, box=box).to(y.dtype)


class Start(NamedTuple):
    """How the EM drivers start one image's kernel: from k_init (None: a Dirac), or held at fixed_kernel; the
    M-step's kernel confined to support (None: anywhere); l0: the ℓ0 kernel when it was computed (kept for
    `classical_fallback`)."""
    k_init: Optional[torch.Tensor] = None
    fixed_kernel: Optional[torch.Tensor] = None
    support: Optional[torch.Tensor] = None
    l0: Optional[torch.Tensor] = None


def kernels_for(source: str, y: torch.Tensor, s: int, box: Optional[tuple], k_true: Optional[torch.Tensor]) -> Start:
    """The Start for a kernel source: the oracle's true kernel, the ℓ0 kernel (as start, fixed kernel or
    size box), or a Dirac."""
    if k_true is not None:
        return Start(fixed_kernel=fit_kernel(k_true.to(y), s))
    if source == "em":
        return Start()
    k = l0_kernel(y, s, box)
    if source == "l0":
        return Start(fixed_kernel=k, l0=k)
    return Start(k_init=k, l0=k) if source == "l0_em" else Start(support=support_box(k), l0=k)


def restore(r: Restorer, y: torch.Tensor, sigma: float, generator: torch.Generator, *, boundary: str = "circular",
            k_true: Optional[torch.Tensor] = None, callback: Optional[Callable[[dict], None]] = None,
            start: Optional[Start] = None, low_memory: bool = False) -> EMResult:
    """Deblur one observation (1, C, H, W) in [0, 1] on r.device: pad, run the configured EM, crop back.

    σ below SIGMA_FLOOR runs at the floor. boundary: 'circular' | 'reflect' | 'taper' | 'replicate' (see
    `boundary_mode`); k_true: the oracle kernel
    (M-step off, the non-blind bound); callback: per-step dict (see the drivers); start: a `Start` from
    `start_kernels`, else computed here. With `final_pass` (and a kernel to find) the Fast EM run only finds
    the kernel and a second run with it fixed makes the image. `low_memory`: the drivers' low-memory mode (one
    particle's UNet graph at a time; the same result, slower; run.py chooses it from the memory budget). Raises DivergenceError when
    the guard fails the result (judged on the data region: padding is not data).
    """
    d, s = r.dcfg, r.kernel_size
    sigma = max(float(sigma), SIGMA_FLOOR)
    yp, box = _prepared(r, y, boundary)
    st = start if start is not None else kernels_for(kernel_source(d.kernel, boundary), yp, s, box, k_true)
    if d.method == "fast_em":
        def run(den: EpsDenoiser, n: int, st: Start) -> EMResult:
            return fast_diffusion_em(den, yp, sigma, _guidance(r, k_true is not None), d.mstep, s, generator,
                                     r.kernel_denoiser, n_particles=n, fixed_kernel=st.fixed_kernel,
                                     k_init=st.k_init, guard=r.guard, callback=callback, progress=True,
                                     data_box=box, eta=d.eta, branch_fraction=d.branch_fraction, support=st.support,
                                     low_memory=low_memory)

        first = None
        if d.final_pass and st.fixed_kernel is None:  # the kernel-finding run; its image is not kept
            first = run(r.kernel_pass_denoiser(), d.kernel_pass_particles or d.n_particles, st)
            st = Start(fixed_kernel=first.kernel)
        res = _after(first, run(r.denoiser, d.n_particles, st))
    else:
        if k_true is not None:
            raise InputError("the oracle kernel (--true_kernel) is a Fast EM option: Diffusion EM would still "
                             "re-estimate it")
        res = diffusion_em(r.denoiser, yp, sigma, r.guidance, d.mstep, s, generator, r.kernel_denoiser,
                           n_particles=d.n_particles, rounds=d.em_rounds, k_init=st.k_init, guard=r.guard,
                           callback=callback, progress=True, data_box=box, eta=d.eta,
                           branch_fraction=d.branch_fraction, support=st.support, low_memory=low_memory)
    res = _judged(r, res, yp, box, sigma, known_kernel=k_true is not None)
    if isinstance(res, DivergenceError):
        raise res
    return res


def restore_batch(r: Restorer, ys: list, sigmas: list, generators: list, boundaries: list,
                  k_trues: Optional[list] = None, callbacks: Optional[list] = None,
                  starts: Optional[list] = None) -> list:
    """`restore` for several observations, Fast EM only: those of one padded size share each UNet batch
    (`fast_diffusion_em_batch`; images never mix). `starts`: each observation's Start (`start_kernels`),
    computed here when not given. Returns one EMResult or DivergenceError per observation."""
    d, s = r.dcfg, r.kernel_size
    if d.method != "fast_em":
        raise InputError("batched images (--batch_size > 1) are a Fast EM option")
    B = len(ys)
    k_trues, callbacks = k_trues or [None] * B, callbacks or [None] * B
    prepared = [_prepared(r, y, mode) for y, mode in zip(ys, boundaries)]
    kernels = list(starts or [kernels_for(kernel_source(d.kernel, mode), yp, s, box, k_true)
                              for (yp, box), mode, k_true in zip(prepared, boundaries, k_trues)])

    def run(den: EpsDenoiser, idx: list, n: int) -> dict:  # Fast EM on images idx, a UNet batch per padded size
        done = {}
        for shape in dict.fromkeys(tuple(prepared[b][0].shape) for b in idx):
            group = [b for b in idx if tuple(prepared[b][0].shape) == shape]
            res = fast_diffusion_em_batch(
                den, [prepared[b][0] for b in group], [sigmas[b] for b in group],
                _guidance(r, all(k_trues[b] is not None for b in group)), d.mstep, s,
                [generators[b] for b in group], r.kernel_denoiser, n_particles=n,
                k_inits=[kernels[b].k_init for b in group], fixed_kernels=[kernels[b].fixed_kernel for b in group],
                supports=[kernels[b].support for b in group],
                guard=r.guard, callbacks=[callbacks[b] for b in group], progress=True,
                data_boxes=[prepared[b][1] for b in group], eta=d.eta, branch_fraction=d.branch_fraction)
            done.update(zip(group, res))
        return done

    first = {}
    if d.final_pass:  # the kernel-finding runs, then the final runs with their kernels fixed (as `restore`)
        first = run(r.kernel_pass_denoiser(), [b for b in range(B) if kernels[b].fixed_kernel is None],
                    d.kernel_pass_particles or d.n_particles)
        for b, f in first.items():
            if not isinstance(f, DivergenceError):
                kernels[b] = Start(fixed_kernel=f.kernel)
    final = run(r.denoiser, [b for b in range(B) if not isinstance(first.get(b), DivergenceError)], d.n_particles)
    out = []
    for b in range(B):
        rb = final.get(b, first.get(b))
        if not isinstance(rb, DivergenceError):
            rb = _judged(r, _after(first.get(b), rb), *prepared[b], sigmas[b], known_kernel=k_trues[b] is not None)
        out.append(rb)
    return out


def _after(first: Optional[EMResult], res: EMResult) -> EMResult:
    """A final run's result counting the kernel-finding run before it (its evaluations and trace)."""
    if first is None:
        return res
    return EMResult(x=res.x, kernel=res.kernel, nfe=first.nfe + res.nfe, trace=first.trace + res.trace)


def classical_deconvolution(yp: torch.Tensor, kernel: torch.Tensor, sigma: float) -> torch.Tensor:
    """The hyper-Laplacian deconvolution (Krishnan & Fergus 2009, classical.nonblind, its practical λ(σ)) of a
    padded observation (1, C, H, W) with a kernel, on the same frame and FFT model as the diffusion run.
    Solved on the CPU in float64 (as the `hyper_laplacian` baseline; MPS has no float64), returned on y's device."""
    cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    x = hyper_laplacian(cpu(yp), cpu(kernel), hyper_laplacian_lambda(sigma))
    return x.clamp(0, 1).to(yp.device, yp.dtype)


def anchored_deconvolution(yp: torch.Tensor, kernel: torch.Tensor, sigma: float, reference: torch.Tensor) -> torch.Tensor:
    """The diffusion image fitted to the data (config key `classical_anchor`): the hyper-Laplacian deconvolution
    whose gradient prior is centred on `reference` instead of on 0,
        argmin_x (λ/2)‖k ⊛ x − y‖² + Σ |∇(x − reference)|^α  =  reference + argmin_z (λ/2)‖k ⊛ z − r‖² + Σ |∇z|^α,
    r = y − k ⊛ reference (both operators circular on the frame), the second solved by `hyper_laplacian` (HQS) with
    the λ(σ), α and frame of `classical_deconvolution`: the data correct the reference where they speak, the
    reference stays where the kernel removed the signal, and a correction costs what an edge does (sparse).
    yp, reference: (1, C, H, W) on the padded frame; solved on the CPU in float64, returned on y's device."""
    cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    ref, k = cpu(reference), cpu(kernel)
    residual = cpu(yp) - BlurOperator.from_kernel(k, tuple(ref.shape[-2:]), 0.0).A(ref)
    x = ref + hyper_laplacian(residual, k, hyper_laplacian_lambda(sigma))
    return x.clamp(0, 1).to(yp.device, yp.dtype)


def _judged(r: Restorer, res: EMResult, yp: torch.Tensor, box: tuple, sigma: float, known_kernel: bool = False):
    """The cropped result, or the DivergenceError the guard raises on it (on the data region only). With
    `classical_blend` > 0 it carries the classical deconvolution with its kernel and, with `classical_anchor` ('all',
    or 'blind' when the kernel was not given), the config's output image fitted to the data: for `EMResult.image`."""
    try:
        resid = r.guard.check_result(res, yp, sigma, box)
    except DivergenceError as e:
        return e
    classical = anchored = None
    if r.dcfg.classical_blend > 0:
        classical = crop(classical_deconvolution(yp, res.kernel, sigma), box)
        if r.dcfg.classical_anchor == "all" or (r.dcfg.classical_anchor == "blind" and not known_kernel):
            anchored = crop(anchored_deconvolution(yp, res.kernel, sigma, res.image(r.dcfg.output)), box)
    return EMResult(x=crop(res.x, box), kernel=res.kernel, nfe=res.nfe, trace=res.trace, reblur_mse=resid,
                    classical=classical, anchored=anchored, anchored_output=r.dcfg.output if anchored is not None else "")


def classical_fallback(r: Restorer, y: torch.Tensor, sigma: float, reason: str, *, boundary: str = "circular",
                       k_true: Optional[torch.Tensor] = None, start: Optional[Start] = None) -> EMResult:
    """The classical restoration of an observation whose diffusion runs all failed the guard (config key
    `on_divergence: classical`): the hyper-Laplacian deconvolution (as `classical_deconvolution`) with the kernel
    the run held fixed (the oracle's, or the ℓ0 kernel on photos), else the ℓ0 kernel, on the same padded frame:
    the `l0_blind` baseline's computation. Returns an EMResult with one particle, nfe 0 and `fallback` = reason."""
    sigma = max(float(sigma), SIGMA_FLOOR)
    yp, box = _prepared(r, y, boundary)
    st = start if start is not None else kernels_for(kernel_source(r.dcfg.kernel, boundary), yp, r.kernel_size, box,
                                                     k_true)
    k = st.fixed_kernel if st.fixed_kernel is not None else st.l0
    if k is None:
        k = l0_kernel(yp, r.kernel_size, box)
    x = classical_deconvolution(yp, k, sigma)
    return EMResult(x=crop(x, box), kernel=k, nfe=0, reblur_mse=reblur_mse(x, k, yp, box), fallback=reason)


def restore_with_retries(r: Restorer, y: torch.Tensor, sigma: float, generator_for: Callable[[int], torch.Generator],
                         on_retry: Callable[[int, DivergenceError], None] = lambda attempt, e: None,
                         first_attempt: int = 0, **options) -> tuple:
    """`restore` with fresh noise (generator_for(attempt)) after a divergence, up to dcfg.retries more times
    (counting from `first_attempt`, e.g. 1 after a batched first attempt failed). The start kernels (the ℓ0
    estimate) are computed once for all attempts.

    Returns (EMResult, attempts); raises DivergenceError naming the attempts when every one failed.
    """
    last = None
    if options.get("start") is None and first_attempt <= r.dcfg.retries:
        options["start"] = start_kernels(r, y, options.get("boundary", "circular"), options.get("k_true"))
    for attempt in range(first_attempt, r.dcfg.retries + 1):
        try:
            return restore(r, y, sigma, generator_for(attempt), **options), attempt + 1
        except DivergenceError as e:
            last = e
            on_retry(attempt, e)
    raise DivergenceError(f"{last} (after {r.dcfg.retries + 1} attempts)")

"""The blind-deblurring job behind `test_FastDiffEM.py` and `test_DiffEM.py`: check, load, loop, write.

`main` checks the flags, the configs and the output folder before any model loads; `process_one` turns one
sample into one metrics row (its outputs written atomically); `run_all` takes any list of samples (a shard
of a larger set works the same). Only the project's own errors (util.errors.ProjectError) become `failed`
rows: anything else is a bug and stops the run.
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from diffusion_em import grayscale, shard
from diffusion_em.config import (BOUNDARIES, CLASSICAL_ANCHOR, KERNELS, ON_DIVERGENCE, PRECISIONS, ConfigError,
                                 DiffusionConfig, KernelConfig, diffusion_config_dict, load_diffusion_config, load_kernel_config)
from diffusion_em.budget import check_budget, default_budget_bytes, needs_low_memory
from diffusion_em.em import DivergenceError
from diffusion_em.restore import (ROOT, SIGMA_FLOOR, Restorer, boundary_mode, classical_fallback, kernel_source,
                                  load_restorer, repo_path, restore_batch, restore_with_retries, start_kernels)
from diffusion_em.results import (FIELDS, LONGEST_SUFFIX, ResultsFolder, check_output_names, quality_flags,
                                  summarise)
from guided_diffusion.model_config import ModelConfig, load_model_config
from guided_diffusion.sampler import needs_grad
from util.config import as_dict
from util.cpu_memory import keep_freed_memory, release_freed_memory
from util.device import check_threads, resolve_device
from util.errors import InputError, ProjectError, ResourceError
from util.geometry import pad_centred
from util.images import image_to_tensor, tensor_to_image
from util.inputs import Sample, check_sigma_flag, list_inputs, load_sample, resolve_sigma
from util.metrics import evaluate, lpips_available

__all__ = ["FIELDS", "build_parser", "load_configs", "restorer_from_args", "process_one", "process_batch", "run_all",
           "main"]

DEFAULT_CONFIGS = {"fast_em": "configs/diffusion_config_fastem_pigdm.yaml",
                   "diffusion_em": "configs/diffusion_config_pigdm.yaml"}
SCRIPTS = {"fast_em": "test_FastDiffEM.py", "diffusion_em": "test_DiffEM.py"}


def build_parser(method: str) -> argparse.ArgumentParser:
    what = ("Fast Diffusion EM: one diffusion run, kernel M-step at every step" if method == "fast_em"
            else "Diffusion EM: L rounds of full posterior sampling, then a kernel M-step")
    p = argparse.ArgumentParser(prog=SCRIPTS[method], description=f"Blind deblurring with {what}.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--img_model_config", default="configs/model_config_bundled.yaml",
                   help="UNet config with model_path (configs/model_config.yaml = DPS FFHQ-256 checkpoint)")
    p.add_argument("--diffusion_config", default=DEFAULT_CONFIGS[method],
                   help="method, guidance (pigdm|dps), steps and EM settings")
    p.add_argument("--kernel_config", default="configs/kernel_config_33.yaml",
                   help="kernel size and kernel-denoiser weights")
    p.add_argument("--input_dir", default="testset",
                   help="test-set folder (blurry/ sharp/ kernel/ meta.csv), a folder of photos, or of *.pickle")
    p.add_argument("--save_dir", default=f"results/{'fastem' if method == 'fast_em' else 'diffem'}",
                   help="output folder (images/, kernels/, montage/, metrics.csv, summary.json)")
    p.add_argument("--gpu", type=int, default=0, help="accelerator index, used when --device is auto")
    p.add_argument("--device", default="auto", help="'auto' (accelerator if present, else cpu), 'cpu', 'cuda:1', ...")
    p.add_argument("--seed", type=int, default=0, help="seed of all randomness (per image: seed + image index)")
    p.add_argument("--n_particles", type=int, default=None, help="particles sharing one kernel (config default if unset)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noise std in [0,1] units for every image (overrides meta.csv; default: given or estimated)")
    p.add_argument("--steps", type=int, default=None, help="override the number of diffusion steps")
    p.add_argument("--save_progress", action="store_true", help="save x̂0 frames and a kernel-evolution GIF")
    p.add_argument("--save_npy", action="store_true", help="also save the restored image as float32 .npy")
    p.add_argument("--max_images", type=int, default=None, help="process at most this many images")
    p.add_argument("--overwrite", action="store_true",
                   help="redo finished images; with other settings than the folder's, replace its record")
    p.add_argument("--true_kernel", action="store_true",
                   help="oracle: use the ground-truth kernel, M-step off (the non-blind ΠGDM*/DPS* bound)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--boundary", default=None, choices=BOUNDARIES,
                   help="override the config's boundary: auto (periodic only where meta.csv declares "
                        "'circular'), circular, taper, reflect, replicate")
    p.add_argument("--kernel", default=None, choices=KERNELS,
                   help="override the config's kernel source: auto (ℓ0 fixed on photos, l0_box on circular sets), "
                        "em (paper), l0, l0_em, l0_box")
    p.add_argument("--classical_blend", type=float, default=None, metavar="W",
                   help="override the config's classical_blend: output (1 - W)·diffusion + W·hyper-Laplacian "
                        "deconvolution with the final kernel; 0: diffusion only (docs/choices.md \"Blending with a classical "
                        "deconvolution\")")
    p.add_argument("--classical_anchor", default=None, choices=CLASSICAL_ANCHOR,
                   help="override the config's classical_anchor: fit the diffusion image to the data (the "
                        "hyper-Laplacian solve with its prior centred on that image) before the blend: none | blind "
                        "(only when the kernel is estimated) | all (docs/choices.md \"Fitting the diffusion image to the data\")")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="override the config's precision (the UNet's autocast): fp32 | bf16 | fp16 (GPU) | auto "
                        "(bf16 on a CPU with BF16 units, fp32 elsewhere; docs/speed.md)")
    p.add_argument("--on_divergence", default=None, choices=ON_DIVERGENCE,
                   help="override the config's on_divergence: what an image gets when every attempt fails the guard: "
                        "fail (a failed row) | classical (the ℓ0 + hyper-Laplacian restoration, flagged)")
    if method == "fast_em":
        p.add_argument("--final_pass", action="store_true", default=None,
                       help="after Fast EM, one non-blind run with its kernel fixed makes the image (about 2x "
                            "the time; config key final_pass; docs/choices.md \"A second run with the found kernel\")")
    p.add_argument("--memory_budget_gb", type=float, default=None,
                   help="an image whose particles' UNet graphs do not fit this together runs with one at a time "
                        "(the low-memory mode: the same result, slower); one that fits in neither is refused "
                        "(default: 90%% of the memory free at start; 0: no check)")
    p.add_argument("--malloc", default="keep", choices=("keep", "default"),
                   help="CPU runs on Linux: 'keep' (default) has glibc keep freed memory for reuse (faster: no page "
                        "faults each UNet call; up to +26%% peak memory on large photos); 'default' leaves glibc's "
                        "own thresholds (util/cpu_memory.py)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="images per UNet batch, each with its own kernel, σ and M-step (Fast EM; images of one "
                        "padded size share a batch). Under torchrun each rank batches its own share")
    return p


MAX_SEED = 2 ** 32


def check_flags(args: argparse.Namespace, method: str) -> None:
    """Flag values that cannot work, refused before anything loads (InputError naming the flag)."""
    check_sigma_flag(args.sigma)
    if args.memory_budget_gb is not None and not (np.isfinite(args.memory_budget_gb) and args.memory_budget_gb >= 0):
        raise InputError(f"--memory_budget_gb {args.memory_budget_gb}: must be >= 0 (0: no check)")
    if args.batch_size > 1 and method != "fast_em":
        raise InputError("--batch_size > 1 is a test_FastDiffEM.py option (Diffusion EM runs one image at a time)")
    check_threads(args.threads)
    for flag in ("max_images", "steps", "n_particles", "batch_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise InputError(f"--{flag} {v}: must be >= 1")
    if args.gpu < 0:
        raise InputError(f"--gpu {args.gpu}: must be >= 0")
    if not 0 <= args.seed < MAX_SEED:  # each image's generator seed is derived from it and must fit 64 bits
        raise InputError(f"--seed {args.seed}: must be in [0, 2^32)")
    if args.true_kernel and method != "fast_em":
        raise InputError("--true_kernel is a test_FastDiffEM.py option (Diffusion EM would re-estimate the kernel)")
    if args.kernel in ("l0", "auto") and method != "fast_em":
        raise InputError(f"--kernel {args.kernel}: test_DiffEM.py takes em, l0_em or l0_box (its rounds re-estimate the "
                         f"kernel)")


def load_configs(args: argparse.Namespace, method: str) -> tuple:
    """(DiffusionConfig with the flags' overrides, KernelConfig, ModelConfig); no model is loaded."""
    overrides = {k: getattr(args, k) for k in ("n_particles", "steps", "kernel", "final_pass", "classical_blend",
                                            "classical_anchor", "on_divergence", "precision")
                 if getattr(args, k, None) is not None}
    dcfg = load_diffusion_config(repo_path(args.diffusion_config), overrides)
    if dcfg.method != method:
        raise ConfigError(f"{args.diffusion_config}: method '{dcfg.method}' belongs to {SCRIPTS[dcfg.method]}, "
                          f"not this script")
    return dcfg, load_kernel_config(repo_path(args.kernel_config)), load_model_config(repo_path(args.img_model_config))


def restorer_from_args(args: argparse.Namespace, method: str) -> Restorer:
    """Configs from the flags, then the models (for tools that reuse this script's flags, e.g. bench/); the
    allocator setting of `--malloc` as the runner applies it."""
    dcfg, kcfg, model_cfg = load_configs(args, method)
    device = resolve_device(args.device, args.gpu)
    apply_malloc(args, device)
    return load_restorer(dcfg, kcfg, model_cfg, device, args.img_model_config)


def apply_malloc(args: argparse.Namespace, device: torch.device) -> None:
    """`--malloc keep` on a CPU: glibc keeps freed memory for reuse (util/cpu_memory.py); a fifth of each UNet
    call was page faults otherwise."""
    if device.type == "cpu" and args.malloc == "keep":
        keep_freed_memory()


@dataclass(frozen=True)
class RunOptions:
    """What a run does with each image beyond restoring it (from the command line)."""
    model_cfg: Optional[ModelConfig] = None  # for the memory estimate
    memory_budget: Optional[int] = None      # bytes; None: no check
    seed: int = 0
    sigma: Optional[float] = None          # σ for every image, overriding meta.csv / estimates
    true_kernel: bool = False              # oracle: the ground-truth kernel, M-step off
    save_npy: bool = False
    save_progress: bool = False
    overwrite: bool = False
    boundary: Optional[str] = None         # --boundary: overrides the config's boundary for every image


def settings_record(dcfg: DiffusionConfig, kcfg: KernelConfig, model_cfg: ModelConfig, opts: RunOptions,
                    input_dir: str) -> dict:
    """What decides a run's results: configs, seed, σ override, oracle flag, inputs (not output-only flags)."""
    return {"diffusion": diffusion_config_dict(dcfg), "kernel": as_dict(kcfg), "model": as_dict(model_cfg),
            "seed": opts.seed, "sigma": opts.sigma, "true_kernel": opts.true_kernel,
            "input_dir": str(Path(input_dir).resolve()), **({"boundary": opts.boundary} if opts.boundary else {})}


def image_boundary(flag: Optional[str], dcfg: DiffusionConfig, sample) -> str:
    """The boundary model one image runs with: `--boundary` (flag), else the config's, resolved with what the
    image's meta.csv declares (`restore.boundary_mode`)."""
    return boundary_mode(flag or dcfg.boundary, sample.kind, sample.boundary)


def _progress_recorder(steps: int):
    """(callback, x̂0 frames, kernels): ~20 frames of x̂0 (first particle); the kernel after every step
    (saved whole as progress/NAME_kernels.npy for bench/kernel_trajectory.py, and as a ~20-frame GIF)."""
    frames, kernels = [], []
    every = max(1, steps // 20)

    def record(info):
        if info["i"] % every == 0:
            frames.append(tensor_to_image(info["x0"][:1].clamp(0, 1)))
        kernels.append(info["kernel"][0, 0].detach())  # on its device: no host sync in the step loop
    return record, frames, kernels


def out_of_memory(e: BaseException) -> bool:
    """Whether an exception is running out of host or device memory (then a failed row, not a crash)."""
    msg = str(e)  # cuFFT / cuBLAS workspace failures say ALLOC_FAILED, not "out of memory"
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (isinstance(e, RuntimeError) and any(
        s in msg for s in ("can't allocate memory", "out of memory", "ALLOC_FAILED")))


LOW_MEMORY_NOTE = "low-memory mode: particles' UNet graphs one at a time (the memory budget)"  # the row's message


def budget_particles(dcfg: DiffusionConfig) -> int:
    """The most particles a run of this config holds at once (with `final_pass`, its kernel-finding run's too)."""
    if dcfg.method == "fast_em" and dcfg.final_pass:
        return max(dcfg.n_particles, dcfg.kernel_pass_particles or dcfg.n_particles)
    return dcfg.n_particles


def _check_size(r: Restorer, opts: RunOptions, sample: Sample, y: np.ndarray) -> bool:
    """Refuse before any diffusion: an image smaller than the kernel, or one over the memory budget even in the
    low-memory mode. Returns whether it needs that mode (its particles' UNet graphs one at a time)."""
    H, W = y.shape[:2]
    if min(H, W) < r.kernel_size:
        raise InputError(f"{sample.blurry}: image {W}×{H} is smaller than the {r.kernel_size}×{r.kernel_size} kernel "
                         f"(use a smaller --kernel_config)")
    if opts.model_cfg is None:
        return False
    try:
        low = needs_low_memory(H, W, budget_particles(r.dcfg), opts.model_cfg, r.kernel_size, opts.memory_budget,
                               backward=needs_grad(r.guidance))
    except ResourceError as e:
        raise ResourceError(f"{sample.blurry}: {e}") from None
    if low:
        print(f"{sample.name}: its {budget_particles(r.dcfg)} particles' UNet passes are recomputed one at a time for the "
              f"guidance, to fit the memory budget (the same result; the particle steps take up to 1.5x as long)",
              file=sys.stderr)
    return low


@dataclass
class Loaded:
    """One sample read and checked, ready to restore (σ resolved; grayscale replicated to RGB)."""
    sample: Sample
    index: int                 # the sample's place in the whole input list: it seeds the image's noise
    loaded: object
    y: torch.Tensor
    sigma: float
    sigma_source: str
    sigma_run: float           # σ of the RGB observation the sampler sees
    gray: bool
    boundary: str              # the boundary model it runs with (restore.boundary_mode)
    kernel_from: str           # where its kernel comes from: em | l0 | l0_em | true (the oracle)
    t0: float
    low_memory: bool = False   # the budget holds it only with one particle's UNet graph at a time
    callback: Optional[object] = None
    frames: list = field(default_factory=list)
    kernels: list = field(default_factory=list)


NAME_MAX = 255  # bytes in one file name on Linux file systems (ext4, xfs, btrfs); counted in UTF-8 bytes everywhere


def check_name_length(sample: Sample) -> None:
    """Refuse (for this image only) a name whose longest result file, images/<name>_diffusion.png, would not fit."""
    longest = len(f"{sample.name}{LONGEST_SUFFIX}".encode())
    if longest > NAME_MAX:
        raise InputError(f"{sample.blurry}: its name is too long for its result files ({longest} bytes in "
                         f"'<name>{LONGEST_SUFFIX}', at most {NAME_MAX}): rename it")


def load_one(r: Restorer, opts: RunOptions, sample: Sample, index: int, known: dict) -> Loaded:
    """Read and check one sample, resolve its σ (into `known` too, for a failed row); raises a ProjectError
    naming the file when it cannot be used."""
    t0 = time.time()
    check_name_length(sample)
    try:
        loaded = load_sample(sample, sigma_given=opts.sigma is not None)
    except Exception as e:
        if out_of_memory(e):  # before the memory budget applies: _out_of_memory_error says so
            e.while_reading = True
        raise
    try:
        sigma, source = resolve_sigma(loaded, opts.sigma)
    except ValueError as e:  # the blind estimate's own refusals (non-finite data, too few pixels)
        raise InputError(f"{sample.blurry}: {e}") from None
    if sigma < SIGMA_FLOOR:
        source = f"{source}; ran at the floor {SIGMA_FLOOR:g}"
    known.update(sigma=sigma, sigma_source=source)
    low_memory = _check_size(r, opts, sample, loaded.y)
    if source == "estimated":
        print(f"{sample.name}: no σ given, estimated σ = {sigma * 255:.2f}/255 from the image "
              f"(rule: util/noise.py)", file=sys.stderr)
    gray = grayscale.is_grayscale(loaded.y)
    sigma_run = grayscale.replicated_sigma(sigma, loaded.y.shape[2]) if gray else sigma
    if opts.true_kernel and loaded.k_true is None:
        raise InputError(f"{sample.blurry}: --true_kernel needs a ground-truth kernel")
    if opts.true_kernel:
        kt = np.asarray(loaded.k_true, np.float64)
        lost = 1 - pad_centred(kt, r.kernel_size).sum() / kt.sum()
        if lost > 1e-3:  # the oracle would run with a cropped kernel, not the true one
            raise InputError(f"{sample.blurry}: its true kernel ({kt.shape[1]}×{kt.shape[0]}) has {100 * lost:.1f} % "
                             f"of its mass outside the {r.kernel_size}×{r.kernel_size} kernel of --kernel_config "
                             f"(use a larger one, e.g. configs/kernel_config_64.yaml)")
    callback, frames, kernels = _progress_recorder(r.dcfg.steps) if opts.save_progress else (None, [], [])
    boundary = image_boundary(opts.boundary, r.dcfg, sample)
    kernel_from = "true" if opts.true_kernel else kernel_source(r.dcfg.kernel, boundary)
    return Loaded(sample, index, loaded, image_to_tensor(loaded.y, r.device), sigma, source, sigma_run, gray,
                  boundary, kernel_from, t0, low_memory, callback, frames, kernels)


def _generator(r: Restorer, opts: RunOptions, index: int, attempt: int) -> torch.Generator:
    return torch.Generator(device=r.device).manual_seed(opts.seed * 1_000_003 + index * 1009 + attempt)


def _k_true(opts: RunOptions, one: Loaded):
    return torch.from_numpy(one.loaded.k_true) if opts.true_kernel else None


def _retry(r: Restorer, opts: RunOptions, one: Loaded, first_attempt: int = 0, failed=None, start=None) -> tuple:
    """(EMResult, attempts) from attempt `first_attempt` on; `failed`: the error of the attempt before it;
    `start`: the image's start kernels when already computed (the ℓ0 estimate is not redone). When every attempt
    fails: the DivergenceError, or with `on_divergence: classical` the classical restoration (`classical_fallback`)."""
    def on_retry(attempt, e):
        print(f"{one.sample.name}: attempt {attempt + 1}: {e}", file=sys.stderr)
        one.frames.clear(), one.kernels.clear()

    try:
        if first_attempt > r.dcfg.retries:
            raise DivergenceError(f"{failed} (after {first_attempt} attempts)")
        if failed is not None:
            on_retry(first_attempt - 1, failed)
        if start is None:  # computed here so that a fallback reuses it
            start = start_kernels(r, one.y, one.boundary, _k_true(opts, one))
        return restore_with_retries(
            r, one.y, one.sigma_run, lambda attempt: _generator(r, opts, one.index, attempt), on_retry,
            first_attempt=first_attempt, boundary=one.boundary, k_true=_k_true(opts, one), callback=one.callback,
            start=start, low_memory=one.low_memory)
    except DivergenceError as e:
        if r.dcfg.on_divergence != "classical":
            raise
        print(f"{one.sample.name}: {e}; writing the classical restoration instead (on_divergence: classical)",
              file=sys.stderr)
        one.frames.clear(), one.kernels.clear()
        res = classical_fallback(r, one.y, one.sigma_run, " ".join(str(e).split()), boundary=one.boundary,
                                 k_true=_k_true(opts, one), start=start)
        return res, max(first_attempt, r.dcfg.retries + 1)


def finish_one(opts: RunOptions, out: ResultsFolder, one: Loaded, res, attempts: int, seconds: float,
               dcfg: DiffusionConfig) -> dict:
    """Write one image's outputs (the image per dcfg.output: 'sample' | 'mean', fitted to the data when
    dcfg.classical_anchor, blended with the classical deconvolution by dcfg.classical_blend, and then the diffusion
    image alone beside it); returns its metrics row."""
    loaded = one.loaded
    blend = 0.0 if res.fallback else dcfg.classical_blend  # a classical fallback has no diffusion image to blend
    anchor = res.anchored is not None  # per classical_anchor and the kernel's source (restore._judged)
    x_img = tensor_to_image(res.image(dcfg.output, blend, anchor)[0].clamp(0, 1))
    x_diffusion = tensor_to_image(res.image(dcfg.output)[0].clamp(0, 1)) if blend or anchor else None
    particles = [tensor_to_image(p) for p in res.x]
    y_obs, x_true = loaded.y, loaded.x_true
    if one.gray:  # grayscale in, grayscale out (diffusion_em/grayscale.py)
        x_img, y_obs, particles = grayscale.to_gray(x_img), y_obs[..., :1], [grayscale.to_gray(p) for p in particles]
        x_true = None if x_true is None else grayscale.to_gray(x_true)
        x_diffusion = None if x_diffusion is None else grayscale.to_gray(x_diffusion)
    k = res.kernel.detach().cpu().numpy()
    kernel_frames = torch.stack(one.kernels).cpu().numpy() if one.kernels else ()
    m = evaluate(x_img, y_obs, k, one.sigma, x_true, loaded.k_true, particles=particles)  # before any file is written
    out.write_image(one.sample.name, x_img, particles, k, y_obs, x_true, loaded.k_true, opts.save_npy, one.frames,
                    kernel_frames, diffusion_only=x_diffusion)
    kernel_from = ("true" if one.kernel_from == "true" else "l0") if res.fallback else one.kernel_from
    message = f"classical fallback: {res.fallback}" if res.fallback else ""
    if one.low_memory and not res.fallback:
        message = LOW_MEMORY_NOTE
    row = {"name": one.sample.name, "status": "ok", "message": message,
           "sigma": one.sigma, "sigma_source": one.sigma_source, "kernel_source": kernel_from, **m, "seconds": round(seconds, 2), "nfe": res.nfe, "attempts": attempts,
           "reblur_rms_frame": None if res.reblur_mse is None else res.reblur_mse ** 0.5}
    row["flag"] = ";".join((["classical_fallback"] if res.fallback else [])
                           + quality_flags(row, max(one.sigma, SIGMA_FLOOR)))  # the σ the run used
    if row["flag"]:
        print(f"{one.sample.name}: flagged {row['flag']}", file=sys.stderr)
    return row


def _retry_in_memory(r: Restorer, opts: RunOptions, one: Loaded, **kw) -> tuple:
    """`_retry`; when it runs out of memory with the particles' UNet graphs together (the estimate was low), once
    more in the low-memory mode (one particle's graph at a time, the same result) before giving up."""
    try:
        return _retry(r, opts, one, **kw)
    except Exception as e:
        if not out_of_memory(e) or one.low_memory or budget_particles(r.dcfg) < 2:
            raise
    give_back_memory(r.device)
    print(f"{one.sample.name}: out of memory with its particles' UNet graphs together; again in the low-memory "
          f"mode (one at a time, the same result)", file=sys.stderr)
    one.low_memory = True
    one.frames.clear(), one.kernels.clear()
    return _retry(r, opts, one, **kw)


def give_back_memory(device: torch.device) -> None:
    """After running out of memory: the allocator's cached blocks back to the GPU, or the process's kept freed
    memory back to the system (util/cpu_memory.py), before the next attempt or image. Call it after the
    `except` block: inside it the exception's traceback still holds the failed attempt's tensors."""
    if device.type != "cpu":
        torch.accelerator.empty_cache()
    else:
        release_freed_memory()


def _out_of_memory_error(sample: Sample, e: BaseException) -> ResourceError:
    """One line; without the budget hint when it happened while the files were read (load_one marks it), before
    the budget applies."""
    why = ' '.join(str(e).split())[:160]
    if getattr(e, "while_reading", False):
        return ResourceError(f"{sample.blurry}: out of memory while reading it ({why}): too large for this machine")
    return ResourceError(f"{sample.blurry}: out of memory ({why}); lower --memory_budget_gb so such inputs are "
                         f"refused before they start")


def process_one(r: Restorer, opts: RunOptions, out: ResultsFolder, sample: Sample, index: int,
                known: Optional[dict] = None) -> dict:
    """Deblur one sample and write its outputs; returns its metrics row (status ok). `known` receives what is
    learnt before a failure (σ and its source) so a failed row can still report it."""
    known = {} if known is None else known
    try:
        one = load_one(r, opts, sample, index, known)
        res, attempts = _retry_in_memory(r, opts, one)
        return finish_one(opts, out, one, res, attempts, time.time() - one.t0, r.dcfg)
    except Exception as e:
        if not out_of_memory(e):
            raise
        err = _out_of_memory_error(sample, e)
    give_back_memory(r.device)
    raise err


def _failed_row(sample: Sample, e: ProjectError, known: dict) -> dict:
    msg = " ".join(str(e).split())
    print(f"{sample.name}: FAILED: {msg}", file=sys.stderr)
    return {"name": sample.name, "status": "failed", "message": msg, **known}


def _fit_together(r: Restorer, opts: RunOptions, ready: list) -> bool:
    """Whether the memory budget holds the batch (the largest image, times the batch's rows)."""
    if opts.model_cfg is None or not ready:
        return True
    H, W = max(o.y.shape[-2] for o in ready), max(o.y.shape[-1] for o in ready)
    try:
        check_budget(H, W, budget_particles(r.dcfg) * len(ready), opts.model_cfg, r.kernel_size, opts.memory_budget,
                     backward=needs_grad(r.guidance))
    except ResourceError:
        return False
    return True


def process_batch(r: Restorer, opts: RunOptions, out: ResultsFolder, items: list) -> list:
    """Deblur several (index, sample) pairs, images of one padded size in one UNet batch (Fast EM), and write
    their outputs. The first attempt runs batched; an image the guard fails is retried alone, and a batch
    that runs out of memory is redone one image at a time. Each row's `seconds` is its share of the
    batch's time (plus its own retries)."""
    rows, ready, known = {}, [], {sample.name: {} for _, sample in items}
    for index, sample in items:
        oom = False
        try:
            ready.append(load_one(r, opts, sample, index, known[sample.name]))
        except ProjectError as e:
            rows[sample.name] = _failed_row(sample, e, known[sample.name])
        except Exception as e:
            if not out_of_memory(e):
                raise
            rows[sample.name], oom = _failed_row(sample, _out_of_memory_error(sample, e), known[sample.name]), True
        if oom:
            give_back_memory(r.device)  # after the except block (its traceback holds the partial arrays)
    t0 = time.time()
    starts = [None] * len(ready)
    batch_oom = False
    try:
        if not _fit_together(r, opts, ready):
            raise MemoryError(f"the memory budget fits these {len(ready)} images one at a time, not together")
        starts = [start_kernels(r, o.y, o.boundary, _k_true(opts, o)) for o in ready]  # reused by retries
        results = restore_batch(
            r, [o.y for o in ready], [o.sigma_run for o in ready], [_generator(r, opts, o.index, 0) for o in ready],
            [o.boundary for o in ready], [_k_true(opts, o) for o in ready],
            [o.callback for o in ready], starts) if ready else []
    except Exception as e:
        if not out_of_memory(e):
            raise
        print(f"batch of {len(ready)}: {' '.join(str(e).split())[:160]}; one image at a time", file=sys.stderr)
        results, batch_oom = [None] * len(ready), True
    if batch_oom:
        give_back_memory(r.device)
    share = (time.time() - t0) / max(1, len(ready))
    for one, res, start in zip(ready, results, starts):
        name = one.sample.name
        oom = False
        try:
            t1, attempts, spent = time.time(), 1, share
            if res is None:  # the batch ran out of memory
                spent, (res, attempts) = 0.0, _retry_in_memory(r, opts, one, start=start)
            elif isinstance(res, DivergenceError):
                res, attempts = _retry_in_memory(r, opts, one, first_attempt=1, failed=res, start=start)
            rows[name] = finish_one(opts, out, one, res, attempts, spent + time.time() - t1, r.dcfg)
        except ProjectError as e:
            rows[name] = _failed_row(one.sample, e, known[name])
        except Exception as e:
            if not out_of_memory(e):
                raise
            rows[name], oom = _failed_row(one.sample, _out_of_memory_error(one.sample, e), known[name]), True
        if oom:
            give_back_memory(r.device)
    return [rows[sample.name] for _, sample in items]


def run_all(r: Restorer, opts: RunOptions, out: ResultsFolder, samples: list, batch_size: int = 1,
            indices: Optional[list] = None) -> list:
    """Process samples, skipping finished ones; a sample failing with a project error gets a row, the run goes on.

    `indices`: each sample's place in the whole input list (a shard's samples keep their seeds); `batch_size`
    > 1 runs that many images per UNet batch (Fast EM)."""
    from tqdm.auto import tqdm
    done = set() if opts.overwrite else {n for n, row in out.previous_rows().items() if row.get("status") == "ok"}
    todo = []
    for index, sample in zip(indices if indices is not None else range(len(samples)), samples):
        if sample.name in done:
            print(f"{sample.name}: already done (use --overwrite to redo)", file=sys.stderr)
        else:
            todo.append((index, sample))
    rows = []
    bar = tqdm(total=len(todo), desc="images")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        if batch_size == 1:
            (index, sample), known = chunk[0], {}
            try:
                new = [process_one(r, opts, out, sample, index, known)]
            except ProjectError as e:
                new = [_failed_row(sample, e, known)]
        else:
            new = process_batch(r, opts, out, chunk)
        for row in new:
            out.append(row)
        rows += new
        bar.update(len(chunk))
    bar.close()
    return rows


def _versions() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "git_commit": commit}


def _all_ok(ranks: shard.Ranks, ok: bool) -> bool:
    """Whether every rank is ok (rank 0 alone checks the output folder: the others must not run without it)."""
    if not ranks.sharded:
        return ok
    flags = [None] * ranks.world
    torch.distributed.all_gather_object(flags, ok)
    return all(flags)


RUN_FACTS = ("device", "threads", "ranks", "precision")  # a resume may change them, but they change the bits


def _with_earlier_runs(out: ResultsFolder, record: dict, previous: dict) -> dict:
    """The record to write, keeping the device/precision/threads/ranks of earlier runs whose images this folder holds when a
    resume uses others (the same seed gives other bits then: README "Reproducibility"), with a note. `previous`:
    the folder's rows (`ResultsFolder.previous_rows`)."""
    old = out.recorded() if previous else None
    if not isinstance(old, dict):
        return record
    earlier = list(old.get("earlier_runs") or [])
    if "precision" not in old:  # folders from before `auto` ran what their settings said
        old = {**old, "precision": ((old.get("settings") or {}).get("diffusion") or {}).get("precision")}
    facts = {k: old[k] for k in RUN_FACTS if old.get(k) is not None}
    if facts and facts != {k: record[k] for k in facts}:
        earlier.append(facts)
        print(f"note: {out.path} holds images made with {facts}; this run uses "
              f"{ {k: record[k] for k in facts} } (the record keeps both, as earlier_runs)", file=sys.stderr)
    return {**record, "earlier_runs": earlier} if earlier else record


def _write_summary(out: ResultsFolder, rows: dict, record: dict, lp_ok: bool, lp_reason: str,
                   interrupted: bool = False) -> dict:
    """summary.json from the rows by name; `interrupted`: written as the run stops on Ctrl-C (a resume rewrites it)."""
    summary = {**summarise(rows), "lpips": "computed" if lp_ok else f"skipped: {lp_reason}", **record}
    if interrupted:
        summary["interrupted"] = True
    out.write_summary(summary)
    return summary


def main(argv=None, method: str = "fast_em") -> int:
    args = build_parser(method).parse_args(argv)
    try:
        check_flags(args, method)
        ranks = shard.ranks_from_env()
        device = resolve_device(args.device, ranks.local_rank if ranks.sharded else args.gpu)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_malloc(args, device)
    if ranks.sharded and device.type != "cpu":
        torch.accelerator.set_device_index(device.index)
    shard.start(ranks, device)
    try:
        return _run(args, method, ranks, device)
    except KeyboardInterrupt:  # every file and row written so far is whole (atomic writes): say how to go on
        how = "the same command without --overwrite" if args.overwrite else "the same command"
        print(f"\ninterrupted; finished images are kept in {args.save_dir}: rerun {how} to resume", file=sys.stderr)
        return 130
    finally:
        shard.stop(ranks)


def _run(args, method: str, ranks: shard.Ranks, device: torch.device) -> int:
    out = ResultsFolder(args.save_dir)
    failed, replace = None, False
    try:
        dcfg, kcfg, model_cfg = load_configs(args, method)
        if dcfg.precision == "fp16" and device.type == "cpu":  # runs, but far slower than fp32: CPUs emulate fp16
            raise InputError(f"precision fp16 ({'--precision' if args.precision else args.diffusion_config}) is for "
                             f"GPUs; on a CPU use bf16, auto or fp32")
        budget = (default_budget_bytes(device) if args.memory_budget_gb is None else
                  None if args.memory_budget_gb == 0 else int(args.memory_budget_gb * 2**30))
        opts = RunOptions(model_cfg=model_cfg, memory_budget=budget, seed=args.seed, sigma=args.sigma,
                          true_kernel=args.true_kernel, save_npy=args.save_npy, save_progress=args.save_progress,
                          overwrite=args.overwrite, boundary=args.boundary)
        samples = list_inputs(args.input_dir, notice=lambda m: print(f"note: {m}", file=sys.stderr))
        check_output_names(Path(args.input_dir), {s.name for s in samples})
        settings = settings_record(dcfg, kcfg, model_cfg, opts, args.input_dir)  # after: it resolves the folder
        if ranks.main:
            out.check()
            replace = out.claim(settings, args.overwrite, defer=True,  # moved aside once the models loaded
                                defaults={"diffusion": diffusion_config_dict(DiffusionConfig()),
                                          "kernel": as_dict(KernelConfig())})
    except ProjectError as e:
        failed = e
    if not _all_ok(ranks, failed is None):
        print(f"error: {failed or 'rank 0 refused the output folder'}", file=sys.stderr)
        return 2
    try:
        r = load_restorer(dcfg, kcfg, model_cfg, device, args.img_model_config)
        if replace:  # --overwrite: only now, so that a run refused before this point leaves the folder as it was
            out.replace_old()
    except (ProjectError, OSError) as e:
        failed = e
    # every rank learns whether all loaded (and rank 0 moved the earlier results aside) before any writes
    if not _all_ok(ranks, failed is None):
        print(f"error: {failed or 'another rank failed to start'}", file=sys.stderr)
        return 2
    if args.max_images is not None:
        samples = samples[: args.max_images]
    lp_ok, lp_reason = lpips_available()
    record = {"settings": settings, "device": str(r.device), "precision": r.precision, "threads": torch.get_num_threads(),
              "ranks": ranks.world, "versions": _versions(), "args": vars(args)}
    previous = out.previous_rows()
    if ranks.main:
        record = _with_earlier_runs(out, record, previous)  # config.yaml and summary.json both keep them
        out.write_config(record)
    mine = ranks.indices(len(samples))
    try:
        rows = run_all(r, opts, ResultsFolder(args.save_dir, rank=ranks.rank) if ranks.sharded else out,
                       [samples[i] for i in mine], args.batch_size, mine)
    except KeyboardInterrupt:
        if ranks.main:  # the summary of the rows written so far, this run's and earlier ones' (rank logs read, kept)
            try:
                done = out.previous_rows()
                if done:
                    _write_summary(out, done, record, lp_ok, lp_reason, interrupted=True)
            except Exception as e:  # noqa: BLE001 - a row cut by the interrupt, a full disk: the Ctrl-C message still comes
                print(f"note: summary.json not updated ({' '.join(str(e).split())[:160]})", file=sys.stderr)
        raise
    code = 0 if all(row["status"] == "ok" for row in rows) else 1
    shard.barrier(ranks)  # every rank's rows are written
    if not ranks.main:
        return code
    if ranks.sharded or out.rank_logs():  # also the logs an interrupted sharded run left behind
        everything = out.merge_rank_logs([s.name for s in samples])
    else:
        everything = {**previous, **{row["name"]: row for row in rows}}  # the last row per image
    if not everything:
        print("nothing to do", file=sys.stderr)
        return 0
    summary = _write_summary(out, everything, record, lp_ok, lp_reason)
    m = summary["means"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    fb = summary["classical_fallback"]
    print(f"{summary['ok']}/{summary['images']} images ok{f' ({fb} by the classical fallback)' if fb else ''}; mean PSNR {fmt(m['psnr'], '.2f')} dB "
          f"(blurry {fmt(m['psnr_blurry'], '.2f')}), SSIM {fmt(m['ssim'], '.3f')}, "
          f"kernel MSE {fmt(m['kernel_mse'], '.2e')}, {fmt(m['seconds'], '.1f')} s/image -> {out.path}")
    return code

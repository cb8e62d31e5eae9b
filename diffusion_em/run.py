"""The blind-deblurring job behind `test_FastDiffEM.py` and `test_DiffEM.py`: build, loop over images, write.

Separable on purpose: `build_context` (models and configs), `process_one` (one image → one metrics row,
all outputs written atomically), `run_all` (any list of samples: a shard of a larger set works the same).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from diffusion_em.config import (ConfigError, DiffusionConfig, KernelConfig, diffusion_config_dict,
                                 load_diffusion_config, load_kernel_config)
from diffusion_em.em import DivergenceError, EMResult, Guard, diffusion_em, fast_diffusion_em
from guided_diffusion.denoiser import EpsDenoiser
from guided_diffusion.guidance import make_guidance
from guided_diffusion.model_config import ModelConfig, build_unet, load_model_config
from guided_diffusion.schedule import Schedule
from guided_diffusion.unet import CheckpointError, load_weights
from util.config import as_dict
from kernel_denoiser.network import load_kernel_denoiser
from util import io
from util.metrics import blurry_scores, evaluate, lpips_available, lpips_distance, psnr

FIELDS = ("name", "status", "message", "sigma", "sigma_source", "psnr", "ssim", "psnr_aligned", "ssim_aligned",
          "shift_y", "shift_x", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error", "psnr_blurry", "ssim_blurry",
          "psnr_blurry_aligned", "ssim_blurry_aligned", "psnr_particles", "seconds", "nfe", "attempts")
DEFAULT_CONFIGS = {"fast_em": "configs/diffusion_config_fastem_pigdm.yaml",
                   "diffusion_em": "configs/diffusion_config_pigdm.yaml"}
ROOT = Path(__file__).resolve().parents[1]


def _repo_path(p: Optional[str]) -> Optional[str]:
    """Config paths are relative to the repository root unless absolute or present from the cwd."""
    if p is None or os.path.isabs(p) or os.path.exists(p):
        return p
    return str(ROOT / p)


def build_parser(method: str) -> argparse.ArgumentParser:
    script = "test_FastDiffEM.py" if method == "fast_em" else "test_DiffEM.py"
    what = ("Fast Diffusion EM: one diffusion run, kernel M-step at every step" if method == "fast_em"
            else "Diffusion EM: L rounds of full posterior sampling, then a kernel M-step")
    p = argparse.ArgumentParser(prog=script, description=f"Blind deblurring with {what}.",
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
    p.add_argument("--overwrite", action="store_true", help="redo images already finished in metrics.csv")
    p.add_argument("--true_kernel", action="store_true",
                   help="oracle: use the ground-truth kernel, M-step off (the non-blind ΠGDM*/DPS* bound)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    return p


def resolve_device(name: str, gpu: int) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.accelerator.is_available():
        return torch.device(torch.accelerator.current_accelerator().type, gpu)
    return torch.device("cpu")


@dataclass
class Context:
    denoiser: EpsDenoiser
    guidance: object
    dcfg: DiffusionConfig
    kcfg: KernelConfig
    model_cfg: ModelConfig
    kernel_denoiser: Optional[torch.nn.Module]
    device: torch.device
    seed: int
    save_dir: Path
    args: argparse.Namespace
    guard: Guard = Guard()


def build_context(args: argparse.Namespace, method: str) -> Context:
    overrides = {}
    if args.n_particles is not None:
        overrides["n_particles"] = args.n_particles
    if args.steps is not None:
        overrides["steps"] = args.steps
    dcfg = load_diffusion_config(_repo_path(args.diffusion_config), overrides)
    if dcfg.method != method:
        other = "test_FastDiffEM.py" if dcfg.method == "fast_em" else "test_DiffEM.py"
        raise ConfigError(f"{args.diffusion_config}: method '{dcfg.method}' belongs to {other}, not this script")
    kcfg = load_kernel_config(_repo_path(args.kernel_config))
    model_cfg = load_model_config(_repo_path(args.img_model_config))
    device = resolve_device(args.device, args.gpu)
    model_path = _repo_path(model_cfg.model_path)
    if not model_path:
        raise ConfigError(f"{args.img_model_config}: missing key 'model_path'")
    model = load_weights(build_unet(model_cfg), model_path).to(device)
    sched = Schedule.create(dcfg.steps, model_cfg.schedule)  # the schedule the weights were trained with
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dcfg.precision]
    denoiser = EpsDenoiser(model, sched, clip=dcfg.clip_denoised, autocast_dtype=autocast)
    guidance = make_guidance(dcfg.guidance, zeta=dcfg.zeta)
    kd = None
    if kcfg.denoiser_path is not None:
        kd = load_kernel_denoiser(_repo_path(kcfg.denoiser_path), device=device)
    guard = Guard(max_residual=dcfg.guard_residual, max_saturation_excess=dcfg.guard_saturation)
    return Context(denoiser=denoiser, guidance=guidance, dcfg=dcfg, kcfg=kcfg, model_cfg=model_cfg,
                   kernel_denoiser=kd, device=device, seed=args.seed, save_dir=Path(args.save_dir), args=args,
                   guard=guard)


def _boundary(ctx: Context, kind: str) -> str:
    if ctx.dcfg.boundary != "auto":
        return ctx.dcfg.boundary
    return "taper" if kind == "photo" else "circular"  # synthetic sets were blurred circularly


def _prepare(y: torch.Tensor, mode: str, pad: int, multiple: int):
    """Pad for the boundary model and for the UNet; return the padded y and the crop box back."""
    box0 = (0, 0) + tuple(y.shape[-2:])
    if mode != "circular":
        y, box0 = io.pad_for_boundary(y, pad, mode)
    y, _ = io.pad_to_multiple(y, multiple, "circular" if mode == "circular" else "reflect")  # bottom/right: box0 still crops
    return y, box0


def restore(ctx: Context, y: torch.Tensor, sigma: float, kind: str, gen: torch.Generator,
            k_true: Optional[torch.Tensor] = None, callback=None) -> EMResult:
    """Deblur one observation (1, C, H, W) in [0, 1]: pad, run the configured EM, crop back."""
    d, s = ctx.dcfg, ctx.kcfg.kernel_size
    mode = _boundary(ctx, kind)
    yp, box = _prepare(y, mode, s, ctx.denoiser.model.size_multiple)
    if min(yp.shape[-2:]) < s:
        raise ValueError(f"image {tuple(y.shape[-2:])} is smaller than the kernel {s}x{s}")
    if d.method == "fast_em":
        fixed = None
        if k_true is not None:
            fixed = _fit_kernel(k_true.to(yp), s)
        res = fast_diffusion_em(ctx.denoiser, yp, sigma, ctx.guidance, d.mstep, s, gen, ctx.kernel_denoiser,
                                n_particles=d.n_particles, fixed_kernel=fixed, guard=ctx.guard,
                                callback=callback, progress=True, eta=d.eta, branch_fraction=d.branch_fraction)
    else:
        res = diffusion_em(ctx.denoiser, yp, sigma, ctx.guidance, d.mstep, s, gen, ctx.kernel_denoiser,
                           n_particles=d.n_particles, rounds=d.em_rounds, guard=ctx.guard,
                           callback=callback, progress=True, eta=d.eta, branch_fraction=d.branch_fraction)
    res = EMResult(x=io.crop(res.x, box), kernel=res.kernel, nfe=res.nfe, trace=res.trace)
    ctx.guard.check_result(res, y, sigma)  # on the cropped result: padding is not data
    return res


def _fit_kernel(k: torch.Tensor, s: int) -> torch.Tensor:
    """Zero-pad or crop a kernel to s×s keeping its centre tap (a//2, b//2) at (s//2, s//2); renormalise."""
    out = k.new_zeros(s, s)
    src, dst = [], []
    for a in k.shape[-2:]:
        off = s // 2 - a // 2
        lo, hi = max(0, off), min(s, off + a)
        dst.append(slice(lo, hi))
        src.append(slice(lo - off, hi - off))
    out[dst[0], dst[1]] = k[src[0], src[1]]
    return out / out.sum()


def process_one(ctx: Context, sample: io.Sample, index: int) -> dict:
    """Deblur one sample and write its outputs; returns its metrics row (status ok)."""
    t0 = time.time()
    loaded = io.load_sample(sample)
    sigma, source = io.resolve_sigma(loaded, ctx.args.sigma)
    if source == "estimated":
        print(f"{sample.name}: no σ given, estimated σ = {sigma * 255:.2f}/255 from the image", file=sys.stderr)
    y = io.image_to_tensor(loaded.y, ctx.device)
    k_true = torch.from_numpy(loaded.k_true) if loaded.k_true is not None else None
    if ctx.args.true_kernel and k_true is None:
        raise ValueError(f"{sample.blurry}: --true_kernel needs a ground-truth kernel")
    frames, kernels = [], []
    every = max(1, ctx.dcfg.steps // 20)

    def record(info):  # ~20 frames of x̂0 (first particle) and the kernel
        if info["i"] % every == 0:
            frames.append(io.tensor_to_image(info["x0"][:1].clamp(0, 1)))
            kernels.append(info["kernel"][0, 0].detach().cpu().numpy())
    callback = record if ctx.args.save_progress else None

    res, attempts, last_err = None, 0, None
    for attempt in range(ctx.dcfg.retries + 1):
        attempts += 1
        gen = torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1_000_003 + index * 1009 + attempt)
        frames.clear(), kernels.clear()
        try:
            res = restore(ctx, y, sigma, sample.kind, gen, k_true if ctx.args.true_kernel else None, callback)
            break
        except DivergenceError as e:
            last_err = e
            print(f"{sample.name}: attempt {attempt + 1}: {e}", file=sys.stderr)
    if res is None:
        raise DivergenceError(f"{last_err} (after {attempts} attempts)")
    x = res.image(ctx.dcfg.output)[0]
    k = res.kernel.detach().cpu().numpy()
    x_img = io.tensor_to_image(x.clamp(0, 1))
    out = ctx.save_dir
    name = sample.name
    io.save_png(out / "images" / f"{name}.png", x_img)
    if res.x.shape[0] > 1:
        for j in range(res.x.shape[0]):
            io.save_png(out / "images" / f"{name}_p{j}.png", io.tensor_to_image(res.x[j]))
    if ctx.args.save_npy:
        io.save_npy(out / "npy" / f"{name}.npy", x_img)
    io.save_npy(out / "kernels" / f"{name}.npy", k.astype(np.float32))
    io.save_kernel_png(out / "kernels" / f"{name}.png", k)
    io.save_png(out / "montage" / f"{name}.png",
                io.make_montage(np.clip(loaded.y, 0, 1), x_img, loaded.x_true, k, loaded.k_true))
    if frames:
        io.save_gif(out / "progress" / f"{name}_x0.gif", frames)
        io.save_gif(out / "progress" / f"{name}_kernel.gif",
                    [io.kernel_to_image(kk, 6) for kk in kernels])
    m = evaluate(x_img, loaded.y, k, sigma, loaded.x_true, loaded.k_true)
    row = {"name": name, "status": "ok", "message": "", "sigma": sigma, "sigma_source": source, **m,
           "seconds": round(time.time() - t0, 2), "nfe": res.nfe, "attempts": attempts}
    if loaded.x_true is not None:
        ks = max((loaded.k_true if loaded.k_true is not None else k).shape)
        row.update(blurry_scores(np.clip(loaded.y, 0, 1), loaded.x_true, ks))
        if res.x.shape[0] > 1:
            row["psnr_particles"] = ";".join(f"{psnr(io.tensor_to_image(p), loaded.x_true):.3f}" for p in res.x)
        ok, _ = lpips_available()
        if ok:
            row["lpips"], _ = lpips_distance(x_img, loaded.x_true)
    return row


def _versions() -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "git_commit": commit}


def run_all(ctx: Context, samples: list) -> list:
    """Process samples, skipping finished ones; a failed image gets a row and the run goes on."""
    from tqdm.auto import tqdm
    metrics = ctx.save_dir / "metrics.csv"
    done = set() if ctx.args.overwrite else io.read_done_names(metrics) if metrics.exists() else set()
    rows = []
    for index, sample in enumerate(tqdm(samples, desc="images")):
        if sample.name in done:
            print(f"{sample.name}: already done (use --overwrite to redo)", file=sys.stderr)
            continue
        try:
            row = process_one(ctx, sample, index)
        except (io.ImageReadError, DivergenceError, ValueError, OSError) as e:
            msg = " ".join(str(e).split())
            print(f"{sample.name}: FAILED: {msg}", file=sys.stderr)
            row = {"name": sample.name, "status": "failed", "message": msg}
        io.append_csv_row(metrics, FIELDS, row)
        rows.append(row)
    return rows


def summarise(ctx: Context, metrics_csv: Path) -> dict:
    import csv
    with open(metrics_csv, newline="") as f:
        last = {r["name"]: r for r in csv.DictReader(f)}
    ok = [r for r in last.values() if r["status"] == "ok"]
    means = {}
    for k in ("psnr", "ssim", "psnr_aligned", "ssim_aligned", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error",
              "psnr_blurry", "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned", "seconds", "nfe"):
        vals = [float(r[k]) for r in ok if r.get(k) not in (None, "", "None")]
        means[k] = float(np.mean(vals)) if vals else None
    lp_ok, lp_reason = lpips_available()
    return {"images": len(last), "ok": len(ok), "failed": len(last) - len(ok), "means": means,
            "lpips": "computed" if lp_ok else f"skipped: {lp_reason}",
            "device": str(ctx.device), "seed": ctx.seed, "versions": _versions(),
            "config": _resolved_config(ctx)}


def _resolved_config(ctx: Context) -> dict:
    """All three configs as used, plus the command-line arguments (saved as config.yaml and in summary.json)."""
    return {"diffusion": diffusion_config_dict(ctx.dcfg), "kernel": as_dict(ctx.kcfg),
            "model": as_dict(ctx.model_cfg), "args": vars(ctx.args)}


def main(argv=None, method: str = "fast_em") -> int:
    args = build_parser(method).parse_args(argv)
    if args.sigma is not None and not 0 <= args.sigma < 1:
        print(f"error: --sigma {args.sigma} is outside [0, 1): give σ in [0,1] units, e.g. {args.sigma / 255:.4f}",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        ctx = build_context(args, method)
        samples = io.list_inputs(args.input_dir)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_images is not None:
        samples = samples[: args.max_images]
    ctx.save_dir.mkdir(parents=True, exist_ok=True)
    io.save_text(ctx.save_dir / "config.yaml", yaml.safe_dump(_resolved_config(ctx), sort_keys=False))
    rows = run_all(ctx, samples)
    metrics = ctx.save_dir / "metrics.csv"
    if not metrics.exists():
        print("nothing to do", file=sys.stderr)
        return 0
    summary = summarise(ctx, metrics)
    io.save_json(ctx.save_dir / "summary.json", summary)
    m = summary["means"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{summary['ok']}/{summary['images']} images ok; mean PSNR {fmt(m['psnr'], '.2f')} dB "
          f"(blurry {fmt(m['psnr_blurry'], '.2f')}), SSIM {fmt(m['ssim'], '.3f')}, "
          f"kernel MSE {fmt(m['kernel_mse'], '.2e')}, {fmt(m['seconds'], '.1f')} s/image -> {ctx.save_dir}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1

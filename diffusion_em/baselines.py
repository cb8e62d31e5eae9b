"""Classical baselines in the runner's harness: same inputs, same output layout, same metrics.

    python -m diffusion_em.baselines --method l0_blind --input_dir T --save_dir R [--threads 1]

Methods (CPU, seconds per image):
- `blurry`: the observation itself (clipped): the floor every method must beat.
- `tikhonov`: true kernel, Gaussian gradient prior, practical λ = C σ² (classical.nonblind).
- `tikhonov_oracle`: the same with the per-image λ that minimises the error to the ground truth (a λ grid;
  the error after the metrics' border crop and alignment shift, as the tables score it):
  the "tuned Tikhonov" reference of issue 8, not a usable method (it needs the answer).
- `hyper_laplacian`: true kernel, Krishnan & Fergus 2009, α = 2/3, practical λ = C / σ²; the non-blind
  oracle of `l0_blind` for Levin's error ratio.
- `l0_blind`: kernel by multi-scale ℓ0 MAP (Pan et al. 2014 / Xu et al. 2013, classical.blind_l0),
  then `hyper_laplacian` with that kernel.
The non-blind oracles of our own method are the runner's `--true_kernel` runs.

Boundary: as the runner's `auto` (`--boundary` overrides): cases whose meta.csv declares `circular` are
solved on the FFT model as they are; all others are padded with the tapered mirror border of one kernel
size (util.geometry.pad_for_boundary) and cropped back.
Writes images/<name>.png, kernels/<name>.npy (+ .png), metrics.csv (the runner's metrics via
diffusion_em.evaluate.score_case, plus seconds and the λ used), summary.json, config.yaml (the settings:
method, input folder, kernel size, boundary, σ, --l0 overrides). Finished images are skipped; a rerun into
the same folder with other settings is refused unless --overwrite (as the runner, diffusion_em.results).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from classical import nonblind as NB
from classical.blind_l0 import L0Config, estimate_kernel
from diffusion_em.evaluate import score_case
from diffusion_em.results import OutputError, ResultsFolder
from util.csvlog import append_csv_row, read_done_names
from util.device import check_threads
from util.errors import InputError
from util.geometry import crop, pad_for_boundary
from util.images import ImageReadError, tensor_to_image
from util.metrics import align_border, aligned_scores
from util.inputs import Sample, check_sigma_flag, list_inputs, load_sample, resolve_sigma
from util.outputs import save_json, save_kernel_png, save_npy, save_png

METHODS = ("blurry", "tikhonov", "tikhonov_oracle", "hyper_laplacian", "l0_blind")
FIELDS = ("name", "status", "message", "method", "sigma", "boundary_mode", "lam", "psnr", "ssim", "psnr_aligned",
          "ssim_aligned", "shift_y", "shift_x", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error",
          "psnr_blurry", "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned", "psnr_particles", "seconds", "nfe")
PAD_MODES = ("auto", "circular", "taper", "reflect", "replicate")


def _mode(requested: str, sample: Sample) -> str:
    if requested != "auto":
        return requested
    return "circular" if sample.boundary == "circular" or sample.kind == "pickle" else "taper"


ORACLE_GRID = NB.log_grid(1e-4, 10.0, 8)


def aligned_mse(x_true: torch.Tensor, kernel_size: int, reference: torch.Tensor):
    """x -> MSE to x_true on the metrics' border crop after the integer shift that best aligns `reference`.
    Every λ's solution with one kernel shares that kernel's offset; a real capture's kernel is not centred, so
    an unaligned MSE would pick the λ that blurs the shifted result most (the oracle must tune on what is scored)."""
    ty, tx = aligned_scores(tensor_to_image(reference[0].clamp(0, 1).float()),
                            tensor_to_image(x_true[0].float()), kernel_size)["shift"]
    iy, ix, b = int(round(ty)), int(round(tx)), align_border(kernel_size)
    H, W = x_true.shape[-2:]
    ref_c = x_true[..., b:H - b, b:W - b]
    return lambda x: torch.mean((x.clamp(0, 1)[..., b + iy:H - b + iy, b + ix:W - b + ix] - ref_c) ** 2).item()


def deblur(method: str, y: torch.Tensor, sigma: float, k_true: Optional[torch.Tensor], kernel_size: int,
           l0cfg: L0Config = L0Config(), box=None) -> tuple:
    """(x̂, k̂, λ) for y (1, C, H, W) float64 on the FFT model (already padded if needed); k̂ None for
    `blurry`. `tikhonov_oracle` is handled by the caller (it needs the ground truth)."""
    if method == "blurry":
        return y.clamp(0, 1), None, None
    if method == "l0_blind":
        k = estimate_kernel(y[0].clamp(0, 1), kernel_size, l0cfg, box=box)
        lam = NB.hyper_laplacian_lambda(sigma)
        return NB.hyper_laplacian(y, k, lam), k, lam
    if k_true is None:
        raise ValueError(f"method {method} needs the ground-truth kernel (kernel/<name>.npy)")
    if method == "tikhonov":
        lam = NB.tikhonov_lambda(sigma)
        return NB.tikhonov(y, k_true, lam), k_true, lam
    if method == "hyper_laplacian":
        lam = NB.hyper_laplacian_lambda(sigma)
        return NB.hyper_laplacian(y, k_true, lam), k_true, lam
    raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")


def process_one(args, sample: Sample) -> dict:
    """Deblur one case with args.method, write its outputs, return its metrics row."""
    t0 = time.time()
    s = load_sample(sample, sigma_given=args.sigma is not None)
    sigma, _ = resolve_sigma(s, args.sigma)
    y = torch.from_numpy(s.y.transpose(2, 0, 1).astype(np.float64))[None]
    mode = _mode(args.boundary, sample)
    box = (0, 0) + tuple(y.shape[-2:])
    if mode != "circular":
        y, box = pad_for_boundary(y, args.kernel_size, mode)
    k_true = torch.from_numpy(s.k_true.astype(np.float64)) if s.k_true is not None else None
    if args.method == "tikhonov_oracle":
        if k_true is None or s.x_true is None:
            raise ValueError("tikhonov_oracle needs the ground-truth kernel and image")
        x_true = torch.from_numpy(s.x_true.transpose(2, 0, 1).astype(np.float64))[None]
        solve = lambda lam: crop(NB.tikhonov(y, k_true, lam), box)  # noqa: E731
        err = aligned_mse(x_true, max(k_true.shape), solve(NB.tikhonov_lambda(sigma)))
        lam, x = NB.oracle_lambda(solve, x_true, ORACLE_GRID, error=err)
        k = k_true
    else:
        x, k, lam = deblur(args.method, y, sigma, k_true, args.kernel_size, l0_config(args.l0), box)
        x = crop(x, box)
    seconds = round(time.time() - t0, 2)
    x_img = tensor_to_image(x[0].clamp(0, 1).float())
    out = Path(args.save_dir)
    save_png(out / "images" / f"{sample.name}.png", x_img)
    k_est = None
    if args.method == "l0_blind":  # only an estimated kernel is written and scored
        k_est = k.numpy()
        save_npy(out / "kernels" / f"{sample.name}.npy", k_est.astype(np.float32))
        save_kernel_png(out / "kernels" / f"{sample.name}.png", k_est)
    m = score_case(x_img, s, k_est, sigma)
    return {"name": sample.name, "status": "ok", "message": "", "method": args.method, "sigma": sigma,
            "boundary_mode": mode, "lam": lam, **m, "seconds": seconds, "nfe": 0}


def l0_config(overrides: str) -> L0Config:
    """L0Config with the --l0 JSON overrides (unknown names are an error: the config is strict)."""
    try:
        return replace(L0Config(), **json.loads(overrides))
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"--l0 {overrides!r}: {e}") from None


def check_flags(args) -> None:
    """Flag values that cannot work, refused before anything runs (InputError naming the flag; as the runner)."""
    check_threads(args.threads)
    for flag in ("max_images", "kernel_size"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise InputError(f"--{flag} {v}: must be >= 1")
    check_sigma_flag(args.sigma)
    l0_config(args.l0)


def settings_record(args) -> dict:
    """What decides a baseline's results (not output-only flags); --l0 only where it applies and is given."""
    l0 = json.loads(args.l0) if args.method == "l0_blind" else {}
    return {"method": args.method, "input_dir": str(Path(args.input_dir).resolve()), "kernel_size": args.kernel_size,
            "boundary": args.boundary, "sigma": args.sigma, **({"l0": l0} if l0 else {})}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion_em.baselines", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--input_dir", required=True, help="test-set folder (as for the runner)")
    p.add_argument("--save_dir", required=True)
    p.add_argument("--kernel_size", type=int, default=33, help="support of the blind kernel estimate; padding width")
    p.add_argument("--boundary", default="auto", choices=PAD_MODES)
    p.add_argument("--sigma", type=float, default=None, help="σ in [0,1] units for every image (else meta/estimated)")
    p.add_argument("--max_images", type=int, default=None)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--l0", default="{}", help="l0_blind: JSON overrides of classical.blind_l0.L0Config, e.g. '{\"iters\": 8}'")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    folder = ResultsFolder(args.save_dir, fields=FIELDS)
    try:
        check_flags(args)
        samples = list_inputs(args.input_dir, notice=lambda m: print(f"note: {m}", file=sys.stderr))[: args.max_images]
        settings = settings_record(args)
        folder.check()
        folder.claim(settings, args.overwrite)
    except (FileNotFoundError, ValueError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    folder.write_config({"settings": settings, "threads": args.threads, "args": vars(args)})
    out = Path(args.save_dir)
    metrics = out / "metrics.csv"
    done = set() if args.overwrite else read_done_names(metrics)
    rows = []
    for sample in samples:
        if sample.name in done:
            continue
        try:
            row = process_one(args, sample)
        except (ImageReadError, ValueError, OSError) as e:
            row = {"name": sample.name, "status": "failed", "message": " ".join(str(e).split()), "method": args.method}
            print(f"{sample.name}: FAILED: {row['message']}", file=sys.stderr)
        append_csv_row(metrics, FIELDS, row)
        rows.append(row)
        if row["status"] == "ok":
            fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731  (no sharp image, or too small to align)
            print(f"{sample.name}: {args.method} PSNR {fmt(row['psnr'])} (aligned {fmt(row['psnr_aligned'])}), "
                  f"{row['seconds']:.1f} s", flush=True)
    if metrics.exists():
        from diffusion_em.evaluate import summarise, read_run_metrics
        summary = summarise(list(read_run_metrics(out).values()))
        save_json(out / "summary.json", {**summary, "method": args.method, "args": vars(args)})
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""How good is a diffusion prior? Denoising and non-blind ΠGDM deblurring figures, one JSON line each.

    python bench/prior_eval.py                                  # the bundled prior (configs/model_config_bundled.yaml)
    python bench/prior_eval.py --weights runs/x/prior.pt --n_crops 8 --n_extra 0 --threads 2

(a) Denoising: x̂0 (Tweedie, one UNet call) at the timestep whose noise std is closest to each requested
    level (reported exactly, in /255 units), on `--n_crops` seeded 256×256 crops of BSDS500 test images and
    on the FFHQ faces of ../shared/data/ffhq, against a Gaussian filter whose width is the best one for that
    set and level (an oracle choice, so the baseline is as strong as a Gaussian filter can be).
(b) Non-blind ΠGDM (100 steps, authors' rule) with the true kernel on the bundled testset, plus
    `--n_extra` BSDS500 test crops (--extra_size, 128 by default to bound the run time) blurred circularly
    with Levin kernels at σ cycling through --sigmas:
    PSNR of the result, of the blurry input, the gain, and seconds per image.
Needs ../shared (BSDS500, FFHQ, Levin kernels); without it the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))

from diffusion_em.blur import BlurOperator  # noqa: E402
from diffusion_em.nonblind import deblur_nonblind  # noqa: E402
from guided_diffusion.denoiser import EpsDenoiser, to_model, to_phys  # noqa: E402
from guided_diffusion.guidance import PiGDM  # noqa: E402
from guided_diffusion.schedule import Schedule  # noqa: E402
from guided_diffusion.model_config import build_unet, load_model_config  # noqa: E402
from guided_diffusion.unet import load_weights  # noqa: E402
from util.images import read_image, read_kernel  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import psnr  # noqa: E402

TESTSET_SOURCES = {"134049", "388018", "288024"}  # BSDS test images already in testset/: keep the extras distinct
GAUSS_WIDTHS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0)


def emit(obj):
    print(json.dumps(obj), flush=True)


def to_t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()


def gaussian_filter(x: torch.Tensor, width: float) -> torch.Tensor:
    r = int(np.ceil(3 * width))
    g = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / width) ** 2)
    g = (g / g.sum()).to(x)
    C = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def bsds_test_crops(n: int, size: int, rng: np.random.Generator, exclude=()) -> list:
    files = [p for p in sorted((SHARED / "data" / "bsds500" / "test").glob("*.jpg")) if p.stem not in exclude]
    pick = rng.choice(len(files), size=min(n, len(files)), replace=False)
    crops = []
    for j in sorted(pick):
        a = read_image(files[j], clip=True)
        top, left = rng.integers(0, a.shape[0] - size + 1), rng.integers(0, a.shape[1] - size + 1)
        crops.append((files[j].stem, a[top:top + size, left:left + size]))
    return crops


def denoise_figures(model, sets: dict, levels_255, batch: int):
    sched = Schedule.create(1000)
    den = EpsDenoiser(model, sched, clip=True)
    ratio = np.sqrt((1 - sched.alphas_cumprod) / sched.alphas_cumprod) / 2  # noise std of the noisy image in [0,1]
    g = torch.Generator().manual_seed(1)
    for set_name, images in sets.items():
        x = torch.cat([to_t(a) for a in images])
        for level in levels_255:
            i = int(np.argmin(np.abs(ratio - level / 255)))
            ac = float(sched.alphas_cumprod[i])
            x_t = ac ** 0.5 * to_model(x) + (1 - ac) ** 0.5 * torch.randn(x.shape, generator=g)
            noisy = to_phys(x_t / ac ** 0.5)
            t0 = time.time()
            with torch.no_grad():
                x0 = torch.cat([to_phys(den.x0(x_t[b:b + batch], i)) for b in range(0, len(x), batch)])
            sec = (time.time() - t0) / len(x)
            per_width = {w: np.mean([psnr(gaussian_filter(noisy[j:j + 1], w).clamp(0, 1), x[j:j + 1])
                                     for j in range(len(x))]) for w in GAUSS_WIDTHS}
            best_w = max(per_width, key=per_width.get)
            p_noisy = np.mean([psnr(noisy[j:j + 1].clamp(0, 1), x[j:j + 1]) for j in range(len(x))])
            p_prior = np.mean([psnr(x0[j:j + 1], x[j:j + 1]) for j in range(len(x))])
            emit({"kind": "denoise", "set": set_name, "n": len(x), "size": list(x.shape[-2:]),
                  "sigma_255": round(float(ratio[i]) * 255, 2), "t": int(sched.timesteps[i]),
                  "psnr_noisy": round(float(p_noisy), 2), "psnr_gauss": round(float(per_width[best_w]), 2),
                  "gauss_width": best_w, "psnr_prior": round(float(p_prior), 2),
                  "gain_over_gauss": round(float(p_prior - per_width[best_w]), 2), "s_per_image": round(sec, 3)})


def deblur_cases(args, rng: np.random.Generator) -> list:
    """(name, y, x, k, sigma): the bundled testset, then BSDS test crops blurred with Levin kernels."""
    cases = []
    for s in list_inputs(ROOT / "testset"):
        ls = load_sample(s)
        cases.append((f"testset/{ls.name}", ls.y, ls.x_true, ls.k_true, float(ls.sigma)))
    if args.n_extra:
        levin = sorted((SHARED / "data" / "kernels" / "levin09").glob("levin_*.npy"))
        g = torch.Generator().manual_seed(2)
        for j, (stem, x) in enumerate(bsds_test_crops(args.n_extra, args.extra_size, rng, exclude=TESTSET_SOURCES)):
            kp = levin[j % len(levin)]
            k = read_kernel(kp)
            sigma = args.sigmas[j % len(args.sigmas)] / 255
            op = BlurOperator.from_kernel(torch.from_numpy(k).float(), (args.extra_size,) * 2, sigma)
            xt = to_t(x)
            y = op.A(xt) + sigma * torch.randn(xt.shape, generator=g)
            cases.append((f"bsds_test/{stem}+{kp.stem}", y[0].permute(1, 2, 0).numpy(), x, k, sigma))
    return cases


def deblur_figures(model, args, rng):
    den = EpsDenoiser(model, Schedule.create(args.steps), clip=True)
    rows = []
    for name, y, x, k, sigma in deblur_cases(args, rng)[:args.limit or None]:
        yt, xt = to_t(y), to_t(x)
        g = torch.Generator().manual_seed(args.seed)
        t0 = time.time()
        x_hat = deblur_nonblind(den, yt, torch.from_numpy(k).float(), sigma, PiGDM(), g)
        sec = time.time() - t0
        p_in, p_out = psnr(yt.clamp(0, 1), xt), psnr(x_hat[:1], xt)
        row = {"kind": "deblur_nonblind", "case": name, "sigma_255": round(sigma * 255, 2), "steps": args.steps,
               "psnr_blurry": round(p_in, 2), "psnr_pigdm": round(p_out, 2), "gain": round(p_out - p_in, 2),
               "s_per_image": round(sec, 1)}
        rows.append(row)
        emit(row)
    for group, sel in [("testset", [r for r in rows if r["case"].startswith("testset/")]), ("all", rows)]:
        if not sel:
            continue
        by_sigma = {}
        for r in sel:
            by_sigma.setdefault(r["sigma_255"], []).append(r["gain"])
        emit({"kind": "deblur_summary", "group": group, "n": len(sel),
              "mean_gain": round(float(np.mean([r["gain"] for r in sel])), 2),
              "min_gain": round(float(np.min([r["gain"] for r in sel])), 2),
              "mean_gain_by_sigma_255": {str(s): round(float(np.mean(v)), 2) for s, v in sorted(by_sigma.items())},
              "mean_s_per_image": round(float(np.mean([r["s_per_image"] for r in sel])), 1)})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_config", default=str(ROOT / "configs" / "model_config_bundled.yaml"))
    ap.add_argument("--weights", default=None, help="overrides the config's model_path")
    ap.add_argument("--n_crops", type=int, default=16, help="BSDS500 test crops (256×256) for denoising")
    ap.add_argument("--levels", type=float, nargs="+", default=[5, 10, 25, 50], help="noise std, /255")
    ap.add_argument("--n_extra", type=int, default=3, help="extra BSDS test crops for non-blind deblurring")
    ap.add_argument("--extra_size", type=int, default=128, help="side of the extra crops (128: a quarter of the cost)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[5, 10, 20], help="σ/255 of the extra cases")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--no_deblur", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="deblur only the first K cases (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if not (SHARED / "data").is_dir():
        print(f"prior_eval: skipped, {SHARED / 'data'} not found (BSDS500/FFHQ/Levin data live in the project's "
              f"shared folder, not in a clone)", file=sys.stderr)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_model_config(args.model_config)
    if cfg.schedule != "linear":
        raise SystemExit(f"{args.model_config}: prior_eval assumes the linear schedule, got {cfg.schedule!r}")
    weights = args.weights or str(ROOT / cfg.model_path)
    model = load_weights(build_unet(cfg), weights).eval()
    emit({"kind": "model", "config": str(Path(args.model_config).resolve().relative_to(ROOT)) if
          Path(args.model_config).resolve().is_relative_to(ROOT) else args.model_config,
          "weights": weights, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
          "threads": torch.get_num_threads()})
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    sets = {"bsds_test": [a for _, a in bsds_test_crops(args.n_crops, 256, rng)],
            "ffhq": [read_image(p, clip=True) for p in sorted((SHARED / "data" / "ffhq").glob("*.png"))]}
    denoise_figures(model, sets, args.levels, args.batch)
    if not args.no_deblur:
        deblur_figures(model, args, rng)
    emit({"kind": "total", "seconds": round(time.time() - t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

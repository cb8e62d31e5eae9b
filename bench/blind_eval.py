"""Blind vs non-blind on a test-set folder: PSNR of the blurry input, of non-blind ΠGDM with the true kernel,
and of Fast EM (blind), with aligned kernel MSE and seconds per image. One JSON line per case, then a summary.

    python bench/blind_eval.py                                   # bundled testset, bundled prior, Fast EM ΠGDM
    python bench/blind_eval.py --input_dir data_local/heldout --diffusion_config configs/diffusion_config_fastem_pigdm.yaml

Takes the same flags as test_FastDiffEM.py (model/diffusion/kernel configs, --steps, --seed, --device...).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.em import DivergenceError  # noqa: E402
from diffusion_em.restore import boundary_mode, restore  # noqa: E402
from diffusion_em.run import build_parser, restorer_from_args  # noqa: E402
from util.images import image_to_tensor, tensor_to_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import kernel_mse, psnr  # noqa: E402


def main(argv=None):
    p = build_parser("fast_em")
    p.add_argument("--skip_nonblind", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = restorer_from_args(args, "fast_em")
    rows = []
    samples = list_inputs(args.input_dir)[: args.max_images]
    for index, sample in enumerate(samples):
        s = load_sample(sample)
        if s.x_true is None or s.k_true is None:
            print(f"{sample.name}: no ground truth, skipped", file=sys.stderr)
            continue
        y = image_to_tensor(s.y, ctx.device)
        k_true = torch.from_numpy(s.k_true)
        row = {"name": sample.name, "sigma255": round(s.sigma * 255, 2),
               "psnr_blurry": psnr(np.clip(s.y, 0, 1), s.x_true)}
        runs = [("blind", None)] + ([] if args.skip_nonblind else [("nonblind", k_true)])
        for tag, k in runs:
            gen = torch.Generator(device=ctx.device).manual_seed(args.seed * 1_000_003 + index * 1009)
            t0 = time.time()
            try:
                res = restore(ctx, y, s.sigma, gen, boundary=boundary_mode(ctx.dcfg.boundary, sample.kind, sample.boundary), k_true=k)
            except DivergenceError as e:
                row[f"psnr_{tag}"], row[f"error_{tag}"] = None, str(e)
                continue
            row[f"seconds_{tag}"] = round(time.time() - t0, 1)
            row[f"psnr_{tag}"] = psnr(tensor_to_image(res.image(ctx.dcfg.output, ctx.dcfg.classical_blend,
                                                                 res.anchored is not None)[0]), s.x_true)
            if tag == "blind":
                row["kernel_mse"], row["kernel_mse_raw"] = kernel_mse(res.kernel.cpu().numpy(), s.k_true)
        print(json.dumps(row), flush=True)
        rows.append(row)

    def mean(key):
        v = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(v)) if v else None

    summary = {k: mean(k) for k in ("psnr_blurry", "psnr_nonblind", "psnr_blind", "kernel_mse", "seconds_blind",
                                     "seconds_nonblind")}
    ok = [r for r in rows if r.get("psnr_blind") is not None]
    summary["blind_failed"] = len(rows) - len(ok)
    summary["worst_blind_minus_blurry"] = min((r["psnr_blind"] - r["psnr_blurry"] for r in ok), default=None)
    if not args.skip_nonblind:
        gaps = [r["psnr_nonblind"] - r["psnr_blind"] for r in ok if r.get("psnr_nonblind") is not None]
        summary["mean_nonblind_minus_blind"] = float(np.mean(gaps)) if gaps else None
    summary.update(n=len(rows), config=args.diffusion_config, model=args.img_model_config, steps=ctx.dcfg.steps,
                   precision=ctx.precision)
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()

"""Output and M-step options side by side on a test-set folder (issue 8 items 3-5).

For every case: the blurry input and Tikhonov with the true kernel (λ tuned per image on plain PSNR: an
oracle baseline); for every variant (diffusion-config overrides): blind Fast EM and, with --oracle, the same
sampler with the true kernel. Each result is scored as a posterior sample (first particle) and as the
particle mean, plain and shift-aligned (util.metrics.aligned_scores), with aligned kernel MSE, seconds and
UNet evaluations. One JSON line per (case, variant); `--table FILE.jsonl` prints the tables per σ and per
kernel extent from such a file, `--compare FILE.jsonl` one aligned-PSNR table across its variants.

    python bench/quality_options.py --input_dir D --variants '{"paper": {}, "mean4": {"n_particles": 4, "branch_fraction": 0.3, "output": "mean"}}' --oracle --out r.jsonl
    python bench/quality_options.py --table r.jsonl

`--oracle_only` (with `--oracle`) skips the blind runs. Takes the flags of test_FastDiffEM.py (configs,
--steps, --seed, --threads, --max_images...). Variant keys
are diffusion-config keys; 'mstep.KEY' sets a key of the M-step section.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.config import diffusion_config_dict, diffusion_config_from_dict  # noqa: E402
from diffusion_em.em import DivergenceError, Guard  # noqa: E402
from diffusion_em.restore import guidance_for, restore  # noqa: E402
from diffusion_em.run import build_parser, image_boundary, restorer_from_args  # noqa: E402
from kernel_denoiser.kernels import kernel_stats  # noqa: E402
from util.images import image_to_tensor, tensor_to_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import aligned_scores, kernel_mse, psnr  # noqa: E402


def tikhonov(y: np.ndarray, k: np.ndarray, lam: float) -> np.ndarray:
    """x̂ = F⁻¹[conj(K)·Y / (|K|² + λ|∇|²)], circular, centred kernel; y H×W×C."""
    H, W = y.shape[:2]
    s1, s2 = k.shape
    kp = np.zeros((H, W))
    kp[:s1, :s2] = k
    K = np.fft.fft2(np.roll(kp, (-(s1 // 2), -(s2 // 2)), (0, 1)))[..., None]
    fy, fx = np.meshgrid(np.fft.fftfreq(H), np.fft.fftfreq(W), indexing="ij")
    G = (4 * np.sin(np.pi * fy) ** 2 + 4 * np.sin(np.pi * fx) ** 2)[..., None]  # |F of forward differences|²
    X = np.conj(K) * np.fft.fft2(y, axes=(0, 1)) / (np.abs(K) ** 2 + lam * G)
    return np.clip(np.real(np.fft.ifft2(X, axes=(0, 1))), 0, 1)


def tikhonov_oracle(y, k, x_true, lams=np.logspace(-4, 0, 17)):
    """The best λ on a log grid, judged by plain PSNR against the ground truth: (image, λ)."""
    scored = [(psnr(xh, x_true), lam, xh) for lam in lams for xh in [tikhonov(y, k, lam)]]
    best = max(scored, key=lambda t: t[0])
    return best[2], best[1]


def scores(img: np.ndarray, x_true: np.ndarray, ks: int) -> list:
    """[plain PSNR, aligned PSNR]."""
    return [round(psnr(img, x_true), 3), round(aligned_scores(img, x_true, ks)["psnr_aligned"], 3)]


def variant_restorer(base, overrides: dict):
    """The restorer with diffusion-config overrides (validated like a config file; not 'steps')."""
    for key, flag in (("steps", "--steps"), ("precision", "--precision"), ("compile", "a config with compile")):
        if key in overrides:  # these build the denoiser, which the variants share
            raise ValueError(f"'{key}' is not a variant key (the denoiser is built once): use {flag}")
    d = diffusion_config_dict(base.dcfg)
    for key, v in overrides.items():
        sec, _, name = key.rpartition(".")
        (d[sec] if sec else d)[name] = v
    dcfg = diffusion_config_from_dict(d, f"variant {overrides}")
    guard = Guard(max_residual=dcfg.guard_residual, max_saturation_excess=dcfg.guard_saturation)
    return dataclasses.replace(base, dcfg=dcfg, guard=guard, guidance=guidance_for(dcfg))


def run_cases(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = restorer_from_args(args, "fast_em")
    variants = json.loads(args.variants)
    samples = list_inputs(args.input_dir)
    if args.names:
        samples = [s for s in samples if s.name in set(args.names.split(","))]
    samples = samples[: args.max_images]
    for index, sample in enumerate(samples):
        s = load_sample(sample)
        ks = int(max(s.k_true.shape))
        y_img = np.clip(s.y, 0, 1)
        x_tik, lam = tikhonov_oracle(s.y.astype(np.float64), s.k_true.astype(np.float64), s.x_true)
        case = {"name": sample.name, "sigma255": round(s.sigma * 255, 2), "kernel_size": ks,
                "kernel_extent": kernel_stats(s.k_true)["extent"],
                "blurry": scores(y_img, s.x_true, ks), "tikhonov": scores(x_tik, s.x_true, ks), "tikhonov_lam": lam}
        y = image_to_tensor(s.y, base.device)
        for vname, over in variants.items():
            r = variant_restorer(base, over)
            row = {**case, "variant": vname, "overrides": over, "precision": base.precision}
            oracle = args.oracle and (not args.oracle_for or vname in args.oracle_for.split(","))
            tags = ([] if args.oracle_only else [("blind", None)]) + ([("oracle", torch.from_numpy(s.k_true))] if oracle else [])
            for tag, k in tags:
                gen = torch.Generator(device=r.device).manual_seed(args.seed * 1_000_003 + index * 1009)
                t0 = time.time()
                try:
                    res = restore(r, y, s.sigma, gen, boundary=image_boundary(args.boundary, base.dcfg, sample), k_true=k)
                except DivergenceError as e:
                    row[f"{tag}_error"] = str(e)
                    continue
                row[f"{tag}_seconds"] = round(time.time() - t0, 1)
                row[f"{tag}_nfe"] = res.nfe
                row[f"{tag}_sample"] = scores(tensor_to_image(res.image("sample")[0]), s.x_true, ks)
                row[f"{tag}_mean"] = scores(tensor_to_image(res.image("mean")[0]), s.x_true, ks)
                row[f"{tag}_output"] = row[f"{tag}_{r.dcfg.output}"]
                anchor = res.anchored is not None
                if r.dcfg.classical_blend or anchor:  # the output is not the diffusion image: keep its scores beside
                    row[f"{tag}_diffusion"] = row[f"{tag}_output"]
                    row[f"{tag}_output"] = scores(tensor_to_image(res.image(r.dcfg.output, r.dcfg.classical_blend,
                                                                            anchor)[0]), s.x_true, ks)
                if tag == "blind":
                    row["kernel_mse"] = kernel_mse(res.kernel.cpu().numpy(), s.k_true)[0]
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def _mean(rows, key, j):
    v = [r[key][j] for r in rows if r.get(key) is not None]
    return f"{np.mean(v):.2f}" if v else "-"


def table(path: str) -> None:
    """Markdown tables: per variant, all cases, per σ and per kernel-extent bucket (mean PSNR, dB)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    by_variant = defaultdict(list)
    for r in rows:
        by_variant[r["variant"]].append(r)
    cols = ["blurry", "tikhonov", "blind_output", "oracle_output", "blind_sample", "blind_mean"]
    for vname, rs in by_variant.items():
        print(f"\n### {vname} {json.dumps(rs[0]['overrides'])} ({len(rs)} cases)\n")
        print("| group | n | " + " | ".join(f"{c} plain / aligned" for c in cols) + " | kernel MSE | worst blind−blurry (al.) | s/img |")
        print("|" + "---|" * (len(cols) + 5))
        groups = [("all", rs)] + [(f"σ {s:g}", [r for r in rs if r["sigma255"] == s])
                                  for s in sorted({r["sigma255"] for r in rs})]
        for lo, hi in ((1, 13), (14, 21), (22, 64)):
            groups.append((f"extent {lo}-{hi}", [r for r in rs if lo <= r["kernel_extent"] <= hi]))
        for g, grs in groups:
            if not grs:
                continue
            cells = [f"{_mean(grs, c, 0)} / {_mean(grs, c, 1)}" for c in cols]
            km = [r["kernel_mse"] for r in grs if "kernel_mse" in r]
            worst = [r["blind_output"][1] - r["blurry"][1] for r in grs if "blind_output" in r]
            sec = [r["blind_seconds"] for r in grs if "blind_seconds" in r]
            failed = sum("blind_error" in r for r in grs)
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            print(f"| {g} | {len(grs)}{f' ({failed} failed)' if failed else ''} | " + " | ".join(cells)
                  + f" | {fmt(np.mean(km) if km else None, '.2e')} | {fmt(min(worst) if worst else None, '+.2f')}"
                  f" | {fmt(np.mean(sec) if sec else None, '.0f')} |")


def compare(path: str) -> None:
    """One markdown table across variants (aligned PSNR, dB): per σ and per kernel extent, on the cases every
    variant finished; oracle columns from the variants that ran it."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by_case = defaultdict(dict)
    for r in rows:
        by_case[r["name"]][r["variant"]] = r
    cases = [c for c in by_case.values() if all(v in c and "blind_output" in c[v] for v in variants)]
    oracle = [v for v in variants if any("oracle_output" in c[v] for c in cases)]
    head = (["blurry", "Tikhonov (true k)"] + [f"oracle {v} sample" for v in oracle]
            + [f"oracle {v} output" for v in oracle]
            + [f"blind {v}" for v in variants] + [f"kernel MSE {v}" for v in variants]
            + [f"worst blind {v} − blurry" for v in variants])
    print(f"{len(cases)} cases; aligned PSNR (dB)\n")
    print("| group | n | " + " | ".join(head) + " |")
    print("|" + "---|" * (len(head) + 2))
    groups = [("all", cases)] + [(f"σ {s:g}/255", [c for c in cases if c[variants[0]]["sigma255"] == s])
                                 for s in sorted({c[variants[0]]["sigma255"] for c in cases})]
    for lo, hi in ((1, 13), (14, 21), (22, 64)):
        groups.append((f"extent {lo}–{hi} px", [c for c in cases if lo <= c[variants[0]]["kernel_extent"] <= hi]))
    for g, cs in groups:
        if not cs:
            continue
        m = lambda f: f"{np.mean([f(c) for c in cs]):.2f}"  # noqa: E731
        cells = [m(lambda c: c[variants[0]]["blurry"][1]), m(lambda c: c[variants[0]]["tikhonov"][1])]
        cells += [m(lambda c, v=v: c[v]["oracle_sample"][1]) for v in oracle]
        cells += [m(lambda c, v=v: c[v]["oracle_output"][1]) for v in oracle]
        cells += [m(lambda c, v=v: c[v]["blind_output"][1]) for v in variants]
        cells += [f"{np.mean([c[v]['kernel_mse'] for c in cs]):.2e}" for v in variants]
        cells += [f"{min(c[v]['blind_output'][1] - c[v]['blurry'][1] for c in cs):+.2f}" for v in variants]
        print(f"| {g} | {len(cs)} | " + " | ".join(cells) + " |")


def main(argv=None):
    p = build_parser("fast_em")
    p.add_argument("--variants", default='{"config": {}}', help="JSON {name: {config key: value}}")
    p.add_argument("--oracle", action="store_true", help="also run each variant with the true kernel")
    p.add_argument("--oracle_only", action="store_true", help="run only the true-kernel runs (with --oracle)")
    p.add_argument("--oracle_for", default=None, help="comma-separated variants that get the oracle run (default: all)")
    p.add_argument("--names", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--table", default=None, help="print the tables of a JSON-lines file and exit")
    p.add_argument("--compare", default=None, help="print one table across the variants of a JSON-lines file and exit")
    args = p.parse_args(argv)
    if args.table:
        table(args.table)
    elif args.compare:
        compare(args.compare)
    else:
        run_cases(args)


if __name__ == "__main__":
    main()

"""M-step benchmark: kernel accuracy with the sharp image known, and time per call.

    python -m bench.mstep_bench                       # 33×33, trained denoiser vs none, JSON lines on stdout
    python -m bench.mstep_bench --kernel_size 64      # the 64×64 denoiser on 64×64 kernels
    python -m bench.mstep_bench --timing_only

Accuracy protocol (the issue's "sharp image known" setting): for each of the 9 FFHQ faces (RGBA: alpha
dropped) × kernels (Levin's 8 zero-padded centred to s×s, plus `--n_generated` kernels from our generator
with a seed disjoint from training) × σ ∈ {5, 10, 20}/255: y = k ⊛ x (circular) + σ·n (seeded, not
clipped); the M-step is then called `--calls` times (J = 10 HQS iterations each) starting from the centred
Dirac, feeding back its kernel, as Fast EM does across diffusion steps — here with the true sharp image as
x (n = 1). No re-centring (x is registered with y; re-centring would move Levin's off-centre kernels).
Score: docs/algorithm.md §5 kernel MSE (util.metrics.kernel_mse: normalised, best integer shift within ±4 px,
/ number of taps of the estimate), mean and worst, with the trained denoiser and without any prior.

Timing: one M-step call (J = 10) at 256×256 RGB, n = 1, 1 thread, median of `--reps` calls, with and
without the denoiser, plus the straightforward full-size implementation (one 256×256 FFT pair per HQS
iteration, as the authors' code does) for reference. Wall time (median, min) and the thread's CPU time
(median; what the call costs when the shared CPU is oversubscribed) are printed with the load average.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import numpy as np
import torch

from diffusion_em.mstep import MStepConfig, m_step
from kernel_denoiser.kernels import camera_shake_kernels
from kernel_denoiser.network import load_kernel_denoiser
from util.fft import conv_circular, o2p, p2o
from util.geometry import dirac, pad_centred, project_simplex
from util.images import read_image
from util.metrics import kernel_mse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")


def _levin(i: int, s: int) -> np.ndarray:
    k = np.load(os.path.join(SHARED, "data", "kernels", "levin09", f"levin_{i}.npy")).astype(np.float32)
    return pad_centred(k / k.sum(), s)


def load_kernels(s: int, n_generated: int, seed: int) -> list[tuple[str, np.ndarray]]:
    ks = [(f"levin_{i}", _levin(i, s)) for i in range(1, 9)]
    gen = camera_shake_kernels(n_generated, s, np.random.default_rng(seed)) if n_generated else []
    ks += [(f"gen_{i}", k) for i, k in enumerate(gen)]
    return ks


def naive_m_step(y, x, k, sigma, cfg, denoiser=None):
    """Reference: the data step at full image size in every HQS iteration (authors' structure, joint colour)."""
    H, W = y.shape[-2:]
    s = k.shape[-1]
    Y, X = torch.fft.rfft2(y), torch.fft.rfft2(x)
    num = (Y * X.conj()).mean(0).sum(0)
    den = (X.abs() ** 2).mean(0).sum(0) + cfg.beta * sigma ** 2
    K = k.reshape(1, 1, s, s)
    for _ in range(cfg.J):
        Z = o2p((num + cfg.beta * sigma ** 2 * p2o(K[0, 0], (H, W))) / den, (H, W), (s, s))
        K = project_simplex(Z[None, None])
        if denoiser is not None:
            K = project_simplex(denoiser(K, cfg.denoiser_sigma))
    return K


def timing(den, reps: int, s: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 256, 256, generator=g)
    k = torch.from_numpy(camera_shake_kernels(1, s, np.random.default_rng(1))[0])
    y = conv_circular(x, k) + 0.02 * torch.randn(x.shape, generator=g)
    out = []
    variants = [("ours", "joint", None), ("ours", "joint", den), ("ours", "per_channel_mean", den),
                ("naive_full_size", "joint", None), ("naive_full_size", "joint", den)]
    for impl, colour, d in variants:
        cfg = MStepConfig(colour=colour)
        fn = (lambda: m_step(y, x, dirac(s), 0.02, cfg, d)) if impl == "ours" else \
             (lambda: naive_m_step(y, x, dirac(s), 0.02, cfg, d))
        with torch.no_grad():
            for _ in range(3):
                fn()
            ts, cs = [], []
            for _ in range(reps):
                t0, c0 = time.perf_counter(), time.thread_time()
                fn()
                ts.append(time.perf_counter() - t0)
                cs.append(time.thread_time() - c0)
        out.append({"kind": "timing", "impl": impl, "colour": colour, "denoiser": d is not None, "image": "256x256x3",
                    "kernel_size": s, "J": cfg.J, "ms_median": round(1e3 * statistics.median(ts), 2),
                    "ms_min": round(1e3 * min(ts), 2),
                    "cpu_ms_median": round(1e3 * statistics.median(cs), 2), "threads": torch.get_num_threads(),
                    "loadavg_1min": os.getloadavg()[0]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="M-step benchmark (kernel MSE with known sharp image; time per call)")
    ap.add_argument("--kernel_size", type=int, default=33)
    ap.add_argument("--denoiser", default=None, help="default models/kernel_denoiser_<s>.pth")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--n_generated", type=int, default=8)
    ap.add_argument("--seed", type=int, default=20240)
    ap.add_argument("--sigmas", default="5,10,20", help="noise levels in /255 units")
    ap.add_argument("--images", type=int, default=9, help="use the first N FFHQ faces")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--timing_only", action="store_true")
    ap.add_argument("--per_case", action="store_true", help="also print one line per case")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = a.kernel_size
    den_path = a.denoiser or os.path.join(ROOT, "models", f"kernel_denoiser_{s}.pth")
    den = load_kernel_denoiser(den_path)
    print(json.dumps({"kind": "setup", "denoiser": os.path.relpath(den_path, ROOT), "kernel_size": s, "calls": a.calls,
                      "J": 10, "sigmas_255": a.sigmas, "torch": torch.__version__}))
    for rec in timing(den, a.reps, s):
        print(json.dumps(rec), flush=True)
    if a.timing_only:
        return
    if not os.path.isdir(SHARED):
        print(json.dumps({"kind": "skipped", "why": f"{SHARED} not found: no FFHQ faces / Levin kernels"}))
        return
    faces = sorted(glob.glob(os.path.join(SHARED, "data", "ffhq", "*.png")))[:a.images]
    kernels = load_kernels(s, a.n_generated, a.seed)
    sigmas = [float(v) / 255 for v in a.sigmas.split(",")]
    cfg = MStepConfig()
    results = {True: [], False: []}
    t_start = time.time()
    for fi, f in enumerate(faces):
        x = torch.from_numpy(read_image(f).transpose(2, 0, 1).copy())[None]
        for ki, (kname, k) in enumerate(kernels):
            kt = torch.from_numpy(k)
            for si, sigma in enumerate(sigmas):
                g = torch.Generator().manual_seed(10000 * fi + 10 * ki + si)
                y = conv_circular(x, kt) + sigma * torch.randn(x.shape, generator=g)
                for use_den in (True, False):
                    K = dirac(s)
                    for _ in range(a.calls):
                        K = m_step(y, x, K, sigma, cfg, den if use_den else None)
                    aligned, raw = kernel_mse(K, k)
                    rec = {"face": os.path.basename(f), "kernel": kname, "sigma_255": round(sigma * 255),
                           "denoiser": use_den, "mse_aligned": aligned, "mse_raw": raw}
                    results[use_den].append(rec)
                    if a.per_case:
                        print(json.dumps({"kind": "case", **rec}), flush=True)
    for use_den in (True, False):
        rs = results[use_den]
        groups = {"all": rs, "levin": [r for r in rs if r["kernel"].startswith("levin")],
                  "generated": [r for r in rs if r["kernel"].startswith("gen")]}
        groups.update({f"sigma_{v}": [r for r in rs if r["sigma_255"] == v] for v in sorted({r["sigma_255"] for r in rs})})
        for gname, grp in groups.items():
            if not grp:
                continue
            v = np.array([r["mse_aligned"] for r in grp])
            worst = grp[int(v.argmax())]
            print(json.dumps({"kind": "summary", "denoiser": use_den, "group": gname, "n": len(grp),
                              "mse_aligned_mean": float(v.mean()), "mse_aligned_median": float(np.median(v)),
                              "mse_aligned_worst": float(v.max()),
                              "mse_raw_mean": float(np.mean([r["mse_raw"] for r in grp])),
                              "worst_case": f"{worst['face']}/{worst['kernel']}/sigma{worst['sigma_255']}"}))
    print(json.dumps({"kind": "done", "wall_s": round(time.time() - t_start, 1)}))


if __name__ == "__main__":
    main()

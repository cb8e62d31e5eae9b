"""Train the kernel denoiser on noisy generated camera-shake kernels (MSE), CPU-friendly and resumable.

    python -m kernel_denoiser.train --size 33 --out models/kernel_denoiser_33.pth
    python -m kernel_denoiser.train --size 64 --out models/kernel_denoiser_64.pth   (commands used: models/README.md)

Data: every step draws a fresh batch of kernels from `camera_shake_kernels` with a generator seeded by
(seed, step), so a resumed run sees exactly the batches it would have seen. Half the batch uses the
exposure-time weighting. Noise: k + σ·n, n white Gaussian, σ log-uniform in [sigma_min, sigma_max]
(default 3e-4 … 3e-2, in kernel-tap units). Why that range: taps of a 33×33 kernel average ~1/65 ≈ 1.5e-2
on its support (64×64: ~5e-3), and the M-step calls D(Z, sqrt(λ/β)) = 3.16e-3 at the defaults λ=1,
β=1e5, so the range spans 2 %–200 % of a typical tap with the M-step's level at its log-centre. Half the
noisy inputs are projected on the simplex first, because the M-step feeds the denoiser a projected
kernel (clipped, renormalised), not a Gaussian-noisy one; σ (the map) is always the pre-projection level.
Loss: MSE in the network's scaled units. Adam, cosine learning-rate decay. A checkpoint (weights,
optimiser, step, loss log, elapsed time) is written atomically every `--ckpt_every` steps; rerunning the
same command resumes from it. With `--max_minutes` the cosine decay follows whichever budget (steps or
time) runs out first, so a timed run still ends annealed (then the schedule depends on the machine speed). The final file is `{"arch", "state_dict", "meta"}` (see network.py).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch

from kernel_denoiser.kernels import camera_shake_kernels
from util.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from util.device import check_threads
from util.errors import InputError
from util.geometry import project_simplex
from kernel_denoiser.network import FDnCNN, load_kernel_denoiser, save_kernel_denoiser

EVAL_SIGMAS = (1e-3, 3.16e-3, 1e-2)


def training_batch(step: int, seed: int, batch: int, size: int, sigma_range: tuple[float, float],
                   proj_frac: float = 0.5):
    """(noisy (B,1,s,s), sigma (B,), clean (B,1,s,s)) — deterministic in (seed, step)."""
    g = np.random.default_rng([seed, step])
    h = batch // 2
    k = np.concatenate([camera_shake_kernels(h, size, g),
                        camera_shake_kernels(batch - h, size, g, exposure_weighting=True)])
    # random flips/transposes: the generator is isotropic, this only decorrelates the two halves further
    if g.random() < 0.5:
        k = k.transpose(0, 2, 1)
    lo, hi = np.log(sigma_range[0]), np.log(sigma_range[1])
    sig = np.exp(g.uniform(lo, hi, batch)).astype(np.float32)
    noise = g.standard_normal(k.shape).astype(np.float32)
    clean = torch.from_numpy(np.ascontiguousarray(k))[:, None]
    sigma = torch.from_numpy(sig)
    noisy = clean + sigma[:, None, None, None] * torch.from_numpy(noise)[:, None]
    proj = torch.from_numpy(g.random(batch) < proj_frac)
    noisy = torch.where(proj[:, None, None, None], project_simplex(noisy), noisy)
    return noisy, sigma, clean


def kernel_psnr(est: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """Per-kernel PSNR (B,) with the clean kernel's peak as the signal: 10 log10(max(k)² / MSE)."""
    mse = ((est - clean) ** 2).flatten(1).mean(1)
    peak = clean.flatten(1).amax(1)
    return 10 * torch.log10(peak ** 2 / mse.clamp_min(1e-30))


@torch.no_grad()
def evaluate(net, clean: torch.Tensor, sigmas=EVAL_SIGMAS, seed: int = 12345) -> dict:
    """Mean PSNR (dB) of noisy input, simplex-projected input, and P(D(P(noisy), σ)) (the M-step's use)."""
    out = {}
    for sigma in sigmas:
        g = torch.Generator().manual_seed(seed)
        noisy = clean + sigma * torch.randn(clean.shape, generator=g)
        p = project_simplex(noisy)
        den = project_simplex(net(p, sigma)) if net is not None else p
        out[f"{sigma:g}"] = {"noisy": kernel_psnr(noisy, clean).mean().item(),
                             "projected": kernel_psnr(p, clean).mean().item(),
                             "denoised": kernel_psnr(den, clean).mean().item()}
    return out


def heldout_kernels(size: int, n: int = 256, seed: int = 10 ** 6) -> torch.Tensor:
    """Held-out generated kernels (seed disjoint from training's (seed, step) streams)."""
    g = np.random.default_rng(seed)
    k = np.concatenate([camera_shake_kernels(n // 2, size, g), camera_shake_kernels(n - n // 2, size, g,
                                                                                     exposure_weighting=True)])
    return torch.from_numpy(k)[:, None]


def levin_kernels(size: int, shared: str) -> torch.Tensor | None:
    """Levin et al.'s 8 kernels, zero-padded centred to size×size; None if the shared data is absent."""
    files = sorted(glob.glob(os.path.join(shared, "data", "kernels", "levin09", "levin_*.npy")))
    if not files:
        return None
    ks = []
    for f in files:
        k = np.load(f).astype(np.float32)
        k /= k.sum()
        big = np.zeros((size, size), np.float32)
        r0, c0 = size // 2 - k.shape[0] // 2, size // 2 - k.shape[1] // 2
        big[r0:r0 + k.shape[0], c0:c0 + k.shape[1]] = k
        ks.append(big)
    return torch.from_numpy(np.stack(ks))[:, None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=33)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sigma_min", type=float, default=3e-4)
    ap.add_argument("--sigma_max", type=float, default=3e-2)
    ap.add_argument("--nc", type=int, default=32)
    ap.add_argument("--nb", type=int, default=5)
    ap.add_argument("--dilations", type=str, default="", help="comma list, one per conv (default all 1)")
    ap.add_argument("--scale", type=float, default=None, help="input scale (default size²/10)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt", default=None, help="resume/checkpoint file (default <out>.ckpt)")
    ap.add_argument("--init", default=None, help="start a fresh run from these weights (same architecture)")
    ap.add_argument("--ckpt_every", type=int, default=200)
    ap.add_argument("--eval_every", type=int, default=1000)
    ap.add_argument("--max_minutes", type=float, default=None, help="stop (and save) after this wall time")
    ap.add_argument("--shared", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                     "..", "shared"))
    a = ap.parse_args(argv)
    try:
        check_threads(a.threads)  # as the runner's: 10⁵ threads crashed torch
    except InputError as e:
        ap.error(str(e))
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    from tqdm import tqdm

    dil = [int(d) for d in a.dilations.split(",")] if a.dilations else None
    scale = a.scale if a.scale is not None else a.size ** 2 / 10.0
    net = FDnCNN(in_nc=2, out_nc=1, nc=a.nc, nb=a.nb, dilations=dil, scale=scale)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    ckpt = a.ckpt or a.out + ".ckpt"
    log_path = a.out + ".log"
    step, losses, elapsed = 0, [], 0.0
    if os.path.isfile(ckpt):
        st = load_checkpoint(ckpt, "kernel-denoiser training checkpoint", ("arch", "state_dict", "opt", "step"))
        if st["arch"] != net.arch:
            raise SystemExit(f"{ckpt}: checkpoint architecture {st['arch']} differs from the requested {net.arch}")
        load_state_dict_strict(net, st["state_dict"], ckpt)
        opt.load_state_dict(st["opt"])
        step, losses, elapsed = int(st["step"]), list(st["losses"]), float(st.get("elapsed", 0.0))
        print(f"resumed from {ckpt} at step {step}")
    elif a.init:
        init = load_kernel_denoiser(a.init)
        if init.arch != net.arch:
            raise SystemExit(f"{a.init}: architecture {init.arch} differs from the requested {net.arch}")
        load_state_dict_strict(net, init.state_dict(), a.init)
        print(f"initialised from {a.init}")

    def save_ckpt():
        save_checkpoint({"arch": net.arch, "state_dict": net.state_dict(), "opt": opt.state_dict(), "step": step,
                         "losses": losses, "elapsed": elapsed}, ckpt)

    held = heldout_kernels(a.size)
    levin = levin_kernels(a.size, a.shared)
    logf = open(log_path, "a")
    t0 = time.time() - elapsed
    bar = tqdm(total=a.steps, initial=step, desc=f"kernel denoiser {a.size}", mininterval=5)
    net.train()
    while step < a.steps:
        # cosine decay over the step budget, or over the time budget if that ends first (so a timed run anneals)
        progress = step / a.steps
        if a.max_minutes is not None:
            progress = max(progress, (time.time() - t0) / (60 * a.max_minutes))
        lr = 1e-5 + 0.5 * (a.lr - 1e-5) * (1 + math.cos(math.pi * min(progress, 1.0)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        noisy, sigma, clean = training_batch(step, a.seed, a.batch, a.size, (a.sigma_min, a.sigma_max))
        loss = ((net(noisy, sigma) - clean) * scale).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4g}", lr=f"{lr:.2g}")
        elapsed = time.time() - t0
        stop = a.max_minutes is not None and elapsed > 60 * a.max_minutes
        if step % a.eval_every == 0 or step == a.steps or stop:
            net.eval()
            rec = {"step": step, "elapsed_s": round(elapsed, 1), "loss": float(np.mean(losses[-200:])),
                   "heldout": evaluate(net, held)}
            if levin is not None:
                rec["levin"] = evaluate(net, levin)
            net.train()
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
        if step % a.ckpt_every == 0 or step == a.steps or stop:
            save_ckpt()
        if stop:
            print(f"time budget reached at step {step}")
            break
    bar.close()
    net.eval()
    meta = {"size": a.size, "steps": step, "batch": a.batch, "seed": a.seed, "sigma_range": [a.sigma_min, a.sigma_max],
            "wall_time_s": round(elapsed, 1), "threads": a.threads, "torch": str(torch.__version__),
            "heldout_psnr": evaluate(net, held)}
    if levin is not None:
        meta["levin_psnr"] = evaluate(net, levin)
    save_kernel_denoiser(net, a.out, meta)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()

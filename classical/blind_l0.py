"""Classical blind deblurring: multi-scale MAP kernel estimation with an ℓ0 prior.

Written from J. Pan, Z. Hu, Z. Su, M.-H. Yang, "Deblurring Text Images via L0-Regularized Intensity and
Gradient Prior", CVPR 2014 (Algorithms 1–2), whose ℓ0-gradient part is the sparse prior of L. Xu, S. Zheng,
J. Jia, "Unnatural L0 Sparse Representation for Natural Image Deblurring", CVPR 2013:

    min_{x,k} ‖x ⊛ k − y‖² + γ‖k‖² + λ (σ_I ‖x‖₀ + ‖∇x‖₀),     k ≥ 0, Σk = 1.

- x step (Pan Alg. 2): half-quadratic splitting with u ≈ x and g ≈ ∇x; the u and g steps are hard
  thresholds (keep a value when its square exceeds λσ_I/β, resp. λ/μ), the x step one FFT division;
  β doubles from 2λσ_I to β_max, μ from 2λ to μ_max. The result is a sharp, piecewise-flat image whose
  salient edges drive the kernel step. σ_I (the text-specific intensity term) defaults to 0 for natural
  images, which leaves Xu et al.'s ℓ0-gradient model.
- k step (Pan eq. 12): least squares in the gradient domain, k = F⁻¹[Σ_d F(∂_d x)* F(∂_d y) / (Σ_d |F(∂_d x)|² + γ)],
  cropped to the support, negative taps set to 0, normalised. We also clean up small taps (below; the
  thresholding of Cho & Lee 2009 / Xu & Jia 2010 that this family of methods uses) and re-centre the
  kernel's centre of mass by an integer shift so it cannot drift out of its support.
  When the caller padded a non-periodic y (`box` names the observed pixels), the k step is instead solved on
  the observed pixels only: min_k Σ_d ‖M ⊙ (∂_d x ⊛ k − ∂_d y)‖² + γ‖k‖² on the kernel's support, by
  conjugate gradients (as Cho & Lee 2009 solve it) warm-started at the previous k. The mirrored padding is
  blurred by the *flipped* kernel; fitted with the rest it pulled large asymmetric kernels of real captures
  to a compact symmetric blob (Levin et al. 2009's 24 captures: mean aligned gain +2.5 → +4.4 dB,
  bench/measured/l0_tune.txt).
- kernel clean-up by hysteresis: taps ≥ 15 % of the maximum are kept, and so are taps ≥ 5 % 8-connected to
  them, so the thin dim stretches of a long camera-shake path survive while isolated specks go; the low
  threshold is raised to the magnitude of the deepest negative tap of the raw least-squares kernel (its
  noise level: at σ ≥ 5/255 the 5 % taps percolate over the whole support and the haze ruins the restoration).
  levin_real 24: mean aligned gain +4.4 → +7.2 dB; synth24 (σ 5–20/255): kernel MSE 2.38e-5 → 2.15e-5.
- coarse to fine: an image pyramid with ratio 1/√2 down to a ~5-px kernel; at each level `iters`
  alternations; the kernel is upsampled (bilinear) to start the next level.
Grey-level estimation (channel mean); the caller then deconvolves each colour channel non-blindly with the
kernel (classical.nonblind), as Pan et al. do. Circular (FFT) model: the caller pads non-periodic images.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from classical.nonblind import grad_otfs
from util.fft import o2p, p2o
from util.geometry import dirac


@dataclass(frozen=True)
class L0Config:
    lam: float = 4e-3         # λ, Pan et al.'s setting
    gamma: float = 30.0       # γ, kernel ridge weight (Pan et al. use 2; 30 measured better at σ ≥ 5/255, bench/measured/l0_tune.txt)
    sigma_intensity: float = 0.0  # σ_I: 0 for natural images (Xu et al. 2013); Pan et al. use > 0 for text
    mu_max: float = 1e5
    beta_max: float = 8.0
    iters: int = 5            # alternations per pyramid level
    lam_min: float = 1e-4     # λ is divided by 1.1 after each alternation, not below this (details emerge late)
    threshold: float = 0.15   # kernel taps below this fraction of the maximum are zeroed...
    threshold_low: float = 0.05  # ...unless ≥ this fraction and connected to a tap above `threshold` (hysteresis)
    noise_floor: float = 1.0  # ...and above this multiple of the raw estimate's deepest negative tap
    min_kernel: int = 5       # coarsest level's kernel size
    masked: bool = True       # with a padded y (box): kernel step on the observed pixels only (CG), not the padding
    cg_iters: int = 15        # conjugate-gradient iterations of the masked kernel step (warm start: 30 gave the same)


def l0_restore(y: torch.Tensor, k: torch.Tensor, cfg: L0Config, lam: float) -> torch.Tensor:
    """Pan et al. Alg. 2: argmin_x ‖x ⊛ k − y‖² + λ(σ_I‖x‖₀ + ‖∇x‖₀) by half-quadratic splitting. y (H, W)."""
    shape = tuple(y.shape[-2:])
    K = p2o(k.to(y), shape)
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    KtY, K2, D2 = K.conj() * torch.fft.rfft2(y), K.abs() ** 2, Dh.abs() ** 2 + Dv.abs() ** 2
    x = y.clone()
    use_u = cfg.sigma_intensity > 0
    beta = 2 * lam * cfg.sigma_intensity if use_u else 0.0
    while True:
        U = 0.0
        if use_u:
            u = torch.where(x ** 2 >= lam * cfg.sigma_intensity / beta, x, torch.zeros_like(x))
            U = beta * torch.fft.rfft2(u)
        mu = 2 * lam
        while mu < cfg.mu_max:
            X = torch.fft.rfft2(x)
            gh, gv = torch.fft.irfft2(Dh * X, s=shape), torch.fft.irfft2(Dv * X, s=shape)
            keep = (gh ** 2 + gv ** 2) >= lam / mu  # joint threshold on the gradient vector
            gh, gv = gh * keep, gv * keep
            num = KtY + U + mu * (Dh.conj() * torch.fft.rfft2(gh) + Dv.conj() * torch.fft.rfft2(gv))
            x = torch.fft.irfft2(num / (K2 + beta + mu * D2), s=shape)
            mu *= 2
        if not use_u:
            return x
        beta *= 2
        if beta > cfg.beta_max:
            return x


def estimate_kernel_ls(x: torch.Tensor, y: torch.Tensor, size: int, gamma: float, threshold: float,
                       threshold_low: float = None, noise_floor: float = 0.0) -> torch.Tensor:
    """Pan et al. eq. 12: gradient-domain least squares for k (size × size), then k ≥ 0, clean-up, Σk = 1."""
    shape = tuple(y.shape[-2:])
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    X, Y = torch.fft.rfft2(x), torch.fft.rfft2(y)
    num = (Dh.abs() ** 2 + Dv.abs() ** 2) * X.conj() * Y  # Σ_d conj(D_d X) D_d Y
    den = (Dh.abs() ** 2 + Dv.abs() ** 2) * X.abs() ** 2 + gamma
    return _clean(o2p(num / den, shape, (size, size)), threshold, threshold_low, noise_floor)


def estimate_kernel_masked(x: torch.Tensor, y: torch.Tensor, k0: torch.Tensor, gamma: float, threshold: float,
                           mask: torch.Tensor, cg_iters: int, threshold_low: float = None,
                           noise_floor: float = 0.0) -> torch.Tensor:
    """Eq. 12 restricted to the data: min_k Σ_d ‖M ⊙ (∂_d x ⊛ k − ∂_d y)‖² + γ‖k‖² on the size² support of k0,
    by conjugate gradients warm-started at k0 (Cho & Lee 2009 solve the kernel step by CG in the same way).
    M is 1 where y is observed and 0 on the padding, whose mirrored blur (flipped kernel) would otherwise
    pull the estimate towards a symmetric blob. Then k ≥ 0, clean-up, Σk = 1 as estimate_kernel_ls."""
    shape, size = tuple(y.shape[-2:]), tuple(k0.shape[-2:])
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    X = torch.fft.rfft2(x)
    GX = (Dh * X, Dv * X)
    gy = [torch.fft.irfft2(D * torch.fft.rfft2(y), s=shape) * mask for D in (Dh, Dv)]

    def normal(k):  # (Σ_d A_dᵀ M A_d + γ) k, A_d k = ∂_d x ⊛ k
        K = p2o(k, shape)
        return sum(o2p(G.conj() * torch.fft.rfft2(mask * torch.fft.irfft2(G * K, s=shape)), shape, size)
                   for G in GX) + gamma * k

    b = sum(o2p(G.conj() * torch.fft.rfft2(r), shape, size) for G, r in zip(GX, gy))
    k = k0.clone()
    r = b - normal(k)
    p, rr = r.clone(), (r * r).sum()
    for _ in range(cg_iters):
        Ap = normal(p)
        alpha = rr / (p * Ap).sum()
        k, r = k + alpha * p, r - alpha * Ap
        rr_new = (r * r).sum()
        if rr_new <= 1e-12 * (b * b).sum():
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return _clean(k, threshold, threshold_low, noise_floor)


def hysteresis_support(k: torch.Tensor, high: float, low: float) -> torch.Tensor:
    """Taps ≥ low·max that are 8-connected, through taps ≥ low·max, to a tap ≥ high·max (boolean mask).
    A long thin kernel keeps its dim parts, which touch its bright ones; isolated noise specks go."""
    weak = k >= low * k.max()
    keep = k >= high * k.max()
    while True:
        grown = (F.max_pool2d(keep[None, None].to(k.dtype), 3, 1, 1)[0, 0] > 0) & weak
        if torch.equal(grown, keep):
            return keep
        keep = grown


def _clean(k: torch.Tensor, threshold: float, threshold_low: float = None, noise_floor: float = 0.0) -> torch.Tensor:
    """k ≥ 0, taps below threshold·max zeroed (with threshold_low < threshold: hysteresis_support), Σk = 1.
    The low threshold is raised to noise_floor × the deepest negative tap of the raw solution: the negative
    taps are the least-squares noise, and positive noise taps of that size would percolate over the support."""
    floor = noise_floor * float((-k.min()).clamp_min(0))
    k = k.clamp_min(0)
    if k.max() > 0:
        low = threshold if threshold_low is None else min(max(threshold_low, floor / float(k.max())), threshold)
        k = torch.where(hysteresis_support(k, threshold, low), k, torch.zeros_like(k))
    if not k.sum() > 0:
        return dirac(k.shape[-1], k.device, k.dtype)[0, 0]
    return _recenter(k / k.sum())


def _recenter(k: torch.Tensor) -> torch.Tensor:
    """Integer shift bringing the centre of mass to (s//2, s//2) (mass shifted out of the frame is dropped)."""
    s = k.shape[-1]
    r = torch.arange(s, dtype=k.dtype, device=k.device)
    cy = int(round(((k.sum(1) * r).sum() / k.sum()).item())) - s // 2
    cx = int(round(((k.sum(0) * r).sum() / k.sum()).item())) - s // 2
    if cy == 0 and cx == 0:
        return k
    out = torch.zeros_like(k)
    src = k[max(cy, 0): s + min(cy, 0), max(cx, 0): s + min(cx, 0)]
    out[max(-cy, 0): max(-cy, 0) + src.shape[0], max(-cx, 0): max(-cx, 0) + src.shape[1]] = src
    return out / out.sum()


def _resize(img: torch.Tensor, shape) -> torch.Tensor:
    return F.interpolate(img[None, None], size=tuple(shape), mode="bilinear", align_corners=False,
                         antialias=True)[0, 0]


def _odd(v: float) -> int:
    n = max(3, int(round(v)))
    return n if n % 2 else n + 1


def estimate_kernel(y: torch.Tensor, kernel_size: int, cfg: L0Config = L0Config(), callback=None,
                    box=None) -> torch.Tensor:
    """Blind kernel estimate (kernel_size², sum 1) from an observation y (C, H, W) or (H, W) in [0, 1].
    box = (top, left, height, width): where y holds data when the caller padded it (util.pad_for_boundary)."""
    g = y.mean(0) if y.dim() == 3 else y
    g = g.to(torch.float64)
    valid = torch.zeros_like(g)
    if box is None:
        valid += 1
    else:
        valid[box[0]:box[0] + box[2], box[1]:box[1] + box[3]] = 1
    masked = cfg.masked and not bool(valid.all())  # all observed: the FFT step is the exact solution
    levels = max(1, int(math.floor(math.log(kernel_size / cfg.min_kernel) / math.log(math.sqrt(2)))) + 1)
    k = None
    lam = cfg.lam
    for lev in reversed(range(levels)):
        scale = math.sqrt(0.5) ** lev
        ks = kernel_size if lev == 0 else _odd(kernel_size * scale)
        ys = g if lev == 0 else _resize(g, (max(ks + 2, round(g.shape[0] * scale)), max(ks + 2, round(g.shape[1] * scale))))
        if k is None:
            k = dirac(ks, ys.device, ys.dtype)[0, 0]
            k[ks // 2, ks // 2 - 1: ks // 2 + 2] = 1.0  # a tiny blob rather than a Dirac: the x step must blur
            k = k / k.sum()
        else:
            k = _resize(k, (ks, ks)).clamp_min(0)
            k = k / k.sum()
        mask = valid if lev == 0 else (_resize(valid, ys.shape) > 0.5).to(ys)
        for _ in range(cfg.iters):
            x = l0_restore(ys, k, cfg, lam)
            if masked:
                k = estimate_kernel_masked(x, ys, k, cfg.gamma, cfg.threshold, mask, cfg.cg_iters, cfg.threshold_low,
                                           cfg.noise_floor)
            else:
                k = estimate_kernel_ls(x, ys, ks, cfg.gamma, cfg.threshold, cfg.threshold_low, cfg.noise_floor)
            lam = max(lam / 1.1, cfg.lam_min)
            if callback is not None:
                callback(lev, x, k)
    return k.to(y.dtype)

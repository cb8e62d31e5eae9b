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
  cropped to the support, negative taps set to 0, normalised. We also zero taps below 15 % of the maximum
  (the kernel clean-up of Cho & Lee 2009 / Xu & Jia 2010 that this family of methods uses) and re-centre
  the kernel's centre of mass by an integer shift so it cannot drift out of its support.
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


@dataclass(frozen=True)
class L0Config:
    lam: float = 4e-3         # λ, Pan et al.'s setting
    gamma: float = 30.0       # γ, kernel ridge weight (Pan et al. use 2; 30 measured better at σ ≥ 5/255, bench/measured/l0_tune.txt)
    sigma_intensity: float = 0.0  # σ_I: 0 for natural images (Xu et al. 2013); Pan et al. use > 0 for text
    mu_max: float = 1e5
    beta_max: float = 8.0
    iters: int = 5            # alternations per pyramid level
    lam_min: float = 1e-4     # λ is divided by 1.1 after each alternation, not below this (details emerge late)
    threshold: float = 0.15   # kernel taps below this fraction of the maximum are zeroed
    min_kernel: int = 5       # coarsest level's kernel size


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


def estimate_kernel_ls(x: torch.Tensor, y: torch.Tensor, size: int, gamma: float, threshold: float) -> torch.Tensor:
    """Pan et al. eq. 12: gradient-domain least squares for k (size × size), then k ≥ 0, clean-up, Σk = 1."""
    shape = tuple(y.shape[-2:])
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    X, Y = torch.fft.rfft2(x), torch.fft.rfft2(y)
    num = (Dh.abs() ** 2 + Dv.abs() ** 2) * X.conj() * Y  # Σ_d conj(D_d X) D_d Y
    den = (Dh.abs() ** 2 + Dv.abs() ** 2) * X.abs() ** 2 + gamma
    k = o2p(num / den, shape, (size, size)).clamp_min(0)
    if k.max() > 0:
        k = torch.where(k < threshold * k.max(), torch.zeros_like(k), k)
    if not k.sum() > 0:
        return _delta(size, y)
    return _recenter(k / k.sum())


def _delta(size: int, ref: torch.Tensor) -> torch.Tensor:
    k = ref.new_zeros(size, size)
    k[size // 2, size // 2] = 1.0
    return k


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


def estimate_kernel(y: torch.Tensor, kernel_size: int, cfg: L0Config = L0Config(), callback=None) -> torch.Tensor:
    """Blind kernel estimate (kernel_size², sum 1) from an observation y (C, H, W) or (H, W) in [0, 1]."""
    g = y.mean(0) if y.dim() == 3 else y
    g = g.to(torch.float64)
    levels = max(1, int(math.floor(math.log(kernel_size / cfg.min_kernel) / math.log(math.sqrt(2)))) + 1)
    k = None
    lam = cfg.lam
    for lev in reversed(range(levels)):
        scale = math.sqrt(0.5) ** lev
        ks = kernel_size if lev == 0 else _odd(kernel_size * scale)
        ys = g if lev == 0 else _resize(g, (max(ks + 2, round(g.shape[0] * scale)), max(ks + 2, round(g.shape[1] * scale))))
        if k is None:
            k = _delta(ks, ys)
            k[ks // 2, ks // 2 - 1: ks // 2 + 2] = 1.0  # a tiny blob rather than a Dirac: the x step must blur
            k = k / k.sum()
        else:
            k = _resize(k, (ks, ks)).clamp_min(0)
            k = k / k.sum()
        for _ in range(cfg.iters):
            x = l0_restore(ys, k, cfg, lam)
            k = estimate_kernel_ls(x, ys, ks, cfg.gamma, cfg.threshold)
            lam = max(lam / 1.1, cfg.lam_min)
            if callback is not None:
                callback(lev, x, k)
    return k.to(y.dtype)

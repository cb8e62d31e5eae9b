"""Classical non-blind deconvolution with a known kernel, circular (FFT) model, images (C, H, W) in [0, 1].

- `tikhonov`: x̂ = F⁻¹[ K̄ Y / (|K|² + λ (|D_h|² + |D_v|²)) ], the MAP estimate under a Gaussian prior on
  image gradients (a Wiener filter with a 1/|ω|² image spectrum).
- `hyper_laplacian`: Krishnan & Fergus, "Fast image deconvolution using hyper-Laplacian priors", NIPS 2009:
  min_x (λ/2)‖k ⊛ x − y‖² + Σ_i |∇_h x|_i^α + |∇_v x|_i^α, by half-quadratic splitting: auxiliary w for
  each gradient, penalty (β/2)‖w − ∇x‖², β from 1 to 256 growing by 2√2 (the paper's schedule); the x step
  is one FFT division, the w step a per-pixel 1-D problem (α = 1: soft threshold; α < 1: Newton on the
  stationarity condition, compared with w = 0, instead of the paper's closed-form cubic/quartic roots).

λ choices (`lambda_rule`): the practical rules are functions of σ only, with constants fitted on BSDS500
*train* crops (bench/calibrate_lambda.py; never on evaluation images), and `oracle_lambda` picks the
per-image λ that minimises the error against the ground truth (an upper bound, not a method).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from util.fft import p2o

# λ = C · σ² (Tikhonov) and λ = C / σ² (hyper-Laplacian data weight), σ in [0, 1]; C fitted by
# bench/calibrate_lambda.py on 4 BSDS500 *train* crops x σ 5/10/20 with Levin kernels (bench/measured/calibrate_lambda.json)
TIKHONOV_C = 52.7
HYPERLAPLACIAN_C = 0.3
SIGMA_FLOOR = 1 / 255  # a noise-free observation still needs some regularisation (8-bit quantisation)


def grad_otfs(shape, dtype, device):
    """OTFs of the circular horizontal and vertical forward differences for an image of `shape`."""
    dh = torch.zeros(shape, dtype=dtype, device=device)
    dv = torch.zeros(shape, dtype=dtype, device=device)
    dh[0, 0], dh[0, -1] = -1.0, 1.0  # x(i, j) − x(i, j − 1)... as a circular filter
    dv[0, 0], dv[-1, 0] = -1.0, 1.0
    return torch.fft.rfft2(dh), torch.fft.rfft2(dv)


def tikhonov_lambda(sigma: float, c: float = None) -> float:
    """Practical rule λ = C σ² (the Gaussian-gradient-prior MAP weight is σ² / gradient variance)."""
    return (TIKHONOV_C if c is None else c) * max(sigma, SIGMA_FLOOR) ** 2


def hyper_laplacian_lambda(sigma: float, c: float = None) -> float:
    """Practical rule: data weight λ = C / σ² (the likelihood's 1/σ² for a fixed prior scale)."""
    return (HYPERLAPLACIAN_C if c is None else c) / max(sigma, SIGMA_FLOOR) ** 2


def tikhonov(y: torch.Tensor, k: torch.Tensor, lam: float) -> torch.Tensor:
    """Gaussian-gradient-prior deconvolution of y (..., H, W) by a centred kernel k (s, s)."""
    shape = tuple(y.shape[-2:])
    K = p2o(k.to(y), shape)
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    X = K.conj() * torch.fft.rfft2(y) / (K.abs() ** 2 + lam * (Dh.abs() ** 2 + Dv.abs() ** 2))
    return torch.fft.irfft2(X, s=shape)


def _shrink(v: torch.Tensor, beta: float, alpha: float, newton_iters: int = 8) -> torch.Tensor:
    """argmin_w |w|^α + (β/2)(w − v)², elementwise."""
    if alpha == 1.0:
        return torch.sign(v) * (v.abs() - 1.0 / beta).clamp_min(0)
    a = v.abs()
    t = a.clone()
    for _ in range(newton_iters):  # f(t) = α t^{α−1} + β (t − a), convex for α < 1; from the right it converges
        tc = t.clamp_min(1e-8)
        f = alpha * tc ** (alpha - 1) + beta * (tc - a)
        fp = alpha * (alpha - 1) * tc ** (alpha - 2) + beta
        t = torch.where(fp > 0, (tc - f / fp).clamp(0, None), torch.zeros_like(tc))
    t = torch.minimum(t, a)
    e_t = t.clamp_min(0) ** alpha + 0.5 * beta * (t - a) ** 2
    e_0 = 0.5 * beta * a ** 2
    return torch.sign(v) * torch.where(e_t < e_0, t, torch.zeros_like(t))


def hyper_laplacian(y: torch.Tensor, k: torch.Tensor, lam: float, alpha: float = 2 / 3,
                    beta0: float = 1.0, beta_max: float = 256.0, beta_rate: float = 2 * math.sqrt(2),
                    inner: int = 1) -> torch.Tensor:
    """Krishnan & Fergus 2009 deconvolution of y (..., H, W); see the module docstring."""
    shape = tuple(y.shape[-2:])
    K = p2o(k.to(y), shape)
    Dh, Dv = grad_otfs(shape, y.dtype, y.device)
    Y = torch.fft.rfft2(y)
    KtY = K.conj() * Y
    D2 = Dh.abs() ** 2 + Dv.abs() ** 2
    K2 = K.abs() ** 2
    x = y.clone()
    beta = beta0
    while beta <= beta_max * (1 + 1e-9):
        for _ in range(inner):
            X = torch.fft.rfft2(x)
            gh = torch.fft.irfft2(Dh * X, s=shape)
            gv = torch.fft.irfft2(Dv * X, s=shape)
            wh, wv = _shrink(gh, beta, alpha), _shrink(gv, beta, alpha)
            num = lam * KtY + beta * (Dh.conj() * torch.fft.rfft2(wh) + Dv.conj() * torch.fft.rfft2(wv))
            x = torch.fft.irfft2(num / (lam * K2 + beta * D2), s=shape)
        beta *= beta_rate
    return x


def oracle_lambda(solve: Callable[[float], torch.Tensor], x_true: torch.Tensor, grid,
                  error: Optional[Callable[[torch.Tensor], float]] = None) -> tuple:
    """(λ, x̂) minimising error(x̂) (default: the MSE to x_true) over a λ grid (the grid is fine enough)."""
    best: Optional[tuple] = None
    for lam in grid:
        x = solve(float(lam))
        e = error(x) if error is not None else torch.mean((x.clamp(0, 1) - x_true) ** 2).item()
        if best is None or e < best[0]:
            best = (e, float(lam), x)
    return best[1], best[2]


def log_grid(lo: float, hi: float, per_decade: int = 8) -> list:
    n = int(round(math.log10(hi / lo) * per_decade)) + 1
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]

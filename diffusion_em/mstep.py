"""M-step: kernel update by half-quadratic splitting with a plug-and-play kernel denoiser (docs/algorithm.md §1).

Given y (1,C,H,W) and n image estimates x_i (n,C,H,W), both in [0,1], J times from the previous kernel K:

    Z = F⁻¹( [F(y)·(1/n)Σ conj(F x_i) + βσ²·F(K)] / [(1/n)Σ|F x_i|² + βσ²] )     (HQS data step)
    Z ← P_Δ(crop_s(Z));   K ← P_Δ(D(Z, sqrt(λ/β)))                                 (prior step)

P_Δ = Euclidean projection on the simplex {k ≥ 0, Σk = 1}; D = kernel denoiser (None: no prior, K = Z).

Colour. 'joint' (default): one kernel explains all channels, so the data terms of the channels add up
(sum over C in numerator and denominator) with a single prox term βσ² — the HQS normal equation of
Σ_c‖y_c − k⊛x_c‖²/σ² + β‖k − K‖². 'per_channel_mean' (the authors' code): solve each channel's data
step and average the three Z before the crop.

ΠGDM variant (paper App. D; off by default, as in the authors' code). With x0 ~ N(x̂0, r² I) (ΠGDM's
posterior, r² in [0,1]-image units), E‖y − k⊛x0‖² = ‖y − k⊛x̂0‖² + r²·H·W·‖k‖²: in unnormalised-DFT units
this adds H·W·r² per channel to (1/n)Σ|F x_i|². `m_step(..., r2=...)` takes r² per call; the Fast EM
driver passes ΠGDM's r_t² of the current step when `cfg.pigdm_r2` is on.

Speed. Only the s×s crop of Z is used and K lives on s×s, so the data step is split exactly as
Z = F⁻¹[N/(D+ρ)] + F⁻¹[ρ/(D+ρ)]⊛K (ρ = βσ²): the first term and the filter g = F⁻¹[ρ/(D+ρ)] are computed
once per call at full size; inside the J loop the convolution of K with g restricted to offsets
|d| ≤ s−1 is done with FFTs of size M ≥ 3s−2 (no wrap-around at that size), independent of the image size.
Everything stays on the input's device; no Python loop over pixels, channels or particles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from classical.nonblind import grad_otfs
from util.fft import o2p, p2o
from util.geometry import RECENTER_SHIFTS, project_simplex, project_simplex_on

__all__ = ["MStepConfig", "m_step", "m_step_coarse", "resize_kernel", "MStepState", "support_box"]

COLOUR_MODES = ("joint", "per_channel_mean")
DOMAINS = ("pixel", "gradient")


@dataclass(frozen=True)
class MStepConfig:
    """The M-step section (`mstep:`) of the diffusion config; the kernel size comes from the kernel config."""
    lam: float = 1.0            # λ: prior weight; the denoiser sees noise level sqrt(λ/β)
    beta: float = 1e5           # β: HQS splitting weight (prox weight βσ² in the data step)
    J: int = 10                 # HQS iterations per M-step call
    colour: str = "joint"       # 'joint' | 'per_channel_mean' (authors')
    pigdm_r2: bool = False      # Fast EM + ΠGDM: add the step's r_t² to the denominator (paper App. D)
    recenter: bool = True       # re-centre the kernel's centre of mass after each M-step
    recenter_shift: str = "bilinear"  # 'bilinear' (exact, sub-pixel: low-passes the kernel) | 'integer' (whole pixels)
    every: int = 1              # Fast EM: run the M-step every k diffusion steps
    coarse: float = 0.0         # Fast EM: the first fraction of the steps run the M-step at half resolution
    domain: str = "pixel"       # 'pixel' | 'gradient': data term on image gradients (less weight on low frequencies)
    start: float = 0.0          # Fast EM: the kernel stays at its initial value for this first fraction of the steps (1: always)

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise ValueError(f"key 'domain' must be one of {DOMAINS}, got {self.domain!r}")
        if self.recenter_shift not in RECENTER_SHIFTS:
            raise ValueError(f"key 'recenter_shift' must be one of {RECENTER_SHIFTS}, got {self.recenter_shift!r}")
        if self.colour not in COLOUR_MODES:
            raise ValueError(f"key 'colour' must be one of {COLOUR_MODES}, got {self.colour!r}")
        for name, ok, rule in (("J", self.J >= 1, ">= 1"), ("every", self.every >= 1, ">= 1"),
                               ("beta", self.beta > 0, "> 0"), ("lam", self.lam >= 0, ">= 0"),
                               ("coarse", 0 <= self.coarse <= 1, "in [0, 1]"),
                               ("start", 0 <= self.start <= 1, "in [0, 1]")):
            if not ok:
                raise ValueError(f"key '{name}' must be {rule}, got {getattr(self, name)}")

    @property
    def denoiser_sigma(self) -> float:
        return (self.lam / self.beta) ** 0.5


def _fft_size(n: int) -> int:
    """Smallest even 2^a·3^b·5^c ≥ n (fast pocketfft sizes)."""
    m = n + (n % 2)
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2


@dataclass(frozen=True)
class MStepState:
    """Per-call precomputation: z0 = crop_s F⁻¹[N/(D+ρ)] and the small-FFT filter G (both (1, s, s)/(1, M, M//2+1))."""
    z0: torch.Tensor
    G: torch.Tensor
    M: int


def precompute(y: torch.Tensor, x: torch.Tensor, sigma: float, cfg: MStepConfig, s: int,
               r2: Optional[float] = None) -> MStepState:
    """Everything of the data step that does not depend on K (FFTs of y and x_i, done once per call).

    s: kernel size; r2: ΠGDM's r_t² added to the denominator (paper App. D), None for the authors' M-step.
    """
    if y.dim() != 4 or y.shape[0] != 1:
        raise ValueError(f"y must be (1,C,H,W), got {tuple(y.shape)}")
    if x.dim() != 4 or x.shape[1:] != y.shape[1:]:
        raise ValueError(f"x must be (n,C,H,W) matching y {tuple(y.shape)}, got {tuple(x.shape)}")
    H, W = y.shape[-2:]
    if s > H or s > W:
        raise ValueError(f"kernel {s}x{s} is larger than the image {H}x{W}")
    real = torch.float64 if y.dtype == torch.float64 else torch.float32
    Y = torch.fft.rfft2(y.to(real))
    X = torch.fft.rfft2(x.to(real))
    N = (X.conj() * Y).mean(0)                 # (C,H,Wr): (1/n)Σ conj(F x_i)·F y
    D = (X.real ** 2 + X.imag ** 2).mean(0)    # (C,H,Wr): (1/n)Σ|F x_i|²
    if r2 is not None:
        D = D + float(r2) * H * W               # App. D: E|F x0|² = |F x̂0|² + HW r²
    if cfg.domain == "gradient":  # Σ_d ‖∂_d(y − k⊛x)‖²: |F∂_h|² + |F∂_v|² weighs each frequency
        Dh, Dv = grad_otfs((H, W), real, y.device)
        w = Dh.abs() ** 2 + Dv.abs() ** 2
        N, D = N * w, D * w
    rho = cfg.beta * float(sigma) ** 2
    if cfg.colour == "joint":
        N, D = N.sum(0, keepdim=True), D.sum(0, keepdim=True)
    den = D + rho
    # guard exact zeros (σ = 0 and a frequency absent from every x_i): leave that frequency at 0
    den = torch.where(den > 0, den, torch.full_like(den, float("inf")))
    z0 = o2p(N / den, (H, W), (s, s))        # (Cm,s,s)
    g = torch.fft.irfft2(rho / den, s=(H, W))  # (Cm,H,W): circular filter applied to K
    if cfg.colour == "per_channel_mean":     # averaging the channel solutions is linear: average the pieces
        z0, g = z0.mean(0, keepdim=True), g.mean(0, keepdim=True)
    # g at offsets d ∈ [-(s-1), s-1] (mod H, W), placed circularly on an M×M grid, M ≥ 3s-2: exact, no aliasing
    M = _fft_size(3 * s - 2)
    d = torch.arange(-(s - 1), s, device=y.device)
    g_small = g[:, d % H][:, :, d % W]
    gM = g.new_zeros(1, M, M)
    gM[:, (d % M)[:, None], (d % M)[None, :]] = g_small
    return MStepState(z0=z0, G=torch.fft.rfft2(gM), M=M)


def data_step(K: torch.Tensor, st: MStepState) -> torch.Tensor:
    """crop_s(Z) for kernel(s) K (..., s, s): z0 + (g ⊛ K) on the small grid."""
    s = K.shape[-1]
    return st.z0 + o2p(p2o(K, (st.M, st.M)) * st.G, (st.M, st.M), (s, s))


def support_box(k: torch.Tensor, rel: float = 0.05, margin: int = 2, grow: float = 0.25) -> torch.Tensor:
    """A box (bool, s×s) centred on the array centre (where kernels are re-centred) holding the taps of k above
    rel·max, each half-extent enlarged by `margin` px + `grow`·itself: the kernel size a first estimate
    (the classical ℓ0 kernel) suggests, with room for its error."""
    s1, s2 = k.shape[-2:]
    k = k.reshape(s1, s2)
    on = k > rel * k.max()
    box = torch.zeros(s1, s2, dtype=torch.bool, device=k.device)
    half = []
    for dim, (n, c) in enumerate(((s1, s1 // 2), (s2, s2 // 2))):
        idx = torch.nonzero(on.any(1 - dim)).flatten()
        h = max(c - int(idx.min()), int(idx.max()) - c, 0)
        half.append(min(h + margin + int(round(grow * h)), n))
    (hr, hc), (c1, c2) = half, (s1 // 2, s2 // 2)
    box[max(0, c1 - hr):c1 + hr + 1, max(0, c2 - hc):c2 + hc + 1] = True
    return box


def m_step(y: torch.Tensor, x: torch.Tensor, k: torch.Tensor, sigma: float, cfg: MStepConfig = MStepConfig(),
           denoiser: Optional[Callable] = None, r2: Optional[float] = None,
           support: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One M-step call (J HQS iterations) from the previous kernel k; returns the new kernel, same layout as k.

    y (1,C,H,W), x (n,C,H,W) in [0,1]; k (s,s) or (1,1,s,s) sets the kernel size s; sigma = noise std of y
    in [0,1] units; denoiser(k (1,1,s,s), σ_d) -> (1,1,s,s) or None for no prior; r2: ΠGDM's r_t² for the
    App. D variant (None: authors' M-step); support: bool (s,s) taps the kernel may use (`support_box`; None:
    all). All on y's device; k's dtype is kept.
    """
    s = k.shape[-1]
    if k.shape[-2] != s or k.numel() != s * s:
        raise ValueError(f"previous kernel must be (s,s) or (1,1,s,s), got {tuple(k.shape)}")
    sig_d = cfg.denoiser_sigma
    with torch.no_grad():  # the kernel update is not differentiated through (x may carry a graph)
        st = precompute(y.detach(), x.detach(), sigma, cfg, s, r2)
        K = k.detach().reshape(1, 1, s, s).to(device=y.device, dtype=st.z0.dtype)
        proj = project_simplex if support is None else (lambda z: project_simplex_on(z, support.to(z.device)))
        for _ in range(cfg.J):
            Z = proj(data_step(K[0], st)[None])
            if denoiser is not None:
                Z = proj(denoiser(Z.to(y.dtype), sig_d).to(Z.dtype))
            K = Z
    return K.reshape(k.shape).to(k.dtype)


def resize_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    """Kernel (…, s, s) → (…, size, size) by bilinear interpolation with the centre taps aligned, sum 1."""
    lead = k.shape[:-2]
    r = F.interpolate(k.reshape(-1, 1, *k.shape[-2:]), size=(size, size), mode="bilinear", align_corners=True)
    r = r.clamp_min(0)
    return (r / r.sum((-2, -1), keepdim=True)).reshape(*lead, size, size)


def m_step_coarse(y: torch.Tensor, x: torch.Tensor, k: torch.Tensor, sigma: float, cfg: MStepConfig = MStepConfig(),
                  denoiser: Optional[Callable] = None, r2: Optional[float] = None, factor: int = 2) -> torch.Tensor:
    """The M-step one scale down (coarse-to-fine blind deconvolution, as Fergus et al. 2006; Levin et al. 2011).

    y and x are averaged over factor×factor blocks (the same half-pixel offset for both, so the kernel is not
    shifted; white noise std σ/factor, ΠGDM's r² / factor²), the kernel is resized to (s−1)/factor + 1 taps,
    updated by `m_step`, and resized back to s×s. A large kernel has fewer, better-determined taps there.
    """
    s = k.shape[-1]
    sd = (s - 1) // factor + 1
    H, W = (d - d % factor for d in y.shape[-2:])
    yd = F.avg_pool2d(y[..., :H, :W], factor)
    xd = F.avg_pool2d(x[..., :H, :W], factor)
    kd = resize_kernel(k.detach().reshape(1, 1, s, s).to(yd), sd)
    kd = m_step(yd, xd, kd, sigma / factor, cfg, denoiser, None if r2 is None else r2 / factor ** 2)
    return resize_kernel(kd, s).reshape(k.shape).to(k.dtype)

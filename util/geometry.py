"""Physics geometry shared by the M-step, the runner, the metrics and the test-set generator (one copy each).

Boundary handling: padding to what the UNet needs (`pad_to_multiple`), the reflected / cosine-tapered
border that lets the circular FFT blur model serve non-periodic photos (`pad_for_boundary`), and `crop`
back. Kernel geometry: kernels are centred at (s//2, s//2) for odd and even sizes (util.fft.p2o), so
centred padding or cropping (`pad_centred`) keeps that tap in place; `recenter` moves the centre of mass
there; `project_simplex` is the Euclidean projection on {k ≥ 0, Σk = 1}; `dirac` is the centred impulse.
The kernel functions are batched torch ops that run on the tensor's device.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

from util.images import to_hwc

Array = Union[np.ndarray, torch.Tensor]


# ------------------------------------------------------------------------------------ boundary and size
def cosine_ramp(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """n weights rising from ~0 to ~1 along a raised cosine: 0.5 − 0.5·cos(π(d + ½)/n), d = 0..n−1."""
    d = torch.arange(n, dtype=dtype, device=device)
    return 0.5 - 0.5 * torch.cos(math.pi * (d + 0.5) / n)


def edge_taper(x: torch.Tensor, n: int, mean=None) -> torch.Tensor:
    """Blend a band of n px along every border of (…, H, W) into `mean` (default: the per-channel mean) with
    a raised-cosine weight, so the periodic extension is continuous: the classic remedy for FFT ringing."""
    H, W = x.shape[-2:]
    if mean is None:
        mean = x.mean(dim=(-2, -1), keepdim=True)

    def window(L: int) -> torch.Tensor:
        m = min(n, L // 2)
        w = torch.ones(L, dtype=x.dtype, device=x.device)
        if m > 0:
            r = cosine_ramp(m, x.dtype, x.device)
            w[:m], w[L - m:] = r, r.flip(0)
        return w

    wgt = window(H)[:, None] * window(W)[None, :]
    return wgt * x + (1 - wgt) * mean


CropBox = tuple  # (top, left, height, width) of the original image inside the padded one


def _pad_any(x: torch.Tensor, left: int, right: int, top: int, bottom: int, mode: str) -> torch.Tensor:
    """F.pad for (B,C,H,W) that also handles pads larger than the image for 'reflect'/'circular'
    (torch refuses those) by padding repeatedly."""
    if mode not in ("reflect", "circular", "replicate", "constant"):
        raise ValueError(f"unknown padding mode '{mode}' (reflect, circular, replicate, constant)")
    if mode in ("replicate", "constant"):
        return F.pad(x, (left, right, top, bottom), mode=mode)
    while left or right or top or bottom:
        H, W = x.shape[-2:]
        lim_w = W - 1 if mode == "reflect" else W
        lim_h = H - 1 if mode == "reflect" else H
        if lim_w <= 0 and (left or right) or lim_h <= 0 and (top or bottom):
            return F.pad(x, (left, right, top, bottom), mode="replicate")  # a 1-px image cannot reflect
        l, r, t, b = (min(left, lim_w), min(right, lim_w), min(top, lim_h), min(bottom, lim_h))
        x = F.pad(x, (l, r, t, b), mode=mode)
        left, right, top, bottom = left - l, right - r, top - t, bottom - b
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple:
    """Pad (B,C,H,W) on the bottom and right up to multiples of `multiple` (what the UNet's
    down-sampling needs). Returns (padded, crop_box) with crop_box=(top, left, H, W) for `crop`.
    Bottom/right only, so the image keeps its pixel grid origin (and its kernel centre convention)."""
    if x.ndim != 4:
        raise ValueError(f"pad_to_multiple expects (B,C,H,W), got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    return _pad_any(x, 0, pw, 0, ph, mode), (0, 0, H, W)


def crop(x, crop_box: CropBox):
    """Inverse of the padding helpers: cut crop_box=(top, left, h, w) out of (..., H, W) tensors or
    numpy H×W×C images."""
    t, l, h, w = crop_box
    if isinstance(x, np.ndarray) and x.ndim == 3:
        return x[t:t + h, l:l + w]
    return x[..., t:t + h, l:l + w]


def pad_for_boundary(y, pad: int, mode: str = "reflect") -> tuple:
    """Extend a non-periodic observation by `pad` px on every side so that the circular (FFT) blur
    model can be used on the padded domain and the result cropped back with `crop`.

    Modes: 'reflect' (mirror, continuous at the image border; the wrap-around seam lies at the outer
    edge of the padding, far from the image when pad ≥ kernel size), 'taper' (mirror, then blended with a
    raised-cosine window towards the per-channel mean over the band, so the periodic extension is also
    continuous at the seam: the classic edge-taper remedy for ringing), 'replicate', or 'circular'
    (no change of model: the photo is treated as periodic). Choose pad ≥ kernel size (e.g. 33). The
    padded pixels are not data; they only keep wrap-around blur away from the cropped interior.
    Accepts (B,C,H,W) tensors or numpy H×W×C; returns the same kind and crop_box=(pad, pad, H, W).
    """
    is_np = isinstance(y, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(to_hwc(y).transpose(2, 0, 1)))[None] if is_np else y
    if x.ndim != 4:
        raise ValueError(f"pad_for_boundary expects (B,C,H,W) or H×W×C, got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    H, W = x.shape[-2:]
    if mode == "taper":
        xp = _pad_any(x, pad, pad, pad, pad, "reflect")
        if pad > 0:  # weight 1 on the image, falling smoothly to 0 at the outer edge of the band
            xp = edge_taper(xp, pad, mean=x.mean(dim=(-2, -1), keepdim=True))
    else:
        xp = _pad_any(x, pad, pad, pad, pad, mode)
    box = (pad, pad, H, W)
    if is_np:
        return xp[0].permute(1, 2, 0).numpy().astype(np.float32), box
    return xp, box

# ------------------------------------------------------------------------------------------- kernels
def pad_centred(k: Array, size) -> Array:
    """Zero-pad or crop a kernel (…, a, b) to `size` (int or (h, w)) keeping its centre tap (a//2, b//2) at
    (h//2, w//2): numpy or torch, dtype kept, not renormalised."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    lead = tuple(k.shape[:-2])
    out = k.new_zeros(lead + (h, w)) if isinstance(k, torch.Tensor) else np.zeros(lead + (h, w), dtype=k.dtype)
    src, dst = [], []
    for a, s in zip(k.shape[-2:], (h, w)):
        off = s // 2 - a // 2
        lo, hi = max(0, off), min(s, off + a)
        dst.append(slice(lo, hi))
        src.append(slice(lo - off, hi - off))
    out[..., dst[0], dst[1]] = k[..., src[0], src[1]]
    return out


def center_of_mass(k: torch.Tensor) -> torch.Tensor:
    """Centre of mass (..., 2) [row, col] of kernels (..., s1, s2) (taps assumed non-negative)."""
    s1, s2 = k.shape[-2:]
    m = k.sum((-2, -1)).clamp_min(torch.finfo(k.dtype).tiny)
    r = torch.arange(s1, device=k.device, dtype=k.dtype)
    c = torch.arange(s2, device=k.device, dtype=k.dtype)
    return torch.stack([(k.sum(-1) * r).sum(-1) / m, (k.sum(-2) * c).sum(-1) / m], -1)


def _shift_axis(k: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift kernels (B, s1, s2) by t (B,) pixels along dim (1 or 2): bilinear, zero fill, non-negative."""
    n = k.shape[dim]
    f = torch.floor(t)
    a = (t - f)  # fractional part in [0, 1)
    src = torch.arange(n, device=k.device)

    def integer_shift(sh: torch.Tensor) -> torch.Tensor:
        idx = src[None, :] - sh.long()[:, None]  # out[j] = in[j - sh]
        valid = ((idx >= 0) & (idx < n)).to(k.dtype)
        idx = idx.clamp(0, n - 1)
        if dim == 1:
            return torch.gather(k, 1, idx[:, :, None].expand(-1, -1, k.shape[2])) * valid[:, :, None]
        return torch.gather(k, 2, idx[:, None, :].expand(-1, k.shape[1], -1)) * valid[:, None, :]

    shape = (-1, 1, 1)
    return (1 - a).reshape(shape) * integer_shift(f) + a.reshape(shape) * integer_shift(f + 1)


RECENTER_SHIFTS = ("bilinear", "integer")


def recenter(k: torch.Tensor, shift: str = "bilinear") -> torch.Tensor:
    """Move each kernel's centre of mass to (s1//2, s2//2); batched over leading dims, on k's device.

    shift 'bilinear': separable integer + bilinear sub-pixel shift: it moves the first moment exactly, keeps
    taps non-negative (a convex combination of shifted copies, unlike the authors' cubic-spline shift), but
    averages neighbouring taps: every sub-pixel move low-passes the kernel. 'integer': whole pixels only,
    towards the middle, once the centre of mass is at least 1 px off (the integer part of the offset): an exact
    copy of the taps, the centre kept within 1 px, no back-and-forth at half-pixel offsets.
    The sum is restored exactly (mass pushed over the border by a far off-centre kernel is rescaled back).
    Negative input taps are clipped first (the centre of mass needs a non-negative kernel).
    """
    if shift not in RECENTER_SHIFTS:
        raise ValueError(f"recenter shift must be one of {RECENTER_SHIFTS}, got {shift!r}")
    lead = k.shape[:-2]
    s1, s2 = k.shape[-2:]
    kb = k.reshape(-1, s1, s2)
    total = kb.sum((-2, -1), keepdim=True)
    kb = kb.clamp_min(0)
    com = center_of_mass(kb)
    ty, tx = (s1 // 2) - com[:, 0], (s2 // 2) - com[:, 1]
    if shift == "integer":
        ty, tx = torch.trunc(ty), torch.trunc(tx)
    out = _shift_axis(kb, ty, 1)
    out = _shift_axis(out, tx, 2)
    s_out = out.sum((-2, -1), keepdim=True)
    out = torch.where(s_out > 0, out * (total / s_out.clamp_min(torch.finfo(k.dtype).tiny)), kb)
    return out.reshape(*lead, s1, s2)


def project_simplex_on(k: torch.Tensor, support: torch.Tensor, total: float = 1.0) -> torch.Tensor:
    """Euclidean projection of k (..., s1, s2) onto {k ≥ 0, Σk = total, k = 0 outside `support`} (bool, s1×s2):
    the simplex projection with the taps outside lowered below any threshold θ it can pick (θ ≥ min − total)."""
    low = k.amin() - total - 1.0
    return project_simplex(torch.where(support, k, low), total) * support


def project_simplex(k: torch.Tensor, total: float = 1.0) -> torch.Tensor:
    """Exact Euclidean projection of each kernel (..., s1, s2) onto {k ≥ 0, Σk = total}.

    Sort-based algorithm (Held et al. 1974; Duchi et al. 2008): the projection is max(k − θ, 0) with the
    unique θ making it sum to `total`, found from the sorted taps in O(N log N); batched, on k's device.
    """
    shape = k.shape
    v = k.reshape(-1, shape[-2] * shape[-1])
    u, _ = torch.sort(v, dim=1, descending=True)
    css = torch.cumsum(u, dim=1) - total
    j = torch.arange(1, v.shape[1] + 1, device=k.device, dtype=k.dtype)
    cond = (u - css / j) > 0
    rho = cond.to(torch.int64).cumsum(1).argmax(1, keepdim=True)  # last index where cond holds
    theta = css.gather(1, rho) / (rho + 1).to(k.dtype)
    return (v - theta).clamp_min(0).reshape(shape)


def dirac(size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centred Dirac kernel (1, 1, size, size)."""
    k = torch.zeros(1, 1, size, size, device=device, dtype=dtype)
    k[..., size // 2, size // 2] = 1.0
    return k

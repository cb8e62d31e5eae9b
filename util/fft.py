"""Stateless FFT helpers for circular true convolution (docs/algorithm.md §2).

Kernels are centred at (s//2, s//2): zero-padded to the image size and rolled by -(s//2), so that
a Dirac at the centre is the identity. All transforms are real (rfft2) over the last two axes.
"""
from __future__ import annotations

import torch


def p2o(k: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Kernel (..., s1, s2) -> optical transfer function (..., H, W//2+1) for an H×W image."""
    H, W = shape
    s1, s2 = k.shape[-2:]
    if s1 > H or s2 > W:
        raise ValueError(f"kernel {s1}x{s2} is larger than the image {H}x{W}")
    pad = k.new_zeros(k.shape[:-2] + (H, W))
    pad[..., :s1, :s2] = k
    pad = torch.roll(pad, shifts=(-(s1 // 2), -(s2 // 2)), dims=(-2, -1))
    return torch.fft.rfft2(pad)


def o2p(K: torch.Tensor, shape: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Inverse of p2o: OTF for an image of `shape` -> centred kernel of `size` (crop of the support)."""
    s1, s2 = size
    k = torch.fft.irfft2(K, s=shape)
    k = torch.roll(k, shifts=(s1 // 2, s2 // 2), dims=(-2, -1))
    return k[..., :s1, :s2]


def fft2(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft2(x)


def ifft2(X: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.fft.irfft2(X, s=shape)


def conv_circular(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Circular true convolution k ⊛ x of images (..., H, W) with a centred kernel (..., s, s)."""
    shape = x.shape[-2:]
    return torch.fft.irfft2(torch.fft.rfft2(x) * p2o(k.to(x.dtype), shape), s=shape)

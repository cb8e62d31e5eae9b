"""Grayscale observations with an RGB prior (issue 13).

A grayscale photo is read as three identical channels, and the RGB prior restores it in RGB. The
replicated data term Σ_c ‖y − k⊛x_c‖²/σ² = 3‖y − k⊛x̄‖²/σ² + Σ_c ‖k⊛(x_c − x̄)‖²/σ² (x̄ the channel mean)
counts the one observed noise three times: it is the grayscale likelihood at σ/√3, which over-fits the
noise and the model misfit. Running the replicated channels at σ·√3 gives exactly the grayscale
likelihood ‖y − k⊛x̄‖²/σ², plus a term that only pulls the channels towards each other (the truth is
grey). The M-step's joint colour solve then also weighs the data once against its prox term βσ².
The result is returned as the channel mean (one channel: grayscale in, grayscale out).
"""
from __future__ import annotations

import math

import numpy as np


def is_grayscale(y: np.ndarray) -> bool:
    """H×W×C image whose channels are all identical (a grey image read as RGB)."""
    return y.ndim == 3 and y.shape[2] > 1 and all(np.array_equal(y[..., c], y[..., 0]) for c in range(1, y.shape[2]))


def replicated_sigma(sigma: float, channels: int) -> float:
    """σ to use on `channels` replicated copies of one grey observation of noise σ (module doc)."""
    return float(sigma) * math.sqrt(channels)


def to_gray(x: np.ndarray) -> np.ndarray:
    """H×W×C -> H×W×1 channel mean."""
    return x.mean(axis=2, keepdims=True).astype(x.dtype)

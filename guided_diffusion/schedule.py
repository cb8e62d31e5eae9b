"""Noise schedule and respacing (docs/algorithm.md §1).

The UNet is trained on T = 1000 steps; sampling keeps N of them, `round(i·(T−1)/(N−1))`, recomputes β from
the kept ᾱ, and feeds the UNet the original timestep index. Everything here is float64 numpy; samplers
take plain floats per step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


SCHEDULES = ("linear", "cosine")


def get_betas(kind: str = "linear", T: int = 1000) -> np.ndarray:
    """β_1..β_T: 'linear' (1e-4 → 0.02, scaled for T ≠ 1000, as ADM) or 'cosine' (Nichol & Dhariwal)."""
    if kind == "linear":
        scale = 1000 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if kind == "cosine":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule {kind!r} (use 'linear' or 'cosine')")


def respaced_timesteps(T: int, N: int) -> np.ndarray:
    """Kept original indices round(i·(T−1)/(N−1)), i = 0..N−1 (N = 100: 0, 10, 20, …, 989, 999)."""
    if not 1 <= N <= T:
        raise ValueError(f"number of steps {N} must be in 1..{T}")
    if N == 1:
        return np.array([T - 1])
    ts = np.round(np.arange(N) * (T - 1) / (N - 1)).astype(np.int64)
    if len(np.unique(ts)) != N:
        raise ValueError(f"respacing {T} -> {N} repeats timesteps")
    return ts


@dataclass(frozen=True)
class Schedule:
    """A (respaced) DDPM schedule; index i = 0..N−1 runs from least to most noisy."""
    timesteps: np.ndarray          # original indices fed to the UNet
    betas: np.ndarray
    alphas_cumprod: np.ndarray     # ᾱ at the kept steps
    alphas_cumprod_prev: np.ndarray

    @staticmethod
    def create(steps: int = 1000, kind: str = "linear", T: int = 1000) -> "Schedule":
        base = np.cumprod(1.0 - get_betas(kind, T))
        ts = respaced_timesteps(T, steps)
        ac = base[ts]
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        return Schedule(timesteps=ts, betas=1.0 - ac / ac_prev, alphas_cumprod=ac, alphas_cumprod_prev=ac_prev)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def posterior_variance(self) -> np.ndarray:
        """β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t): DDPM 'fixed small' variance."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Weight of x̂0 in the mean of q(x_{t−1} | x_t, x0)."""
        return self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Weight of x_t in the mean of q(x_{t−1} | x_t, x0)."""
        return (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)

    def step_coefs(self, i: int, eta: float = 1.0) -> tuple[float, float, float]:
        """(a, b, s) of the reverse step x_{t−1} = a·x̂0 + b·x_t + s·z at index i.

        η = 1: DDPM ancestral with 'fixed small' variance (the paper's sampler; the same floats as the
        posterior coefficients above). η < 1: DDIM (Song et al. 2021), s = η·sqrt(β̃_t), with the rest of
        the x_{t−1} variance carried by the predicted noise ε̂ = (x_t − sqrt(ᾱ_t)·x̂0)/sqrt(1−ᾱ_t); η = 0 is
        deterministic. Both coincide at η = 1 up to rounding.
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if eta == 1.0:
            return (float(self.posterior_mean_coef1[i]), float(self.posterior_mean_coef2[i]),
                    math.sqrt(float(self.posterior_variance[i])))
        ac, ac_prev = float(self.alphas_cumprod[i]), float(self.alphas_cumprod_prev[i])
        s = eta * math.sqrt(float(self.posterior_variance[i]))
        b = math.sqrt(max(1.0 - ac_prev - s * s, 0.0)) / math.sqrt(1.0 - ac)
        return math.sqrt(ac_prev) - b * math.sqrt(ac), b, s

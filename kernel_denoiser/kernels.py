"""Random camera-shake kernels and their statistics (kernel geometry lives in util.geometry).

Generator model (`camera_shake_kernels`)
-----------------------------------------
A camera-shake PSF is the image of a point light source integrated over the exposure: the time the
projected camera trajectory spends at each position. Following the random-trajectory model of Boracchi &
Foi (2012, "Modeling the performance of image restoration from motion blur"), we simulate a 2-D
trajectory p(t), t ∈ [0, 1] (the exposure), as a random walk with inertia, in continuous time
(semi-implicit Euler, T = 512 steps), independently per kernel:

    dv = (−ω² p − γ v) dt + a dW + jerks,      dp = v dt,

- inertia: the hand moves a mass, so the *acceleration* is random (white, amplitude `a`), not the position;
- a centripetal pull −ω² p (the photographer holds the aim), with damping γ — a noisy damped oscillator,
  so trajectories wander, turn back and sometimes loop, like real tremor;
- impulsive shakes: a Poisson number of abrupt velocity kicks (Boracchi–Foi's "big shakes");
- a random initial velocity (the dominant drift direction).
Per kernel, ω ∈ [0, 2]·2π (0–2 oscillations per exposure), γ ∈ [0.5, 6], a relative to the drift ∈ [0.3, 2],
kick rate ∈ [0, 2] per exposure. Equal time steps carry equal light (uniform shutter), so slow parts (turning
points) collect more energy — the bright dwell spots of real PSFs. `exposure_weighting=True` instead
multiplies the light by a random smooth positive profile (shutter opening/closing, flicker).
The path is then scaled so that its larger extent is a random length in `extent` (fraction of the kernel
size; default 0.24–0.55: with the splat spread, supports of ~10–21 px for 33×33, as Levin's), translated
so that the light-weighted centre of mass lands exactly on the kernel centre (s//2, s//2), and rasterised with bilinear splatting (sub-pixel,
preserves mass and first moments exactly, so the kernel's centre of mass *is* the centre). An optional
small Gaussian optical blur (`optics_sigma`) thickens the line. Kernels sum to 1.

"""
from __future__ import annotations

from typing import Union

import numpy as np

RNG = Union[np.random.Generator, int, None]


def _rng(rng: RNG) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def random_trajectories(n: int, rng: RNG, T: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """n random camera trajectories (n, T, 2) in arbitrary units and their light weights (n, T)."""
    g = _rng(rng)
    dt = 1.0 / T
    omega = g.uniform(0.0, 2.0, n) * 2 * np.pi
    gamma = g.uniform(0.5, 6.0, n)
    theta0 = g.uniform(0, 2 * np.pi, n)
    v = np.stack([np.cos(theta0), np.sin(theta0)], -1)  # unit drift; the path is rescaled afterwards
    acc = g.uniform(0.3, 2.0, n) * (1.0 + omega / (2 * np.pi))  # stronger pull needs more drive to be visible
    kick_rate = g.uniform(0.0, 2.0, n)
    p = np.zeros((n, 2))
    P = np.empty((n, T, 2))
    dW = g.standard_normal((n, T, 2)) * np.sqrt(dt)
    kicks = g.random((n, T)) < (kick_rate * dt)[:, None]
    kick_dir = g.uniform(0, 2 * np.pi, (n, T))
    kick_mag = g.uniform(0.5, 2.0, (n, T))
    for t in range(T):
        a_t = -(omega ** 2)[:, None] * p - gamma[:, None] * v
        v = v + a_t * dt + acc[:, None] * dW[:, t] * np.sqrt(1.0 + omega[:, None])
        if kicks[:, t].any():
            speed = np.linalg.norm(v, axis=1) + 1e-3
            kv = np.stack([np.cos(kick_dir[:, t]), np.sin(kick_dir[:, t])], -1) * (kick_mag[:, t] * speed)[:, None]
            v = v + kv * kicks[:, t, None]
        p = p + v * dt
        P[:, t] = p
    w = np.ones((n, T))
    return P, w


def _smooth_profiles(n: int, T: int, g: np.random.Generator) -> np.ndarray:
    """Random smooth positive light profiles (n, T), mean 1 (exposure-time weighting)."""
    base = g.standard_normal((n, 8))
    t = np.linspace(0, 1, T)
    grid = np.linspace(0, 1, 8)
    prof = np.stack([np.interp(t, grid, b) for b in base])
    prof = np.exp(g.uniform(0.0, 1.0, (n, 1)) * prof)
    return prof / prof.mean(1, keepdims=True)


def _splat(P: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
    """Bilinear splatting of weighted points (n, T, 2) [row, col] on an (n, size, size) grid."""
    n, T, _ = P.shape
    r0 = np.floor(P[..., 0]).astype(np.int64)
    c0 = np.floor(P[..., 1]).astype(np.int64)
    fr = P[..., 0] - r0
    fc = P[..., 1] - c0
    base = (np.arange(n)[:, None] * size * size)
    out = np.zeros(n * size * size)
    for dr, dc, ww in ((0, 0, (1 - fr) * (1 - fc)), (1, 0, fr * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 1, fr * fc)):
        idx = base + (r0 + dr) * size + (c0 + dc)
        out += np.bincount(idx.ravel(), weights=(ww * w).ravel(), minlength=n * size * size)
    return out.reshape(n, size, size)


def _gauss_blur(k: np.ndarray, sig: np.ndarray) -> np.ndarray:
    """Per-kernel separable Gaussian blur (n, s, s), sig (n,) in px (0 = none); 'same', zero outside."""
    s = k.shape[-1]
    x = np.arange(-3, 4)
    g = np.exp(-0.5 * (x[None] / np.maximum(sig[:, None], 1e-6)) ** 2)
    g[sig < 1e-3] = (x == 0).astype(float)
    g /= g.sum(1, keepdims=True)
    kp = np.pad(k, ((0, 0), (3, 3), (3, 3)))
    rows = sum(g[:, i, None, None] * kp[:, i:i + s, :] for i in range(7))
    return sum(g[:, i, None, None] * rows[:, :, i:i + s] for i in range(7))


def camera_shake_kernels(n: int, size: int = 33, rng: RNG = None, extent: tuple[float, float] = (0.24, 0.55),
                         optics_sigma: tuple[float, float] = (0.0, 0.3), exposure_weighting: bool = False,
                         T: int = 512) -> np.ndarray:
    """n random camera-shake kernels (n, size, size) float32, sum 1, centre of mass at (size//2, size//2).

    size 9..64 (any); `rng` a numpy Generator or int seed (same seed -> same kernels); `extent` the range of
    the larger support extent as a fraction of `size`. See the module docstring for the model.
    """
    if not 9 <= size <= 64:
        raise ValueError(f"kernel size {size} outside 9..64")
    g = _rng(rng)
    P, w = random_trajectories(n, g, T)
    if exposure_weighting:
        w = w * _smooth_profiles(n, T, g)
    c = size // 2
    margin = 1.0 + 3 * optics_sigma[1]  # keep bilinear splats and the optical blur inside the grid
    span = np.maximum((P.max(1) - P.min(1)).max(1), 1e-9)  # (n,)
    target = g.uniform(*extent, n) * size
    scale = target / span
    com = (P * w[..., None]).sum(1) / w.sum(1)[:, None]
    Q = (P - com[:, None]) * scale[:, None, None]
    # shrink about the centre of mass if a lopsided path would leave the grid (keeps the COM exact)
    lim_lo, lim_hi = c - margin, (size - 1 - margin) - c
    reach_lo = np.maximum(-Q.min(1), 1e-9).max(1)
    reach_hi = np.maximum(Q.max(1), 1e-9).max(1)
    shrink = np.minimum(1.0, np.minimum(lim_lo / reach_lo, lim_hi / reach_hi))
    Q = Q * shrink[:, None, None] + c
    k = _splat(Q, w, size)
    sig = g.uniform(*optics_sigma, n)
    k = _gauss_blur(k, sig)
    k = np.maximum(k, 0)
    k /= k.sum((1, 2), keepdims=True)
    return k.astype(np.float32)


def kernel_stats(k: np.ndarray, rel_thresh: float = 1e-3) -> dict:
    """Statistics of one kernel: non-zero taps (> rel_thresh·max), support extent (rows, cols), peak share."""
    k = np.asarray(k, dtype=np.float64)
    k = k / k.sum()
    m = k > rel_thresh * k.max()
    r, c = np.nonzero(m)
    return {"taps": int(m.sum()), "extent_r": int(r.max() - r.min() + 1), "extent_c": int(c.max() - c.min() + 1),
            "extent": int(max(r.max() - r.min(), c.max() - c.min()) + 1), "peak": float(k.max())}

"""Writing a run's outputs: atomic files (PNG, .npy, text, JSON, GIF), kernel pictures and montages.

Every writer writes a temp file in the destination folder and then os.replace()s it, so an interrupted
run never leaves a half-written output under the final name.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from util.images import PathLike, to_hwc

def file_in_the_way(path: PathLike) -> Optional[Path]:
    """The path itself or the first of its parents that exists as a file (then no folder can be made there)."""
    p = Path(path)
    return next((q for q in [p, *p.parents] if q.exists() and not q.is_dir()), None)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: toggling the umask later would race with other threads creating files
_FILE_MODE = 0o666 & ~_current_umask()


def atomic_write(path: PathLike, write: Callable) -> Path:
    """Call write(fileobj) on a temp file in the destination folder, fsync, then rename over `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name[:32]}.", suffix=".tmp")  # short: any legal name fits
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; give outputs the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def to_uint8(img: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """[0, 1] float image -> uint8 H×W×C, clipped and rounded; NaN becomes 0."""
    a = np.nan_to_num(to_hwc(img), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: PathLike, img: Union[np.ndarray, torch.Tensor]) -> Path:
    """8-bit PNG of an image in [0, 1] (clipped), written atomically."""
    a = to_uint8(img)
    pil = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    return atomic_write(path, lambda f: pil.save(f, format="PNG"))


def save_npy(path: PathLike, arr: Union[np.ndarray, torch.Tensor]) -> Path:
    """.npy of an array (tensors go to CPU numpy), written atomically."""
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False))


def save_text(path: PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def _json_clean(obj):
    """numpy/torch scalars and arrays to Python; non-finite floats to None (strict JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path: PathLike, obj) -> Path:
    """Strict JSON (indent 2, keys in given order); inf/NaN are written as null."""
    return save_text(path, json.dumps(_json_clean(obj), indent=2, allow_nan=False) + "\n")


def kernel_to_image(k: Union[np.ndarray, torch.Tensor], scale: int = 8) -> np.ndarray:
    """Kernel -> float H×W in [0, 1]: divided by its max (negative taps shown as 0), nearest-magnified."""
    a = k.detach().cpu().numpy() if isinstance(k, torch.Tensor) else np.asarray(k)
    a = a.astype(np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D kernel, got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0)
    m = a.max(initial=0.0)
    a = np.clip(a / m, 0, 1) if m > 0 else np.zeros_like(a)
    return magnify(a, scale).astype(np.float32)


def magnify(a: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour magnification of a 2-D array by an integer factor (at least 1)."""
    scale = max(1, int(scale))
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1)


def save_kernel_png(path: PathLike, k: Union[np.ndarray, torch.Tensor], scale: int = 8) -> Path:
    """Grey PNG of a kernel normalised by its max and magnified `scale`× (nearest), written atomically."""
    return save_png(path, kernel_to_image(k, scale))


def save_gif(path: PathLike, frames: Sequence, duration_ms: int = 100, loop: int = 0) -> Path:
    """Animated GIF from a sequence of [0, 1] images (H×W or H×W×3, numpy or tensor), written atomically."""
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames to write")
    ims = []
    for fr in frames:
        a = to_uint8(fr)
        ims.append(Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3]))
    return atomic_write(path, lambda f: ims[0].save(f, format="GIF", save_all=True, append_images=ims[1:],
                                                     duration=duration_ms, loop=loop))


def make_montage(blurry, restored, sharp=None, k_est=None, k_true=None, gap: int = 4,
                 kernel_scale: Optional[int] = None) -> np.ndarray:
    """Float H'×W'×3 in [0, 1]: [blurry | restored | sharp (when known)] on top, and below, when any
    kernel is given, a strip [estimated kernel | true kernel] magnified (nearest, normalised by max).

    White gaps of `gap` px separate panels. The kernel scale defaults to the largest integer ≤ 8 that
    keeps a kernel within half the image height.
    """
    panels = [np.clip(to_hwc(a)[:, :, :3], 0, 1) for a in (blurry, restored, sharp) if a is not None]
    panels = [np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p for p in panels]
    h = panels[0].shape[0]
    for p in panels[1:]:
        if p.shape[:2] != panels[0].shape[:2]:
            raise ValueError(f"montage panels differ in size: {panels[0].shape[:2]} vs {p.shape[:2]}")
    white_v = np.ones((h, gap, 3), np.float32)
    top = np.concatenate(sum(([p, white_v] for p in panels), [])[:-1], axis=1)
    kernels = [k for k in (k_est, k_true) if k is not None]
    if not kernels:
        return top.astype(np.float32)
    flat = [kernel_to_image(k, 1) for k in kernels]  # 2-D, normalised, unmagnified (1×1 included)
    ks = max(max(f.shape) for f in flat)
    scale = kernel_scale or max(1, min(8, (h // 2) // ks))
    kims = [np.repeat(magnify(f, scale)[:, :, None], 3, axis=2) for f in flat]
    kh = max(k.shape[0] for k in kims)
    row = []
    for k in kims:
        k = np.pad(k, ((0, kh - k.shape[0]), (0, 0), (0, 0)), constant_values=1.0)
        row += [k, np.ones((kh, gap, 3), np.float32)]
    strip = np.concatenate(row[:-1], axis=1)
    W = max(top.shape[1], strip.shape[1])
    top = np.pad(top, ((0, 0), (0, W - top.shape[1]), (0, 0)), constant_values=1.0)
    strip = np.pad(strip, ((0, 0), (0, W - strip.shape[1]), (0, 0)), constant_values=1.0)
    return np.concatenate([top, np.ones((gap, W, 3), np.float32), strip], axis=0).astype(np.float32)

"""Blur-kernel files in the formats users bring: `.npy` (one s×s kernel or a stack N×s×s), 8/16-bit PNG
(grey; a colour PNG is averaged over channels), and MATLAB `.mat` files as Levin et al. 2009 distribute them
(one kernel per file in a variable `f`, beside the sharp `x` and blurry `y`; other common names: `k`,
`kernel`, `psf`, `h`, or a cell/struct array of kernels).

Every kernel comes out as float64 2-D, non-negative part kept (tiny negative taps from deconvolution-based
estimates are clipped), normalised to sum 1. Errors are ImageReadError with one line naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from util.images import ImageReadError, read_image, read_npy_array

KERNEL_EXTS = (".npy", ".png", ".mat")
MAT_NAMES = ("f", "k", "kernel", "kernels", "psf", "h", "K", "PSF")  # Levin's files use `f`
MAX_KERNEL = 255  # a larger 2-D array in a .mat is an image, not a kernel


def _normalise(k: np.ndarray, path: Path, what: str = "kernel") -> np.ndarray:
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2:
        raise ImageReadError(f"{path}: {what} must be 2-D, got shape {k.shape}")
    if not np.all(np.isfinite(k)):
        raise ImageReadError(f"{path}: {what} contains NaN or inf")
    k = np.maximum(k, 0.0)
    s = k.sum()
    if not s > 0:
        raise ImageReadError(f"{path}: {what} has no positive mass; cannot normalise")
    return k / s


def _mat_arrays(obj) -> list:
    """Kernels inside one loaded .mat variable: a 2-D array, a 3-D stack (s×s×N, MATLAB order), or cells."""
    if isinstance(obj, np.ndarray) and obj.dtype == object:
        return [a for item in obj.ravel() for a in _mat_arrays(item)]
    a = np.asarray(obj)
    if a.dtype.kind not in "fiu" or a.size < 1:
        return []
    a = np.squeeze(a)
    if a.ndim == 2:
        return [a]
    if a.ndim == 3:  # MATLAB stacks kernels along the last axis
        return [a[:, :, i] for i in range(a.shape[2])]
    return []


def _read_mat(p: Path) -> list:
    try:
        from scipy.io import loadmat
        d = loadmat(p)
    except NotImplementedError:  # v7.3 files are HDF5
        raise ImageReadError(f"{p}: MATLAB v7.3 (HDF5) .mat is not supported; save with -v7 or as .npy") from None
    except Exception as e:
        raise ImageReadError(f"{p}: unreadable .mat ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    names = [n for n in MAT_NAMES if n in d]
    if not names:  # fall back to the only small numeric 2-D/3-D variable
        names = [n for n in d if not n.startswith("__") and _mat_arrays(d[n])
                 and max(_mat_arrays(d[n])[0].shape) <= MAX_KERNEL]
        if len(names) != 1:
            raise ImageReadError(f"{p}: no kernel variable found (looked for {', '.join(MAT_NAMES)}; "
                                 f"variables: {', '.join(n for n in d if not n.startswith('__'))})")
    arrays = _mat_arrays(d[names[0]])
    if not arrays:
        raise ImageReadError(f"{p}: variable '{names[0]}' holds no numeric kernel")
    return arrays


def read_kernels(path) -> list:
    """All kernels in one file, each float64 2-D summing to 1 (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{p}: no such file")
    ext = p.suffix.lower()
    if ext == ".npy":
        a = read_npy_array(p).astype(np.float64)
        while a.ndim > 3 and a.shape[0] == 1:
            a = a[0]
        arrays = [a] if a.ndim == 2 else list(a) if a.ndim == 3 else None
        if arrays is None:
            raise ImageReadError(f"{p}: expected an s×s kernel or an N×s×s stack, got shape {a.shape}")
    elif ext == ".png":
        arrays = [read_image(p).mean(axis=2)]  # kernels are grey; a colour PNG's channels are averaged
    elif ext == ".mat":
        arrays = _read_mat(p)
    else:
        raise ImageReadError(f"{p}: unsupported kernel format '{p.suffix}' (expected {', '.join(KERNEL_EXTS)})")
    return [_normalise(a, p, f"kernel {i}" if len(arrays) > 1 else "kernel") for i, a in enumerate(arrays)]


def list_kernel_files(folder) -> list:
    """Kernel files of a folder, sorted by name (hidden files skipped)."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: kernel folder does not exist")
    files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in KERNEL_EXTS)
    if not files:
        raise ValueError(f"{d}: no kernel files ({', '.join(KERNEL_EXTS)})")
    return files

"""Kernel from a (sharp, blurry) pair: PSF calibration from a known target.

    python -m diffusion_em.estimate_kernel --sharp S --blurry B --sigma 0.01 --kernel_size 33 --out k.npy

Runs the M-step (docs/algorithm.md §1) with the sharp image as the known x, `--calls` times from a centred Dirac
(J HQS iterations each), writes the kernel (float32, sum 1) and a magnified PNG preview of it. Output names:
a trailing .npy or .png is taken off `--out` and both are put back, so `--out k.npy`, `--out k.png` and
`--out k` all write the kernel to `k.npy` and the preview to `k.png`. Both are refused before any work when
either would replace an input (`--sharp`, `--blurry`, `--denoiser`), when `--out` is a folder, and when an
existing file of those names is not a kernel this command writes (float32, square, non-negative, sum 1) resp. the grey preview of the kernel beside it (a rerun replaces its own outputs).
Inputs: png/jpg/tif/.npy (docs/algorithm.md §4; .npy = float32 H×W×3 in [0,1]). The blur model is circular;
for real photographs use `--taper N` to fade both images to their mean over N pixels at the borders, which
removes most of the wrap-around mismatch. The kernel keeps the sharp→blurry registration (no re-centring)
unless `--recenter` is given. `--denoiser auto` uses models/kernel_denoiser_<s>.pth when it exists (s = 33 or
64), `none` disables the kernel prior.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from diffusion_em.mstep import MStepConfig, m_step
from util.geometry import dirac
from kernel_denoiser.network import load_kernel_denoiser
from util.geometry import edge_taper, recenter
from util.device import check_threads, resolve_device
from util.errors import InputError
from util.images import PathLike, read_image
from util.outputs import file_in_the_way, save_kernel_png, save_npy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(InputError):
    pass


def output_paths(out: str) -> Tuple[str, str]:
    """(kernel .npy, preview .png) of --out: a trailing .npy or .png (any case) is replaced by both suffixes."""
    stem, ext = os.path.splitext(out)
    if ext.lower() not in (".npy", ".png"):
        stem = out
    return stem + ".npy", stem + ".png"


def _same_file(a: PathLike, b: PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist (yet): it cannot be the other one
        return False


def _kernel_file(path: str) -> Tuple[Optional[int], Optional[str]]:
    """(its side, None) when an existing .npy is a kernel this command wrote (a float32 square array, no negative
    taps, sum 1: a rerun may replace it), else (None, what it is). Memory-mapped: shape and type are checked first."""
    try:
        k = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(k, np.ndarray):  # e.g. an .npz archive under a .npy name
            return None, "not a .npy array"
        if k.dtype != np.float32 or k.ndim != 2 or k.shape[0] != k.shape[1] or k.size == 0:
            return None, f"an array of shape {tuple(k.shape)} and type {k.dtype}"
        if not (np.isfinite(k).all() and k.min() >= 0 and abs(float(k.sum(dtype=np.float64)) - 1) < 1e-3):
            return None, "an array that is not a kernel (negative, non-finite or not summing to 1)"
    except Exception:  # noqa: BLE001 - any unreadable file: not one of ours
        return None, "not a .npy array"
    return k.shape[0], None


def _preview_file(path: str, npy: str, sizes: Tuple[int, ...]) -> Optional[str]:
    """What an existing .png is when it is not a preview of ours: a grey square of side s·max(2, 256 // s) for s
    in `sizes` (the kernel beside it and this run's; this run's alone where there is no `npy`; empty when `npy` is
    a file not of ours); None when it is. This run's size too, because the preview is written before its kernel:
    a run stopped between the two left the new preview beside the old kernel, or alone."""
    if not sizes:
        return f"beside {npy}, which is not a kernel that this command wrote"
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
    except Exception:  # noqa: BLE001 - any unreadable file: not a preview of ours
        return "not a PNG image"
    sides = {s * max(2, 256 // s) for s in sizes}
    return None if mode == "L" and w == h and w in sides else f"a {w}x{h} {mode} image"


def check_outputs(out: str, inputs: dict, kernel_size: int) -> Tuple[str, str]:
    """The (kernel, preview) paths of --out, or InputError naming --out when writing them would fail, replace an
    input ({flag: path}) or replace a file this command did not write (`kernel_size`: this run's). Nothing is
    written."""
    if os.path.isdir(out) or not os.path.basename(out):
        raise InputError(f"--out {out}: names a folder; give the kernel's file name, "
                         f"e.g. {os.path.join(out, 'kernel.npy')}")
    npy, png = output_paths(out)
    blocked = file_in_the_way(Path(npy).parent)
    if blocked is not None:
        raise InputError(f"--out {out}: {blocked} is a file, not a folder")
    # the .npy is read once, memory-mapped (a FIFO or folder there is refused below, never opened)
    side, not_kernel = _kernel_file(npy) if os.path.isfile(npy) else (None, None)
    # previews accepted: of the kernel beside it and of this run's size (alone too: a first run stopped between its writes)
    sizes = () if not_kernel else tuple(s for s in (side, kernel_size) if s is not None)
    for path, what in ((npy, "kernel"), (png, "kernel preview")):
        if os.path.isdir(path):
            raise InputError(f"--out {out}: the {what} {path} would replace a folder; choose another --out")
        for flag, src in inputs.items():
            if src is not None and _same_file(path, src):
                raise InputError(f"--out {out}: the {what} {path} would overwrite the {flag} input {src}; "
                                 f"choose another --out")
        if (os.path.exists(path) or os.path.islink(path)) and not os.path.isfile(path):  # a FIFO would block a read
            raise InputError(f"--out {out}: {path} exists and is not a regular file; choose another --out")
        if os.path.exists(path):
            other = _preview_file(path, npy, sizes) if path == png else not_kernel
            if other is not None:
                raise InputError(f"--out {out}: {path} exists and is not a {what} ({other}); refusing to replace "
                                 f"it, choose another --out")
    return npy, png


def taper(img: np.ndarray, n: int) -> np.ndarray:
    """Blend the image (H,W,C) into its mean over n border pixels (raised-cosine ramp): makes it ~periodic."""
    if n <= 0:
        return img
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float64))
    return edge_taper(x, n).numpy().transpose(1, 2, 0).astype(np.float32)


def resolve_denoiser(spec: str, size: int, device):
    if spec == "none":
        return None, "none"
    path = os.path.join(ROOT, "models", f"kernel_denoiser_{size}.pth") if spec == "auto" else spec
    if spec == "auto" and not os.path.isfile(path):
        return None, f"none (no {path})"
    return load_kernel_denoiser(path, device=device), path


def estimate(sharp: np.ndarray, blurry: np.ndarray, sigma: float, cfg: MStepConfig, kernel_size: int, calls: int,
             denoiser=None, device="cpu") -> torch.Tensor:
    """Kernel (s, s) explaining blurry ≈ k ⊛ sharp; arrays H×W×3 in [0,1]."""
    if sharp.shape != blurry.shape:
        raise UsageError(f"--sharp is {sharp.shape[1]}x{sharp.shape[0]} but --blurry is "
                         f"{blurry.shape[1]}x{blurry.shape[0]} (width x height): they must match")
    H, W = sharp.shape[:2]
    if kernel_size > min(H, W):
        raise UsageError(f"--kernel_size {kernel_size} is larger than the image ({W}x{H})")
    x = torch.from_numpy(np.ascontiguousarray(sharp.transpose(2, 0, 1)))[None].to(device)
    y = torch.from_numpy(np.ascontiguousarray(blurry.transpose(2, 0, 1)))[None].to(device)
    k = dirac(kernel_size, device=device)
    for _ in range(calls):
        k = m_step(y, x, k, sigma, cfg, denoiser)
    return k[0, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m diffusion_em.estimate_kernel",
                                 description="Estimate a blur kernel from a sharp/blurry image pair.")
    ap.add_argument("--sharp", required=True)
    ap.add_argument("--blurry", required=True)
    ap.add_argument("--sigma", type=float, required=True, help="noise std of the blurry image, [0,1] units")
    ap.add_argument("--kernel_size", type=int, default=33)
    ap.add_argument("--out", required=True,
                    help="output name: the kernel goes to <stem>.npy and a magnified preview to <stem>.png, where "
                         "<stem> is --out without a trailing .npy or .png (--out k.npy, k.png or k: k.npy + k.png). "
                         "Refused if either would replace an input, a folder, or a file that is not an earlier "
                         "kernel/preview")
    ap.add_argument("--calls", type=int, default=30, help="M-step calls of J HQS iterations from the Dirac")
    ap.add_argument("--J", type=int, default=10)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1e5)
    ap.add_argument("--colour", default="joint", choices=["joint", "per_channel_mean"])
    ap.add_argument("--denoiser", default="auto", help="auto | none | path to a kernel denoiser .pth")
    ap.add_argument("--taper", type=int, default=0, help="border taper width in px for non-periodic photos")
    ap.add_argument("--recenter", action="store_true", help="move the kernel's centre of mass to the middle")
    ap.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:1, mps, ...")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (the M-step's ops are small: 1 is fastest, and much faster on a busy machine)")
    a = ap.parse_args(argv)
    prog = "estimate_kernel"
    try:
        check_threads(a.threads)
        torch.set_num_threads(a.threads)
        if not a.sigma >= 0:
            raise UsageError(f"--sigma must be >= 0, got {a.sigma}")
        if a.sigma > 1:
            raise UsageError(f"--sigma {a.sigma} is in [0,1] units (did you mean {a.sigma / 255:.4g} = {a.sigma:g}/255?)")
        if a.kernel_size < 1 or a.calls < 1:
            raise UsageError("--kernel_size and --calls must be >= 1")
        device = resolve_device(a.device, 0)
        den_src = None if a.denoiser in ("auto", "none") else a.denoiser
        npy, png = check_outputs(a.out, {"--sharp": a.sharp, "--blurry": a.blurry, "--denoiser": den_src}, a.kernel_size)
        sharp = read_image(a.sharp)
        blurry = read_image(a.blurry)
        cfg = MStepConfig(lam=a.lam, beta=a.beta, J=a.J, colour=a.colour)
        den, den_name = resolve_denoiser(a.denoiser, a.kernel_size, device)
        k = estimate(taper(sharp, a.taper), taper(blurry, a.taper), a.sigma, cfg, a.kernel_size, a.calls, den, device)
        if a.recenter:
            k = recenter(k)
        k = (k / k.sum()).cpu().numpy().astype(np.float32)
        save_kernel_png(png, k, scale=max(2, 256 // a.kernel_size))  # first: a stop in between leaves the old kernel
        save_npy(npy, k)
    except (ValueError, OSError) as e:  # ImageReadError is a ValueError; one line, no traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"{prog}: wrote {npy} and {png} (kernel {a.kernel_size}x{a.kernel_size}, denoiser {den_name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

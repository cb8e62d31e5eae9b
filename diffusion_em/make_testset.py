"""Generate a blind-deblurring test set in the runner's folder format from your own images and kernels.

    python -m diffusion_em.make_testset --images photos/ --kernels generate --kernel_sizes 9,17,25,33 \\
        --sigmas 5,10,20 --size 256 --boundary circular --seed 0 --out my_set

One case per image (images sorted by name; `DIR:N` takes N of a folder's images, chosen by the seed). Each
case gets the next kernel of the pool (generated camera-shake kernels and/or the given files, shuffled by
the seed, used round-robin) and a σ of `--sigmas` (in /255 units), round-robin along the cases sorted by
kernel size so that each kernel size meets every σ.

Boundary (`--boundary`):
- `circular`: y = k ⊛ x + n with circular convolution on the size×size crop (the model the FFT methods
  assume; fine for benchmarking the prior, optimistic for real photos).
- `valid`: a (size + s − 1)² crop of the scene is blurred and only the size×size part that sees no border
  is kept, as a camera sees it; the ground truth is the matching centre of that crop. An image too small
  for the larger crop is first upscaled (bicubic) just enough; meta.csv says so.

Written (the folder format of the runner and of `evaluate`):
  blurry/<name>.npy  float32 H×W×3, noise included, not clipped
  sharp/<name>.png   8-bit ground truth
  kernel/<name>.npy  float32 s×s kernel, sum 1, centred at (s//2, s//2)
  meta.csv           name,sigma,boundary,kernel_size,kernel_extent,kernel_source,image_source
  README.md          the command and the case table
Deterministic: the same arguments and seed give byte-identical files (per-case random streams).
Generated kernels: kernel_denoiser.kernels.camera_shake_kernels at array size s with a support of 60–90 %
of s, so `kernel_size` ≈ the blur's extent; `kernel_extent` is the measured support (taps > 1e-3·max).
"""
from __future__ import annotations

import argparse
import csv
import io as _io
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kernel_denoiser.kernels import camera_shake_kernels, kernel_stats
from util.fft import conv_circular
from util.geometry import pad_centred
from util.images import IMAGE_EXTS, ImageReadError, read_image
from util.outputs import file_in_the_way, save_npy, save_png, save_text
from util.kernel_files import list_kernel_files, read_kernels

BOUNDARIES = ("circular", "valid")
GENERATED_EXTENT = (0.6, 0.9)


@dataclass(frozen=True)
class KernelEntry:
    k: np.ndarray
    source: str


def _case_rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream per (seed, purpose, index): adding cases never changes earlier ones."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def _odd_square(k: np.ndarray) -> np.ndarray:
    """Zero-pad a kernel to an odd square so its centre tap (s//2, s//2) is well defined."""
    s = max(k.shape)
    return pad_centred(np.asarray(k, np.float64), s + 1 - s % 2)


def file_kernels(specs: list) -> list:
    """Kernels of the given folders/files (all kernels of each file), in name order."""
    pool = []
    for spec in specs:
        p = Path(spec)
        for f in (list_kernel_files(p) if p.is_dir() else [p]):
            ks = read_kernels(f)
            pool += [KernelEntry(_odd_square(k), f.name + (f"[{i}]" if len(ks) > 1 else "")) for i, k in enumerate(ks)]
    return pool


def generated_kernels(n: int, sizes: list, seed: int) -> list:
    """n camera-shake kernels, array sizes round-robin over `sizes`, one seeded stream per kernel."""
    return [KernelEntry(camera_shake_kernels(1, sizes[j % len(sizes)], rng=_case_rng(seed, 1, j),
                                             extent=GENERATED_EXTENT)[0].astype(np.float64),
                        f"generated {sizes[j % len(sizes)]}px #{j}") for j in range(n)]


def kernel_pool(specs: list, sizes: list, n_images: int, seed: int, n_generated=None) -> list:
    """Files' kernels plus generated ones (default: enough for one kernel per image, at least one per
    size), shuffled by the seed."""
    files = file_kernels([s for s in specs if s != "generate"])
    if "generate" in specs:
        n = n_generated if n_generated is not None else max(len(sizes), n_images - len(files))
        files += generated_kernels(n, sizes, seed)
    if not files:
        raise ValueError("no kernels: give --kernels generate and/or kernel folders or files")
    order = _case_rng(seed, 2).permutation(len(files))
    return [files[i] for i in order]


def list_images(specs: list, seed: int) -> list:
    """Image files from `DIR`, `DIR:N` (N chosen by the seed) or single files; sorted within each folder."""
    out = []
    for t, spec in enumerate(specs):
        path, n = spec, None
        if ":" in spec and spec.rsplit(":", 1)[1].isdigit() and not Path(spec).exists():
            path, n = spec.rsplit(":", 1)[0], int(spec.rsplit(":", 1)[1])
        p = Path(path)
        if p.is_file():
            out.append(p)
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: image folder does not exist")
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                       and f.suffix.lower() in IMAGE_EXTS)
        if n is not None:
            if n > len(files):
                raise ValueError(f"{p}: asked for {n} images, the folder has {len(files)}")
            pick = _case_rng(seed, 3, t).choice(len(files), n, replace=False)
            files = [files[i] for i in sorted(pick)]
        out.extend(files)
    if not out:
        raise ValueError("no images found")
    return out


def _upscale(x: np.ndarray, need: int) -> np.ndarray:
    """Bicubic upscale so that the smaller side is at least `need` px (float image in [0, 1])."""
    h, w = x.shape[:2]
    f = need / min(h, w)
    size = (max(need, round(w * f)), max(need, round(h * f)))
    chans = [np.asarray(Image.fromarray(x[:, :, c].astype(np.float32), mode="F").resize(size, Image.BICUBIC))
             for c in range(3)]
    return np.clip(np.stack(chans, -1), 0, 1)


def _crop(x: np.ndarray, n: int, mode: str, rng: np.random.Generator) -> tuple:
    h, w = x.shape[:2]
    if mode == "center":
        r0, c0 = (h - n) // 2, (w - n) // 2
    else:
        r0, c0 = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
    return x[r0:r0 + n, c0:c0 + n], (r0, c0)


def synthesize(x_scene: np.ndarray, k: np.ndarray, sigma: float, size: int, boundary: str, crop: str,
               rng: np.random.Generator) -> tuple:
    """(y, x_true, note) for one case; y = k ⊛ x + n (circular) or the valid part of a larger blur."""
    s = k.shape[0]
    c = s // 2
    need = size if boundary == "circular" else size + s - 1
    note = ""
    if min(x_scene.shape[:2]) < need:
        x_scene = _upscale(x_scene, need)
        note = f"upscaled to {x_scene.shape[1]}x{x_scene.shape[0]}; "
    big, (r0, c0) = _crop(x_scene, need, crop, rng)
    note += f"crop rows {r0}:{r0 + need}, cols {c0}:{c0 + need}"
    # ground truth quantised to 8 bits first, so the stored PNG is exactly the x that was blurred
    big = np.round(np.asarray(big, np.float64) * 255.0) / 255.0
    xt = torch.from_numpy(np.ascontiguousarray(big.transpose(2, 0, 1)))
    blurred = conv_circular(xt, torch.from_numpy(k)).numpy().transpose(1, 2, 0)
    if boundary == "valid":  # rows c..c+size of the circular result never wrap (see the module docstring)
        blurred, big = blurred[c:c + size, c:c + size], big[c:c + size, c:c + size]
    y = blurred + rng.normal(0.0, sigma, blurred.shape)
    return y.astype(np.float32), big, note


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m diffusion_em.make_testset", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", nargs="+", required=True,
                   help="image folders or files; DIR:N takes N images of DIR chosen by the seed")
    p.add_argument("--kernels", nargs="+", default=["generate"],
                   help="'generate' and/or kernel folders/files (.npy, .png, Levin-style .mat)")
    p.add_argument("--kernel_sizes", default="9,13,17,21,25,29,33", help="sizes of generated kernels (odd, 9..63)")
    p.add_argument("--n_generated", type=int, default=None,
                   help="number of generated kernels (default: one per image not covered by kernel files)")
    p.add_argument("--sigmas", default="5,10,20", help="noise std in /255 units, assigned round-robin")
    p.add_argument("--size", type=int, default=256, help="side of the square cases")
    p.add_argument("--crop", choices=("center", "random"), default="random", help="crop position (random: seeded)")
    p.add_argument("--boundary", choices=BOUNDARIES, default="circular")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (created; existing cases are overwritten)")
    return p


def _int_list(s: str, what: str) -> list:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--{what}: expected comma-separated integers, got '{s}'") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sizes = _int_list(args.kernel_sizes, "kernel_sizes")
        sigmas = [float(v) for v in args.sigmas.split(",") if v.strip()]
        if any(s % 2 == 0 or not 9 <= s <= 63 for s in sizes):
            raise ValueError(f"--kernel_sizes: odd sizes 9..63 expected, got {sizes}")
        if not sigmas or any(not 0 <= v < 255 for v in sigmas):
            raise ValueError(f"--sigmas: values in [0, 255) (units of 1/255) expected, got {args.sigmas}")
        if args.size < 1:
            raise ValueError(f"--size {args.size}: must be >= 1")
        images = list_images(args.images, args.seed)
        pool = kernel_pool(args.kernels, sizes, len(images), args.seed, args.n_generated)
        kernels = [pool[i % len(pool)] for i in range(len(images))]  # the kernel of each case
        largest = max(k.k.shape[0] for k in kernels)
        if args.boundary == "circular" and args.size < largest:  # the circular model needs the kernel inside the image
            raise ValueError(f"--size {args.size}: smaller than the largest kernel ({largest} px) of a circular set")
        out = Path(args.out)
        blocked = file_in_the_way(out)
        if blocked is not None:
            raise ValueError(f"--out {out}: {blocked} is a file, not a folder")
        try:
            for sub in ("blurry", "sharp", "kernel"):
                (out / sub).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"--out {out}: cannot create it ({e.strerror or e})") from None
    except (ValueError, OSError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows, table, failed = [], [], 0
    # σ round-robin along the cases sorted by kernel size, so every size sees every σ (no confounding)
    by_size = sorted(range(len(images)), key=lambda i: (kernels[i].k.shape[0], i))
    sigma_of = {i: sigmas[r % len(sigmas)] for r, i in enumerate(by_size)}
    for i, path in enumerate(images):
        kern, s255 = kernels[i], sigma_of[i]
        name = f"{i:03d}_{path.stem}"
        try:
            x = read_image(path, clip=True)
            y, xt, note = synthesize(x, kern.k, s255 / 255.0, args.size, args.boundary, args.crop,
                                     _case_rng(args.seed, 4, i))
        except (ImageReadError, ValueError) as e:
            print(f"{path}: skipped: {e}", file=sys.stderr)
            failed += 1
            continue
        st = kernel_stats(kern.k)
        save_npy(out / "blurry" / f"{name}.npy", y)
        save_png(out / "sharp" / f"{name}.png", xt)
        save_npy(out / "kernel" / f"{name}.npy", kern.k.astype(np.float32))
        rows.append({"name": name, "sigma": repr(s255 / 255.0), "boundary": args.boundary,
                     "kernel_size": kern.k.shape[0], "kernel_extent": st["extent"],
                     "kernel_source": kern.source, "image_source": f"{path.name} ({note})"})
        table.append(f"| {name} | {path.name}: {note} | {kern.source} ({kern.k.shape[0]} px, extent "
                     f"{st['extent']}) | {s255:g}/255 |")
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["name", "sigma", "boundary"],
                       lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    save_text(out / "meta.csv", buf.getvalue())
    cmd = "python -m diffusion_em.make_testset " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    save_text(out / "README.md", f"# Test set ({args.boundary} boundary, {len(rows)} cases, {args.size}²)\n\n"
              f"Made by\n\n    {cmd}\n\nFormat: see `python -m diffusion_em.make_testset --help`.\n\n"
              "| name | image | kernel | σ |\n|---|---|---|---|\n" + "\n".join(table) + "\n")
    print(f"{len(rows)} cases written to {out}" + (f" ({failed} images skipped)" if failed else ""))
    return 0 if rows else 2


if __name__ == "__main__":
    sys.exit(main())

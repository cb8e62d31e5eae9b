#!/usr/bin/env python3
"""Build the bundled test set `testset/` (docs/algorithm.md §4 folder format) from ../shared/data.

Six 256×256 cases: three FFHQ faces and three BSDS500 *test* crops (seeded positions), blurred circularly
(docs/algorithm.md §2: true convolution, kernel centred at s//2) with 33×33 kernels — Levin et al. 2009 camera-shake
kernels zero-padded centred to 33×33, and random camera-shake kernels from
kernel_denoiser.kernels.camera_shake_kernels when that generator is importable (else Levin only) —
plus white Gaussian noise σ ∈ {5, 10, 20}/255. Written:
  blurry/<name>.npy  float32 H×W×3, unclipped (the exact observation, noise included)
  sharp/<name>.png   8-bit ground truth (exact: the sources are 8-bit)
  kernel/<name>.npy  float32 33×33, sum 1
  meta.csv           name,sigma,boundary   (σ in [0, 1] units; boundary circular)
  README.md          the case table and the command
Deterministic for a given --seed (and generator version). Usage:
  python bench/make_testset.py [--shared ../shared] [--out testset] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.fft import conv_circular  # noqa: E402
from util.geometry import pad_centred  # noqa: E402
from util.images import read_image, read_kernel  # noqa: E402
from util.outputs import save_npy, save_png, save_text  # noqa: E402

SIZE = 256
KSIZE = 33
FACES = ["00000", "00001", "00002"]  # not the paper_* faces: those are the authors' own samples
# (source kind, kernel kind, σ·255): each σ appears twice, each kernel kind three times when generated
PLAN = [("face", "levin", 5), ("face", "generated", 10), ("face", "levin", 20),
        ("bsds", "generated", 5), ("bsds", "levin", 10), ("bsds", "generated", 20)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="shared data folder (default ../shared)")
    ap.add_argument("--out", type=Path, default=REPO / "testset", help="output folder (default testset/)")
    ap.add_argument("--seed", type=int, default=0, help="seed of crops, kernel choice and noise (default 0)")
    args = ap.parse_args(argv)
    data = args.shared / "data"
    if not data.is_dir():
        print(f"error: {data} not found (pass --shared)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)

    try:  # the generator belongs to kernel_denoiser; the test set only needs it when present
        from kernel_denoiser.kernels import camera_shake_kernels
        generated = list(camera_shake_kernels(3, KSIZE, rng=np.random.default_rng(args.seed + 1)))
        gen_note = "kernel_denoiser.kernels.camera_shake_kernels(3, 33, rng=default_rng(seed + 1))"
    except Exception as e:  # noqa: BLE001 — any failure means: fall back to Levin kernels
        generated = []
        gen_note = f"generator unavailable ({type(e).__name__}): Levin kernels used instead"
        print(f"note: {gen_note}", file=sys.stderr)

    levin_ids = list(rng.permutation(np.arange(1, 9)))
    bsds = sorted((data / "bsds500" / "test").glob("*.jpg"))
    bsds_pick = [bsds[i] for i in rng.choice(len(bsds), 3, replace=False)]

    for sub in ("blurry", "sharp", "kernel"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    rows, table = ["name,sigma,boundary"], []
    faces, crops = iter(FACES), iter(bsds_pick)
    for src, kkind, s255 in PLAN:
        if src == "face":
            fid = next(faces)
            x = read_image(data / "ffhq" / f"{fid}.png", clip=True)
            name, origin = f"face_{fid}", f"ffhq/{fid}.png"
        else:
            f = next(crops)
            full = read_image(f, clip=True)
            r0 = int(rng.integers(0, full.shape[0] - SIZE + 1))
            c0 = int(rng.integers(0, full.shape[1] - SIZE + 1))
            x = full[r0:r0 + SIZE, c0:c0 + SIZE]
            name, origin = f"bsds_{f.stem}", f"bsds500/test/{f.name} crop rows {r0}:{r0 + SIZE}, cols {c0}:{c0 + SIZE}"
        if kkind == "generated" and generated:
            k = generated.pop(0).astype(np.float64)
            k /= k.sum()
            kdesc = "generated camera shake"
        else:
            lid = int(levin_ids.pop(0))
            k0 = read_kernel(data / "kernels" / "levin09" / f"levin_{lid}.npy")
            k = pad_centred(k0.astype(np.float64), KSIZE)
            k = k / k.sum()
            kdesc = f"Levin {lid} ({k0.shape[0]}×{k0.shape[1]} padded to 33×33)"
        sigma = s255 / 255.0
        xt = torch.from_numpy(x.astype(np.float64).transpose(2, 0, 1))
        blurred = conv_circular(xt, torch.from_numpy(k)).numpy().transpose(1, 2, 0)
        y = blurred + rng.normal(0.0, sigma, blurred.shape)
        save_npy(args.out / "blurry" / f"{name}.npy", y.astype(np.float32))
        save_png(args.out / "sharp" / f"{name}.png", x)
        save_npy(args.out / "kernel" / f"{name}.npy", k.astype(np.float32))
        rows.append(f"{name},{sigma!r},circular")
        table.append(f"| {name} | {origin} | {kdesc} | {s255}/255 |")
        print(f"{name}: {kdesc}, sigma {s255}/255")
    save_text(args.out / "meta.csv", "\n".join(rows) + "\n")
    readme = f"""# Bundled test set

Six 256×256 blind-deblurring cases in the folder format of docs/algorithm.md §4, the default input of the entry
scripts. Generated by `python bench/make_testset.py --seed {args.seed}` from `../shared/data`
(FFHQ faces, BSDS500 test images, Levin et al. 2009 kernels).

- `blurry/<name>.npy`: float32 256×256×3 observation `y = k ⊛ x + n`, circular true convolution with the
  kernel centred at (16, 16) (docs/algorithm.md §2), white Gaussian noise of std σ, **not clipped** (exact).
- `sharp/<name>.png`: the 8-bit ground truth `x`.
- `kernel/<name>.npy`: the 33×33 ground-truth kernel, sum 1.
- `meta.csv`: `name,sigma,boundary` with σ in [0, 1] units and `circular` (how the blur was made).

Generated kernels: {gen_note}.
The kernels are stored, so the set does not change if the generator does; rerunning the script with a
changed generator would produce different generated kernels.

| name | source | kernel | σ |
|---|---|---|---|
""" + "\n".join(table) + "\n"
    save_text(args.out / "README.md", readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())

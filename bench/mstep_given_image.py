"""The M-step alone on a real capture, given a finished image instead of the trajectory's x̂0.

Does the M-step find the kernel when its image is good? For each given image (the true sharp one, a restored
one) and each starting kernel (a Dirac, a kernel file), 60 M-step calls (J = 10, the bundled kernel denoiser,
taper padding filled with k ⊛ x as in Fast EM, σ = 2/255·√3 as the grayscale path runs it), printing the
aligned kernel MSE after 1, 10, 30 and 60 calls.

    python bench/mstep_given_image.py --capture im1_kernel2 --start RUN/kernels/im1_kernel2.npy \\
        --image pigdm=RUN/npy/im1_kernel2.npy --image hl=HL_RUN/images/im1_kernel2.png

The sharp image of the capture is always included. Output: bench/measured/mstep_given_image.txt.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.blur import BlurOperator  # noqa: E402
from diffusion_em.boundary import data_mask, fill_padding  # noqa: E402
from diffusion_em.mstep import MStepConfig, m_step  # noqa: E402
from kernel_denoiser.network import load_kernel_denoiser  # noqa: E402
from util.geometry import dirac, pad_for_boundary, recenter  # noqa: E402
from util.images import read_image, read_npy_array  # noqa: E402
from util.metrics import kernel_mse  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def grey(a) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return t.mean(-1) if t.dim() == 3 else t


def padded(x: torch.Tensor, s: int) -> tuple:
    return pad_for_boundary(x[None, None].expand(1, 3, -1, -1), s, "taper")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared/data/levin_real"))
    p.add_argument("--capture", required=True)
    p.add_argument("--start", help="a starting kernel (.npy) besides the Dirac")
    p.add_argument("--image", action="append", default=[], help="LABEL=PATH (.png or .npy), an image estimate")
    p.add_argument("--domain", default="pixel", choices=("pixel", "gradient"))
    p.add_argument("--calls", type=int, default=60)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    s, sigma = 33, 2 / 255 * 3 ** 0.5
    data = Path(args.data)
    kd = load_kernel_denoiser(str(REPO / "models/kernel_denoiser_33.pth"))
    k_true = np.load(data / "kernel" / f"{args.capture}.npy")
    yp, box = padded(grey(read_image(data / "blurry" / f"{args.capture}.png")), s)
    mask = data_mask(tuple(yp.shape[-2:]), box, yp.device, yp.dtype)
    images = {"sharp": read_image(data / "sharp" / f"{args.capture}.png")}
    for item in args.image:
        label, path = item.split("=", 1)
        images[label] = read_npy_array(path) if path.endswith(".npy") else read_image(path)
    starts = {"dirac": dirac(s)[0, 0]}
    if args.start:
        starts["file"] = torch.from_numpy(np.load(args.start)).float()
        print(f"{args.capture}: starting kernel file, kernel MSE {kernel_mse(starts['file'].numpy(), k_true)[0]:.2e}")
    cfg = MStepConfig(domain=args.domain)
    marks = sorted({m for m in (1, 10, 30, args.calls) if m <= args.calls})
    for label, img in images.items():
        xp, _ = padded(grey(img), s)
        for start, k0 in starts.items():
            k, out = k0.clone(), []
            for it in range(args.calls):
                y_fill = fill_padding(yp, mask, BlurOperator.from_kernel(k, tuple(yp.shape[-2:]), sigma).A(xp))
                k = recenter(m_step(y_fill, xp, k, sigma, cfg, kd))
                if it + 1 in marks:
                    out.append(f"{kernel_mse(k.numpy(), k_true)[0]:.2e}")
            print(f"{args.capture} {args.domain} image={label:6s} start={start:5s} kernel MSE after {'/'.join(map(str, marks))} "
                  f"calls: {' '.join(out)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline screen of `classical_anchor` on a finished run: aligned PSNR of the run's diffusion image, the
hyper-Laplacian solve with the run's kernel (H), the anchored solve A (the diffusion image fitted to the data,
`restore.anchored_deconvolution`), and the blends (1 − w)·D + w·H (the default before `classical_anchor`) and
(1 − w)·A + w·H for a grid of w.

    python bench/classical_anchor.py --set SET --run RUN [--weights 0.25,0.5,0.75]

Circular test sets only (there the run's frame is the image, so the solves here are the runner's, up to the
8-bit PNG the diffusion image was saved as). Prints one line per case and the means with, for each column, the
difference to the D/H blend at w = 0.5 and the number of cases where it is higher.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.restore import anchored_deconvolution, classical_deconvolution  # noqa: E402
from diffusion_em.results import diffusion_image_file  # noqa: E402
from util.images import image_to_tensor, read_image, tensor_to_image  # noqa: E402
from util.inputs import list_inputs, load_sample  # noqa: E402
from util.metrics import aligned_scores  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="circular test-set folder with sharp/ and kernel/")
    p.add_argument("--run", required=True, help="a Fast EM result folder on that set (images/, kernels/*.npy)")
    p.add_argument("--weights", default="0.25,0.5,0.75", help="comma-separated w of the blends")
    args = p.parse_args(argv)
    ws = [float(w) for w in args.weights.split(",")]
    run = Path(args.run)
    names = ["D", "H", "A"] + [f"D/H_{w:g}" for w in ws] + [f"A/H_{w:g}" for w in ws]
    rows, samples = [], list_inputs(args.set)
    for sample in samples:
        if sample.boundary != "circular":
            raise SystemExit(f"{sample.name}: not a circular case (the run's padded frame is not saved)")
    print("case sigma255 " + " ".join(names))
    for sample in samples:
        s = load_sample(sample)
        f = diffusion_image_file(run, sample.name)
        if f is None or s.x_true is None:
            continue
        to_t = lambda a: image_to_tensor(np.clip(a, 0, 1), dtype=torch.float64)  # noqa: E731
        y, d = to_t(s.y), to_t(read_image(f))
        k = torch.from_numpy(np.load(run / "kernels" / f"{sample.name}.npy")).double()
        h = classical_deconvolution(y, k, s.sigma)
        a = anchored_deconvolution(y, k, s.sigma, d)
        images = [d, h, a] + [(1 - w) * d + w * h for w in ws] + [(1 - w) * a + w * h for w in ws]
        ks = int(max(s.k_true.shape))
        rows.append([aligned_scores(tensor_to_image(x[0]), s.x_true, ks)["psnr_aligned"] for x in images])
        print(f"{sample.name} {s.sigma * 255:.0f} " + " ".join(f"{v:.2f}" for v in rows[-1]), flush=True)
    if not rows:
        raise SystemExit("no case of the set has a diffusion image in the run")
    r = np.asarray(rows)
    ref = r[:, names.index("D/H_0.5")] if 0.5 in ws else r[:, 0]
    print(f"mean ({len(r)} cases) " + " ".join(f"{n}={m:.2f}({m - ref.mean():+.2f},{int((c > ref).sum())})"
                                             for n, m, c in zip(names, r.mean(0), r.T)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

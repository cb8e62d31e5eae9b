"""A copy of a test-set folder whose kernel/ holds the kernels a run estimated (its kernels/*.npy).

Running the non-blind sampler on the copy (`test_FastDiffEM.py --true_kernel`) restores each image with the
estimated kernel held fixed: the image-formation half of a blind method, on its own kernels. Used to measure
`final_pass` before it existed (docs/choices.md "A second run with the found kernel"); the scores' kernel MSE is then
against the estimate, so read the image columns only.

    python bench/set_with_kernels.py --set SET --run RESULTS --out COPY
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", required=True, help="test-set folder (blurry/ sharp/ kernel/ meta.csv)")
    p.add_argument("--run", required=True, help="a run's --save_dir (kernels/NAME.npy)")
    p.add_argument("--out", required=True, help="the copy to write (must not exist)")
    a = p.parse_args(argv)
    src, run, out = Path(a.set), Path(a.run), Path(a.out)
    if out.exists():
        raise SystemExit(f"{out}: exists; choose a new folder")
    names = sorted(f.stem for f in (src / "kernel").glob("*.npy"))
    missing = [n for n in names if not (run / "kernels" / f"{n}.npy").exists()]
    if missing:
        raise SystemExit(f"{run}/kernels: no kernel for {', '.join(missing)}")
    for sub in ("blurry", "sharp"):
        shutil.copytree(src / sub, out / sub)
    shutil.copy(src / "meta.csv", out / "meta.csv")
    (out / "kernel").mkdir()
    for n in names:
        np.save(out / "kernel" / f"{n}.npy", np.load(run / "kernels" / f"{n}.npy"))
    print(f"{len(names)} cases -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

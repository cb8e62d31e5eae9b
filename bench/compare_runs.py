#!/usr/bin/env python3
"""Two runs of the same test set, case by case: is B different from A? (e.g. `precision: bf16` against fp32).

    python bench/compare_runs.py --a RUN_A --b RUN_B [--columns psnr_aligned,ssim_aligned,kernel_mse,seconds]

Reads each folder's `metrics.csv` (the runner's; a sharded run's merged file), keeps the cases both finished with
status `ok`, and prints per column: the means of A and B, the mean of B − A with its standard error (the
spread of the paired differences / √n), the cases where B is higher, and the largest |B − A|; then the same
for aligned PSNR per σ, and how many cases each run left below their blurry input (aligned). A change that
only perturbs a diffusion trajectory (thread count, precision, seed) gives differences of either sign whose
mean shrinks as 1/√n; the standard error says how far the mean can be trusted.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusion_em.evaluate import read_run_metrics  # noqa: E402


def read_rows(run: Path) -> dict:
    """{case name: row} of a run's metrics.csv, the rows with status ok."""
    if not (run / "metrics.csv").exists():
        raise SystemExit(f"error: {run / 'metrics.csv'}: no metrics.csv (a sharded run writes it when every rank "
                         f"has finished)")
    return {n: r for n, r in read_run_metrics(run).items() if r.get("status") == "ok"}


def paired(a: list, b: list) -> dict:
    """Mean of A, of B, of B − A, its standard error, the count with B > A and the largest |B − A|."""
    d = [y - x for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1) / n) if n > 1 else float("nan")
    return {"n": n, "a": sum(a) / n, "b": sum(b) / n, "diff": mean, "se": se,
            "b_higher": sum(v > 0 for v in d), "max_abs": max(abs(v) for v in d)}


def _num(row: dict, col: str):
    """The column's value, or None where it is empty (e.g. no ground truth) or missing."""
    try:
        return float(row.get(col))
    except (TypeError, ValueError):
        return None


def compare(run_a: Path, run_b: Path, columns: list) -> list:
    """The printed lines (see the module docstring)."""
    ra, rb = read_rows(run_a), read_rows(run_b)
    names = sorted(set(ra) & set(rb))
    if not names:
        raise SystemExit(f"error: {run_a} and {run_b} have no finished case in common")
    lines = [f"A = {run_a}", f"B = {run_b}", f"cases finished ok by both: {len(names)} "
             f"(A only: {len(set(ra) - set(rb))}, B only: {len(set(rb) - set(ra))})"]
    fmt = {"kernel_mse": ".3e"}
    for col in columns:
        pairs = [(_num(ra[n], col), _num(rb[n], col)) for n in names]
        pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
        if not pairs:
            lines.append(f"{col}: no values")
            continue
        s = paired([p[0] for p in pairs], [p[1] for p in pairs])
        f = fmt.get(col, ".3f")
        lines.append(f"{col} (n={s['n']}): A {s['a']:{f}}  B {s['b']:{f}}  B-A {s['diff']:+{f}} (s.e. {s['se']:{f}}), "
                     f"B higher on {s['b_higher']} of {s['n']}, largest |B-A| {s['max_abs']:{f}}")
    scored = [n for n in names if _num(ra[n], "psnr_aligned") is not None and _num(rb[n], "psnr_aligned") is not None]
    for sg in sorted({_num(ra[n], "sigma") for n in scored} - {None}):
        sel = [n for n in scored if _num(ra[n], "sigma") == sg]
        s = paired([_num(ra[n], "psnr_aligned") for n in sel], [_num(rb[n], "psnr_aligned") for n in sel])
        lines.append(f"  sigma {sg * 255:.0f}/255 (n={s['n']}): psnr_aligned A {s['a']:.2f}  B {s['b']:.2f}  "
                     f"B-A {s['diff']:+.2f} (s.e. {s['se']:.2f})")
    for tag, rows in (("A", ra), ("B", rb)):
        below = [n for n in scored if _num(rows[n], "psnr_aligned") < (_num(rows[n], "psnr_blurry_aligned") or -1e9)]
        listed = ": " + ", ".join(below) if below else ""
        lines.append(f"{tag}: {len(below)} case(s) below their blurry input (aligned){listed}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", type=Path, required=True, help="the reference run folder")
    ap.add_argument("--b", type=Path, required=True, help="the run compared with it")
    ap.add_argument("--columns", default="psnr_aligned,ssim_aligned,psnr,kernel_mse,seconds")
    args = ap.parse_args(argv)
    print("\n".join(compare(args.a, args.b, [c for c in args.columns.split(",") if c])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

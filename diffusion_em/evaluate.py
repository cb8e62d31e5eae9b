"""Score any method's restored images (and kernels) against a test-set folder.

    python -m diffusion_em.evaluate --testset T --results R [--oracle R2] [--out DIR]

R holds the outputs of any method, named like the test set's cases: `R/images/<name>.png` (or
`R/<name>.png`, `R/npy/<name>.npy`), optionally `R/kernels/<name>.npy`, optionally a `metrics.csv` whose
`seconds` and `nfe` columns are carried over. R2 is the same method run with the true kernel (its
non-blind oracle), for Levin's error ratio. Writes `eval.csv` (one row per case) and `eval.json` (means
overall, per σ and per kernel size, success rates at error ratio ≤ 2 and ≤ 3) into --out (default R).

Per case (util.metrics, docs/algorithm.md): PSNR/SSIM plain and shift-aligned for the result, the blurry input and
the oracle; kernel MSE (aligned, raw) when a kernel was estimated; re-blur error (circular model) with the
estimated kernel, else with the true one; error ratio; LPIPS only when available (`util.metrics.lpips_available`).
`score_case` scores through util.metrics.evaluate, the function the runner (`diffusion_em.run`) uses for its
metrics.csv, so a method scored here and our runs mean the same numbers.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from diffusion_em.results import has_flag
from util.images import ImageReadError, read_image, read_kernel
from util.inputs import LoadedSample, list_inputs, load_sample, resolve_sigma
from util.outputs import file_in_the_way, save_json, save_text
from util.metrics import aligned_scores, blurry_scores, evaluate, lpips_available, reblur_error, success_rates

DEFAULT_ALIGN_KERNEL = 31  # alignment search when no kernel is known at all: border 15, shifts ±15
EVAL_FIELDS = ("name", "status", "message", "sigma", "boundary", "kernel_size", "psnr", "ssim", "psnr_aligned",
               "ssim_aligned", "shift_y", "shift_x", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error",
               "psnr_blurry", "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned",
               "psnr_oracle_aligned", "error_ratio", "seconds", "nfe", "flag")
MEAN_FIELDS = ("psnr", "ssim", "psnr_aligned", "ssim_aligned", "lpips", "kernel_mse", "reblur_error", "psnr_blurry",
               "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned", "psnr_oracle_aligned", "error_ratio",
               "seconds", "nfe")
SIZE_BINS = ((0, 13, "≤13 px"), (14, 21, "15–21 px"), (22, 33, "23–33 px"), (34, 10 ** 6, ">33 px"))


SIGMA_UNDECLARED = "not declared"  # σ group of cases without a meta.csv σ (real captures: each method estimates it)


def sigma_group(sigma) -> str:
    """σ group used by the summaries and tables: the declared σ in /255, or SIGMA_UNDECLARED."""
    if sigma in (None, "", "None"):
        return SIGMA_UNDECLARED
    return f"{round(float(sigma) * 255):g}/255"


def sigma_order(group: str) -> float:
    return math.inf if group == SIGMA_UNDECLARED else float(group.split("/")[0])


def size_bin(kernel_size) -> Optional[str]:
    """Kernel-size group used by the tables (array size of the true kernel)."""
    if kernel_size in (None, ""):
        return None
    s = int(kernel_size)
    return next(label for lo, hi, label in SIZE_BINS if lo <= s <= hi)


_BLURRY_CACHE: dict = {}


def _blurry(sample: LoadedSample, ks: int) -> dict:
    """The blurry input's scores, computed once per observation (every method of a table shares them)."""
    key = (sample.name, ks, hashlib.sha1(np.ascontiguousarray(sample.y).tobytes()).hexdigest())
    if key not in _BLURRY_CACHE:
        _BLURRY_CACHE[key] = blurry_scores(np.clip(sample.y, 0, 1), sample.x_true, ks)
    return _BLURRY_CACHE[key]


def score_case(x_est: np.ndarray, sample: LoadedSample, k_est: Optional[np.ndarray], sigma: float,
               x_oracle: Optional[np.ndarray] = None) -> dict:
    """All metrics of one restored image x_est (H×W×3 in [0, 1]) against its loaded test case: the runner's
    util.metrics.evaluate, plus the oracle's aligned PSNR and the error ratio when an oracle result is given."""
    k_ref = sample.k_true if sample.k_true is not None else k_est
    ks = max(k_ref.shape) if k_ref is not None else DEFAULT_ALIGN_KERNEL
    row = evaluate(x_est, sample.y, k_est, sigma, sample.x_true, sample.k_true, align_kernel_size=ks,
                   with_blurry=False)
    if sample.x_true is not None:
        row.update(_blurry(sample, ks))
    if k_est is None and sample.k_true is not None:  # a method without a kernel: re-blur with the true one
        row["reblur_error"] = reblur_error(sample.k_true, x_est, sample.y, sigma)
    if sample.x_true is not None and x_oracle is not None:
        est = aligned_scores(x_est, sample.x_true, ks)
        orc = aligned_scores(x_oracle, sample.x_true, ks)
        row["psnr_oracle_aligned"] = orc["psnr_aligned"]
        num, den = est["sse_aligned"], orc["sse_aligned"]
        row["error_ratio"] = (1.0 if num == 0 else math.inf) if den == 0 else num / den
    return row


# --------------------------------------------------------------------------------------------- folders
def find_result(results: Path, name: str) -> Optional[Path]:
    for p in (results / "images" / f"{name}.png", results / f"{name}.png", results / "npy" / f"{name}.npy"):
        if p.is_file():
            return p
    return None


def find_kernel(results: Path, name: str) -> Optional[Path]:
    for p in (results / "kernels" / f"{name}.npy", results / "kernel" / f"{name}.npy"):
        if p.is_file():
            return p
    return None


def _rows_by_name(p: Path) -> dict:
    """{name: last row} of a CSV with a `name` column; {} when the file is absent."""
    if not p.is_file():
        return {}
    with open(p, newline="", encoding="utf-8") as f:  # util/csvlog.py writes UTF-8
        return {r["name"]: r for r in csv.DictReader(f)}


def read_run_metrics(results: Path) -> dict:
    """{name: last row} of a results folder's metrics.csv (the runner's and the baselines' log), if any."""
    return _rows_by_name(results / "metrics.csv")


def _meta_columns(testset: Path) -> dict:
    return _rows_by_name(testset / "meta.csv")


def evaluate_folder(testset, results, oracle=None) -> list:
    """One row (EVAL_FIELDS) per test case; cases without a result get status 'missing'."""
    testset, results = Path(testset), Path(results)
    meta = _meta_columns(testset)
    runlog = read_run_metrics(results)
    rows = []
    for s in list_inputs(testset, notice=lambda m: print(f"note: {m}", file=sys.stderr)):
        m = meta.get(s.name, {})
        row = {"name": s.name, "sigma": s.sigma, "boundary": s.boundary,
               "kernel_size": m.get("kernel_size") or None}
        run = runlog.get(s.name, {})
        for k in ("seconds", "nfe"):
            row[k] = run.get(k) or None
        row["flag"] = run.get("flag") or ""  # e.g. classical_fallback: the image is not the method's own
        path = find_result(results, s.name)
        if path is None:
            msg = run.get("message") or "no result file"
            rows.append({**row, "status": "failed" if run.get("status") == "failed" else "missing", "message": msg})
            continue
        try:
            run_sigma = run.get("sigma") or None  # the σ the run used (--sigma may have replaced a pickle's)
            loaded = load_sample(s, sigma_given=run_sigma is not None)
            if row["kernel_size"] is None and loaded.k_true is not None:
                row["kernel_size"] = max(loaded.k_true.shape)
            sigma = float(run_sigma) if run_sigma is not None else resolve_sigma(loaded)[0]
            x = read_image(path, clip=True)
            if x.shape != loaded.y.shape:
                raise ImageReadError(f"{path}: result is {x.shape[:2]} but the observation is {loaded.y.shape[:2]}")
            kp = find_kernel(results, s.name)
            k = read_kernel(kp) if kp is not None else None
            if k is not None and (k.shape[0] > x.shape[0] or k.shape[1] > x.shape[1]):  # else util.fft's message names no file
                raise ImageReadError(f"{kp}: kernel {k.shape[0]}x{k.shape[1]} is larger than the image "
                                     f"{x.shape[0]}x{x.shape[1]}")
            xo = None
            if oracle is not None:
                op = find_result(Path(oracle), s.name)
                xo = read_image(op, clip=True) if op is not None else None
            row.update(score_case(x, loaded, k, sigma, xo), status="ok", message=run.get("message") or "")
        except (ImageReadError, ValueError, OSError) as e:
            row.update(status="failed", message=" ".join(str(e).split()))
            print(f"{s.name}: {row['message']}", file=sys.stderr)
        rows.append(row)
    return rows


def finite_mean(rows, key):
    """Mean of a column over rows, skipping missing and non-finite values (None when nothing is left)."""
    v = [float(r[key]) for r in rows if r.get(key) not in (None, "", "None")]
    v = [x for x in v if math.isfinite(x)]
    return float(np.mean(v)) if v else None


def summarise(rows: list) -> dict:
    """Means of MEAN_FIELDS over ok rows: overall, per σ (in /255) and per kernel-size bin; success rates."""
    ok = [r for r in rows if r.get("status") == "ok"]

    def block(rs):
        out = {k: finite_mean(rs, k) for k in MEAN_FIELDS}
        out["n"] = len(rs)
        ratios = [float(r["error_ratio"]) for r in rs if r.get("error_ratio") not in (None, "")]
        if ratios:
            out.update(success_rates(ratios))
        return out
    by_sigma, by_size = {}, {}
    for r in ok:
        by_sigma.setdefault(sigma_group(r.get("sigma")), []).append(r)
        by_size.setdefault(size_bin(r.get("kernel_size")) or "unknown", []).append(r)
    lp_ok, lp_reason = lpips_available()
    return {"cases": len(rows), "ok": len(ok), "missing": sum(r.get("status") == "missing" for r in rows),
            "failed": sum(r.get("status") == "failed" for r in rows),
            "classical_fallback": sum(has_flag(r, "classical_fallback") for r in ok),
            "all": block(ok),
            "by_sigma": {k: block(v) for k, v in sorted(by_sigma.items(), key=lambda kv: sigma_order(kv[0]))},
            "by_kernel_size": {lab: block(by_size[lab]) for _, _, lab in SIZE_BINS if lab in by_size},
            "lpips": "computed" if lp_ok else lp_reason}


def write_outputs(rows: list, out: Path, extra: Optional[dict] = None) -> dict:
    """eval.csv (EVAL_FIELDS, one row per case) and eval.json (summarise + extra) into `out`."""
    import io as _io
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EVAL_FIELDS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    w.writerows({k: ("" if r.get(k) is None else r.get(k)) for k in EVAL_FIELDS} for r in rows)
    save_text(Path(out) / "eval.csv", buf.getvalue())
    summary = {**summarise(rows), **(extra or {})}
    save_json(Path(out) / "eval.json", summary)
    return summary


def check_folders(results, oracle, out: Path) -> None:
    """Refuse before scoring: a --results or --oracle folder that is not there (a typo would score as all
    'missing'), an --out that is, or lies under, a file (one-line errors naming the flag)."""
    for flag, d in (("--results", results), ("--oracle", oracle)):
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{flag} {d}: " + ("not a folder" if Path(d).exists() else "folder does not exist"))
    blocked = file_in_the_way(out)
    if blocked is not None:
        raise NotADirectoryError(f"--out {out}: {blocked} is a file, not a folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffusion_em.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--testset", required=True, help="test-set folder (blurry/ sharp/ kernel/ meta.csv)")
    p.add_argument("--results", required=True, help="folder of restored images named like the test set")
    p.add_argument("--oracle", default=None, help="results of the same solver with the true kernel (error ratio)")
    p.add_argument("--out", default=None, help="where eval.csv and eval.json go (default: --results)")
    args = p.parse_args(argv)
    out = Path(args.out or args.results)
    try:
        check_folders(args.results, args.oracle, out)
        rows = evaluate_folder(args.testset, args.results, args.oracle)
        s = write_outputs(rows, out, {"testset": str(args.testset), "results": str(args.results), "oracle": args.oracle})
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    a = s["all"]
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{s['ok']}/{s['cases']} scored ({s['missing']} missing, {s['failed']} failed): PSNR "
          f"{fmt(a['psnr'], '.2f')} / aligned {fmt(a['psnr_aligned'], '.2f')} dB (blurry {fmt(a['psnr_blurry'], '.2f')} / "
          f"{fmt(a['psnr_blurry_aligned'], '.2f')}), SSIM aligned {fmt(a['ssim_aligned'], '.3f')}, kernel MSE "
          f"{fmt(a['kernel_mse'], '.2e')}, error ratio {fmt(a['error_ratio'], '.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

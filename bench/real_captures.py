"""Real camera-shake captures (Levin et al. 2009, ../shared/data/levin_real): noise level and the protocol table.

    python bench/real_captures.py noise [--data DIR]
        per capture: the old σ estimate (plain wavelet MAD), σ_pix (grouped median), the σ the runner uses
        (util/noise.py rule) and the misfit of the best-fitting true blur (RMS on the interior, best integer
        shift within ±6 px, symmetric borders) -> bench/measured/real_captures_noise.csv
    python bench/real_captures.py table --blind RUN --oracle RUN [--data DIR] [--out docs/real_captures.md]
        RUN = save_dir(s) of test_FastDiffEM.py (metrics.csv, images/) on DATA, blind and with --true_kernel.
        Per capture: kernel MSE, aligned PSNR of the result and of the blurry input, Levin's error ratio
        (aligned SSE over that of the same program with the true kernel), success at ratio ≤ 2 and ≤ 3, and
        the flag column; failed rows count as failures. Writes the markdown table (with its command) between
        the begin/end markers of --out, keeping the text around them.
Prints what it measured.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from util.fft import conv_circular  # noqa: E402
from util.images import read_image, read_kernel  # noqa: E402
from util.metrics import aligned_scores, error_ratio, success_rates  # noqa: E402
from util.noise import estimate_noise_sigma, pixel_sigma  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "levin_real"


def _names(data: Path) -> list:
    return sorted(p.stem for p in (data / "blurry").glob("*.png"))


def _load(data: Path, name: str):
    y = read_image(data / "blurry" / f"{name}.png")[..., :1].astype(np.float64)
    x = read_image(data / "sharp" / f"{name}.png")[..., :1].astype(np.float64)
    return y, x, read_kernel(data / "kernel" / f"{name}.npy").astype(np.float64)


def misfit(y: np.ndarray, x: np.ndarray, k: np.ndarray, max_shift: int = 6, border: int = 20) -> float:
    """RMS of y − shift(k ⊛ x) on the interior (x extended symmetrically), best integer shift."""
    p = k.shape[0] + max_shift
    xt = torch.from_numpy(np.pad(x[..., 0], p, mode="symmetric"))[None, None]
    b = conv_circular(xt, torch.from_numpy(k))[0, 0].numpy()
    H, W = y.shape[:2]
    yc = y[border:H - border, border:W - border, 0]
    best = np.inf
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            bc = b[p + border - dy:p + H - border - dy, p + border - dx:p + W - border - dx]
            best = min(best, float(np.sqrt(((bc - yc) ** 2).mean())))
    return best


def cmd_noise(a) -> None:
    rows = []
    for n in _names(a.data):
        y, x, k = _load(a.data, n)
        rows.append({"name": n, "sigma_plain_mad": pixel_sigma(y, q=0.0) * 255, "sigma_pix": pixel_sigma(y) * 255,
                     "sigma_rule": estimate_noise_sigma(y) * 255, "misfit_true_blur": misfit(y, x, k) * 255})
        print(" ".join(f"{k_}={v:.2f}" if isinstance(v, float) else str(v) for k_, v in rows[-1].items()), flush=True)
    out = ROOT / "bench" / "measured" / "real_captures_noise.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k_: (f"{v:.3f}" if isinstance(v, float) else v) for k_, v in r.items()} for r in rows)
    m = {k_: np.mean([r[k_] for r in rows]) for k_ in rows[0] if k_ != "name"}
    print("means (/255): " + ", ".join(f"{k_} {v:.2f}" for k_, v in m.items()), f"-> {out}")


def _rows(runs: list) -> dict:
    """name -> metrics row (with its folder under '_run'); a later folder's row for a name wins (a rerun)."""
    out = {}
    for run in runs:
        with open(run / "metrics.csv", newline="") as f:
            out.update({r["name"]: {**r, "_run": run} for r in csv.DictReader(f)})
    return out


def _img(row: dict, name: str):
    p = row["_run"] / "images" / f"{name}.png" if row else None
    return read_image(p)[..., :1].astype(np.float64) if p is not None and p.exists() else None


def cmd_table(a) -> None:
    blind, oracle = _rows(a.blind), _rows(a.oracle)
    names = [n for n in _names(a.data) if n in blind]
    lines, ratios, gains = [], [], []
    for n in names:
        y, x, k = _load(a.data, n)
        ks = max(k.shape)
        yb = aligned_scores(y, x, ks)["psnr_aligned"]
        rb, ro = blind[n], oracle.get(n, {})
        xb, xo = _img(rb, n), _img(ro, n)
        ok = rb.get("status") == "ok" and xb is not None
        pb = aligned_scores(xb, x, ks)["psnr_aligned"] if ok else None
        po = aligned_scores(xo, x, ks)["psnr_aligned"] if xo is not None and ro.get("status") == "ok" else None
        ratio = error_ratio(xb, xo, x, ks) if ok and po is not None else (float("inf") if not ok else None)
        if ratio is not None:
            ratios.append(ratio)
        if pb is not None:
            gains.append(pb - yb)
        f = lambda v, s: "–" if v is None else format(v, s)  # noqa: E731
        lines.append(f"| {n} | {ks} | {f(float(rb['kernel_mse']) if ok else None, '.2e')} | {f(yb, '.2f')} | "
                     f"{f(pb, '.2f')} | {f(po, '.2f')} | {f(ratio, '.2f')} | {rb.get('flag', '') or ''} "
                     f"{'' if ok else 'FAILED: ' + rb.get('message', '')[:60]} |")
        print(lines[-1], flush=True)
    sr = success_rates(ratios)
    summary = (f"{len(names)} captures, {sum(blind[n].get('status') == 'ok' for n in names)} restored; "
               f"mean aligned PSNR gain over the blurry input {np.mean(gains):+.2f} dB (restored only); "
               f"error ratio ≤ 2: {sum(r <= 2 for r in ratios)}/{len(ratios)} ({sr['success_le2']:.0%}), "
               f"≤ 3: {sum(r <= 3 for r in ratios)}/{len(ratios)} ({sr['success_le3']:.0%})")
    print(summary)
    if a.out:
        head = ("| capture | kernel px | kernel MSE | blurry aligned PSNR | blind aligned PSNR | true-kernel aligned PSNR "
                "| error ratio | flag |\n|---|---|---|---|---|---|---|---|\n")
        cmd = f"python bench/real_captures.py table --blind {' '.join(map(str, a.blind))} --oracle {' '.join(map(str, a.oracle))}"
        block = (f"Command: `{cmd}`\n\n"
                 + head + "\n".join(lines) + f"\n\n{summary}\n")
        _write_block(Path(a.out), block)
        print(f"-> {a.out}")


BEGIN, END = "<!-- real_captures table: begin -->", "<!-- real_captures table: end -->"


def _write_block(path: Path, block: str) -> None:
    """Replace the text between BEGIN and END in `path` (kept hand-written text around it), else write it."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + BEGIN + "\n" + block + END + rest.split(END, 1)[1]
    else:
        text = BEGIN + "\n" + block + END + "\n"
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pn = sub.add_parser("noise")
    pn.add_argument("--data", type=Path, default=DATA)
    pt = sub.add_parser("table")
    pt.add_argument("--data", type=Path, default=DATA)
    pt.add_argument("--blind", type=Path, nargs="+", required=True, help="run folder(s); a later one's row wins")
    pt.add_argument("--oracle", type=Path, nargs="+", required=True)
    pt.add_argument("--out", default=None, help="markdown file for the table block")
    a = p.parse_args(argv)
    if not (a.data / "blurry").is_dir():
        print(f"error: {a.data}: no blurry/ folder (the real captures live in ../shared/data/levin_real)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    {"noise": cmd_noise, "table": cmd_table}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

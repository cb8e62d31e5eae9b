#!/usr/bin/env python3
"""Run methods × test sets, score them with diffusion_em.evaluate, write docs/benchmarks.md and a
PSNR-vs-seconds plot. One command regenerates everything; finished images are never recomputed.

    python bench/table.py --testset /work/evalsets/synth24 /work/evalsets/synth24_valid \\
        --methods blurry,tikhonov_oracle,tikhonov,hyper_laplacian,l0_blind,fastem,fastem_oracle \\
        --results_root results/bench [--max_images N] [--no_run] [--out docs/benchmarks.md]

Results go to <results_root>/<set>/<method>/ (the runner's / baselines' layout, so any folder produced
by hand with the same command is reused). `--no_run` only scores what exists. Every table is computed on
the cases that *all* listed methods finished for that set (n is printed), so rows compare like with like;
methods with fewer finished cases shrink that common set — the per-method counts are listed.
Error ratio (Levin et al. 2009): aligned SSE of a blind method over that of its own non-blind oracle
(METHODS[m].oracle) on the same case. The plot needs matplotlib (optional; skipped with a note otherwise).
A set that declares no σ and no boundary (real captures such as ../shared/data/levin_real: blurry/ sharp/ kernel/,
no meta.csv) runs with `auto` = the non-periodic taper, gets no per-σ table, and gets a per-case table (also
`--per_case SET`) in which a case a method failed shows as FAILED; success rates are also given over every case a
blind method attempted, a failure counted as ratio ∞. The hand-written analysis between the ANALYSIS markers of
the previous --out file is kept.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from diffusion_em.evaluate import (SIGMA_UNDECLARED, SIZE_BINS, evaluate_folder, finite_mean, sigma_group,  # noqa: E402
                                   sigma_order, size_bin, write_outputs)
from diffusion_em.results import has_flag  # noqa: E402


@dataclass(frozen=True)
class Method:
    label: str
    argv: tuple              # command after `python`, without input/output folders
    style: str               # 'runner' (--input_dir/--save_dir/--threads) or 'baseline' (same flags)
    oracle: Optional[str] = None  # method whose results are this one's non-blind oracle (error ratio)
    blind: bool = False


FAST = ("test_FastDiffEM.py",)
PAPER = FAST + ("--diffusion_config", "configs/diffusion_config_fastem_pigdm_paper.yaml")
NOBLEND = ("--classical_blend", "0")
METHODS = {
    "blurry": Method("blurry input", ("-m", "diffusion_em.baselines", "--method", "blurry"), "baseline"),
    "tikhonov_oracle": Method("Tikhonov, true k, oracle λ", ("-m", "diffusion_em.baselines", "--method", "tikhonov_oracle"), "baseline"),
    "tikhonov": Method("Tikhonov, true k, λ = Cσ²", ("-m", "diffusion_em.baselines", "--method", "tikhonov"), "baseline"),
    "hyper_laplacian": Method("hyper-Laplacian (K&F 2009), true k", ("-m", "diffusion_em.baselines", "--method", "hyper_laplacian"), "baseline"),
    "l0_blind": Method("ℓ0 blind (Pan 2014 / Xu 2013) + hyper-Laplacian", ("-m", "diffusion_em.baselines", "--method", "l0_blind"),
                       "baseline", oracle="hyper_laplacian", blind=True),
    "fastem": Method("Fast EM ΠGDM, paper config, n = 1", PAPER, "runner", oracle="fastem_oracle", blind=True),
    "fastem_oracle": Method("ΠGDM oracle (true k, --true_kernel), n = 1", PAPER + ("--true_kernel",), "runner"),
    "fastem_mean4": Method("Fast EM ΠGDM, mean of 4 independent particles", PAPER + ("--n_particles", "4"), "runner",
                           oracle="fastem_oracle", blind=True),
    "fastem_default": Method("Fast EM ΠGDM, default config (kernel: auto = ℓ0 kernel on non-periodic input, l0_box on circular; 4 branched particles, mean; classical_anchor blind; classical_blend 0.5)",
                             FAST, "runner", oracle="fastem_default_oracle", blind=True),
    "fastem_default_plainblend": Method("Fast EM ΠGDM, default config with classical_anchor none (the default before 2026-11-28 evening)",
                                        FAST + ("--classical_anchor", "none"), "runner", oracle="fastem_default_oracle", blind=True),
    "fastem_default_noblend": Method("Fast EM ΠGDM, default config, diffusion image alone (--classical_blend 0; the default before 2026-11-28)",
                                     FAST + NOBLEND, "runner", oracle="fastem_default_oracle_noblend", blind=True),
    "fastem_default_em": Method("Fast EM ΠGDM, default config with kernel: em (M-step from a Dirac, no box; the default before 2026-11-27 evening), diffusion image alone",
                                FAST + ("--kernel", "em") + NOBLEND, "runner", oracle="fastem_default_oracle_noblend", blind=True),
    "fastem_final_pass": Method("Fast EM ΠGDM, default config + final_pass (a second run with the found kernel fixed; about 2x the time; classical_anchor blind; classical_blend 0.5)",
                                FAST + ("--final_pass",), "runner", oracle="fastem_default_oracle", blind=True),
    "fastem_final_pass_noblend": Method("Fast EM ΠGDM, default config + final_pass, diffusion image alone (--classical_blend 0)",
                                        FAST + ("--final_pass",) + NOBLEND, "runner", oracle="fastem_default_oracle_noblend", blind=True),
    "fastem_default_oracle": Method("Fast EM default config, true k (--true_kernel; 4 branched particles, mean; classical_blend 0.5)",
                                    FAST + ("--true_kernel",), "runner"),
    "fastem_default_oracle_noblend": Method("Fast EM default config, true k, diffusion image alone (--true_kernel --classical_blend 0)",
                                            FAST + ("--true_kernel",) + NOBLEND, "runner"),
    "diffem": Method("Diffusion EM ΠGDM", ("test_DiffEM.py",), "runner", oracle="fastem_oracle", blind=True),
    "fastem_dps": Method("Fast EM DPS", FAST + ("--diffusion_config", "configs/diffusion_config_fastem_dps.yaml"), "runner",
                         oracle="fastem_dps_oracle", blind=True),
    "fastem_dps_oracle": Method("DPS oracle (true k)", FAST + ("--diffusion_config", "configs/diffusion_config_fastem_dps.yaml",
                                                              "--true_kernel"), "runner"),
}


def command(name: str, testset: Path, out: Path, threads: int, max_images: Optional[int]) -> list:
    m = METHODS[name]
    cmd = [sys.executable, *m.argv, "--input_dir", str(testset), "--save_dir", str(out), "--threads", str(threads)]
    if m.style == "runner":
        cmd += ["--device", "cpu"]
    if max_images:
        cmd += ["--max_images", str(max_images)]
    return cmd


def _newest(folder: Path) -> float:
    files = [f for f in folder.rglob("*") if f.is_file() and f.name not in ("eval.csv", "eval.json", "run.log")] \
        if folder.is_dir() else []
    return max((f.stat().st_mtime for f in files), default=0.0)


def scored_rows(testset: Path, out: Path, oracle: Optional[Path]) -> list:
    """evaluate_folder's rows, reused from out/eval.csv when it is newer than every result (and oracle) file."""
    cache = out / "eval.csv"
    if cache.is_file() and cache.stat().st_mtime > max(_newest(out), _newest(oracle) if oracle else 0.0,
                                                       _newest(testset)):
        with open(cache, newline="") as f:
            return [{k: (v if v != "" else None) for k, v in r.items()} for r in csv.DictReader(f)]
    rows = evaluate_folder(testset, out, oracle)
    write_outputs(rows, out, {"testset": str(testset), "oracle": str(oracle) if oracle else None})
    return rows


def run_method(name, testset, out, threads, max_images, log) -> int:
    cmd = command(name, testset, out, threads, max_images)
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "a") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode


# ------------------------------------------------------------------------------------------- tables
def _f(v, fmt):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _share(rows, t):
    v = [float(r["error_ratio"]) for r in rows if r.get("error_ratio") not in (None, "")]
    return None if not v else sum(x <= t for x in v) / len(v)


def main_table(per: dict, names: list, common: list) -> list:
    lines = ["| method | s/img | UNet evals | PSNR | PSNR aligned | Δ aligned vs blurry | SSIM | SSIM aligned | "
             "kernel MSE | error ratio | ratio ≤ 2 / ≤ 3 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rows = [per[n][c] for c in common]
        d = [float(r["psnr_aligned"]) - float(r["psnr_blurry_aligned"]) for r in rows
             if r.get("psnr_aligned") not in (None, "") and r.get("psnr_blurry_aligned") not in (None, "")]
        s2, s3 = _share(rows, 2), _share(rows, 3)
        lines.append(f"| {METHODS[n].label} | {_f(finite_mean(rows, 'seconds'), '.1f')} | {_f(finite_mean(rows, 'nfe'), '.0f')} | "
                     f"{_f(finite_mean(rows, 'psnr'), '.2f')} | {_f(finite_mean(rows, 'psnr_aligned'), '.2f')} | "
                     f"{_f(sum(d) / len(d) if d else None, '+.2f')} (worst {_f(min(d) if d else None, '+.1f')}) | "
                     f"{_f(finite_mean(rows, 'ssim'), '.3f')} | {_f(finite_mean(rows, 'ssim_aligned'), '.3f')} | "
                     f"{_f(finite_mean(rows, 'kernel_mse') if METHODS[n].blind else None, '.2e')} | {_f(finite_mean(rows, 'error_ratio'), '.2f')} | "
                     f"{_f(s2, '.0%')} / {_f(s3, '.0%')} |")
    return lines


def group_table(per: dict, names: list, common: list, key, groups: list, what: str) -> list:
    head = "| method | " + " | ".join(f"{g} (n={sum(1 for c in common if key(per[names[0]][c]) == g)})" for g in groups) + " |"
    lines = [f"{what}: aligned PSNR (dB) / aligned SSIM / kernel MSE where estimated", "", head,
             "|---|" + "---|" * len(groups)]
    for n in names:
        cells = []
        for g in groups:
            rows = [per[n][c] for c in common if key(per[n][c]) == g]
            km = finite_mean(rows, "kernel_mse") if METHODS[n].blind else None  # an oracle's kernel is the truth
            cells.append(f"{_f(finite_mean(rows, 'psnr_aligned'), '.2f')} / {_f(finite_mean(rows, 'ssim_aligned'), '.3f')}"
                         + (f" / {km:.1e}" if km is not None else ""))
        lines.append(f"| {METHODS[n].label} | " + " | ".join(cells) + " |")
    return lines


ANALYSIS = ("<!-- analysis: begin (hand-written; bench/table.py keeps it) -->", "<!-- analysis: end -->")


def keep_analysis(new: str, old: str) -> str:
    """`new` with the hand-written analysis block of the previous file (between the ANALYSIS markers) put back
    before the first set's section, so regenerating the tables never loses the discussion of them."""
    if ANALYSIS[0] not in old or ANALYSIS[1] not in old:
        return new
    block = ANALYSIS[0] + old.split(ANALYSIS[0], 1)[1].split(ANALYSIS[1], 1)[0] + ANALYSIS[1] + "\n\n"
    head, sep, rest = new.partition("\n## ")
    return head + "\n" + block + sep.lstrip("\n") + rest if sep else new + "\n" + block


def sigma_key(r):
    return sigma_group(r.get("sigma"))


def boundary_note(rows: list) -> str:
    """What the cases declare about their boundary (meta.csv), and so how `auto` runs them."""
    declared = {}
    for r in rows:
        b = r.get("boundary") if r.get("boundary") not in (None, "", "None") else None
        declared[b] = declared.get(b, 0) + 1
    parts = [f"{v} declared `{k}`" for k, v in sorted((k, v) for k, v in declared.items() if k)]
    if None in declared:
        parts.append(f"{declared[None]} undeclared (real captures: `boundary: auto` pads them with the "
                     "non-periodic taper; nothing is assumed periodic)")
    return "Boundary: " + ", ".join(parts) + "."


def per_case_table(per: dict, all_rows: dict, names: list, cases: list) -> list:
    """One row per case: the blurry input's aligned PSNR and, per method, its aligned PSNR (error ratio for a blind
    method); a case a method failed is marked, so no failure hides behind a mean."""
    ref = next(n for n in names if per[n])
    own_blurry = "blurry" not in names  # else the blurry method's column already holds it
    head = "| case | kernel px | " + ("blurry input | " if own_blurry else "") + " | ".join(METHODS[n].label for n in names) + " |"
    lines = ["Per case: aligned PSNR (dB); error ratio in brackets for blind methods; FAILED: the method gave up "
             "on the case (its log says why); (classical fallback): the diffusion run diverged and the image is "
             "the ℓ0 + hyper-Laplacian restoration (`on_divergence: classical`)", "", head, "|---|---|" + "---|" * (len(names) + own_blurry)]
    for c in cases:
        r0 = next(per[n][c] for n in names if c in per[n]) if any(c in per[n] for n in names) else all_rows[ref][c]
        cells = [_f(_num(r0.get("psnr_blurry_aligned")), ".2f")] if own_blurry else []
        for n in names:
            r = per[n].get(c)
            if r is None:
                st = all_rows[n].get(c, {}).get("status", "missing")
                cells.append("FAILED" if st == "failed" else "–")
                continue
            er = f" ({_f(float(r['error_ratio']), '.2f')})" if METHODS[n].blind and r.get("error_ratio") not in (None, "") else ""
            fb = " (classical fallback)" if has_flag(r, "classical_fallback") else ""
            cells.append(f"{_f(float(r['psnr_aligned']), '.2f')}{er}{fb}")
        lines.append(f"| {c} | {r0.get('kernel_size') or '–'} | " + " | ".join(cells) + " |")
    return lines


def _num(v):
    return None if v in (None, "", "None") else float(v)


def attempted_success(all_rows: dict, names: list) -> list:
    """Success rates of each blind method over every case it attempted, a failed image counted as ratio ∞."""
    out = []
    for n in names:
        if not METHODS[n].blind:
            continue
        rows = [r for r in all_rows[n].values() if r.get("status") in ("ok", "failed")]
        ratios = [math.inf if r["status"] == "failed" else _num(r.get("error_ratio")) for r in rows]
        ratios = [x for x in ratios if x is not None]
        if not ratios:
            continue
        fails = sum(r["status"] == "failed" for r in rows)
        out.append(f"- {METHODS[n].label}: {len(ratios)} cases with an error ratio ({fails} failed, counted as ∞): "
                   f"ratio ≤ 2 on {sum(x <= 2 for x in ratios)} ({sum(x <= 2 for x in ratios) / len(ratios):.0%}), "
                   f"≤ 3 on {sum(x <= 3 for x in ratios)} ({sum(x <= 3 for x in ratios) / len(ratios):.0%})")
    return out


def size_key(r):
    return size_bin(r.get("kernel_size")) or "unknown"


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch
    return (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}")


def commit() -> str:
    try:
        c = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + (" (with uncommitted changes)" if dirty else "")
    except OSError:
        return "unknown"


def plot(points: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # optional dependency
        return f"plot skipped: matplotlib not importable ({type(e).__name__})"
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4.5), squeeze=False)
    for ax, (setname, pts) in zip(axes[0], points.items()):
        for label, s, p in pts:
            if s is None or p is None:
                continue
            ax.scatter([max(s, 0.01)], [p], s=40)
            ax.annotate(label, (max(s, 0.01), p), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("seconds per image (CPU, 1 thread)")
        ax.set_ylabel("aligned PSNR (dB)")
        ax.set_title(setname)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written: {path}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testset", nargs="+", required=True, type=Path)
    ap.add_argument("--methods", default="blurry,tikhonov_oracle,tikhonov,hyper_laplacian,l0_blind,fastem,fastem_oracle")
    ap.add_argument("--results_root", type=Path, default=REPO / "results" / "bench")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: <out dir>/benchmarks_psnr_seconds.png)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max_images", type=int, default=None, help="run at most this many cases per method (first by name)")
    ap.add_argument("--no_run", action="store_true", help="only score existing result folders")
    ap.add_argument("--run_only", default=None,
                    help="comma list: run only these methods (the others are scored from existing folders)")
    ap.add_argument("--per_case", nargs="*", default=[],
                    help="set names (folder names) that get a per-case table; sets that declare no boundary "
                         "(real captures) always get one")
    ap.add_argument("--note", action="append", default=[], help="a line added under the tables (e.g. which runs were reduced)")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)  # scoring too: the box is shared
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    run_only = None if args.run_only is None else {m.strip() for m in args.run_only.split(",")}
    need = list(dict.fromkeys(names + [METHODS[n].oracle for n in names if METHODS[n].oracle in names]))
    plot_path = args.plot or args.out.parent / "benchmarks_psnr_seconds.png"
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = ["# Benchmarks", "", f"Generated by `python bench/table.py` on {started}; commit {commit()}.", "",
          f"Machine: {machine()}. Every method ran with {args.threads} CPU thread(s), one job at a time, on a CPU "
          "shared with other work: seconds are indicative, ratios between rows more than absolute values.", "",
          "Command:", "", "```", "python bench/table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])), "```", "",
          "See also: [speed and memory](speed.md) (CPU UNet levers, batched images, large photos, the prepared GPU "
          "suite) and [real camera-shake captures](real_captures.md) (Levin et al. 2009, noise rule, guard).", ""]
    points = {}
    for ts in args.testset:
        setname = ts.name
        per, all_rows = {}, {}
        cmds = []
        for n in need:
            out = args.results_root / setname / n
            cmds.append(" ".join(["python"] + [shlex.quote(c) for c in command(n, ts, out, args.threads, args.max_images)[1:]]))
            if not args.no_run and (run_only is None or n in run_only):
                run_method(n, ts, out, args.threads, args.max_images, None)
        for n in need:
            out = args.results_root / setname / n
            oracle = METHODS[n].oracle
            rows = scored_rows(ts, out, args.results_root / setname / oracle if oracle in need else None) \
                if out.is_dir() else []
            all_rows[n] = {r["name"]: r for r in rows}
            per[n] = {k: r for k, r in all_rows[n].items() if r.get("status") == "ok"}
        present = [n for n in names if per[n]]  # a method with no finished case yet is listed, not tabulated
        common = sorted(set.intersection(*(set(per[n]) for n in present))) if present else []
        nfail = {n: sum(r.get("status") == "failed" for r in all_rows[n].values()) for n in names}
        counts = ", ".join(f"{n} {len(per[n])}" + (f" (+{nfail[n]} failed)" if nfail[n] else "") for n in names)
        cases_all = evaluate_folder(ts, ts / "__none__")  # every case of the set, unscored
        n_all = len(cases_all)
        md += [f"## {setname}", "", f"Test set `{ts}` (cases: its README.md). Finished cases per method: {counts}. "
               "Each table compares methods on the same cases.", "", boundary_note(cases_all), ""]
        full = [n for n in names if len(per[n]) == n_all]
        scopes = [(present, common, f"The {len(common)} cases every method with results finished")] if common else []
        if len(common) < n_all and full and len(full) < len(present):
            scopes.append((full, sorted(set.intersection(*(set(per[n]) for n in full))),
                           f"All {n_all} cases, methods that finished them all"))
        most = [n for n in present if len(per[n]) * 2 >= n_all]  # a long run stopped early still gets compared
        if most and set(most) not in ({*present}, {*full}):
            shared = sorted(set.intersection(*(set(per[n]) for n in most)))
            scopes.append((most, shared, f"The {len(shared)} cases shared by the methods that finished at least half"))
        for ms, cases, title in scopes:
            md += [f"### {title}", ""] + main_table(per, ms, cases) + [""]
            sig = sorted({sigma_key(per[ms[0]][c]) for c in cases}, key=sigma_order)
            if sig != [SIGMA_UNDECLARED]:
                md += group_table(per, ms, cases, sigma_key, sig, "Per noise level σ") + [""]
            else:
                md += ["No case declares σ: each method estimates it (the σ rule of `util/noise.py`), so there is "
                       "no per-σ table.", ""]
            sizes = [lab for _, _, lab in SIZE_BINS if any(size_key(per[ms[0]][c]) == lab for c in cases)]
            md += group_table(per, ms, cases, size_key, sizes, "Per kernel size (true kernel's array size)") + [""]
        if present and (setname in args.per_case or all(r.get("boundary") in (None, "") for r in cases_all)):
            md += per_case_table(per, all_rows, present, [r["name"] for r in cases_all]) + [""]
        succ = attempted_success(all_rows, present)
        if succ:
            md += ["Success over every case a blind method attempted (not only the common ones):", ""] + succ + [""]
        md += ["Commands (each skips images it already finished):", "", "```"] + cmds + ["```", ""]
        ms0, cases0 = (scopes[0][0], scopes[0][1]) if scopes else (names, [])
        title = f"{setname} ({len(cases0)} cases every plotted method finished)"
        points[title] = [(n, finite_mean([per[n][c] for c in cases0], "seconds"),
                          finite_mean([per[n][c] for c in cases0], "psnr_aligned")) for n in ms0]
        io_summary = {n: {"n": len(per[n])} for n in names}
        (args.results_root / setname).mkdir(parents=True, exist_ok=True)
        (args.results_root / setname / "table.json").write_text(json.dumps({"common": common, "counts": io_summary}))
    md += ["## Notes", "", "- Metrics: `util/metrics.py` and `python -m diffusion_em.evaluate` (docs/algorithm.md): aligned = "
           "border max(15 px, kernel radius) cropped, best integer then 0.25-px (Fourier) shift within ± kernel radius. "
           "Error ratio = aligned SSE of the blind method / aligned SSE of the same solver with the true kernel "
           "(Levin et al. 2009); success = ratio ≤ 2 (≤ 3). Kernel MSE (aligned within ±4 px, per tap of the estimate).",
           "- UNet evals: network evaluations per image (0 for classical methods). s/img excludes scoring."]
    md += [f"- {n}" for n in args.note]
    msg = plot(points, plot_path)
    md += [f"- PSNR vs seconds: `{os.path.relpath(plot_path, args.out.parent)}`" if msg.startswith("plot written")
           else f"- {msg}", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(keep_analysis("\n".join(md), args.out.read_text() if args.out.is_file() else ""))
    print(f"wrote {args.out}; {msg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Large photos on the CPU: time and peak memory of `test_FastDiffEM.py` at default settings, per image size.

    python bench/large_photo.py --sizes 512x512 1024x1024 1200x690 --steps 2 6 --threads 1

Each (size, steps) is one fresh `test_FastDiffEM.py` process (bundled prior, Fast EM ΠGDM, default configs)
on one synthetic plain photo of that size (so the default photo path runs: σ given, tapered border, padding).
Peak memory is the child's peak resident set (`wait4` rusage), model and Python included; a 64×64 run gives
that fixed part. The runner's pixel budget stays on (a size it refuses is recorded with its message; the
default's 4 particles need ~4x one particle's memory in the last steps); `--no_budget` turns it off
(`--memory_budget_gb 0`), at the risk of the OOM killer; an image that fits only in the low-memory mode runs
in it (`"low_memory": true`; one particle's UNet graph at a time). Its estimate (`diffusion_em.budget.estimate_run_bytes`,
with the run's particles) is printed beside the measured peak. Seconds per step come from
the difference of the two step counts, in wall time (the runner's per-image `seconds`) and in the process's
CPU seconds (the robust figure on a shared machine with 1 thread); the 100-step time is projected from
them (100 steps of a 1024² image take tens of minutes on this CPU). With the default's particles the two step
counts differ only in single-trajectory steps (the last 30 % branch, at least 2 steps: a 2-step run is all
branched steps), so the per-step figure and the projection are single-trajectory steps; the branched steps'
cost is `bench/low_memory.py`'s. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from diffusion_em.run import LOW_MEMORY_NOTE  # noqa: E402


def synthetic_photo(path: Path, H: int, W: int, seed: int = 0) -> None:
    """A smooth random RGB image (content does not change the cost)."""
    g = np.random.default_rng(seed)
    small = g.random((H // 8 + 2, W // 8 + 2, 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((W, H), Image.BICUBIC)
    img.save(path)


def estimate_mb(H: int, W: int, n_particles: int, low_memory: bool = False) -> float:
    """The pixel budget's estimate for this image at the default settings (bundled prior, 33×33 kernels) with
    the particles the run uses (the default config's 4 hold their UNet graphs at once in the last steps, or one
    at a time in the low-memory mode the runner picks when only that fits the budget)."""
    sys.path.insert(0, str(ROOT))
    from diffusion_em.budget import estimate_run_bytes
    from guided_diffusion.model_config import load_model_config
    model = load_model_config(ROOT / "configs" / "model_config_bundled.yaml")
    return estimate_run_bytes(H, W, n_particles, model, 33, low_memory=low_memory) / 2 ** 20


def timing_config(path: Path) -> Path:
    """The default Fast EM config with the divergence guard off: a few-step run is not a result, only a timing."""
    d = yaml.safe_load((ROOT / "configs" / "diffusion_config_fastem_pigdm.yaml").read_text())
    d.update(retries=0, guard_residual=1e9, guard_saturation=1.0)
    path.write_text(yaml.safe_dump(d))
    return path


def run_once(photo_dir: Path, out: Path, steps: int, threads: int, extra: list, budget: list) -> dict:
    cfg = timing_config(out.parent / "timing_config.yaml")
    cmd = [sys.executable, str(ROOT / "test_FastDiffEM.py"), "--input_dir", str(photo_dir), "--save_dir", str(out),
           "--diffusion_config", str(cfg), *budget,
           "--steps", str(steps), "--threads", str(threads), "--device", "cpu", "--sigma", "0.02",
           "--overwrite", *extra]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}_{steps}.log", "w+") as logf:
        p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        _, status, ru = os.wait4(p.pid, 0)  # reaped here: its own rusage (peak RSS of that process alone)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        logf.seek(0)
        log = logf.read()
    rows = list(csv.DictReader(open(out / "metrics.csv"))) if (out / "metrics.csv").exists() else []
    row = rows[-1] if rows else {}
    record = (yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else None) or {}
    n_particles = record.get("settings", {}).get("diffusion", {}).get("n_particles")  # what the run resolved
    return {"n_particles": n_particles, "low_memory": row.get("message") == LOW_MEMORY_NOTE,
            "rc": p.returncode, "wall_s": round(wall, 1),
            "image_s": float(row["seconds"]) if row.get("seconds") else None,
            "status": row.get("status"), "message": row.get("message") or log.strip().splitlines()[-1][:300],
            "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "1200x690"], help="HxW")
    ap.add_argument("--steps", type=int, nargs=2, default=[2, 6], help="two step counts (per-step cost from the difference)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline", default="64x64", help="a small size giving the fixed memory (model, Python)")
    ap.add_argument("--no_budget", action="store_true",
                    help="run with --memory_budget_gb 0 (measure past the estimate; may meet the OOM killer)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more test_FastDiffEM.py flags")
    args = ap.parse_args(argv)
    budget = ["--memory_budget_gb", "0"] if args.no_budget else []  # default: the runner refuses what will not fit
    sizes = ([args.baseline] if args.baseline else []) + args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            H, W = (int(v) for v in size.lower().split("x"))
            d = Path(tmp) / size
            d.mkdir()
            synthetic_photo(d / f"photo_{size}.png", H, W)
            runs = {}
            for steps in (args.steps if size != args.baseline else args.steps[:1]):
                r = run_once(d, Path(tmp) / f"out_{size}", steps, args.threads, args.extra, budget)
                runs[steps] = r
                print(json.dumps({"size": [H, W], "steps": steps, "threads": args.threads, **r,
                                  "load1": round(os.getloadavg()[0], 2)}), flush=True)
            s1, s2 = args.steps
            if size != args.baseline and all(runs[s]["image_s"] for s in (s1, s2)):
                per_step = (runs[s2]["image_s"] - runs[s1]["image_s"]) / (s2 - s1)
                cpu_step = (runs[s2]["cpu_s"] - runs[s1]["cpu_s"]) / (s2 - s1)
                print(json.dumps({"size": [H, W], "summary": True, "threads": args.threads,
                                  "low_memory": runs[s2]["low_memory"],
                                  "budget_estimate_mb": round(estimate_mb(H, W, runs[s2]["n_particles"],
                                                                          runs[s2]["low_memory"]), 1),
                                  "s_per_step": round(per_step, 2), "cpu_s_per_step": round(cpu_step, 2),
                                  "projected_100_steps_cpu_s": round(100 * cpu_step, 1),
                                  "projected_100_steps_s": round(runs[s1]["image_s"] + (100 - s1) * per_step, 1),
                                  "peak_rss_mb": max(runs[s]["peak_rss_mb"] or 0 for s in (s1, s2)),
                                  "load1": round(os.getloadavg()[0], 2)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The low-memory mode against the normal one: time per step, peak memory, and whether the results agree.

    python bench/low_memory.py --sizes 512x512 1200x690 --steps 3 --threads 2

For each size, a fresh process per mode runs `fast_diffusion_em` with the default configs (bundled prior,
its precision, ΠGDM with the UNet Jacobian, the M-step from a Dirac, 4 particles) on a synthetic image of the
frame the runner diffuses for a photo of that size (a border of one kernel size, then the UNet's multiple), the
particles branched from the first step (`branch_fraction` 1: every step is a 4-particle step, the phase the
mode changes) for `--steps` steps of the 100-step schedule's last ones' kind (a respaced schedule of that many
steps), the divergence guard off. Reported per run: wall seconds of each step, peak resident memory of the
process (`wait4` rusage: model and Python included), and the budget's estimate; then the ratio low/normal of
the per-step time (the first step dropped: allocator warm-up) and whether the two final images are equal bit
for bit. A mode whose estimate exceeds `--budget_gb` (default: 90 % of the memory free now) is not run and
says so. One JSON line per run and one per size. The children set glibc's allocator as the runner does on a
CPU (`--malloc keep`, util/cpu_memory.py; `keep_freed_memory` in each record says whether glibc took it);
`--malloc default` leaves glibc's own thresholds (the figures recorded before 2026-12-07 evening ran so).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def padded(size: str) -> tuple:
    """The frame the runner diffuses for a photo of this size with the bundled prior (budget.frame_size)."""
    from diffusion_em.budget import frame_size
    from guided_diffusion.model_config import load_model_config
    H, W = (int(v) for v in size.lower().split("x"))
    return frame_size(H, W, load_model_config(ROOT / "configs" / "model_config_bundled.yaml"), 33)


def child(size: str, steps: int, low: bool, threads: int, out: str, malloc: str = "keep") -> None:
    """One run in this process; writes its step times and final particles to `out`. malloc 'keep' sets glibc's
    thresholds as the runner does on a CPU (util/cpu_memory.py); 'default' leaves glibc's own."""
    import torch
    from util.cpu_memory import keep_freed_memory
    if malloc not in ("keep", "default"):
        raise ValueError(f"malloc must be 'keep' or 'default', got {malloc!r}")
    kept = keep_freed_memory() if malloc == "keep" else False
    from diffusion_em.config import load_diffusion_config, load_kernel_config
    from diffusion_em.em import fast_diffusion_em
    from diffusion_em.restore import load_restorer
    from guided_diffusion.model_config import load_model_config

    torch.set_num_threads(threads)
    H, W = padded(size)
    dcfg = load_diffusion_config(ROOT / "configs" / "diffusion_config_fastem_pigdm.yaml", {"steps": steps})
    r = load_restorer(dcfg, load_kernel_config(ROOT / "configs" / "kernel_config_33.yaml"),
                      load_model_config(ROOT / "configs" / "model_config_bundled.yaml"), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    y = torch.nn.functional.interpolate(torch.rand(1, 3, H // 8, W // 8, generator=g), size=(H, W), mode="bicubic")
    y = y.clamp(0, 1)
    times, last = [], [time.perf_counter()]

    def tick(info):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now
    res = fast_diffusion_em(r.denoiser, y, 0.02, r.guidance, dcfg.mstep, r.kernel_size, torch.Generator().manual_seed(1),
                            r.kernel_denoiser, n_particles=dcfg.n_particles, guard=None, callback=tick,
                            branch_fraction=1.0, low_memory=low)
    torch.save({"times": times, "x": res.x, "kernel": res.kernel, "precision": r.precision,
                "n_particles": dcfg.n_particles, "keep_freed_memory": kept}, out)


def run(size: str, steps: int, low: bool, threads: int, tmp: Path, malloc: str = "keep") -> dict:
    import torch
    out = tmp / f"{size}_{'low' if low else 'normal'}.pt"
    cmd = [sys.executable, __file__, "--child", size, str(steps), str(int(low)), str(threads), str(out), malloc]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    _, status, ru = os.wait4(p.pid, 0)
    err = p.stderr.read()
    rec = {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - t0, 1),
           "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}
    if rec["rc"] != 0:
        return {**rec, "error": err.strip().splitlines()[-1][:300] if err.strip() else ""}
    d = torch.load(out, weights_only=True)
    return {**rec, "step_s": [round(t, 3) for t in d["times"]], "precision": d["precision"],
            "n_particles": d["n_particles"], "keep_freed_memory": d["keep_freed_memory"], "_x": d["x"], "_k": d["kernel"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child(argv[1], int(argv[2]), bool(int(argv[3])), int(argv[4]), argv[5], *argv[6:7])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["512x512"], help="HxW")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", default="keep", choices=("keep", "default"),
                    help="glibc's thresholds in the children: 'keep' as the runner sets them on a CPU (default), "
                         "'default' glibc's own (the runner's --malloc default)")
    ap.add_argument("--budget_gb", type=float, default=None, help="skip a mode estimated above this (default: 90 %% free)")
    args = ap.parse_args(argv)
    import torch
    from diffusion_em.budget import default_budget_bytes, estimate_run_bytes
    from guided_diffusion.model_config import load_model_config
    model = load_model_config(ROOT / "configs" / "model_config_bundled.yaml")
    budget = default_budget_bytes(torch.device("cpu")) if args.budget_gb is None else int(args.budget_gb * 2**30)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            H, W = (int(v) for v in size.lower().split("x"))
            runs = {}
            for low in (False, True):
                est = estimate_run_bytes(H, W, 4, model, 33, low_memory=low)
                mode = "low" if low else "normal"
                base = {"size": [H, W], "frame": list(padded(size)), "mode": mode, "steps": args.steps, "threads": args.threads,
                        "malloc": args.malloc, "budget_estimate_mb": round(est / 2**20, 1)}
                if budget is not None and est > budget:
                    print(json.dumps({**base, "skipped": f"estimate over the budget of {budget / 2**30:.1f} GB"}),
                          flush=True)
                    continue
                runs[mode] = run(size, args.steps, low, args.threads, Path(tmp), args.malloc)
                print(json.dumps({**base, **{k: v for k, v in runs[mode].items() if not k.startswith("_")},
                                  "load1": round(os.getloadavg()[0], 2)}), flush=True)
            summary = {"size": [H, W], "summary": True}
            if all(m in runs and "step_s" in runs[m] for m in ("normal", "low")):
                per = {m: sum(runs[m]["step_s"][1:]) / max(1, len(runs[m]["step_s"]) - 1) for m in runs}
                summary.update(normal_s_per_step=round(per["normal"], 3), low_s_per_step=round(per["low"], 3),
                               time_low_vs_normal=round(per["low"] / per["normal"], 3),
                               peak_low_vs_normal=round(runs["low"]["peak_rss_mb"] / runs["normal"]["peak_rss_mb"], 3),
                               equal_images=bool(torch.equal(runs["normal"]["_x"], runs["low"]["_x"])),
                               equal_kernels=bool(torch.equal(runs["normal"]["_k"], runs["low"]["_k"])))
            print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train stronger diffusion priors on one GPU within a fixed budget, export them and score them (issue 8, item 2).

    python bench/gpu_prior.py --prepare carry/prior          # here, on the CPU: the data the GPU run needs
    bash bench/gpu_prior.sh                                  # on the GPU machine, carry=["carry/prior"]; ≤ 9 min
    python bench/gpu_prior.py --unpack DIR [--to DEST]       # here: join the returned parts into DEST/prior_big.pt
    python bench/gpu_prior.py --reduced --device cpu ...     # the CPU smoke form (tests/test_bench_suite.py)

Phases, each a budget in seconds from the start (a phase never starts past its share; results are written as
they come, so a cut run still returns what it finished):
1. **train** (`--train_minutes`), two runs at once on one GPU (small nets leave most of it idle), each
   `python -m guided_diffusion.train` with bf16 autocast, 256² crops (the inference size: the 16² attention
   sees 16×16 tokens, not the 4×4 of the 64² crops the shipped prior saw), BSDS500 train + val only, keeping
   the EMA that validates best (x̂0 PSNR of 16 BSDS500 *test* centre crops at t = 20, 56, 114, 250):
   - `same`: the shipped architecture (`--same_config`, CPU-fast), continued from its weights: a drop-in
     replacement for `models/bundled_prior.pt` at the same CPU cost;
   - `big`: `BIG` below (64 base channels, 2 res blocks, 11.6 M parameters, 46.5 MB fp32), from scratch: for
     GPU users; several times the CPU cost.
2. **score**: the shipped weights (the `same` run's first validation) beside each run's best EMA, from the
   trainings' own validation logs (same crops, same noise).
3. **deblur** (until `--budget_s`): `test_FastDiffEM.py` (README default, blind) and the same with
   `--true_kernel`, for the shipped, `same` and `big` priors (the big one rounded to fp16, as returned), six
   processes at once on the first cases of a test-set folder (`--eval_dir`); each image's row lands in its
   `metrics.csv` as it finishes, and the table compares the priors on the cases every blind (and every oracle)
   run finished.
Returned in `--out` (default $OUT; the device tool brings back ≤ 8 files of ≤ 16 MiB): `gpu_prior.jsonl`
(every record), `logs.tar.gz` (loss/val CSVs, logs, the deblur runs' metrics.csv and config.yaml),
`prior_same.pt` (fp32, 15.5 MB) and `prior_big.pt.part0/1` (fp16, split; `--unpack` joins and restores fp32).
"""
from __future__ import annotations

import time

T_START = time.time()  # the budget counts from here: imports on a fresh machine take seconds

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guided_diffusion.model_config import build_unet, load_model_config  # noqa: E402
from guided_diffusion.train import VAL_T  # noqa: E402
from guided_diffusion.unet import load_weights  # noqa: E402
from diffusion_em.results import ResultsFolder  # noqa: E402
from util.config import as_dict  # noqa: E402
from util.csvlog import read_csv_rows  # noqa: E402

SHARED = ROOT.parent / "shared"
PART_BYTES = 15 * 2 ** 20  # under the device tool's 16 MiB per returned file
WORKTREE_LIMIT = 64 * 2 ** 20  # what travels to the device machine, tracked files included
# the bigger prior: ADM's usual 2 res blocks and 64 base channels, kept ≤ 50 MB (fp32) by a flat 2× top
BIG = dict(image_size=256, num_channels=64, num_res_blocks=2, channel_mult="1,1,2,2,2", learn_sigma=False,
           class_cond=False, attention_resolutions="16", num_heads=4, num_head_channels=32, num_heads_upsample=-1,
           use_scale_shift_norm=True, dropout=0.0, resblock_updown=True, use_fp16=False,
           use_new_attention_order=False, schedule="linear")
# the reduced (CPU smoke) form's "big" net: a tiny UNet of another width
TINY_BIG = dict(image_size=32, num_channels=64, num_res_blocks=1, channel_mult="1,2", learn_sigma=False,
                attention_resolutions="2", num_heads=2, use_scale_shift_norm=True, resblock_updown=True)


# ============================================================================================== here (CPU)
def prepare(dest: Path, bsds: Path, eval_set: Path, eval_cases: int, val_images: int) -> int:
    """Copy BSDS500 train + val (training), the first `val_images` test images (validation) and the first
    `eval_cases` cases of a test-set folder (deblurring) into `dest`, a git-ignored folder to `carry`."""
    if dest.exists():
        shutil.rmtree(dest)
    for sub in ("train", "val"):
        shutil.copytree(bsds / sub, dest / "train" / sub)
    (dest / "val").mkdir(parents=True)
    exts = {".jpg", ".jpeg", ".png"}
    for p in sorted(q for q in (bsds / "test").iterdir() if q.suffix.lower() in exts)[:val_images]:
        shutil.copy2(p, dest / "val" / p.name)
    rows = read_csv_rows(eval_set / "meta.csv")[:eval_cases]
    if not rows:
        raise SystemExit(f"{eval_set}/meta.csv: no cases to copy (--eval_cases {eval_cases})")
    names = {r["name"] for r in rows}
    (dest / "eval").mkdir()
    with open(dest / "eval" / "meta.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for sub in ("blurry", "sharp", "kernel"):
        if (eval_set / sub).is_dir():
            (dest / "eval" / sub).mkdir()
            for p in (eval_set / sub).iterdir():
                if p.stem in names:
                    shutil.copy2(p, dest / "eval" / sub / p.name)
    download_wheel(dest / "whl")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    tracked = tracked_bytes()
    print(f"{dest}: {size / 2 ** 20:.1f} MiB ({len(rows)} eval cases); with the tracked files "
          f"{(size + tracked) / 2 ** 20:.1f} MiB of the device tool's 64 MiB")
    if size + tracked > WORKTREE_LIMIT:
        print("too large to travel: lower --eval_cases", file=sys.stderr)
        return 1
    return 0


def download_wheel(folder: Path) -> None:
    """pytorch-msssim (the metrics' SSIM) is not in the GPU machine's image: its pure-Python wheel travels too."""
    from importlib.metadata import version
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder),
                          f"pytorch-msssim=={version('pytorch-msssim')}"], capture_output=True, text=True)
    if got.returncode:
        print(f"warning: no pytorch-msssim wheel ({got.stderr.strip()[-200:]}): deblurring there will fail",
              file=sys.stderr)


def tracked_bytes() -> int:
    """Bytes of the repository's tracked files (they travel with the carried data)."""
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True).stdout.split("\0")
    return sum((ROOT / f).stat().st_size for f in files if f and (ROOT / f).is_file())


def unpack(folder: Path, dest: Path) -> Path:
    """Join folder/prior_big.pt.part* (fp16; the returned folder is read-only) into dest/prior_big.pt, fp32
    (loads with guided_diffusion.unet.load_weights)."""
    import io
    parts = sorted(folder.glob("prior_big.pt.part*"), key=lambda p: int(p.suffix[5:]))
    if not parts:
        raise SystemExit(f"{folder}: no prior_big.pt.part* files")
    sd = torch.load(io.BytesIO(b"".join(p.read_bytes() for p in parts)), map_location="cpu", weights_only=True)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / "prior_big.pt"
    torch.save(_fp32(sd), out)
    return out


def _fp16(sd: dict) -> dict:
    return {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}


def _fp32(sd: dict) -> dict:
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# ============================================================================================== there (GPU)
class Log:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def __call__(self, rec: dict):
        line = json.dumps(rec)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def _train_cmd(a, name: str, model_yaml: Path, init, work: Path) -> list:
    spec = {"same": dict(lr=1e-4, warmup=100, ema=0.999), "big": dict(lr=3e-4, warmup=300, ema=0.999)}[name]
    cmd = [sys.executable, "-m", "guided_diffusion.train", "--data", str(a.data / "train" / "train"),
           str(a.data / "train" / "val"), "--model_config", str(model_yaml), "--out", str(work / name),
           "--crop", str(a.crop), "--batch", str(a.batch), "--lr", str(spec["lr"]), "--warmup", str(spec["warmup"]),
           "--ema", str(spec["ema"]), "--steps", str(a.train_steps), "--max_minutes", str(a.train_minutes),
           "--ckpt_minutes", str(a.train_minutes + 1), "--log_every", "50",  # one checkpoint, at the end "--seed", "0", "--device", a.device,
           "--val", str(a.data / "val"), "--val_images", str(a.val_images), "--val_size", str(a.val_size),
           "--val_minutes", str(a.val_minutes), "--threads", str(a.train_threads)]
    if a.device != "cpu":
        cmd.append("--bf16")
    if init:
        cmd += ["--init", str(init)]
    return cmd


def _write_model_yaml(path: Path, cfg: dict, weights) -> Path:
    path.write_text(yaml.safe_dump({**cfg, "model_path": str(weights) if weights else None}))
    return path


def _mean(rows, key):
    v = [float(r[key]) for r in rows if r.get(key) not in (None, "", "nan")]
    return float(f"{sum(v) / len(v):.6g}") if v else None  # significant digits: kernel MSEs are ~1e-5


def _deblur_table(runs: dict, log: Log) -> None:
    """Compare priors on the cases every run of a kind (blind | oracle) finished."""
    rows = {}
    for name, d in runs.items():
        rows[name] = {n: r for n, r in ResultsFolder(d).previous_rows().items() if r.get("status") == "ok"}
    for kind in ("blind", "oracle"):
        names = [n for n in runs if n.endswith(kind)]
        common = sorted(set.intersection(*(set(rows[n]) for n in names))) if names else []
        for n in names:
            sel = [rows[n][c] for c in common]
            log({"section": "deblur", "run": n, "finished": len(rows[n]), "common_cases": len(common),
                 "psnr_aligned": _mean(sel, "psnr_aligned"), "psnr_blurry_aligned": _mean(sel, "psnr_blurry_aligned"),
                 "psnr": _mean(sel, "psnr"), "kernel_mse": _mean(sel, "kernel_mse"),
                 "seconds_per_image": _mean(sel, "seconds"), "cases": common})


def _tar_logs(out: Path, work: Path) -> None:
    """Logs, CSVs and configs of the work folder into out/logs.tar.gz, replaced atomically (a cut run keeps the last)."""
    tmp = out / "logs.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(work.rglob("*")):
            if p.is_file() and p.suffix in (".csv", ".log", ".yaml", ".json"):
                tar.add(p, arcname=str(p.relative_to(work)))
    os.replace(tmp, out / "logs.tar.gz")


def _pack(out: Path, work: Path, log: Log) -> dict:
    """The best EMAs as returnable files (the big one as fp16 parts of ≤ 15 MiB); returns {prior: the fp32 weights
    that equal what was returned}, for the deblurring phase."""
    shipped = {}
    for name in ("same", "big"):
        best = work / name / "best_ema.pt"
        if not best.is_file():
            log({"section": "pack", "prior": name, "missing": str(best)})
            continue
        if name == "same":
            shutil.copy2(best, out / "prior_same.pt")
            shipped[name] = best
            log({"section": "pack", "prior": name, "file": "prior_same.pt", "mb": round(best.stat().st_size / 1e6, 1)})
            continue
        half = _fp16(torch.load(best, map_location="cpu", weights_only=True))
        shipped[name] = work / name / "returned_fp32.pt"  # fp16-rounded: the figures describe the returned file
        torch.save(_fp32(half), shipped[name])
        (work / "fp16.pt").unlink(missing_ok=True)
        torch.save(half, work / "fp16.pt")
        data = (work / "fp16.pt").read_bytes()
        for i in range(0, len(data), PART_BYTES):
            (out / f"prior_big.pt.part{i // PART_BYTES}").write_bytes(data[i:i + PART_BYTES])
        log({"section": "pack", "prior": name, "file": "prior_big.pt.part*", "parts": -(-len(data) // PART_BYTES),
             "mb_fp16": round(len(data) / 1e6, 1)})
    _tar_logs(out, work)
    return shipped


def _stop(procs: dict) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(a) -> int:
    left = lambda: a.budget_s - (time.time() - T_START)  # noqa: E731
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    log = Log(out / "gpu_prior.jsonl")
    env = {"section": "env", "device": a.device, "torch": torch.__version__, "reduced": a.reduced, "budget_s": a.budget_s}
    if a.device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported())
    log(env)

    # 1. train both priors at once; each validates its EMA every --val_minutes (the first row: its start)
    same_cfg = load_model_config(a.same_config)
    if not same_cfg.model_path:
        raise SystemExit(f"{a.same_config}: no model_path, so nothing for the 'same' run to continue")
    big_cfg = TINY_BIG if a.reduced else BIG
    cfgs = {"same": as_dict(same_cfg), "big": big_cfg}
    same_yaml = _write_model_yaml(work / "same_init.yaml", cfgs["same"], same_cfg.model_path)
    big_yaml = _write_model_yaml(work / "big_init.yaml", big_cfg, None)
    procs = {}
    for name, yml, init in (("same", same_yaml, same_cfg.model_path), ("big", big_yaml, None)):
        (work / name).mkdir()
        cmd = _train_cmd(a, name, yml, init, work)
        log({"section": "train", "prior": name, "cmd": " ".join(cmd[1:])})
        procs[name] = subprocess.Popen(cmd, cwd=ROOT, stdout=open(work / name / "train.log", "w"),
                                       stderr=subprocess.STDOUT)
    # training stops itself after --max_minutes; this deadline is the backstop, inside the budget
    deadline = min(time.time() + 60 * a.train_minutes + a.train_grace_s, T_START + a.budget_s - 2 * a.pack_s)
    while any(p.poll() is None for p in procs.values()) and time.time() < deadline:
        time.sleep(2)
    _stop(procs)
    vals = {}
    for name, p in procs.items():
        vals[name], loss = read_csv_rows(work / name / "val.csv"), read_csv_rows(work / name / "loss.csv")
        tail = (work / name / "train.log").read_text().splitlines()[-3:]
        log({"section": "train", "prior": name, "returncode": p.returncode, "steps": int(loss[-1]["step"]) if loss else 0,
             "seconds": float(loss[-1]["seconds"]) if loss else 0.0, "last_loss": float(loss[-1]["loss"]) if loss else None,
             "val": [{k: r[k] for k in ("step", "mean", *[f"t{t}" for t in VAL_T])} for r in vals[name]], "log_tail": tail})
    shipped = _pack(out, work, log)  # the weights first: a later failure still returns them

    # 2. scores side by side, from the trainings' own validation (same crops, same noise): the shipped weights are
    # the 'same' run's first row; each run's best row is the weights returned
    keys = ("step", "mean", *[f"t{t}" for t in VAL_T])
    if vals["same"]:
        log({"section": "score", "prior": "shipped", **{k: float(vals["same"][0][k]) for k in keys}})
    for name, rows in vals.items():
        if rows:
            log({"section": "score", "prior": name, **{k: float(max(rows, key=lambda r: float(r["mean"]))[k]) for k in keys}})

    # 3. deblur with each prior, blind and with the true kernel, until the budget is spent
    priors = {"shipped": same_yaml}
    for name, weights in shipped.items():
        try:  # the returned file loads into its net (strict), or it is not deblurred with
            load_weights(build_unet(load_model_config(_write_model_yaml(work / f"{name}.yaml", cfgs[name], weights))),
                         weights)
            priors[name] = work / f"{name}.yaml"
        except Exception as e:
            log({"section": "deblur", "prior": name, "error": f"{type(e).__name__}: {e}"})
    runs, procs = {}, {}
    if a.eval_dir and left() > a.deblur_min_s:
        for name, yml in priors.items():
            for kind, extra in (("blind", []), ("oracle", ["--true_kernel"])):
                d = work / "deblur" / f"{name}_{kind}"
                cmd = [sys.executable, "test_FastDiffEM.py", "--img_model_config", str(yml), "--input_dir", str(a.eval_dir),
                       "--save_dir", str(d), "--device", a.device, "--threads", str(a.threads), *extra, *a.deblur_args]
                runs[f"{name}_{kind}"] = d
                procs[f"{name}_{kind}"] = subprocess.Popen(cmd, cwd=ROOT, stdout=open(work / f"deblur_{name}_{kind}.log", "w"),
                                                           stderr=subprocess.STDOUT)
        log({"section": "deblur", "started": sorted(runs), "seconds_left": round(left(), 1)})
        while any(p.poll() is None for p in procs.values()) and left() > a.pack_s:
            time.sleep(2)
        _stop(procs)
        _deblur_table(runs, log)
    else:
        log({"section": "deblur", "skipped": "no --eval_dir" if not a.eval_dir else f"{left():.0f} s left"})
    _tar_logs(out, work)  # again, now with the deblurring runs
    log({"section": "done", "seconds": round(time.time() - T_START, 1)})
    return 0


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prepare", type=Path, default=None, metavar="DIR", help="copy the data into DIR and exit")
    ap.add_argument("--bsds", type=Path, default=SHARED / "data" / "bsds500")
    ap.add_argument("--eval_set", type=Path, default=Path("/work/evalsets/synth24"))
    ap.add_argument("--eval_cases", type=int, default=16)
    ap.add_argument("--unpack", type=Path, default=None, metavar="DIR", help="join DIR/prior_big.pt.part* and exit")
    ap.add_argument("--to", type=Path, default=Path("runs/gpu_prior_returned"), help="where --unpack writes prior_big.pt")
    ap.add_argument("--data", type=Path, default=ROOT / "carry" / "prior", help="the --prepare folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_prior"))
    ap.add_argument("--work", default="/tmp/gpu_prior_work", help="checkpoints and runs (not returned)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--same_config", default="configs/model_config_bundled.yaml",
                    help="model config whose weights the 'same' run continues (and the shipped prior scored)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each of the six deblurring processes")
    ap.add_argument("--train_threads", type=int, default=6,
                    help="CPU threads of each of the two trainings (crops and noise are drawn on the CPU)")
    ap.add_argument("--train_minutes", type=float, default=5.0)
    ap.add_argument("--train_steps", type=int, default=1_000_000, help="a cap on optimiser steps per run")
    ap.add_argument("--train_grace_s", type=float, default=60.0, help="start-up, last checkpoint and export")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--val_images", type=int, default=16)
    ap.add_argument("--val_size", type=int, default=128)
    ap.add_argument("--val_minutes", type=float, default=1.0)
    ap.add_argument("--eval_dir", type=Path, default=None, help="test-set folder to deblur (default DATA/eval)")
    ap.add_argument("--deblur_args", nargs=argparse.REMAINDER, default=[],
                    help="extra flags for test_FastDiffEM.py (last on the command line)")
    ap.add_argument("--budget_s", type=float, default=510.0, help="the whole run, phases included")
    ap.add_argument("--deblur_min_s", type=float, default=45.0, help="skip deblurring with less left than this")
    ap.add_argument("--pack_s", type=float, default=15.0, help="seconds kept at the end for the last files")
    ap.add_argument("--reduced", action="store_true", help="CPU smoke form: tiny nets (give --same_config), few steps")
    a = ap.parse_args(argv)
    if a.eval_dir is None and (a.data / "eval").is_dir():
        a.eval_dir = a.data / "eval"
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.prepare:
        return prepare(a.prepare, a.bsds, a.eval_set, a.eval_cases, a.val_images)
    if a.unpack:
        print(unpack(a.unpack, a.to))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())

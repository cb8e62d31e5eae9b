"""A results folder: its settings record, its metrics log, one image's outputs and the summary.

The folder is checked (a writable folder, a metrics.csv with our header) before any model is loaded. Results
record the settings that made them (`config.yaml`, key `settings`): a rerun into the same folder resumes
only with the same settings; other settings are refused unless `--overwrite`, which first moves the old
record aside (`*.replaced-<time>`), so a record never describes results it did not make.
"""
from __future__ import annotations

import csv
import io
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from util.csvlog import append_csv_row, read_csv_rows
from util.errors import InputError, ProjectError
from util.outputs import (file_in_the_way, kernel_to_image, make_montage, save_gif, save_json,
                          save_npy, save_png, save_text)

FIELDS = ("name", "status", "message", "sigma", "sigma_source", "kernel_source", "psnr", "ssim", "psnr_aligned", "ssim_aligned",
          "shift_y", "shift_x", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error", "psnr_blurry", "ssim_blurry",
          "psnr_blurry_aligned", "ssim_blurry_aligned", "psnr_particles", "seconds", "nfe", "attempts",
          "reblur_rms_frame", "flag")
ADDED_FIELDS = ("kernel_source",)  # newer than some results folders: a folder whose log lacks them still resumes
MEAN_FIELDS = ("psnr", "ssim", "psnr_aligned", "ssim_aligned", "lpips", "kernel_mse", "kernel_mse_raw", "reblur_error",
               "psnr_blurry", "ssim_blurry", "psnr_blurry_aligned", "ssim_blurry_aligned", "seconds", "nfe")
RECORD_FILES = ("config.yaml", "metrics.csv", "summary.json")
OUTPUT_DIRS = ("images", "kernels", "montage", "npy", "progress")  # what write_image fills
LONGEST_SUFFIX = "_diffusion.png"  # the longest name write_image gives a result file: <name> + this
# keys recorded with the settings that a resume may change: on_divergence changes only what a failed image gets
# (retried on resume anyway; a fallback's row is flagged); precision changes the bits as --threads does, and the
# precision that ran is a run fact (run.RUN_FACTS), noted when a resume differs
NOT_SETTINGS = ("diffusion.on_divergence:", "diffusion.precision:")
POOR_FIT = 3.0  # a result whose re-blur misfits the observed frame by more than 3σ (RMS) does not explain it


def has_flag(row: dict, flag: str) -> bool:
    """Whether a metrics row's ';'-joined `flag` column holds `flag` (e.g. 'classical_fallback')."""
    return flag in str(row.get("flag") or "").split(";")


def quality_flags(row: dict, sigma: float) -> list:
    """Why a finished result may be worse than its input, so that it is never reported silently:
    'worse_than_blurry' (aligned PSNR below the blurry input's, when the sharp image is known; plain PSNR
    for images too small to align) and
    'poor_fit' (re-blur RMS on the observed frame above POOR_FIT·σ: the restoration does not explain y)."""
    flags = []
    pa, pb = row.get("psnr_aligned"), row.get("psnr_blurry_aligned")
    if pa is None or pb is None:  # too small for the aligned scores: the plain ones
        pa, pb = row.get("psnr"), row.get("psnr_blurry")
    if pa is not None and pb is not None and pa < pb:
        flags.append("worse_than_blurry")
    rms = row.get("reblur_rms_frame")
    if rms is not None and rms > POOR_FIT * sigma:
        flags.append("poor_fit")
    return flags


class OutputError(ProjectError, OSError):
    """The output folder cannot hold this run's results; the message names the folder or file."""


def _differences(old, new, prefix: str = "", defaults=None) -> list:
    """'key: old → new' for every leaf that differs between two nested dicts. A key the old record lacks is
    no difference when its new value is its `defaults` value: new options default to the older behaviour; a key
    the new record lacks (it no longer applies to that method) is none when its old value was the default."""
    if isinstance(old, dict) and isinstance(new, dict):
        out, defaults = [], defaults if isinstance(defaults, dict) else {}
        for k in sorted(set(old) | set(new), key=str):
            if k not in old and k in defaults and new[k] == defaults[k]:
                continue
            if k not in new and k in defaults and old[k] == defaults[k]:
                continue
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.", defaults.get(k))
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} → {new!r}"]


def diffusion_image_file(run: Path, name: str) -> Optional[Path]:
    """A results folder's image of `name` before any classical blend: images/NAME_diffusion.png when the run
    blended (`ResultsFolder.write_image`), else images/NAME.png; None when there is neither, or when the run's
    row says the image is its classical fallback (no diffusion image exists then)."""
    if has_flag(ResultsFolder(run).previous_rows().get(name, {}), "classical_fallback"):
        return None
    return next((f for f in (run / "images" / f"{name}_diffusion.png", run / "images" / f"{name}.png")
                 if f.is_file()), None)


_DERIVED = re.compile(r"^(.+)_(diffusion|p\d+)$")  # images/<name>_diffusion.png, images/<name>_p<j>.png


def check_output_names(root: Path, names: set) -> None:
    """Refuse inputs whose result files would overwrite another input's: 'X_diffusion' and 'X_p0' are names the
    runner gives X's diffusion image and particles (`ResultsFolder.write_image`)."""
    clash = sorted(n for n in names if (m := _DERIVED.match(n)) and m.group(1) in names)
    if clash:
        raise InputError(f"{root}: input name(s) {', '.join(clash[:5])} would overwrite the diffusion image or "
                         f"particles of {', '.join(_DERIVED.match(n).group(1) for n in clash[:5])} "
                         f"(<name>_diffusion.png, <name>_p<j>.png): rename them")


class ResultsFolder:
    """The output folder of one run (`--save_dir`)."""

    def __init__(self, path, fields=FIELDS, rank=None):
        self.path = Path(path)
        self.fields = tuple(fields)
        self.metrics = self.path / "metrics.csv"
        # a rank of a sharded run appends to its own log; rank 0 merges them into metrics.csv (diffusion_em/shard.py)
        self.log = self.metrics if rank is None else self.path / f"metrics.rank{rank}.csv"

    def rank_logs(self) -> list:
        return sorted(self.path.glob("metrics.rank*.csv"))

    def check(self) -> None:
        """Refuse a folder that cannot take our files: a file in the way, no write permission, a foreign
        metrics.csv. Creates the folder. Raises OutputError naming the problem."""
        p = self.path
        blocked = file_in_the_way(p)
        if blocked is not None:
            raise OutputError(f"{blocked}: is a file, not a folder; choose another --save_dir")
        try:
            p.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-"):
                pass
        except OSError as e:
            raise OutputError(f"{p}: cannot write results there ({e.strerror or e})") from None
        for name in RECORD_FILES:  # a folder (or a FIFO, a dangling link) where a record file goes: found now, not after loading
            q = p / name
            if (q.exists() or q.is_symlink()) and not q.is_file():
                raise OutputError(f"{q}: is not a regular file; move it away or choose another --save_dir")
        for name in OUTPUT_DIRS:
            q = p / name
            if (q.exists() or q.is_symlink()) and not q.is_dir():
                raise OutputError(f"{q}: is not a folder; move it away or choose another --save_dir")
        for log in [self.metrics, *self.rank_logs()]:  # a resume reads them: a log it cannot read is refused now
            try:
                read_csv_rows(log)
            except (UnicodeDecodeError, csv.Error) as e:
                raise OutputError(f"{log}: cannot be read as a metrics log ({e}); move it away or choose another "
                                  f"--save_dir") from None
        if self.metrics.is_file() and self.metrics.stat().st_size > 0:
            with open(self.metrics, newline="", errors="replace") as f:
                header = f.readline().strip().split(",")
            if tuple(header) == tuple(f for f in self.fields if f not in ADDED_FIELDS):
                self.fields = tuple(header)  # an older version's log: resume it in its own columns
            elif tuple(header) != self.fields:
                raise OutputError(f"{self.metrics}: holds another header ({','.join(header[:4])},...); it is not "
                                  f"this version's metrics log: move it away or choose another --save_dir")

    def recorded(self) -> Optional[dict]:
        """The whole config.yaml record, or None when there is none or it cannot be read."""
        try:
            data = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))  # save_text writes UTF-8
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def recorded_settings(self) -> Optional[dict]:
        cfg = self.path / "config.yaml"
        if not cfg.is_file():
            return None
        data = self.recorded()
        if data is None:
            return {"unreadable": str(cfg)}
        settings = data.get("settings")
        if isinstance(settings, dict):
            return settings
        # before 00e4b4e the record was {diffusion, kernel, model, args}, without `settings`
        return {"unrecorded": "older" if {"diffusion", "args"} <= set(data) else True}

    def claim(self, settings: dict, overwrite: bool, defaults: Optional[dict] = None, defer: bool = False) -> bool:
        """Make the folder's record describe `settings`: resume when they match; refuse when they do not,
        unless `overwrite`, which then starts the folder afresh: its earlier record and outputs are moved aside
        (`replace_old`), now or, with `defer`, by the caller once nothing can fail before the run writes (the
        runner: after the models load). Returns whether they are to be moved. With the same settings
        `overwrite` moves nothing: the images it redoes are rewritten in place. `defaults`: settings of this
        version's defaults, so a record made before an option existed still matches when the option is at its
        default."""
        old = self.recorded_settings()
        has_results = bool(self.previous_rows())  # metrics.csv, or the rank logs an interrupted sharded run left
        diff = [] if old is None else [d for d in _differences(old, settings, defaults=defaults)
                                       if not d.startswith(NOT_SETTINGS)]
        foreign = isinstance(old, dict) and set(old) & {"unreadable", "unrecorded"}  # a config.yaml not of ours
        if foreign and not overwrite:  # with or without results: write_config would replace the user's own file
            what = ("was written by an older version, without a settings record, so it cannot be resumed"
                    if old.get("unrecorded") == "older" else "is not this program's record (unreadable, or no 'settings')")
            raise OutputError(f"{self.path / 'config.yaml'}: {what}; move it away, --overwrite to set it aside, or "
                              f"choose another --save_dir")
        if diff and (has_results or (self.path / "summary.json").exists()) and not overwrite:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise OutputError(f"{self.path}: holds results made with other settings ({shown}); rerun with "
                              f"those settings to resume, --overwrite to replace them, or choose another --save_dir")
        replace = overwrite and bool(diff) and bool(self._earlier())  # same settings: redo in place
        if replace and not defer:
            self.replace_old()
        return replace

    def _earlier(self) -> list:
        """What an earlier run left here: record files, rank logs and output folders."""
        names = RECORD_FILES + OUTPUT_DIRS
        return [self.path / n for n in names if (self.path / n).exists()] + self.rank_logs()

    def replace_old(self) -> list:
        """Rename everything an earlier run left (`_earlier`) to `<name>.replaced-<UTC time>`: nothing is deleted,
        and no stale image of the earlier run sits beside this run's results. Returns the new paths."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        moved = []
        for f in self._earlier():
            moved.append(f.with_name(f"{f.name}.replaced-{stamp}"))
            os.replace(f, moved[-1])
        return moved

    def write_config(self, record: dict) -> None:
        save_text(self.path / "config.yaml", yaml.safe_dump(record, sort_keys=False, allow_unicode=True))

    def previous_rows(self) -> dict:
        """The last row per image name in metrics.csv and in the logs of a sharded run not yet merged."""
        rows = {}
        for log in [self.metrics, *self.rank_logs()]:
            for name, row in {r["name"]: r for r in read_csv_rows(log) if r.get("name")}.items():
                # across logs there is no order: a finished image stays finished (a stale failed row of an
                # interrupted sharded run must not hide the ok row written when it was redone)
                if name not in rows or row.get("status") == "ok" or rows[name].get("status") != "ok":
                    rows[name] = row
        return rows

    def append(self, row: dict) -> None:
        append_csv_row(self.log, self.fields, {k: v for k, v in row.items()
                                                 if k in self.fields or k not in ADDED_FIELDS})

    def merge_rank_logs(self, order: list) -> dict:
        """Rank 0 after the barrier: metrics.csv := the last row per image, `order` (input names) first;
        the rank logs are removed once it is written. Returns the rows by name."""
        rows = self.previous_rows()
        names = [n for n in order if n in rows] + [n for n in rows if n not in set(order)]
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=list(self.fields), restval="", extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for n in names:
            w.writerow(rows[n])
        save_text(self.metrics, text.getvalue())
        for log in self.rank_logs():
            log.unlink()
        return {n: rows[n] for n in names}

    def write_image(self, name: str, x_img: np.ndarray, particles: list, kernel: np.ndarray, y: np.ndarray,
                    x_true: Optional[np.ndarray], k_true: Optional[np.ndarray], save_npy_too: bool,
                    frames: list = (), kernel_frames: list = (), diffusion_only: Optional[np.ndarray] = None) -> None:
        """One image's outputs, each written atomically (`diffusion_only`: the image before a classical blend).
        Everything derived (montage, kernel images) is made before the first file is written: a failure there
        leaves no file of this image behind."""
        out = self.path
        montage = make_montage(np.clip(y, 0, 1), x_img, x_true, kernel, k_true)
        kernel_png = kernel_to_image(kernel)
        every = max(1, len(kernel_frames) // 20)  # every step's kernel is saved; the GIF shows ~20 of them
        kernel_gif = [kernel_to_image(k, 6) for k in kernel_frames[::every]]
        save_png(out / "images" / f"{name}.png", x_img)
        if diffusion_only is not None:
            save_png(out / "images" / f"{name}_diffusion.png", diffusion_only)
        if len(particles) > 1:
            for j, p in enumerate(particles):
                save_png(out / "images" / f"{name}_p{j}.png", p)
        if save_npy_too:
            save_npy(out / "npy" / f"{name}.npy", x_img)
        save_npy(out / "kernels" / f"{name}.npy", kernel.astype(np.float32))
        save_png(out / "kernels" / f"{name}.png", kernel_png)
        save_png(out / "montage" / f"{name}.png", montage)
        if frames:
            save_gif(out / "progress" / f"{name}_x0.gif", list(frames))
        if len(kernel_frames):
            save_npy(out / "progress" / f"{name}_kernels.npy", np.stack(kernel_frames).astype(np.float32))
            save_gif(out / "progress" / f"{name}_kernel.gif", kernel_gif)

    def write_summary(self, summary: dict) -> None:
        save_json(self.path / "summary.json", summary)


def summarise(rows: dict) -> dict:
    """Counts and means over the ok rows (one per image name); `classical_fallback` counts the ok rows whose image
    is the classical restoration (`on_divergence: classical`), included in the means."""
    ok = [r for r in rows.values() if r.get("status") == "ok"]
    means = {}
    for k in MEAN_FIELDS:
        vals = [float(r[k]) for r in ok if r.get(k) not in (None, "", "None")]
        means[k] = float(np.mean(vals)) if vals else None
    fallback = sum(has_flag(r, "classical_fallback") for r in ok)
    return {"images": len(rows), "ok": len(ok), "failed": len(rows) - len(ok), "classical_fallback": fallback,
            "means": means}

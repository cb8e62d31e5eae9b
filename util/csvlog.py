"""Append-only CSV logs that survive a crash and a rerun (metrics.csv of a run, the trainers' loss logs); UTF-8
whatever the locale."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from util.images import PathLike

def append_csv_row(path: PathLike, fieldnames: Sequence[str], row: dict) -> None:
    """Append one row to a CSV log, writing the header only when the file is new or empty.

    Safe to re-run: an existing file must have the same header (else ValueError, rather than mixing
    columns); a last line cut by a crash is terminated first so the new row starts on its own line.
    Keys missing from `row` are written empty; unknown keys are an error. Flushed and fsynced.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fieldnames = list(fieldnames)
    unknown = [k for k in row if k not in fieldnames]
    if unknown:
        raise ValueError(f"{p}: row has keys not in the header: {unknown}")
    new = not p.exists() or p.stat().st_size == 0
    if not new:
        with open(p, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None)
        if header != fieldnames:
            raise ValueError(f"{p}: existing header {header} differs from {fieldnames}; use another file")
        with open(p, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with open(p, "a", newline="", encoding="utf-8") as f:
        if not new and needs_newline:
            f.write("\n")
        w = csv.DictWriter(f, fieldnames=fieldnames, restval="", lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow({k: _csv_value(v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


def _csv_value(v):
    if isinstance(v, (np.generic, torch.Tensor)):
        v = v.item()
    if isinstance(v, str):
        return " ".join(v.splitlines())  # one line per row, even for multi-line error messages
    return v


DONE_STATUSES = ("ok", "done", "success")


def read_done_names(metrics_csv: PathLike, status_field: str = "status") -> set:
    """Names whose latest row in metrics_csv marks them finished (to skip them on a rerun).

    With a `status_field` column, a name is done when its last row's status is ok/done/success (failed
    images are retried); without that column every listed name is done. Missing file -> empty set.
    """
    p = Path(metrics_csv)
    if not p.is_file():
        return set()
    last: dict = {}
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            return set()
        has_status = status_field in reader.fieldnames
        for row in reader:
            name = (row.get("name") or "").strip()
            if name:
                last[name] = (row.get(status_field) or "").strip().lower() if has_status else "ok"
    return {n for n, s in last.items() if s in DONE_STATUSES}


def read_csv_rows(path: PathLike) -> list:
    """All rows of a CSV log as dicts (missing file: no rows)."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def truncate_csv(path: PathLike, keep) -> None:
    """Rewrite a CSV log atomically with only the rows where keep(row) holds (e.g. rows up to a resumed step)."""
    from util.outputs import atomic_write
    p = Path(path)
    if not p.is_file():
        return
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    kept = [r for r in rows if keep(r)]
    if len(kept) == len(rows) or fields is None:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    atomic_write(p, lambda f: f.write(buf.getvalue().encode()))

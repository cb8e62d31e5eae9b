"""Checkpoint files: the one safe loader (weights_only), the one atomic saver and the strict state_dict check,
shared by the UNet, the kernel denoiser and both trainers. Every failure is a one-line CheckpointError."""
from __future__ import annotations

import os
import pickle
import re
from typing import Sequence

import torch

from util.errors import ProjectError
from util.outputs import atomic_write


class CheckpointError(ProjectError, ValueError):
    """A checkpoint file is missing, unreadable, refused, or does not fit the architecture."""


def save_checkpoint(obj, path) -> None:
    """torch.save through the atomic writer (temp file, fsync, rename): a killed job never leaves half a file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _reason(e: Exception) -> str:
    """One line for a failed torch.load; never torch's advice to retry with weights_only=False."""
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        return (f"refused: it holds Python objects ({m.group(1) if m else 'non-tensor content'}), not only "
                f"tensors; only weights are loaded from files")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:200]}"


def load_checkpoint(path, what: str = "checkpoint", keys: Sequence[str] = ()) -> dict:
    """A dict from a torch file read with weights_only=True; `keys` must be present."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any failure here means "not a loadable checkpoint"
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (top-level object is {type(obj).__name__}, expected a dict)")
    for key in keys:
        if key not in obj:
            raise CheckpointError(f"{path}: not a {what} (no '{key}')")
    return obj


def check_state_dict(model: torch.nn.Module, sd: dict, source: str = "checkpoint") -> None:
    """Strict name-and-shape check; raise naming the first mismatching tensors."""
    own = model.state_dict()
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: entry '{bad[0]}' is not a tensor")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shape (first: {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(f"{source}: architecture mismatch: " + "; ".join(problems))


def load_state_dict_strict(model: torch.nn.Module, sd: dict, source: str = "checkpoint") -> torch.nn.Module:
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, strict=True)
    return model

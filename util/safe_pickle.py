"""The authors' test-set pickles, read with a restricted unpickler: never `pickle.load`.

Only the three globals those files use are admitted (tensor rebuilding from bytes, OrderedDict); anything
else is refused with one line naming the file and the refused global.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
from pathlib import Path

import numpy as np
import torch

from util.images import ImageReadError, PathLike, array_to_unit_range, fail
from util.noise import SIGMA_UNITS, sigma_in_range

PICKLE_EXT = ".pickle"


def _safe_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """torch._utils._rebuild_tensor_v2, admitted only with plain arguments (no hooks, no metadata)."""
    if not isinstance(storage, (torch.UntypedStorage, torch.TypedStorage)):
        raise pickle.UnpicklingError(f"tensor rebuild got a {type(storage).__name__} instead of a storage")
    if backward_hooks:
        raise pickle.UnpicklingError("tensor rebuild with backward hooks refused")
    if metadata:
        raise pickle.UnpicklingError("tensor rebuild with metadata refused")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, bool(requires_grad),
                                           collections.OrderedDict())


def _claimed_storage_elements(b: bytes) -> int:
    """The largest element count the storages of a torch.save stream claim, read without loading it.

    A zip stream holds its data as archive members (sizes bounded by the stream); a legacy stream (what
    pickled tensors embed) is five pickles, the fourth naming each storage with its element count, which
    torch allocates before reading the data. Integers in that pickle bound every claimed count.
    """
    if b[:4] == b"PK\x03\x04":
        return 0
    f = io.BytesIO(b)
    try:
        for _ in range(3):  # magic number, protocol version, system info
            for _op in pickletools.genops(f):
                pass
        ints = [arg for op, arg, _pos in pickletools.genops(f) if isinstance(arg, int) and not isinstance(arg, bool)]
    except Exception:  # noqa: BLE001 — not a stream we can scan: torch.load will refuse it
        return 0
    return max(ints, default=0)


def _safe_load_from_bytes(b):
    """torch.storage._load_from_bytes, but its inner torch.save stream is read with weights_only=True, after
    checking that the storage it claims fits in the bytes given (a few KB must not allocate many GB)."""
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"storage payload must be bytes, got {type(b).__name__}")
    claimed = _claimed_storage_elements(bytes(b))
    if claimed > len(b):  # every element takes at least one byte of the stream
        raise pickle.UnpicklingError(f"embedded tensor stream claims {claimed:,} elements but holds only "
                                     f"{len(b):,} bytes (refused before allocating)")
    try:
        return torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, the opposite of what to do with untrusted data
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"refused global '{m.group(1)}'" if m else "non-tensor content"
        raise pickle.UnpicklingError(f"embedded tensor stream: {what} (only tensor data is allowed)") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits exactly the three globals of the authors' test-set pickles (docs/algorithm.md §3); refuses the rest."""

    _ALLOWED: dict = {
        ("torch._utils", "_rebuild_tensor_v2"): _safe_rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _safe_load_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module, name):
        fn = self._ALLOWED.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}' (only tensor rebuilding is allowed)")
        return fn

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id (not a plain pickle of tensors)")


def load_pickle_sample(path: PathLike, need_sigma: bool = True) -> dict:
    """Load one of the authors' samples with the restricted unpickler: never plain pickle.load.

    Returns dict(H=sharp 1×3×H×W float32 tensor, L=blurry (unclipped) tensor of the same shape,
    kernel=1×1×s×s float32 tensor exactly as stored (NOT normalised; sums are 1.02–1.12 in the authors'
    files; util.inputs.load_sample checks it as a kernel file is), sigma=float). H and L follow the rule of
    .npy images (uint8 /255, uint16 /65535, floats outside [-1, 2] refused: 0..255 data); σ that of meta.csv
    (one number in [0, 1); with `need_sigma=False` an invalid one is None). Refused globals, a wrong structure, missing keys or such values raise ImageReadError.
    """
    p = Path(path)
    if not p.is_file():
        raise fail(p, "no such file")
    if p.stat().st_size == 0:
        raise fail(p, "empty file (0 bytes)")
    try:
        with open(p, "rb") as f:
            obj = _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:  # torch's messages span many lines: keep the first
        raise fail(p, f"unsafe or invalid pickle: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    except Exception as e:  # truncated stream, bad opcodes, failing inner torch.load...
        raise fail(p, f"unreadable pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise fail(p, f"expected a dict, got {type(obj).__name__}")
    missing = [k for k in ("H", "L", "kernel", "sigma") if k not in obj]
    if missing:
        raise fail(p, f"missing key(s) {missing}")
    out = {}
    for k in ("H", "L", "kernel"):
        out[k] = _tensor(obj[k], k, p)
    if out["H"].ndim != 4 or out["H"].shape[:2] != (1, 3) or out["L"].shape != out["H"].shape:
        raise fail(p, f"expected H and L of shape 1×3×H×W, got {tuple(out['H'].shape)} and {tuple(out['L'].shape)}")
    if out["kernel"].ndim != 4 or out["kernel"].shape[:2] != (1, 1):
        raise fail(p, f"expected a 1×1×s×s kernel, got {tuple(out['kernel'].shape)}")
    for k in ("L", "H"):  # the rule of .npy images: uint8 /255, uint16 /65535, floats refused outside [-1, 2]
        out[k] = torch.from_numpy(array_to_unit_range(out[k].numpy(), p, f"'{k}': "))
    out["kernel"] = out["kernel"].to(torch.float32)
    try:
        out["sigma"] = _sigma(obj["sigma"], p)
    except ImageReadError:
        if need_sigma:
            raise
        out["sigma"] = None  # not needed: meta.csv or --sigma gives it (and may correct a σ stored in /255)
    return out


def _tensor(v, key: str, p: Path) -> torch.Tensor:
    """One of the pickle's arrays as a CPU tensor: floats as float32, integer and bool types kept (uint8 is 8-bit
    data, as in an .npy image)."""
    if isinstance(v, np.ndarray):
        try:
            v = torch.from_numpy(v)
        except TypeError:
            raise fail(p, f"'{key}' has unsupported dtype {v.dtype}") from None
    if not isinstance(v, torch.Tensor):
        raise fail(p, f"'{key}' is a {type(v).__name__}, expected a tensor")
    v = v.detach().cpu()
    if v.is_complex() or not (v.is_floating_point() or v.dtype in _INTEGER_TYPES):
        raise fail(p, f"'{key}' has unsupported dtype {v.dtype}")
    if v.numel() == 0:
        raise fail(p, f"'{key}' is empty (shape {tuple(v.shape)})")
    if v.is_floating_point():
        v = v.to(torch.float32)
        if not torch.isfinite(v).all():
            raise fail(p, f"'{key}' contains NaN or inf")
    return v


_INTEGER_TYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + \
    ((torch.uint16,) if hasattr(torch, "uint16") else ())


def _sigma(v, p: Path) -> float:
    """The pickle's σ: one number (a float, an int, or a one-element tensor) in [0, 1), the rule of meta.csv and
    --sigma; anything else is an ImageReadError naming the file."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        if (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
            raise fail(p, f"'sigma' is an array of {np.prod(v.shape, dtype=np.int64)} values (shape {tuple(v.shape)}), "
                          f"expected one number")
        v = v.item()  # a bool or complex tensor gives a bool or complex: refused below
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        shown = "None" if v is None else f"a {type(v).__name__}" + (f" ({v[:20]!r})" if isinstance(v, str) else "")
        raise fail(p, f"'sigma' is {shown}, expected a number in [0, 1) ({SIGMA_UNITS})")
    s = float(v)
    if not sigma_in_range(s):
        raise fail(p, f"sigma {s:g} outside [0, 1) ({SIGMA_UNITS})")
    return s

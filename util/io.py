"""Input/output for the deblurring scripts: images, kernels, the authors' pickles, input discovery,
blind noise estimation, atomic writers, montages, and padding (DESIGN §2–§4).

Conventions chosen here:
- Images in memory are numpy float32 H×W×3 in [0, 1] (RGB). Grey inputs are repeated to 3 channels,
  alpha is dropped (not composited), palette / CMYK / other modes are converted to RGB.
  8-bit files are divided by 255, 16-bit ones by 65535. `.npy` observations keep their values unclipped
  unless `clip=True` (the noise of a blurry observation is part of the data).
- Kernels are float32 2-D arrays normalised to sum 1.
- Every failure to read an input raises ImageReadError (a ValueError) with one line naming the file.
- Every writer writes a temp file in the destination folder and then os.replace()s it, so an
  interrupted run never leaves a half-written output under the final name.
This module imports nothing of the project (layout rule: util/ is the bottom layer).
"""
from __future__ import annotations

import collections
import csv
import io
import json
import math
import os
import pickle
import re
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy")
PICKLE_EXT = ".pickle"


class ImageReadError(ValueError):
    """An input file (image, kernel, pickle, meta.csv) could not be read or is invalid."""


# ============================================================================================== images
def _fail(path: PathLike, problem: str) -> ImageReadError:
    return ImageReadError(f"{path}: {problem}")


def _to_rgb3(a: np.ndarray, path: PathLike) -> np.ndarray:
    """H×W, H×W×1, H×W×2 (grey+alpha), H×W×3, H×W×4 (RGBA) -> H×W×3; other shapes are an error."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise _fail(path, f"expected an H×W or H×W×C image, got shape {a.shape}")
    c = a.shape[2]
    if c in (1, 2):  # grey (+ alpha)
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif c in (3, 4):  # RGB (+ alpha)
        a = a[:, :, :3]
    else:
        raise _fail(path, f"expected 1, 2, 3 or 4 channels, got {c}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise _fail(path, f"image has zero size {a.shape[:2]}")
    return a


def _read_npy_array(path: Path) -> np.ndarray:
    try:
        # allow_pickle=False: an .npy holding Python objects is refused, never unpickled
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise _fail(path, f"unreadable .npy ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(a, np.ndarray):
        raise _fail(path, "not a single array (.npz archives are not supported)")
    if a.dtype.kind not in "fiu" and a.dtype != np.bool_:
        raise _fail(path, f"unsupported dtype {a.dtype}")
    if a.size == 0:
        raise _fail(path, f"empty array of shape {a.shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise _fail(path, "contains NaN or inf")
    return a


def _png_16bit_colour(path: Path) -> Optional[np.ndarray]:
    """Decode a 16-bit colour PNG (Pillow would truncate it to 8 bits); None if the file is not one.

    Pillow has no 16-bit RGB mode, so we inflate IDAT and undo the PNG row filters ourselves. The
    filters are sequential along a row and down the columns; we process anti-diagonals (all pixels
    with i + j = d at once), which respects every dependency and keeps the loop at H + W steps.
    """
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    pos, ihdr, idat = 8, None, []
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if ctype == b"IHDR":
            ihdr = body
        elif ctype == b"IDAT":
            idat.append(body)
        elif ctype == b"IEND":
            break
        pos += 12 + n
    if ihdr is None or len(ihdr) < 13:
        raise _fail(path, "corrupt PNG (no IHDR chunk)")
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    if depth != 16 or colour not in (2, 6):  # only RGB / RGBA at 16 bits need this path
        return None
    if interlace:
        raise _fail(path, "interlaced 16-bit colour PNG is not supported; save it non-interlaced or as .npy")
    bpp = 6 if colour == 2 else 8
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise _fail(path, f"corrupt PNG data ({e})") from None
    if raw.size != h * (1 + w * bpp):
        raise _fail(path, f"corrupt PNG: {raw.size} data bytes for a {w}×{h} image")
    rows = raw.reshape(h, 1 + w * bpp)
    ftype = rows[:, 0].astype(np.int64)
    if ftype.max(initial=0) > 4:
        raise _fail(path, "corrupt PNG: unknown row filter")
    filt = rows[:, 1:].reshape(h, w, bpp).astype(np.int64)
    rec = np.zeros((h + 1, w + 1, bpp), dtype=np.int64)  # one zero row/column for the borders
    for d in range(h + w - 1):
        i = np.arange(max(0, d - w + 1), min(h, d + 1))
        j = d - i
        f, ft = filt[i, j], ftype[i][:, None]
        a, b, c = rec[i + 1, j], rec[i, j + 1], rec[i, j]  # left, up, up-left
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = np.select([ft == 0, ft == 1, ft == 2, ft == 3], [0, a, b, (a + b) // 2], paeth)
        rec[i + 1, j + 1] = (f + pred) % 256
    px = rec[1:, 1:].astype(np.uint16)
    return ((px[..., 0::2] << 8) | px[..., 1::2]).astype(np.float32) / 65535.0


def _raw_16bit_tiles(path: Path, size: tuple, tiles: list) -> np.ndarray:
    """Read an uncompressed 16-bit colour image (e.g. TIFF) from Pillow's tile list without losing bits.

    Compressed 16-bit colour TIFFs are refused with a clear message rather than silently truncated.
    """
    w, h = size
    out = None
    data = path.read_bytes()
    for codec, extents, offset, args in tiles:
        rawmode = args if isinstance(args, str) else args[0]
        stride = 0 if isinstance(args, str) or len(args) < 2 else args[1]
        orient = 1 if isinstance(args, str) or len(args) < 3 else args[2]
        if codec != "raw" or rawmode not in ("RGB;16L", "RGB;16B", "RGBA;16L", "RGBA;16B") or orient != 1:
            raise _fail(path, f"16-bit colour image with {codec} coding ({rawmode}) cannot be read without loss; "
                              f"save it as an uncompressed TIFF, a 16-bit PNG or .npy")
        c = 4 if rawmode.startswith("RGBA") else 3
        x0, y0, x1, y1 = extents
        tw, th = x1 - x0, y1 - y0
        row = stride or tw * c * 2
        need = offset + (th - 1) * row + tw * c * 2
        if need > len(data):
            raise _fail(path, "truncated image data")
        dt = np.dtype("<u2" if rawmode.endswith("L") else ">u2")
        buf = np.frombuffer(data, np.uint8, count=need - offset, offset=offset)
        rows = np.stack([buf[i * row:i * row + tw * c * 2] for i in range(th)])  # drop row padding
        tile = rows.view(dt).reshape(th, tw, c)
        if out is None:
            out = np.zeros((h, w, c), np.float32)
        out[y0:y1, x0:x1] = tile[..., :c].astype(np.float32) / 65535.0
    return out


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            # the decoder's raw mode tells the true bit depth; load() empties im.tile, so read it first.
            # tile = (codec, extents, offset, args), a plain tuple in Pillow 10
            tiles = list(im.tile)
            args = tiles[0][3] if tiles else None
            rawmode = args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)
            if isinstance(rawmode, str) and ";16" in rawmode and im.mode in ("RGB", "RGBA"):
                # Pillow would truncate 16-bit colour to 8 bits: read uncompressed strips ourselves
                return _raw_16bit_tiles(path, im.size, tiles)
            im.load()
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: use the image as viewers show it
                im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grey
                a = np.asarray(im).astype(np.float32) / 65535.0
            elif mode == "I":  # 32-bit int: Pillow uses it for 16-bit grey PNG/TIFF too
                a = np.asarray(im).astype(np.float64)
                scale = 65535.0 if a.max(initial=0) <= 65535 else 4294967295.0
                a = (a / scale).astype(np.float32)
            elif mode == "F":
                a = np.asarray(im).astype(np.float32)
            elif mode == "1":
                a = np.asarray(im).astype(np.float32)
            else:
                if mode not in ("RGB", "RGBA", "L", "LA"):
                    im = im.convert("RGBA" if "A" in mode or "transparency" in im.info else "RGB")
                a = np.asarray(im).astype(np.float32) / 255.0
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 — any decoder failure (incl. decompression bombs) is this file's fault
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, f"unreadable or corrupt image ({msg})") from None
    if not np.all(np.isfinite(a)):
        raise _fail(path, "contains NaN or inf")
    return a


def read_image(path: PathLike, clip: bool = False) -> np.ndarray:
    """Read an image as float32 H×W×3 RGB in [0, 1].

    png/jpg/jpeg/tif/tiff/bmp through Pillow (8-bit /255, 16-bit /65535; grey -> 3 channels; alpha
    dropped; palette converted; EXIF orientation applied; float TIFF kept as is); 16-bit colour PNG
    and uncompressed 16-bit colour TIFF through our own readers (Pillow truncates them to 8 bits).
    `.npy`: float (kept as is, so an unclipped observation stays exact) or integer (uint8 /255,
    uint16 /65535); H×W, H×W×1 or H×W×3. `clip=True` clips to [0, 1].
    Raises ImageReadError naming the file on a missing, empty, corrupt or invalid file.
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(p, "no such file" if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise _fail(p, "empty file (0 bytes)")
    ext = p.suffix.lower()
    if ext == ".npy":
        a = _read_npy_array(p)
        if a.dtype == np.uint8:
            a = a.astype(np.float32) / 255.0
        elif a.dtype == np.uint16:
            a = a.astype(np.float32) / 65535.0
        else:
            a = a.astype(np.float32)
        if a.ndim == 3 and a.shape[2] not in (1, 3):  # no alpha in .npy: 4 channels is more likely a layout error
            raise _fail(p, f"expected an H×W, H×W×1 or H×W×3 array, got shape {a.shape} (channels last)")
        a = _to_rgb3(a, p)
    elif ext in IMAGE_EXTS:
        a = _png_16bit_colour(p) if ext == ".png" else None
        if a is None:
            a = _read_pil(p)
        a = _to_rgb3(a, p)
    else:
        raise _fail(p, f"unsupported extension '{p.suffix}' (expected one of {', '.join(IMAGE_EXTS)})")
    if clip:
        a = np.clip(a, 0.0, 1.0)
    return np.ascontiguousarray(a, dtype=np.float32)


def read_kernel(path: PathLike) -> np.ndarray:
    """Read a blur kernel from .npy (any size; 1×1×s×s accepted) as float32 2-D normalised to sum 1.

    Errors (ImageReadError naming the file): unreadable, not 2-D, NaN/inf, sum <= 0.
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(p, "no such file")
    if p.suffix.lower() != ".npy":
        raise _fail(p, f"kernels must be .npy files, got '{p.suffix}'")
    k = _read_npy_array(p).astype(np.float64)
    while k.ndim > 2 and k.shape[0] == 1:  # drop leading batch/channel axes of size 1
        k = k[0]
    if k.ndim != 2:
        raise _fail(p, f"kernel must be 2-D, got shape {k.shape}")
    s = k.sum()
    if not s > 0:
        raise _fail(p, f"kernel sum is {s:.4g}; cannot normalise a kernel whose sum is not positive")
    return (k / s).astype(np.float32)


# ======================================================================================= authors' pickles
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


def _safe_load_from_bytes(b):
    """torch.storage._load_from_bytes, but its inner torch.save stream is read with weights_only=True."""
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"storage payload must be bytes, got {type(b).__name__}")
    try:
        return torch.load(io.BytesIO(bytes(b)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        # torch's message advises weights_only=False, the opposite of what to do with untrusted data
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"refused global '{m.group(1)}'" if m else "non-tensor content"
        raise pickle.UnpicklingError(f"embedded tensor stream: {what} (only tensor data is allowed)") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits exactly the three globals of the authors' test-set pickles (DESIGN §3); refuses the rest."""

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


def load_pickle_sample(path: PathLike) -> dict:
    """Load one of the authors' samples with the restricted unpickler: never plain pickle.load.

    Returns dict(H=sharp 1×3×H×W float32 tensor, L=blurry (unclipped) tensor of the same shape,
    kernel=1×1×s×s tensor exactly as stored (NOT normalised; sums are 1.02–1.12 in the authors'
    files), sigma=float). Refused globals, a wrong structure or missing keys raise ImageReadError.
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(p, "no such file")
    if p.stat().st_size == 0:
        raise _fail(p, "empty file (0 bytes)")
    try:
        with open(p, "rb") as f:
            obj = _RestrictedUnpickler(f).load()
    except pickle.UnpicklingError as e:  # torch's messages span many lines: keep the first
        raise _fail(p, f"unsafe or invalid pickle: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
    except Exception as e:  # truncated stream, bad opcodes, failing inner torch.load...
        raise _fail(p, f"unreadable pickle ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict):
        raise _fail(p, f"expected a dict, got {type(obj).__name__}")
    missing = [k for k in ("H", "L", "kernel", "sigma") if k not in obj]
    if missing:
        raise _fail(p, f"missing key(s) {missing}")
    out = {}
    for k in ("H", "L", "kernel"):
        v = obj[k]
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
        if not isinstance(v, torch.Tensor):
            raise _fail(p, f"'{k}' is a {type(v).__name__}, expected a tensor")
        v = v.detach().to(torch.float32)
        if not torch.isfinite(v).all():
            raise _fail(p, f"'{k}' contains NaN or inf")
        out[k] = v
    if out["H"].ndim != 4 or out["H"].shape[:2] != (1, 3) or out["L"].shape != out["H"].shape:
        raise _fail(p, f"expected H and L of shape 1×3×H×W, got {tuple(out['H'].shape)} and {tuple(out['L'].shape)}")
    if out["kernel"].ndim != 4 or out["kernel"].shape[:2] != (1, 1):
        raise _fail(p, f"expected a 1×1×s×s kernel, got {tuple(out['kernel'].shape)}")
    sigma = obj["sigma"]
    sigma = float(sigma.item() if isinstance(sigma, (torch.Tensor, np.ndarray)) else sigma)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise _fail(p, f"invalid sigma {sigma}")
    out["sigma"] = sigma
    return out


# ============================================================================================ discovery
@dataclass(frozen=True)
class Sample:
    """One input to deblur. For kind='pickle', `blurry` is the pickle file (it holds everything)."""
    name: str
    blurry: Path
    sharp: Optional[Path] = None
    kernel: Optional[Path] = None
    sigma: Optional[float] = None
    kind: str = "folder"  # 'folder' | 'photo' | 'pickle'
    boundary: Optional[str] = None  # how the blur was made, from meta.csv: 'circular' | 'valid' | None (undeclared)


@dataclass(frozen=True)
class LoadedSample:
    """A sample read into memory: y unclipped H×W×3, x_true clipped H×W×3, k_true normalised."""
    name: str
    y: np.ndarray
    x_true: Optional[np.ndarray] = None
    k_true: Optional[np.ndarray] = None
    sigma: Optional[float] = None


def _visible_files(d: Path) -> list:
    return sorted((f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")), key=lambda f: f.name)


def _by_stem(files: Iterable[Path], exts: Sequence[str], where: Path) -> dict:
    out: dict = {}
    for f in files:
        if f.suffix.lower() in exts:
            if f.stem in out:
                raise ValueError(f"{where}: two inputs share the name '{f.stem}' ({out[f.stem].name}, {f.name})")
            out[f.stem] = f
    return out


def read_meta_csv(path: PathLike) -> dict:
    """meta.csv with columns name,sigma (σ in [0, 1] units) -> {name: sigma}. Errors name file and line."""
    p = Path(path)
    try:
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"name", "sigma"} <= set(reader.fieldnames):
                raise _fail(p, f"expected a header 'name,sigma', got {reader.fieldnames}")
            out = {}
            for row in reader:
                line = reader.line_num
                name = (row.get("name") or "").strip()
                if not name:
                    raise _fail(p, f"line {line}: empty name")
                try:
                    s = float(row["sigma"])
                except (TypeError, ValueError):
                    raise _fail(p, f"line {line}: sigma '{row.get('sigma')}' is not a number") from None
                if not (math.isfinite(s) and 0 <= s < 1):
                    raise _fail(p, f"line {line}: sigma {s} outside [0, 1) (σ is in [0, 1] units, e.g. 10/255)")
                out[name] = s
            return out
    except UnicodeDecodeError:
        raise _fail(p, "not a text CSV file") from None


META_BOUNDARIES = ("circular", "valid")


def read_meta_boundaries(path: PathLike) -> dict:
    """The optional `boundary` column of meta.csv -> {name: 'circular' | 'valid'} (empty cells omitted)."""
    p = Path(path)
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        if "boundary" not in (reader.fieldnames or []):
            return {}
        out = {}
        for row in reader:
            b = (row.get("boundary") or "").strip().lower()
            if b and b not in META_BOUNDARIES:
                raise _fail(p, f"line {reader.line_num}: boundary '{b}' is not one of {', '.join(META_BOUNDARIES)}")
            if b:
                out[(row.get("name") or "").strip()] = b
        return out


def list_inputs(input_dir: PathLike) -> list:
    """Discover the inputs of a run, sorted by name (DESIGN §4).

    - `<dir>/blurry/` exists: test-set folder; sharp/<name>.* and kernel/<name>.npy are attached when
      present, σ from meta.csv when listed.
    - otherwise `*.pickle` files: the authors' format (kind 'pickle'); image files beside them are photos.
    - otherwise image files: real photos (kind 'photo'), σ from meta.csv when present, else None
      (the caller estimates it).
    - a single image or pickle file is accepted as a one-sample input.
    Files are only located here, not read: a broken file fails later, in load_sample, alone.
    """
    root = Path(input_dir)
    if root.is_file():
        ext = root.suffix.lower()
        if ext == PICKLE_EXT:
            return [Sample(root.stem, root, kind="pickle")]
        if ext in IMAGE_EXTS:
            return [Sample(root.stem, root, kind="photo")]
        raise ValueError(f"{root}: not an image or .pickle file")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: input folder does not exist")
    meta_path = root / "meta.csv"
    meta = read_meta_csv(meta_path) if meta_path.is_file() else {}
    bnd = read_meta_boundaries(meta_path) if meta_path.is_file() else {}

    if (root / "blurry").is_dir():
        blurry = _by_stem(_visible_files(root / "blurry"), IMAGE_EXTS, root / "blurry")
        sharp = _by_stem(_visible_files(root / "sharp"), IMAGE_EXTS, root / "sharp") if (root / "sharp").is_dir() else {}
        kern = _by_stem(_visible_files(root / "kernel"), (".npy",), root / "kernel") if (root / "kernel").is_dir() else {}
        samples = [Sample(n, f, sharp.get(n), kern.get(n), meta.get(n), "folder", bnd.get(n)) for n, f in blurry.items()]
    else:
        files = _visible_files(root)
        pickles = _by_stem(files, (PICKLE_EXT,), root)
        photos = _by_stem(files, IMAGE_EXTS, root)
        clash = sorted(set(pickles) & set(photos))
        if clash:
            raise ValueError(f"{root}: names used by both a pickle and an image: {clash}")
        samples = [Sample(n, f, sigma=meta.get(n), kind="pickle") for n, f in pickles.items()]
        samples += [Sample(n, f, sigma=meta.get(n), kind="photo", boundary=bnd.get(n)) for n, f in photos.items()]
    if not samples:
        raise ValueError(f"{root}: no inputs found (expected blurry/<name>.{{png,jpg,tif,npy}}, "
                         f"image files, or *.pickle)")
    return sorted(samples, key=lambda s: s.name)


def load_sample(sample: Sample) -> LoadedSample:
    """Read one sample's files. Raises ImageReadError naming the faulty file; touches no other sample."""
    if sample.kind == "pickle":
        d = load_pickle_sample(sample.blurry)
        y = d["L"][0].permute(1, 2, 0).numpy().copy()
        x = d["H"][0].permute(1, 2, 0).clamp(0, 1).numpy().copy()
        k = d["kernel"][0, 0].double()
        if not k.sum() > 0:
            raise _fail(sample.blurry, "kernel sum is not positive")
        k = (k / k.sum()).float().numpy()
        # a σ from meta.csv overrides the pickle's own (lets a user correct it)
        sigma = sample.sigma if sample.sigma is not None else d["sigma"]
        return LoadedSample(sample.name, y, x, k, sigma)
    y = read_image(sample.blurry, clip=False)
    x = None
    if sample.sharp is not None:
        x = read_image(sample.sharp, clip=True)
        if x.shape != y.shape:
            raise _fail(sample.sharp, f"sharp image is {x.shape[:2]} but the blurry one is {y.shape[:2]}")
    k = read_kernel(sample.kernel) if sample.kernel is not None else None
    if k is not None and (k.shape[0] > y.shape[0] or k.shape[1] > y.shape[1]):
        raise _fail(sample.kernel, f"kernel {k.shape} is larger than the image {y.shape[:2]}")
    return LoadedSample(sample.name, y, x, k, sample.sigma)


# ======================================================================================== noise level
MAD_TO_STD = 0.6745  # median(|N(0,1)|)


def estimate_noise_sigma(y: Union[np.ndarray, torch.Tensor]) -> float:
    """Blind estimate of the white Gaussian noise std of an image, in the image's units ([0, 1]).

    Donoho's robust estimator: median(|HH|) / 0.6745 over the finest diagonal Haar wavelet coefficients
    HH = (a − b − c + d) / 2 of each 2×2 block (orthonormal, so pure noise of std σ gives std σ), one
    estimate per channel, averaged. HH of a smooth (e.g. blurred) image is nearly zero, so the median
    sees mostly noise; texture biases the estimate up. Accepts numpy H×W×C / H×W or torch (C,H,W)/(1,C,H,W).
    """
    if isinstance(y, torch.Tensor):
        t = y.detach().to("cpu", torch.float64)
        while t.ndim > 3 and t.shape[0] == 1:
            t = t[0]
        a = t.numpy().transpose(1, 2, 0) if t.ndim == 3 else t.numpy()
    else:
        a = np.asarray(y, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] < 2 or a.shape[1] < 2:
        raise ValueError(f"estimate_noise_sigma needs an image of at least 2×2 pixels, got shape {a.shape}")
    h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
    a = a[:h, :w]
    hh = (a[0::2, 0::2] - a[0::2, 1::2] - a[1::2, 0::2] + a[1::2, 1::2]) / 2.0
    per_channel = np.median(np.abs(hh).reshape(-1, a.shape[2]), axis=0) / MAD_TO_STD
    return float(per_channel.mean())


def resolve_sigma(sample: LoadedSample, override: Optional[float] = None) -> tuple:
    """σ to use for a sample and where it came from: ('override' | 'given' | 'estimated').

    Order: an explicit override (e.g. --sigma), then σ from meta.csv / the pickle, else the blind
    estimate of `estimate_noise_sigma` on the observation (report it: it is a guess).
    """
    if override is not None:
        if not (math.isfinite(override) and 0 <= override < 1):
            raise ValueError(f"sigma override {override} outside [0, 1) (σ is in [0, 1] units, e.g. 10/255)")
        return float(override), "override"
    if sample.sigma is not None:
        return float(sample.sigma), "given"
    return estimate_noise_sigma(sample.y), "estimated"


# ====================================================================================== atomic writers
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once at import: toggling the umask later would race with other threads creating files
_FILE_MODE = 0o666 & ~_current_umask()


def _atomic_write(path: PathLike, write: Callable) -> Path:
    """Call write(fileobj) on a temp file in the destination folder, fsync, then rename over `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp creates 0600; give outputs the usual permissions
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def to_hwc(img: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """numpy H×W(×C) or torch (C,H,W)/(1,C,H,W) -> float numpy H×W×C (no clipping)."""
    if isinstance(img, torch.Tensor):
        t = img.detach().to("cpu", torch.float32)
        while t.ndim > 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        a = t.numpy()
    else:
        a = np.asarray(img, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image H×W×C (C in 1,3,4) or tensor (C,H,W), got shape {a.shape}")
    return a


def to_uint8(img: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
    """[0, 1] float image -> uint8 H×W×C, clipped and rounded; NaN becomes 0."""
    a = np.nan_to_num(to_hwc(img), nan=0.0)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: PathLike, img: Union[np.ndarray, torch.Tensor]) -> Path:
    """8-bit PNG of an image in [0, 1] (clipped), written atomically."""
    a = to_uint8(img)
    pil = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
    return _atomic_write(path, lambda f: pil.save(f, format="PNG"))


def save_npy(path: PathLike, arr: Union[np.ndarray, torch.Tensor]) -> Path:
    """.npy of an array (tensors go to CPU numpy), written atomically."""
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    return _atomic_write(path, lambda f: np.save(f, a, allow_pickle=False))


def save_text(path: PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return _atomic_write(path, lambda f: f.write(data))


def _json_clean(obj):
    """numpy/torch scalars and arrays to Python; non-finite floats to None (strict JSON has no inf/NaN)."""
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_json(path: PathLike, obj) -> Path:
    """Strict JSON (indent 2, keys in given order); inf/NaN are written as null."""
    return save_text(path, json.dumps(_json_clean(obj), indent=2, allow_nan=False) + "\n")


def kernel_to_image(k: Union[np.ndarray, torch.Tensor], scale: int = 8) -> np.ndarray:
    """Kernel -> float H×W in [0, 1]: divided by its max (negative taps shown as 0), nearest-magnified."""
    a = k.detach().cpu().numpy() if isinstance(k, torch.Tensor) else np.asarray(k)
    a = a.astype(np.float64)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D kernel, got shape {a.shape}")
    a = np.nan_to_num(a, nan=0.0)
    m = a.max(initial=0.0)
    a = np.clip(a / m, 0, 1) if m > 0 else np.zeros_like(a)
    scale = max(1, int(scale))
    return np.repeat(np.repeat(a, scale, axis=0), scale, axis=1).astype(np.float32)


def save_kernel_png(path: PathLike, k: Union[np.ndarray, torch.Tensor], scale: int = 8) -> Path:
    """Grey PNG of a kernel normalised by its max and magnified `scale`× (nearest), written atomically."""
    return save_png(path, kernel_to_image(k, scale))


def save_gif(path: PathLike, frames: Sequence, duration_ms: int = 100, loop: int = 0) -> Path:
    """Animated GIF from a sequence of [0, 1] images (H×W or H×W×3, numpy or tensor), written atomically."""
    if len(frames) == 0:
        raise ValueError(f"{path}: no frames to write")
    ims = []
    for fr in frames:
        a = to_uint8(fr)
        ims.append(Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a[:, :, :3]))
    return _atomic_write(path, lambda f: ims[0].save(f, format="GIF", save_all=True, append_images=ims[1:],
                                                     duration=duration_ms, loop=loop))


# =========================================================================================== CSV log
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
        with open(p, newline="") as f:
            header = next(csv.reader(f), None)
        if header != fieldnames:
            raise ValueError(f"{p}: existing header {header} differs from {fieldnames}; use another file")
        with open(p, "rb") as f:
            f.seek(-1, os.SEEK_END)
            needs_newline = f.read(1) != b"\n"
    with open(p, "a", newline="") as f:
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
    with open(p, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "name" not in reader.fieldnames:
            return set()
        has_status = status_field in reader.fieldnames
        for row in reader:
            name = (row.get("name") or "").strip()
            if name:
                last[name] = (row.get(status_field) or "").strip().lower() if has_status else "ok"
    return {n for n, s in last.items() if s in DONE_STATUSES}


# =========================================================================================== montage
def make_montage(blurry, restored, sharp=None, k_est=None, k_true=None, gap: int = 4,
                 kernel_scale: Optional[int] = None) -> np.ndarray:
    """Float H'×W'×3 in [0, 1]: [blurry | restored | sharp (when known)] on top, and below, when any
    kernel is given, a strip [estimated kernel | true kernel] magnified (nearest, normalised by max).

    White gaps of `gap` px separate panels. The kernel scale defaults to the largest integer ≤ 8 that
    keeps a kernel within half the image height.
    """
    panels = [np.clip(to_hwc(a)[:, :, :3], 0, 1) for a in (blurry, restored, sharp) if a is not None]
    panels = [np.repeat(p, 3, axis=2) if p.shape[2] == 1 else p for p in panels]
    h = panels[0].shape[0]
    for p in panels[1:]:
        if p.shape[:2] != panels[0].shape[:2]:
            raise ValueError(f"montage panels differ in size: {panels[0].shape[:2]} vs {p.shape[:2]}")
    white_v = np.ones((h, gap, 3), np.float32)
    top = np.concatenate(sum(([p, white_v] for p in panels), [])[:-1], axis=1)
    kernels = [k for k in (k_est, k_true) if k is not None]
    if not kernels:
        return top.astype(np.float32)
    ks = max(max(np.shape(np.squeeze(np.asarray(k.detach().cpu() if isinstance(k, torch.Tensor) else k)))) for k in kernels)
    scale = kernel_scale or max(1, min(8, (h // 2) // max(ks, 1)))
    kims = [np.repeat(kernel_to_image(k, scale)[:, :, None], 3, axis=2) for k in kernels]
    kh = max(k.shape[0] for k in kims)
    row = []
    for k in kims:
        k = np.pad(k, ((0, kh - k.shape[0]), (0, 0), (0, 0)), constant_values=1.0)
        row += [k, np.ones((kh, gap, 3), np.float32)]
    strip = np.concatenate(row[:-1], axis=1)
    W = max(top.shape[1], strip.shape[1])
    top = np.pad(top, ((0, 0), (0, W - top.shape[1]), (0, 0)), constant_values=1.0)
    strip = np.pad(strip, ((0, 0), (0, W - strip.shape[1]), (0, 0)), constant_values=1.0)
    return np.concatenate([top, np.ones((gap, W, 3), np.float32), strip], axis=0).astype(np.float32)


# =========================================================================================== padding
CropBox = tuple  # (top, left, height, width) of the original image inside the padded one


def _pad_any(x: torch.Tensor, left: int, right: int, top: int, bottom: int, mode: str) -> torch.Tensor:
    """F.pad for (B,C,H,W) that also handles pads larger than the image for 'reflect'/'circular'
    (torch refuses those) by padding repeatedly."""
    import torch.nn.functional as F

    if mode not in ("reflect", "circular", "replicate", "constant"):
        raise ValueError(f"unknown padding mode '{mode}' (reflect, circular, replicate, constant)")
    if mode in ("replicate", "constant"):
        return F.pad(x, (left, right, top, bottom), mode=mode)
    while left or right or top or bottom:
        H, W = x.shape[-2:]
        lim_w = W - 1 if mode == "reflect" else W
        lim_h = H - 1 if mode == "reflect" else H
        if lim_w <= 0 and (left or right) or lim_h <= 0 and (top or bottom):
            return F.pad(x, (left, right, top, bottom), mode="replicate")  # a 1-px image cannot reflect
        l, r, t, b = (min(left, lim_w), min(right, lim_w), min(top, lim_h), min(bottom, lim_h))
        x = F.pad(x, (l, r, t, b), mode=mode)
        left, right, top, bottom = left - l, right - r, top - t, bottom - b
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int, mode: str = "reflect") -> tuple:
    """Pad (B,C,H,W) on the bottom and right up to multiples of `multiple` (what the UNet's
    down-sampling needs). Returns (padded, crop_box) with crop_box=(top, left, H, W) for `crop`.
    Bottom/right only, so the image keeps its pixel grid origin (and its kernel centre convention)."""
    if x.ndim != 4:
        raise ValueError(f"pad_to_multiple expects (B,C,H,W), got shape {tuple(x.shape)}")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    return _pad_any(x, 0, pw, 0, ph, mode), (0, 0, H, W)


def crop(x, crop_box: CropBox):
    """Inverse of the padding helpers: cut crop_box=(top, left, h, w) out of (..., H, W) tensors or
    numpy H×W×C images."""
    t, l, h, w = crop_box
    if isinstance(x, np.ndarray) and x.ndim == 3:
        return x[t:t + h, l:l + w]
    return x[..., t:t + h, l:l + w]


def pad_for_boundary(y, pad: int, mode: str = "reflect") -> tuple:
    """Extend a non-periodic observation by `pad` px on every side so that the circular (FFT) blur
    model can be used on the padded domain and the result cropped back with `crop`.

    Modes: 'reflect' (mirror, continuous at the image border; the wrap-around seam lies at the outer
    edge of the padding, far from the image when pad ≥ kernel size), 'taper' (mirror, then blended with a
    raised-cosine window towards the per-channel mean over the band, so the periodic extension is also
    continuous at the seam: the classic edge-taper remedy for ringing), 'replicate', or 'circular'
    (no change of model: the photo is treated as periodic). Choose pad ≥ kernel size (e.g. 33). The
    padded pixels are not data; they only keep wrap-around blur away from the cropped interior.
    Accepts (B,C,H,W) tensors or numpy H×W×C; returns the same kind and crop_box=(pad, pad, H, W).
    """
    is_np = isinstance(y, np.ndarray)
    x = torch.from_numpy(np.ascontiguousarray(to_hwc(y).transpose(2, 0, 1)))[None] if is_np else y
    if x.ndim != 4:
        raise ValueError(f"pad_for_boundary expects (B,C,H,W) or H×W×C, got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    H, W = x.shape[-2:]
    if mode == "taper":
        xp = _pad_any(x, pad, pad, pad, pad, "reflect")
        if pad > 0:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            # weight 1 on the image, falling smoothly to 0 at the outer edge of the band
            d = torch.arange(pad, dtype=x.dtype, device=x.device)
            ramp = 0.5 - 0.5 * torch.cos(math.pi * (d + 0.5) / pad)
            wy = torch.cat([ramp, torch.ones(H, dtype=x.dtype, device=x.device), ramp.flip(0)])
            wx = torch.cat([ramp, torch.ones(W, dtype=x.dtype, device=x.device), ramp.flip(0)])
            wgt = wy[:, None] * wx[None, :]
            xp = wgt * xp + (1 - wgt) * mean
    else:
        xp = _pad_any(x, pad, pad, pad, pad, mode)
    box = (pad, pad, H, W)
    if is_np:
        return xp[0].permute(1, 2, 0).numpy().astype(np.float32), box
    return xp, box


def image_to_tensor(img: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """numpy H×W×C -> (1, C, H, W) tensor on `device` (the caller chooses the device)."""
    return torch.from_numpy(np.ascontiguousarray(to_hwc(img).transpose(2, 0, 1)))[None].to(device=device, dtype=dtype)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) tensor -> numpy float32 H×W×C on the CPU."""
    return to_hwc(t).astype(np.float32)

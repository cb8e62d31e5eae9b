"""Reading images and kernels into memory, and converting between numpy images and tensors.

Conventions:
- Images in memory are numpy float32 H×W×3 in [0, 1] (RGB). Grey inputs are repeated to 3 channels,
  alpha is dropped (not composited), palette / CMYK / other modes are converted to RGB.
  8-bit files are divided by 255, 16-bit ones by 65535. `.npy` observations keep their values unclipped
  unless `clip=True` (the noise of a blurry observation is part of the data).
- Kernels are float32 2-D arrays normalised to sum 1.
- Every failure to read an input raises ImageReadError (a ValueError) with one line naming the file.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps, features

from util.errors import InputError

PathLike = Union[str, os.PathLike]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".npy") + ((".webp",) if features.check("webp") else ())
FLOAT_RANGE = (-1.0, 2.0)  # a float observation outside this is not [0, 1] data plus noise (e.g. 0..255)
MIN_KERNEL_SIDE = 3


class ImageReadError(InputError):
    """An input file (image, kernel, pickle, meta.csv) could not be read or is invalid."""


def fail(path: PathLike, problem: str) -> ImageReadError:
    return ImageReadError(f"{path}: {problem}")


def _to_rgb3(a: np.ndarray, path: PathLike) -> np.ndarray:
    """H×W, H×W×1, H×W×2 (grey+alpha), H×W×3, H×W×4 (RGBA) -> H×W×3; other shapes are an error."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise fail(path, f"expected an H×W or H×W×C image, got shape {a.shape}")
    c = a.shape[2]
    if c in (1, 2):  # grey (+ alpha)
        a = np.repeat(a[:, :, :1], 3, axis=2)
    elif c in (3, 4):  # RGB (+ alpha)
        a = a[:, :, :3]
    else:
        raise fail(path, f"expected 1, 2, 3 or 4 channels, got {c}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise fail(path, f"image has zero size {a.shape[:2]}")
    return a


def _npy_claims_more_than_it_holds(path: Path) -> Optional[str]:
    """Why an .npy cannot hold what its header claims (checked before numpy allocates it), or None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            held = os.fstat(f.fileno()).st_size - f.tell()
    except Exception:  # noqa: BLE001 — not a header we can read: np.load reports it
        return None
    need = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if dtype.hasobject or need <= held:
        return None
    return f"truncated .npy: its header claims shape {tuple(shape)} ({need:,} bytes) but the file holds {held:,}"


def read_npy_array(path: Path) -> np.ndarray:
    problem = _npy_claims_more_than_it_holds(path)
    if problem:
        raise fail(path, problem)
    try:
        # allow_pickle=False: an .npy holding Python objects is refused, never unpickled
        a = np.load(path, allow_pickle=False)
    except Exception as e:
        raise fail(path, f"unreadable .npy ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(a, np.ndarray):
        raise fail(path, "not a single array (.npz archives are not supported)")
    if a.dtype.kind not in "fiu" and a.dtype != np.bool_:
        raise fail(path, f"unsupported dtype {a.dtype}")
    if a.size == 0:
        raise fail(path, f"empty array of shape {a.shape}")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise fail(path, "contains NaN or inf")
    return a


def _check_pixels(path: Path, w: int, h: int) -> None:
    """Our own 16-bit readers refuse what Pillow refuses as a decompression bomb (its 8-bit path does)."""
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if limit and w * h > limit:
        raise fail(path, f"unreadable or corrupt image ({w}×{h} = {w * h} pixels, more than the "
                         f"decompression-bomb limit of {limit})")


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
        raise fail(path, "corrupt PNG (no IHDR chunk)")
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", ihdr[:13])
    if depth != 16 or colour not in (2, 6):  # only RGB / RGBA at 16 bits need this path
        return None
    if interlace:
        raise fail(path, "interlaced 16-bit colour PNG is not supported; save it non-interlaced or as .npy")
    _check_pixels(path, w, h)
    bpp = 6 if colour == 2 else 8
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8)
    except zlib.error as e:
        raise fail(path, f"corrupt PNG data ({e})") from None
    if raw.size != h * (1 + w * bpp):
        raise fail(path, f"corrupt PNG: {raw.size} data bytes for a {w}×{h} image")
    rows = raw.reshape(h, 1 + w * bpp)
    ftype = rows[:, 0].astype(np.int64)
    if ftype.max(initial=0) > 4:
        raise fail(path, "corrupt PNG: unknown row filter")
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
            raise fail(path, f"16-bit colour image with {codec} coding ({rawmode}) cannot be read without loss; "
                              f"save it as an uncompressed TIFF, a 16-bit PNG or .npy")
        c = 4 if rawmode.startswith("RGBA") else 3
        x0, y0, x1, y1 = extents
        tw, th = x1 - x0, y1 - y0
        row = stride or tw * c * 2
        need = offset + (th - 1) * row + tw * c * 2
        if need > len(data):
            raise fail(path, "truncated image data")
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
        raise fail(path, f"unreadable or corrupt image ({msg})") from None
    if not np.all(np.isfinite(a)):
        raise fail(path, "contains NaN or inf")
    return a


def _check_regular_file(p: Path) -> None:
    """ImageReadError unless p is a readable regular file (names broken links and link loops)."""
    if p.is_file():
        return
    if p.is_symlink():
        try:
            p.resolve(strict=True)
        except RuntimeError:
            raise fail(p, "symbolic link loop") from None
        except OSError as e:
            if "loop" in str(e).lower() or getattr(e, "errno", None) == 40:
                raise fail(p, "symbolic link loop") from None
            raise fail(p, f"broken symbolic link (to {os.readlink(p)})") from None
    raise fail(p, "no such file" if not p.exists() else "not a regular file")


def array_to_unit_range(a: np.ndarray, path: PathLike, what: str = "") -> np.ndarray:
    """An image array's values as float32 in [0, 1] units: uint8 /255, uint16 /65535, other types as they are,
    refused (ImageReadError naming `path`, and `what` in it when given) when outside FLOAT_RANGE (e.g. 0..255).
    The rule for .npy images and for the images of a pickle."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    a_dtype, a = a.dtype, a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if lo < FLOAT_RANGE[0] or hi > FLOAT_RANGE[1]:
        raise fail(path, f"{what}{'float' if a_dtype.kind == 'f' else a_dtype.name} values span {lo:.4g}..{hi:.4g}, "
                         f"not [0, 1] plus noise (0..255 data? divide by 255 or save as uint8)")
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
    _check_regular_file(p)
    if p.stat().st_size == 0:
        raise fail(p, "empty file (0 bytes)")
    ext = p.suffix.lower()
    if ext == ".npy":
        a = array_to_unit_range(read_npy_array(p), p)
        if a.ndim == 3 and a.shape[2] not in (1, 3):  # no alpha in .npy: 4 channels is more likely a layout error
            raise fail(p, f"expected an H×W, H×W×1 or H×W×3 array, got shape {a.shape} (channels last)")
        a = _to_rgb3(a, p)
    elif ext in IMAGE_EXTS:
        a = _png_16bit_colour(p) if ext == ".png" else None
        if a is None:
            a = _read_pil(p)
        a = _to_rgb3(a, p)
    else:
        raise fail(p, f"unsupported extension '{p.suffix}' (expected one of {', '.join(IMAGE_EXTS)})")
    if clip:
        a = np.clip(a, 0.0, 1.0)
    return np.ascontiguousarray(a, dtype=np.float32)


def read_kernel(path: PathLike) -> np.ndarray:
    """Read a blur kernel from .npy (any size; 1×1×s×s accepted) as float32 2-D normalised to sum 1.

    Errors (ImageReadError naming the file): unreadable, NaN/inf, and those of `check_kernel`.
    """
    p = Path(path)
    _check_regular_file(p)
    if p.suffix.lower() != ".npy":
        raise fail(p, f"kernels must be .npy files, got '{p.suffix}'")
    return check_kernel(read_npy_array(p), p)


def check_kernel(k: np.ndarray, p: PathLike) -> np.ndarray:
    """A blur kernel's array (leading axes of size 1 dropped) as float32 2-D normalised to sum 1; the rule for
    kernel files and the kernels of pickles. Errors (ImageReadError naming `p`): not 2-D, under 3×3, sum ≤ 0,
    negative taps."""
    k = np.asarray(k, dtype=np.float64)
    while k.ndim > 2 and k.shape[0] == 1:  # drop leading batch/channel axes of size 1
        k = k[0]
    if k.ndim != 2:
        raise fail(p, f"kernel must be 2-D, got shape {k.shape}")
    if min(k.shape) < MIN_KERNEL_SIDE:
        raise fail(p, f"kernel is {k.shape[0]}×{k.shape[1]}: a blur kernel needs at least "
                      f"{MIN_KERNEL_SIDE}×{MIN_KERNEL_SIDE} taps")
    s = k.sum()
    if not s > 0:
        raise fail(p, f"kernel sum is {s:.4g}; cannot normalise a kernel whose sum is not positive")
    if k.min() < -1e-6 * s:  # a blur spreads light: no negative weights (round-off aside)
        raise fail(p, f"kernel has negative taps (min {k.min() / s:.3g} of the sum); a blur kernel is non-negative")
    return (k / s).astype(np.float32)


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


def image_to_tensor(img: np.ndarray, device=None, dtype=torch.float32) -> torch.Tensor:
    """numpy H×W×C -> (1, C, H, W) tensor on `device` (the caller chooses the device)."""
    return torch.from_numpy(np.ascontiguousarray(to_hwc(img).transpose(2, 0, 1)))[None].to(device=device, dtype=dtype)


def tensor_to_image(t: torch.Tensor) -> np.ndarray:
    """(1, C, H, W) or (C, H, W) tensor -> numpy float32 H×W×C on the CPU."""
    return to_hwc(t).astype(np.float32)

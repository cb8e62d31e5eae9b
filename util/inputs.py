"""Discovering a run's inputs and reading one sample: test-set folders, photo folders, the authors' pickles.

`list_inputs` only locates files; `load_sample` reads one sample and raises ImageReadError naming the
faulty file (InputError for a name with several files), touching no other sample; `resolve_sigma` says which
σ a sample uses and where it came from.
"""
from __future__ import annotations

import csv
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from util.errors import InputError
from util.images import IMAGE_EXTS, PathLike, check_kernel, fail, read_image, read_kernel
from util.noise import SIGMA_UNITS, estimate_noise_sigma, sigma_in_range
from util.safe_pickle import PICKLE_EXT, load_pickle_sample


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
    problem: Optional[str] = None  # found while listing (two files for one name): load_sample raises it, for this name only


@dataclass(frozen=True)
class LoadedSample:
    """A sample read into memory: y unclipped H×W×3, x_true clipped H×W×3, k_true normalised."""
    name: str
    y: np.ndarray
    x_true: Optional[np.ndarray] = None
    k_true: Optional[np.ndarray] = None
    sigma: Optional[float] = None


def _visible_files(d: Path) -> list:
    """Files and links (broken ones too: they get a failed row, not silence), hidden names excluded."""
    return sorted((f for f in d.iterdir() if (f.is_symlink() or f.is_file()) and not f.name.startswith(".")),
                  key=lambda f: f.name)


def _specials(d: Path) -> list:
    """Entries that are neither files, links nor folders (FIFOs, sockets, devices): named in the note, never read."""
    return sorted(f.name for f in d.iterdir() if not (f.is_symlink() or f.is_file() or f.is_dir())
                  and not f.name.startswith("."))


def _folders(d: Path) -> list:
    """Sub-folders of d (not hidden): never inputs, so named in the run's note rather than skipped in silence."""
    return sorted(f"{f.name}/" for f in d.iterdir() if f.is_dir() and not f.is_symlink() and not f.name.startswith("."))


def _unused(files: Iterable[Path], exts: Sequence[str]) -> list:
    return [f.name for f in files if f.suffix.lower() not in exts and f.name != "meta.csv"]


def _by_stem(files: Iterable[Path], exts: Sequence[str], clashes: dict) -> dict:
    """{stem: file}; every file of a stem that has several (a.png and a.npy) goes into `clashes` {stem: {files}}:
    that name fails alone (`_clash_message`), the others run."""
    out: dict = {}
    for f in files:
        if f.suffix.lower() in exts:
            if f.stem in out:
                clashes.setdefault(f.stem, set()).update((out[f.stem], f))
            else:
                out[f.stem] = f
    return out


def _clash_message(root: Path, name: str, files: set) -> str:
    shown = ", ".join(sorted(str(f.relative_to(root)) for f in files))
    return f"{root}: {len(files)} files share the name '{name}' ({shown}); rename or remove all but one"


def read_meta_csv(path: PathLike) -> dict:
    """meta.csv with columns name,sigma (σ in [0, 1] units) -> {name: sigma}. Errors name file and line."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"name", "sigma"} <= set(reader.fieldnames):
                raise fail(p, f"expected a header 'name,sigma', got {reader.fieldnames}")
            out = {}
            for row in reader:
                line = reader.line_num
                name = (row.get("name") or "").strip()
                if not name:
                    raise fail(p, f"line {line}: empty name")
                try:
                    s = float(row["sigma"])
                except (TypeError, ValueError):
                    raise fail(p, f"line {line}: sigma '{row.get('sigma')}' is not a number") from None
                if not sigma_in_range(s):
                    raise fail(p, f"line {line}: sigma {s} outside [0, 1) ({SIGMA_UNITS})")
                if name in out:  # which σ was meant cannot be guessed
                    raise fail(p, f"line {line}: name '{name}' is listed twice")
                out[name] = s
            return out
    except UnicodeDecodeError:
        raise fail(p, "not a text CSV file") from None
    except csv.Error as e:  # e.g. a field over the csv module's 128 KB limit
        raise fail(p, f"not a readable CSV file ({e})") from None


META_BOUNDARIES = ("circular", "valid")


def read_meta_boundaries(path: PathLike) -> dict:
    """The optional `boundary` column of meta.csv -> {name: 'circular' | 'valid'} (empty cells omitted)."""
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:  # as read_meta: Excel's BOM would hide the 'name' column
            reader = csv.DictReader(f)
            if "boundary" not in (reader.fieldnames or []):
                return {}
            out = {}
            for row in reader:
                b = (row.get("boundary") or "").strip().lower()
                if b and b not in META_BOUNDARIES:
                    raise fail(p, f"line {reader.line_num}: boundary '{b}' is not one of {', '.join(META_BOUNDARIES)}")
                if b:
                    out[(row.get("name") or "").strip()] = b
            return out
    except (UnicodeDecodeError, csv.Error) as e:
        raise fail(p, f"not a readable CSV file ({e})") from None


def list_inputs(input_dir: PathLike, notice: Callable[[str], None] = lambda message: None) -> list:
    """Discover the inputs of a run, sorted by name (docs/algorithm.md §4).

    - `<dir>/blurry/` exists: test-set folder; sharp/<name>.* and kernel/<name>.npy are attached when
      present, σ from meta.csv when listed.
    - otherwise `*.pickle` files: the authors' format (kind 'pickle'); image files beside them are photos.
    - otherwise image files: real photos (kind 'photo'), σ from meta.csv when present, else None
      (the caller estimates it).
    - a single image or pickle file is accepted as a one-sample input.
    Files are only located here, not read: a broken file fails later, in load_sample, alone. `notice`
    receives one line about files of unsupported types and meta.csv names that match no input.
    """
    root = Path(input_dir)
    if root.is_file():
        ext = root.suffix.lower()
        if ext == PICKLE_EXT:
            return [Sample(root.stem, root, kind="pickle")]
        if ext in IMAGE_EXTS:
            return [Sample(root.stem, root, kind="photo")]
        raise InputError(f"{root}: not an image or .pickle file")
    if not root.is_dir():
        if root.is_symlink():  # is_dir() is False for a dangling link or a loop too: say which
            raise InputError(f"{root}: a broken symbolic link or a symbolic link loop, not an input folder")
        raise InputError(f"{root}: input folder does not exist")
    meta_path = root / "meta.csv"
    if not meta_path.is_file() and (meta_path.is_symlink() or meta_path.exists()):  # σ would be guessed in silence
        raise InputError(f"{meta_path}: a folder, a broken link or not a regular file; meta.csv must be a CSV file")
    meta = read_meta_csv(meta_path) if meta_path.is_file() else {}
    bnd = read_meta_boundaries(meta_path) if meta_path.is_file() else {}

    clashes: dict = {}  # {name: {files}}: a name with several files fails alone
    if (root / "blurry").is_dir():
        found = {sub: _by_stem(_visible_files(root / sub), exts, clashes) if (root / sub).is_dir() else {}
                 for sub, exts in (("blurry", IMAGE_EXTS), ("sharp", IMAGE_EXTS), ("kernel", (".npy",)))}
        blurry, sharp, kern = found["blurry"], found["sharp"], found["kernel"]
        problem = {n: _clash_message(root, n, fs) for n, fs in clashes.items()}
        samples = [Sample(n, f, sharp.get(n), kern.get(n), meta.get(n), "folder", bnd.get(n), problem.get(n))
                   for n, f in blurry.items()]
        ignored = (_unused(_visible_files(root / "blurry"), IMAGE_EXTS) + _folders(root / "blurry")
                   + _specials(root / "blurry"))
        for sub, exts in (("sharp", IMAGE_EXTS), ("kernel", (".npy",))):  # e.g. kernel/a.png: a runs with no true kernel
            if (root / sub).is_dir():
                ignored += [f"{sub}/{n}" for n in _unused(_visible_files(root / sub), exts) + _folders(root / sub)
                            + _specials(root / sub)]
        for sub in ("sharp", "kernel"):
            for n, f in found[sub].items():
                if n not in blurry:  # no blurry/<name>: nothing to deblur (every file of the name named)
                    ignored += sorted(f"{sub}/{g.name}" for g in clashes.get(n, {f}) if g.parent == root / sub)
    else:
        files = _visible_files(root)
        ignored = _unused(files, IMAGE_EXTS + (PICKLE_EXT,)) + _folders(root) + _specials(root)  # never recursed into
        pickles = _by_stem(files, (PICKLE_EXT,), clashes)
        photos = _by_stem(files, IMAGE_EXTS, clashes)
        for n in set(pickles) & set(photos):  # one name, one sample (the pickle's): it fails alone, naming every file
            clashes.setdefault(n, set()).update((pickles[n], photos[n]))
        problem = {n: _clash_message(root, n, fs) for n, fs in clashes.items()}
        samples = [Sample(n, f, sigma=meta.get(n), kind="pickle", problem=problem.get(n)) for n, f in pickles.items()]
        samples += [Sample(n, f, sigma=meta.get(n), kind="photo", boundary=bnd.get(n), problem=problem.get(n))
                    for n, f in photos.items() if n not in pickles]
    if ignored:
        notice(f"{root}: ignored {len(ignored)} file(s) or folder(s) it does not read: {', '.join(ignored[:5])}"
               f"{' ...' if len(ignored) > 5 else ''} (read: {', '.join(IMAGE_EXTS + (PICKLE_EXT,))}; "
               f"ground-truth kernels: kernel/<name>.npy)")
    unmatched = sorted(set(meta) - {s.name for s in samples})
    if unmatched:
        shown = [repr(n) if any(unicodedata.category(c) == "Cc" for c in n) else n for n in unmatched[:5]]  # one line
        notice(f"{meta_path}: {len(unmatched)} name(s) match no input: {', '.join(shown)}"
               f"{' ...' if len(unmatched) > 5 else ''}")
    unnameable = [s.name for s in samples if any(unicodedata.category(c) in ("Cc", "Cs") for c in s.name)]
    if unnameable:  # a newline, a tab or bytes that are not UTF-8 (surrogates) cannot round-trip through metrics.csv
        notice(f"{root}: skipped {len(unnameable)} input(s) whose names hold control characters or bytes that are not "
               f"UTF-8 (rename them): "
               f"{', '.join(repr(n) for n in unnameable[:5])}")
        samples = [s for s in samples if s.name not in unnameable]
    if not samples:
        raise InputError(f"{root}: no inputs found (expected blurry/<name>.{{png,jpg,tif,npy}}, "
                         f"image files, or *.pickle)")
    return sorted(samples, key=lambda s: s.name)




def load_sample(sample: Sample, sigma_given: bool = False) -> LoadedSample:
    """Read one sample's files. Raises ImageReadError naming the faulty file (InputError naming every file of a
    name that has several); touches no other sample.
    `sigma_given`: σ comes from elsewhere (--sigma), so a pickle's own σ is not needed (nor checked)."""
    if sample.problem is not None:
        raise InputError(sample.problem)
    if sample.kind == "pickle":
        # the checks of a test-set folder's files, each error naming the pickle (util/safe_pickle.py: σ, H, L)
        d = load_pickle_sample(sample.blurry, need_sigma=sample.sigma is None and not sigma_given)
        y = d["L"][0].permute(1, 2, 0).numpy().copy()
        x = d["H"][0].permute(1, 2, 0).clamp(0, 1).numpy().copy()
        k = check_kernel(d["kernel"].numpy(), sample.blurry)
        _check_kernel_fits(k, y, sample.blurry)
        # a σ from meta.csv or --sigma overrides the pickle's own (lets a user correct it): checked only when used
        sigma = sample.sigma if sample.sigma is not None else d["sigma"]
        return LoadedSample(sample.name, y, x, k, sigma)
    y = read_image(sample.blurry, clip=False)
    x = None
    if sample.sharp is not None:
        x = read_image(sample.sharp, clip=True)
        if x.shape != y.shape:
            raise fail(sample.sharp, f"sharp image is {x.shape[:2]} but the blurry one is {y.shape[:2]}")
    k = read_kernel(sample.kernel) if sample.kernel is not None else None
    if k is not None:
        _check_kernel_fits(k, y, sample.kernel)
    return LoadedSample(sample.name, y, x, k, sample.sigma)


def _check_kernel_fits(k: np.ndarray, y: np.ndarray, path: PathLike) -> None:
    if k.shape[0] > y.shape[0] or k.shape[1] > y.shape[1]:
        raise fail(path, f"kernel {k.shape} is larger than the image {y.shape[:2]}")


def check_sigma_flag(sigma: Optional[float], flag: str = "--sigma") -> None:
    """Refuse a σ override outside [0, 1) (InputError naming the flag; a value ≥ 1 was likely given in /255)."""
    if sigma is not None and not sigma_in_range(sigma):
        hint = f", e.g. {sigma / 255:.4f}" if math.isfinite(sigma) and sigma >= 1 else ""
        raise InputError(f"{flag} {sigma} is outside [0, 1): give σ in [0,1] units{hint}")


def resolve_sigma(sample: LoadedSample, override: Optional[float] = None) -> tuple:
    """σ to use for a sample and where it came from: ('override' | 'given' | 'estimated').

    Order: an explicit override (e.g. --sigma), then σ from meta.csv / the pickle, else the blind
    estimate of `estimate_noise_sigma` on the observation (report it: it is a guess).
    """
    if override is not None:
        check_sigma_flag(override, "sigma override")
        return float(override), "override"
    if sample.sigma is not None:
        return float(sample.sigma), "given"
    return estimate_noise_sigma(sample.y), "estimated"

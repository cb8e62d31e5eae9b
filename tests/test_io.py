"""Reading and writing (util.images, safe_pickle, inputs, noise, outputs, csvlog) and boundary padding
(util.geometry): every image type, broken inputs, the restricted unpickler, input discovery, noise
estimation, atomic writers, CSV log, montage."""
from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from util.errors import InputError
from util.csvlog import append_csv_row, read_done_names
from util.geometry import crop, pad_for_boundary, pad_to_multiple
from util.fft import conv_circular
from util.images import ImageReadError, read_image, read_kernel
from util.inputs import LoadedSample, list_inputs, load_sample, resolve_sigma
from util.noise import estimate_noise_sigma
from util.outputs import atomic_write, make_montage, save_gif, save_json, save_kernel_png, save_npy, save_png, save_text
from util.safe_pickle import load_pickle_sample

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PICKLES = SHARED / "data" / "paper_testset"


def _rgb(h=20, w=24, seed=0):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def _png16(path, a, filters=(0, 1, 2, 3, 4)):
    """Hand-encode a 16-bit PNG (grey / RGB / RGBA), cycling through all five row filters."""
    h, w, c = a.shape
    colour = {1: 0, 3: 2, 4: 6}[c]
    bpp = 2 * c
    raw = np.zeros((h, w * bpp), np.int64)
    for i in range(h):
        raw[i] = np.frombuffer(a[i].astype(">u2").tobytes(), np.uint8)
    out = bytearray()
    for i in range(h):
        ft = filters[i % len(filters)]
        cur, up = raw[i], raw[i - 1] if i else np.zeros_like(raw[i])
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        ul = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        if ft == 0:
            pred = 0
        elif ft == 1:
            pred = left
        elif ft == 2:
            pred = up
        elif ft == 3:
            pred = (left + up) // 2
        else:
            p = left + up - ul
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
        out += bytes([ft]) + ((cur - pred) % 256).astype(np.uint8).tobytes()

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(out)))
                           + chunk(b"IEND", b""))


def _tiff16_rgb(path, a, compression=1):
    """Hand-encode a one-strip 16-bit RGB TIFF (little endian); compression 8 = deflate."""
    h, w, _ = a.shape
    data = a.astype("<u2").tobytes()
    if compression == 8:
        data = zlib.compress(data)
    n, ifd = 10, 8
    bps_off = ifd + 2 + n * 12 + 4
    data_off = bps_off + 6
    tags = [(256, 3, w), (257, 3, h), (258, 3, None), (259, 3, compression), (262, 3, 2), (273, 4, data_off),
            (277, 3, 3), (278, 3, h), (279, 4, len(data)), (284, 3, 1)]
    b = b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<H", n)
    for tag, typ, val in tags:
        if tag == 258:
            b += struct.pack("<HHII", tag, typ, 3, bps_off)
        elif typ == 3:
            b += struct.pack("<HHIHH", tag, typ, 1, val, 0)
        else:
            b += struct.pack("<HHII", tag, typ, 1, val)
    Path(path).write_bytes(b + struct.pack("<I", 0) + struct.pack("<HHH", 16, 16, 16) + data)


# ------------------------------------------------------------------------------------------ read_image
def test_png8_rgb_exact(tmp_path):
    u8 = (np.random.default_rng(1).random((9, 11, 3)) * 255).astype(np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    a = read_image(tmp_path / "a.png")
    assert a.dtype == np.float32 and a.shape == (9, 11, 3)
    np.testing.assert_array_equal(a, u8.astype(np.float32) / 255)


def test_grey_rgba_palette_bmp(tmp_path):
    g = (np.arange(30, dtype=np.uint8) * 8).reshape(5, 6)
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    a = read_image(tmp_path / "g.png")
    assert a.shape == (5, 6, 3)
    np.testing.assert_array_equal(a[..., 0], a[..., 2])
    np.testing.assert_allclose(a[..., 1], g / 255)

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent: alpha must be dropped, not composited
    Image.fromarray(rgba, "RGBA").save(tmp_path / "r.png")
    a = read_image(tmp_path / "r.png")
    assert a.shape == (5, 6, 3)
    np.testing.assert_allclose(a[..., 0], 200 / 255)

    rgb = Image.fromarray((np.random.default_rng(2).random((8, 8, 3)) * 255).astype(np.uint8))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    pal = read_image(tmp_path / "p.png")
    ref = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")) / 255
    np.testing.assert_allclose(pal, ref, atol=1e-7)

    Image.fromarray(g, "L").convert("RGB").save(tmp_path / "b.bmp")
    assert read_image(tmp_path / "b.bmp").shape == (5, 6, 3)


def test_exif_orientation_applied(tmp_path):
    u8 = np.zeros((4, 6, 3), np.uint8)
    u8[0, 0] = 255  # a marker in the top-left corner
    im = Image.fromarray(u8)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90° CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    a = read_image(tmp_path / "r.jpg")
    assert a.shape == (6, 4, 3)
    assert a[0, -1].mean() > 0.7 and a[0, 0].mean() < 0.3  # the marker moved to the top-right


def test_jpg_and_tif(tmp_path):
    u8 = np.full((16, 16, 3), 128, np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.jpg", quality=95)
    a = read_image(tmp_path / "a.jpg")
    assert a.shape == (16, 16, 3) and abs(a.mean() - 128 / 255) < 2 / 255
    Image.fromarray(u8).save(tmp_path / "a.tif")
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), 128 / 255)


def test_16bit_grey_png_and_tif(tmp_path):
    g16 = (np.arange(20, dtype=np.uint16) * 3001 + 5).reshape(4, 5)
    Image.fromarray(g16).save(tmp_path / "g.png")
    Image.fromarray(g16).save(tmp_path / "g.tif")
    for f in ("g.png", "g.tif"):
        a = read_image(tmp_path / f)
        np.testing.assert_allclose(a[..., 1], g16 / 65535, atol=1e-7, err_msg=f)


def test_16bit_rgb_tiff(tmp_path):
    a16 = np.random.default_rng(7).integers(0, 65536, size=(6, 9, 3)).astype(np.uint16)
    _tiff16_rgb(tmp_path / "a.tif", a16)
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), a16 / 65535, atol=1e-7)
    _tiff16_rgb(tmp_path / "z.tif", a16, compression=8)  # compressed: refused, not truncated to 8 bits
    with pytest.raises(ImageReadError, match="z.tif.*without loss"):
        read_image(tmp_path / "z.tif")


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_all_filters(tmp_path, channels):
    # values spanning both bytes so a decoder that kept only 8 bits would fail
    a16 = np.random.default_rng(channels).integers(0, 65536, size=(13, 17, channels)).astype(np.uint16)
    _png16(tmp_path / "x.png", a16)
    a = read_image(tmp_path / "x.png")
    ref = a16[..., :3] if channels > 1 else np.repeat(a16, 3, axis=2)
    np.testing.assert_allclose(a, ref / 65535, atol=1e-7)


def test_npy_variants(tmp_path):
    x = _rgb() * 1.4 - 0.2  # unclipped observation
    np.save(tmp_path / "a.npy", x)
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), x)
    assert read_image(tmp_path / "a.npy", clip=True).min() == 0
    np.save(tmp_path / "b.npy", x[..., 0])
    assert read_image(tmp_path / "b.npy").shape == (20, 24, 3)
    np.save(tmp_path / "c.npy", x[..., :1].astype(np.float64))
    b = read_image(tmp_path / "c.npy")
    assert b.dtype == np.float32 and b.shape == (20, 24, 3)


@pytest.mark.parametrize("content,problem", [
    (None, "empty"),
    (b"\x89PNG\r\n\x1a\nthis is not a png", "corrupt"),
    (b"definitely not an image", "corrupt"),
])
def test_broken_png_names_file(tmp_path, content, problem):
    f = tmp_path / "bad.png"
    f.write_bytes(content or b"")
    with pytest.raises(ImageReadError, match=problem) as e:
        read_image(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_truncated_png(tmp_path):
    Image.fromarray((_rgb(64, 64) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="t.png"):
        read_image(tmp_path / "t.png")


@pytest.mark.parametrize("arr,problem", [
    (np.full((4, 4, 3), np.nan, np.float32), "NaN"),
    (np.zeros((4, 4, 5), np.float32), "channels last"),
    (np.zeros((4, 4, 4), np.float32), "channels last"),
    (np.zeros((2, 4, 4, 3), np.float32), "shape"),
    (np.zeros((0, 4, 3), np.float32), "empty"),
    (np.array(["a", "b"]), "dtype"),
])
def test_bad_npy(tmp_path, arr, problem):
    f = tmp_path / "x.npy"
    np.save(f, arr)
    with pytest.raises(ImageReadError, match=problem) as e:
        read_image(f)
    assert str(f) in str(e.value)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "a.gifx").write_bytes(b"x")
    with pytest.raises(ImageReadError, match="unsupported extension"):
        read_image(tmp_path / "a.gifx")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageReadError, match="obj.npy"):
        read_image(tmp_path / "obj.npy")  # object arrays would need unpickling: refused


# ------------------------------------------------------------------------------------------ kernels
def test_read_kernel(tmp_path):
    k = np.random.default_rng(0).random((1, 1, 7, 9))
    np.save(tmp_path / "k.npy", k * 3)
    r = read_kernel(tmp_path / "k.npy")
    assert r.shape == (7, 9) and r.dtype == np.float32
    np.testing.assert_allclose(r.sum(), 1, rtol=1e-6)
    np.testing.assert_allclose(r, k[0, 0] / k.sum(), rtol=1e-5)
    for bad, problem in [(-k[0, 0], "sum"), (np.zeros((5, 5)), "sum"), (np.ones((2, 3, 3)), "2-D"),
                         (np.full((3, 3), np.nan), "NaN")]:
        np.save(tmp_path / "b.npy", bad)
        with pytest.raises(ImageReadError, match=problem):
            read_kernel(tmp_path / "b.npy")


# ------------------------------------------------------------------------------------------ pickles
class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_hostile_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pickle"
    payload = pickle.dumps({"H": _Evil(marker), "L": 0, "kernel": 0, "sigma": 0.1})
    assert b"system" in payload  # the payload really would call os.system under plain pickle.load
    f.write_bytes(payload)
    with pytest.raises(ImageReadError, match=r"refused global '(posix|os|nt)\.system'") as e:
        load_pickle_sample(f)
    assert "evil.pickle" in str(e.value)
    assert not marker.exists()


class _Wrapped:
    """Reduces through the admitted torch.storage._load_from_bytes, with a hostile inner stream."""

    def __init__(self, payload):
        self.payload = payload

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.payload,))


def test_hostile_inner_torch_stream_refused(tmp_path):
    import io as _io
    marker = tmp_path / "pwned"
    buf = _io.BytesIO()
    torch.save(_Evil(marker), buf)
    f = tmp_path / "inner.pickle"
    f.write_bytes(pickle.dumps({"H": _Wrapped(buf.getvalue()), "L": 0, "kernel": 0, "sigma": 0.1}))
    with pytest.raises(ImageReadError, match=r"inner.pickle: .*refused global .(posix|os|nt).system") as e:
        load_pickle_sample(f)
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_other_globals_refused(tmp_path):
    f = tmp_path / "b.pickle"
    f.write_bytes(pickle.dumps({"H": np.zeros(3)}))  # numpy reconstruct globals are not admitted either
    with pytest.raises(ImageReadError, match="refused global 'numpy"):
        load_pickle_sample(f)


def test_pickle_roundtrip_of_tensors_and_structure_errors(tmp_path):
    # a pickle written the way the authors did (plain pickle of tensors) loads through the allowed globals
    g = torch.Generator().manual_seed(0)
    good = {"H": torch.rand(1, 3, 16, 16, generator=g), "L": torch.rand(1, 3, 16, 16, generator=g),
            "kernel": torch.rand(1, 1, 5, 5, generator=g), "sigma": 0.05}
    (tmp_path / "ok.pickle").write_bytes(pickle.dumps(good))
    d = load_pickle_sample(tmp_path / "ok.pickle")
    for k in ("H", "L", "kernel"):
        assert torch.equal(d[k], good[k])
    assert d["sigma"] == 0.05
    (tmp_path / "nokey.pickle").write_bytes(pickle.dumps({"H": good["H"]}))
    with pytest.raises(ImageReadError, match="missing key"):
        load_pickle_sample(tmp_path / "nokey.pickle")
    (tmp_path / "trunc.pickle").write_bytes(pickle.dumps(good)[:100])
    with pytest.raises(ImageReadError, match="trunc.pickle"):
        load_pickle_sample(tmp_path / "trunc.pickle")


@pytest.mark.skipif(not PICKLES.is_dir(), reason=f"authors' pickles not found at {PICKLES} (no ../shared)")
def test_authors_pickles():
    files = sorted(PICKLES.glob("*.pickle"))
    assert len(files) == 3
    for f in files:
        d = load_pickle_sample(f)
        assert d["H"].shape == (1, 3, 256, 256) and d["L"].shape == (1, 3, 256, 256)
        assert d["kernel"].shape == (1, 1, 33, 33)
        assert 1.0 < float(d["kernel"].sum()) < 1.15  # stored unnormalised, as documented
        assert d["L"].min() < 0 or d["L"].max() > 1  # observation kept unclipped
        assert min(abs(d["sigma"] * 255 - s) for s in (5, 10, 20)) < 1e-4
        # the stored pair follows docs/algorithm.md §2 (circular, centred) with the unnormalised kernel: L − k⊛H is the noise
        resid = d["L"] - conv_circular(d["H"], d["kernel"][0, 0])
        assert abs(resid.std().item() / d["sigma"] - 1) < 0.03
    samples = list_inputs(PICKLES)
    assert [s.kind for s in samples] == ["pickle"] * 3
    ls = load_sample(samples[0])
    assert ls.y.shape == (256, 256, 3) and ls.x_true.shape == (256, 256, 3)
    assert abs(float(ls.k_true.sum()) - 1) < 1e-5
    assert ls.x_true.min() >= 0 and ls.x_true.max() <= 1


# ------------------------------------------------------------------------------------------ discovery
def _make_folder(root: Path):
    (root / "blurry").mkdir(parents=True)
    (root / "sharp").mkdir()
    (root / "kernel").mkdir()
    np.save(root / "blurry" / "b.npy", _rgb())
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(root / "blurry" / "a.png")
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(root / "sharp" / "a.png")
    np.save(root / "kernel" / "a.npy", np.ones((3, 3)))
    (root / "blurry" / ".hidden.png").write_bytes(b"junk")
    (root / "blurry" / "notes.txt").write_text("ignored")
    (root / "meta.csv").write_text("name,sigma\na,0.0392\n")


def test_list_inputs_folder(tmp_path):
    _make_folder(tmp_path)
    s = list_inputs(tmp_path)
    assert [x.name for x in s] == ["a", "b"] and {x.kind for x in s} == {"folder"}
    assert s[0].sharp.name == "a.png" and s[0].kernel.name == "a.npy" and s[0].sigma == 0.0392
    assert s[1].sharp is None and s[1].kernel is None and s[1].sigma is None
    ls = load_sample(s[0])
    assert ls.x_true.shape == ls.y.shape and abs(ls.k_true.sum() - 1) < 1e-6
    assert list_inputs(tmp_path) == s  # deterministic


def test_broken_file_fails_alone(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "blurry" / "c.png").write_bytes(b"broken")
    results = {}
    for s in list_inputs(tmp_path):
        try:
            results[s.name] = load_sample(s).y.shape
        except ImageReadError as e:
            results[s.name] = str(e)
    assert results["a"] == (20, 24, 3) and results["b"] == (20, 24, 3)
    assert "c.png" in results["c"]


def test_list_inputs_photos_and_pickles(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(photos / "z.jpg")
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(photos / "m.png")
    s = list_inputs(photos)
    assert [(x.name, x.kind, x.sharp, x.sigma) for x in s] == [("m", "photo", None, None), ("z", "photo", None, None)]
    assert load_sample(s[0]).x_true is None
    assert list_inputs(photos / "z.jpg")[0].kind == "photo"

    pk = tmp_path / "pk"
    pk.mkdir()
    t = torch.zeros(1, 3, 8, 8)
    (pk / "p.pickle").write_bytes(pickle.dumps({"H": t, "L": t, "kernel": torch.ones(1, 1, 3, 3), "sigma": 0.1}))
    s = list_inputs(pk)
    assert [(x.name, x.kind) for x in s] == [("p", "pickle")]
    assert load_sample(s[0]).sigma == 0.1


def test_list_inputs_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        list_inputs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no inputs found"):
        list_inputs(tmp_path / "empty")
    d = tmp_path / "dup"
    (d / "blurry").mkdir(parents=True)
    np.save(d / "blurry" / "a.npy", _rgb())
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(d / "blurry" / "a.png")
    Image.fromarray((_rgb() * 255).astype(np.uint8)).save(d / "blurry" / "b.png")
    dup = {x.name: x for x in list_inputs(d)}  # the duplicate name fails alone, when it is read; b is listed as usual
    assert sorted(dup) == ["a", "b"] and dup["b"].problem is None
    with pytest.raises(InputError, match=r"2 files share the name 'a' \(blurry/a.npy, blurry/a.png\)"):
        load_sample(dup["a"])
    assert load_sample(dup["b"]).y.shape == _rgb().shape
    (d / "sharp").mkdir()  # three files of one name are all named; extra files of a name with no blurry/ too
    for f in ("a.png", "a.tif", "z.png", "z.tif"):
        Image.fromarray((_rgb() * 255).astype(np.uint8)).save(d / "sharp" / f)
    notes = []
    dup = {x.name: x for x in list_inputs(d, notice=notes.append)}
    with pytest.raises(InputError, match=r"4 files share the name 'a' \(blurry/a.npy, blurry/a.png, sharp/a.png, "
                                         r"sharp/a.tif\)"):
        load_sample(dup["a"])
    assert len(notes) == 1 and "sharp/z.png" in notes[0] and "sharp/z.tif" in notes[0]
    m = tmp_path / "meta"
    (m / "blurry").mkdir(parents=True)
    np.save(m / "blurry" / "a.npy", _rgb())
    (m / "meta.csv").write_text("name,sigma\na,ten\n")
    with pytest.raises(ImageReadError, match="meta.csv: line 2"):
        list_inputs(m)
    (m / "meta.csv").write_text("name,sigma\na,10\n")
    with pytest.raises(ImageReadError, match=r"outside \[0, 1\)"):
        list_inputs(m)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)  # Path.resolve raised RuntimeError on it, a traceback
    with pytest.raises(InputError, match="symbolic link loop"):
        list_inputs(loop)


def test_runner_refuses_names_that_collide_with_result_files(tmp_path):
    """An input 'a_diffusion' or 'a_p0' would overwrite input a's images/a_diffusion.png or a_p0.png (the
    runner's result names; other tools, which write no such files, read such sets)."""
    from diffusion_em.results import check_output_names
    for extra in ("a_diffusion", "a_p0"):
        d = tmp_path / extra
        (d / "blurry").mkdir(parents=True)
        for n in ("a", extra):
            np.save(d / "blurry" / f"{n}.npy", _rgb())
        names = {s.name for s in list_inputs(d)}
        assert names == {"a", extra}
        with pytest.raises(InputError, match=f"{extra} would overwrite .* of a "):
            check_output_names(d, names)
    check_output_names(tmp_path, {"b_diffusion", "c_p1"})  # the same suffixes without the base name: ordinary


def test_list_inputs_skips_names_with_control_characters_with_a_note(tmp_path):
    """A newline in a file name was logged as a space in metrics.csv, so the image was redone on every resume."""
    d = tmp_path / "ctl"
    (d / "blurry").mkdir(parents=True)
    for n in ("a\nb", "ok", "Shot at 10.00\u202fAM"):  # U+202F (macOS screenshot names) is not a control character
        np.save(d / "blurry" / f"{n}.npy", _rgb())
    notes = []
    assert [s.name for s in list_inputs(d, notice=notes.append)] == ["Shot at 10.00\u202fAM", "ok"]
    assert len(notes) == 1 and "control characters" in notes[0] and "'a\\nb'" in notes[0]


def test_meta_boundary_column_after_an_excel_bom(tmp_path):
    """read_meta_boundaries did not strip the BOM: the 'name' column was missed and circular sets ran as photos."""
    from util.inputs import read_meta_boundaries
    p = tmp_path / "meta.csv"
    p.write_bytes("\ufeffname,sigma,boundary\na,0.02,circular\n".encode("utf-8"))
    assert read_meta_boundaries(p) == {"a": "circular"}


def test_sharp_size_mismatch(tmp_path):
    _make_folder(tmp_path)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "sharp" / "a.png")
    with pytest.raises(ImageReadError, match="sharp"):
        load_sample(list_inputs(tmp_path)[0])


# ------------------------------------------------------------------------------------------ noise
def _smooth_image(n=256):
    yy, xx = np.mgrid[0:n, 0:n] / n
    base = np.stack([0.5 + 0.3 * np.sin(2 * np.pi * (c + 1) * xx) * np.cos(2 * np.pi * (2 - c) * yy * 1.5)
                     for c in range(3)], axis=-1)
    return base.astype(np.float64)


@pytest.mark.parametrize("sigma255", [5, 10, 20])
def test_noise_sigma_estimate(sigma255):
    sigma = sigma255 / 255
    y = _smooth_image() + np.random.default_rng(sigma255).normal(0, sigma, (256, 256, 3))
    est = estimate_noise_sigma(y)
    assert abs(est - sigma) / sigma < 0.15, (est, sigma)
    est_t = estimate_noise_sigma(torch.from_numpy(y).permute(2, 0, 1)[None])
    assert est_t == pytest.approx(est)


# ------------------------------------------------------------------------------------------ writers
def _no_temp(d: Path):
    return [f.name for f in d.iterdir() if f.name.endswith(".tmp")]


def test_atomic_writers(tmp_path):
    img = _rgb()
    out = tmp_path / "sub"
    save_png(out / "a.png", img)
    np.testing.assert_allclose(read_image(out / "a.png"), img, atol=0.5 / 255 + 1e-6)
    save_png(out / "t.png", torch.from_numpy(img).permute(2, 0, 1)[None])  # tensors accepted
    np.testing.assert_array_equal(read_image(out / "t.png"), read_image(out / "a.png"))
    save_npy(out / "a.npy", img * 2)
    np.testing.assert_array_equal(np.load(out / "a.npy"), img * 2)
    save_json(out / "a.json", {"psnr": float("inf"), "x": np.float32(1.5), "arr": np.arange(2)})
    import json
    assert json.loads((out / "a.json").read_text()) == {"psnr": None, "x": 1.5, "arr": [0, 1]}
    save_text(out / "a.txt", "hello")
    assert (out / "a.txt").read_text() == "hello"
    k = np.zeros((5, 5))
    k[2, 2], k[2, 3] = 1.0, 0.5
    save_kernel_png(out / "k.png", k, scale=4)
    kp = np.asarray(Image.open(out / "k.png"))
    assert kp.shape == (20, 20) and kp.max() == 255 and kp[8:12, 12:16].min() == 128
    save_gif(out / "a.gif", [img, 1 - img, img[..., 0]])
    assert Image.open(out / "a.gif").n_frames == 3
    assert _no_temp(out) == []


def test_atomic_write_failure_leaves_nothing(tmp_path):
    (tmp_path / "a.png").write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.png", boom)
    assert (tmp_path / "a.png").read_bytes() == b"old"
    assert _no_temp(tmp_path) == []


def test_csv_log_and_done_names(tmp_path):
    f = tmp_path / "metrics.csv"
    cols = ["name", "status", "psnr"]
    append_csv_row(f, cols, {"name": "a", "status": "ok", "psnr": 25.0})
    append_csv_row(f, cols, {"name": "b", "status": "failed: bad\nfile"})
    append_csv_row(f, cols, {"name": "c", "status": "ok"})
    with open(f, "a") as fh:
        fh.write("d,o")  # a row cut by a crash
    append_csv_row(f, cols, {"name": "c", "status": "failed"})  # a later retry of c that failed
    lines = f.read_text().splitlines()
    assert lines[0] == "name,status,psnr" and lines.count("name,status,psnr") == 1
    assert lines[2] == "b,failed: bad file," and lines[-1] == "c,failed,"
    assert read_done_names(f) == {"a"}
    assert read_done_names(tmp_path / "none.csv") == set()
    with pytest.raises(ValueError, match="differs"):
        append_csv_row(f, ["name", "psnr"], {"name": "x"})
    with pytest.raises(ValueError, match="not in the header"):
        append_csv_row(f, cols, {"name": "x", "bogus": 1})


# ------------------------------------------------------------------------------------------ montage
def test_montage_layout():
    y, x = _rgb(40, 50), _rgb(40, 50, 1)
    m = make_montage(y * 2, x)
    assert m.shape == (40, 2 * 50 + 4, 3) and m.max() <= 1
    k = np.zeros((9, 9))
    k[4, 4] = 1
    m = make_montage(y, x, x, k_est=k, k_true=np.ones((5, 5)))
    scale = min(8, 20 // 9)
    assert m.shape == (40 + 4 + 9 * scale, 3 * 50 + 8, 3)
    np.testing.assert_array_equal(m[:40, 54:104], x)


# ------------------------------------------------------------------------------------------ padding
@pytest.mark.parametrize("mode", ["reflect", "circular", "replicate"])
def test_pad_to_multiple_roundtrip(mode):
    x = torch.rand(2, 3, 37, 50)
    p, box = pad_to_multiple(x, 16, mode)
    assert p.shape[-2:] == (48, 64)
    assert torch.equal(crop(p, box), x)


def test_pad_larger_than_image_and_boundary():
    x = torch.rand(1, 3, 5, 6)
    p, box = pad_to_multiple(x, 32, "reflect")  # pad of 27 > 5 px: padded repeatedly
    assert p.shape[-2:] == (32, 32) and torch.equal(crop(p, box), x)
    y = np.random.default_rng(0).random((30, 40, 3)).astype(np.float32)
    for mode in ("reflect", "taper", "replicate", "circular"):
        yp, box = pad_for_boundary(y, 33, mode)
        assert yp.shape == (96, 106, 3) and box == (33, 33, 30, 40)
        np.testing.assert_array_equal(crop(yp, box), y)
    yp, _ = pad_for_boundary(y, 8, "reflect")
    np.testing.assert_array_equal(yp[7, 8:48], y[1])  # mirror without repeating the edge row
    yp, _ = pad_for_boundary(torch.from_numpy(y).permute(2, 0, 1)[None], 10, "taper")
    mean = torch.from_numpy(y).mean(dim=(0, 1))
    # the periodic seam joins values close to the image mean on both sides
    assert torch.allclose(yp[0, :, 0, 0], mean, atol=0.02) and torch.allclose(yp[0, :, -1, -1], mean, atol=0.02)
    with pytest.raises(ValueError, match="unknown padding mode"):
        pad_for_boundary(y, 4, "bogus")


# ------------------------------------------------------------------------------------------ bundled set
def test_bundled_testset_is_consistent():
    root = REPO / "testset"
    samples = list_inputs(root)
    assert len(samples) == 6 and {s.kind for s in samples} == {"folder"}
    for s in samples:
        ls = load_sample(s)
        assert ls.y.shape == (256, 256, 3) and ls.x_true.shape == (256, 256, 3) and ls.k_true.shape == (33, 33)
        assert min(abs(ls.sigma * 255 - v) for v in (5, 10, 20)) < 1e-9
        # y = k ⊛ x + n with the stored kernel, circular (docs/algorithm.md §2): the residual is the noise of std σ
        x = torch.from_numpy(ls.x_true).permute(2, 0, 1).double()
        r = torch.from_numpy(ls.y).permute(2, 0, 1).double() - conv_circular(x, torch.from_numpy(ls.k_true).double())
        assert abs(r.std().item() / ls.sigma - 1) < 0.03, s.name
        assert abs(r.mean().item()) < 0.1 * ls.sigma, s.name


def test_single_file_inputs(tmp_path):
    t = torch.zeros(1, 3, 8, 8)
    (tmp_path / "p.pickle").write_bytes(pickle.dumps({"H": t, "L": t, "kernel": torch.ones(1, 1, 3, 3), "sigma": 0.1}))
    assert list_inputs(tmp_path / "p.pickle")[0].kind == "pickle"
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not an image"):
        list_inputs(tmp_path / "x.txt")


def test_resolve_sigma():
    y = _smooth_image() + np.random.default_rng(3).normal(0, 10 / 255, (256, 256, 3))
    ls = LoadedSample("a", y.astype(np.float32))
    s, src = resolve_sigma(ls)
    assert src == "estimated" and abs(s * 255 - 10) < 1.5
    assert resolve_sigma(LoadedSample("a", ls.y, sigma=0.02)) == (0.02, "given")
    assert resolve_sigma(LoadedSample("a", ls.y, sigma=0.02), override=0.05) == (0.05, "override")
    with pytest.raises(ValueError, match="outside"):
        resolve_sigma(ls, override=10)


def test_list_inputs_notes_what_it_does_not_read(tmp_path):
    """kernel/a.png (not .npy) made case a run without its true kernel, and a folder in blurry/ was skipped, in
    silence; a name listed twice in meta.csv kept the last σ."""
    d = tmp_path / "set"
    for sub in ("blurry", "sharp", "kernel"):
        (d / sub).mkdir(parents=True)
    np.save(d / "blurry" / "a.npy", _rgb())
    (d / "blurry" / "b.png").mkdir()
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(d / "kernel" / "a.png")
    notes = []
    [s] = list_inputs(d, notice=notes.append)
    assert s.name == "a" and s.kernel is None
    assert len(notes) == 1 and "b.png/" in notes[0] and "kernel/a.png" in notes[0]
    (d / "meta.csv").write_text("name,sigma\na,0.01\na,0.02\n")
    with pytest.raises(ImageReadError, match="line 3: name 'a' is listed twice"):
        list_inputs(d)

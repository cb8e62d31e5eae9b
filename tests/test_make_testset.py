"""Test-set generator (diffusion_em.make_testset) and kernel files (util.kernel_files)."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat
from scipy.signal import convolve2d

from diffusion_em import make_testset as MT
from util.images import ImageReadError
from util.inputs import list_inputs, load_sample
from util.kernel_files import read_kernels


def _write_images(d):
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8)).save(d / "a.png")
    Image.fromarray((rng.random((36, 36, 4)) * 255).astype(np.uint8), "RGBA").save(d / "b.png")  # RGBA, small
    Image.fromarray((rng.random((45, 38)) * 255).astype(np.uint8)).save(d / "c.jpg")
    return d


def _write_kernels(d):
    d.mkdir()
    rng = np.random.default_rng(1)
    np.save(d / "k1.npy", rng.random((5, 5)))
    Image.fromarray((rng.random((7, 6)) * 255).astype(np.uint8)).save(d / "k2.png")
    savemat(d / "k3.mat", {"f": rng.random((9, 9)), "x": rng.random((30, 30)), "y": rng.random((30, 30))})
    return d


def _run(tmp_path, out, *extra):
    imgs = tmp_path / "imgs" if (tmp_path / "imgs").exists() else _write_images(tmp_path / "imgs")
    kern = tmp_path / "kern" if (tmp_path / "kern").exists() else _write_kernels(tmp_path / "kern")
    args = ["--images", str(imgs), "--kernels", "generate", str(kern), "--kernel_sizes", "9,11",
            "--sigmas", "5,10", "--size", "24", "--out", str(out), *extra]
    assert MT.main(args) == 0
    return out


def _files(d):
    return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != "README.md"}


@pytest.mark.parametrize("boundary", ["circular", "valid"])
def test_deterministic_for_a_seed(tmp_path, boundary):
    a = _files(_run(tmp_path, tmp_path / "a", "--boundary", boundary, "--seed", "3"))
    b = _files(_run(tmp_path, tmp_path / "b", "--boundary", boundary, "--seed", "3"))
    c = _files(_run(tmp_path, tmp_path / "c", "--boundary", boundary, "--seed", "4"))
    assert a == b
    assert a != c
    names = [p for p in a if p.parts[0] == "blurry"]
    assert len(names) == 3
    with open(tmp_path / "a" / "meta.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["boundary"] for r in rows} == {boundary}
    assert sorted(round(float(r["sigma"]) * 255) for r in rows) == [5, 5, 10]
    by_size = sorted(rows, key=lambda r: (int(r["kernel_size"]), r["name"]))  # σ alternates along kernel size
    assert [round(float(r["sigma"]) * 255) for r in by_size] == [5, 10, 5]
    # the runner's reader accepts the folder: ground truth, kernel, σ
    s = load_sample(list_inputs(tmp_path / "a")[0])
    assert s.y.shape == s.x_true.shape == (24, 24, 3) and s.sigma == pytest.approx(5 / 255)


def test_synthesize_circular_and_valid_are_the_stated_models():
    rng = np.random.default_rng(2)
    scene = rng.random((50, 60, 3))
    k = rng.random((5, 5))
    k /= k.sum()
    y, xt, _ = MT.synthesize(scene, k, 0.0, 20, "valid", "center", np.random.default_rng(0))
    big = np.round(scene[13:37, 18:42] * 255) / 255  # the centred 24×24 crop, quantised to 8 bits
    assert np.allclose(xt, big[2:22, 2:22])
    for c in range(3):  # valid true convolution of the larger crop: no border ever enters y
        assert np.allclose(y[:, :, c], convolve2d(big[:, :, c], k, mode="valid"), atol=1e-5)
    y, xt, _ = MT.synthesize(scene, k, 0.0, 20, "circular", "center", np.random.default_rng(0))
    wrap = np.pad(xt, ((2, 2), (2, 2), (0, 0)), mode="wrap")
    for c in range(3):
        assert np.allclose(y[:, :, c], convolve2d(wrap[:, :, c], k, mode="valid"), atol=1e-5)
    # an image smaller than the valid crop is upscaled, and the note says so
    _, xt, note = MT.synthesize(scene[:20, :20], k, 0.0, 20, "valid", "center", np.random.default_rng(0))
    assert xt.shape == (20, 20, 3) and note.startswith("upscaled")


def test_kernel_files(tmp_path):
    d = _write_kernels(tmp_path / "k")
    k3 = read_kernels(d / "k3.mat")  # Levin-style: the kernel is `f`, not the images x, y
    assert len(k3) == 1 and k3[0].shape == (9, 9) and k3[0].sum() == pytest.approx(1.0)
    assert read_kernels(d / "k2.png")[0].shape == (7, 6)
    np.save(d / "stack.npy", np.ones((3, 5, 5)))
    assert len(read_kernels(d / "stack.npy")) == 3
    savemat(d / "cells.mat", {"kernels": np.array([np.ones((3, 3)), np.ones((5, 5))], dtype=object)})
    assert [k.shape for k in read_kernels(d / "cells.mat")] == [(3, 3), (5, 5)]
    (d / "bad.txt").write_text("1 2 3")
    with pytest.raises(ImageReadError, match="bad.txt"):
        read_kernels(d / "bad.txt")
    savemat(d / "none.mat", {"a": np.ones((300, 300)), "b": np.ones((300, 300))})
    with pytest.raises(ImageReadError, match="no kernel variable"):
        read_kernels(d / "none.mat")
    # even-sized kernels are padded to an odd square so the centre tap is defined
    pool = MT.file_kernels([str(d / "k2.png")])
    assert pool[0].k.shape == (7, 7) and pool[0].k.sum() == pytest.approx(1.0)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    imgs = _write_images(tmp_path / "imgs")
    assert MT.main(["--images", str(imgs), "--kernel_sizes", "8", "--out", str(tmp_path / "o")]) == 2
    assert "odd" in capsys.readouterr().err
    assert MT.main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    for extra, msg in ((["--size", "0"], "--size 0: must be >= 1"),
                       (["--size", "7"], "smaller than the largest kernel (9 px)"),  # circular: k must fit the image
                       (["--out", str(imgs / "a.png")], "is a file, not a folder"),
                       (["--out", str(imgs / "a.png" / "sub")], "is a file, not a folder")):
        args = ["--images", str(imgs), "--kernel_sizes", "9", "--out", str(tmp_path / "o2"), *extra]
        assert MT.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o2").exists()
    assert MT.main(["--images", str(imgs), "--kernel_sizes", "9", "--size", "7", "--boundary", "valid",
                    "--out", str(tmp_path / "o3")]) == 0  # a valid-boundary case blurs a larger crop: 7 px is fine

"""The authors' pickle format gets the folder inputs' rules: a bad σ, kernel or image in one pickle is a failed
row naming the file, the run goes on, and no image's files are written without its row.

Tiny random models (the `tiny_run` fixture), 32×32 images, 4 steps, one particle.
"""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_em.run import main
from tests.cli import cli_args, metrics_rows
from util.images import ImageReadError
from util.inputs import Sample, load_sample
from util.outputs import make_montage


def _sample(side=32, ksize=5, seed=0) -> dict:
    """A valid sample in the authors' layout: float tensors, a not-normalised kernel, σ a float."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, side, side, generator=g)
    k = torch.rand(1, 1, ksize, ksize, generator=g)
    return {"H": x, "L": (x + 0.02 * torch.randn(x.shape, generator=g)), "kernel": k * 1.05 / k.sum(), "sigma": 0.02}


def _write(folder: Path, name: str, **change) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.pickle"
    p.write_bytes(pickle.dumps({**_sample(), **change}))
    return p


def _run(tiny_run, folder: Path, out: Path) -> int:
    tmp, cfgs, _ = tiny_run
    return main(cli_args(tmp, cfgs["fastem_pigdm"], folder, out, "--n_particles", "1", "--threads", "1"),
                method="fast_em")


def _files_of(out: Path, name: str) -> list:
    return sorted(str(f.relative_to(out)) for f in out.rglob(f"{name}*") if f.is_file())


BAD_SIGMAS = {"s_none": (None, "'sigma' is None"), "s_str": ("abc", "'sigma' is a str"),
              "s_list": ([0.02], "'sigma' is a list"), "s_pair": (torch.tensor([0.01, 0.02]), "2 values"),
              "s_ten": (10, "sigma 10 outside [0, 1)"), "s_255": (10.0, "sigma 10 outside [0, 1)"),
              "s_bool": (True, "'sigma' is a bool"), "s_nan": (float("nan"), "outside [0, 1)"),
              "s_neg": (-0.1, "outside [0, 1)")}


def test_sigma_is_one_number_in_0_1_as_meta_csv_requires(tmp_path):
    """σ None / 'abc' / a list / two values raised TypeError, ValueError, RuntimeError; σ 10 and True were read."""
    for name, (value, message) in BAD_SIGMAS.items():
        p = _write(tmp_path, name, sigma=value)
        with pytest.raises(ImageReadError) as e:
            load_sample(Sample(name, p, kind="pickle"))
        assert str(e.value).startswith(f"{p}: ") and message in str(e.value) and "\n" not in str(e.value), name
    for value in (0.02, 0, torch.tensor(0.02), torch.tensor([0.02]), torch.tensor([[0.02]], dtype=torch.float64)):
        p = _write(tmp_path, "ok", sigma=value)
        assert load_sample(Sample("ok", p, kind="pickle")).sigma == pytest.approx(float(value))


def test_a_bad_pickle_sigma_corrected_by_meta_csv_or_the_flag_is_not_needed(tmp_path):
    """meta.csv's σ (or --sigma) overrides the pickle's own, so a pickle storing σ in /255 units can be corrected
    without rewriting it; the pickle's σ is checked only when it is the one used."""
    p = _write(tmp_path, "s255", sigma=10)
    assert load_sample(Sample("s255", p, sigma=10 / 255, kind="pickle")).sigma == pytest.approx(10 / 255)
    assert load_sample(Sample("s255", p, kind="pickle"), sigma_given=True).sigma is None
    with pytest.raises(ImageReadError, match="sigma 10 outside"):
        load_sample(Sample("s255", p, kind="pickle"))


def test_bad_sigmas_are_failed_rows_and_the_run_goes_on(tiny_run):
    """σ None / 'abc' / a list / two values stopped the whole run with a traceback; σ 10 and True ran."""
    tmp, _, _ = tiny_run
    folder = tmp / "pk"
    for name, (value, _) in BAD_SIGMAS.items():
        _write(folder, name, sigma=value)
    _write(folder, "z_good")  # after every bad one
    out = tmp / "out"
    assert _run(tiny_run, folder, out) == 1
    rows = {r["name"]: r for r in metrics_rows(out)}
    assert rows["z_good"]["status"] == "ok"
    for name, (_, message) in BAD_SIGMAS.items():
        assert rows[name]["status"] == "failed", name
        assert f"{name}.pickle" in rows[name]["message"] and message in rows[name]["message"], rows[name]
        assert _files_of(out, name) == []


BAD_CONTENT = {  # name: (what to change, the folder inputs' message)
    "k_1x1": ({"kernel": torch.ones(1, 1, 1, 1)}, "at least 3×3"),
    "k_2x2": ({"kernel": torch.ones(1, 1, 2, 2)}, "at least 3×3"),
    "k_neg": ({"kernel": torch.tensor([[[[0.5, 0.6, -0.2], [0, 0.1, 0], [0, 0, 0]]]])}, "negative taps"),
    "l_255": ({"L": 255 * _sample()["L"]}, "0..255"),
    "h_255": ({"H": 255 * _sample()["H"]}, "0..255"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONTENT))
def test_pickles_get_the_folder_inputs_checks(tmp_path, name):
    change, message = BAD_CONTENT[name]
    p = _write(tmp_path, name, **change)
    with pytest.raises(ImageReadError) as e:
        load_sample(Sample(name, p, kind="pickle"))
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value)


def test_a_kernel_larger_than_the_image_is_refused(tmp_path):
    s = _sample(side=48)
    p = tmp_path / "big.pickle"
    p.write_bytes(pickle.dumps({**s, "kernel": torch.rand(1, 1, 60, 60) + 0.1}))
    with pytest.raises(ImageReadError, match=r"big.pickle: kernel \(60, 60\) is larger than the image \(48, 48\)"):
        load_sample(Sample("big", p, kind="pickle"))


def test_uint8_tensors_are_read_as_8_bit_images(tmp_path):
    """As a uint8 .npy: divided by 255 (it was read as 0..255 floats)."""
    s = _sample()
    p = _write(tmp_path, "u8", H=(s["H"] * 255).round().to(torch.uint8), L=(s["L"].clamp(0, 1) * 255).round().to(torch.uint8))
    d = load_sample(Sample("u8", p, kind="pickle"))
    assert 0 <= d.y.min() and d.y.max() <= 1 and np.abs(d.x_true - s["H"][0].permute(1, 2, 0).numpy()).max() <= 0.5 / 255 + 1e-6


def test_bad_kernels_and_images_are_failed_rows_with_no_files_and_the_run_goes_on(tiny_run):
    """A 1×1 kernel crashed make_montage after the image and kernel files were written (no row), and the images
    after it never ran; negative taps, a kernel larger than the image and 0..255 images were accepted."""
    tmp, _, _ = tiny_run
    folder = tmp / "pk"
    for name, (change, _) in BAD_CONTENT.items():
        _write(folder, name, **change)
    s = _sample(side=48)
    (folder / "k_big.pickle").write_bytes(pickle.dumps({**s, "kernel": torch.rand(1, 1, 60, 60) + 0.1}))
    _write(folder, "z_good")
    out = tmp / "out"
    assert _run(tiny_run, folder, out) == 1
    rows = {r["name"]: r for r in metrics_rows(out)}
    assert rows["z_good"]["status"] == "ok"
    expected = {**{n: m for n, (_, m) in BAD_CONTENT.items()}, "k_big": "larger than the image"}
    for name, message in expected.items():
        assert rows[name]["status"] == "failed" and f"{name}.pickle" in rows[name]["message"], rows[name]
        assert message in rows[name]["message"], rows[name]
        assert _files_of(out, name) == [], name


def test_the_montage_takes_a_one_tap_kernel():
    img = np.full((16, 16, 3), 0.5, np.float32)
    m = make_montage(img, img, img, np.ones((1, 1)), np.ones((1, 1, 1, 1)))
    assert m.shape[1] == 3 * 16 + 2 * 4 and m.shape[0] > 16


@pytest.mark.parametrize("where", ["diffusion_em.results.make_montage", "diffusion_em.run.evaluate"])
def test_no_files_are_written_when_the_outputs_cannot_be_made(tiny_run, monkeypatch, where):
    """Everything an image writes is computed before its first file: a failure there leaves no file without
    a row (it wrote images/ and kernels/ before the montage and the metrics)."""
    tmp, _, _ = tiny_run
    folder = tmp / "pk"
    _write(folder, "a")

    def broken(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(where, broken)
    out = tmp / "out"
    with pytest.raises(RuntimeError, match="a bug"):
        _run(tiny_run, folder, out)
    assert _files_of(out, "a") == []


def test_the_baselines_take_sigma_from_the_flag_over_a_bad_pickle_sigma(tmp_path):
    """baselines --sigma still read the pickle's own σ first, so a pickle storing σ in /255 units failed there."""
    import csv
    from diffusion_em.baselines import main as baselines_main
    _write(tmp_path / "pk", "s255", sigma=10)
    out = tmp_path / "out"
    assert baselines_main(["--method", "tikhonov", "--input_dir", str(tmp_path / "pk"), "--save_dir", str(out),
                           "--kernel_size", "5", "--sigma", "0.04"]) == 0
    row = next(csv.DictReader(open(out / "metrics.csv", encoding="utf-8")))
    assert row["status"] == "ok" and float(row["sigma"]) == pytest.approx(0.04)

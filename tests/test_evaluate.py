"""diffusion_em.evaluate on a folder of foreign outputs (any method, named like the test set)."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from diffusion_em import evaluate as EV
from diffusion_em import make_testset as MT
from util.inputs import list_inputs, load_sample
from util.outputs import save_png


@pytest.fixture
def testset(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # smooth images: a 1-px shift of them is not a 0 dB disaster, but is clearly visible
        base = rng.random((8, 8, 3))
        im = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((64, 64), Image.BICUBIC))
        Image.fromarray(im).save(imgs / f"im{i}.png")
    out = tmp_path / "set"
    assert MT.main(["--images", str(imgs), "--kernels", "generate", "--kernel_sizes", "9", "--size", "48",
                    "--sigmas", "5,10,20", "--out", str(out)]) == 0
    return out


def test_evaluate_foreign_outputs(testset, tmp_path):
    res, orc = tmp_path / "res", tmp_path / "orc"
    samples = list_inputs(testset)
    rng = np.random.default_rng(1)
    for s in samples[:2]:  # the third case has no result: reported 'missing', not scored
        x = load_sample(s).x_true
        save_png(res / "images" / f"{s.name}.png", np.roll(x, 1, axis=1))  # a method whose output is shifted
        save_png(orc / f"{s.name}.png", np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1))
    (res / "metrics.csv").write_text("name,status,seconds,nfe\n" + f"{samples[0].name},ok,1.5,100\n")
    assert EV.main(["--testset", str(testset), "--results", str(res), "--oracle", str(orc)]) == 0
    with open(res / "eval.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    a, b, c = (rows[s.name] for s in samples)
    assert a["status"] == b["status"] == "ok" and c["status"] == "missing"
    assert float(a["psnr_aligned"]) > 45 > float(a["psnr"])  # the shift costs plain PSNR, not aligned
    assert (float(a["shift_y"]), float(a["shift_x"])) == (0.0, 1.0)  # est(i, j + 1) = x(i, j)
    assert float(a["error_ratio"]) < 0.05  # better than a noisy oracle: 8-bit rounding error only
    assert a["seconds"] == "1.5" and a["nfe"] == "100" and a["kernel_size"] == "9" and a["boundary"] == "circular"
    assert a["kernel_mse"] == ""  # this method wrote no kernel
    assert float(a["psnr_blurry_aligned"]) < float(a["psnr_aligned"])
    summary = json.loads((res / "eval.json").read_text())
    assert summary["ok"] == 2 and summary["missing"] == 1 and summary["all"]["success_le2"] == 1.0
    assert set(summary["by_sigma"]) == {"5/255", "10/255"} and set(summary["by_kernel_size"]) == {"≤13 px"}


def test_score_case_with_kernel_and_wrong_size(testset, tmp_path):
    s = load_sample(list_inputs(testset)[0])
    row = EV.score_case(s.x_true, s, s.k_true, s.sigma)
    assert row["psnr"] == math.inf and row["kernel_mse"] == 0.0 and abs(row["reblur_error"]) < 1e-3
    res = tmp_path / "bad"
    save_png(res / "images" / f"{s.name}.png", s.x_true[:40])
    rows = EV.evaluate_folder(testset, res)
    assert rows[0]["status"] == "failed" and "result is" in rows[0]["message"]
    assert EV.size_bin(9) == "≤13 px" and EV.size_bin(27) == "23–33 px" and EV.size_bin(None) is None


def test_missing_folders_and_a_file_as_out_are_one_line_errors(testset, tmp_path, capsys):
    res = tmp_path / "res"
    s = list_inputs(testset)[0]
    save_png(res / "images" / f"{s.name}.png", load_sample(s).x_true)
    (tmp_path / "a_file").write_text("keep me")
    cases = [(["--results", str(tmp_path / "typo")], "--results"),
             (["--results", str(res), "--oracle", str(tmp_path / "no_oracle")], "--oracle"),
             (["--results", str(res), "--out", str(tmp_path / "a_file")], "--out"),
             (["--results", str(res), "--out", str(tmp_path / "a_file" / "sub")], "--out")]
    for extra, flag in cases:
        assert EV.main(["--testset", str(testset), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "typo").exists() and not (res / "eval.csv").exists()  # nothing created or written
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_a_kernel_larger_than_the_image_names_the_file(testset, tmp_path):
    res = tmp_path / "res"
    s = list_inputs(testset)[0]
    save_png(res / "images" / f"{s.name}.png", load_sample(s).x_true)
    (res / "kernels").mkdir()
    np.save(res / "kernels" / f"{s.name}.npy", np.full((51, 51), 1 / 51 ** 2, np.float32))  # the image is 48²
    row = EV.evaluate_folder(testset, res)[0]
    assert row["status"] == "failed" and str(res / "kernels" / f"{s.name}.npy") in row["message"]
    assert "larger than the image 48x48" in row["message"]

"""bench/table.py on a folder of real captures: no meta.csv (no σ, no boundary declared), a failed blind case."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from util.fft import conv_circular
from util.outputs import save_png

ROOT = Path(__file__).resolve().parents[1]


def _table_module():
    spec = importlib.util.spec_from_file_location("bench_table", ROOT / "bench" / "table.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_table"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _capture_folder(root: Path) -> dict:
    """Two grayscale 'captures' in the levin_real layout (blurry/ sharp/ kernel/, no meta.csv)."""
    import torch
    rng = np.random.default_rng(0)
    k = np.zeros((7, 7))
    k[3, 1:6] = 1.0
    k /= k.sum()
    truth = {}
    for name in ("a", "b"):
        base = rng.random((7, 7))
        x = np.asarray(Image.fromarray((base * 255).astype(np.uint8)).resize((56, 56), Image.BICUBIC)) / 255.0
        y = conv_circular(torch.from_numpy(x), torch.from_numpy(k)).numpy()
        for sub, im in (("sharp", x), ("blurry", y)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)).save(root / sub / f"{name}.png")
        (root / "kernel").mkdir(exist_ok=True)
        np.save(root / "kernel" / f"{name}.npy", k.astype(np.float32))
        truth[name] = (x, y)
    return truth


def test_table_on_real_captures_without_meta(tmp_path):
    table = _table_module()
    data = tmp_path / "caps"
    truth = _capture_folder(data)
    res = tmp_path / "res" / "caps"
    rng = np.random.default_rng(1)
    for name, (x, y) in truth.items():
        save_png(res / "blurry" / "images" / f"{name}.png", np.clip(y, 0, 1)[..., None])
        save_png(res / "hyper_laplacian" / "images" / f"{name}.png", np.clip(x + rng.normal(0, 0.03, x.shape), 0, 1)[..., None])
    # the blind method: case a a 1-px shifted, slightly noisy result (ratio < 1 after alignment); b failed
    xa = truth["a"][0]
    save_png(res / "l0_blind" / "images" / "a.png", np.clip(np.roll(xa, 1, axis=1) + rng.normal(0, 0.01, xa.shape), 0, 1)[..., None])
    (res / "l0_blind" / "metrics.csv").write_text("name,status,message,seconds,nfe\na,ok,,2.0,0\nb,failed,diverged,,\n")
    out = tmp_path / "bench.md"
    assert table.main(["--testset", str(data), "--methods", "blurry,hyper_laplacian,l0_blind", "--results_root",
                       str(tmp_path / "res"), "--no_run", "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    md = out.read_text()
    assert "## caps" in md and "l0_blind 1 (+1 failed)" in md
    assert "2 undeclared" in md and "No case declares σ" in md
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| a |") or line.startswith("| b |")}
    assert rows["b"][-1] == "FAILED" and rows["b"][0] == "7"
    psnr_a, ratio_a = rows["a"][-1].split(" ")
    assert float(psnr_a) > 35 and float(ratio_a.strip("()")) < 0.5
    assert "1 failed, counted as ∞): ratio ≤ 2 on 1 (50%)" in md
    summary = json.loads((res / "l0_blind" / "eval.json").read_text())
    assert list(summary["by_sigma"]) == ["not declared"] and summary["failed"] == 1


def test_regenerating_keeps_the_hand_written_analysis():
    table = _table_module()
    a, b = table.ANALYSIS
    old = f"# Benchmarks\n\nold header\n\n{a}\nFast EM loses at σ 20/255.\n{b}\n\n## set\n\n| old table |\n"
    new = "# Benchmarks\n\nnew header\n\n## set\n\n| new table |\n"
    out = table.keep_analysis(new, old)
    assert out.count("Fast EM loses at σ 20/255.") == 1 and "old" not in out.replace("old header", "")
    assert out.index("new header") < out.index(a) < out.index("## set") < out.index("| new table |")
    assert table.keep_analysis(new, "no block here") == new

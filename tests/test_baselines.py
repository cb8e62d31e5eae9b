"""Classical baselines: non-blind solvers (classical.nonblind), the ℓ0 blind method (classical.blind_l0),
and the harness (diffusion_em.baselines) on tiny cases."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml

from classical import nonblind as NB
from classical.blind_l0 import (L0Config, _clean, estimate_kernel, estimate_kernel_ls, estimate_kernel_masked,
                                hysteresis_support)
from diffusion_em import baselines as BL
from diffusion_em import make_testset as MT
from util.fft import conv_circular
from util.metrics import aligned_scores, kernel_mse, psnr


def _blocks(n=96, seed=0):
    """A piecewise-constant scene: sharp edges in every direction, as the ℓ0 prior assumes."""
    rng = np.random.default_rng(seed)
    x = np.full((n, n), 0.5)
    for _ in range(30):
        r, c = rng.integers(0, n - 8, 2)
        h, w = rng.integers(4, n // 3, 2)
        x[r:r + h, c:c + w] = rng.random()
    return torch.from_numpy(x)


def _l_kernel(s=11):
    k = torch.zeros(s, s, dtype=torch.float64)
    k[s // 2, 2:s - 2] = 1.0
    k[2:s // 2, s - 3] = 1.0
    return k / k.sum()


def test_tikhonov_inverts_without_noise(one_thread):
    x = _blocks(64)
    k = torch.tensor([[0.0, 0.1, 0.0], [0.1, 0.6, 0.1], [0.0, 0.1, 0.0]], dtype=torch.float64)  # invertible OTF
    y = conv_circular(x, k)
    assert torch.allclose(NB.tikhonov(y, k, 1e-12), x, atol=1e-6)
    assert NB.tikhonov_lambda(0.02) == pytest.approx(NB.TIKHONOV_C * 0.02 ** 2)


@pytest.mark.parametrize("alpha", [1.0, 2 / 3, 0.5])
def test_shrink_is_the_1d_minimiser(alpha):
    v = torch.linspace(-2, 2, 81, dtype=torch.float64)
    beta = 3.0
    w = NB._shrink(v, beta, alpha)
    grid = torch.linspace(-2.5, 2.5, 20001, dtype=torch.float64)
    energy = grid.abs()[None] ** alpha + 0.5 * beta * (grid[None] - v[:, None]) ** 2
    ref = grid[energy.argmin(1)]
    e = lambda ww: ww.abs() ** alpha + 0.5 * beta * (ww - v) ** 2  # noqa: E731
    assert torch.all(e(w) <= e(ref) + 1e-6)  # at least as good as a fine brute-force search


def test_hyper_laplacian_and_oracle_beat_the_blurry_input(one_thread):
    x = _blocks(64)
    k = _l_kernel(9)
    sigma = 0.02
    y = conv_circular(x, k) + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p_blur = psnr(y, x)
    p_hl = psnr(NB.hyper_laplacian(y, k, NB.hyper_laplacian_lambda(sigma)), x)
    lam, xo = NB.oracle_lambda(lambda lam: NB.tikhonov(y, k, lam), x, NB.log_grid(1e-3, 1.0, 4))
    assert p_hl > p_blur + 3 and psnr(xo, x) > p_blur + 2
    assert all(psnr(NB.tikhonov(y, k, g), x) <= psnr(xo, x) + 1e-9 for g in NB.log_grid(1e-3, 1.0, 4))


def test_oracle_lambda_tunes_on_the_aligned_error(one_thread):
    # a result shifted by 2 px (a real capture's off-centre kernel): the aligned error picks the λ of the
    # unshifted problem; the plain MSE picks a larger, over-smoothing λ (it blurs to hide the shift)
    x = _blocks(64)
    k = _l_kernel(9)
    y = conv_circular(x, k) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grid = NB.log_grid(1e-4, 10.0, 8)
    lam0, _ = NB.oracle_lambda(lambda lam: NB.tikhonov(y, k, lam), x, grid)
    shifted = lambda lam: torch.roll(NB.tikhonov(y, k, lam), 2, dims=-1)[None, None]  # noqa: E731
    x4 = x[None, None]
    err = BL.aligned_mse(x4, 9, shifted(NB.tikhonov_lambda(0.01)))
    assert err(torch.roll(x4, 2, dims=-1)) == pytest.approx(0.0, abs=1e-12)
    lam_aligned, _ = NB.oracle_lambda(shifted, x4, grid, error=err)
    lam_plain, _ = NB.oracle_lambda(shifted, x4, grid)
    assert lam_aligned == lam0 and lam_plain > 3 * lam0


def test_l0_blind_recovers_a_simple_kernel_without_noise(one_thread):
    x = _blocks(96)
    k = _l_kernel(11)
    y = conv_circular(x, k)
    k_est = estimate_kernel(y, 15, L0Config())
    assert k_est.shape == (15, 15) and float(k_est.sum()) == pytest.approx(1.0) and float(k_est.min()) >= 0
    mse, _ = kernel_mse(k_est.numpy(), k.numpy())
    dirac = np.zeros((15, 15))
    dirac[7, 7] = 1
    assert mse < 0.1 * kernel_mse(dirac, k.numpy())[0]
    # the estimate sharpens: non-blind deconvolution with it is far better than the blurry input (after the
    # shift that blind deconvolution cannot determine: the estimate is centred by its centre of mass)
    x_est = NB.tikhonov(y, k_est, 1e-3)
    assert aligned_scores(x_est, x, 15)["psnr_aligned"] > aligned_scores(y, x, 15)["psnr_aligned"] + 5


def test_masked_kernel_step_ignores_the_padding(one_thread):
    # the padding band holds the mirror-image blur (flipped kernel), as a mirrored border does: the FFT step
    # over the whole frame averages k with its flip; the masked step, on the observed pixels only, finds k
    x = _blocks(96)
    k = _l_kernel(11)
    y = conv_circular(x, k)
    band = torch.ones_like(x, dtype=torch.bool)
    band[16:80, 16:80] = False
    y = torch.where(band, conv_circular(x, k.flip(-1, -2)), y)
    mask = (~band).to(x)
    k0 = torch.zeros(11, 11, dtype=torch.float64)
    k0[5, 5] = 1
    ref = kernel_mse(k0.numpy(), k.numpy())[0]
    masked = estimate_kernel_masked(x, y, k0, 1e-6, 0.0, mask, 60)
    assert kernel_mse(masked.numpy(), k.numpy())[0] < 1e-3 * ref
    assert kernel_mse(estimate_kernel_ls(x, y, 11, 1e-6, 0.0).numpy(), k.numpy())[0] > 1e-2 * ref
    # through estimate_kernel: the box names the observed pixels; all-observed falls back to the FFT step
    assert torch.equal(estimate_kernel(y, 11, L0Config(masked=True, iters=1), box=(0, 0, 96, 96)),
                       estimate_kernel(y, 11, L0Config(iters=1)))


def test_hysteresis_keeps_the_dim_connected_part_and_drops_specks():
    k = torch.zeros(9, 9, dtype=torch.float64)
    k[4, 1:8] = torch.tensor([1.0, 0.5, 0.08, 0.06, 0.07, 0.3, 0.2])  # a line with a dim middle
    k[0, 0] = k[8, 0] = 0.09  # isolated specks between the two thresholds
    keep = hysteresis_support(k, 0.15, 0.05)
    assert keep[4, 1:8].all() and int(keep.sum()) == 7
    assert int(hysteresis_support(k, 0.15, 0.15).sum()) == 4  # plain threshold: the dim middle goes too
    cleaned = _clean(k, 0.15, 0.05)
    assert float(cleaned.sum()) == pytest.approx(1.0) and int((cleaned > 0).sum()) == 7
    noisy = k.clone()
    noisy[1, 1] = -0.1  # the raw solution's noise reaches 10 % of the max: the dim middle is not trusted
    assert int((_clean(noisy, 0.15, 0.05, noise_floor=1.0) > 0).sum()) == 4
    assert int((_clean(noisy, 0.15, 0.05, noise_floor=0.0) > 0).sum()) == 7


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bl")
    imgs = root / "imgs"
    imgs.mkdir()
    from PIL import Image
    for i in range(2):
        Image.fromarray((_blocks(56, seed=i).numpy() * 255).astype(np.uint8)).save(imgs / f"b{i}.png")
    sets = {}
    for b in ("circular", "valid"):
        sets[b] = root / b
        assert MT.main(["--images", str(imgs), "--kernel_sizes", "9", "--size", "48", "--sigmas", "5",
                        "--boundary", b, "--out", str(sets[b])]) == 0
    return root, sets


@pytest.mark.parametrize("method", BL.METHODS)
def test_each_baseline_on_a_tiny_case(tiny_sets, method, one_thread):
    root, sets = tiny_sets
    for b, d in sets.items():
        out = root / f"out_{method}_{b}"
        assert BL.main(["--method", method, "--input_dir", str(d), "--save_dir", str(out), "--kernel_size", "9"]) == 0
        with open(out / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["status"] for r in rows] == ["ok", "ok"]
        assert {r["boundary_mode"] for r in rows} == {"circular" if b == "circular" else "taper"}
        assert all((out / "images" / f"{r['name']}.png").is_file() for r in rows)
        assert (out / "kernels").is_dir() == (method == "l0_blind")
        if method != "blurry" and not (method == "l0_blind" and b == "valid"):  # 48² is too small to promise more
            assert all(float(r["psnr_aligned"]) > float(r["psnr_blurry_aligned"]) for r in rows), rows
        assert BL.main(["--method", method, "--input_dir", str(d), "--save_dir", str(out), "--kernel_size", "9"]) == 0
        with open(out / "metrics.csv", newline="") as f:
            assert len(list(csv.DictReader(f))) == 2  # finished images are skipped on a rerun


def test_kernel_sources_for_the_em_drivers(one_thread):
    """`kernel`: em → neither (Dirac start); l0 → the ℓ0 kernel fixed; l0_em → it as the M-step's start;
    auto → l0 on photos (non-periodic boundary), l0_box on circular sets; the oracle's true kernel wins."""
    from diffusion_em.mstep import support_box
    from diffusion_em.restore import kernel_source, kernels_for
    x = _blocks(96)
    k = _l_kernel(11)
    y = conv_circular(x, k)[None].expand(1, 3, 96, 96).float()
    k_l0 = estimate_kernel(y[0].double(), 15).float()
    assert kernels_for("em", y, 15, None, None) == (None, None, None, None)
    fixed = kernels_for("l0", y, 15, None, None)
    start = kernels_for("l0_em", y, 15, None, None)
    box = kernels_for("l0_box", y, 15, None, None)
    assert fixed.k_init is None and fixed.support is None and start.fixed_kernel is None and start.support is None
    assert fixed.fixed_kernel.shape == (15, 15) and fixed.fixed_kernel.dtype == torch.float32
    assert torch.allclose(fixed.fixed_kernel, k_l0, atol=1e-6) and torch.equal(start.k_init, fixed.fixed_kernel)
    assert box.k_init is None and box.fixed_kernel is None and torch.equal(box.support, support_box(fixed.fixed_kernel))
    assert all(torch.equal(st.l0, fixed.fixed_kernel) for st in (fixed, start, box))  # kept for classical_fallback
    oracle = kernels_for("l0", y, 15, None, k)
    assert oracle.k_init is None and oracle.support is None and oracle.fixed_kernel.shape == (15, 15)
    assert torch.allclose(oracle.fixed_kernel.sum(), torch.tensor(1.0))
    assert [kernel_source("auto", b) for b in ("circular", "taper", "reflect")] == ["l0_box", "l0", "l0"]
    assert kernel_source("l0_em", "circular") == "l0_em"


def test_photos_without_sharp_images_print_na_and_summarise(tmp_path, capsys, one_thread):
    """No ground truth (and 24 px, too small for the aligned PSNR): the scores are None, printed as n/a."""
    from PIL import Image
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray((_blocks(24, seed=i).numpy() * 255).astype(np.uint8)).convert("RGB").save(photos / f"p{i}.png")
    out = tmp_path / "out"
    assert BL.main(["--method", "blurry", "--input_dir", str(photos), "--save_dir", str(out), "--kernel_size", "9"]) == 0
    assert capsys.readouterr().out.count("PSNR n/a (aligned n/a)") == 2
    assert json.loads((out / "summary.json").read_text())["ok"] == 2


def test_rerun_with_other_settings_is_refused_unless_overwrite(tiny_sets, tmp_path, capsys, one_thread):
    _, sets = tiny_sets
    out = tmp_path / "out"
    run = lambda method, *extra: BL.main(["--method", method, "--input_dir", str(sets["circular"]),  # noqa: E731
                                          "--save_dir", str(out), "--kernel_size", "9", *extra])

    def methods():
        with open(out / "metrics.csv", newline="") as f:
            return [r["method"] for r in csv.DictReader(f)]
    assert run("blurry") == 0 and yaml.safe_load((out / "config.yaml").read_text())["settings"]["method"] == "blurry"
    capsys.readouterr()
    assert run("tikhonov") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "'blurry' → 'tikhonov'" in err and len(err.strip().splitlines()) == 1
    assert methods() == ["blurry", "blurry"] and json.loads((out / "summary.json").read_text())["method"] == "blurry"
    assert run("blurry", "--l0", '{"iters": 3}') == 0  # --l0 does not apply to blurry: the same settings, resumed
    assert run("tikhonov", "--overwrite") == 0
    assert methods() == ["tikhonov", "tikhonov"] and json.loads((out / "summary.json").read_text())["method"] == "tikhonov"
    assert len(list(out.glob("metrics.csv.replaced-*"))) == 1  # the old record is kept aside, not lost


@pytest.mark.parametrize("flag", [["--max_images", "0"], ["--max_images", "-1"], ["--threads", "0"],
                                  ["--threads", "100000"], ["--l0", "{bad"]])  # 10⁵ threads crashed torch
def test_bad_flags_are_one_line_errors(tiny_sets, tmp_path, capsys, flag):
    _, sets = tiny_sets
    out = tmp_path / "out"
    assert BL.main(["--method", "blurry", "--input_dir", str(sets["circular"]), "--save_dir", str(out), *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[0]} ") and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before anything is written

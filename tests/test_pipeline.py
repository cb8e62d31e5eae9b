"""End-to-end smoke tests of the entry scripts' job with a tiny random UNet (few steps) on every input format."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_em.run import main
from tests.cli import cli_args as _args, metrics_rows as _rows

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def setup(tiny_run):
    """Tiny weights + configs (few steps, 9×9 kernels) + a 2-image test-set folder (conftest.tiny_run)."""
    return tiny_run


@pytest.mark.parametrize("name,method", [("fastem_pigdm", "fast_em"), ("fastem_pigdm_paper", "fast_em"),
                                         ("fastem_dps", "fast_em"), ("pigdm", "diffusion_em"), ("dps", "diffusion_em")])
def test_all_configs_end_to_end(setup, name, method):
    tmp, cfgs, data = setup
    out = tmp / f"out_{name}"
    assert main(_args(tmp, cfgs[name], data, out), method=method) == 0
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["im0", "im1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["diffusion"]["method"] == method and summary["images"] == 2
    assert (out / "config.yaml").exists()
    for r in rows:
        assert r["status"] == "ok", r["message"]
        assert (out / "images" / f"{r['name']}.png").exists() and (out / "kernels" / f"{r['name']}.png").exists()
        assert (out / "montage" / f"{r['name']}.png").exists()
        k = np.load(out / "kernels" / f"{r['name']}.npy")
        assert k.shape == (9, 9) and abs(k.sum() - 1) < 1e-4 and k.min() >= 0
        for f in ("psnr", "ssim", "kernel_mse", "kernel_mse_raw", "reblur_error", "seconds", "psnr_blurry",
                  "reblur_rms_frame"):
            assert np.isfinite(float(r[f]))
        assert set(filter(None, r["flag"].split(";"))) <= {"worse_than_blurry", "poor_fit"}
        expect_nfe = 4 if method == "fast_em" else 8
        assert int(r["nfe"]) == expect_nfe


def test_output_mean_writes_the_particle_average(setup):
    """output: mean saves the average of the particles (each saved as <name>_p<j>.png); sample the first one."""
    tmp, cfgs, data = setup
    d = yaml.safe_load(cfgs["fastem_pigdm"].read_text())
    for output in ("mean", "sample"):
        p = tmp / f"diff_{output}.yaml"
        p.write_text(yaml.safe_dump({**d, "n_particles": 3, "branch_fraction": 0.5, "output": output,
                                     "classical_blend": 0.0}))
        out = tmp / f"out_{output}"
        assert main(_args(tmp, p, data, out, "--save_npy", "--max_images", "1"), method="fast_em") == 0
        parts = [np.asarray(Image.open(out / "images" / f"im0_p{j}.png"), np.float64) / 255 for j in range(3)]
        got = np.load(out / "npy" / "im0.npy")
        want = np.mean(parts, 0) if output == "mean" else parts[0]
        assert np.abs(got - want).max() <= 1.5 / 255  # the particle PNGs are 8-bit
        assert np.abs(parts[0] - parts[1]).max() > 2 / 255  # the particles differ


def test_precision_auto_builds_a_bf16_denoiser_where_the_cpu_has_units(setup, monkeypatch):
    """The flag reaches the UNet: `--precision auto` autocasts to bf16 with BF16 units and not without."""
    from diffusion_em import restore as R
    from diffusion_em.run import build_parser, restorer_from_args
    tmp, cfgs, data = setup
    for units, dtype in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(R, "cpu_has_bf16_units", lambda units=units: units)
        args = build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o") + ["--precision", "auto"])
        r = restorer_from_args(args, "fast_em")
        assert r.denoiser.autocast_dtype is dtype and r.precision == ("bf16" if units else "fp32")


def _restorer_and_first_sample(setup):
    """The fastem_pigdm restorer built from the runner's flags, and the set's first sample with its y tensor."""
    from diffusion_em.run import build_parser, restorer_from_args
    from util.images import image_to_tensor
    from util.inputs import list_inputs, load_sample

    tmp, cfgs, data = setup
    args = build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o"))
    s = load_sample(list_inputs(data)[0])
    return restorer_from_args(args, "fast_em"), s, image_to_tensor(s.y)


@pytest.mark.parametrize("boundary", ["circular", "taper"])
def test_classical_blend_mixes_in_the_hyper_laplacian_deconvolution_with_the_final_kernel(setup, boundary):
    """classical_blend w: the output is (1 − w)·diffusion + w·(Krishnan–Fergus deconvolution of y with the run's
    own final kernel, on the run's padded frame, cropped back); the diffusion run itself is unchanged."""
    import dataclasses

    from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda
    from diffusion_em.restore import restore
    from util.geometry import crop, pad_for_boundary

    base, s, y = _restorer_and_first_sample(setup)
    runs = {}
    for w in (0.0, 0.25):
        r = dataclasses.replace(base, dcfg=dataclasses.replace(base.dcfg, classical_blend=w, output="mean"))
        runs[w] = restore(r, y, s.sigma, torch.Generator().manual_seed(3), boundary=boundary)
    plain, blended = runs[0.0], runs[0.25]
    assert plain.classical is None and torch.equal(plain.x, blended.x) and torch.equal(plain.kernel, blended.kernel)
    yp, box = (y, (0, 0, 32, 32)) if boundary == "circular" else pad_for_boundary(y, base.kernel_size, boundary)
    want = crop(hyper_laplacian(yp.double(), blended.kernel.double(), hyper_laplacian_lambda(s.sigma)).clamp(0, 1), box)
    assert torch.allclose(blended.classical.double(), want, atol=1e-6)
    assert (blended.classical - plain.x_mean).abs().max() > 0.05  # so the blend below tests something
    assert torch.allclose(blended.image("mean", 0.25), 0.75 * plain.x_mean + 0.25 * blended.classical)
    assert torch.equal(blended.image("mean"), plain.image("mean"))
    with pytest.raises(ValueError, match="classical"):
        plain.image("mean", 0.5)


def test_anchored_deconvolution_keeps_a_reference_that_explains_the_data_and_fits_one_that_does_not():
    """classical_anchor's solve, argmin (λ/2)‖k⊛x − y‖² + Σ|∇(x − r)|^α: a reference with k⊛r = y exactly is its
    own solution (the plain hyper-Laplacian solve of the same y is not), and a wrong reference is pulled towards
    the data."""
    from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda
    from diffusion_em.blur import BlurOperator
    from diffusion_em.restore import anchored_deconvolution

    g = torch.Generator().manual_seed(0)
    x = 0.2 + 0.6 * torch.rand(1, 3, 48, 48, generator=g, dtype=torch.float64)
    k = torch.rand(7, 7, generator=g, dtype=torch.float64)
    k /= k.sum()
    op = BlurOperator.from_kernel(k, (48, 48), 0.0)
    y = op.A(x)
    sigma = 5 / 255
    got = anchored_deconvolution(y, k, sigma, x)
    assert torch.allclose(got, x, atol=1e-10)
    plain = hyper_laplacian(y, k, hyper_laplacian_lambda(sigma))
    assert (plain - x).abs().max() > 0.05  # so the check above is not what any deconvolution gives
    shading = 0.1 * torch.cos(2 * torch.pi * torch.arange(48, dtype=torch.float64) / 48)[:, None]  # what the blur keeps
    noise = 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # mostly what it removes
    for wrong, gain in ((x + shading, 0.05), (x + noise, 0.5)):
        fitted = anchored_deconvolution(y, k, sigma, wrong)
        assert ((op.A(fitted) - y) ** 2).mean() < gain * ((op.A(wrong) - y) ** 2).mean()
        assert ((fitted - x) ** 2).mean() < ((wrong - x) ** 2).mean()


@pytest.mark.parametrize("boundary", ["circular", "taper"])
def test_classical_anchor_fits_the_output_image_to_the_data_before_the_blend(setup, boundary):
    """classical_anchor: the config's output image (here the particle mean) replaced by its anchored solve with
    the run's final kernel on the run's frame, then blended; the diffusion run and the classical half unchanged."""
    import dataclasses

    from diffusion_em.blur import BlurOperator
    from diffusion_em.restore import restore
    from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda

    base, s, y = _restorer_and_first_sample(setup)
    runs = {}
    for anchor in ("none", "blind"):
        r = dataclasses.replace(base, dcfg=dataclasses.replace(base.dcfg, classical_blend=0.25, output="mean",
                                                               classical_anchor=anchor))
        runs[anchor] = restore(r, y, s.sigma, torch.Generator().manual_seed(3), boundary=boundary)
    plain, anchored = runs["none"], runs["blind"]
    assert plain.anchored is None and anchored.anchored_output == "mean"
    assert torch.equal(plain.x, anchored.x) and torch.equal(plain.classical, anchored.classical)
    assert anchored.anchored.shape == plain.x_mean.shape
    if boundary == "circular":  # the frame is the image: recompute it independently
        ref, k = plain.x_mean.double(), anchored.kernel.double()
        want = ref + hyper_laplacian(y.double() - BlurOperator.from_kernel(k, tuple(y.shape[-2:]), 0.0).A(ref), k,
                                     hyper_laplacian_lambda(s.sigma))
        assert torch.allclose(anchored.anchored.double(), want.clamp(0, 1), atol=1e-5)
    assert (anchored.anchored - plain.x_mean).abs().max() > 0.02
    assert torch.allclose(anchored.image("mean", 0.25, anchor=True), 0.75 * anchored.anchored + 0.25 * anchored.classical)
    assert torch.equal(anchored.image("mean", 0.25), plain.image("mean", 0.25))  # anchor=False: the plain blend
    with pytest.raises(ValueError, match="anchor"):
        anchored.image("sample", 0.25, anchor=True)  # computed for the mean only
    with pytest.raises(ValueError, match="anchor"):
        plain.image("mean", 0.25, anchor=True)
    # 'blind' skips a given kernel, 'all' does not; without a blend (w = 0) the diffusion image stays as it is
    k_true = torch.from_numpy(s.k_true).float()
    for anchor, blend, applied in (("blind", 0.25, False), ("all", 0.25, True), ("all", 0.0, False)):
        r = dataclasses.replace(base, dcfg=dataclasses.replace(base.dcfg, classical_blend=blend, output="mean",
                                                               classical_anchor=anchor, steps=2))
        res = restore(r, y, s.sigma, torch.Generator().manual_seed(3), boundary=boundary, k_true=k_true)
        assert (res.anchored is not None) == applied



def test_classical_anchor_solves_on_the_runs_frame_and_knows_a_given_kernel_in_batches(setup, monkeypatch):
    """The anchored solve gets the padded observation and the uncropped output image (the same frame, larger than
    the image under the taper boundary), its result cropped back; restore_batch skips it for an image with a given
    kernel under 'blind' and applies it to the blind image beside it."""
    import dataclasses

    from diffusion_em import restore as restore_mod
    from diffusion_em.run import build_parser, restorer_from_args
    from util.images import image_to_tensor
    from util.inputs import list_inputs, load_sample

    tmp, cfgs, data = setup
    args = build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o"))
    base = restorer_from_args(args, "fast_em")
    r = dataclasses.replace(base, dcfg=dataclasses.replace(base.dcfg, classical_blend=0.5, output="mean",
                                                           classical_anchor="blind", steps=2))
    samples = [load_sample(sp) for sp in list_inputs(data)[:2]]
    ys = [image_to_tensor(s_.y) for s_ in samples]
    calls = []
    real = restore_mod.anchored_deconvolution
    monkeypatch.setattr(restore_mod, "anchored_deconvolution",
                        lambda yp, k, sigma, ref: calls.append((yp, ref, real(yp, k, sigma, ref))) or calls[-1][2])
    res = restore_mod.restore(r, ys[0], samples[0].sigma, torch.Generator().manual_seed(3), boundary="taper")
    (yp, ref, out), = calls
    want_yp, box = restore_mod._prepared(r, ys[0], "taper")  # the run's frame: taper padding + the UNet multiple
    assert torch.equal(yp, want_yp) and ref.shape == yp.shape and yp.shape[-1] > ys[0].shape[-1]
    assert torch.equal(res.anchored, restore_mod.crop(out, box))
    calls.clear()
    k_true = torch.from_numpy(samples[1].k_true).float()
    got = restore_mod.restore_batch(r, ys, [s_.sigma for s_ in samples],
                                    [torch.Generator().manual_seed(i) for i in range(2)], ["circular"] * 2,
                                    k_trues=[None, k_true])
    assert got[0].anchored is not None and got[1].anchored is None and len(calls) == 1

def test_the_runner_writes_the_blend_and_the_diffusion_image(setup):
    tmp, cfgs, data = setup
    d = yaml.safe_load(cfgs["fastem_pigdm"].read_text())
    assert d["classical_blend"] == 0.5  # the shipped default
    out = tmp / "blend"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--save_npy", "--max_images", "1"), method="fast_em") == 0
    got = np.load(out / "npy" / "im0.npy")
    diffusion = np.asarray(Image.open(out / "images" / "im0_diffusion.png"), np.float64) / 255
    parts = np.mean([np.asarray(Image.open(out / "images" / f"im0_p{j}.png"), np.float64) / 255
                     for j in range(d["n_particles"])], 0)
    assert np.abs(diffusion - parts).max() <= 1.5 / 255  # the diffusion image is the particle mean
    assert np.abs(got - diffusion).max() > 0.02  # the written result is not
    assert _rows(out)[0]["status"] == "ok"
    # --classical_blend 0: the diffusion image alone, as the settings record says
    off = tmp / "noblend"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, off, "--save_npy", "--max_images", "1", "--classical_blend", "0"),
                method="fast_em") == 0
    assert json.loads((off / "summary.json").read_text())["settings"]["diffusion"]["classical_blend"] == 0
    assert not (off / "images" / "im0_diffusion.png").exists()
    assert np.abs(np.load(off / "npy" / "im0.npy") - diffusion).max() <= 1 / 255  # the same diffusion run
    # the default anchors the blind run's diffusion image (classical_anchor: blind); --classical_anchor none: the
    # same diffusion run blended as it is
    assert d["classical_anchor"] == "blind"
    plain = tmp / "plain_blend"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, plain, "--save_npy", "--max_images", "1", "--classical_anchor",
                      "none"), method="fast_em") == 0
    assert json.loads((plain / "summary.json").read_text())["settings"]["diffusion"]["classical_anchor"] == "none"
    assert np.array_equal(np.asarray(Image.open(plain / "images" / "im0_diffusion.png")),
                          np.asarray(Image.open(out / "images" / "im0_diffusion.png")))
    assert np.abs(np.load(plain / "npy" / "im0.npy") - got).max() > 0.01


def test_seeded_twice_identical_and_resume(setup):
    tmp, cfgs, data = setup
    a, b = tmp / "a", tmp / "b"
    main(_args(tmp, cfgs["fastem_pigdm"], data, a, "--save_npy", "--save_progress"), method="fast_em")
    main(_args(tmp, cfgs["fastem_pigdm"], data, b, "--save_npy"), method="fast_em")
    for n in ("im0", "im1"):
        assert np.array_equal(np.load(a / "npy" / f"{n}.npy"), np.load(b / "npy" / f"{n}.npy"))
        assert np.array_equal(np.load(a / "kernels" / f"{n}.npy"), np.load(b / "kernels" / f"{n}.npy"))
    assert (a / "progress" / "im0_kernel.gif").exists() and (a / "progress" / "im0_x0.gif").exists()
    traj = np.load(a / "progress" / "im0_kernels.npy")  # the kernel after every step; the last is the result's
    steps = yaml.safe_load(open(cfgs["fastem_pigdm"]))["steps"]
    assert traj.shape[0] == steps and np.allclose(traj[-1], np.load(a / "kernels" / "im0.npy"), atol=1e-7)
    assert np.allclose(traj.sum((1, 2)), 1, atol=1e-5)
    # rerunning skips finished images; --overwrite redoes them
    main(_args(tmp, cfgs["fastem_pigdm"], data, a), method="fast_em")
    assert len(_rows(a)) == 2
    main(_args(tmp, cfgs["fastem_pigdm"], data, a, "--overwrite", "--max_images", "1"), method="fast_em")
    assert [r["name"] for r in _rows(a)] == ["im0", "im1", "im0"]
    assert not list(a.rglob("*.tmp*"))


def test_broken_image_does_not_stop_the_run(setup):
    tmp, cfgs, data = setup
    (data / "blurry" / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 1
    rows = {r["name"]: r for r in _rows(out)}
    assert rows["broken"]["status"] == "failed" and "broken.png" in rows["broken"]["message"]
    assert rows["im0"]["status"] == rows["im1"]["status"] == "ok"
    assert json.loads((out / "summary.json").read_text())["failed"] == 1


def test_photo_folder_estimates_sigma(setup, capsys):
    tmp, cfgs, data = setup
    photos = tmp / "photos"
    photos.mkdir()
    g = np.random.default_rng(1)
    Image.fromarray((g.random((30, 36)) * 255).astype(np.uint8)).save(photos / "grey.png")  # odd size, grayscale
    rgba = (g.random((32, 32, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(photos / "rgba.png")
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], photos, out), method="fast_em") == 0
    rows = _rows(out)
    assert all(r["status"] == "ok" and r["sigma_source"] == "estimated" and r["psnr"] == "" for r in rows)
    assert np.asarray(Image.open(out / "images" / "grey.png")).shape == (30, 36)  # grayscale in, grayscale out
    assert np.asarray(Image.open(out / "images" / "rgba.png")).shape == (32, 32, 3)
    assert "estimated" in capsys.readouterr().err


def test_authors_pickles(setup):
    src = ROOT.parent / "shared" / "data" / "paper_testset"
    if not src.exists():
        pytest.skip(f"{src} not present (only in the project's shared folder)")
    tmp, cfgs, _ = setup
    pk = tmp / "pickles"
    pk.mkdir()
    shutil.copy(sorted(src.glob("*.pickle"))[0], pk)
    out = tmp / "out"
    # one particle: the 256² pickle with the default's 4 would need more than a busy test box may have free
    assert main(_args(tmp, cfgs["fastem_pigdm"], pk, out, "--steps", "2", "--n_particles", "1"), method="fast_em") == 0
    r = _rows(out)[0]
    assert r["status"] == "ok" and r["sigma_source"] == "given" and float(r["kernel_mse"]) > 0


def test_true_kernel_equals_nonblind_sampler(setup):
    from diffusion_em.nonblind import deblur_nonblind
    from diffusion_em.restore import restore
    from diffusion_em.run import build_parser, restorer_from_args
    from util.images import image_to_tensor
    from util.inputs import list_inputs, load_sample

    tmp, cfgs, data = setup
    # the paper's config: one particle from x_T (the default's late-branching particles are tested elsewhere)
    args = build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm_paper"], data, tmp / "o"))
    ctx = restorer_from_args(args, "fast_em")
    s = load_sample(list_inputs(data)[0])
    y = image_to_tensor(s.y)
    k = torch.from_numpy(s.k_true)
    em = restore(ctx, y, s.sigma, torch.Generator().manual_seed(7), boundary="circular", k_true=k)
    k9 = torch.nn.functional.pad(k, (2, 2, 2, 2))  # the 5×5 kernel centred in the 9×9 support
    assert torch.allclose(em.kernel, k9, atol=1e-7)  # fixed kernel: never touched by an M-step
    nb = deblur_nonblind(ctx.denoiser, y, em.kernel, s.sigma, ctx.guidance, torch.Generator().manual_seed(7))
    assert torch.equal(em.x, nb)


def test_boundary_auto_needs_a_declared_circular_blur(setup, tmp_path):
    from diffusion_em.restore import boundary_mode
    from diffusion_em.run import build_parser
    from util.images import ImageReadError
    from util.inputs import list_inputs

    assert boundary_mode("auto", "folder", "circular") == "circular"
    assert boundary_mode("auto", "folder", None) == "taper"  # undeclared: may be a real capture
    assert boundary_mode("auto", "folder", "valid") == "taper" == boundary_mode("auto", "photo", None)
    assert boundary_mode("auto", "pickle", None) == "circular"
    assert boundary_mode("reflect", "folder", "circular") == "reflect"  # a forced mode wins
    tmp, cfgs, data = setup
    assert build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o", "--boundary",
                                                    "reflect")).boundary == "reflect"
    d = tmp_path / "declared_set"
    shutil.copytree(data, d)
    (d / "meta.csv").write_text("name,sigma,boundary\nim0,0.02,valid\nim1,0.02,circular\n")
    assert [s.boundary for s in list_inputs(d)] == ["valid", "circular"]
    (d / "meta.csv").write_text("name,sigma,boundary\nim0,0.02,wrapped\n")
    with pytest.raises(ImageReadError, match="wrapped"):
        list_inputs(d)


def test_config_errors(setup, tmp_path, capsys):
    tmp, cfgs, data = setup
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o"), method="diffusion_em") == 2
    assert "belongs to test_FastDiffEM.py" in capsys.readouterr().err
    bad = tmp / "bad.yaml"
    bad.write_text(cfgs["pigdm"].read_text() + "\nstepz: 3\n")
    assert main(_args(tmp, bad, data, tmp / "o"), method="diffusion_em") == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    bad.write_text(cfgs["pigdm"].read_text().replace("steps: 4", "steps: many"))
    assert main(_args(tmp, bad, data, tmp / "o"), method="diffusion_em") == 2
    assert "'steps' must be int" in capsys.readouterr().err
    assert main(_args(tmp, cfgs["pigdm"], data, tmp / "o", "--sigma", "10"), method="diffusion_em") == 2
    capsys.readouterr()
    assert main(_args(tmp, cfgs["pigdm"], data, tmp / "o", "--kernel", "l0"), method="diffusion_em") == 2
    assert "--kernel l0: test_DiffEM.py takes em, l0_em or l0_box" in capsys.readouterr().err  # the flag, not the YAML
    bad.write_text(cfgs["pigdm"].read_text() + "\nkernel: l0\n")
    assert main(_args(tmp, bad, data, tmp / "o"), method="diffusion_em") == 2
    assert "key 'kernel' must be 'em', 'l0_em' or 'l0_box' with Diffusion EM" in capsys.readouterr().err


def test_the_kernel_flag_overrides_the_config(setup):
    """--kernel and --final_pass replace the config's keys for the run; the saved settings record says so."""
    tmp, cfgs, data = setup
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "k", "--kernel", "l0_box", "--max_images", "1"),
                method="fast_em") == 0
    assert [r["kernel_source"] for r in _rows(tmp / "k")] == ["l0_box"]
    assert json.loads((tmp / "k" / "summary.json").read_text())["settings"]["diffusion"]["kernel"] == "l0_box"

    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "f", "--final_pass", "--kernel", "em", "--max_images", "1"),
                method="fast_em") == 0
    steps = yaml.safe_load(cfgs["fastem_pigdm"].read_text())["steps"]
    assert [int(r["nfe"]) for r in _rows(tmp / "f")] == [2 * steps]  # the kernel-finding run, then the final one
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "f0", "--final_pass", "--kernel", "l0", "--max_images", "1"),
                method="fast_em") == 0
    assert [int(r["nfe"]) for r in _rows(tmp / "f0")] == [steps]  # a fixed kernel: nothing to find
    assert json.loads((tmp / "f" / "summary.json").read_text())["settings"]["diffusion"]["final_pass"] is True


def _strict(tmp, cfgs, name: str, **keys):
    """A copy of the tiny default config with the shipped guard (a random tiny UNet always fails it) and `keys`."""
    d = {**yaml.safe_load(cfgs["fastem_pigdm"].read_text()), "guard_residual": 25.0, "guard_saturation": 0.1, **keys}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_divergence_guard_fails_garbage_with_a_message(setup):
    tmp, cfgs, data = setup
    strict = _strict(tmp, cfgs, "strict", retries=1)
    out = tmp / "out"
    assert main(_args(tmp, strict, data, out, "--max_images", "1", "--on_divergence", "fail"), method="fast_em") == 1
    assert json.loads((out / "summary.json").read_text())["settings"]["diffusion"]["on_divergence"] == "fail"
    r = _rows(out)[0]
    assert r["status"] == "failed" and "diverged" in r["message"] and "after 2 attempts" in r["message"]
    assert not (out / "images" / "im0.png").exists()  # never written as a success


def _expected_fallback(tmp, cfg, data, k_true=False):
    """What `on_divergence: classical` must write for im0 of the tiny set (a photo: taper padding): the
    hyper-Laplacian deconvolution of the padded y with the ℓ0 kernel of the padded y (or the true kernel),
    cropped back — computed here from the classical pieces, not through the runner."""
    from classical.blind_l0 import estimate_kernel
    from classical.nonblind import hyper_laplacian, hyper_laplacian_lambda
    from diffusion_em.run import build_parser, restorer_from_args
    from util.geometry import crop, pad_centred, pad_for_boundary, pad_to_multiple
    from util.images import image_to_tensor
    from util.inputs import list_inputs, load_sample

    r = restorer_from_args(build_parser("fast_em").parse_args(_args(tmp, cfg, data, tmp / "unused")), "fast_em")
    s = load_sample(list_inputs(data)[0])
    y = image_to_tensor(s.y)
    yp, box = pad_for_boundary(y, r.kernel_size, "taper")
    yp, _ = pad_to_multiple(yp, r.denoiser.model.size_multiple, "reflect")
    if k_true:
        k = pad_centred(torch.from_numpy(s.k_true).to(yp), r.kernel_size)
        k = k / k.sum()
    else:
        k = estimate_kernel(yp[0].clamp(0, 1).double(), r.kernel_size, box=box).to(yp.dtype)
    x = hyper_laplacian(yp.double(), k.double(), hyper_laplacian_lambda(s.sigma)).clamp(0, 1)
    return crop(x, box)[0].permute(1, 2, 0).numpy(), k.double().numpy()


@pytest.mark.parametrize("kernel,extra,source", [("auto", (), "l0"), ("em", (), "l0"), ("l0_box", (), "l0"),
                                                 ("em", ("--true_kernel",), "true")])
def test_on_divergence_classical_writes_the_classical_restoration(setup, kernel, extra, source):
    """When every attempt fails the guard, `on_divergence: classical` (the default config's) writes the classical
    restoration — the fixed (ℓ0 or true) kernel, else the ℓ0 kernel, and the hyper-Laplacian solve — as an ok row
    flagged classical_fallback whose message keeps the guard's reason; the run exits 0."""
    tmp, cfgs, data = setup
    assert yaml.safe_load(cfgs["fastem_pigdm"].read_text())["on_divergence"] == "classical"  # the shipped default's
    strict = _strict(tmp, cfgs, f"fallback_{kernel}", retries=1, kernel=kernel)
    out = tmp / f"out_{kernel}_{len(extra)}"
    assert main(_args(tmp, strict, data, out, "--save_npy", "--max_images", "1", *extra), method="fast_em") == 0
    r = _rows(out)[0]
    assert r["status"] == "ok" and r["flag"].split(";")[0] == "classical_fallback", r
    assert r["message"].startswith("classical fallback: diverged") and "after 2 attempts" in r["message"]
    assert r["kernel_source"] == source and int(r["nfe"]) == 0 and int(r["attempts"]) == 2
    want_x, want_k = _expected_fallback(tmp, strict, data, k_true=bool(extra))
    assert np.allclose(np.load(out / "kernels" / "im0.npy"), want_k, atol=1e-6)
    assert np.abs(np.load(out / "npy" / "im0.npy") - want_x).max() < 1e-5
    assert not (out / "images" / "im0_diffusion.png").exists()  # no diffusion image was kept
    assert json.loads((out / "summary.json").read_text())["classical_fallback"] == 1
    from diffusion_em.evaluate import evaluate_folder, summarise
    from diffusion_em.results import diffusion_image_file
    rows = [r for r in evaluate_folder(data, out) if r["status"] == "ok"]
    assert [r["flag"].split(";")[0] for r in rows] == ["classical_fallback"] and "classical fallback" in rows[0]["message"]
    assert summarise(rows)["classical_fallback"] == 1  # the scores say which images are not the method's own
    assert diffusion_image_file(out, "im0") is None  # bench scripts must not take it for a diffusion image


def test_on_divergence_classical_batched_equals_one_by_one(setup):
    """A batch whose images all diverge falls back image by image, with the same files as one at a time."""
    tmp, cfgs, data = setup
    strict = _strict(tmp, cfgs, "fallback0", retries=0)
    one, two = tmp / "one", tmp / "two"
    assert main(_args(tmp, strict, data, one, "--save_npy"), method="fast_em") == 0
    assert main(_args(tmp, strict, data, two, "--save_npy", "--batch_size", "2"), method="fast_em") == 0
    for n in ("im0", "im1"):
        assert np.array_equal(np.load(one / "npy" / f"{n}.npy"), np.load(two / "npy" / f"{n}.npy"))
    rows = _rows(two)
    assert [r["flag"].split(";")[0] for r in rows] == ["classical_fallback"] * 2
    assert all("after 1 attempts" in r["message"] for r in rows)



def test_retries_reuse_the_l0_kernel(setup, monkeypatch):
    """The classical ℓ0 estimate (seconds on a photo) was recomputed for every retry after a divergence."""
    from diffusion_em import restore as restore_module
    tmp, cfgs, data = setup
    strict = _strict(tmp, cfgs, "strict_l0", retries=2, kernel="l0", on_divergence="fail")
    calls = []
    l0 = restore_module.l0_kernel
    monkeypatch.setattr(restore_module, "l0_kernel", lambda *a, **k: calls.append(1) or l0(*a, **k))
    assert main(_args(tmp, strict, data, tmp / "out", "--max_images", "1"), method="fast_em") == 1
    r = _rows(tmp / "out")[0]
    assert r["status"] == "failed" and "after 3 attempts" in r["message"] and len(calls) == 1
    calls.clear()  # batched: the first attempt runs in the batch, the retries alone, one ℓ0 estimate per image
    assert main(_args(tmp, strict, data, tmp / "batched", "--batch_size", "2"), method="fast_em") == 1
    rows = _rows(tmp / "batched")
    assert len(rows) == 2 and all(r["status"] == "failed" and "after 3 attempts" in r["message"] for r in rows)
    assert len(calls) == 2


@pytest.mark.parametrize("method,config,kernel,expected", [
    ("fast_em", "fastem_pigdm", "em", "em"), ("fast_em", "fastem_pigdm", "l0", "l0"),
    ("fast_em", "fastem_pigdm", "auto", "l0"),  # the tiny set declares no boundary: a photo
    ("fast_em", "fastem_pigdm", "l0_box", "l0_box"), ("diffusion_em", "pigdm", "l0_box", "l0_box"),
    ("diffusion_em", "pigdm", "l0_em", "l0_em"), ("diffusion_em", "pigdm", "em", "em")])
def test_metrics_name_the_kernel_source(setup, monkeypatch, method, config, kernel, expected):
    """metrics.csv says per image where its kernel came from (with `auto` it depends on the boundary); the
    ℓ0 estimate is computed exactly when that source needs it, Diffusion EM's l0_em included."""
    from diffusion_em import restore as restore_module
    tmp, cfgs, data = setup
    d = yaml.safe_load(cfgs[config].read_text())
    d["kernel"] = kernel
    cfg = tmp / f"{config}_{kernel}.yaml"
    cfg.write_text(yaml.safe_dump(d))
    calls = []
    l0 = restore_module.l0_kernel
    monkeypatch.setattr(restore_module, "l0_kernel", lambda *a, **k: calls.append(1) or l0(*a, **k))
    assert main(_args(tmp, cfg, data, tmp / "out"), method=method) == 0
    assert [r["kernel_source"] for r in _rows(tmp / "out")] == [expected] * 2
    assert len(calls) == (2 if "l0" in expected else 0)
    if method == "fast_em":
        assert main(_args(tmp, cfg, data, tmp / "oracle", "--true_kernel"), method=method) == 0
        assert [r["kernel_source"] for r in _rows(tmp / "oracle")] == ["true"] * 2


def test_a_log_without_the_kernel_source_column_resumes(setup):
    """A results folder written before the kernel_source column existed resumes in its own columns."""
    from diffusion_em.results import ADDED_FIELDS, FIELDS
    tmp, cfgs, data = setup
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1"), method="fast_em") == 0
    old = [f for f in FIELDS if f not in ADDED_FIELDS]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out / "metrics.csv", "w", newline="") as f:  # the log as the previous version wrote it
        w = csv.DictWriter(f, fieldnames=old, extrasaction="ignore", lineterminator="\n")
        w.writeheader(), w.writerows(rows)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 0
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["im0", "im1"] and all(r["status"] == "ok" for r in rows)
    assert "kernel_source" not in rows[1] and (out / "metrics.csv").read_text().splitlines()[0] == ",".join(old)

def test_a_bug_is_a_crash_not_a_failed_row(setup, monkeypatch):
    """The loop caught ValueError and OSError, so a programming error became a 'failed' row and exit 1."""
    import diffusion_em.run as run
    tmp, cfgs, data = setup

    def broken_metric(*a, **k):
        raise ValueError("a bug in the metrics code")
    monkeypatch.setattr(run, "evaluate", broken_metric)
    with pytest.raises(ValueError, match="a bug in the metrics code"):
        main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out", "--max_images", "1"), method="fast_em")


def test_quality_flags():
    """A finished result worse than its input is flagged, never reported silently."""
    from diffusion_em.results import quality_flags
    s = 2 / 255
    assert quality_flags({"psnr_aligned": 25.0, "psnr_blurry_aligned": 24.0, "reblur_rms_frame": 2 * s}, s) == []
    assert quality_flags({"psnr_aligned": 21.8, "psnr_blurry_aligned": 27.2, "reblur_rms_frame": 2 * s},
                         s) == ["worse_than_blurry"]
    assert quality_flags({"psnr_aligned": None, "psnr_blurry_aligned": None, "reblur_rms_frame": 4 * s},
                         s) == ["poor_fit"]


def test_zeta_true_kernel_weights_only_the_known_kernel_runs(setup):
    """`zeta_true_kernel` is the guidance weight of --true_kernel runs (a known kernel); blind runs keep `zeta`."""
    tmp, cfgs, data = setup
    d = yaml.safe_load(cfgs["fastem_pigdm"].read_text())
    d.pop("zeta_true_kernel", None)
    cfg = {}
    for name, extra in (("plain", {}), ("known3", {"zeta_true_kernel": 3.0}), ("zeta3", {"zeta": 3.0})):
        cfg[name] = tmp / f"zk_{name}.yaml"
        cfg[name].write_text(yaml.safe_dump({**d, **extra}))
    psnr = {}
    for name in cfg:
        for flags in ((), ("--true_kernel",)):
            out = tmp / f"zk_{name}{'_true' if flags else ''}"
            assert main(_args(tmp, cfg[name], data, out, "--max_images", "1", *flags), method="fast_em") == 0
            psnr[name, bool(flags)] = _rows(out)[0]["psnr"]
    assert psnr["known3", True] == psnr["zeta3", True] != psnr["plain", True]  # the known kernel gets ζ = 3
    assert psnr["known3", False] == psnr["plain", False] != psnr["zeta3", False]  # blind keeps ζ = 1


def test_final_pass_reruns_with_the_found_kernel_fixed(setup):
    """`final_pass`: a kernel-finding Fast EM run (`kernel_pass_particles`, `kernel_pass_steps`), then one run
    with its kernel held fixed at the blind ζ; both draw from the one generator, in that order."""
    import dataclasses

    from diffusion_em.restore import Start, restore
    from diffusion_em.run import build_parser, restorer_from_args
    from guided_diffusion.schedule import Schedule
    from util.images import image_to_tensor
    from util.inputs import list_inputs, load_sample

    tmp, cfgs, data = setup
    args = build_parser("fast_em").parse_args(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o"))
    base = restorer_from_args(args, "fast_em")
    s = load_sample(list_inputs(data)[0])
    y = image_to_tensor(s.y)
    with_ = lambda **kw: dataclasses.replace(base, dcfg=dataclasses.replace(base.dcfg, **kw))
    fewer = base.dcfg.steps - 1
    for steps in (None, fewer):
        two = with_(final_pass=True, kernel_pass_particles=1, kernel_pass_steps=steps)
        res = restore(two, y, s.sigma, torch.Generator().manual_seed(7), boundary="circular")
        gen = torch.Generator().manual_seed(7)
        one = with_(n_particles=1)
        if steps is not None:
            one = dataclasses.replace(one, denoiser=base.denoiser.respaced(Schedule.create(steps, base.schedule_kind)))
        first = restore(one, y, s.sigma, gen, boundary="circular")
        second = restore(base, y, s.sigma, gen, boundary="circular", start=Start(fixed_kernel=first.kernel))
        assert torch.equal(res.kernel, first.kernel) and torch.equal(res.x, second.x)
        assert res.x.shape[0] == base.dcfg.n_particles and res.nfe == first.nfe + second.nfe
        assert len(res.trace) == len(first.trace) + len(second.trace)
    assert first.nfe == fewer  # one particle, the fewer steps
    blind = restore(base, y, s.sigma, torch.Generator().manual_seed(7), boundary="circular")
    assert not torch.equal(res.x, blind.x)

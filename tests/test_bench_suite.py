"""The prepared GPU suite runs end to end in its reduced CPU form (tiny UNet, few steps) and writes its JSONL."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image



def _load(root, name):
    spec = importlib.util.spec_from_file_location(name, root / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_set(d, n=1, size=32):
    g = np.random.default_rng(0)
    for sub in ("blurry", "sharp"):
        (d / sub).mkdir(parents=True)
    for i in range(n):
        x = g.random((size, size, 3)).astype(np.float32)
        Image.fromarray((x * 255).astype(np.uint8)).save(d / "sharp" / f"c{i}.png")
        np.save(d / "blurry" / f"c{i}.npy", x)
    (d / "meta.csv").write_text("name,sigma\n" + "".join(f"c{i},0.05\n" for i in range(n)))


def test_gpu_suite_reduced_on_cpu(tmp_path, one_thread, repo_root):
    suite = _load(repo_root, "gpu_suite")
    _tiny_set(tmp_path / "set")
    assert suite.main(["--reduced", "--device", "cpu", "--out", str(tmp_path / "out"),
                       "--quality_dir", str(tmp_path / "set")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "out" / "gpu_suite_reduced.jsonl").read_text().splitlines()]
    speed = [r for r in recs if r["section"] == "speed" and "s_per_img" in r]
    # every grid case timed both methods, with a positive time and a memory figure
    assert {(r["case"], r["method"]) for r in speed} == {
        (c, m) for c in ("b1_fp32_eager", "b2_bf16_eager", "b1_fp32_compiled") for m in ("fast_em", "nonblind")}
    assert all(r["s_per_img"] > 0 and r["peak_mem_mb"] is not None for r in speed)
    assert all(r["compile_s"] > 0 for r in speed if r["compiled"])
    large = [r for r in recs if r["section"] == "large"]
    assert {tuple(r["size"]) for r in large} == {(64, 64), (64, 48)} and all(r["s_per_step"] > 0 for r in large)
    q = [r for r in recs if r["section"] == "quality"]
    assert len(q) == 1 and abs(q[0]["psnr_bf16"] - q[0]["psnr_fp32"] - q[0]["bf16_minus_fp32_db"]) < 2e-3
    assert recs[-1]["section"] == "done"


def test_gpu_suite_budget_skips(tmp_path, one_thread, repo_root):
    suite = _load(repo_root, "gpu_suite")
    assert suite.main(["--reduced", "--device", "cpu", "--out", str(tmp_path), "--budget_s", "0"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "gpu_suite_reduced.jsonl").read_text().splitlines()]
    assert not [r for r in recs if "s_per_img" in r or "s_per_step" in r]
    assert any("time budget" in r.get("skipped", "") for r in recs)


def test_mstep_given_image_runs_on_a_real_capture(shared_path, repo_root, capsys, one_thread):
    """bench/mstep_given_image.py: the M-step from a Dirac given the capture's sharp image moves towards its kernel."""
    data = shared_path("data", "levin_real")
    assert _load(repo_root, "mstep_given_image").main(["--data", str(data), "--capture", "im1_kernel2", "--calls", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "image=sharp" in line and "start=dirac" in line
    first, *_, last = (float(v) for v in line.split("calls:")[1].split())
    assert last < first


def test_quality_options_runs_each_image_with_the_runners_boundary(tiny_run, repo_root, monkeypatch):
    """bench/quality_options.py resolves the boundary as the runner does: --boundary, else the config's
    `auto` with what meta.csv declares (and so the kernel source `auto` picks from it)."""
    from tests.cli import cli_args
    qo = _load(repo_root, "quality_options")
    tmp, cfgs, _ = tiny_run
    data = tmp / "set64"  # the aligned scores crop a 15-px border
    _tiny_set(data, size=64)
    (data / "kernel").mkdir()
    np.save(data / "kernel" / "c0.npy", np.full((3, 3), 1 / 9, np.float32))
    seen = []
    real = qo.restore
    monkeypatch.setattr(qo, "restore", lambda *a, **k: seen.append(k["boundary"]) or real(*a, **k))
    args = cli_args(tmp, cfgs["fastem_pigdm"], data, tmp / "o")
    for flag, declared, want in ((["--boundary", "circular"], "", "circular"), ([], "", "taper"),
                                 ([], "circular", "circular")):
        (data / "meta.csv").write_text(f"name,sigma,boundary\nc0,0.05,{declared}\n")
        seen.clear()
        qo.main(args + flag)
        assert seen == [want]


def test_set_with_kernels_copies_a_set_with_a_runs_kernels(tmp_path, repo_root):
    swk = _load(repo_root, "set_with_kernels")
    _tiny_set(tmp_path / "set", n=2)
    (tmp_path / "set" / "kernel").mkdir()
    (tmp_path / "run" / "kernels").mkdir(parents=True)
    for i in range(2):
        np.save(tmp_path / "set" / "kernel" / f"c{i}.npy", np.full((3, 3), 1 / 9, np.float32))
        np.save(tmp_path / "run" / "kernels" / f"c{i}.npy", np.eye(5, dtype=np.float32) / 5 * (i + 1))
    args = ["--set", str(tmp_path / "set"), "--run", str(tmp_path / "run"), "--out", str(tmp_path / "copy")]
    assert swk.main(args) == 0
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / "copy" / "kernel" / f"c{i}.npy"), np.eye(5, dtype=np.float32) / 5 * (i + 1))
        assert (tmp_path / "copy" / "sharp" / f"c{i}.png").exists() and (tmp_path / "copy" / "blurry" / f"c{i}.npy").exists()
    assert (tmp_path / "copy" / "meta.csv").read_text() == (tmp_path / "set" / "meta.csv").read_text()
    with pytest.raises(SystemExit, match="exists"):
        swk.main(args)  # never writes over a folder
    (tmp_path / "run" / "kernels" / "c1.npy").unlink()
    with pytest.raises(SystemExit, match="no kernel for c1"):
        swk.main(args[:-1] + [str(tmp_path / "copy2")])


def test_blend_weights_scores_the_mixtures_of_two_runs(tmp_path, repo_root, capsys):
    bw = _load(repo_root, "blend_weights")
    from util.metrics import aligned_scores
    _tiny_set(tmp_path / "set", n=2, size=48)
    (tmp_path / "set" / "kernel").mkdir()
    g = np.random.default_rng(1)
    truth = {}
    for i in range(2):
        np.save(tmp_path / "set" / "kernel" / f"c{i}.npy", np.full((3, 3), 1 / 9, np.float32))
        truth[i] = np.asarray(Image.open(tmp_path / "set" / "sharp" / f"c{i}.png"), np.float64) / 255
        for run, amp in (("a", 0.1), ("b", 0.2)):
            (tmp_path / run / "images").mkdir(parents=True, exist_ok=True)
            noisy = np.clip(truth[i] + amp * g.standard_normal(truth[i].shape), 0, 1)
            Image.fromarray(np.round(noisy * 255).astype(np.uint8)).save(tmp_path / run / "images" / f"c{i}.png")
    # a blended result's diffusion image is read in preference to its blend
    d0 = np.round(np.clip(truth[0] + 0.05 * g.standard_normal(truth[0].shape), 0, 1) * 255) / 255
    Image.fromarray(np.round(d0 * 255).astype(np.uint8)).save(tmp_path / "a" / "images" / "c0_diffusion.png")
    assert bw.main(["--set", str(tmp_path / "set"), "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"),
                    "--weights", "0,0.5,1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    c0 = [float(v) for v in lines[1].split()[1:]]
    want = lambda x: aligned_scores(x, truth[0], 3)["psnr_aligned"]  # noqa: E731
    b0 = np.asarray(Image.open(tmp_path / "b" / "images" / "c0.png"), np.float64) / 255
    assert lines[1].startswith("c0 ") and abs(c0[0] - want(d0)) < 0.006 and abs(c0[2] - want(b0)) < 0.006
    assert abs(c0[1] - want(np.clip(0.5 * d0 + 0.5 * b0, 0, 1))) < 0.006  # printed to 0.01 dB
    assert lines[-2].startswith("mean (2 cases, 0 skipped)")
    # the residual pick: y is the sharp image itself (no blur) and A's kernel a Dirac, so the residual is the
    # distance to the truth and the less noisy A (w = 0) is picked for c0
    (tmp_path / "a" / "kernels").mkdir()
    for i in range(2):
        np.save(tmp_path / "a" / "kernels" / f"c{i}.npy", np.pad(np.ones((1, 1), np.float32), 1))
    assert bw.main(["--set", str(tmp_path / "set"), "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"),
                    "--weights", "0,0.5,1", "--residual_pick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = lines[1].split()
    assert row[-2] == "0" and abs(float(row[-1]) - want(d0)) < 0.006
    assert lines[-1].startswith("residual-picked w: mean")


def test_mstep_given_truth_finds_the_kernel_from_the_true_image(tmp_path, repo_root, capsys):
    """The diagnostic's M-step given the sharp image recovers a known circular blur far better than given the
    blurry image (a run that restored nothing)."""
    import torch

    from diffusion_em.blur import BlurOperator
    mgt = _load(repo_root, "mstep_given_truth")
    d = tmp_path / "set"
    for sub in ("blurry", "sharp", "kernel"):
        (d / sub).mkdir(parents=True)
    (tmp_path / "run" / "images").mkdir(parents=True)
    (tmp_path / "run" / "kernels").mkdir()
    g = np.random.default_rng(0)
    x = np.kron(g.random((16, 16, 3)), np.ones((4, 4, 1))).astype(np.float32)  # 64² piecewise-constant
    r = np.arange(33) - 16
    k = np.exp(-(r[:, None] ** 2 + (r[None] / 2.0) ** 2) / 4.0)
    k = (k / k.sum()).astype(np.float32)
    xt = torch.from_numpy(x).permute(2, 0, 1)[None]
    y = BlurOperator.from_kernel(torch.from_numpy(k), (64, 64), 0.01).A(xt)[0].permute(1, 2, 0).numpy()
    y = np.clip(y + 0.01 * g.standard_normal(y.shape), 0, 1).astype(np.float32)
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(d / "sharp" / "c0.png")
    np.save(d / "blurry" / "c0.npy", y)
    np.save(d / "kernel" / "c0.npy", k)
    (d / "meta.csv").write_text("name,sigma,boundary\nc0,0.01,circular\n")
    Image.fromarray(np.round(y * 255).astype(np.uint8)).save(tmp_path / "run" / "images" / "c0.png")
    np.save(tmp_path / "run" / "kernels" / "c0.npy", np.pad(np.ones((1, 1), np.float32), 16))
    assert mgt.main(["--set", str(d), "--run", str(tmp_path / "run"), "--calls", "5"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    run, truth, restored, continued = (float(v.split()[-1]) for v in last.split(": ", 1)[1].split(", "))
    assert truth < 0.2 * restored and truth < 0.2 * run and truth < 0.2 * continued, last
    # the last column continues the run's kernel on its particles when it saved them: here the sharp image
    for j in range(2):
        Image.fromarray(np.round(x * 255).astype(np.uint8)).save(tmp_path / "run" / "images" / f"c0_p{j}.png")
    assert mgt.main(["--set", str(d), "--run", str(tmp_path / "run"), "--calls", "5"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert float(last.split()[-1]) < 0.2 * run, last


def test_kernel_trajectory_scores_every_saved_step(tmp_path, repo_root, capsys):
    """bench/kernel_trajectory.py: a trajectory that passes through the true kernel at step 3 and drifts after it
    reports its lowest error there, and the final error as the last column."""
    from util.metrics import kernel_mse
    kt = _load(repo_root, "kernel_trajectory")
    (tmp_path / "set" / "kernel").mkdir(parents=True)
    (tmp_path / "run" / "progress").mkdir(parents=True)
    truth = np.zeros((9, 9), np.float32)
    truth[4, 2:7] = 0.2  # a horizontal line
    dirac = np.zeros((9, 9), np.float32)
    dirac[4, 4] = 1
    blob = np.full((9, 9), 1 / 81, np.float32)
    steps = [dirac, 0.5 * dirac + 0.5 * truth, 0.8 * truth + 0.2 * dirac, truth, 0.7 * truth + 0.3 * blob,
             0.5 * truth + 0.5 * blob]
    np.save(tmp_path / "set" / "kernel" / "c0.npy", truth)
    np.save(tmp_path / "run" / "progress" / "c0_kernels.npy", np.stack(steps))
    assert kt.main(["--set", str(tmp_path / "set"), "--run", str(tmp_path / "run"), "--every", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = [float(v) for v in out[1].split()[1:]]
    assert len(row) == 6 and row[3] == 0 and abs(row[-1] - kernel_mse(steps[-1], truth)[0] * 1e5) < 0.006
    assert out[-1].startswith("lowest mean after step 4: 0.000e+00") and out[-1].endswith("1/1")
    with pytest.raises(SystemExit, match="no \\*_kernels.npy"):
        kt.main(["--set", str(tmp_path / "set"), "--run", str(tmp_path / "set")])


def test_kernel_refine_recovers_the_kernel_from_the_true_image(tmp_path, repo_root, capsys):
    """bench/kernel_refine.py: a 'run' whose image is the sharp truth and whose kernel is the true one blurred:
    the least-squares kernel from that image beats the run's kernel, and the run's own column is its MSE."""
    import torch

    from diffusion_em.blur import BlurOperator
    from util.metrics import kernel_mse
    kr = _load(repo_root, "kernel_refine")
    d, run = tmp_path / "set", tmp_path / "run"
    for sub in ("blurry", "sharp", "kernel"):
        (d / sub).mkdir(parents=True)
    (run / "images").mkdir(parents=True)
    (run / "kernels").mkdir()
    g = np.random.default_rng(0)
    x = np.kron(g.random((24, 24, 3)), np.ones((4, 4, 1))).astype(np.float32)  # 96² piecewise-constant
    k = np.zeros((15, 15), np.float32)
    k[7, 3:12] = 1 / 9  # a horizontal stroke
    y = BlurOperator.from_kernel(torch.from_numpy(k), (96, 96), 0.0).A(torch.from_numpy(x).permute(2, 0, 1)[None])
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(d / "sharp" / "c0.png")
    Image.fromarray(np.round(x * 255).astype(np.uint8)).save(run / "images" / "c0.png")
    np.save(d / "blurry" / "c0.npy", y[0].permute(1, 2, 0).numpy())
    np.save(d / "kernel" / "c0.npy", k)
    blurred = np.zeros_like(k)
    blurred[6:9, 3:12] = 1 / 27  # the stroke smeared over three rows
    np.save(run / "kernels" / "c0.npy", blurred)
    (d / "meta.csv").write_text("name,sigma\nc0,0.01\n")
    assert kr.main(["--set", str(d), "--run", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    head, row = out[0].split(), out[1].split()
    got = dict(zip(head[1:], map(float, row[1:])))
    assert abs(got["run"] / kernel_mse(blurred, k)[0] - 1) < 0.01  # printed to 3 digits
    assert got["ls_image"] < 0.2 * got["run"]
    assert "within 2 px on 1/1" in out[-1] and "0.33x the truth's on average, below it on 1/1" in out[-1], out[-1]


def test_unet_speed_profile_splits_a_call_by_op_category(repo_root):
    """bench/unet_speed.py --profile: a call made only of a convolution and a GroupNorm is attributed to those two."""
    import torch
    import torch.nn.functional as F
    us = _load(repo_root, "unet_speed")
    assert us.op_category("aten::mkldnn_convolution") == "convolution"
    assert us.op_category("aten::convolution_backward") == "convolution"
    assert us.op_category("aten::native_group_norm_backward") == "group_norm"
    assert us.op_category("aten::addmm") == "gemm" and us.op_category("aten::silu") == "elementwise/other"
    x, w = torch.randn(1, 16, 96, 96), torch.randn(16, 16, 3, 3)
    prof = us.profile_call(lambda: F.group_norm(F.conv2d(x, w, padding=1), 4))
    assert prof["convolution"] > 0 and prof["group_norm"] > 0
    assert prof.get("elementwise/other", 0) < prof["convolution"] + prof["group_norm"]


def _pngs(d, n, size, seed):
    d.mkdir(parents=True)
    g = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((g.random((size, size + 8, 3)) * 255).astype(np.uint8)).save(d / f"p{i}.png")


def test_gpu_prior_reduced_on_cpu(tmp_path, tiny_run, repo_root):
    """bench/gpu_prior.py end to end on tiny nets: both priors train and come back (the big one in fp16 parts that
    --unpack joins into the same fp32 weights), all three are scored, and six deblurring runs leave rows."""
    from guided_diffusion.unet import create_model, load_weights
    gp = _load(repo_root, "gpu_prior")
    tiny, cfgs, eval_set = tiny_run
    data = tmp_path / "prior"
    _pngs(data / "train" / "train", 3, 40, 0)
    _pngs(data / "train" / "val", 2, 40, 1)
    _pngs(data / "val", 2, 40, 2)
    out = tmp_path / "out"
    assert gp.main(["--reduced", "--device", "cpu", "--data", str(data), "--out", str(out), "--work", str(tmp_path / "w"),
                    "--same_config", str(tiny / "model.yaml"), "--train_steps", "2", "--threads", "1",
                    "--train_threads", "1", "--crop", "32", "--batch", "2",
                    "--val_images", "2", "--val_size", "32", "--eval_dir", str(eval_set), "--deblur_min_s", "0",
                    "--deblur_args", "--diffusion_config", str(cfgs["fastem_pigdm"]), "--kernel_config",
                    str(tiny / "kernel.yaml"), "--max_images", "1", "--steps", "2"]) == 0
    recs = [json.loads(line) for line in (out / "gpu_prior.jsonl").read_text().splitlines()]
    trained = {r["prior"]: r for r in recs if r["section"] == "train" and "steps" in r}
    assert {n: (r["returncode"], r["steps"]) for n, r in trained.items()} == {"same": (0, 2), "big": (0, 2)}
    assert all(len(r["val"]) >= 2 for r in trained.values())  # the starting weights and the last step
    scores = {r["prior"]: r for r in recs if r["section"] == "score"}
    assert set(scores) == {"shipped", "same", "big"} and all(np.isfinite(r["mean"]) for r in scores.values())
    # the 'same' run started from the shipped weights: its first validation (step 0) scores them
    from guided_diffusion.model_config import build_unet, load_model_config
    from guided_diffusion.train import validate, load_val_crops
    from guided_diffusion.schedule import get_betas
    shipped = build_unet(load_model_config(tiny / "model.yaml"))
    load_weights(shipped, tiny / "unet.pt")
    ac = torch.tensor(np.cumprod(1.0 - get_betas("linear", 1000)), dtype=torch.float32)
    ref = validate(shipped.eval(), load_val_crops(data / "val", 2, 32), ac.sqrt(), (1 - ac).sqrt(), False)
    assert scores["shipped"]["step"] == 0 and abs(scores["shipped"]["mean"] - ref["mean"]) < 2e-3
    deblur = {r["run"]: r for r in recs if r["section"] == "deblur" and "run" in r}
    assert set(deblur) == {f"{p}_{k}" for p in ("shipped", "same", "big") for k in ("blind", "oracle")}
    assert all(r["finished"] == 1 and r["common_cases"] == 1 for r in deblur.values())
    assert recs[-1]["section"] == "done"
    # returned files: within the device tool's limits; the weights load into their nets
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size <= 16 * 2 ** 20 for f in files)
    load_weights(build_unet(load_model_config(tiny / "model.yaml")), out / "prior_same.pt")
    big = gp.unpack(out, tmp_path / "joined")
    net = create_model(**gp.TINY_BIG)
    load_weights(net, big)
    best = torch.load(tmp_path / "w" / "big" / "best_ema.pt", weights_only=True)
    assert all(torch.equal(net.state_dict()[k], v.half().float()) for k, v in best.items())  # fp16-rounded, no more


def test_prepared_gpu_scripts_parse(repo_root):
    """The device call runs these shell scripts unattended: at least their syntax is checked here."""
    import subprocess
    scripts = sorted((repo_root / "bench").glob("*.sh"))
    assert {p.name for p in scripts} >= {"gpu_suite.sh", "gpu_prior.sh", "gpu_session.sh"}
    for p in scripts:
        assert subprocess.run(["bash", "-n", str(p)], capture_output=True).returncode == 0, p


def test_gpu_prior_prepare_copies_only_what_the_run_reads(tmp_path, repo_root, monkeypatch):
    """--prepare: BSDS500 train + val for training, the first test images for validation, the first eval cases."""
    gp = _load(repo_root, "gpu_prior")
    bsds = tmp_path / "bsds"
    for sub, n in (("train", 3), ("val", 2), ("test", 4)):
        _pngs(bsds / sub, n, 40, n)
    ev = tmp_path / "set"
    _pngs(ev / "sharp", 3, 32, 5)
    (ev / "meta.csv").write_text("name,sigma\np0,0.02\np1,0.02\np2,0.02\n")
    monkeypatch.setattr(gp, "download_wheel", lambda folder: None)  # no network in a test
    assert gp.prepare(tmp_path / "carry", bsds, ev, eval_cases=2, val_images=3) == 0
    got = {str(p.relative_to(tmp_path / "carry")) for p in (tmp_path / "carry").rglob("*.png")}
    assert got == {f"train/train/p{i}.png" for i in range(3)} | {f"train/val/p{i}.png" for i in range(2)} | \
        {f"val/p{i}.png" for i in range(3)} | {"eval/sharp/p0.png", "eval/sharp/p1.png"}
    assert (tmp_path / "carry" / "eval" / "meta.csv").read_text().split() == ["name,sigma", "p0,0.02", "p1,0.02"]
    # too much to travel with the tracked files: refused (exit status 1)
    monkeypatch.setattr(gp, "tracked_bytes", lambda: gp.WORKTREE_LIMIT)
    assert gp.prepare(tmp_path / "carry", bsds, ev, eval_cases=2, val_images=3) == 1


def test_gpu_suite_records_a_failing_case_and_goes_on(tmp_path, one_thread, repo_root, monkeypatch):
    """Unattended on a GPU: a case that fails becomes a record and the suite goes on to the next case and section.
    Failures: the eager warm-up runs out of cuFFT workspace (an out of memory by another name), a timed run raises,
    and the compiled case's compilation raises."""
    suite = _load(repo_root, "gpu_suite")
    real_run_em, real_timed = suite.run_em, suite.Suite.timed_run
    state = {"warmups": 0, "timed": 0}

    def run_em(denoiser, *a, **kw):
        if len(denoiser.schedule) == 1:  # the eager warm-up (1 step)
            state["warmups"] += 1
            if state["warmups"] == 1:
                raise RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED")
        if denoiser.net is not denoiser.model:  # the compile warm-up (a compiled net)
            raise ValueError("inductor failed")
        return real_run_em(denoiser, *a, **kw)

    def timed(self, *a, **kw):
        state["timed"] += 1
        if state["timed"] == 1:
            raise KeyError("timed run failed")
        return real_timed(self, *a, **kw)
    monkeypatch.setattr(suite, "run_em", run_em)
    monkeypatch.setattr(suite.Suite, "timed_run", timed)
    assert suite.main(["--reduced", "--device", "cpu", "--out", str(tmp_path),
                       "--quality_dir", str(tmp_path / "none")]) == 0
    recs = [json.loads(line) for line in (tmp_path / "gpu_suite_reduced.jsonl").read_text().splitlines()]
    errors = [r for r in recs if "error" in r]
    assert [(r["case"], r["method"], r["error"]) for r in errors] == [
        ("b1_fp32_eager", "fast_em", "out of memory"), ("b1_fp32_eager", "nonblind", "KeyError"),
        ("b1_fp32_compiled", "compile", "ValueError")]
    assert any(r.get("case") == "b2_bf16_eager" and "s_per_img" in r for r in recs)
    assert any(r["section"] == "large" and "s_per_step" in r for r in recs) and recs[-1]["section"] == "done"


def test_gpu_prior_real_weights_fit_the_return_limits(repo_root):
    """The real run's weights fit the device tool's limit of 16 MiB a file: the shipped-size prior as one fp32 file,
    the big one (11.6 M parameters) as two fp16 parts."""
    from guided_diffusion.model_config import build_unet, load_model_config
    from guided_diffusion.unet import create_model
    gp = _load(repo_root, "gpu_prior")
    same = build_unet(load_model_config(repo_root / "configs" / "model_config_bundled.yaml"))
    big = create_model(**{k: v for k, v in gp.BIG.items() if k != "schedule"})
    fp32 = sum(v.numel() * 4 for v in same.state_dict().values())
    fp16 = sum(v.numel() * 2 for v in big.state_dict().values())
    assert fp32 < 16 * 2 ** 20 * 0.98 and -(-fp16 // gp.PART_BYTES) == 2  # 2 % kept for the pickle's own bytes
    assert 45e6 < fp16 * 2 < 50e6  # ≤ 50 MB shipped as fp32 (issue 8)


def test_ema_update_equals_the_per_tensor_rule(tiny_unet):
    """train.EMA's fused (foreach) update is bit-identical to shadow = d·shadow + (1 − d)·weights, tensor by tensor."""
    import copy
    from guided_diffusion.train import EMA
    ema = EMA(tiny_unet, 0.999)
    ref = {k: v.clone() for k, v in ema.shadow.items()}
    model = copy.deepcopy(tiny_unet)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        ema.update(model, step)
        d = min(0.999, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            ref[k] = ref[k].mul(d).add(v.float(), alpha=1 - d) if v.dtype.is_floating_point else v.clone()
    assert all(torch.equal(ema.shadow[k], ref[k]) for k in ref)


def test_kernel_denoiser_float_sigma_equals_a_tensor_sigma():
    """FDnCNN fills a float σ on the device; the result equals the per-kernel tensor form bit for bit."""
    from kernel_denoiser.network import FDnCNN
    torch.manual_seed(0)
    net = FDnCNN().eval()
    k = torch.rand(3, 1, 33, 33)
    with torch.no_grad():
        assert torch.equal(net(k, 0.013), net(k, torch.full((3,), 0.013)))


def test_gpu_prior_deblur_table_compares_common_cases(tmp_path, repo_root):
    """The priors are compared on the cases every run of a kind finished; small kernel MSEs keep their digits."""
    gp = _load(repo_root, "gpu_prior")
    rows = {"a_blind": [("c0", 20.0, 1.2e-5), ("c1", 22.0, 3.0e-5)], "b_blind": [("c0", 21.0, 1.0e-5)],
            "a_oracle": [("c0", 24.0, 0.0)]}
    runs = {}
    for name, rs in rows.items():
        runs[name] = tmp_path / name
        runs[name].mkdir()
        (runs[name] / "metrics.csv").write_text("name,status,psnr_aligned,kernel_mse\n" + "".join(
            f"{c},ok,{p},{k}\n" for c, p, k in rs) + "c9,failed,,\n")
    recs = []
    gp._deblur_table(runs, recs.append)
    got = {r["run"]: (r["finished"], r["common_cases"], r["psnr_aligned"], r["kernel_mse"]) for r in recs}
    assert got == {"a_blind": (2, 1, 20.0, 1.2e-5), "b_blind": (1, 1, 21.0, 1e-5), "a_oracle": (1, 1, 24.0, 0.0)}


def test_evalsets_script_rebuilds_the_recorded_sets(tmp_path, repo_root, shared_path):
    """bench/evalsets.sh remakes the evaluation set whose figures docs/benchmarks.md records: its case count and
    blurry-input mean (aligned PSNR) as recorded when it was first made (synth24 only: the three sets take
    minutes; synth24_valid 22.212 and dev256 21.500 were checked by hand, docs/benchmarks.md)."""
    import json
    import subprocess
    import sys
    shared_path("data", "bsds500", "test"), shared_path("data", "ffhq"), shared_path("data", "kernels", "levin09")
    subprocess.run(["bash", str(repo_root / "bench" / "evalsets.sh"), str(tmp_path), "synth24"], check=True,
                   capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth24"]
    for name, n, blurry in (("synth24", 24, 22.079),):
        out = tmp_path / f"{name}_blurry"
        subprocess.run([sys.executable, "-m", "diffusion_em.baselines", "--method", "blurry", "--input_dir",
                        str(tmp_path / name), "--save_dir", str(out), "--threads", "1"], check=True,
                       capture_output=True, cwd=repo_root)
        got = json.loads((out / "summary.json").read_text())["all"]
        assert got["n"] == n and abs(got["psnr_aligned"] - blurry) < 5e-3, (name, got["n"], got["psnr_aligned"])


def test_kernel_average_realigns_before_averaging(repo_root):
    """bench/kernel_average.py: the ℓ0 kernel is moved onto the run's kernel before the two are averaged (a
    misaligned average would be a wider kernel); the average sums to 1 and w = 0 is the run's kernel."""
    ka = _load(repo_root, "kernel_average")
    g = np.random.default_rng(0)
    k = np.zeros((15, 15))
    k[5:10, 4:11] = g.random((5, 7))
    k /= k.sum()
    moved = ka.shifted(k, 2, -3)
    assert abs(moved.sum() - 1) < 1e-12 and not np.allclose(moved, k)
    assert np.allclose(ka.aligned_to(moved, k), k)  # the shift is undone exactly
    assert np.allclose(ka.average(k, moved, 0.5), k) and np.allclose(ka.average(k, moved, 0.0), k)
    other = np.eye(15) / 15  # a diagonal stroke: another estimate
    avg = ka.average(k, other, 0.25)
    assert abs(avg.sum() - 1) < 1e-12 and np.allclose(ka.average(k, other, 1.0), ka.aligned_to(other, k))


def test_kernel_spectrum_band_ratio_subpixel_and_compensation(repo_root):
    """bench/kernel_spectrum.py: a kernel against itself has band ratio 1 everywhere; a Gaussian widened by
    blurring has ratios that fall with frequency; a half-pixel shift costs whole-pixel-aligned MSE that the
    0.25-px search removes; α = 0 compensation returns the kernel and dividing a blurred kernel by its own
    attenuation moves it towards the truth."""
    ks = _load(repo_root, "kernel_spectrum")
    yy, xx = np.mgrid[-7:8, -7:8]
    k = np.exp(-(yy ** 2 + (xx / 2.0) ** 2) / 2.0)
    k /= k.sum()
    assert np.allclose(ks.band_ratio(k, k), 1.0)
    wide = np.exp(-(yy ** 2 + (xx / 2.0) ** 2) / 4.5)
    wide /= wide.sum()
    r = ks.band_ratio(wide, k)
    assert r[0] > 0.9 and r[-3] < 0.5 * r[1]
    assert np.allclose(ks.compensated(wide, r, 0.0), wide, atol=1e-12)
    from util.metrics import kernel_mse
    assert kernel_mse(ks.compensated(wide, r, 1.0), k)[0] < 0.5 * kernel_mse(wide, k)[0]
    f = np.fft.fftfreq(ks.N)
    half = ks.from_spectrum(ks.spectrum(k) * np.exp(-2j * np.pi * (f[:, None] * 0.5 + f[None, :] * 0.5)), 15)
    assert kernel_mse(half, k)[0] > 1e-5 and ks.subpixel_mse(half, k) < 1e-3 * kernel_mse(half, k)[0]


def test_classical_anchor_screen_scores_a_runs_diffusion_image_fitted_to_the_data(tmp_path, repo_root, capsys):
    """bench/classical_anchor.py: D is the run's saved image; fitted to exact data with the true kernel (A) it
    gets closer to the truth; a set that is not circular is refused (its run's frame is not the image)."""
    ca = _load(repo_root, "classical_anchor")
    from diffusion_em.blur import BlurOperator
    from util.metrics import aligned_scores
    import torch
    _tiny_set(tmp_path / "set", n=1, size=48)
    (tmp_path / "set" / "kernel").mkdir()
    k = np.full((3, 3), 1 / 9, np.float32)
    np.save(tmp_path / "set" / "kernel" / "c0.npy", k)
    truth = np.asarray(Image.open(tmp_path / "set" / "sharp" / "c0.png"), np.float64) / 255
    op = BlurOperator.from_kernel(torch.from_numpy(k).double(), (48, 48), 0.0)
    y = op.A(torch.from_numpy(truth).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.save(tmp_path / "set" / "blurry" / "c0.npy", y.astype(np.float32))
    for d in ("images", "kernels"):
        (tmp_path / "run" / d).mkdir(parents=True)
    d0 = np.round(np.clip(truth + 0.1 * np.random.default_rng(2).standard_normal(truth.shape), 0, 1) * 255)
    Image.fromarray(d0.astype(np.uint8)).save(tmp_path / "run" / "images" / "c0.png")
    np.save(tmp_path / "run" / "kernels" / "c0.npy", k)
    args = ["--set", str(tmp_path / "set"), "--run", str(tmp_path / "run"), "--weights", "0.5"]
    with pytest.raises(SystemExit, match="not a circular case"):
        ca.main(args)
    (tmp_path / "set" / "meta.csv").write_text("name,sigma,boundary\nc0,0.02,circular\n")
    assert ca.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "case sigma255 D H A D/H_0.5 A/H_0.5"
    d, _, a, _, _ = (float(v) for v in lines[1].split()[2:])
    assert abs(d - aligned_scores(d0 / 255, truth, 3)["psnr_aligned"]) < 0.006
    assert a > d + 1.0
    assert lines[-1].startswith("mean (1 cases) D=")


def test_unet_speed_times_the_nchw_bf16_variants(repo_root, tmp_path, tiny_unet_config):
    """bench/unet_speed.py on a tiny net: one record per variant and batch, bf16 variants under bf16, ratios to the
    original-style baseline (always run first)."""
    import subprocess
    import sys
    import yaml
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_unet_config))
    out = subprocess.run([sys.executable, str(repo_root / "bench" / "unet_speed.py"), "--model", str(cfg), "--size", "32",
                          "--batch", "1", "2", "--repeats", "1", "--threads", "1", "--devices", "cpu", "--variants",
                          "ours_nchw", "ours_nchw_bf16", "ours_nchw_chunk1_bf16", "ours_nchw_chunk1_bf16_castops"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = ("original_style", "ours_nchw", "ours_nchw_bf16", "ours_nchw_chunk1_bf16", "ours_nchw_chunk1_bf16_castops")
    assert [(r["batch"], r["variant"]) for r in recs] == [(b, v) for b in (1, 2) for v in names]
    assert all((r["dtype"] == "bf16") == ("bf16" in r["variant"]) and r["channels_last"] is False for r in recs)
    assert [r["rows_per_call"] for r in recs if r["batch"] == 2] == [2, 2, 2, 1, 1]
    assert all(r["median_vs_original"] > 0 for r in recs)
    # the castops variant runs the bf16 ops of before (GroupNorm on a float32 copy, conv2d 1×1, avg_pool2d)
    us = _load(repo_root, "unet_speed")
    new, old = (us.build(str(cfg), False, False, g1, torch.device("cpu"), cast_ops=c) for g1, c in ((True, False), (False, True)))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])

    def vjp(m):
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xx, t).float()
        return torch.autograd.grad(out.square().sum(), xx)[0]
    a, b = vjp(new), vjp(old)
    assert not torch.equal(a, b) and ((a - b).norm() / b.norm()).item() < 0.05


def test_compare_runs_pairs_the_cases_both_finished(repo_root, tmp_path):
    """bench/compare_runs.py: paired differences over the common ok cases, their standard error, per σ, and the
    cases below the blurry input; a failed or missing case is left out of both sides."""
    cr = _load(repo_root, "compare_runs")
    cols = ["name", "status", "sigma", "psnr_aligned", "psnr_blurry_aligned", "kernel_mse"]
    rows_a = [("c0", "ok", 5 / 255, 20.0, 18.0, 1e-5), ("c1", "ok", 5 / 255, 22.0, 23.0, 2e-5),
              ("c2", "ok", 20 / 255, 25.0, 20.0, 3e-5), ("c3", "ok", 20 / 255, 30.0, 20.0, 1e-5)]
    rows_b = [("c0", "ok", 5 / 255, 21.0, 18.0, 1e-5), ("c1", "ok", 5 / 255, 22.5, 23.0, 1e-5),
              ("c2", "ok", 20 / 255, 24.0, 20.0, 3e-5), ("c3", "failed", 20 / 255, "", 20.0, "")]
    for name, rows in (("a", rows_a), ("b", rows_b)):
        (tmp_path / name).mkdir()
        lines = [",".join(cols)] + [",".join(str(v) for v in r) for r in rows]
        (tmp_path / name / "metrics.csv").write_text("\n".join(lines) + "\n")
    out = cr.compare(tmp_path / "a", tmp_path / "b", ["psnr_aligned", "kernel_mse"])
    text = "\n".join(out)
    assert "cases finished ok by both: 3 (A only: 1, B only: 0)" in text
    # differences +1, +0.5, -1: mean 1/6, s.e. = sd/sqrt(3)
    d = [1.0, 0.5, -1.0]
    m = sum(d) / 3
    se = (sum((v - m) ** 2 for v in d) / 2 / 3) ** 0.5
    assert f"B-A {m:+.3f} (s.e. {se:.3f}), B higher on 2 of 3, largest |B-A| 1.000" in text
    assert "sigma 5/255 (n=2): psnr_aligned A 21.00  B 21.75  B-A +0.75" in text
    assert "sigma 20/255 (n=1)" in text
    assert "A: 1 case(s) below their blurry input (aligned): c1" in text and "B: 1 case(s)" in text
    with pytest.raises(SystemExit, match="no metrics.csv"):
        cr.compare(tmp_path / "a", tmp_path / "nothing", ["psnr_aligned"])
    # photos without ground truth: ok rows with empty scores are compared on what they have, not a crash
    for name in ("p", "q"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.csv").write_text("name,status,sigma,psnr_aligned,psnr_blurry_aligned,seconds\n"
                                                     "photo,ok,0.02,,,10\n")
    text = "\n".join(cr.compare(tmp_path / "p", tmp_path / "q", ["psnr_aligned", "seconds"]))
    assert "psnr_aligned: no values" in text and "seconds (n=1)" in text and "A: 0 case(s)" in text
    (tmp_path / "q" / "metrics.csv").write_text("name,status,sigma,psnr_aligned\nother,ok,0.02,20\n")
    with pytest.raises(SystemExit, match="no finished case in common"):
        cr.compare(tmp_path / "p", tmp_path / "q", ["psnr_aligned"])


def test_low_memory_bench_runs_both_modes_and_finds_them_equal(repo_root):
    """bench/low_memory.py on a 64×64 image with the bundled prior: one record per mode (a fresh process each),
    the low-memory estimate below the normal one, and the two final images equal bit for bit."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(repo_root / "bench" / "low_memory.py"), "--sizes", "64x64", "--steps", "2",
                          "--threads", "1", "--budget_gb", "100"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r.get("mode") for r in recs] == ["normal", "low", None]
    normal, low, summary = recs
    assert normal["rc"] == low["rc"] == 0 and len(normal["step_s"]) == len(low["step_s"]) == 2
    assert low["budget_estimate_mb"] < normal["budget_estimate_mb"] and normal["n_particles"] == 4
    from util.cpu_memory import keep_freed_memory  # True where glibc takes the setting
    assert normal["malloc"] == low["malloc"] == "keep"  # its children run with the runner's allocator setting
    assert normal["keep_freed_memory"] is low["keep_freed_memory"] is keep_freed_memory()
    assert summary["equal_images"] is True and summary["equal_kernels"] is True and summary["time_low_vs_normal"] > 0


def test_large_photo_bench_records_memory_time_and_the_low_memory_mode(repo_root):
    """bench/large_photo.py on a small photo with the runner's defaults: a record per step count (status ok, peak
    memory, the particles the run used) and a summary; a budget between the two estimates puts the run in the
    low-memory mode, which the records and the summary's estimate follow."""
    import subprocess
    import sys
    from diffusion_em.budget import estimate_run_bytes
    from guided_diffusion.model_config import load_model_config
    model = load_model_config(repo_root / "configs" / "model_config_bundled.yaml")
    full, low = (estimate_run_bytes(80, 96, 4, model, 33, low_memory=m) for m in (False, True))
    out = subprocess.run([sys.executable, str(repo_root / "bench" / "large_photo.py"), "--sizes", "80x96", "--baseline", "",
                          "--steps", "1", "2", "--threads", "1", "--extra", "--memory_budget_gb", f"{(full + low) / 2 / 2**30:.6f}"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    runs, summary = recs[:2], recs[2]
    assert [r["steps"] for r in runs] == [1, 2] and all(r["status"] == "ok" and r["rc"] == 0 for r in runs)
    assert all(r["low_memory"] is True and r["n_particles"] == 4 and r["peak_rss_mb"] > 0 for r in runs)
    assert summary["summary"] is True and summary["low_memory"] is True
    assert abs(summary["budget_estimate_mb"] - low / 2**20) < 0.1


def test_unet_speed_one_model_with_page_faults(repo_root, tmp_path, tiny_unet_config):
    """bench/unet_speed.py --no_baseline: only the named variant in the process (no ratios), with its minor page
    faults a call and whether glibc keeps freed memory (--malloc keep, the scripts' CPU setting, or default)."""
    import subprocess
    import sys
    import yaml
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny_unet_config))
    for malloc in ("keep", "default"):
        out = subprocess.run([sys.executable, str(repo_root / "bench" / "unet_speed.py"), "--model", str(cfg),
                              "--size", "32", "--batch", "1", "--repeats", "2", "--threads", "1", "--devices", "cpu",
                              "--no_baseline", "--malloc", malloc, "--variants", "ours_chunk1_bf16"],
                             capture_output=True, text=True, timeout=300, check=True).stdout
        recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert [r["variant"] for r in recs] == ["ours_chunk1_bf16"]
        r = recs[0]
        assert r["median_vs_original"] is None and r["channels_last"] is True and r["dtype"] == "bf16"
        assert isinstance(r["minor_page_faults"], int) and r["minor_page_faults"] >= 0
        from util.cpu_memory import keep_freed_memory  # True where glibc takes the setting (the runner sets it too)
        assert r["keep_freed_memory"] is (malloc == "keep" and keep_freed_memory())

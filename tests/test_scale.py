"""Scale-out of the runner: --batch_size (several images per UNet batch) and torchrun sharding (2 gloo ranks)
give the outputs of a plain one-process, one-image-at-a-time run."""
import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_em import restore as restore_module
from diffusion_em import run

N_IMAGES = 4


@pytest.fixture
def job(tiny_run):
    """The tiny weights and configs of `tiny_run` (Fast EM, 4 steps, guard off) and 4 images of two sizes."""
    tmp, cfgs, _ = tiny_run
    data = tmp / "set4"
    for sub in ("blurry", "sharp"):
        (data / sub).mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(N_IMAGES):
        x = g.random((32, 32 if i % 3 else 48, 3)).astype(np.float32)  # im0 and im3 are wider: a second batch shape
        Image.fromarray((x * 255).astype(np.uint8)).save(data / "sharp" / f"im{i}.png")
        np.save(data / "blurry" / f"im{i}.npy", x)
    (data / "meta.csv").write_text("name,sigma\n" + "".join(f"im{i},{0.02 * (i + 1)}\n" for i in range(N_IMAGES)))
    return tmp, cfgs["fastem_pigdm"], data


def _args(job, out, *extra):
    tmp, cfg, data = job
    return ["--img_model_config", str(tmp / "model.yaml"), "--diffusion_config", str(cfg),
            "--kernel_config", str(tmp / "kernel.yaml"), "--input_dir", str(data), "--save_dir", str(out),
            "--device", "cpu", "--seed", "3", "--save_npy", "--threads", "1", *extra]


def _rows(out):
    with open(out / "metrics.csv", newline="") as f:
        return {r["name"]: {k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)}


def _same_outputs(a, b):
    assert _rows(a) == _rows(b) and len(_rows(a)) == N_IMAGES
    for i in range(N_IMAGES):
        for f in (f"npy/im{i}.npy", f"kernels/im{i}.npy"):
            assert np.array_equal(np.load(a / f), np.load(b / f)), f
    sa, sb = (json.loads((o / "summary.json").read_text()) for o in (a, b))
    assert {k: v for k, v in sa["means"].items() if k != "seconds"} == {k: v for k, v in sb["means"].items()
                                                                          if k != "seconds"}
    assert (sa["images"], sa["ok"]) == (sb["images"], sb["ok"]) == (N_IMAGES, N_IMAGES)


@pytest.mark.parametrize("kernel,extra", [("em", {}), ("l0_em", {}), ("l0", {}), ("l0_box", {}),
                                          ("l0_box", {"final_pass": True, "kernel_pass_particles": 1, "kernel_pass_steps": 3})])
def test_batch_size_equals_one_by_one(job, monkeypatch, kernel, extra):
    tmp, cfg, data = job  # l0 / l0_em: each image's own classical kernel (a start or fixed), batched or not
    d = yaml.safe_load(cfg.read_text())  # final_pass: the kernel-finding runs are batched too
    cfg = tmp / f"fastem_{kernel}{len(extra)}.yaml"
    cfg.write_text(yaml.safe_dump({**d, "kernel": kernel, **extra}))
    job = (tmp, cfg, data)
    # no stand-in UNet: on a CPU the runner evaluates one image per UNet call (max_batch=1), so batches are exact
    l0_kernels = []  # the ℓ0 estimates the option really computed
    l0 = restore_module.l0_kernel
    monkeypatch.setattr(restore_module, "l0_kernel", lambda *a, **k: l0_kernels.append(l0(*a, **k)) or l0_kernels[-1])
    out = job[0]
    assert run.main(_args(job, out / "one")) == 0
    assert run.main(_args(job, out / "batched", "--batch_size", "3")) == 0
    _same_outputs(out / "one", out / "batched")
    assert {r["kernel_source"] for r in _rows(out / "one").values()} == {kernel}
    assert len(l0_kernels) == (0 if kernel == "em" else 2 * N_IMAGES)
    if kernel == "l0":  # held fixed: the written kernels are the ℓ0 estimates
        for i in range(N_IMAGES):
            k = torch.from_numpy(np.load(out / "one" / f"kernels/im{i}.npy")).to(l0_kernels[i])
            assert torch.allclose(k, l0_kernels[i], atol=1e-6)


def test_batch_size_refused_for_diffusion_em(job, capsys):
    assert run.main(_args(job, job[0] / "x", "--batch_size", "2"), method="diffusion_em") == 2
    assert "--batch_size" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(repo_root, args, n=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo_root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(repo_root / "test_FastDiffEM.py"), *args]
    p = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_torchrun_two_ranks_equal_one_process_and_resume(job, repo_root):
    assert run.main(_args(job, job[0] / "single")) == 0
    sharded = job[0] / "sharded"
    _torchrun(repo_root, _args(job, sharded, "--max_images", "3"))  # an interrupted job: 3 of 4 images
    assert not list(sharded.glob("metrics.rank*.csv")) and len(_rows(sharded)) == 3
    p = _torchrun(repo_root, _args(job, sharded))  # resumed: only im3 runs
    assert p.stderr.count("already done") == 3
    _same_outputs(job[0] / "single", sharded)
    assert json.loads((sharded / "summary.json").read_text())["ranks"] == 2
    # --overwrite with other settings under torchrun: rank 0 moves the earlier results aside once every rank has
    # loaded its models, and no rank writes before that (a barrier); the new folder holds only the new run
    _torchrun(repo_root, _args(job, sharded, "--seed", "5", "--overwrite"))
    moved = sorted(p.name.split(".replaced-")[0] for p in sharded.glob("*.replaced-*"))
    assert set(moved) >= {"config.yaml", "images", "kernels", "metrics.csv", "montage", "summary.json"}
    assert len(moved) == len(set(moved)) and len(_rows(sharded)) == 4 and not list(sharded.glob("metrics.rank*.csv"))
    assert len(list((sharded / "images").glob("*.png"))) == len(list(next(sharded.glob("images.replaced-*")).glob("*.png")))
    assert json.loads((sharded / "summary.json").read_text())["settings"]["seed"] == 5


def test_compiled_denoiser_is_the_same_function(tiny_unet):
    """`compile: true` evaluates the UNet through torch.compile (here its tracing-only backend: the
    inductor code generation takes minutes on a busy CPU; bench/unet_speed.py measures it)."""
    from guided_diffusion.denoiser import EpsDenoiser
    from guided_diffusion.schedule import Schedule
    x = torch.randn(2, 3, 32, 32)
    plain = EpsDenoiser(tiny_unet, Schedule.create(3))
    traced = EpsDenoiser(tiny_unet, Schedule.create(3), compile_backend="eager")
    assert traced.model is tiny_unet and traced.net is not tiny_unet
    assert torch.equal(plain.eps(x, 1), traced.eps(x, 1))


def test_rank_logs_merge_keeps_finished_images(tmp_path):
    """An interrupted sharded run leaves rank logs; a finished image stays finished whatever the file order."""
    from diffusion_em.results import ResultsFolder
    out = ResultsFolder(tmp_path)
    ResultsFolder(tmp_path, rank=1).append({"name": "a", "status": "failed", "message": "killed"})
    ResultsFolder(tmp_path, rank=1).append({"name": "b", "status": "ok", "psnr": 20.0})
    out.append({"name": "a", "status": "ok", "psnr": 21.0})  # redone later by a one-process run
    out.append({"name": "c", "status": "failed", "message": "bad file"})
    assert {n: r["status"] for n, r in out.previous_rows().items()} == {"a": "ok", "b": "ok", "c": "failed"}
    merged = out.merge_rank_logs(["c", "b", "a"])
    assert list(merged) == ["c", "b", "a"] and not out.rank_logs()
    with open(tmp_path / "metrics.csv", newline="") as f:
        assert [(r["name"], r["status"]) for r in csv.DictReader(f)] == [("c", "failed"), ("b", "ok"), ("a", "ok")]

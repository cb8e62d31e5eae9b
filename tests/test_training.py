"""Training both networks: the diffusion prior (exact resume, export, --init, torchrun, schedule check) and a
smoke test of the kernel-denoiser trainer (train, checkpoint, resume, export)."""
import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import train as T
from guided_diffusion.unet import create_model, load_weights
from util.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------- the prior
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=False,
            class_cond=False, attention_resolutions="16", num_heads=2, num_head_channels=-1,
            num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
            use_fp16=False, use_new_attention_order=False)


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()  # train(--threads 1) sets a process-wide value; give the next tests theirs back
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_setup(tmp_path):
    import yaml
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for n in range(3):
        Image.fromarray(rng.integers(0, 256, (24 + 4 * n, 28, 3), dtype=np.uint8)).save(data / f"im{n}.png")
    rgba = rng.integers(0, 256, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(data / "alpha.png")
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(dict(TINY, model_path="unused.pt")))
    return data, cfg


def _args(data, cfg, out, steps, *extra):
    return T.parse_args(["--data", str(data), "--model_config", str(cfg), "--out", str(out), "--crop", "16",
                         "--batch", "3", "--lr", "1e-3", "--warmup", "2", "--steps", str(steps),
                         "--log_every", "1", "--seed", "3", "--threads", "1", *extra])


def _ck(out):
    return torch.load(Path(out) / T.CKPT_NAME, map_location="cpu", weights_only=True)


def _assert_same(a, b, path="ck"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for j, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{path}[{j}]")
    else:
        assert a == b, path


def test_train_resume_is_exact_and_export_loads(tiny_setup, tmp_path):
    data, cfg = tiny_setup
    straight, split = tmp_path / "straight", tmp_path / "split"
    T.train(_args(data, cfg, straight, 3))
    T.train(_args(data, cfg, split, 2))
    assert _ck(split)["step"] == 2
    T.train(_args(data, cfg, split, 3, "--resume"))
    a, b = _ck(straight), _ck(split)
    assert a["step"] == b["step"] == 3
    for key in ("model", "ema", "opt", "rng"):
        _assert_same(a[key], b[key], key)
    assert not torch.equal(a["ema"]["out.2.weight"], torch.zeros_like(a["ema"]["out.2.weight"])), "nothing was trained"
    with open(split / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(np.isfinite(float(r["loss"])) for r in rows)

    exported = tmp_path / "prior.pt"
    assert T.main(["--out", str(split), "--export_only", "--export", str(exported)]) == 0
    sd = torch.load(exported, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    model = load_weights(create_model(**TINY), exported)
    for k, v in model.state_dict().items():
        assert torch.equal(v, b["ema"][k].to(v.dtype)), k


def test_resume_without_checkpoint_is_an_error(tiny_setup, tmp_path):
    data, cfg = tiny_setup
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        T.train(_args(data, cfg, tmp_path / "empty", 2, "--resume"))


def test_crop_larger_than_an_image_is_refused(tiny_setup, tmp_path):
    data, cfg = tiny_setup
    with pytest.raises(ValueError, match="smaller than the crop"):
        T.train(T.parse_args(["--data", str(data), "--model_config", str(cfg), "--out", str(tmp_path / "o"),
                              "--crop", "32", "--steps", "1"]))


def test_random_crops_cover_all_eight_symmetries():
    img = torch.arange(16, dtype=torch.uint8).view(1, 4, 4).expand(3, 4, 4).contiguous()
    crops = T.random_crops([img], 64, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 4, 4) and crops.min() >= -1 and crops.max() <= 1
    distinct = {tuple(c[0].flatten().tolist()) for c in crops}
    assert len(distinct) == 8  # the dihedral group of the square, and nothing else


def test_torchrun_two_cpu_ranks(tiny_setup, tmp_path):
    data, cfg = tiny_setup
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "guided_diffusion.train", "--data", str(data),
           "--model_config", str(cfg), "--out", str(out), "--crop", "16", "--batch", "2", "--steps", "2",
           "--log_every", "1", "--threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    ck = _ck(out)
    assert ck["step"] == 2 and ck["world"] == 2 and len(ck["rng"]) == 2
    assert not torch.equal(ck["rng"][0], ck["rng"][1])  # ranks draw different crops
    with open(out / "loss.csv") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == [1, 2]  # rank 0 logs alone


def test_init_starts_from_given_weights(tiny_setup, tmp_path):
    data, cfg = tiny_setup
    first = tmp_path / "first"
    T.train(_args(data, cfg, first, 2))
    exported = tmp_path / "w.pt"
    assert T.main(["--out", str(first), "--export_only", "--export", str(exported)]) == 0
    # --init, then one step at learning rate 0: model and EMA still hold the given weights
    again = tmp_path / "again"
    T.train(_args(data, cfg, again, 1, "--init", str(exported), "--lr", "0"))
    w = torch.load(exported, weights_only=True)
    ck = _ck(again)
    for k, v in w.items():
        assert torch.equal(ck["model"][k].to(v.dtype), v) and torch.allclose(ck["ema"][k].to(v.dtype), v, atol=1e-6), k
    fresh = tmp_path / "fresh"  # without --init the same run starts elsewhere
    T.train(_args(data, cfg, fresh, 1, "--lr", "0"))
    assert not all(torch.equal(_ck(fresh)["model"][k].to(v.dtype), v) for k, v in w.items())
    with pytest.raises(CheckpointError, match="not found"):
        T.train(_args(data, cfg, tmp_path / "x", 1, "--init", str(tmp_path / "missing.pt")))


def test_resume_with_another_schedule_is_refused(tiny_setup, tmp_path):
    """The schedule lives in the model config; a checkpoint trained with another one cannot silently continue."""
    import yaml
    data, cfg = tiny_setup
    T.train(_args(data, cfg, tmp_path / "r", 1))
    cosine = tmp_path / "cosine.yaml"
    cosine.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), "schedule": "cosine"}))
    with pytest.raises(CheckpointError, match="'linear' schedule"):
        T.train(_args(data, cosine, tmp_path / "r", 2, "--resume"))


# ------------------------------------------------------------------------------------- kernel denoiser
def test_kernel_denoiser_trainer_smoke_resume_and_export(tmp_path):
    from kernel_denoiser import train as KT
    from kernel_denoiser.network import load_kernel_denoiser

    out = str(tmp_path / "k9.pth")
    common = ["--size", "9", "--out", out, "--batch", "4", "--nc", "8", "--nb", "3", "--threads", "1",
              "--ckpt_every", "2", "--eval_every", "2", "--shared", str(tmp_path / "no_shared")]
    KT.main(common + ["--steps", "2"])
    ck = torch.load(out + ".ckpt", weights_only=True)
    assert ck["step"] == 2 and len(ck["losses"]) == 2 and all(np.isfinite(ck["losses"]))
    KT.main(common + ["--steps", "4"])  # resumes from the checkpoint: two more steps, not four
    ck = torch.load(out + ".ckpt", weights_only=True)
    assert ck["step"] == 4 and len(ck["losses"]) == 4
    net = load_kernel_denoiser(out)
    assert net.arch["nc"] == 8 and net.arch["nb"] == 3
    k = torch.rand(2, 1, 9, 9)
    assert net(k, 0.01).shape == (2, 1, 9, 9)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("flags,message", [(["--threads", "100000"], "--threads 100000: must be in [1, "),
                                           (["--device", "bogus"], "--device bogus: not a device name")])
def test_the_trainers_refuse_impossible_threads_and_devices_in_one_line(flags, message, capsys):
    """--threads 100000 crashed torch (as it did in the runner); --device bogus failed deep in the set-up."""
    from kernel_denoiser import train as KT
    with pytest.raises(SystemExit) as e:
        T.parse_args(["--data", "x", "--out", "o", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    if flags[0] == "--threads":
        with pytest.raises(SystemExit) as e:
            KT.main(["--out", "o.pth", *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err

"""What a careless or hostile user does to the scripts, and what happens instead (issue 11, one test per item).

Tiny random models, 32×32 images, 4 steps; subprocesses where a memory limit is involved.
"""
import collections
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffusion_em.budget import check_budget, estimate_run_bytes, largest_square, needs_low_memory
from diffusion_em.config import DiffusionConfig
from diffusion_em.restore import guidance_for
from diffusion_em.run import main
from guided_diffusion.model_config import load_model_config
from guided_diffusion.sampler import needs_grad
from tests.cli import cli_args as _args, metrics_rows
from util.errors import ResourceError

ROOT = Path(__file__).resolve().parents[1]


def _rows(out):
    return {r["name"]: r for r in metrics_rows(out)}


# 1 ------------------------------------------------------------------------------------------ the record
def test_rerun_with_other_settings_is_refused_and_the_record_kept(tiny_run, capsys):
    """A rerun with --steps 3 --seed 7 skipped every image and rewrote config.yaml/summary.json to claim them."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 0
    record = {f: (out / f).read_bytes() for f in ("config.yaml", "summary.json", "metrics.csv")}
    capsys.readouterr()
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--steps", "3", "--seed", "7"), method="fast_em") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "diffusion.steps: 4 → 3" in err and "seed: 1 → 7" in err
    assert {f: (out / f).read_bytes() for f in record} == record  # untouched
    # the same settings resume (nothing to redo); --overwrite moves the old record aside and starts anew
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 0
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--steps", "3", "--overwrite"), method="fast_em") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["settings"]["diffusion"]["steps"] == 3
    moved = sorted(p.name.split(".replaced-")[0] for p in out.glob("*.replaced-*"))
    assert moved == ["config.yaml", "images", "kernels", "metrics.csv", "montage", "summary.json"]
    assert [int(r["nfe"]) for r in _rows(out).values()] == [3, 3]


def test_overwrite_moves_old_outputs_aside_only_once_the_models_load(tiny_run, capsys):
    """--overwrite moved the old record aside before the models loaded: a model that failed to load (exit 2)
    left the old images with no record. And it left the old run's image files beside the new rows: an image
    that now failed kept its old images/NAME.png (scored by evaluate), a classical fallback its old
    NAME_diffusion.png."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    bad = tmp / "bad_model.yaml"
    bad.write_text((tmp / "model.yaml").read_text().replace(str(tmp / "unet.pt"), str(tmp / "missing.pt")))
    args = _args(tmp, cfgs["fastem_pigdm"], data, out, "--overwrite")
    args[args.index("--img_model_config") + 1] = str(bad)
    assert main(args, method="fast_em") == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # untouched
    d = yaml.safe_load(cfgs["fastem_pigdm"].read_text())
    strict = tmp / "strict.yaml"
    strict.write_text(yaml.safe_dump({**d, "guard_residual": 25.0, "guard_saturation": 0.1}))
    assert main(_args(tmp, strict, data, out, "--overwrite", "--on_divergence", "fail"), method="fast_em") == 1
    assert [r["status"] for r in _rows(out).values()] == ["failed", "failed"]
    assert not (out / "images").exists() or not any((out / "images").iterdir())  # no stale image of the old run
    old = next(out.glob("images.replaced-*"))
    assert {"im0.png", "im1.png", "im0_diffusion.png", "im1_diffusion.png"} <= {p.name for p in old.iterdir()}


def test_a_record_older_than_an_option_resumes_only_at_its_default(tiny_run, capsys):
    """A folder made before `mstep.start` and `kernel` existed: the same run resumes (they hold their
    defaults, the older behaviour); a non-default value of an option the record lacks is refused."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm_paper"], data, out, "--max_images", "1"), method="fast_em") == 0
    rec = yaml.safe_load((out / "config.yaml").read_text())
    del rec["settings"]["diffusion"]["mstep"]["start"], rec["settings"]["diffusion"]["kernel"]
    (out / "config.yaml").write_text(yaml.safe_dump(rec))
    other = tmp / "l0.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(cfgs["fastem_pigdm_paper"].read_text()), "kernel": "l0"}))
    assert main(_args(tmp, other, data, out), method="fast_em") == 2
    assert "diffusion.kernel: None → 'l0'" in capsys.readouterr().err
    assert main(_args(tmp, cfgs["fastem_pigdm_paper"], data, out), method="fast_em") == 0
    assert "im0: already done" in capsys.readouterr().err and [r["status"] for r in _rows(out).values()] == ["ok"] * 2

def test_a_record_holding_a_key_that_no_longer_applies_resumes_only_at_its_default():
    """A Diffusion EM folder recorded before `final_pass` became a Fast-EM-only key (the record holds its
    default, false; the new record lacks it) resumes; one that holds a non-default value is another run."""
    from diffusion_em.results import _differences
    defaults = {"diffusion": {"final_pass": False, "steps": 100}}
    new = {"diffusion": {"steps": 100}}
    assert _differences({"diffusion": {"final_pass": False, "steps": 100}}, new, defaults=defaults) == []
    assert _differences({"diffusion": {"final_pass": True, "steps": 100}}, new,
                        defaults=defaults) == ["diffusion.final_pass: True → None"]


# 2 --------------------------------------------------------------------------------------- pixel budget
def test_memory_estimate_grows_with_size_and_particles(tiny_unet_config, tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({**tiny_unet_config, "model_path": "x"}))
    cfg = load_model_config(p)
    a, b = estimate_run_bytes(64, 64, 1, cfg, 9), estimate_run_bytes(128, 128, 1, cfg, 9)
    assert 0 < a < b < estimate_run_bytes(128, 128, 3, cfg, 9)
    side = largest_square(b, 1, cfg, 9)
    assert 128 <= side < 140 and estimate_run_bytes(side + 1, side + 1, 1, cfg, 9) > b
    check_budget(128, 128, 1, cfg, 9, b)  # fits exactly
    with pytest.raises(ResourceError, match=rf"needs about .* GB.*about {side}×{side} px fit"):
        check_budget(128, 150, 1, cfg, 9, b)


def test_forward_only_guidance_is_budgeted_without_the_backward_activations(tiny_unet_config, tmp_path):
    """ΠGDM without its Jacobian keeps no activations for a backward pass: a 4× smaller estimate, so an image
    the VJP path cannot fit is admitted; the config says which applies."""
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({**tiny_unet_config, "model_path": "x"}))
    cfg = load_model_config(p)
    full, fwd = estimate_run_bytes(128, 128, 1, cfg, 9), estimate_run_bytes(128, 128, 1, cfg, 9, backward=False)
    assert 0 < fwd < full / 2 and fwd < estimate_run_bytes(160, 160, 1, cfg, 9, backward=False)
    with pytest.raises(ResourceError):
        check_budget(128, 128, 1, cfg, 9, fwd)
    check_budget(128, 128, 1, cfg, 9, fwd, backward=False)
    assert largest_square(fwd, 1, cfg, 9, backward=False) >= 128 > largest_square(fwd, 1, cfg, 9)
    assert needs_grad(guidance_for(DiffusionConfig())) and needs_grad(guidance_for(DiffusionConfig(guidance="dps")))
    assert not needs_grad(guidance_for(DiffusionConfig(pigdm_jacobian="none")))


def test_an_image_over_the_budget_is_refused_early_and_the_run_goes_on(tiny_run):
    """One large input allocated until the OS killed the process; the other images were never processed."""
    tmp, cfgs, data = tiny_run
    np.save(data / "blurry" / "big.npy", np.full((400, 400, 3), 0.5, np.float32))
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--memory_budget_gb", "0.5"), method="fast_em") == 1
    rows = _rows(out)
    assert rows["big"]["status"] == "failed" and "big.npy" in rows["big"]["message"]
    assert "needs about" in rows["big"]["message"] and "px fit" in rows["big"]["message"]
    assert rows["big"]["seconds"] == "" and rows["im0"]["status"] == rows["im1"]["status"] == "ok"


def test_low_memory_mode_is_budgeted_for_one_particles_graph(tiny_unet_config, tmp_path):
    """Several particles' UNet graphs at once, or one at a time after a graph-free pass over all of them: the
    budget takes the second before refusing, and refuses with both figures what fits in neither."""
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump({**tiny_unet_config, "model_path": "x"}))
    cfg = load_model_config(p)
    full, low = estimate_run_bytes(128, 128, 4, cfg, 9), estimate_run_bytes(128, 128, 4, cfg, 9, low_memory=True)
    one = estimate_run_bytes(128, 128, 1, cfg, 9)
    assert one <= low < full / 2 and estimate_run_bytes(128, 128, 1, cfg, 9, low_memory=True) == one
    assert needs_low_memory(128, 128, 4, cfg, 9, full) is False and needs_low_memory(128, 128, 4, cfg, 9, None) is False
    assert needs_low_memory(128, 128, 4, cfg, 9, low) is True
    with pytest.raises(ResourceError, match=r"needs about .* GB \(.* GB recomputing each particle's UNet pass\)"):
        needs_low_memory(128, 128, 4, cfg, 9, low - 1)
    with pytest.raises(ResourceError) as e:  # one particle: no second figure
        needs_low_memory(128, 128, 1, cfg, 9, one - 1)
    assert "recomputing" not in str(e.value)


def test_the_budget_counts_the_kernel_passs_particles():
    """With final_pass the kernel-finding run may hold more particles than the final one: the budget takes the most."""
    from diffusion_em.run import budget_particles
    assert budget_particles(DiffusionConfig(n_particles=3)) == 3
    assert budget_particles(DiffusionConfig(n_particles=1, final_pass=True, kernel_pass_particles=4)) == 4
    assert budget_particles(DiffusionConfig(n_particles=4, final_pass=True, kernel_pass_particles=2)) == 4
    assert budget_particles(DiffusionConfig(n_particles=2, final_pass=False, kernel_pass_particles=5)) == 2


def test_an_image_that_fits_only_in_low_memory_mode_runs_so_with_the_same_result(tiny_run):
    """A budget between the two estimates: the image runs with one particle's graph at a time, says so in its
    row, and gives the images of the run without a budget, bit for bit (one image per UNet call on a CPU)."""
    import PIL.Image
    tmp, cfgs, data = tiny_run
    cfg = load_model_config(tmp / "model.yaml")
    full, low = (estimate_run_bytes(32, 32, 3, cfg, 9, low_memory=m) for m in (False, True))
    budget_gb = f"{(low + full) / 2 / 2**30:.9f}"
    runs = {}
    for name, extra in (("plain", ["--memory_budget_gb", "0"]), ("low", ["--memory_budget_gb", budget_gb])):
        out = tmp / name
        assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--n_particles", "3", *extra), method="fast_em") == 0
        runs[name] = (out, _rows(out))
    # a batch of two that does not fit together runs one image at a time, each in the low-memory mode
    out = tmp / "low_batch"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--n_particles", "3", "--memory_budget_gb", budget_gb,
                      "--batch_size", "2"), method="fast_em") == 0
    runs["low_batch"] = (out, _rows(out))
    for im in ("im0", "im1"):
        assert runs["plain"][1][im]["message"] == "" and "low-memory mode" in runs["low"][1][im]["message"]
        assert "low-memory mode" in runs["low_batch"][1][im]["message"]
        a, b, c = (np.asarray(PIL.Image.open(runs[k][0] / "images" / f"{im}.png")) for k in ("plain", "low", "low_batch"))
        assert np.array_equal(a, b) and np.array_equal(a, c)
        assert runs["plain"][1][im]["psnr"] == runs["low"][1][im]["psnr"] == runs["low_batch"][1][im]["psnr"]


def _legacy_storage_stream(numel: int) -> bytes:
    """A torch.save (legacy format) stream whose one float storage claims `numel` elements, holding none."""
    class Storage:  # pickled by reference as torch.FloatStorage in the persistent id
        pass

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel, None) if obj is Storage else None

    import io
    buf = io.BytesIO()
    for head in (0x1950a86a20f9469cfc6c, 1001, {"protocol_version": 1001, "little_endian": True,
                                                "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(head, buf, protocol=2)
    P(buf, protocol=2).dump(Storage)
    pickle.dump(["0"], buf, protocol=2)
    buf.write(numel.to_bytes(8, "little"))
    return buf.getvalue()


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _claiming_pickle(path: Path, side: int) -> None:
    """The authors' pickle layout, with tensors claiming 1×3×side×side in a file of a few KB."""
    n = 3 * side * side
    storage = _Reduce(torch.storage._load_from_bytes, (_legacy_storage_stream(n),))
    t = _Reduce(torch._utils._rebuild_tensor_v2,
                (storage, 0, (1, 3, side, side), (n, side * side, side, 1), False, collections.OrderedDict()))
    k = torch.ones(1, 1, 3, 3) / 9
    path.write_bytes(pickle.dumps({"H": t, "L": t, "kernel": k, "sigma": 0.01}, protocol=4))


def _limited(imports: str, code: str, extra_gb: float, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run python code in a child whose address space is capped at what its imports took plus `extra_gb`
    (an allocation past it fails in the child, not on the machine)."""
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs Linux /proc to size the address-space limit")
    cap = (f"import resource\n{imports}\n"
           f"vm = int([l for l in open('/proc/self/status') if l.startswith('VmSize:')][0].split()[1]) * 1024\n"
           f"resource.setrlimit(resource.RLIMIT_AS, (vm + {int(extra_gb * 2**30)}, vm + {int(extra_gb * 2**30)}))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", cap + code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_a_pickle_claiming_huge_tensors_is_refused_before_allocating(tmp_path):
    """A 2 KB pickle whose tensors claim 1×3×30000×30000 allocated 23.5 GB until the OS killed the run."""
    p = tmp_path / "claims.pickle"
    _claiming_pickle(p, 30000)
    assert p.stat().st_size < 4000
    r = _limited("from util.safe_pickle import load_pickle_sample",
                 f"try:\n    load_pickle_sample({str(p)!r})\nexcept Exception as e:\n    print(type(e).__name__, e)",
                 extra_gb=1.5)
    assert r.returncode == 0, r.stderr[-1000:]
    assert "ImageReadError" in r.stdout and "claims 2,700,000,000 elements" in r.stdout, r.stdout


def test_out_of_memory_inside_one_image_is_a_failed_row(tiny_run):
    """Out-of-memory inside one image was not caught; with the budget off it must still only fail that image."""
    tmp, cfgs, data = tiny_run
    np.save(data / "blurry" / "a_big.npy", np.full((512, 512, 3), 0.5, np.float32))
    out = tmp / "out"
    args = _args(tmp, cfgs["fastem_pigdm"], data, out, "--memory_budget_gb", "0", "--threads", "1")
    r = _limited("import sys\nimport torch\nfrom diffusion_em.run import main",
                 f"sys.exit(main({args!r}, method='fast_em'))", extra_gb=1.0, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    rows = _rows(out)
    assert rows["a_big"]["status"] == "failed" and "out of memory" in rows["a_big"]["message"]
    assert rows.get("im0", {}).get("status") == rows.get("im1", {}).get("status") == "ok", r.stderr[-2000:]


def test_out_of_memory_with_the_graphs_together_is_retried_in_low_memory_mode(tiny_run, monkeypatch, capsys):
    """The estimate can be low (a GPU, another process): an image that runs out of memory with its particles'
    UNet graphs together runs again with one at a time before it fails; one particle has no such second try."""
    import diffusion_em.restore as R
    tmp, cfgs, data = tiny_run
    real, calls = R.fast_diffusion_em, []

    def tight(*a, **kw):  # as if the graphs of several particles did not fit
        calls.append((kw.get("n_particles"), kw.get("low_memory")))
        if kw.get("n_particles", 1) > 1 and not kw.get("low_memory"):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*a, **kw)
    monkeypatch.setattr(R, "fast_diffusion_em", tight)
    import diffusion_em.run as run_module
    released = []  # the kept freed memory goes back to the system after each out-of-memory (util/cpu_memory.py)
    monkeypatch.setattr(run_module, "release_freed_memory", lambda: released.append(1))
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--n_particles", "3", "--memory_budget_gb", "0"),
                method="fast_em") == 0
    rows = _rows(out)
    assert all(rows[n]["status"] == "ok" and "low-memory mode" in rows[n]["message"] for n in ("im0", "im1"))
    assert calls == [(3, False), (3, True)] * 2 and len(released) == 2
    assert capsys.readouterr().err.count("again in the low-memory mode") == 2
    monkeypatch.setattr(R, "fast_diffusion_em", lambda *a, **kw: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    out1 = tmp / "out1"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out1, "--n_particles", "1", "--memory_budget_gb", "0"),
                method="fast_em") == 1
    assert all(r["status"] == "failed" and "out of memory" in r["message"] for r in _rows(out1).values())
    assert "low-memory mode" not in capsys.readouterr().err


# 3 ----------------------------------------------------------------------------------------------- σ = 0
def test_sigma_zero_runs_at_the_floor_never_nan(tiny_run):
    """σ = 0 (flag, meta.csv, or a flat photo's estimate) gave a NaN result."""
    tmp, cfgs, data = tiny_run
    (data / "meta.csv").write_text("name,sigma\nim0,0\nim1,0.02\n")
    flat = tmp / "flat"
    flat.mkdir()
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(flat / "flat.png")
    for inp, extra, name in ((data, ["--sigma", "0"], "im1"), (data, [], "im0"), (flat, [], "flat")):
        out = tmp / f"out_{name}_{len(extra)}"
        assert main(_args(tmp, cfgs["fastem_pigdm"], inp, out, *extra), method="fast_em") == 0
        row = _rows(out)[name]
        assert row["status"] == "ok" and np.isfinite(float(row["reblur_error"]))
        assert np.isfinite(np.load(out / "kernels" / f"{name}.npy")).all()
        assert np.isfinite(np.asarray(Image.open(out / "images" / f"{name}.png"), np.float32)).all()
        if name != "flat":  # a flat photo's estimate has its own floor (util/noise.py)
            assert float(row["sigma"]) == 0 and "floor" in row["sigma_source"]


# 4 ----------------------------------------------------------------------------------------- output folder
def _no_model(tmp):
    """A model config whose weights do not exist: any check that comes after loading would never be seen."""
    d = yaml.safe_load((tmp / "model.yaml").read_text())
    d["model_path"] = str(tmp / "missing.pt")
    (tmp / "nomodel.yaml").write_text(yaml.safe_dump(d))
    return ["--img_model_config", str(tmp / "nomodel.yaml")]


def test_save_dir_that_is_a_file_is_refused_before_loading(tiny_run, capsys):
    tmp, cfgs, data = tiny_run
    (tmp / "afile").write_text("x")
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "afile" / "sub") + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert "afile: is a file, not a folder" in err and "Traceback" not in err


def test_unwritable_save_dir_is_refused_before_loading(tiny_run, capsys, monkeypatch):
    import diffusion_em.results as results
    tmp, cfgs, data = tiny_run

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(results.tempfile, "NamedTemporaryFile", denied)  # root ignores chmod: simulate it
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out") + _no_model(tmp), method="fast_em") == 2
    assert "cannot write results there (Permission denied)" in capsys.readouterr().err


def test_foreign_metrics_csv_is_refused_before_any_image(tiny_run, capsys):
    """An old metrics.csv with another header crashed after one image had been computed."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    out.mkdir()
    (out / "metrics.csv").write_text("name,status,psnr\nold,ok,20\n")
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 2
    assert "holds another header" in capsys.readouterr().err and not (out / "images").exists()


# 5 ------------------------------------------------------------------------------------------------- flags
def _absent_device() -> str:
    if not torch.accelerator.is_available():
        return "cuda"
    return f"{torch.accelerator.current_accelerator().type}:{torch.accelerator.device_count()}"


@pytest.mark.parametrize("flag,value,message", [
    ("--device", _absent_device(), "--device"),
    ("--device", "gpu7", "not a device name"),
    ("--threads", "-1", "--threads -1: must be in [1, "),
    ("--max_images", "-1", "--max_images -1: must be >= 1"),
    ("--steps", "0", "--steps 0: must be >= 1"),
    ("--n_particles", "0", "--n_particles 0: must be >= 1"),
    ("--memory_budget_gb", "-2", "--memory_budget_gb"),
    ("--seed", "20000000000000", "--seed 20000000000000: must be in [0, 2^32)"),  # was a traceback after loading
    ("--seed", "-1", "--seed -1: must be in [0, 2^32)"),
    ("--sigma", "nan", "--sigma nan is outside [0, 1): give σ in [0,1] units"),
])
def test_bad_flags_are_one_line_errors_before_loading(tiny_run, capsys, flag, value, message):
    """--device cuda without CUDA and --threads -1 were tracebacks, --max_images -1 dropped the last image,
    --steps 0 was blamed on the YAML file."""
    tmp, cfgs, data = tiny_run
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out", flag, value) + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "yaml" not in err
    assert not (tmp / "out").exists()


@pytest.mark.parametrize("value", ["auto", "l0"])
def test_diffusion_em_refuses_a_kernel_source_it_cannot_run_naming_the_flag(tiny_run, capsys, value):
    """test_DiffEM.py --kernel auto was blamed on the YAML file's key 'kernel' though the value came from the flag."""
    tmp, cfgs, data = tiny_run
    assert main(_args(tmp, cfgs["pigdm"], data, tmp / "out", "--kernel", value) + _no_model(tmp),
                method="diffusion_em") == 2
    err = capsys.readouterr().err
    assert f"--kernel {value}" in err and "l0_box" in err and len(err.strip().splitlines()) == 1 and "yaml" not in err
    assert not (tmp / "out").exists()


# 6 ------------------------------------------------------------------------------------------------ inputs
def test_links_webp_bom_and_unmatched_meta_names(tiny_run, capsys):
    tmp, cfgs, data = tiny_run
    b = data / "blurry"
    os.symlink(b / "nowhere.png", b / "dangling.png")
    os.symlink(b / "loop_b.png", b / "loop_a.png")
    os.symlink(b / "loop_a.png", b / "loop_b.png")
    (b / "notes.txt").write_text("x")
    (data / "meta.csv").write_bytes("\ufeffname,sigma\nim0,0.02\nim1,0.02\nghost,0.01\n".encode("utf-8"))  # Excel BOM
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 1
    rows = _rows(out)
    assert "broken symbolic link" in rows["dangling"]["message"]
    assert "symbolic link loop" in rows["loop_a"]["message"] and rows["loop_b"]["status"] == "failed"
    assert rows["im0"]["status"] == "ok" and rows["im0"]["sigma_source"] == "given"
    err = capsys.readouterr().err
    assert "ghost" in err and "match no input" in err and "notes.txt" in err


def test_a_one_pixel_photo_without_sigma_fails_alone(tiny_run):
    """The blind σ estimate's ValueError on a 1-px image (no σ given) stopped the whole run with a traceback."""
    tmp, cfgs, data = tiny_run
    photos = tmp / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(photos / "b.png")
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], photos, out), method="fast_em") == 1
    rows = _rows(out)
    assert rows["a"]["status"] == "failed" and "a.png" in rows["a"]["message"] and "2×2" in rows["a"]["message"]
    assert rows["b"]["status"] == "ok"


def test_webp_photos_are_read():
    from PIL import features
    from util.images import IMAGE_EXTS
    assert (".webp" in IMAGE_EXTS) == features.check("webp")


@pytest.mark.parametrize("kernel,message", [(np.array([[0.5, 0.6, -0.2], [0, 0.1, 0], [0, 0, 0]]), "negative taps"),
                                            (np.full((2, 2), 0.25), "at least 3×3")])
def test_bad_ground_truth_kernels_are_refused(tiny_run, kernel, message):
    tmp, cfgs, data = tiny_run
    np.save(data / "kernel" / "im0.npy", kernel)
    out = tmp / "out"
    main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em")
    row = _rows(out)["im0"]
    assert row["status"] == "failed" and message in row["message"] and "im0.npy" in row["message"]


# 7, 8 ------------------------------------------------------------------------------ wasted work, messages
def test_0_255_float_npy_and_tiny_photos_fail_before_any_diffusion(tiny_run, capsys):
    """A float .npy in 0..255 ran two full attempts before 'diverged'; a photo smaller than the kernel ran the
    whole diffusion, then failed with a message naming no file; failed rows lost σ and its source."""
    tmp, cfgs, data = tiny_run
    np.save(data / "blurry" / "im0.npy", (255 * np.random.default_rng(0).random((32, 32, 3))).astype(np.float32))
    np.save(data / "blurry" / "tiny.npy", np.full((6, 40, 3), 0.5, np.float32))
    (data / "meta.csv").write_text("name,sigma\nim0,0.02\nim1,0.02\ntiny,0.03\n")
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 1
    rows = _rows(out)
    assert "0..255" in rows["im0"]["message"] and "im0.npy" in rows["im0"]["message"]
    assert "tiny.npy" in rows["tiny"]["message"] and "smaller than the 9×9 kernel" in rows["tiny"]["message"]
    assert rows["tiny"]["sigma"] == "0.03" and rows["tiny"]["sigma_source"] == "given"
    assert "attempt" not in capsys.readouterr().err  # no diffusion ran for either


def test_invalid_mstep_value_names_file_and_key(tiny_run, capsys):
    tmp, cfgs, data = tiny_run
    d = yaml.safe_load(cfgs["fastem_pigdm"].read_text())
    d["mstep"]["beta"] = -1
    bad = tmp / "bad.yaml"
    bad.write_text(yaml.safe_dump(d))
    assert main(_args(tmp, bad, data, tmp / "out"), method="fast_em") == 2
    err = capsys.readouterr().err.strip()
    assert "bad.yaml [mstep]: key 'beta' must be > 0, got -1" in err and "MStepConfig(" not in err


def test_an_npy_claiming_more_than_it_holds_is_refused_before_allocating(tmp_path):
    """numpy allocates the shape an .npy header claims before finding the file short."""
    from numpy.lib import format as npy_format
    from util.images import ImageReadError, read_image
    p = tmp_path / "claims.npy"
    with open(p, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (3000, 3000, 3)})
        f.write(b"\0" * 1000)
    with pytest.raises(ImageReadError, match=r"header claims shape \(3000, 3000, 3\) \(108,000,000 bytes\) but the "
                                             r"file holds 1,000"):
        read_image(p)


def test_a_true_kernel_larger_than_the_kernel_size_is_refused_not_cropped(tiny_run):
    """--true_kernel with a 41×41 ground truth ran the oracle with its centre 9×9 crop and still said 'true'."""
    tmp, cfgs, data = tiny_run
    big = np.zeros((15, 15))
    big[2:13, 7] = 1 / 11  # an 11-px stroke: most of its mass outside the tiny config's 9×9
    np.save(data / "kernel" / "im0.npy", big)
    padded = np.zeros((15, 15))
    padded[5:10, 5:10] = np.load(data / "kernel" / "im1.npy")  # larger array, all mass inside 9×9: fine
    np.save(data / "kernel" / "im1.npy", padded)
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--true_kernel"), method="fast_em") == 1
    rows = _rows(out)
    assert rows["im0"]["status"] == "failed" and "outside the 9×9 kernel" in rows["im0"]["message"]
    assert "im0" in rows["im0"]["message"] and rows["im1"]["status"] == "ok"


def test_quality_flags_use_the_sigma_run_and_plain_psnr_when_alignment_is_undefined():
    """poor_fit compared the residual with 3·σ for σ = 0 (the run used the 1e-3 floor); worse_than_blurry could
    not fire on images too small for the aligned PSNR."""
    from diffusion_em.results import quality_flags
    assert quality_flags({"psnr_aligned": None, "psnr_blurry_aligned": None, "psnr": 6.7, "psnr_blurry": 34.0}, 0.01) \
        == ["worse_than_blurry"]
    assert quality_flags({"psnr_aligned": 30.0, "psnr_blurry_aligned": 20.0, "psnr": 10.0, "psnr_blurry": 20.0}, 0.01) == []
    assert quality_flags({"reblur_rms_frame": 0.002}, 1e-3) == []  # 0.002 < 3·1e-3
    assert quality_flags({"reblur_rms_frame": 0.004}, 1e-3) == ["poor_fit"]


def _one_done_then_ctrl_c(tiny_run, capsys, monkeypatch):
    """A folder with one finished image, and the runner's next image interrupted by Ctrl-C: (tmp, cfgs, data, out)."""
    from diffusion_em import run as run_module
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1"), method="fast_em") == 0
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_module, "process_one", interrupted)
    return tmp, cfgs, data, out


def test_ctrl_c_says_how_to_resume_and_keeps_the_finished_rows(tiny_run, capsys, monkeypatch):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line and exit status 130."""
    tmp, cfgs, data, out = _one_done_then_ctrl_c(tiny_run, capsys, monkeypatch)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 130
    err = capsys.readouterr().err
    assert "rerun the same command to resume" in err and "Traceback" not in err
    assert [r["status"] for r in _rows(out).values()] == ["ok"]
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--overwrite"), method="fast_em") == 130
    assert "rerun the same command without --overwrite to resume" in capsys.readouterr().err


def test_the_runner_flags_with_the_sigma_it_ran_at(tiny_run, monkeypatch):
    """--sigma 0 runs at the 1e-3 floor: poor_fit must compare the misfit with that, not with 3·0."""
    from diffusion_em import run as run_module
    tmp, cfgs, data = tiny_run
    seen = []
    monkeypatch.setattr(run_module, "quality_flags", lambda row, sigma: seen.append(sigma) or [])
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out", "--sigma", "0", "--max_images", "1"),
                method="fast_em") == 0
    assert seen == [1e-3]


def test_interrupted_sharded_rows_count_as_results_and_on_divergence_is_no_setting(tmp_path):
    """claim() looked only at metrics.csv: rows an interrupted sharded run left in its rank logs let a rerun with
    other settings rewrite the record over them. And on_divergence (what a failed image gets) is recorded
    but does not make a folder's finished images another run's."""
    from diffusion_em.results import OutputError, ResultsFolder
    out = ResultsFolder(tmp_path)
    out.write_config({"settings": {"seed": 1, "diffusion": {"steps": 4}}})
    ResultsFolder(tmp_path, rank=1).append({"name": "a", "status": "ok", "psnr": 20.0})
    with pytest.raises(OutputError, match="other settings"):
        out.claim({"seed": 5, "diffusion": {"steps": 4}}, overwrite=False)
    assert out.claim({"seed": 1, "diffusion": {"steps": 4, "on_divergence": "classical"}}, overwrite=False,
                     defaults={"diffusion": {"on_divergence": "fail"}}) is False


def test_runner_refuses_inputs_named_like_another_inputs_result_files(tiny_run, capsys):
    tmp, cfgs, data = tiny_run
    shutil.copy(data / "blurry" / "im1.npy", data / "blurry" / "im0_p1.npy")
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out"), method="fast_em") == 2
    assert "im0_p1 would overwrite" in capsys.readouterr().err and not (tmp / "out").exists()


def test_a_resume_with_other_threads_keeps_the_earlier_runs_facts(tiny_run, capsys, monkeypatch):
    """A resume with another --threads was accepted and config.yaml then claimed the new count for every image."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1", "--threads", "1"), method="fast_em") == 0
    assert "earlier_runs" not in yaml.safe_load((out / "config.yaml").read_text())
    capsys.readouterr()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the record is what is tested, not the threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--threads", "2"), method="fast_em") == 0
    rec = yaml.safe_load((out / "config.yaml").read_text())
    assert rec["threads"] == 2 and rec["earlier_runs"] == [{"device": "cpu", "precision": "fp32", "threads": 1, "ranks": 1}]
    assert "holds images made with" in capsys.readouterr().err
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--threads", "2"), method="fast_em") == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["earlier_runs"] == rec["earlier_runs"]  # kept, not grown


def test_the_record_names_the_precision_auto_resolved_to(tiny_run, monkeypatch):
    """`--precision auto` keeps 'auto' in the settings and records what ran on this machine (it changes the bits)."""
    from diffusion_em import restore
    tmp, cfgs, data = tiny_run
    monkeypatch.setattr(restore, "cpu_has_bf16_units", lambda: True)
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1", "--precision", "auto"),
                method="fast_em") == 0
    rec = yaml.safe_load((out / "config.yaml").read_text())
    assert rec["precision"] == "bf16" and rec["settings"]["diffusion"]["precision"] == "auto"
    assert json.loads((out / "summary.json").read_text())["precision"] == "bf16"


def test_a_folder_from_before_precision_auto_resumes_with_another_precision(tiny_run, capsys):
    """A folder made before `precision: auto` records only its settings' precision; a resume under the new default
    (or another --precision) goes on, and the record notes what the earlier images ran with."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1", "--threads", "1"), method="fast_em") == 0
    rec = yaml.safe_load((out / "config.yaml").read_text())
    del rec["precision"]  # the record as an older version wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(rec))
    capsys.readouterr()
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--threads", "1", "--precision", "bf16"),
                method="fast_em") == 0
    rec = yaml.safe_load((out / "config.yaml").read_text())
    assert rec["precision"] == "bf16"
    assert rec["earlier_runs"] == [{"device": "cpu", "precision": "fp32", "threads": 1, "ranks": 1}]
    assert "holds images made with" in capsys.readouterr().err
    assert len(metrics_rows(out)) == 2


# 7 --------------------------------------------------------------------- found by a hostile-use hunt (2026-12-07)
def test_ctrl_c_writes_the_summary_of_the_rows_so_far(tiny_run, capsys, monkeypatch):
    """Ctrl-C left summary.json missing (a fresh folder) or describing the earlier run only (a resumed one)."""
    from diffusion_em import run as run_module
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    real = run_module.process_one
    calls = []

    def second_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(run_module, "process_one", second_interrupted)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 130
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["images"] == 1 and summary["ok"] == 1
    monkeypatch.setattr(run_module, "process_one", real)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 0  # the resume rewrites it
    summary = json.loads((out / "summary.json").read_text())
    assert "interrupted" not in summary and summary["images"] == 2 and summary["ok"] == 2


@pytest.mark.parametrize("taken,kind,message", [
    ("images", "file", "images: is not a folder"),
    ("kernels", "file", "kernels: is not a folder"),
    ("metrics.csv", "dir", "metrics.csv: is not a regular file"),
    ("summary.json", "dir", "summary.json: is not a regular file"),
    ("config.yaml", "dir", "config.yaml: is not a regular file"),
])
def test_a_record_or_output_path_taken_inside_save_dir_is_refused_before_loading(tiny_run, capsys, taken, kind,
                                                                                message):
    """images/ as a file or metrics.csv as a folder crashed after the models loaded (metrics.csv: after the first
    image's files were written, with no row for them)."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    out.mkdir()
    (out / taken).mkdir() if kind == "dir" else (out / taken).write_text("x")
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out) + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [taken]  # nothing written


@pytest.mark.parametrize("content", [b"name,status\nim0,ok\xe9\n", b"name,status\nim0," + b"x" * 200_000 + b"\n"])
def test_an_unreadable_metrics_log_is_refused_on_resume_in_one_line(tiny_run, capsys, content):
    """A latin-1 byte or a field over the csv module's limit in metrics.csv was a traceback on resume."""
    from diffusion_em.results import FIELDS
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    out.mkdir()
    (out / "metrics.csv").write_bytes(",".join(FIELDS).encode() + b"\n" + content.split(b"\n", 1)[1])
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out) + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert "metrics.csv: cannot be read as a metrics log" in err and len(err.strip().splitlines()) == 1


def test_an_unreadable_config_record_is_named_not_listed_as_other_settings(tiny_run, capsys):
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--max_images", "1"), method="fast_em") == 0
    (out / "config.yaml").write_text("settings: [unclosed\n")
    capsys.readouterr()
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out) + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert "config.yaml: is not this program's record" in err and len(err) < 400


def test_a_foreign_config_yaml_without_results_is_kept(tiny_run, capsys):
    """A --save_dir holding the user's own config.yaml (no metrics.csv, no summary.json) had it overwritten."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    out.mkdir()
    (out / "config.yaml").write_text("learning_rate: 0.1\n")
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out) + _no_model(tmp), method="fast_em") == 2
    assert "config.yaml: is not this program's record" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == "learning_rate: 0.1\n"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--overwrite", "--max_images", "1"), method="fast_em") == 0
    assert [p.read_text() for p in out.glob("config.yaml.replaced-*")] == ["learning_rate: 0.1\n"]


def test_a_name_too_long_for_its_result_files_fails_alone(tiny_run, capsys):
    """A legal 240-character input name crashed the whole run (its temporary file's name did not fit); one whose
    result files cannot fit fails alone."""
    tmp, cfgs, data = tiny_run
    fits, too_long = "n" * 240, "t" * 245  # + "_diffusion.png": 254 and 259 bytes
    os.rename(data / "blurry" / "im1.npy", data / "blurry" / f"{fits}.npy")
    shutil.copy(data / "blurry" / "im0.npy", data / "blurry" / f"{too_long}.npy")
    (data / "meta.csv").write_text(f"name,sigma\nim0,0.02\n{fits},0.02\n{too_long},0.02\n")
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--classical_blend", "0.5"), method="fast_em") == 1
    rows = _rows(out)
    assert rows["im0"]["status"] == "ok" and rows[fits]["status"] == "ok" and rows[too_long]["status"] == "failed"
    assert "name is too long for its result files" in rows[too_long]["message"]
    assert (out / "images" / f"{fits}_diffusion.png").is_file()
    assert json.loads((out / "summary.json").read_text())["images"] == 3


def test_a_meta_csv_that_is_a_folder_or_a_broken_link_or_has_a_huge_field_is_one_line(tiny_run, capsys):
    """meta.csv as a folder or a dangling link was skipped in silence (σ then estimated); a field over 128 KB
    was a traceback."""
    tmp, cfgs, data = tiny_run
    meta = data / "meta.csv"
    for make, message in ((lambda: meta.mkdir(), "not a regular file"),
                          (lambda: os.symlink(data / "nowhere.csv", meta), "a broken link"),
                          (lambda: meta.write_text("name,sigma\nim0," + "1" * 200_000 + "\n"), "not a readable CSV")):
        shutil.rmtree(meta) if meta.is_dir() and not meta.is_symlink() else meta.unlink(missing_ok=True)
        make()
        assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out") + _no_model(tmp), method="fast_em") == 2
        err = capsys.readouterr().err
        assert "meta.csv" in err and message in err and len(err.strip().splitlines()) == 1, err


def test_files_no_input_uses_are_named_in_the_note(tmp_path):
    """Sub-folders of a photo folder, FIFOs, and sharp/ or kernel/ files with no blurry/<name> were dropped in
    silence."""
    from util.inputs import list_inputs
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "sub" / "inner.png")
    fifo = hasattr(os, "mkfifo")  # no FIFOs on Windows: the rest still runs
    if fifo:
        os.mkfifo(photos / "pipe.png")
    notes = []
    assert [s.name for s in list_inputs(photos, notice=notes.append)] == ["a"]
    assert len(notes) == 1 and "sub/" in notes[0] and ("pipe.png" in notes[0]) == fifo
    ts = tmp_path / "set"
    for sub in ("blurry", "sharp", "kernel"):
        (ts / sub).mkdir(parents=True)
    np.save(ts / "blurry" / "a.npy", np.zeros((8, 8, 3), np.float32))
    np.save(ts / "kernel" / "orphan.npy", np.ones((3, 3), np.float32))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ts / "sharp" / "orphan2.png")
    notes.clear()
    assert [s.name for s in list_inputs(ts, notice=notes.append)] == ["a"]
    assert len(notes) == 1 and "kernel/orphan.npy" in notes[0] and "sharp/orphan2.png" in notes[0]


def test_absurd_thread_counts_are_refused_before_loading(tiny_run, capsys):
    """--threads 100000 crashed torch (a segfault, no message)."""
    from util.device import max_threads
    tmp, cfgs, data = tiny_run
    n = max_threads() + 1
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out", "--threads", str(n)) + _no_model(tmp),
                method="fast_em") == 2
    err = capsys.readouterr().err
    assert f"--threads {n}: must be in [1, {n - 1}]" in err and not (tmp / "out").exists()


def test_a_16bit_colour_png_bomb_is_refused_before_decoding(tmp_path):
    """A tiny 16-bit colour PNG claiming 20000×20000 pixels went past Pillow's decompression-bomb check (our own
    16-bit reader) and ran out of memory, with a hint about --memory_budget_gb."""
    import struct
    import zlib
    from util.images import ImageReadError, read_image

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    (tmp_path / "bomb.png").write_bytes(png)
    with pytest.raises(ImageReadError, match="decompression-bomb limit"):
        read_image(tmp_path / "bomb.png")


def test_an_integer_npy_image_out_of_range_names_its_type(tmp_path):
    from util.images import ImageReadError, read_image
    np.save(tmp_path / "a.npy", np.full((8, 8, 3), 200, np.int64))
    with pytest.raises(ImageReadError, match="int64 values span 200..200"):
        read_image(tmp_path / "a.npy")


def test_fp16_on_a_cpu_is_refused_before_loading(tiny_run, capsys):
    """--precision fp16 on a CPU ran about 50 times slower than fp32."""
    tmp, cfgs, data = tiny_run
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, tmp / "out", "--precision", "fp16", "--device", "cpu")
                + _no_model(tmp), method="fast_em") == 2
    err = capsys.readouterr().err
    assert "precision fp16 (--precision) is for GPUs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp / "out").exists()


def test_a_failing_summary_does_not_hide_the_ctrl_c(tiny_run, capsys, monkeypatch):
    """A summary that could not be written on Ctrl-C (a full disk, a row cut by the interrupt) replaced the
    interrupt's one-line message by a traceback."""
    from diffusion_em import run as run_module
    tmp, cfgs, data, out = _one_done_then_ctrl_c(tiny_run, capsys, monkeypatch)

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(run_module, "_write_summary", disk_full)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 130
    err = capsys.readouterr().err
    assert "summary.json not updated (" in err and "No space left" in err and "rerun the same command" in err
    assert "Traceback" not in err


@pytest.mark.skipif(sys.platform != "linux" or sys.getfilesystemencoding().lower() not in ("utf-8", "utf8"),
                    reason="names of undecodable bytes: a Linux file system under a UTF-8 locale")
def test_a_name_that_is_not_utf8_is_skipped_with_a_note(tmp_path):
    """caf\\xe9.png (latin-1 bytes) crashed the run: its name cannot be written to metrics.csv."""
    from util.inputs import list_inputs
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png"))
    notes = []
    assert [s.name for s in list_inputs(tmp_path, notice=notes.append)] == ["a"]
    assert len(notes) == 1 and "not UTF-8" in notes[0]


def test_a_meta_csv_name_with_a_newline_keeps_the_note_on_one_line(tmp_path):
    from util.inputs import list_inputs
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "meta.csv").write_text('name,sigma\na,0.01\n"b\nc",0.01\n')
    notes = []
    list_inputs(tmp_path, notice=notes.append)
    assert len(notes) == 1 and "\n" not in notes[0] and "'b\\nc'" in notes[0]


@pytest.mark.parametrize("record,message", [
    ("settings: null\n", "is not this program's record"),
    ("settings: [a, b]\n", "is not this program's record"),
    ("diffusion: {steps: 4}\nkernel: {}\nmodel: {}\nargs: {}\n", "was written by an older version"),
])
def test_a_config_yaml_without_a_settings_record_is_named_and_kept(tiny_run, capsys, record, message):
    """`settings: null` or a list was taken for a record and the user's file overwritten; a record of a version
    before the settings record was called foreign without saying so."""
    tmp, cfgs, data = tiny_run
    out = tmp / "out"
    out.mkdir()
    (out / "config.yaml").write_text(record)
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out) + _no_model(tmp), method="fast_em") == 2
    assert f"config.yaml: {message}" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == record


def test_a_name_with_two_files_fails_alone(tiny_run, capsys):
    """blurry/a.png beside blurry/a.npy (or two sharp/ files for one name, or a pickle and an image of one name)
    refused the whole run before any image ran; now that name gets one failed row naming both files."""
    tmp, cfgs, data = tiny_run
    shutil.copy(data / "sharp" / "im0.png", data / "sharp" / "im0.tif")  # im0: two ground truths
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out), method="fast_em") == 1  # 1: an image failed
    rows = _rows(out)
    assert rows["im1"]["status"] == "ok" and rows["im0"]["status"] == "failed"
    assert "2 files share the name 'im0' (sharp/im0.png, sharp/im0.tif)" in rows["im0"]["message"]
    photos = tmp / "photos"
    photos.mkdir()
    shutil.copy(data / "sharp" / "im1.png", photos / "p.png")
    shutil.copy(data / "sharp" / "im1.png", photos / "q.png")
    shutil.copy(data / "sharp" / "im1.png", photos / "p.tif")
    (photos / "p.pickle").write_bytes(b"not read")
    out2 = tmp / "out2"
    assert main(_args(tmp, cfgs["fastem_pigdm"], photos, out2, "--sigma", "0.02"), method="fast_em") == 1
    rows = _rows(out2)
    assert rows["q"]["status"] == "ok" and rows["p"]["status"] == "failed"
    assert "3 files share the name 'p' (p.pickle, p.png, p.tif)" in rows["p"]["message"]  # all named at once


@pytest.mark.parametrize("batch", ["1", "2"])
def test_out_of_memory_while_reading_an_image_fails_it_alone_without_the_budget_hint(tiny_run, monkeypatch, batch):
    """Running out of memory while decoding a huge image said "lower --memory_budget_gb", which cannot help (the
    budget applies after reading); in a batch (--batch_size 2) it was a traceback that stopped the run."""
    import diffusion_em.run as run_module
    tmp, cfgs, data = tiny_run
    real = run_module.load_sample

    def huge(sample, **kw):
        if sample.name == "im0":
            raise MemoryError("cannot allocate 80 GB (simulated)")
        return real(sample, **kw)
    monkeypatch.setattr(run_module, "load_sample", huge)
    out = tmp / "out"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out, "--batch_size", batch), method="fast_em") == 1
    rows = _rows(out)
    assert rows["im1"]["status"] == "ok" and rows["im0"]["status"] == "failed"
    assert "out of memory while reading it" in rows["im0"]["message"]
    assert "memory_budget_gb" not in rows["im0"]["message"]
    import diffusion_em.restore as R  # out of memory after reading (in the diffusion) keeps the budget hint
    monkeypatch.setattr(run_module, "load_sample", real)
    for f in ("fast_diffusion_em", "fast_diffusion_em_batch"):
        monkeypatch.setattr(R, f, lambda *a, **kw: (_ for _ in ()).throw(MemoryError("x")))
    out2 = tmp / "out2"
    assert main(_args(tmp, cfgs["fastem_pigdm"], data, out2, "--batch_size", batch, "--n_particles", "1"),
                method="fast_em") == 1
    assert all("lower --memory_budget_gb" in r["message"] and "while reading" not in r["message"]
               for r in _rows(out2).values())

"""Every shipped config loads and is usable; config errors name the file and the key; one schedule source."""
from pathlib import Path

import pytest
import torch
import yaml

from diffusion_em.config import (ConfigError, diffusion_config_dict, diffusion_config_from_dict,
                                 load_diffusion_config, load_kernel_config)
from diffusion_em.mstep import MStepConfig, m_step
from guided_diffusion.model_config import build_unet, load_model_config
from kernel_denoiser.network import load_kernel_denoiser
from util.geometry import dirac

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_configs_folder_holds_only_known_kinds():
    kinds = {p.name.split("_config")[0] for p in CONFIGS}
    assert kinds == {"diffusion", "kernel", "model"}, [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("diffusion_config")], ids=lambda p: p.name)
def test_shipped_diffusion_configs_load_and_round_trip(path):
    cfg = load_diffusion_config(path)
    assert cfg.method == ("fast_em" if "fastem" in path.name else "diffusion_em")
    assert cfg.guidance == ("dps" if "dps" in path.name else "pigdm")
    # what is saved with the results loads back to the same config
    assert diffusion_config_from_dict(diffusion_config_dict(cfg), "saved") == cfg


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("kernel_config")], ids=lambda p: p.name)
def test_shipped_kernel_configs_run_an_m_step_with_their_denoiser(path, one_thread):
    """kernel_config_64.yaml used to be refused ('kernel_size must be odd') although the README lists it."""
    cfg = load_kernel_config(path)
    s = cfg.kernel_size
    den = load_kernel_denoiser(str(ROOT / cfg.denoiser_path))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 2 * s, 2 * s, generator=g)
    k = m_step(x, x, dirac(s), 0.02, MStepConfig(J=1), den)
    assert k.shape == (1, 1, s, s) and abs(float(k.sum()) - 1) < 1e-4


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("model_config")], ids=lambda p: p.name)
def test_shipped_model_configs_build_their_unet(path):
    cfg = load_model_config(path)
    assert cfg.model_path and cfg.schedule == "linear"
    with torch.device("meta"):  # the FFHQ net has 94M parameters: build it without allocating them
        model = build_unet(cfg)
    assert sum(p.numel() for p in model.parameters()) > 1e6


def _write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("key,value,message", [
    ("channel_mult", 5, "key 'channel_mult' must be str"),
    ("num_heads", "four", "key 'num_heads' must be int"),
    ("channel_mult", "1,x,2", "key 'channel_mult'"),
    ("attention_resolutions", "16,0", "key 'attention_resolutions'"),
    ("schedule", "quadratic", "key 'schedule'"),
    ("num_channels", 0, "key 'num_channels' must be >= 1"),
    ("use_fp16", "no", "key 'use_fp16' must be bool"),
])
def test_model_config_errors_name_the_key(tmp_path, key, value, message):
    base = yaml.safe_load((ROOT / "configs" / "model_config_bundled.yaml").read_text())
    p = _write(tmp_path, {**base, key: value})
    with pytest.raises(ConfigError, match=message) as e:
        load_model_config(p)
    assert str(p) in str(e.value)
    base.pop("image_size")
    with pytest.raises(ConfigError, match="missing key 'image_size'"):
        load_model_config(_write(tmp_path, base))


def _fast():
    return yaml.safe_load((ROOT / "configs" / "diffusion_config_fastem_pigdm.yaml").read_text())


def _fast_dps():
    return yaml.safe_load((ROOT / "configs" / "diffusion_config_fastem_dps.yaml").read_text())


def _diff():
    return yaml.safe_load((ROOT / "configs" / "diffusion_config_pigdm.yaml").read_text())


@pytest.mark.parametrize("make,change,message", [
    (_fast, {"em_rounds": 3}, "key 'em_rounds' applies only to method 'diffusion_em'"),
    (_diff, {"mstep": {"every": 2}}, "key 'mstep.every' applies only to method 'fast_em'"),
    (_diff, {"mstep": {"pigdm_r2": True}}, "pigdm_r2"),
    (_fast, {"guidance": "dps", "mstep": {"pigdm_r2": False}}, "key 'mstep.pigdm_r2' applies only to guidance 'pigdm'"),
    (_fast_dps, {"pigdm_jacobian": "none"}, "key 'pigdm_jacobian' applies only to guidance 'pigdm'"),
    (_fast, {"pigdm_jacobian": "identity"}, "key 'pigdm_jacobian' must be one of"),
    (_fast, {"schedule": "linear"}, "model config"),
    (_fast, {"mstep_every": 2}, "'every' in the 'mstep' section"),
    (_fast, {"mstep": {"J": 0}}, r"\[mstep\]: key 'J' must be >= 1"),
    (_fast, {"steps": "many"}, "key 'steps' must be int"),
    (_fast, {"boundary": "mirror"}, "key 'boundary' must be one of"),
    (_fast, {"kernel": "gaussian"}, "key 'kernel' must be one of"),
    (_fast, {"on_divergence": "skip"}, "key 'on_divergence' must be one of"),
    (_fast, {"classical_blend": 1.5}, r"key 'classical_blend' must be in \[0, 1\]"),
    (_fast, {"classical_anchor": "yes"}, r"key 'classical_anchor' must be one of \('none', 'blind', 'all'\)"),
    (_fast, {"classical_anchor": True}, r"key 'classical_anchor' must be str, got bool"),
    (_fast, {"precision": "bf8"}, r"key 'precision' must be one of \('fp32', 'bf16', 'fp16', 'auto'\)"),
    (_diff, {"kernel": "auto"}, "key 'kernel' must be 'em', 'l0_em' or 'l0_box' with Diffusion EM"),
    (_diff, {"mstep": {"start": 0.2}}, "key 'mstep.start' applies only to method 'fast_em'"),
    (_diff, {"final_pass": True}, "key 'final_pass' applies only to method 'fast_em'"),
    (_diff, {"kernel_pass_steps": 50}, "key 'kernel_pass_steps' applies only to method 'fast_em'"),
    (_diff, {"kernel_pass_particles": 1}, "key 'kernel_pass_particles' applies only to method 'fast_em'"),
    (_diff, {"zeta_true_kernel": 3.0}, "key 'zeta_true_kernel' applies only to method 'fast_em'"),
])
def test_diffusion_config_errors_name_the_key(tmp_path, make, change, message):
    """Keys for another method were silently ignored (e.g. pigdm_r2 under Diffusion EM); now they are errors."""
    d = make()
    for k, v in change.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    p = _write(tmp_path, d)
    with pytest.raises(ConfigError, match=message) as e:
        load_diffusion_config(p)
    assert str(p) in str(e.value)


def test_the_schedule_comes_from_the_model_config(tmp_path, tiny_unet, tiny_unet_config):
    """Training read `schedule` from the model config while sampling used the diffusion config's: one source now."""
    from diffusion_em.run import build_parser, restorer_from_args
    from guided_diffusion.schedule import Schedule

    torch.save(tiny_unet.state_dict(), tmp_path / "unet.pt")
    model = _write(tmp_path, {**tiny_unet_config, "model_path": str(tmp_path / "unet.pt"), "schedule": "cosine"}, "m.yaml")
    kernel = _write(tmp_path, {"kernel_size": 9, "denoiser_path": None}, "k.yaml")
    diff = _write(tmp_path, {**_fast(), "steps": 7}, "d.yaml")
    args = build_parser("fast_em").parse_args(["--img_model_config", str(model), "--kernel_config", str(kernel),
                                               "--diffusion_config", str(diff), "--device", "cpu"])
    ctx = restorer_from_args(args, "fast_em")
    assert (ctx.denoiser.schedule.alphas_cumprod == Schedule.create(7, "cosine").alphas_cumprod).all()
    assert not (ctx.denoiser.schedule.alphas_cumprod == Schedule.create(7, "linear").alphas_cumprod).all()


def test_the_guidance_follows_the_config():
    from diffusion_em.config import diffusion_config_from_dict
    from diffusion_em.restore import guidance_for
    from guided_diffusion.guidance import DPS
    g = guidance_for(diffusion_config_from_dict({**_fast(), "pigdm_jacobian": "none", "zeta": 0.5}, "t"))
    assert g.jacobian == "none" and g.zeta == 0.5 and not g.needs_grad
    assert guidance_for(diffusion_config_from_dict(_fast(), "t")).needs_grad  # the paper's VJP by default
    assert isinstance(guidance_for(diffusion_config_from_dict(_fast_dps(), "t")), DPS)


def test_precision_auto_is_bf16_only_on_a_cpu_with_bf16_units(monkeypatch):
    """'auto' resolves per device: bf16 where the CPU has BF16 units, fp32 on other CPUs and on GPUs (not measured
    there); an explicit precision is kept everywhere."""
    from diffusion_em import restore
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for units, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(restore, "cpu_has_bf16_units", lambda units=units: units)
        assert restore.resolve_precision("auto", cpu) == want
        assert restore.resolve_precision("auto", gpu) == "fp32"
        for p in ("fp32", "bf16", "fp16"):
            assert restore.resolve_precision(p, cpu) == p and restore.resolve_precision(p, gpu) == p


def test_cpu_bf16_units_are_those_the_kernel_reports():
    """torch's CPUID probe agrees with the flags Linux lists (avx512_bf16, amx_tile)."""
    from diffusion_em.restore import cpu_has_bf16_units
    info = Path("/proc/cpuinfo")
    if not info.exists():
        pytest.skip("no /proc/cpuinfo (not Linux): nothing to compare the probe with")
    flags = set(next((line.split(":", 1)[1].split() for line in info.read_text().splitlines()
                      if line.startswith("flags")), []))
    if not flags:
        pytest.skip("/proc/cpuinfo lists no x86 flags (not an x86 CPU)")
    assert cpu_has_bf16_units() == bool(flags & {"avx512_bf16", "amx_tile"})

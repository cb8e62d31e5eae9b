"""Strict, frozen run configuration loaded from YAML.

Three files describe a run (all saved, resolved, next to the results):
- the model config (`configs/model_config*.yaml`): UNet keys of `guided_diffusion.unet.create_model` plus
  `model_path`;
- the diffusion config (`configs/diffusion_config_*.yaml`): method, guidance, steps and EM settings;
- the kernel config (`configs/kernel_config_*.yaml`): kernel size and kernel-denoiser weights.
An unknown key or a value of the wrong type is an error naming the key and the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from diffusion_em.mstep import MStepConfig
from guided_diffusion.unet import IGNORED_KEYS, MODEL_KEYS

METHODS = ("fast_em", "diffusion_em")
GUIDANCES = ("pigdm", "dps")
BOUNDARIES = ("auto", "circular", "reflect", "taper", "replicate")


class ConfigError(ValueError):
    pass


def _check_type(name: str, value: Any, tp, where: str):
    """Check `value` against a simple annotation (int/float/bool/str/Optional[...]/tuple[int,...])."""
    if get_origin(tp) is Union:
        if value is None and type(None) in get_args(tp):
            return value
        tp = next(a for a in get_args(tp) if a is not type(None))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, tp) and not (tp in (int, float) and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: key '{name}' must be {tp.__name__}, got {type(value).__name__} ({value!r})")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown key '{k}' (known: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[k]):
            kw[k] = _build(hints[k], v, f"{where} [{k}]")
        else:
            kw[k] = _check_type(k, v, hints[k], where)
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _read_yaml(path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return data or {}


@dataclass(frozen=True)
class MStepSection:
    lam: float = 1.0
    beta: float = 1e5
    J: int = 10
    colour: str = "joint"            # 'joint' | 'per_channel_mean' (authors')
    pigdm_r2: bool = False           # paper App. D: add ΠGDM's r_t² to the M-step denominator (authors' code: off)


@dataclass(frozen=True)
class DiffusionConfig:
    method: str = "fast_em"          # 'fast_em' (M-step at every step) | 'diffusion_em' (L full runs)
    guidance: str = "pigdm"          # 'pigdm' | 'dps'
    steps: int = 100                 # respaced diffusion steps (paper: ΠGDM 100, DPS 1000)
    zeta: float = 1.0                # guidance weight factor (ΠGDM: × authors' weight; DPS: ζ in [0,1] units)
    schedule: str = "linear"
    clip_denoised: bool = True
    precision: str = "fp32"          # UNet autocast: 'fp32' | 'bf16' (fast on GPUs and AMX CPUs) | 'fp16' (GPU)
    em_rounds: int = 10              # L, Diffusion EM only
    mstep: MStepSection = field(default_factory=MStepSection)
    mstep_every: int = 1             # Fast EM: run the M-step every k diffusion steps
    recenter: bool = True            # re-centre the kernel's centre of mass after each M-step
    boundary: str = "auto"           # 'auto': circular for synthetic test sets, 'taper' for plain photos
    n_particles: int = 1
    retries: int = 1                 # divergence guard: extra attempts with fresh noise before failing an image
    guard_residual: float = 25.0     # fail when mean (k⊛x − y)² > guard_residual·σ² + 1e-3
    guard_saturation: float = 0.1    # fail when the result has this many more saturated pixels than y

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {GUIDANCES}, got {self.guidance!r}")
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        if self.mstep.colour not in ("joint", "per_channel_mean"):
            raise ValueError(f"mstep.colour must be 'joint' or 'per_channel_mean', got {self.mstep.colour!r}")
        for name in ("steps", "em_rounds", "n_particles", "mstep_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.retries < 0:
            raise ValueError("retries must be >= 0")


@dataclass(frozen=True)
class KernelConfig:
    kernel_size: int = 33
    denoiser_path: Optional[str] = "models/kernel_denoiser_33.pth"   # null: M-step without prior

    def __post_init__(self):
        if not 3 <= self.kernel_size <= 129 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, 3..129, got {self.kernel_size}")


def mstep_config(d: DiffusionConfig, k: KernelConfig) -> MStepConfig:
    m = d.mstep
    return MStepConfig(lam=m.lam, beta=m.beta, J=m.J, kernel_size=k.kernel_size, colour=m.colour)


def load_diffusion_config(path, overrides: Optional[dict] = None) -> DiffusionConfig:
    data = _read_yaml(path)
    data.update(overrides or {})
    return _build(DiffusionConfig, data, str(path))


def load_kernel_config(path) -> KernelConfig:
    return _build(KernelConfig, _read_yaml(path), str(path))


def load_model_config(path) -> dict:
    """UNet keys (checked against create_model's) plus `model_path`."""
    data = _read_yaml(path)
    allowed = set(MODEL_KEYS) | set(IGNORED_KEYS) | {"model_path", "schedule"}
    for k in data:
        if k not in allowed:
            raise ConfigError(f"{path}: unknown key '{k}' (known: {', '.join(sorted(allowed))})")
    for k in ("image_size", "num_channels", "num_res_blocks"):
        if k not in data:
            raise ConfigError(f"{path}: missing key '{k}'")
        _check_type(k, data[k], int, str(path))
    for k in ("learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown", "use_fp16",
              "use_new_attention_order", "use_checkpoint"):
        if k in data:
            _check_type(k, data[k], bool, str(path))
    return data


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)

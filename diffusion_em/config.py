"""The run's configuration: three strict, frozen files, all saved (resolved) next to the results.

- the model config (`configs/model_config*.yaml`, read by `guided_diffusion.model_config`): the UNet, its
  weights and the β schedule they were trained with;
- the diffusion config (`configs/diffusion_config_*.yaml`): method, guidance, steps, the M-step section
  (`mstep:`, `diffusion_em.mstep.MStepConfig`) and the divergence guard;
- the kernel config (`configs/kernel_config_*.yaml`): kernel size and kernel-denoiser weights.
An unknown key, a key that does not apply to the chosen method, or a value of the wrong type is a
ConfigError naming the key and the file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from diffusion_em.em import OUTPUTS
from diffusion_em.mstep import MStepConfig
from guided_diffusion.model_config import ModelConfig, load_model_config
from util.config import ConfigError, build, read_yaml

METHODS = ("fast_em", "diffusion_em")
GUIDANCES = ("pigdm", "dps")
KERNELS = ("em", "l0", "l0_em", "l0_box", "auto")
BOUNDARIES = ("auto", "circular", "reflect", "taper", "replicate")
CLASSICAL_ANCHOR = ("none", "blind", "all")
ON_DIVERGENCE = ("fail", "classical")
# keys that only mean something for one method or guidance: giving them for another is an error
ONLY_FOR = {("em_rounds",): (("method", "diffusion_em"),), ("mstep", "every"): (("method", "fast_em"),), ("mstep", "coarse"): (("method", "fast_em"),),
           ("mstep", "start"): (("method", "fast_em"),),
            ("mstep", "pigdm_r2"): (("method", "fast_em"), ("guidance", "pigdm")),
            ("pigdm_jacobian",): (("guidance", "pigdm"),),
            # a second run with the found kernel, and the weight with a known kernel: Fast EM only (Diffusion EM
            # re-estimates the kernel every round and refuses --true_kernel)
            ("final_pass",): (("method", "fast_em"),), ("kernel_pass_particles",): (("method", "fast_em"),),
            ("kernel_pass_steps",): (("method", "fast_em"),), ("zeta_true_kernel",): (("method", "fast_em"),)}
# keys of earlier versions: where they went
MOVED = {"schedule": "the β schedule belongs to the weights: set 'schedule' in the model config",
         "mstep_every": "it is now 'every' in the 'mstep' section",
         "recenter": "it is now 'recenter' in the 'mstep' section"}


PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class DiffusionConfig:
    method: str = "fast_em"          # 'fast_em' (M-step at every step) | 'diffusion_em' (L full runs)
    guidance: str = "pigdm"          # 'pigdm' | 'dps'
    steps: int = 100                 # respaced diffusion steps (paper: ΠGDM 100, DPS 1000)
    zeta: float = 1.0                # guidance weight factor (ΠGDM: × authors' weight; DPS: ζ in [0,1] units)
    pigdm_jacobian: str = "unet"     # 'unet': ΠGDM's VJP through the UNet (paper) | 'none': no backward pass
    zeta_true_kernel: Optional[float] = None  # ζ when the kernel is known (--true_kernel); None: zeta
    clip_denoised: bool = True
    precision: str = "fp32"          # UNet autocast: fp32 | bf16 | fp16 (GPU) | auto (restore.resolve_precision)
    compile: bool = False            # torch.compile (inductor) the UNet: a one-off compilation, then faster calls
    em_rounds: int = 10              # L, Diffusion EM only
    mstep: MStepConfig = field(default_factory=MStepConfig)
    kernel: str = "em"               # 'em': M-step from a Dirac (paper) | 'l0': the classical ℓ0 kernel, fixed |
                                     # 'l0_em': M-step from the ℓ0 kernel | 'l0_box': M-step from a Dirac inside
                                     # the ℓ0 kernel's size box | 'auto': 'l0' on photos, 'l0_box' on circular sets
    boundary: str = "auto"           # 'auto': circular where meta.csv declares it, 'taper' otherwise (plain photos)
    n_particles: int = 1
    final_pass: bool = False         # Fast EM finds the kernel, then one non-blind run with it fixed makes the image
    kernel_pass_particles: Optional[int] = None  # particles of that kernel-finding run (None: n_particles)
    kernel_pass_steps: Optional[int] = None      # its diffusion steps (None: steps)
    branch_fraction: float = 1.0     # particles run separately for the last fraction of the steps (1: from x_T)
    output: str = "sample"           # 'sample': first particle (paper) | 'mean': particle average (posterior mean)
    classical_blend: float = 0.0     # w: output (1 − w)·diffusion + w·hyper-Laplacian deconvolution with the final kernel (0: paper)
    classical_anchor: str = "none"   # with w > 0, 'diffusion' above fitted to the data first (the hyper-Laplacian solve
                                     # with its prior centred on that image; restore.anchored_deconvolution): 'none'
                                     # (paper) | 'blind': when the kernel is estimated, not with --true_kernel | 'all'
    eta: float = 1.0                 # 1: DDPM ancestral steps (paper) | < 1: DDIM steps, 0 deterministic
    retries: int = 1                 # divergence guard: extra attempts with fresh noise before failing an image
    guard_residual: float = 25.0     # fail when mean (k⊛x − y)² > guard_residual·σ² + 1e-3
    guard_saturation: float = 0.1    # fail when the result has this many more saturated pixels than y
    on_divergence: str = "fail"      # after the retries: 'fail' the image | 'classical': write the classical
                                     # restoration (its ℓ0 or true kernel + hyper-Laplacian), flagged

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("guidance", GUIDANCES), ("boundary", BOUNDARIES), ("kernel", KERNELS),
                              ("precision", PRECISIONS), ("output", OUTPUTS),
                              ("pigdm_jacobian", ("unet", "none")), ("on_divergence", ON_DIVERGENCE),
                              ("classical_anchor", CLASSICAL_ANCHOR)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"key '{name}' must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("steps", "em_rounds", "n_particles", "kernel_pass_particles",
                     "kernel_pass_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"key '{name}' must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.branch_fraction <= 1.0:
            raise ValueError(f"key 'branch_fraction' must be in (0, 1], got {self.branch_fraction}")
        if not 0.0 <= self.classical_blend <= 1.0:
            raise ValueError(f"key 'classical_blend' must be in [0, 1], got {self.classical_blend}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"key 'eta' must be in [0, 1], got {self.eta}")
        if self.zeta_true_kernel is not None and not self.zeta_true_kernel > 0:
            raise ValueError(f"key 'zeta_true_kernel' must be > 0 or null, got {self.zeta_true_kernel}")
        if self.retries < 0:
            raise ValueError(f"key 'retries' must be >= 0, got {self.retries}")
        if self.method == "diffusion_em" and self.kernel not in ("em", "l0_em", "l0_box"):
            raise ValueError(f"key 'kernel' must be 'em', 'l0_em' or 'l0_box' with Diffusion EM (its rounds re-estimate the "
                             f"kernel), got {self.kernel!r}")
        if self.mstep.pigdm_r2 and (self.method != "fast_em" or self.guidance != "pigdm"):
            raise ValueError("key 'mstep.pigdm_r2' applies to Fast EM with ΠGDM guidance only")

    def unmet(self, key: tuple) -> Optional[tuple]:
        """(field, required value) that a (section, name) key needs and this config lacks, else None."""
        return next(((f, v) for f, v in ONLY_FOR.get(key, ()) if getattr(self, f) != v), None)

    def applies(self, key: tuple) -> bool:
        return self.unmet(key) is None


@dataclass(frozen=True)
class KernelConfig:
    kernel_size: int = 33
    denoiser_path: Optional[str] = "models/kernel_denoiser_33.pth"   # null: M-step without prior

    def __post_init__(self):
        # even sizes are centred at s//2 like odd ones (util.fft.p2o), e.g. the shipped 64×64 denoiser
        if not 3 <= self.kernel_size <= 129:
            raise ValueError(f"key 'kernel_size' must be in 3..129, got {self.kernel_size}")


def _given_keys(data: dict) -> list:
    """(section, name) / (name,) keys present in a raw diffusion-config mapping."""
    keys = []
    for k, v in data.items():
        keys.append((k,))
        if isinstance(v, dict):
            keys += [(k, kk) for kk in v]
    return keys


def diffusion_config_from_dict(data: dict, where: str) -> DiffusionConfig:
    """A DiffusionConfig from a mapping; keys for another method or guidance are errors naming the key."""
    cfg = build(DiffusionConfig, data, where, hints=MOVED)
    for key in _given_keys(data):
        need = cfg.unmet(key)
        if need is not None:
            raise ConfigError(f"{where}: key '{'.'.join(key)}' applies only to {need[0]} '{need[1]}', "
                              f"not {need[0]} '{getattr(cfg, need[0])}'; remove it")
    return cfg


def load_diffusion_config(path, overrides: Optional[dict] = None) -> DiffusionConfig:
    data = read_yaml(path)
    data.update(overrides or {})
    return diffusion_config_from_dict(data, str(path))


def load_kernel_config(path) -> KernelConfig:
    return build(KernelConfig, read_yaml(path), str(path))


def diffusion_config_dict(cfg: DiffusionConfig) -> dict:
    """The config as saved with the results: only the keys that apply to its method and guidance."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        if isinstance(v, dict):
            out[k] = {kk: vv for kk, vv in v.items() if cfg.applies((k, kk))}
        elif cfg.applies((k,)):
            out[k] = v
    return out


__all__ = ["ConfigError", "DiffusionConfig", "KernelConfig", "ModelConfig", "MStepConfig", "load_diffusion_config",
           "load_kernel_config", "load_model_config", "diffusion_config_dict", "diffusion_config_from_dict"]

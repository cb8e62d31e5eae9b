"""The model config (`configs/model_config*.yaml`): the one reader shared by sampling, training and bench/.

It holds what belongs to the trained weights: the UNet keys of `create_model`, the weights' path and the β
schedule the weights were trained with (`schedule`, the only place the schedule is set: training and
sampling both read it here). Every key is typed; a wrong type or an unparsable value is a ConfigError
naming the file and the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from guided_diffusion.schedule import SCHEDULES
from guided_diffusion.unet import MODEL_KEYS, UNetModel, _parse_attention, _parse_channel_mult, create_model
from util.config import ConfigError, build, read_yaml


@dataclass(frozen=True)
class ModelConfig:
    image_size: int
    num_channels: int
    num_res_blocks: int
    channel_mult: str = ""                 # "1,1,2,2,4"; "" = ADM's default for image_size
    learn_sigma: bool = False
    class_cond: bool = False
    attention_resolutions: str = "16"      # comma-separated downsampling rates, e.g. "32,16,8"
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    dropout: float = 0.0
    resblock_updown: bool = False
    use_fp16: bool = False
    use_new_attention_order: bool = False
    use_checkpoint: bool = False           # accepted for guided-diffusion configs; does not change the weights
    model_path: Optional[str] = None       # the weights (relative to the repository root unless absolute)
    schedule: str = "linear"               # β schedule the weights were trained with: 'linear' | 'cosine'

    def __post_init__(self):
        for name in ("image_size", "num_channels", "num_res_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"key '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("num_heads", "num_head_channels", "num_heads_upsample"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ValueError(f"key '{name}' must be >= 1 or -1, got {v}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"key 'schedule' must be one of {SCHEDULES}, got {self.schedule!r}")
        try:
            mult = _parse_channel_mult(self.channel_mult, self.image_size)
        except ValueError as e:
            raise ValueError(f"key 'channel_mult' {self.channel_mult!r} is not a list of numbers ({e})") from None
        if not mult or any(m <= 0 for m in mult):
            raise ValueError(f"key 'channel_mult' {self.channel_mult!r} must list positive numbers")
        try:
            _parse_attention(self.attention_resolutions, self.image_size)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"key 'attention_resolutions' {self.attention_resolutions!r} must list positive "
                             f"integers, e.g. \"32,16,8\"") from None

    def unet_kwargs(self) -> dict:
        """The keyword arguments of `create_model`."""
        return {k: getattr(self, k) for k in MODEL_KEYS}


def load_model_config(path) -> ModelConfig:
    """Read and check a model config file."""
    return build(ModelConfig, read_yaml(path), str(path))


def build_unet(cfg: ModelConfig) -> UNetModel:
    """The UNet of a model config, with fresh (untrained) weights."""
    return create_model(**cfg.unet_kwargs())


__all__ = ["ModelConfig", "ConfigError", "load_model_config", "build_unet"]

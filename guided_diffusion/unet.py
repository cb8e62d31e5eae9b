"""The ADM ("guided-diffusion") UNet (Dhariwal & Nichol 2021), written from its published architecture.

State-dict names match the public checkpoints (DPS `ffhq_10m.pt`, OpenAI `256x256_diffusion_uncond.pt`),
so they load unchanged. Differences from the original that do not change the result:
attention through `scaled_dot_product_attention` (no gradient checkpointing), no fp16 weight copies
(use autocast instead, see `UNetModel.forward`).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion import nhwc_norm
from util.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict

MODEL_KEYS = (
    "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
    "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
    "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16", "use_new_attention_order",
)
# Accepted for compatibility with guided-diffusion configs; they do not change the weights.
IGNORED_KEYS = ("use_checkpoint",)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f), sin(t·f)], f_i = exp(−ln(max_period)·i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (as the checkpoints were trained)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        if nhwc_norm.applies(x):  # one channels-last bf16 image on a CPU (docs/speed.md "Channels-last bf16 ...")
            return nhwc_norm.group_norm_nhwc(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous():
            # torch's CPU kernel already computes bf16 input in float32 (the same error against fp32, measured),
            # without the two casts: 0.83x the bundled net's bf16 call (docs/speed.md "bf16 without casts on the CPU")
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.on_float32_copy(x)

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """GroupNorm(x)·(1 + scale) + shift (the scale-shift norm of ResBlock); on the channels-last bf16 path
        the modulation is folded into the per-channel affine map: one pass and one rounding instead of three."""
        if nhwc_norm.applies(x):
            s, b = 1 + scale.reshape(-1).float(), shift.reshape(-1).float()
            return nhwc_norm.group_norm_nhwc(x, self.num_groups, self.weight * s, self.bias * s + b, self.eps)
        return self(x) * (1 + scale) + shift

    def on_float32_copy(self, x: torch.Tensor) -> torch.Tensor:
        """The reduced-precision path elsewhere (GPUs, channels-last): GroupNorm of a float32 copy, cast back."""
        return super().forward(x.float()).to(x.dtype)


def normalization(ch: int) -> GroupNorm32:
    return GroupNorm32(32, ch)


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class Conv1x1(nn.Conv2d):
    """1×1 convolution; on channels-last input computed as one matrix product over channels (no copy).

    Why: single-threaded, torch sends batch<16 1×1 convolutions to its im2col path, ~10x slower than a GEMM
    (bench/unet_speed.py). Same parameters and state-dict names as nn.Conv2d(cin, cout, 1).
    """

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return F.linear(x.permute(0, 2, 3, 1), self.weight[:, :, 0, 0], self.bias).permute(0, 3, 1, 2)
        if x.dim() == 4 and x.device.type == "cpu" and x.is_contiguous() and torch.is_autocast_enabled("cpu"):
            # NCHW under CPU autocast: W·x per image as one matrix product, 3.5x faster than bf16 conv2d's 1×1 path
            w = self.weight[:, :, 0, 0].expand(x.shape[0], -1, -1)
            return torch.baddbmm(self.bias[None, :, None], w, x.flatten(2)).unflatten(2, x.shape[2:])
        return super().forward(x)


class TimestepBlock(nn.Module):
    """A block whose forward takes the time embedding."""


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


def same_layout(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """out in channels-last when `like` is: torch's upsampling and attention's reshape return NCHW, and one NCHW
    tensor in a channels-last net costs a layout conversion in every convolution and element-wise op after it."""
    if nhwc_norm.is_nhwc(like) and not nhwc_norm.is_nhwc(out):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def cat_channels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([a, b], dim=1), channels-last when both are (torch's CPU cat of channels-last tensors along
    the channels returns NCHW): one concatenation of the NHWC views."""
    if nhwc_norm.is_nhwc(a) and nhwc_norm.is_nhwc(b):
        return torch.cat([a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)], dim=3).permute(0, 3, 1, 2)
    return torch.cat([a, b], dim=1)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = same_layout(F.interpolate(x, scale_factor=2, mode="nearest"), x)
        return self.conv(x) if self.use_conv else x


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """F.avg_pool2d(x, 2); for bf16 on a CPU as strided adds in float32, in avg_pool2d's order (row by row
    within the window): bit-equal, 2x faster."""
    H, W = x.shape[-2:]
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous() or H % 2 or W % 2:
        return F.avg_pool2d(x, 2)
    s = x[..., 0::2, 0::2].float() + x[..., 0::2, 1::2]
    s = s + x[..., 1::2, 0::2]
    return ((s + x[..., 1::2, 1::2]) * 0.25).to(x.dtype)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else avg_pool_2x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_scale_shift_norm: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else Conv1x1(channels, out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[1](self.in_layers[0](x))
            h = self.in_layers[2](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0].modulated(h, scale, shift)
            h = self.out_layers[3](self.out_layers[2](self.out_layers[1](h)))
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention; q·k scaled by d^(−1/2) overall (d^(−1/4) each), via SDPA."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.new_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        T, nh = H * W, self.num_heads
        d = C // nh
        xs = x.reshape(B, C, T)
        qkv = self.qkv(self.norm(xs))
        if self.new_order:  # split q,k,v first, then heads
            q, k, v = (t.reshape(B * nh, d, T) for t in qkv.chunk(3, dim=1))
        else:  # legacy: heads first, then q,k,v
            q, k, v = qkv.reshape(B * nh, 3 * d, T).split(d, dim=1)
        # SDPA wants (batch, T, d); the softmax runs in float32 when inputs are float32.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        a = a.transpose(1, 2).reshape(B, C, T)
        return same_layout((xs + self.proj_out(a)).reshape(B, C, H, W), x)


def _parse_channel_mult(channel_mult, image_size: int) -> tuple[float, ...]:
    if channel_mult in ("", None):
        table = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if image_size not in table:
            raise ValueError(f"no default channel_mult for image_size {image_size}; give channel_mult")
        return table[image_size]
    if isinstance(channel_mult, str):
        return tuple(float(c) if "." in c else int(c) for c in channel_mult.split(","))
    return tuple(channel_mult)


def _parse_attention(attention_resolutions, image_size: int) -> tuple[int, ...]:
    if attention_resolutions in ("", None):
        return ()
    if isinstance(attention_resolutions, int):
        res: Iterable = [attention_resolutions]
    elif isinstance(attention_resolutions, str):
        res = attention_resolutions.split(",")
    else:
        res = attention_resolutions
    return tuple(image_size // int(r) for r in res)


class UNetModel(nn.Module):
    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_ds: tuple[int, ...], dropout: float = 0.0,
                 channel_mult: tuple = (1, 2, 4, 8), num_classes: int | None = None, use_fp16: bool = False,
                 num_heads: int = 1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size, self.model_channels, self.out_channels = image_size, model_channels, out_channels
        self.num_levels = len(channel_mult)
        self.num_classes = num_classes
        self.use_fp16 = use_fp16
        E = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, E), nn.SiLU(), nn.Linear(E, E))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, E)

        def res(cin, cout, **kw):
            return ResBlock(cin, E, dropout, out_channels=cout, use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(c, heads):
            return AttentionBlock(c, heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, True)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skip_chans.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_ds:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(int(channel_mult[0] * model_channels), out_channels, 3, padding=1)))

    @property
    def size_multiple(self) -> int:
        """H and W must be divisible by this."""
        return 2 ** (self.num_levels - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        m = self.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input {tuple(x.shape[-2:])} must have H and W divisible by {m}; pad it first")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            if y is None:
                raise ValueError("class-conditional model needs labels y")
            emb = emb + self.label_emb(y)
        if self.use_fp16 and x.device.type != "cpu":  # fp16 blocks as in the original, through autocast
            with torch.autocast(x.device.type, dtype=torch.float16):
                return self._body(x, emb).float()
        return self._body(x, emb)

    def _body(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(cat_channels(h, skips.pop()), emb)
        return self.out(h).to(x.dtype)


def create_model(image_size: int, num_channels: int, num_res_blocks: int, channel_mult="", learn_sigma: bool = False,
                 class_cond: bool = False, attention_resolutions="16", num_heads: int = 1, num_head_channels: int = -1,
                 num_heads_upsample: int = -1, use_scale_shift_norm: bool = False, dropout: float = 0.0,
                 resblock_updown: bool = False, use_fp16: bool = False, use_new_attention_order: bool = False,
                 use_checkpoint: bool = False, in_channels: int = 3) -> UNetModel:
    """Build the UNet from guided-diffusion config keys (configs/model_config.yaml). Weights are not loaded."""
    return UNetModel(
        image_size=image_size, in_channels=in_channels, model_channels=num_channels,
        out_channels=6 if learn_sigma else 3, num_res_blocks=num_res_blocks,
        attention_ds=_parse_attention(attention_resolutions, image_size), dropout=dropout,
        channel_mult=_parse_channel_mult(channel_mult, image_size), num_classes=1000 if class_cond else None,
        use_fp16=use_fp16, num_heads=num_heads, num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample, use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown, use_new_attention_order=use_new_attention_order)


def read_state_dict(path) -> dict:
    """Load a plain state_dict safely (weights_only). Accepts {'state_dict'|'ema'|'model': sd} wrappers."""
    obj = load_checkpoint(path)
    for key in ("ema", "state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors")
    return obj


def load_weights(model: nn.Module, path) -> nn.Module:
    """Load weights strictly into a built model; never falls back to random weights."""
    return load_state_dict_strict(model, read_state_dict(path), str(path))

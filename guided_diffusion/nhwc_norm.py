"""GroupNorm of one channels-last image on a CPU, through torch's batch-norm kernels.

Why: on a CPU, bf16 convolutions on channels-last (NHWC) tensors skip the layout reorders that NCHW costs
(a third of the bundled prior's bf16 call), but torch's own GroupNorm is slow on NHWC (its backward most of
all; docs/speed.md "Channels-last bf16 and page faults"). For one image (N = 1) a GroupNorm is a batch norm
over the (H·W, C) view of the NHWC memory — rows are pixels, columns channels — once each group's statistics are known,
and torch's batch-norm kernels are fast on that view and compute in float32 with one rounding of the output.

- groups of one channel (the 32-channel levels of a 32-group net): batch norm itself, forward and backward;
- larger groups: per-channel mean and variance (`batch_norm_update_stats`, no output written), combined
  into the group's; the output is batch norm in inference mode with the group's mean and variance; the
  backward's per-channel sums Σdy and Σdy·(x − μ) come from one batch-norm backward reduction.
"""
from __future__ import annotations

import torch


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(1, C, H, W) channels-last -> its (H·W, C) view (no copy)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _image(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(H·W, C) -> the (1, C, H, W) channels-last view."""
    n, c, h, w = shape
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def _per_channel(v: torch.Tensor, gs: int) -> torch.Tensor:
    """A value per group -> the same value for each of its gs channels."""
    return v.repeat_interleave(gs)


def _group_sum(v: torch.Tensor, gs: int) -> torch.Tensor:
    return v.view(-1, gs).sum(1)


class _GroupNormNHWC(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups: int, weight, bias, eps: float):
        gs = x.shape[1] // num_groups
        X = _rows(x)
        if gs == 1:
            Y, mean, rstd = torch.native_batch_norm(X, weight, bias, None, None, True, 0.0, eps)
        else:
            m_c, v_c = torch.batch_norm_update_stats(X, torch.zeros_like(weight), torch.ones_like(weight), 0.0)
            m_g = _group_sum(m_c, gs) / gs
            v_g = _group_sum(v_c + m_c * m_c, gs) / gs - m_g * m_g  # the group's E[x²] − mean², from exact channel moments
            mean, var = _per_channel(m_g, gs), _per_channel(v_g.clamp_min(0), gs)
            rstd = torch.rsqrt(var + eps)
            Y = torch.native_batch_norm(X, weight, bias, mean, var, False, 0.0, eps)[0]
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.gs, ctx.eps = gs, eps
        return _image(Y, x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable  # its backward treats the statistics as constants
    def backward(ctx, gy):
        x, mean, rstd, weight = ctx.saved_tensors
        gs, eps = ctx.gs, ctx.eps
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        X = _rows(x)
        D = _rows(gy.contiguous(memory_format=torch.channels_last))
        if gs == 1:
            dX, dw, db = torch.ops.aten.native_batch_norm_backward(D, X, weight, None, None, mean, rstd, True, eps,
                                                                  [need_x, need_w, need_b])
            return (_image(dX, x.shape) if need_x else None), None, dw, db, None
        # per channel: S1 = Σ dy, T = Σ dy·(x − μ_g) (batch norm's weight gradient with invstd 1)
        _, T, S1 = torch.ops.aten.native_batch_norm_backward(D, X, weight, None, None, mean, torch.ones_like(rstd),
                                                             True, eps, [False, True, True])
        dw = rstd * T if need_w else None
        db = S1 if need_b else None
        if not need_x:
            return None, None, dw, db, None
        n = X.shape[0] * gs
        A = _per_channel(_group_sum(weight * S1, gs), gs)
        B = _per_channel(_group_sum(weight * T, gs), gs)
        # dx = r·w·dy − r·A/n − r³·B/n·(x − μ): the last two terms as one affine map of x (batch norm, inference).
        # Both terms are rounded to x's dtype before the sum; where they cancel (dy nearly constant over a group, or
        # along its normalised input) a bf16 gradient is less accurate than torch's NCHW kernel's. Summing in
        # float32 costs 11 % of the bundled prior's call; the whole UNet's input gradient and synth24 did not
        # move (docs/speed.md "Channels-last bf16 and page faults"), so it stays in x's dtype.
        beta = -rstd.pow(3) * B / n
        gamma = -rstd * A / n
        XA = torch.native_batch_norm(X, beta, gamma, mean, torch.full_like(rstd, 1 - eps), False, 0.0, eps)[0]
        dX = torch.addcmul(XA, D, (rstd * weight).to(D.dtype))
        return _image(dX, x.shape), None, dw, db, None


def group_norm_nhwc(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """F.group_norm of one channels-last image (1, C, H, W) on a CPU; float32 statistics and affine map
    (weight, bias: float32 (C,)), output and input-gradient in x's dtype and layout."""
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_nhwc needs one image with channels divisible by {num_groups}, got {tuple(x.shape)}")
    return _GroupNormNHWC.apply(x, num_groups, weight.float(), bias.float(), eps)


def is_nhwc(x: torch.Tensor) -> bool:
    """A 4-d tensor stored channels-last (and not also NCHW-contiguous, as 1-channel or 1×1 tensors are)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def applies(x: torch.Tensor) -> bool:
    """Whether `group_norm_nhwc` is the fast path for x: one bf16 channels-last image on a CPU."""
    return is_nhwc(x) and x.shape[0] == 1 and x.device.type == "cpu" and x.dtype == torch.bfloat16

"""DDPM ancestral sampling ('fixed small' variance) with optional posterior guidance, one step at a time.

A step is two halves so that a driver can act between them (Fast Diffusion EM updates the kernel there):
`predict_x0` evaluates the UNet at x_t, and `ddpm_update` draws x_{t-1} from the posterior mean, adding
the guidance correction against the operator it is given. `ddpm_step` is both halves; `sample` is the
plain loop. Nothing here loads files, writes images or knows about EM.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from guided_diffusion.denoiser import EpsDenoiser, to_phys


class Prediction(NamedTuple):
    """x̂0 at one step: `x_t` tracks gradients when guidance needs them, `x0_model` ([-1, 1]) and `x0`
    ([0, 1]) carry the graph back to it."""
    x_t: torch.Tensor
    x0_model: torch.Tensor
    x0: torch.Tensor


def gaussian(shape: tuple, generator, device) -> torch.Tensor:
    """N(0, I) of `shape`. With a list of generators (one per image of a batch), each draws its own equal
    share of the rows, exactly as it would alone: a batched run then equals the one-by-one runs."""
    if isinstance(generator, (list, tuple)):
        rows = shape[0] // len(generator)
        return torch.cat([torch.randn((rows,) + tuple(shape[1:]), generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def needs_grad(guidance) -> bool:
    return guidance is not None and getattr(guidance, "needs_grad", True)


def keeps_graph(guidance, x: torch.Tensor, low_memory: bool = False) -> bool:
    """Whether the step's UNet pass keeps its graph: the guidance needs one, unless the low-memory mode makes
    the graphs one row at a time (`guidance_correction`; a single row gains nothing from that)."""
    return needs_grad(guidance) and not (low_memory and x.shape[0] > 1)


def predict_x0(denoiser: EpsDenoiser, x: torch.Tensor, i: int, track_grad: bool) -> Prediction:
    """One UNet evaluation at step i (x in model space)."""
    x = x.detach().requires_grad_(track_grad)
    with torch.set_grad_enabled(track_grad):
        x0_model = denoiser.x0(x, i)
        return Prediction(x, x0_model, to_phys(x0_model))


def ddpm_update(denoiser: EpsDenoiser, pred: Prediction, i: int, generator: torch.Generator,
                guidance=None, op=None, y: Optional[torch.Tensor] = None, eta: float = 1.0) -> torch.Tensor:
    """x_{t-1} = posterior mean of q(x_{t-1} | x_t, x̂0) + noise (i > 0) + guidance correction (model space).

    eta < 1 takes a DDIM step instead (Schedule.step_coefs); no noise is drawn when its std is 0.
    """
    a, b, std = denoiser.schedule.step_coefs(i, eta)
    x = pred.x_t.detach()
    mean = a * pred.x0_model.detach() + b * x
    if i > 0 and std > 0:
        mean = mean + std * gaussian(mean.shape, generator, mean.device)
    if guidance is not None:
        mean = mean + guidance_correction(denoiser, pred, i, guidance, op, y, eta)
    return mean


def guidance_correction(denoiser: EpsDenoiser, pred: Prediction, i: int, guidance, op, y: torch.Tensor,
                        eta: float = 1.0) -> torch.Tensor:
    """The guidance's correction at step i. A prediction made without its graph (`predict_x0(...,
    track_grad=False)` for a guidance that needs one: the low-memory mode) has each row's UNet pass recomputed
    with its graph, one row at a time, against that row's operator (`op.row(r)`): the same correction, since
    rows never mix, with one row's activations in memory instead of all rows' (one more forward pass a row)."""
    if not needs_grad(guidance) or pred.x_t.requires_grad:
        return guidance.correction(pred.x_t, pred.x0, denoiser.schedule, i, op, y, eta)
    out = []
    for r in range(pred.x_t.shape[0]):
        p = predict_x0(denoiser, pred.x_t[r:r + 1], i, True)
        y_r = y[r:r + 1] if y.shape[0] > 1 else y
        out.append(guidance.correction(p.x_t, p.x0, denoiser.schedule, i, op.row(r), y_r, eta))
    return torch.cat(out)


def ddpm_step(denoiser: EpsDenoiser, x: torch.Tensor, i: int, generator: torch.Generator, guidance=None,
              op=None, y: Optional[torch.Tensor] = None, eta: float = 1.0, low_memory: bool = False) -> tuple:
    """One guided reverse step from x_t (model space): returns (x_{t-1}, x̂0 in [0, 1], detached).
    `low_memory`: with several rows, the guidance's UNet graphs are made one row at a time (`guidance_correction`)."""
    pred = predict_x0(denoiser, x, i, keeps_graph(guidance, x, low_memory))
    return ddpm_update(denoiser, pred, i, generator, guidance, op, y, eta), pred.x0.detach()


def branch_start(N: int, fraction: float) -> int:
    """Forward step (0-based) from which n particles run separately: the last `fraction` of the N steps.

    Before it they are one shared trajectory, so n particles cost about 1 + (n−1)·fraction single runs;
    fraction 1 gives independent particles from x_T (start 0). At least the last two steps run separately:
    the last step adds no noise, so particles branching there would stay equal.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"branch fraction must be in (0, 1], got {fraction}")
    return N - min(N, max(2, round(fraction * N)))


def branch(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each row of x (one shared trajectory per image) becomes n consecutive rows, the image's particles;
    they part with the next step's independent noise."""
    return x.repeat_interleave(n, 0)


def step_indices(n: int, progress: bool = False):
    """Step indices n−1 … 0 (most to least noisy), with a progress bar when asked."""
    steps = range(n - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm
        return tqdm(steps, desc="diffusion", leave=False)
    return steps


def final_image(denoiser: EpsDenoiser, x: torch.Tensor) -> torch.Tensor:
    """The chain's last state in [0, 1] (clamped when the denoiser clips x̂0)."""
    x = to_phys(x.detach())
    return x.clamp(0, 1) if denoiser.clip else x


def sample(denoiser: EpsDenoiser, shape: tuple, generator: torch.Generator, device: torch.device,
           guidance=None, op=None, y: Optional[torch.Tensor] = None, callback: Optional[Callable[[dict], None]] = None,
           progress: bool = False, eta: float = 1.0, branch_fraction: float = 1.0) -> torch.Tensor:
    """Run the reverse chain from x_T ~ N(0, I) drawn from `generator`; returns x in [0, 1].

    shape (n, C, H, W); the n chains share one trajectory until the last `branch_fraction` of the steps.
    `callback(info)` after each step gets {"i", "t", "x" (x_{t-1}, model space), "x0" ([0, 1]), "kernel"}.
    """
    N = len(denoiser.schedule)
    start = branch_start(N, branch_fraction)
    x = gaussian(((shape[0] if start == 0 else 1),) + tuple(shape[1:]), generator, device)
    for n, i in enumerate(step_indices(N, progress)):
        x = branch(x, shape[0]) if n == start and start > 0 else x
        x, x0 = ddpm_step(denoiser, x, i, generator, guidance, op, y, eta)
        if callback is not None:
            callback({"i": i, "t": int(denoiser.schedule.timesteps[i]), "x": x, "x0": x0,
                      "kernel": None if op is None else op.kernel})
    return final_image(denoiser, x)

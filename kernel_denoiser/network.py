"""Kernel denoiser D(k, σ): a plain FDnCNN on blur kernels (docs/algorithm.md §3).

The default `FDnCNN(in_nc=2, out_nc=1, nc=32, nb=5)` has exactly the tensors of the authors'
`kernel_denoiser_33.pth` (`reference/kernel_denoiser_manifest.json`): `model.{0,2,4,6,8}.{weight,bias}`,
conv3×3 + bias, ReLU between, no BN, no residual; input = cat(kernel, constant noise-level map σ).

Extensions (constructor args, all stored with our weights):
- `dilations`: one dilation per conv (len nb) for a larger receptive field. Tried for 64×64 kernels
  (8 convs, dilations 1,2,4,8,8,4,2,1, field 61×61): it denoised white noise as well as the plain net but
  made the M-step worse, so the shipped 64×64 model is the plain layout (models/README.md).
- `scale`: the network sees `(scale·k, scale·σ)` and its output is divided by `scale`. Kernel taps are
  tiny (~1/60 for 33×33), so this puts the inputs near unit range; it is 1 for the authors' weights.

Shipped files are `{"arch": {...}, "state_dict": {...}, "meta": {...}}` (plain dicts, ints, floats, lists,
strings and tensors: loadable with `weights_only=True`); a bare state_dict (the authors' file) is read as
the default architecture.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from torch import nn

from util.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, save_checkpoint

DEFAULT_ARCH = {"in_nc": 2, "out_nc": 1, "nc": 32, "nb": 5, "dilations": None, "scale": 1.0}


class FDnCNN(nn.Module):
    def __init__(self, in_nc: int = 2, out_nc: int = 1, nc: int = 32, nb: int = 5,
                 dilations: Optional[Sequence[int]] = None, scale: float = 1.0):
        super().__init__()
        if nb < 2:
            raise ValueError("nb must be >= 2")
        if dilations is None:
            dilations = [1] * nb
        dilations = [int(d) for d in dilations]
        if len(dilations) != nb:
            raise ValueError(f"dilations has {len(dilations)} entries, nb is {nb}")
        self.arch = {"in_nc": int(in_nc), "out_nc": int(out_nc), "nc": int(nc), "nb": int(nb),
                     "dilations": None if all(d == 1 for d in dilations) else dilations,
                     "scale": float(scale)}
        chans = [in_nc] + [nc] * (nb - 1) + [out_nc]
        layers: list[nn.Module] = []
        for i, d in enumerate(dilations):
            # padding = dilation keeps the kernel size; zero padding = "no blur mass outside the support"
            layers.append(nn.Conv2d(chans[i], chans[i + 1], 3, padding=d, dilation=d, bias=True))
            if i < nb - 1:
                layers.append(nn.ReLU(inplace=True))
        self.model = nn.Sequential(*layers)
        self.scale = float(scale)

    @property
    def receptive_field(self) -> int:
        return 1 + 2 * sum(m.dilation[0] for m in self.model if isinstance(m, nn.Conv2d))

    def forward(self, k: torch.Tensor, sigma) -> torch.Tensor:
        """k (B,1,s,s) noisy kernel, sigma float or (B,) tensor: noise std in kernel-tap units -> (B,1,s,s)."""
        if k.dim() != 4 or k.shape[1] != 1:
            raise ValueError(f"expected a (B,1,s,s) kernel, got {tuple(k.shape)}")
        if isinstance(sigma, (int, float)):  # filled on the device: no host-to-device copy (a sync on GPUs)
            sig_map = k.new_full((k.shape[0], 1, k.shape[2], k.shape[3]), float(sigma))
        else:
            sig = torch.as_tensor(sigma, dtype=k.dtype, device=k.device).reshape(-1, 1, 1, 1)
            sig_map = sig.expand(k.shape[0], 1, k.shape[2], k.shape[3])
        out = self.model(torch.cat([k, sig_map], dim=1) * self.scale)
        return out / self.scale


def save_kernel_denoiser(net: FDnCNN, path: str, meta: Optional[dict] = None) -> None:
    """Write {"arch", "state_dict", "meta"}, atomically."""
    # meta through JSON: only plain types survive, so the file stays loadable with weights_only=True
    meta = json.loads(json.dumps(meta or {}, default=str))
    save_checkpoint({"arch": json.loads(json.dumps(net.arch)), "meta": meta,
                     "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}}, path)


def _check_arch(arch: dict, path: str) -> dict:
    unknown = set(arch) - set(DEFAULT_ARCH)
    if unknown:
        raise CheckpointError(f"{path}: unknown architecture key(s) {sorted(unknown)}")
    return {**DEFAULT_ARCH, **arch}


def load_kernel_denoiser(path: str, device=None, arch: Optional[dict] = None) -> FDnCNN:
    """Load a kernel denoiser in eval mode, never falling back to random weights.

    Accepts our {"arch", "state_dict"} files and bare state_dicts (the authors' file; `arch` overrides the
    default architecture for those). Raises CheckpointError with a one-line reason.
    """
    obj = load_checkpoint(path, "kernel denoiser checkpoint")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        file_arch = obj.get("arch", {})
        if not isinstance(file_arch, dict):
            raise CheckpointError(f"{path}: 'arch' entry is not a dict")
        sd = obj["state_dict"]
        a = _check_arch({**file_arch, **(arch or {})}, path)
    else:
        sd = obj
        a = _check_arch(dict(arch or {}), path)
    net = FDnCNN(**a)
    load_state_dict_strict(net, sd, path)
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)
    return net

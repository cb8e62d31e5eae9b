"""Where a command-line tool runs: the device its --device flag names and the CPU threads --threads asks for.
Shared by the runner, the baselines and estimate_kernel, so each refuses the same values in the same words."""
from __future__ import annotations

import os
from typing import Optional

import torch

from util.errors import InputError


def resolve_device(name: str, gpu: int = 0) -> torch.device:
    """The device to run on ('auto': accelerator `gpu` if there is one, else the CPU); InputError naming the flag
    when it does not exist on this machine."""
    if name == "auto":
        if torch.accelerator.is_available():
            name = f"{torch.accelerator.current_accelerator().type}:{gpu}"
        else:
            return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"--device {name}: not a device name (use auto, cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cpu":
        return dev
    if not torch.accelerator.is_available() or torch.accelerator.current_accelerator().type != dev.type:
        have = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else "none"
        raise InputError(f"--device {name}: no {dev.type} device on this machine (accelerator: {have}); "
                         f"use --device cpu or auto")
    if dev.index is not None and dev.index >= torch.accelerator.device_count():
        raise InputError(f"--device {name}: only {torch.accelerator.device_count()} {dev.type} device(s) here")
    return dev


def max_threads() -> int:
    """The most --threads accepted: 4 per CPU (oversubscribing more only slows; 10⁵ threads crashed torch)."""
    return 4 * (os.cpu_count() or 1)


def check_threads(n: Optional[int]) -> None:
    """InputError naming --threads unless it is unset or in [1, max_threads()]."""
    if n is not None and not 1 <= n <= max_threads():
        raise InputError(f"--threads {n}: must be in [1, {max_threads()}] (4 per CPU; this machine has "
                         f"{os.cpu_count() or 1})")

"""The pixel budget's memory estimate next to the measured peak of one guided step (CPU, resident set).

    python bench/memory_estimate.py                                   # bundled prior, 128..512 px
    python bench/memory_estimate.py --model_config configs/model_config.yaml --sizes 256
    python bench/memory_estimate.py --jacobian none                   # ΠGDM without the Jacobian: forward only

Each size runs in a fresh process (peak RSS only grows): random weights, one ΠGDM step with the M-step,
at the padded size the runner would use. Prints one JSON line per size: estimate, measured peak above the
process's baseline, and their ratio (the estimate should stay above 1×).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(model_config: str, size: int, particles: int, kernel_size: int, jacobian: str = "unet") -> dict:
    import torch

    from diffusion_em.blur import BlurOperator
    from diffusion_em.budget import estimate_run_bytes
    from diffusion_em.mstep import MStepConfig, m_step
    from guided_diffusion.denoiser import EpsDenoiser
    from guided_diffusion.guidance import PiGDM
    from guided_diffusion.model_config import build_unet, load_model_config
    from guided_diffusion.sampler import ddpm_update, predict_x0
    from guided_diffusion.schedule import Schedule
    from util.geometry import dirac

    torch.set_num_threads(1)
    cfg = load_model_config(model_config)
    model = build_unet(cfg)
    den = EpsDenoiser(model, Schedule.create(10, cfg.schedule))
    mult = model.size_multiple
    side = -(-(size + 2 * kernel_size) // mult) * mult
    y = torch.rand(1, 3, side, side)
    op = BlurOperator.from_kernel(dirac(kernel_size), (side, side), 0.02)
    x = torch.randn(particles, 3, side, side)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    guidance = PiGDM(jacobian=jacobian)
    pred = predict_x0(den, x, 5, guidance.needs_grad)
    k = m_step(y, pred.x0.detach(), op.kernel, 0.02, MStepConfig())
    ddpm_update(den, pred, 5, torch.Generator(), guidance, op.with_kernel(k), y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    est = estimate_run_bytes(size, size, particles, cfg, kernel_size, backward=guidance.needs_grad)
    return {"config": model_config, "size": size, "padded": side, "particles": particles, "jacobian": jacobian,
            "estimate_gb": round(est / 2**30, 3), "measured_gb": round(peak / 2**30, 3),
            "ratio": round(est / max(peak, 1), 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_config", default=str(ROOT / "configs" / "model_config_bundled.yaml"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--particles", type=int, default=1)
    ap.add_argument("--kernel_size", type=int, default=33)
    ap.add_argument("--jacobian", choices=("unet", "none"), default="unet",
                    help="ΠGDM's VJP through the UNet (default) or none (forward passes only)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.model_config, a.sizes[0], a.particles, a.kernel_size, a.jacobian)), flush=True)
        return 0
    for s in a.sizes:
        r = subprocess.run([sys.executable, __file__, "--one", "--model_config", a.model_config, "--sizes", str(s),
                            "--particles", str(a.particles), "--kernel_size", str(a.kernel_size),
                            "--jacobian", a.jacobian],
                           capture_output=True, text=True)
        print(r.stdout.strip() or json.dumps({"size": s, "error": r.stderr.strip().splitlines()[-1:]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train an ADM UNet as an ε-predictor on random crops of a folder of images (docs/algorithm.md §1 prior).

Same 1000-step β schedule as the samplers (linear unless the config says `schedule: cosine`), t uniform,
loss ‖ε − ε_θ(x_t, t)‖² (the "simple" DDPM loss). Crops are drawn at random (with the 8 flips/rotations) from images preloaded as uint8;
AdamW with linear warmup and grad-norm clipping; EMA weights are what gets exported.

    python -m guided_diffusion.train --data DIR [DIR ...] --model_config configs/model_config_bundled.yaml \
        --out runs/bundled --crop 64 --batch 16 --lr 2e-4 --ema 0.999 --steps 20000 --max_minutes 60
    python -m guided_diffusion.train ... --resume            # continue exactly from runs/bundled/checkpoint.pt
    python -m guided_diffusion.train --out runs/bundled --export_only --export models/bundled_prior.pt
    torchrun --nproc_per_node 4 -m guided_diffusion.train ... --device cuda --bf16   # DDP, one GPU per rank

Checkpoints (`<out>/checkpoint.pt`, written atomically every --ckpt_minutes, at the end, and on SIGTERM /
SIGINT) hold model, EMA, optimiser, step, elapsed seconds and every rank's generator state, so a resumed
run draws exactly the batches an uninterrupted one would. `<out>/loss.csv` logs step, loss, lr, seconds.
With `learn_sigma: true` configs only the ε channels are trained (the samplers here use fixed variances).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from guided_diffusion.schedule import get_betas
from guided_diffusion.model_config import build_unet, load_model_config
from guided_diffusion.unet import load_weights
from util.config import as_dict
from util.images import IMAGE_EXTS, read_image
from util.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from util.csvlog import append_csv_row, read_csv_rows, truncate_csv
from util.device import check_threads, resolve_device
from util.errors import InputError

CKPT_NAME = "checkpoint.pt"
LOG_FIELDS = ("step", "loss", "lr", "seconds")


# ============================================================================================== data
def list_images(dirs) -> list[Path]:
    exts = tuple(e for e in IMAGE_EXTS if e != ".npy")
    files = []
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: training data folder not found")
        files += sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(exts)}) in {', '.join(map(str, dirs))}")
    return files


def load_images(dirs, min_size: int) -> list[torch.Tensor]:
    """All images as uint8 3×H×W tensors (RGB; alpha dropped); ones smaller than the crop are refused."""
    images = []
    for p in list_images(dirs):
        a = read_image(p, clip=True)
        if min(a.shape[:2]) < min_size:
            raise ValueError(f"{p}: {a.shape[1]}x{a.shape[0]} is smaller than the crop {min_size}")
        images.append(torch.from_numpy(np.round(a * 255).astype(np.uint8)).permute(2, 0, 1).contiguous())
    return images


def random_crops(images: list[torch.Tensor], n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """n random size×size crops in [-1, 1], each with one of the 8 flips/rot90s, all drawn from `g`."""
    idx = torch.randint(len(images), (n,), generator=g).tolist()
    out = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for j, i in enumerate(idx):
        img = images[i]
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        c = img[:, top:top + size, left:left + size]
        d = int(torch.randint(8, (1,), generator=g))
        if d & 4:
            c = c.flip(2)
        out[j] = torch.rot90(c, d & 3, dims=(1, 2))
    return out.float() / 127.5 - 1


# ============================================================================================== model
class EMA:
    """Exponential moving average of parameters; the decay ramps up as (1+n)/(10+n) so short runs are not
    dominated by the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        keys, new = [], []
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                keys.append(k)
                new.append(v.detach().float())
            else:
                self.shadow[k].copy_(v)
        shadow = [self.shadow[k] for k in keys]
        torch._foreach_mul_(shadow, d)  # two fused launches on a GPU instead of two per tensor
        torch._foreach_add_(shadow, new, alpha=1 - d)


VAL_T = (20, 56, 114, 250)  # noise std ≈ 10, 25, 50, 110 /255 in [0,1] units (linear schedule)
VAL_FIELDS = ("step", "seconds", *[f"t{t}" for t in VAL_T], "mean", "best")


def load_val_crops(folder, n: int, size: int) -> torch.Tensor:
    """Centre size×size crops in [-1, 1] of the first n images (sorted) of a held-out folder."""
    crops = []
    for p in list_images([folder])[:n]:
        a = torch.from_numpy(read_image(p, clip=True)).permute(2, 0, 1)
        h, w = a.shape[1:]
        if min(h, w) < size:
            raise ValueError(f"{p}: {w}x{h} is smaller than the validation crop {size}")
        top, left = (h - size) // 2, (w - size) // 2
        crops.append(a[:, top:top + size, left:left + size] * 2 - 1)
    return torch.stack(crops).float()


@torch.no_grad()
def validate(model: torch.nn.Module, crops: torch.Tensor, sqrt_ac, sqrt_1mac, bf16: bool) -> dict:
    """Mean x̂0 PSNR (dB, [0,1] units, clipped) at each t of VAL_T with fixed noise; 'mean' over the t's."""
    g = torch.Generator().manual_seed(1234)
    dev = sqrt_ac.device
    out = {}
    for t in VAL_T:
        x0 = crops.to(dev)
        eps = torch.randn(x0.shape, generator=g).to(dev)
        tt = torch.full((x0.shape[0],), t, device=dev, dtype=torch.long)
        x_t = sqrt_ac[t] * x0 + sqrt_1mac[t] * eps
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            e = model(x_t, tt)[:, :3].float()
        xh = ((x_t - sqrt_1mac[t] * e) / sqrt_ac[t]).clamp(-1, 1)
        mse = ((xh - x0) / 2).pow(2).flatten(1).mean(1)
        out[f"t{t}"] = float((-10 * torch.log10(mse)).mean())
    out["mean"] = float(np.mean([out[f"t{t}"] for t in VAL_T]))
    return out


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    return base_lr * min(1.0, (step + 1) / max(1, warmup))


# ============================================================================================== files
def load_training_checkpoint(path) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no training checkpoint to resume from")
    return load_checkpoint(path, "training checkpoint", ("model", "ema", "opt", "step", "rng"))


def export_ema(checkpoint_path, out_path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the EMA weights of a training checkpoint as a plain state_dict (loads with unet.load_weights)."""
    ck = load_training_checkpoint(checkpoint_path)
    sd = {k: (v.to(dtype) if v.dtype.is_floating_point else v).contiguous() for k, v in ck["ema"].items()}
    save_checkpoint(sd, out_path)
    return Path(out_path)


# ============================================================================================== training
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", help="folders of training images (jpg/png/...)")
    ap.add_argument("--model_config", default="configs/model_config_bundled.yaml")
    ap.add_argument("--out", default="runs/bundled", help="folder for checkpoint.pt, loss.csv")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch size")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--grad_clip", type=float, default=1.0)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--steps", type=int, default=10000, help="total optimiser steps (across resumes)")
    ap.add_argument("--max_minutes", type=float, default=0.0, help="stop this run (with a checkpoint) after M minutes; 0 = no limit")
    ap.add_argument("--ckpt_minutes", type=float, default=5.0)
    ap.add_argument("--log_every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    ap.add_argument("--init", default=None,
                    help="start model and EMA from these weights (e.g. models/bundled_prior.pt): continue training "
                         "in a later session when the checkpoint folder is gone (the optimiser starts afresh)")
    ap.add_argument("--export", default=None, help="write the EMA state_dict here at the end")
    ap.add_argument("--val", default=None,
                    help="folder of held-out images (e.g. BSDS500 test): every --val_minutes the EMA is scored by the "
                         "x̂0 denoising PSNR of centre crops at several t, and the best EMA is kept as <out>/best_ema.pt")
    ap.add_argument("--val_minutes", type=float, default=10.0)
    ap.add_argument("--val_images", type=int, default=16, help="how many validation images (sorted by name)")
    ap.add_argument("--val_size", type=int, default=128, help="validation centre-crop size")
    ap.add_argument("--export_only", action="store_true", help="only export <out>/checkpoint.pt's EMA to --export")
    a = ap.parse_args(argv)
    if a.export_only and not a.export:
        ap.error("--export_only needs --export PATH")
    if not a.export_only and not a.data:
        ap.error("--data is required for training")
    try:  # as the runner's: 10⁵ threads crashed torch; a device this machine lacks failed deep in the set-up
        check_threads(a.threads or None)
        resolve_device(a.device)
    except InputError as e:
        ap.error(str(e))
    return a


def _setup_distributed(device_arg: str):
    """(rank, world, device). Under torchrun (WORLD_SIZE>1): one accelerator per local rank with nccl, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, torch.device(device_arg)
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device_arg)
    if dev.type != "cpu":
        dev = torch.device(dev.type, local)
        torch.accelerator.set_device_index(local)
    dist.init_process_group(backend="gloo" if dev.type == "cpu" else "nccl")
    return rank, world, dev


def train(a) -> dict:
    """Run (or continue) training; returns {'step', 'loss', 'seconds'} of this process's last state."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    rank, world, device = _setup_distributed(a.device)
    out = Path(a.out)
    ckpt_path, log_path = out / CKPT_NAME, out / "loss.csv"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    cfg = load_model_config(a.model_config)
    torch.manual_seed(a.seed)  # identical initial weights on every rank
    model = build_unet(cfg)
    if a.init and not a.resume:
        load_weights(model, a.init)  # strict, weights_only; never a silent random start
    model = model.to(device)
    if a.crop % model.size_multiple:
        raise ValueError(f"--crop {a.crop} must be a multiple of {model.size_multiple} for this UNet")
    ema = EMA(model, a.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    g = torch.Generator().manual_seed(a.seed * 1000 + rank)  # per-rank crops, t and noise
    step, seconds = 0, 0.0

    if a.resume:
        ck = load_training_checkpoint(ckpt_path)
        if ck.get("world", 1) != world:
            raise CheckpointError(f"{ckpt_path}: saved with {ck.get('world', 1)} ranks, now {world}; exact resume needs the same")
        if ck.get("schedule", "linear") != cfg.schedule:
            raise CheckpointError(f"{ckpt_path}: trained with the '{ck.get('schedule')}' schedule, but "
                                  f"{a.model_config} says '{cfg.schedule}'")
        model.load_state_dict(ck["model"])
        ema.shadow = {k: v.float().to(device) for k, v in ck["ema"].items()}
        opt.load_state_dict(ck["opt"])
        step, seconds = int(ck["step"]), float(ck.get("seconds", 0.0))
        g.set_state(ck["rng"][rank])
        if rank == 0:
            truncate_csv(log_path, lambda r: int(r["step"]) <= step)  # rows past the checkpoint are redone

    images = load_images(a.data, a.crop)
    betas = get_betas(cfg.schedule, 1000)  # the samplers read the same key, so training and sampling agree
    ac = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
    sqrt_ac, sqrt_1mac = ac.sqrt().to(device), (1 - ac).sqrt().to(device)

    val_crops = load_val_crops(a.val, a.val_images, a.val_size) if a.val and rank == 0 else None
    val_model = build_unet(cfg).to(device).eval() if val_crops is not None else None
    best_path, val_log = out / "best_ema.pt", out / "val.csv"
    best = {"score": -float("inf")}
    if val_crops is not None and a.resume and val_log.is_file():
        rows = [r for r in read_csv_rows(val_log) if int(r["step"]) <= step]
        if rows and best_path.is_file():
            best["score"] = max(float(r["mean"]) for r in rows)
    t_last_val = time.time()

    def run_val():
        val_model.load_state_dict({k: v.to(device) for k, v in ema.shadow.items()})
        r = validate(val_model, val_crops, sqrt_ac, sqrt_1mac, a.bf16)
        is_best = r["mean"] > best["score"]
        if is_best:
            best["score"] = r["mean"]
            sd = {k: v.float().cpu().contiguous() for k, v in ema.shadow.items()}  # loads on any machine
            save_checkpoint(sd, best_path)
        append_csv_row(val_log, VAL_FIELDS, {"step": step, "seconds": f"{seconds:.1f}", "mean": f"{r['mean']:.3f}",
                                             "best": int(is_best), **{f"t{t}": f"{r[f't{t}']:.3f}" for t in VAL_T}})
        print(f"[train] val step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in r.items()) + (" (best)" if is_best else ""), flush=True)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device.index])
    model.train()

    stop = {"signal": False}

    def on_signal(signum, frame):  # finish the current step, checkpoint, exit cleanly
        stop["signal"] = True
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def save():
        states = [g.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, g.get_state())
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "ema": ema.shadow, "opt": opt.state_dict(),
                               "step": step, "seconds": seconds, "rng": states, "world": world,
                               "config": as_dict(cfg), "schedule": cfg.schedule, "args": {k: v for k, v in vars(a).items() if not isinstance(v, list)}},
                              ckpt_path)

    if rank == 0:
        print(f"[train] {len(images)} images, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
              f"{world} rank(s) on {device}, step {step}/{a.steps}", flush=True)
    if val_crops is not None and not val_log.is_file():
        run_val()  # the starting weights' score, so an --init that is never beaten stays the best
    bar = tqdm(total=a.steps, initial=step, desc="prior", disable=rank != 0, mininterval=5 if sys.stderr.isatty() else 60)
    t_run = time.time()
    t_last_ckpt = time.time()
    accelerated = device.type != "cpu"  # batches are drawn on the CPU (exact resume) and copied over
    torch.backends.cudnn.benchmark = accelerated  # fixed shapes: cuDNN picks its fastest convolution once

    def to_dev(v):  # a pinned, non-blocking copy does not make the CPU wait for the accelerator
        return v.pin_memory().to(device, non_blocking=True) if accelerated else v.to(device)
    # the running loss stays on the device (float64, as a Python sum would be): no sync per step
    loss_acc, n_acc, last_loss = torch.zeros((), dtype=torch.float64, device=device), 0, float("nan")
    while step < a.steps:
        t0 = time.time()
        x0 = to_dev(random_crops(images, a.batch, a.crop, g))
        t = to_dev(torch.randint(1000, (a.batch,), generator=g))
        eps = to_dev(torch.randn(x0.shape, generator=g))
        x_t = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1mac[t].view(-1, 1, 1, 1) * eps
        lr = lr_at(step, a.lr, a.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            pred = net(x_t, t)
        loss = F.mse_loss(pred[:, :3].float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        ema.update(model, step)
        step += 1
        seconds += time.time() - t0
        loss_acc += loss.detach().double()
        n_acc += 1
        bar.update(1)

        # Rank 0 decides when to log/save/stop; every rank must join the collectives below.
        flags = torch.tensor([stop["signal"],
                              a.max_minutes > 0 and time.time() - t_run > 60 * a.max_minutes,
                              time.time() - t_last_ckpt > 60 * a.ckpt_minutes], dtype=torch.float32)
        if world > 1:
            flags = flags.to(device)
            dist.broadcast(flags, 0)
            flags = flags.cpu()
        do_stop = bool(flags[0] or flags[1]) or step >= a.steps
        if step % a.log_every == 0 or do_stop:
            mean = (loss_acc / max(n_acc, 1)).float().reshape(1)
            if world > 1:
                dist.all_reduce(mean)
                mean /= world
            last_loss = float(mean)
            if rank == 0:
                append_csv_row(log_path, LOG_FIELDS, {"step": step, "loss": f"{last_loss:.6f}", "lr": f"{lr:.3g}", "seconds": f"{seconds:.1f}"})
                bar.set_postfix(loss=f"{last_loss:.4f}")
            loss_acc, n_acc = torch.zeros_like(loss_acc), 0
        if do_stop or flags[2]:
            save()
            t_last_ckpt = time.time()
        if val_crops is not None and (do_stop or time.time() - t_last_val > 60 * a.val_minutes):
            run_val()
            t_last_val = time.time()
        if do_stop:
            break
    bar.close()
    for s, h in old_handlers.items():
        signal.signal(s, h)
    if a.export and rank == 0:
        export_ema(ckpt_path, a.export)
        print(f"[train] exported EMA weights of step {step} to {a.export}", flush=True)
    if rank == 0:
        print(f"[train] stopped at step {step}, loss {last_loss:.4f}, {seconds / 60:.1f} min of training", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "loss": last_loss, "seconds": seconds}


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.export_only:
        p = export_ema(Path(a.out) / CKPT_NAME, a.export)
        print(f"[train] exported EMA weights to {p}")
        return 0
    train(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""UNet speed levers, side by side: forward and forward+input-gradient, one JSON line per variant.

    python bench/unet_speed.py --model ffhq --threads 1 --batch 1 --repeats 5 \
        --variants original_style ours_nchw ours_conv1x1_off ours ours_bf16 ours_compiled ours_compiled_bf16

All variants are built in one process and timed interleaved, repeat by repeat (a busy machine slows them
alike); we print min and median wall seconds per call, the median process CPU seconds (`cpu_s`: on a shared
machine with 1 torch thread this is the robust figure, wall time includes waiting for a core), and the
ratios of each to `original_style`. Random weights (speed does not depend on their values).

Variants (`--variants`):
- `original_style`: a faithful in-process copy of the original guided-diffusion/DPS costs: NCHW, einsum attention
  with float32 softmax wrapped in gradient checkpointing (the original always checkpoints attention), parameters
  that require grad, 1×1 convolutions through nn.Conv2d. Same weights and layer graph as ours.
- `ours_nchw`: guided_diffusion/unet.py as the samplers use it (frozen, SDPA), NCHW.
- `ours_conv1x1_off`: channels-last, but 1×1 skip convolutions through nn.Conv2d (the lever measured by `ours`).
- `ours`: the default path: frozen, channels-last, SDPA, 1×1 convolutions as one GEMM.
- `ours_bf16`: `ours` under CPU/GPU bf16 autocast.
- `ours_chunk1`, `ours_nchw_chunk1`: a batch evaluated one image per UNet call (EpsDenoiser(max_batch=1), the
  CPU default since it measured faster than one batched call), channels-last or NCHW.
- `ours_nchw_bf16`, `ours_nchw_chunk1_bf16`: the NCHW variants under bf16 autocast (what `precision: bf16` runs
  for the small bundled net on a CPU); `ours_nchw_compiled(_bf16)`: the same compiled (what `compile: true` runs
  for that net on a CPU at batch 1; the CPU runner calls the UNet one image at a time).
- `ours_chunk1_bf16`: channels-last, one image per call, bf16 autocast: what `precision: bf16` runs on a CPU since
  2026-12-07 evening (GroupNorm through guided_diffusion/nhwc_norm.py, channels-last kept through concatenation,
  upsampling and attention).
- `ours_nchw_chunk1_bf16_castops`: `ours_nchw_chunk1_bf16` with the bf16 CPU path as it was before
  2026-12-07: GroupNorm on a float32 copy, 1×1 convolutions through conv2d, avg_pool2d.
- `ours_compiled`, `ours_compiled_bf16`: `torch.compile` (inductor) of `ours`; the first call's extra time is
  reported as `compile_s`, and `break_even_calls` = compile_s / (ours − compiled) per-call saving
  (a 100-step Fast EM image makes 100 forward+input-gradient calls).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guided_diffusion import unet as U  # noqa: E402
from guided_diffusion.denoiser import in_chunks  # noqa: E402
from guided_diffusion.model_config import load_model_config  # noqa: E402
from util.cpu_memory import keep_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"ffhq": "configs/model_config.yaml", "bundled": "configs/model_config_bundled.yaml"}
# name: (original-style costs, channels_last, autocast dtype, 1x1 convs as GEMM, torch.compile, rows per call)
VARIANTS = {
    "original_style": (True, False, None, False, False, None),
    "ours_nchw": (False, False, None, True, False, None),
    "ours_conv1x1_off": (False, True, None, False, False, None),
    "ours": (False, True, None, True, False, None),
    "ours_bf16": (False, True, torch.bfloat16, True, False, None),
    "ours_compiled": (False, True, None, True, True, None),
    "ours_compiled_bf16": (False, True, torch.bfloat16, True, True, None),
    "ours_chunk1": (False, True, None, True, False, 1),
    "ours_chunk1_bf16": (False, True, torch.bfloat16, True, False, 1),
    "ours_nchw_chunk1": (False, False, None, True, False, 1),
    "ours_nchw_bf16": (False, False, torch.bfloat16, True, False, None),
    "ours_nchw_chunk1_bf16": (False, False, torch.bfloat16, True, False, 1),
    "ours_nchw_compiled": (False, False, None, True, True, None),
    "ours_nchw_compiled_bf16": (False, False, torch.bfloat16, True, True, None),
    "ours_nchw_chunk1_bf16_castops": (False, False, torch.bfloat16, False, False, 1),
}
# bf16 on a CPU as it ran before the CPU bf16 ops of guided_diffusion/unet.py: GroupNorm on a float32 copy,
# 1×1 convolutions through conv2d, avg_pool2d (the lever the `ours_nchw_chunk1_bf16` variant measures)
CAST_OPS = {"ours_nchw_chunk1_bf16_castops"}


def _attn_original(self, x):
    """The original attention: einsum + float32 softmax, gradient-checkpointed (recomputed in backward)."""
    def inner(x):
        B, C, H, W = x.shape
        T, nh = H * W, self.num_heads
        d = C // nh
        xs = x.reshape(B, C, T)
        qkv = self.qkv(self.norm(xs)).reshape(B * nh, 3 * d, T)
        q, k, v = qkv.split(d, dim=1)
        scale = 1 / d ** 0.25
        w = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        w = torch.softmax(w.float(), dim=-1).type(w.dtype)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, T)
        return (xs + self.proj_out(a)).reshape(B, C, H, W)
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False)
    return inner(x)


def build(model: str, original: bool, channels_last: bool, gemm1x1: bool, device, cast_ops: bool = False) -> nn.Module:
    cfg = load_model_config(ROOT / MODELS.get(model, model)).unet_kwargs()
    torch.manual_seed(0)
    m = U.create_model(**cfg).to(device).eval()
    for p in m.parameters():  # random non-zero weights: speed does not depend on values
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    m.requires_grad_(original)
    for mod in m.modules():
        if original and isinstance(mod, U.AttentionBlock):
            mod.forward = _attn_original.__get__(mod)
        if not gemm1x1 and isinstance(mod, U.Conv1x1):
            mod.forward = nn.Conv2d.forward.__get__(mod)
        if cast_ops and isinstance(mod, U.GroupNorm32):
            mod.forward = mod.on_float32_copy
        if cast_ops and isinstance(mod, U.Downsample) and not isinstance(mod.op, nn.Conv2d):
            mod.op = nn.AvgPool2d(2)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_call(m, x0, t, channels_last: bool, dtype, mode: str, chunk=None):
    x = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
    dev = x0.device.type

    def net(x_in):  # as EpsDenoiser(max_batch=chunk) evaluates the batch
        return in_chunks(m, x_in, t, chunk)

    def ctx():
        return torch.autocast(dev, dtype=dtype) if dtype else torch.autocast(dev, enabled=False)

    def fwd():
        with torch.no_grad(), ctx():
            net(x)

    def fwd_grad():
        xx = x.detach().requires_grad_(True)
        with ctx():
            out = net(xx)
        torch.autograd.grad(out.float().sum(), xx)
    return fwd if mode == "forward" else fwd_grad


def timed(fn, device) -> tuple:
    """(wall seconds, process CPU seconds, minor page faults) of one call."""
    t0, c0, f0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    _sync(device)
    return (time.perf_counter() - t0, time.process_time() - c0,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)


CATEGORIES = (("convolution", ("conv",)), ("gemm", ("addmm", "bmm", "::mm", "matmul", "linear", "baddbmm")),
              ("group_norm", ("group_norm",)), ("attention", ("softmax", "scaled_dot_product", "attention")))


def op_category(name: str) -> str:
    """Which kind of work a profiled aten op is (by its name); everything else is 'elementwise/other'."""
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "elementwise/other")


def profile_call(fn) -> dict:
    """Self CPU seconds of one call by op category (torch.profiler; leaf ops only, so nothing counts twice)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    out = {}
    for ev in prof.key_averages():
        c = op_category(ev.key)
        out[c] = out.get(c, 0.0) + ev.self_cpu_time_total / 1e6
    return dict(sorted(out.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ffhq", help="ffhq | bundled | a model config path")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    ap.add_argument("--modes", nargs="+", default=["forward+input_grad"], choices=["forward", "forward+input_grad"])
    ap.add_argument("--variants", nargs="+", default=["original_style", "ours_nchw", "ours"], choices=list(VARIANTS))
    ap.add_argument("--profile", action="store_true",
                    help="also print, per variant, one call's self CPU seconds by op category (convolution, GEMM, "
                         "GroupNorm, attention, the rest): how much of a call no fusion can remove")
    ap.add_argument("--malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory for reuse, as the scripts set it on a CPU "
                         "(util/cpu_memory.py); default: glibc's own thresholds (the page-fault lever)")
    ap.add_argument("--no_baseline", action="store_true",
                    help="time only --variants as given (ratios only if original_style is among them): one model "
                         "in the process, as in a run, which is what the page-fault figures need (another model's "
                         "freed blocks change glibc's thresholds)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory() if args.malloc == "keep" else False
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    names = list(args.variants) if args.no_baseline else (  # the baseline first
        ["original_style"] + [v for v in args.variants if v != "original_style"])
    for dev_name in devices:
        device = torch.device(dev_name)
        models = {}
        for n in names:
            orig, cl, _, g1, comp, _ = VARIANTS[n]
            m = build(args.model, orig, cl, g1, device, cast_ops=n in CAST_OPS)
            models[n] = torch.compile(m) if comp else m
        for B in args.batch:
            x0 = torch.randn(B, 3, args.size, args.size, device=device)
            t = torch.full((B,), 500, device=device)
            for mode in args.modes:
                fns = {n: make_call(models[n], x0, t, VARIANTS[n][1], VARIANTS[n][2], mode, VARIANTS[n][5])
                       for n in names}
                first = {n: timed(fns[n], device) for n in names}  # warm-up; includes compilation
                times, cpus, faults = {n: [] for n in names}, {n: [] for n in names}, {n: [] for n in names}
                for _ in range(args.repeats):
                    for n in names:
                        w, c, f = timed(fns[n], device)
                        times[n].append(w)
                        cpus[n].append(c)
                        faults[n].append(f)
                base = "original_style" if "original_style" in names else None
                base_min = min(times[base]) if base else None
                base_med = statistics.median(times[base]) if base else None
                base_cpu = statistics.median(cpus[base]) if base else None
                med = {n: statistics.median(cpus[n] if device.type == "cpu" else times[n]) for n in names}
                for n in names:
                    ts = times[n]
                    rec = {"variant": n, "model": args.model, "device": dev_name,
                           "dtype": "bf16" if VARIANTS[n][2] else "fp32", "channels_last": VARIANTS[n][1],
                           "batch": B, "rows_per_call": VARIANTS[n][5] or B, "size": args.size, "mode": mode, "repeats": len(ts),
                           "min_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4),
                           "min_vs_original": round(min(ts) / base_min, 3) if base else None,
                           "median_vs_original": round(statistics.median(ts) / base_med, 3) if base else None,
                           "cpu_s": round(statistics.median(cpus[n]), 4),
                           "cpu_vs_original": round(statistics.median(cpus[n]) / base_cpu, 3) if base else None,
                           "first_call_s": round(first[n][0], 2), "first_call_cpu_s": round(first[n][1], 2),
                           "minor_page_faults": int(statistics.median(faults[n])), "keep_freed_memory": kept,
                           "threads": torch.get_num_threads(), "load1": round(os.getloadavg()[0], 2)}
                    if VARIANTS[n][4]:  # compile cost and the calls it takes to pay off (CPU seconds on the CPU)
                        k = 1 if device.type == "cpu" else 0
                        comp_s = first[n][k] - med[n]
                        rec["compile_s"] = round(first[n][0] - statistics.median(ts), 1)
                        rec["compile_cpu_s"] = round(first[n][1] - statistics.median(cpus[n]), 1)
                        eager = ("ours_nchw" if not VARIANTS[n][1] else "ours") + ("_bf16" if VARIANTS[n][2] else "")
                        saving = med[eager] - med[n] if eager in med else None
                        rec["break_even_calls"] = round(comp_s / saving) if saving and saving > 0 else None
                    print(json.dumps(rec), flush=True)
                if args.profile and device.type == "cpu":
                    for n in names:
                        prof = profile_call(fns[n])
                        total = sum(prof.values())
                        print(json.dumps({"variant": n, "model": args.model, "batch": B, "mode": mode,
                                          "profile_self_cpu_s": {c: round(v, 4) for c, v in prof.items()},
                                          "total_s": round(total, 4),
                                          "share": {c: round(v / total, 3) for c, v in prof.items()}}), flush=True)


if __name__ == "__main__":
    main()

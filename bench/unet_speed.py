"""UNet speed: forward and forward+input-gradient of the FFHQ-256 config (random weights), one JSON line per setting.

    python bench/unet_speed.py                       # CPU (and CUDA when present), batch 1 and 4
    python bench/unet_speed.py --batch 1 --repeats 3 --devices cpu

Each setting is timed `--repeats` times after one warm-up, all settings interleaved repeat by repeat (a busy
machine slows them alike); we print min and median seconds per call and the ratio to `original_style`.
`impl=ours` is guided_diffusion/unet.py as used by the samplers (parameters frozen, SDPA attention).
`impl=original_style` emulates the original's costs in the same process for a side-by-side ratio:
explicit einsum attention wrapped in gradient checkpointing and parameters that require grad.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.utils.checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from guided_diffusion import unet as U  # noqa: E402
from guided_diffusion.model_config import load_model_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


def build(impl: str, device, channels_last: bool):
    cfg = load_model_config(ROOT / "configs" / "model_config.yaml").unet_kwargs()
    torch.manual_seed(0)
    m = U.create_model(**cfg).to(device).eval()
    for p in m.parameters():  # random non-zero weights: speed does not depend on values
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    m.requires_grad_(impl == "original_style")
    if impl == "original_style":
        for mod in m.modules():
            if isinstance(mod, U.AttentionBlock):
                mod.forward = _attn_original.__get__(mod)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def time_call(fn, repeats: int, device, warm: bool = True) -> list:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    if warm:
        fn()
        sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    ap.add_argument("--modes", nargs="+", default=["forward", "forward+input_grad"])
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast on the CPU (AMX/AVX-512-BF16 CPUs)")
    args = ap.parse_args()
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for dev_name in devices:
        device = torch.device(dev_name)
        # variants are timed interleaved, repeat by repeat, so a busy machine slows them alike
        variants = [("original_style", False, None), ("ours", False, None), ("ours", True, None)]
        if device.type == "cuda" or args.bf16:
            variants += [("ours", True, torch.bfloat16)]
        models = {(impl, cl): build(impl, device, cl) for impl, cl in {(v[0], v[1]) for v in variants}}
        for B in args.batch:
            x0 = torch.randn(B, 3, args.size, args.size, device=device)
            t = torch.full((B,), 500, device=device)
            for mode in args.modes:
                def make(impl, cl, dt):
                    m = models[(impl, cl)]
                    x = x0.contiguous(memory_format=torch.channels_last) if cl else x0

                    def ctx():
                        return torch.autocast(device.type, dtype=dt) if dt else torch.autocast(device.type, enabled=False)

                    def fwd():
                        with torch.no_grad(), ctx():
                            m(x, t)

                    def fwd_grad():
                        xx = x.detach().requires_grad_(True)
                        with ctx():
                            out = m(xx, t)
                        torch.autograd.grad(out.float().sum(), xx)
                    return fwd if mode == "forward" else fwd_grad
                fns = [make(*v) for v in variants]
                times = [[] for _ in variants]
                for fn in fns:  # warm-up
                    time_call(fn, 0, device)
                for _ in range(args.repeats):
                    for j, fn in enumerate(fns):
                        times[j] += time_call(fn, 1, device, warm=False)
                base = statistics.median(times[0])
                for (impl, cl, dt), ts in zip(variants, times):
                    print(json.dumps({"impl": impl, "device": dev_name, "dtype": "bf16" if dt else "fp32",
                                      "channels_last": cl, "batch": B, "size": args.size, "mode": mode,
                                      "min_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4),
                                      "vs_original_style": round(statistics.median(ts) / base, 3),
                                      "threads": torch.get_num_threads(), "load1": round(os.getloadavg()[0], 2)}),
                          flush=True)


if __name__ == "__main__":
    main()

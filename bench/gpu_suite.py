"""GPU figures in one run (≤ 8 min on one H100): Fast EM ΠGDM beside the non-blind sampler, one JSON line each.

    bash bench/gpu_suite.sh [OUT_DIR]                  # = python bench/gpu_suite.py --out OUT_DIR (default $OUT)
    python bench/gpu_suite.py --reduced --device cpu --out /tmp/gs   # the CPU smoke form (tiny UNet, 3 steps)

Sections, in priority order (a section that would overrun `--budget_s` is recorded as skipped):
1. `speed`: FFHQ-256 config with random weights, 256², `--steps` ΠGDM steps, Fast EM (blind, M-step every step)
   and the non-blind sampler (known kernel, same steps) in the same process: s/img at batch 1 and 8,
   fp32 and bf16 autocast, eager and `torch.compile` (compile time reported separately), peak memory.
2. `large`: a 1024×1024 and a 2048×1536 image, batch 1, bf16 and fp32 eager, `--large_steps` steps (s/step and
   the 100-step projection), peak memory; an out-of-memory is recorded with the memory asked for.
3. `quality`: bf16 against fp32 PSNR on a test-set folder (`--quality_dir`, default the eval set when present)
   with the bundled (trained) prior: the "bf16 within 0.1 dB" check.
Random weights are fine for speed: the cost does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffusion_em.em import fast_diffusion_em, fast_diffusion_em_batch  # noqa: E402
from diffusion_em.mstep import MStepConfig  # noqa: E402
from diffusion_em.run import out_of_memory  # noqa: E402
from guided_diffusion.denoiser import EpsDenoiser  # noqa: E402
from guided_diffusion.guidance import PiGDM  # noqa: E402
from guided_diffusion.schedule import Schedule  # noqa: E402
from guided_diffusion.model_config import load_model_config  # noqa: E402
from guided_diffusion.unet import create_model, load_weights  # noqa: E402
from kernel_denoiser.network import FDnCNN, load_kernel_denoiser  # noqa: E402

# the reduced (CPU smoke) form: a tiny UNet, tiny images, few steps
TINY = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2", learn_sigma=True,
            attention_resolutions="2", num_heads=2, use_scale_shift_norm=True, resblock_updown=True)
NO_GUARD = None  # random weights give garbage images: timing only, no divergence checks


class PeakMemory:
    """Peak memory of a block: CUDA allocator peak on GPUs; sampled resident set size (every 5 ms) on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self._stop = device, None, threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20

    def _watch(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss_mb())
            time.sleep(0.005)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self._base = self._peak = self._rss_mb()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = round(torch.cuda.max_memory_allocated(self.device) / 2 ** 20, 1)
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak_mb = round(self._peak - self._base, 1)  # above the process's resident set before the block
        return False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_unet(cfg: dict, device, weights=None):
    torch.manual_seed(0)
    m = create_model(**cfg)
    if weights:
        load_weights(m, weights)
    else:
        for p in m.parameters():  # random non-zero weights (zero-initialised output layers would give ε ≡ 0)
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
    return m.to(device)


def problem(B: int, H: int, W: int, s: int, device, seed: int = 0):
    """B synthetic observations (their content does not matter for speed) and a Gaussian-ish kernel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(B, 3, H, W, generator=g).to(device)
    r = torch.arange(s, dtype=torch.float32) - s // 2
    k = torch.exp(-(r[:, None] ** 2 + r[None] ** 2) / 8)
    return y, (k / k.sum()).to(device)


def run_em(denoiser, y, k, sigma, mcfg, kd, blind: bool, device, seed=0):
    """One Fast EM (blind) or non-blind run over B images in one UNet batch, each with its own M-step."""
    B = y.shape[0]
    gens = [torch.Generator(device=device).manual_seed(seed + b) for b in range(B)]
    res = fast_diffusion_em_batch(denoiser, list(y.split(1)), [sigma] * B, PiGDM(), mcfg, k.shape[-1], gens,
                                  kernel_denoiser=kd, fixed_kernels=None if blind else [k] * B, guard=NO_GUARD)
    return [r.x for r in res]


class Suite:
    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.device = torch.device(args.device if args.device != "auto" else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / ("gpu_suite_reduced.jsonl" if args.reduced else "gpu_suite.jsonl")
        self.path.write_text("")
        self.cost = {}  # measured seconds of the last run per key, to predict whether the next fits

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.t0)

    def emit(self, rec: dict):
        rec = {**rec, "device": str(self.device), "elapsed_s": round(time.perf_counter() - self.t0, 1)}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def failed(self, section: str, name: str, e: Exception, **fields) -> None:
        """One case's failure as a record (out of memory named as such); the suite goes on."""
        oom = out_of_memory(e)
        self.emit({"section": section, "case": name, **fields,
                   "error": "out of memory" if oom else type(e).__name__,
                   "message": (str(e).splitlines() or [""])[0][:300]})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def fits(self, section: str, name: str, need_s: float) -> bool:
        if need_s < self.left():
            return True
        self.emit({"section": section, "case": name, "skipped": f"time budget: needs ~{need_s:.0f} s, "
                                                                 f"{self.left():.0f} s left"})
        return False

    def env(self):
        d = self.device
        rec = {"section": "env", "torch": torch.__version__, "threads": torch.get_num_threads(),
               "reduced": self.args.reduced, "steps": self.args.steps}
        if d.type == "cuda":
            p = torch.cuda.get_device_properties(d)
            rec.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                       bf16=torch.cuda.is_bf16_supported(),  # "fp32" convolutions run in TF32 when cudnn allows it
                       cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                       matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
        else:
            rec.update(load1=round(os.getloadavg()[0], 2))
        self.emit(rec)

    def denoiser(self, model, steps: int, precision: str, compiled: bool) -> EpsDenoiser:
        dt = {"fp32": None, "bf16": torch.bfloat16}[precision]
        return EpsDenoiser(model, Schedule.create(steps, "linear"), autocast_dtype=dt,  # frozen, channels-last
                           compile_backend=self.args.compile_backend if compiled else None)

    def timed_run(self, denoiser, y, k, sigma, mcfg, kd, blind) -> tuple:
        with PeakMemory(self.device) as pm:
            _sync(self.device)
            t0 = time.perf_counter()
            run_em(denoiser, y, k, sigma, mcfg, kd, blind, self.device)
            _sync(self.device)
            dt = time.perf_counter() - t0
        return dt, pm.peak_mb

    def speed(self, model, mcfg, kd):
        a, S = self.args, self.args.size
        for B, precision, compiled in a.grid:
            name = f"b{B}_{precision}_{'compiled' if compiled else 'eager'}"
            est = sum(self.cost.get((B, precision, False, m), 0) for m in (True, False)) or 1.0
            if compiled:
                est += a.compile_estimate_s
            if not self.fits("speed", name, est):
                continue
            y, k = problem(B, S, S, a.kernel_size, self.device)
            compile_s = None
            if compiled:  # compilation happens on the first calls (forward and backward): time it on a short run
                d_warm = self.denoiser(model, 2, precision, True)
                t0 = time.perf_counter()
                try:
                    run_em(d_warm, y, k, a.sigma, mcfg, kd, True, self.device)
                except Exception as e:  # a compiler failure costs this case, not the suite
                    self.failed("speed", name, e, method="compile")
                    continue
                _sync(self.device)
                compile_s = time.perf_counter() - t0
                net = d_warm.net
            for blind in (True, False):
                d = self.denoiser(model, a.steps, precision, compiled)
                try:  # the warm-up needs the timed run's memory: it fails first when that does not fit
                    if compiled:
                        d.net = net  # reuse the compiled graph
                    else:
                        run_em(self.denoiser(model, 1, precision, False), y, k, a.sigma, mcfg, kd, blind, self.device)
                    dt, peak = self.timed_run(d, y, k, a.sigma, mcfg, kd, blind)
                except Exception as e:  # unattended: record it and go on with the next case
                    self.failed("speed", name, e, method="fast_em" if blind else "nonblind")
                    continue
                self.cost[(B, precision, compiled, blind)] = dt
                self.emit({"section": "speed", "case": name, "method": "fast_em" if blind else "nonblind",
                           "batch": B, "batch_kind": "B images, own kernels and M-steps (fast_diffusion_em_batch)",
                           "precision": precision, "compiled": compiled, "size": [S, S], "steps": a.steps,
                           "s_per_img": round(dt / B, 4), "s_per_run": round(dt, 3), "peak_mem_mb": peak,
                           "compile_s": None if compile_s is None else round(compile_s, 1)})

    def large(self, model, mcfg, kd):
        a = self.args
        for (H, W) in a.large_sizes:
            for precision in ("bf16", "fp32"):
                name = f"{H}x{W}_{precision}"
                ref = self.cost.get((1, precision, False, True))
                est = (ref / a.steps * a.large_steps * (H * W) / a.size ** 2 * 1.5) if ref else 60.0
                if not self.fits("large", name, est):
                    continue
                y, k = problem(1, H, W, a.kernel_size, self.device)
                d = self.denoiser(model, a.large_steps, precision, False)
                try:
                    dt, peak = self.timed_run(d, y, k, a.sigma, mcfg, kd, True)
                except Exception as e:
                    self.failed("large", name, e, size=[H, W], precision=precision)
                    continue
                self.emit({"section": "large", "case": name, "method": "fast_em", "size": [H, W],
                           "precision": precision, "steps": a.large_steps, "s_per_step": round(dt / a.large_steps, 4),
                           "s_per_100_steps": round(100 * dt / a.large_steps, 2), "peak_mem_mb": peak})

    def quality(self, mcfg, kd):
        """bf16 vs fp32 PSNR with a trained prior on a test-set folder (the bundled prior unless given)."""
        from util.images import image_to_tensor, tensor_to_image
        from util.inputs import list_inputs, load_sample
        from util.metrics import psnr
        a = self.args
        qdir = a.quality_dir
        if qdir is None or not Path(qdir).is_dir():
            self.emit({"section": "quality", "skipped": f"no test-set folder ({qdir})"})
            return
        if a.reduced:  # the plumbing only: a random tiny UNet
            cfg, weights = TINY, None
        else:
            raw = load_model_config(a.quality_model_config)
            cfg, weights = raw.unet_kwargs(), a.quality_weights or str(ROOT / raw.model_path)
        model = build_unet(cfg, self.device, weights)
        samples = [s for s in list_inputs(qdir)][: a.quality_images]
        for j, sample in enumerate(samples):
            if not self.fits("quality", sample.name, 2 * self.cost.get("quality", 5.0)):
                break
            s = load_sample(sample)
            y = image_to_tensor(s.y, self.device)
            m = y.shape[-1] % model.size_multiple or y.shape[-2] % model.size_multiple
            if m or s.x_true is None:
                self.emit({"section": "quality", "case": sample.name, "skipped": "needs ground truth and a size "
                                                                                 f"divisible by {model.size_multiple}"})
                continue
            sigma = s.sigma if s.sigma is not None else a.sigma
            rec = {"section": "quality", "case": sample.name, "sigma": sigma, "steps": a.quality_steps}
            t0 = time.perf_counter()
            for precision in ("fp32", "bf16"):
                d = self.denoiser(model, a.quality_steps, precision, False)
                gen = torch.Generator(device=self.device).manual_seed(j)
                res = fast_diffusion_em(d, y, sigma, PiGDM(), mcfg, a.kernel_size, gen, kernel_denoiser=kd,
                                        guard=NO_GUARD)
                rec[f"psnr_{precision}"] = round(psnr(tensor_to_image(res.x_mean[0].clamp(0, 1)), s.x_true), 3)
            rec["bf16_minus_fp32_db"] = round(rec["psnr_bf16"] - rec["psnr_fp32"], 3)
            self.cost["quality"] = time.perf_counter() - t0
            self.emit(rec)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "measured")),
                    help="folder for gpu_suite.jsonl (default $OUT, else bench/measured)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reduced", action="store_true", help="CPU smoke form: tiny UNet, 32² images, 3 steps")
    ap.add_argument("--budget_s", type=float, default=450.0, help="stop starting new cases after this (s)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--compile_backend", default="inductor")
    ap.add_argument("--quality_dir", default=None, help="test-set folder for the bf16 check "
                                                        "(default: /work/evalsets/synth24 when present)")
    ap.add_argument("--quality_images", type=int, default=8)
    ap.add_argument("--quality_steps", type=int, default=100)
    ap.add_argument("--quality_weights", default=None)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    a.sigma, a.size, a.compile_estimate_s = 0.05, 256, 120.0
    a.model_config = str(ROOT / "configs" / "model_config.yaml")
    a.quality_model_config = str(ROOT / "configs" / "model_config_bundled.yaml")
    a.kernel_size = 33
    a.large_sizes, a.large_steps = [(1024, 1024), (2048, 1536)], 10
    a.grid = [(1, "fp32", False), (1, "bf16", False), (8, "bf16", False), (8, "fp32", False),
              (1, "bf16", True), (8, "bf16", True), (1, "fp32", True), (8, "fp32", True)]
    if a.quality_dir is None and Path("/work/evalsets/synth24").is_dir():
        a.quality_dir = "/work/evalsets/synth24"
    if a.reduced:
        a.steps, a.size, a.kernel_size, a.compile_estimate_s = 3, 32, 9, 5.0
        a.large_sizes, a.large_steps = [(64, 64), (64, 48)], 2
        a.grid = [(1, "fp32", False), (2, "bf16", False), (1, "fp32", True)]
        a.quality_steps, a.quality_images = 3, 2
        if a.compile_backend == "inductor":
            a.compile_backend = "eager"  # exercises torch.compile's tracing without minutes of C++ codegen
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    suite = Suite(a)
    suite.env()
    cfg = TINY if a.reduced else load_model_config(a.model_config).unet_kwargs()
    model = build_unet(cfg, suite.device)
    mcfg = MStepConfig()
    kd = FDnCNN().to(suite.device).eval() if a.reduced else load_kernel_denoiser(
        str(ROOT / "models" / "kernel_denoiser_33.pth"), device=suite.device)
    suite.speed(model, mcfg, kd)
    suite.large(model, mcfg, kd)
    suite.quality(mcfg, kd)
    suite.emit({"section": "done", "total_s": round(time.perf_counter() - suite.t0, 1)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command-line helpers for the end-to-end tests (with the `tiny_run` fixture's files)."""
import csv


def cli_args(tmp, cfg, data, out, *extra) -> list:
    """Flags for test_FastDiffEM/test_DiffEM with the tiny model, kernel config, a diffusion config and folders."""
    return ["--img_model_config", str(tmp / "model.yaml"), "--diffusion_config", str(cfg),
            "--kernel_config", str(tmp / "kernel.yaml"), "--input_dir", str(data), "--save_dir", str(out),
            "--device", "cpu", "--seed", "1", *extra]


def metrics_rows(out) -> list:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))

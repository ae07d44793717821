"""Time trainer epochs with the pretrained encoders, with and without the frozen-backbone feature cache.

Three runs of ``configs/pretrained.toml`` (EfficientNet-Lite0 and all-MiniLM-L6-v2, both frozen) on
the bundled fixtures, in one process:

1. a 1-epoch run that fills an empty feature cache (the one-time feature computation),
2. a run of ``--epochs`` epochs that reads every feature from that cache,
3. a run of ``--epochs`` epochs with ``data.cache_features = false``, where both backbones run
   on every training and validation step.

An epoch's time covers its training steps, validation, embedding file and checkpoint. Panels per
second count the panels of the training steps over the training time alone.

    python benchmarks/bench_trainer.py                  # CPU, or CUDA when torch detects a GPU
    python benchmarks/bench_trainer.py --epochs 1 --json bench.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed_fit(config_overrides: list[str], run_dir: Path, cache_dir: Path) -> dict:
    """Fit one run of the pretrained config; return its wall time, epoch summaries and feature stats."""
    from rich.console import Console

    from trainer import loop
    from trainer.config import load_config

    config = load_config(REPO / "configs" / "pretrained.toml", [f"data.cache_dir={json.dumps(str(cache_dir))}", *config_overrides])
    started = time.perf_counter()
    run = loop.fit(config, run_dir, console=Console(file=io.StringIO()))
    return {
        "seconds": time.perf_counter() - started,
        "epochs": run.history,
        "features": [
            {"kind": stats.kind, "computed": stats.computed, "distinct": stats.distinct, "seconds": stats.seconds}
            for stats in run.inputs.feature_stats
        ],
        "device": str(run.device),
        "train_panels": sum(len(run.dataset.pages[index].panels) for index in run.train_pages),
        "val_panels": sum(len(run.dataset.pages[index].panels) for index in run.val_pages),
    }


def summarise(result: dict) -> dict:
    epochs = result["epochs"]
    return {
        "epoch_seconds": statistics.median(summary["seconds"] for summary in epochs),
        "panels_per_second": statistics.median(summary["panels_per_second"] for summary in epochs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the cached and the uncached run (median reported)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--keep", type=Path, help="folder for the runs and the cache (default: a temporary folder)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    cache = folder / "cache"
    common = [f"device={json.dumps(args.device)}"]

    fill = timed_fit([*common, "optim.epochs=1"], folder / "fill", cache)
    cached = timed_fit([*common, f"optim.epochs={args.epochs}"], folder / "cached", cache)
    uncached = timed_fit(
        [*common, f"optim.epochs={args.epochs}", "data.cache_features=false"], folder / "uncached", cache
    )
    if any(stats["computed"] for stats in cached["features"]):
        sys.exit("benchmark error: the cached run recomputed features; the cache was not reused")

    cached_figures = summarise(cached)
    uncached_figures = summarise(uncached)
    ratio = uncached_figures["epoch_seconds"] / cached_figures["epoch_seconds"]
    feature_seconds = sum(stats["seconds"] for stats in fill["features"])
    feature_count = sum(stats["computed"] for stats in fill["features"])

    device = cached["device"]
    if device.startswith("cuda"):
        hardware = torch.cuda.get_device_name(torch.device(device))
    else:
        hardware = f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s), {os.cpu_count()} CPU(s)"
    print(f"device: {device} ({hardware}); torch {torch.__version__}")
    print(f"data: {cached['train_panels']} train and {cached['val_panels']} validation panels per epoch")
    print(f"filling the feature cache: {feature_count} features in {feature_seconds:.1f} s (once per panel content)")
    print(f"epoch with the cache:      {cached_figures['epoch_seconds']:8.2f} s  "
          f"{cached_figures['panels_per_second']:10.0f} panels/s")
    print(f"epoch without the cache:   {uncached_figures['epoch_seconds']:8.2f} s  "
          f"{uncached_figures['panels_per_second']:10.1f} panels/s")
    print(f"ratio without / with:      {ratio:8.1f}x  (goal >= 10x)")

    if args.json:
        figures = {
            "device": device,
            "hardware": hardware,
            "torch": torch.__version__,
            "epochs": args.epochs,
            "train_panels": cached["train_panels"],
            "val_panels": cached["val_panels"],
            "feature_fill": {"features": feature_count, "seconds": feature_seconds},
            "cached": cached_figures,
            "uncached": uncached_figures,
            "ratio": ratio,
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The training loop, in the order it runs: setup, data, model, optimiser, step, validation, artifacts.

``fit`` trains a new run and ``resume`` continues one from its newest checkpoint. Everything else is a short
function named after one stage, so the order of operations reads top to bottom.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import os
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainer import distributed
from trainer.artifacts import CHECKPOINT_FORMAT, FORMAT_VERSION, RUN_FORMAT, RunDirectory, load_checkpoint
from trainer.config import TrainConfig, TrainerError, config_from_dict, config_to_dict
from trainer.data import (
    PanelBatch,
    PanelDataset,
    PanelInputs,
    iterate_batches,
    load_batches,
    load_dataset,
    skipped_summary,
    split_pages,
)
from trainer.distributed import Distributed, TrainingLoss, batch_labels, reduce_step_values
from trainer.model import PanelEncoder
from trainer.objectives import COMPONENTS, Objectives, ObjectiveOutput
from trainer.sampler import BalancedBatchSampler, page_signal_counts

# Offsets of the generator seeds from config.seed, so the streams differ from each other and from
# the model initialisation.
SHUFFLE_SEED_OFFSET = 1
MASK_SEED_OFFSET = 2
VALIDATION_SEED_OFFSET = 3


class TrainingDiverged(TrainerError):
    """The loss or the gradient was NaN or infinite in ``optim.max_bad_steps_in_a_row`` steps in a row."""

    exit_code = 1


# Page sets that embed_dataset can embed.
EMBED_SPLITS = ("all", "train", "val")


@dataclass
class Run:
    """The state of one training run: data, model, optimiser, generators and progress."""

    config: TrainConfig
    directory: RunDirectory
    device: torch.device
    console: Console
    dataset: PanelDataset
    train_pages: list[int]
    val_pages: list[int]
    model: PanelEncoder
    objectives: Objectives
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    shuffle_generator: torch.Generator
    mask_generator: torch.Generator
    inputs: PanelInputs | None = None
    # None draws batches with iterate_batches and shuffle_generator (data.sampler = "random").
    sampler: BalancedBatchSampler | None = None
    backbones: dict[str, dict[str, Any]] = field(default_factory=dict)
    # This process's rank under torchrun, and the encoder plus objectives as DDP trains them.
    dist: Distributed = field(default_factory=Distributed)
    loss_module: torch.nn.Module | None = None
    # Processes that build batches (data.num_workers resolved).
    num_workers: int = 0
    # Last completed epoch and optimiser steps so far (skipped steps count).
    epoch: int = 0
    step: int = 0
    # Steps skipped for a non-finite loss or gradient: in total, and the current run of consecutive ones.
    skipped_steps: int = 0
    bad_steps_in_a_row: int = 0
    best_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Entry points


def fit(
    config: TrainConfig, run_dir: str | Path, overwrite: bool = False, console: Console | None = None
) -> Run:
    """Train a new run into ``run_dir`` and return its final state.

    Under torchrun every rank calls this, and only rank 0 writes the run directory and prints.
    """
    dist = distributed.initialize(select_device(config.device))
    finished = False
    try:
        console = _rank_console(console, dist)
        directory = RunDirectory(run_dir, writer=dist.is_main)
        if dist.is_main:
            directory.check_writable(overwrite)
        run = setup(config, directory, console, dist=dist)
        report_setup(run)
        # Old artifacts are deleted only now, so a config or data error leaves an earlier run intact.
        directory.prepare(overwrite)
        directory.write_run_info(run_info(run))
        directory.open_metrics()
        _train_and_close(run, directory)
        finished = True
    finally:
        distributed.shutdown(dist, finished)
    return run


def resume(run_dir: str | Path, console: Console | None = None) -> Run:
    """Continue a run from its newest checkpoint that loads, up to its configured number of epochs.

    ``checkpoints/last.pt`` is tried first, then the ``epoch_NNNN.pt`` files from the newest epoch
    down, then ``best.pt``. When the run starts from a file other than ``last.pt``, ``last.pt`` is
    replaced with that file before training. The optimiser, scheduler, sampler and every RNG state
    come from the checkpoint, and the ``metrics.jsonl`` records written after it are dropped, so the
    finished run matches an uninterrupted one. A run killed before its first checkpoint starts again
    from the config in its ``run.json``. When checkpoint files exist but none of them loads, it
    raises TrainerError and changes nothing.
    """
    directory = RunDirectory(run_dir)
    source, checkpoint, load_errors = _newest_loadable_checkpoint(directory)
    if checkpoint is not None:
        config = config_from_dict(checkpoint["config"], source=str(source))
    elif load_errors:
        raise TrainerError(
            f"{directory.checkpoints_dir}: every checkpoint (last.pt, epoch_NNNN.pt, best.pt) failed to load "
            f"({'; '.join(load_errors)}). Delete these files to start the run again from epoch 1"
        )
    elif directory.run_json_path.is_file():
        config = _config_from_run_info(directory)
    else:
        raise TrainerError(
            f"{directory.checkpoints_dir}: checkpoint not found (no last.pt, epoch_NNNN.pt or best.pt), and "
            f"{directory.run_json_path} is missing too, so there is no run to resume"
        )

    dist = distributed.initialize(select_device(config.device))
    finished = False
    try:
        console = _rank_console(console, dist)
        directory.writer = dist.is_main
        for error in load_errors:
            console.print(f"[yellow]warning:[/] {escape(error)}, so an older checkpoint is used", soft_wrap=True)
        if checkpoint is None:
            console.print(
                f"{directory.checkpoints_dir}: no checkpoint found, so the run starts again from epoch 1",
                markup=False, highlight=False, soft_wrap=True,
            )
        else:
            console.print(
                f"resuming from {source} (epoch {checkpoint['epoch']})", markup=False, highlight=False, soft_wrap=True
            )
        run = setup(config, directory, console, checkpoint=checkpoint, dist=dist, checkpoint_path=source)
        report_setup(run)
        if checkpoint is not None and checkpoint.get("dataset_fingerprint") != run.dataset.fingerprint:
            console.print(f"[yellow]warning:[/] {config.data.manifest}: dataset changed since the checkpoint was written")

        directory.prepare(overwrite=False)
        directory.remove_stale_temporaries()
        if source is not None and source.name != "last.pt":
            # last.pt is missing or failed to load, and a run that is already finished writes no new one.
            directory.point_last_at(source)
        info = directory.read_run_info()
        info.setdefault("resumed_from_epoch", []).append(run.epoch)
        directory.write_run_info(info)
        directory.open_metrics(keep_through_epoch=run.epoch, keep_through_step=run.step)
        _train_and_close(run, directory)
        finished = True
    finally:
        distributed.shutdown(dist, finished)
    return run


def _train_and_close(run: Run, directory: RunDirectory) -> None:
    """Train ``run`` to its last epoch, then close the metrics log and drop the DDP wrapper, even on error.

    Under torchrun the wrapper references the process group, which ``distributed.shutdown`` destroys next.
    """
    try:
        train(run)
    finally:
        directory.close()
        run.loss_module = None


def _newest_loadable_checkpoint(directory: RunDirectory) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """Load the first checkpoint of ``directory.resume_candidates()`` that loads.

    Returns its path and content (both None when no file loads) and the error messages of the
    files before it that failed to load.
    """
    errors = []
    for path in directory.resume_candidates():
        try:
            return path, load_checkpoint(path), errors
        except TrainerError as error:
            errors.append(str(error))
    return None, None, errors


def _config_from_run_info(directory: RunDirectory) -> TrainConfig:
    info = directory.read_run_info()
    if not isinstance(info.get("config"), dict):
        raise TrainerError(f"{directory.run_json_path}: no 'config' object, so the run cannot start again")
    return config_from_dict(info["config"], source=str(directory.run_json_path))


def _rank_console(console: Console | None, dist: Distributed) -> Console:
    # Under torchrun only rank 0 prints progress and summaries.
    if not dist.is_main:
        return Console(stderr=True, quiet=True)
    return console or Console(stderr=True)


def embed_dataset(
    checkpoint_path: str | Path,
    manifest: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    split: str = "all",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Embed the usable pages of a dataset with a checkpoint's model in eval mode.

    The dataset is the checkpoint's own unless ``manifest`` names another one, and the checkpoint's data
    settings (page types, panel cap) apply. ``split`` is "all", or "train" or "val" for that side of the
    split the trainer makes with the checkpoint's ``data.val_fraction`` and ``data.seed``. Frozen-backbone
    features come from the configured cache, or from the ``cache`` folder of the checkpoint's run
    directory. Returns ``fused``, ``vision`` and ``text`` [panels, D] float32, ``page`` (index into the
    returned page ids) and ``has_text``, in the layout of the per-epoch embedding files, plus the page ids.
    """
    if split not in EMBED_SPLITS:
        raise TrainerError(f"unknown split {split!r} (expected one of {', '.join(EMBED_SPLITS)})")
    checkpoint = load_checkpoint(checkpoint_path)
    config = config_from_dict(checkpoint["config"], source=str(checkpoint_path))
    if manifest is not None:
        config.data.manifest = str(manifest)
    torch_device = select_device(device)

    dataset = load_dataset(config.data)
    if split == "all":
        chosen = list(range(len(dataset.pages)))
    else:
        train_pages, val_pages = split_pages(dataset, config.data.val_fraction, config.data.seed)
        chosen = val_pages if split == "val" else train_pages
    model, _ = build_model(config, torch_device)
    load_model_state(model, checkpoint, checkpoint_path)
    model.eval()
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else None
    run_dir = Path(checkpoint_path).resolve().parent.parent
    if cache_dir is None and (run_dir / "cache").is_dir():
        cache_dir = run_dir / "cache"
    inputs = PanelInputs(dataset, model.vision_backbone, model.text_backbone, cache_dir, torch_device)

    collected: dict[str, list[torch.Tensor]] = {"fused": [], "vision": [], "text": [], "page": [], "has_text": []}
    # ``page`` indexes the returned page ids, that is the position of the page in ``chosen``.
    position = {page_index: rank for rank, page_index in enumerate(chosen)}
    with torch.no_grad():
        for page_indices in iterate_batches(chosen, batch_size):
            batch = inputs.batch(page_indices).to(torch_device)
            with _autocast(torch_device):
                embeddings = model(batch)
            collected["fused"].append(embeddings.fused.float().cpu())
            collected["vision"].append(embeddings.vision.float().cpu())
            collected["text"].append(embeddings.text.float().cpu())
            collected["page"].append(torch.tensor([position[int(index)] for index in batch.dataset_page]))
            collected["has_text"].append(batch.has_text.cpu())
    page_ids = [dataset.pages[index].page_id for index in chosen]
    return {name: torch.cat(tensors) for name, tensors in collected.items()}, page_ids


# --------------------------------------------------------------------------------------------------
# Setup


def setup(
    config: TrainConfig,
    directory: RunDirectory,
    console: Console,
    checkpoint: dict[str, Any] | None = None,
    dist: Distributed | None = None,
    checkpoint_path: Path | None = None,
) -> Run:
    """Seed, pick the device, load the data, build the model and optimiser; restore ``checkpoint`` if given.

    ``checkpoint_path`` names the checkpoint's file in error messages.
    """
    dist = dist or Distributed()
    seed_everything(config.seed)
    device = dist.device if dist.enabled else select_device(config.device)

    dataset = load_dataset(config.data)
    train_pages, val_pages = split_pages(dataset, config.data.val_fraction, config.data.seed)

    model, objectives = build_model(config, device)
    if dist.rank > 0:
        # Dropout masks differ between ranks; DDP gives every rank rank 0's initial weights.
        seed_everything(config.seed + distributed.RANK_SEED_STRIDE * dist.rank)
    optimizer, scheduler = build_optimizer(model, objectives, config, steps_per_epoch=_steps_per_epoch(config, train_pages))
    run = Run(
        config=config,
        directory=directory,
        device=device,
        console=console,
        dataset=dataset,
        train_pages=train_pages,
        val_pages=val_pages,
        model=model,
        objectives=objectives,
        optimizer=optimizer,
        scheduler=scheduler,
        shuffle_generator=torch.Generator().manual_seed(config.seed + SHUFFLE_SEED_OFFSET),
        mask_generator=torch.Generator().manual_seed(config.seed + MASK_SEED_OFFSET),
        sampler=build_sampler(config, dataset, train_pages),
        dist=dist,
    )
    if checkpoint is not None:
        restore_checkpoint(run, checkpoint, checkpoint_path or "checkpoint")

    # Features of frozen backbones are computed after a restore, because a stored frozen backbone's
    # weights define its cache key.
    run.backbones = describe_backbones(model)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else directory.path / "cache"
    # Rank 0 fills the feature cache, and the other ranks then read it instead of recomputing.
    with dist.main_first(), _progress(console) as progress:
        run.inputs = PanelInputs(
            dataset, model.vision_backbone, model.text_backbone, cache_dir, device, progress,
            cache_features=config.data.cache_features,
        )
    run.num_workers = batch_workers(config, run.inputs, device)

    if config.model.compile:
        compile_model(model)
    run.loss_module = dist.wrap(TrainingLoss(model, objectives, dist, functools.partial(_autocast, device)))
    return run


def batch_workers(config: TrainConfig, inputs: PanelInputs, device: torch.device) -> int:
    """Resolve ``data.num_workers``: by default, workers only when batches need image preprocessing on CUDA.

    Cached features make a batch an index into tensors, where workers only add overhead, and on a
    CPU the workers would take cores from the training step.
    """
    if config.data.num_workers is not None:
        return config.data.num_workers
    if device.type != "cuda" or inputs.vision_features is not None:
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def compile_model(model: PanelEncoder) -> None:
    """Compile the encoder's tensor-only modules in place with ``torch.compile``; state-dict keys stay the same.

    Text backbones take Python strings, so they stay eager, and so does a frozen vision backbone,
    whose features are cached or computed without gradients.
    """
    modules = [model.vision_projection, model.text_projection, model.layout_encoder, model.fusion]
    if not model.vision_backbone.frozen:
        modules.append(model.vision_backbone)
    for module in modules:
        # Panel counts differ from batch to batch, so shapes are compiled as dynamic.
        module.compile(dynamic=True)


def build_sampler(config: TrainConfig, dataset: PanelDataset, train_pages: list[int]) -> BalancedBatchSampler | None:
    """Return the balanced sampler when ``data.sampler`` selects it, else None (plain shuffling)."""
    if config.data.sampler != "balanced":
        return None
    panel_counts, text_counts = page_signal_counts(dataset, train_pages)
    # Its batches depend only on this seed and the epoch number.
    return BalancedBatchSampler(
        train_pages,
        panel_counts,
        text_counts,
        config.optim.batch_size,
        min_multi_panel_pages=config.data.min_multi_panel_pages,
        min_text_panels=config.data.min_text_panels,
        seed=config.seed + SHUFFLE_SEED_OFFSET,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError(f"device: {name!r} requested, but torch sees no CUDA device")
    return device


def build_model(config: TrainConfig, device: torch.device) -> tuple[PanelEncoder, Objectives]:
    from trainer.backbones import BackboneError, build_text_backbone, build_vision_backbone

    model_config = config.model
    try:
        vision = build_vision_backbone(
            model_config.vision_backbone, frozen=model_config.vision_frozen, pretrained=model_config.pretrained
        )
    except BackboneError as error:
        raise TrainerError(f"model.vision_backbone: {error}") from None
    try:
        text = build_text_backbone(model_config.text_backbone, frozen=model_config.text_frozen)
    except BackboneError as error:
        raise TrainerError(f"model.text_backbone: {error}") from None

    model = PanelEncoder(vision, text, model_config).to(device)
    objectives = Objectives(model_config.dim, config.objectives).to(device)
    return model, objectives


def describe_backbones(model: PanelEncoder) -> dict[str, dict[str, Any]]:
    excluded = model.excluded_state_prefixes()
    described = {}
    for kind, backbone in (("vision", model.vision_backbone), ("text", model.text_backbone)):
        described[kind] = {
            "name": backbone.name,
            "frozen": bool(backbone.frozen),
            "out_dim": int(backbone.out_dim),
            "cache_key": backbone.cache_key,
            "in_checkpoint": f"{kind}_backbone." not in excluded,
        }
    return described


def optimised_parameters(model: PanelEncoder, objectives: Objectives) -> list[torch.nn.Parameter]:
    """Parameters the optimiser updates: the trainable model parameters and the objectives' head."""
    return [p for p in model.parameters() if p.requires_grad] + [p for p in objectives.parameters() if p.requires_grad]


def clipped_parameters(model: PanelEncoder, objectives: Objectives, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Parameters covered by gradient clipping: all optimised ones, or the model's only (legacy)."""
    if config.optim.clip_all_params:
        return optimised_parameters(model, objectives)
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(
    model: PanelEncoder, objectives: Objectives, config: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices only, as in nanoGPT) with linear warmup and cosine decay."""
    parameters = optimised_parameters(model, objectives)
    groups = [
        {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": config.optim.weight_decay},
        {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.optim.lr)

    total_steps = max(1, config.optim.epochs * steps_per_epoch)
    warmup_steps = int(config.optim.warmup_fraction * total_steps)
    min_ratio = config.optim.min_lr_ratio

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _steps_per_epoch(config: TrainConfig, train_pages: list[int]) -> int:
    return math.ceil(len(train_pages) / config.optim.batch_size)


def _autocast(device: torch.device):
    # NOTE: the CUDA branch (bf16 autocast) is not covered by the tests, which run on CPU only.
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Training


def train(run: Run) -> None:
    """Train from the epoch after ``run.epoch`` through ``config.optim.epochs``."""
    for epoch in range(run.epoch + 1, run.config.optim.epochs + 1):
        started = time.perf_counter()
        train_records = train_epoch(run, epoch)
        train_seconds = time.perf_counter() - started
        validation, embeddings = validate(run, epoch)
        run.directory.log_metrics(validation)

        relative = dump_embeddings(run, epoch, embeddings)
        is_best = validation["loss"] < run.best_val_loss
        if is_best:
            run.best_val_loss = validation["loss"]
        run.epoch = epoch
        save_checkpoint(run, relative, validation["loss"], is_best)

        seconds = time.perf_counter() - started
        summary = epoch_summary(run, epoch, train_records, validation, seconds, is_best, train_seconds)
        run.history.append(summary)
        run.console.print(
            format_summary(summary, run.config.optim.epochs), markup=False, highlight=False, soft_wrap=True
        )


def train_epoch(run: Run, epoch: int) -> list[dict[str, Any]]:
    records = []
    batches = epoch_batches(run, epoch)
    # Under torchrun each rank trains on its slice of every global batch.
    local_batches = [run.dist.shard(page_indices) for page_indices in batches]
    loader = load_batches(run.inputs, local_batches, run.num_workers, pin_memory=run.device.type == "cuda")
    with _progress(run.console) as progress:
        advance = progress(f"epoch {epoch}/{run.config.optim.epochs}", len(batches))
        for page_indices, batch in zip(batches, loader):
            record = train_step(run, batch.to(run.device), epoch, page_indices)
            run.directory.log_metrics(record)
            records.append(record)
            stop_if_diverged(run, record)
            advance(1)
    return records


def epoch_batches(run: Run, epoch: int) -> list[list[int]]:
    """Return the page indices of each train batch of ``epoch``, from the configured sampler."""
    if run.sampler is None:
        return list(iterate_batches(run.train_pages, run.config.optim.batch_size, run.shuffle_generator))
    run.sampler.set_epoch(epoch)
    return list(run.sampler)


def train_step(
    run: Run, batch: PanelBatch, epoch: int, global_pages: Sequence[int] | None = None
) -> dict[str, Any]:
    """One optimiser step; return its ``metrics.jsonl`` record.

    ``batch`` contains this rank's slice of the global batch ``global_pages`` (the whole batch in a
    single process, where ``global_pages`` may be left out). A step whose loss or gradient is NaN or
    infinite on any rank is skipped: no parameter changes, the scheduler still advances, and the
    record has ``"skipped": true`` and the reason.
    """
    model, objectives, config = run.model, run.objectives, run.config
    model.train()
    objectives.train()
    run.optimizer.zero_grad(set_to_none=True)

    labels = None
    if config.objectives.gather and run.dist.enabled:
        labels = batch_labels(global_pages, run.inputs.offsets, run.inputs.has_text, run.dist, run.device)
    output = run.loss_module(batch, run.mask_generator, labels)
    injected = _injected_nan(config, run.step + 1)
    if injected == "loss":
        output.total = output.total * float("nan")
    probe_every = config.objectives.grad_probe_every
    # NOTE: under torchrun the probe measures this rank's own gradient before DDP averages it (and,
    # with objectives.gather, multiplied by the world size), so its norms differ from one process's.
    grad_norms = component_grad_norms(model, output) if probe_every and (run.step + 1) % probe_every == 0 else {}
    # Every rank runs the backward pass, even for a bad loss, because DDP's gradient averaging needs all ranks.
    output.total.backward()

    # The logged norm covers every optimised parameter, whichever set the clipping covers.
    parameters = optimised_parameters(model, objectives)
    gradients = [p.grad for p in parameters if p.grad is not None]
    if injected == "gradient" and gradients:
        gradients[0].view(-1)[0] = float("nan")
    grad_norm = float(torch.nn.utils.get_total_norm(gradients))
    loss_bad, gradient_bad = run.dist.any_true(
        [not math.isfinite(float(output.total.detach())), not math.isfinite(grad_norm)]
    )
    reason = None
    if loss_bad:
        reason = "nonfinite_loss"
    elif gradient_bad:
        reason = "nonfinite_gradient"

    lr = run.scheduler.get_last_lr()[0]
    if reason is None:
        if config.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(clipped_parameters(model, objectives, config), config.optim.grad_clip)
        run.optimizer.step()
        run.bad_steps_in_a_row = 0
    else:
        run.optimizer.zero_grad(set_to_none=True)
        run.skipped_steps += 1
        run.bad_steps_in_a_row += 1
    with warnings.catch_warnings():
        # The schedule follows the step count, skipped steps included, so it advances without an update.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()
    run.step += 1

    loss, components = reduce_step_values(run.dist, output, gathered=labels is not None)
    if global_pages is None:
        pages, panels = batch.num_pages, batch.num_panels
    else:
        offsets = run.inputs.offsets
        pages, panels = len(global_pages), sum(offsets[page + 1] - offsets[page] for page in global_pages)
    record = step_record(epoch, run.step, loss, components, lr, grad_norm, pages, panels)
    record["skipped"] = reason is not None
    if reason is not None:
        record["reason"] = reason
    record["skipped_steps"] = run.skipped_steps
    for name, norm in grad_norms.items():
        record["components"][name]["grad_norm"] = norm
    return record


def _injected_nan(config: TrainConfig, step: int) -> str | None:
    """Return where ``debug.nan_at_step`` puts a NaN at this step ("loss" or "gradient"), or None."""
    first = config.debug.nan_at_step
    if first is None or not first <= step < first + config.debug.nan_steps:
        return None
    return config.debug.nan_in


def stop_if_diverged(run: Run, record: dict[str, Any]) -> None:
    """Raise TrainingDiverged once ``optim.max_bad_steps_in_a_row`` steps in a row were skipped."""
    limit = run.config.optim.max_bad_steps_in_a_row
    if run.bad_steps_in_a_row < limit:
        return
    if run.epoch > 0:
        kept = f"checkpoints/last.pt (epoch {run.epoch}) is the last good checkpoint"
    else:
        kept = "no checkpoint was written yet"
    raise TrainingDiverged(
        f"training stopped at epoch {record['epoch']}, step {record['step']}: {limit} steps in a row had a "
        f"non-finite loss or gradient (last: {record['reason']}; {_component_text(record['components'])}); "
        f"{kept}; lower optim.lr or raise objectives.temperature"
    )


def component_grad_norms(model: PanelEncoder, output: ObjectiveOutput) -> dict[str, float]:
    """Return the L2 norm of each weighted component's gradient on the model's trainable parameters.

    Each component gets its own backward pass through the retained graph. ``torch.autograd.grad``
    returns the gradients instead of accumulating them into ``.grad``, so the training step that follows
    is unchanged. The objectives' reconstruction head is left out, because only one component reaches it.
    A component with no signal has a gradient of exactly 0.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    norms = {}
    for name, result in output.components.items():
        weighted = result.weight * result.value
        if not weighted.requires_grad:
            norms[name] = 0.0
            continue
        gradients = torch.autograd.grad(weighted, parameters, retain_graph=True, allow_unused=True)
        norms[name] = float(torch.nn.utils.get_total_norm([g for g in gradients if g is not None]))
    return norms


def step_record(
    epoch: int,
    step: int,
    loss: float,
    components: dict[str, dict[str, float | int]],
    lr: float,
    grad_norm: float,
    pages: int,
    panels: int,
) -> dict[str, Any]:
    return {
        "kind": "step",
        "epoch": epoch,
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "pages": pages,
        "panels": panels,
        "components": components,
    }


# --------------------------------------------------------------------------------------------------
# Validation and artifacts


def validate(run: Run, epoch: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Compute the validation loss and collect the validation embeddings in one pass.

    The model is always in eval mode here. The objectives are in eval mode too (no dropout in the
    reconstruction head) and the masked panels come from a freshly seeded generator, so two calls on
    the same weights return the same loss. The legacy preset keeps the objectives in train mode and
    draws the masks from the global RNG, which is the historical behaviour.

    The loss and component values are means over batches weighted by pages per batch. The active
    counts are sums over batches. Under torchrun each rank embeds its slice of every batch, and the
    objectives run on every rank over the gathered batch, so every rank returns the same record and
    the embeddings of all validation pages in page order.
    """
    config = run.config
    run.model.eval()
    run.objectives.train(not config.objectives.eval_in_validation)
    generator = None
    if config.objectives.seeded_validation_mask:
        generator = torch.Generator().manual_seed(config.seed + VALIDATION_SEED_OFFSET)

    total = 0.0
    values = {name: 0.0 for name in COMPONENTS}
    active = {name: 0 for name in COMPONENTS}
    weights: dict[str, float] = {}
    collected: dict[str, list[torch.Tensor]] = {"fused": [], "vision": [], "text": [], "page": [], "has_text": []}
    page_offset = 0
    batches = list(iterate_batches(run.val_pages, config.optim.batch_size))
    local_batches = [run.dist.shard(page_indices) for page_indices in batches]
    loader = load_batches(run.inputs, local_batches, run.num_workers, pin_memory=run.device.type == "cuda")
    with torch.no_grad():
        for page_indices, batch in zip(batches, loader):
            batch = batch.to(run.device)
            with _autocast(run.device):
                embeddings = run.model(batch)
            labels = batch_labels(page_indices, run.inputs.offsets, run.inputs.has_text, run.dist, run.device)
            embeddings = run.dist.gather_embeddings(embeddings, labels.counts)
            output = run.objectives(embeddings, labels.page, labels.has_text, generator)

            pages = len(page_indices)
            total += float(output.total) * pages
            for name, result in output.components.items():
                values[name] += float(result.value) * pages
                active[name] += result.active
                weights[name] = result.weight
            collected["fused"].append(embeddings.fused.float().cpu())
            collected["vision"].append(embeddings.vision.float().cpu())
            collected["text"].append(embeddings.text.float().cpu())
            collected["page"].append(labels.page.cpu() + page_offset)
            collected["has_text"].append(labels.has_text.cpu())
            page_offset += pages

    run.model.train()
    run.objectives.train()

    count = len(run.val_pages)
    record = {
        "kind": "validation",
        "epoch": epoch,
        "step": run.step,
        "loss": total / count,
        "pages": count,
        "panels": sum(len(t) for t in collected["page"]),
        "components": {
            name: {"value": values[name] / count, "weight": weights[name], "active": active[name]} for name in COMPONENTS
        },
    }
    return record, {name: torch.cat(tensors) for name, tensors in collected.items()}


def dump_embeddings(run: Run, epoch: int, embeddings: dict[str, torch.Tensor]) -> str:
    """Write the epoch's validation embeddings; return their path relative to the run directory."""
    page_ids = [run.dataset.pages[index].page_id for index in run.val_pages]
    return run.directory.write_embeddings(
        epoch,
        fused=embeddings["fused"],
        vision=embeddings["vision"],
        text=embeddings["text"],
        page=embeddings["page"],
        has_text=embeddings["has_text"],
        page_ids=page_ids,
    )


def save_checkpoint(run: Run, embeddings_path: str, val_loss: float, is_best: bool) -> None:
    """Write the epoch's checkpoint (rank 0 only; under torchrun every rank must call it)."""
    # Every rank's RNG state is kept, because dropout and, without objectives.gather, the masked
    # panels draw per rank.
    rank_rng_states = run.dist.gather_objects(capture_rng_state(run))
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "epoch": run.epoch,
        "step": run.step,
        "config": config_to_dict(run.config),
        "model_state_dict": run.model.checkpoint_state_dict(),
        "objectives_state_dict": run.objectives.state_dict(),
        "optimizer_state_dict": run.optimizer.state_dict(),
        "scheduler_state_dict": run.scheduler.state_dict(),
        "rng_state": capture_rng_state(run),
        "embeddings": embeddings_path,
        "val_loss": val_loss,
        "best_val_loss": run.best_val_loss,
        "dataset_fingerprint": run.dataset.fingerprint,
        "backbones": run.backbones,
        "skipped_steps": run.skipped_steps,
        "bad_steps_in_a_row": run.bad_steps_in_a_row,
        "world_size": run.dist.world_size,
    }
    if run.dist.enabled:
        checkpoint["rank_rng_states"] = rank_rng_states
    if run.sampler is not None:
        checkpoint["sampler_state_dict"] = run.sampler.state_dict()
    run.directory.save_checkpoint(checkpoint, is_best, keep_last=run.config.checkpoints.keep_last)


def load_model_state(model: PanelEncoder, checkpoint: dict[str, Any], source: str | Path) -> None:
    """Load a checkpoint's ``model_state_dict`` into ``model``.

    A state that does not fit the model raises TrainerError naming ``source``.
    """
    try:
        model.load_checkpoint_state_dict(checkpoint["model_state_dict"])
    except TrainerError as error:
        raise TrainerError(f"{source}: model_state_dict does not match the model of its config ({error})") from None


def restore_checkpoint(run: Run, checkpoint: dict[str, Any], source: str | Path = "checkpoint") -> None:
    """Restore the model, optimiser, scheduler, sampler, RNG states and counters of ``checkpoint``.

    ``source`` names the checkpoint in error messages.
    """
    load_model_state(run.model, checkpoint, source)
    # Objectives.load_state_dict raises RuntimeError on other keys or shapes, and the optimiser
    # raises ValueError when its parameter groups differ in number or size.
    for key, module in (("objectives_state_dict", run.objectives), ("optimizer_state_dict", run.optimizer)):
        try:
            module.load_state_dict(checkpoint[key])
        except (RuntimeError, ValueError) as error:
            detail = " ".join(str(error).split())
            raise TrainerError(f"{source}: {key} does not match the model of its config ({detail})") from None
    # NOTE: the contents of the scheduler, sampler and RNG states are not checked, so a checkpoint with
    # wrongly typed values there still fails with a traceback here or during training.
    run.scheduler.load_state_dict(checkpoint["scheduler_state_dict"])
    if run.sampler is not None and "sampler_state_dict" in checkpoint:
        run.sampler.load_state_dict(checkpoint["sampler_state_dict"])
    restore_rng_state(run, _rank_rng_state(run, checkpoint))
    run.epoch = int(checkpoint["epoch"])
    run.step = int(checkpoint["step"])
    run.best_val_loss = float(checkpoint["best_val_loss"])
    run.skipped_steps = int(checkpoint.get("skipped_steps", 0))
    run.bad_steps_in_a_row = int(checkpoint.get("bad_steps_in_a_row", 0))


def _rank_rng_state(run: Run, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Pick this rank's RNG state from a checkpoint.

    With another world size than the checkpoint's, every rank takes rank 0's state, so the batches and
    the gathered objectives' masks stay in step. Dropout masks then differ from an uninterrupted run.
    """
    states = checkpoint.get("rank_rng_states") or [checkpoint["rng_state"]]
    if len(states) == run.dist.world_size:
        return states[run.dist.rank]
    if run.dist.is_main:
        run.console.print(
            f"[yellow]warning:[/] the checkpoint was written by {len(states)} process(es) and the run resumes "
            f"with {run.dist.world_size}, so dropout masks differ from an uninterrupted run"
        )
    return states[0]


def capture_rng_state(run: Run) -> dict[str, Any]:
    """Return every RNG state as tensors and plain values, so ``weights_only`` loading accepts it."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "shuffle_generator": run.shuffle_generator.get_state(),
        "mask_generator": run.mask_generator.get_state(),
    }


def restore_rng_state(run: Run, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["position"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    run.shuffle_generator.set_state(state["shuffle_generator"])
    run.mask_generator.set_state(state["mask_generator"])


def run_info(run: Run) -> dict[str, Any]:
    dataset = run.dataset
    val_panels = sum(len(dataset.pages[index].panels) for index in run.val_pages)
    return {
        "format": RUN_FORMAT,
        "version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": config_to_dict(run.config),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "collapse_toolkit": _package_version(),
        },
        "device": str(run.device),
        "distributed": {"world_size": run.dist.world_size, "backend": run.dist.backend},
        "device_name": torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else platform.processor() or platform.machine(),
        "seed": run.config.seed,
        "dataset_fingerprint": dataset.fingerprint,
        "skipped": dataset.skipped,
        "dataset": {
            "manifest": str(dataset.manifest),
            "pages": len(dataset.pages),
            "panels": len(dataset.panels),
            "train_pages": len(run.train_pages),
            "val_pages": len(run.val_pages),
            "val_panels": val_panels,
            "skipped_examples": dataset.skipped_examples,
        },
        "backbones": run.backbones,
        "argv": sys.argv,
    }


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("collapse-toolkit")
    except PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------------
# Progress and the epoch summary


@contextlib.contextmanager
def _progress(console: Console):
    """Yield ``start(description, total) -> advance(n)`` backed by a transient rich progress bar."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    # Without a terminal (logs, CI) the bar is skipped; the epoch summary lines remain.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:

        def start(description: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(description, total=total)
            return lambda count: progress.advance(task, count)

        yield start


def report_setup(run: Run) -> None:
    """Print one line about the data and one per frozen backbone whose features were loaded or computed."""
    dataset = run.dataset
    skipped = sum(dataset.skipped.values())
    lines = [
        f"data {dataset.manifest}: {len(dataset.pages)} pages ({len(run.train_pages)} train, {len(run.val_pages)} "
        f"validation), {len(dataset.panels)} panels; skipped {skipped} records ({skipped_summary(dataset.skipped)})"
    ]
    for stats in run.inputs.feature_stats:
        lines.append(
            f"{stats.kind} features ({stats.backbone}, frozen): {stats.computed} computed, "
            f"{stats.distinct - stats.computed} from the cache, {stats.seconds:.1f}s"
        )
    for line in lines:
        run.console.print(line, markup=False, highlight=False, soft_wrap=True)


def epoch_summary(
    run: Run,
    epoch: int,
    train_records: list[dict[str, Any]],
    validation: dict[str, Any],
    seconds: float,
    is_best: bool,
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """Summarise an epoch; train means leave out skipped steps, whose loss is not finite."""
    good = [record for record in train_records if not record.get("skipped")]
    steps = max(1, len(good))
    components = {name: sum(record["components"][name]["value"] for record in good) / steps for name in COMPONENTS}
    panels = sum(record["panels"] for record in train_records)
    return {
        "epoch": epoch,
        "train_loss": sum(record["loss"] for record in good) / steps,
        "train_components": components,
        "val_loss": validation["loss"],
        "val_components": {name: validation["components"][name]["value"] for name in COMPONENTS},
        "seconds": seconds,
        "train_seconds": train_seconds,
        # Panels through the training steps per second of training (validation not counted).
        "panels_per_second": panels / train_seconds if train_seconds else None,
        "steps": len(train_records),
        "skipped_steps": len(train_records) - len(good),
        "best": is_best,
    }


def format_summary(summary: dict[str, Any], epochs: int) -> str:
    components = "  ".join(f"{name} {value:.4f}" for name, value in summary["train_components"].items())
    best = "  (best)" if summary["best"] else ""
    skipped = f" ({summary['skipped_steps']} skipped)" if summary.get("skipped_steps") else ""
    rate = summary.get("panels_per_second")
    throughput = ""
    if rate:
        throughput = f", {rate:.0f} panels/s" if rate >= 100 else f", {rate:.3g} panels/s"
    return (
        f"epoch {summary['epoch']}/{epochs}  train {summary['train_loss']:.4f} [{components}]  "
        f"val {summary['val_loss']:.4f}  {summary['seconds']:.1f}s, {summary['steps']} steps{skipped}"
        f"{throughput}{best}"
    )


def _component_text(components: dict[str, dict[str, float | int]]) -> str:
    return ", ".join(f"{name} {item['value']:.4g} (active {item['active']})" for name, item in components.items())

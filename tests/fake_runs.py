"""Small run directories in the trainer's layout, written without training, for the report and compare tests.

Each epoch's embeddings are seeded random vectors: panels of one page share a page direction, text
embeddings are noisy copies of their panel's vision embedding, and fused is their sum. ``shrink`` pulls
every vector of later epochs towards one point, so a run can be made to collapse on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

COMPONENTS = ("contrastive", "reconstruction", "alignment")
WEIGHTS = {"contrastive": 1.0, "reconstruction": 0.5, "alignment": 0.3}


def epoch_arrays(epoch: int, *, pages: int, panels_per_page: int, dim: int, seed: int, shrink: float = 0.0) -> dict:
    """Return the tensors of one epoch's embedding file."""
    generator = np.random.default_rng(seed * 1000 + epoch)
    page = np.repeat(np.arange(pages), panels_per_page).astype(np.int64)
    page_directions = generator.standard_normal((pages, dim))
    vision = page_directions[page] + generator.standard_normal((len(page), dim))
    text = vision + 0.5 * generator.standard_normal((len(page), dim))
    has_text = np.ones(len(page), dtype=np.uint8)
    has_text[::7] = 0
    if shrink:
        common = generator.standard_normal(dim) * 10.0
        vision = (1.0 - shrink) * vision + shrink * common
        text = (1.0 - shrink) * text + shrink * common
    fused = vision + text
    return {
        "fused": fused.astype(np.float32),
        "vision": vision.astype(np.float32),
        "text": text.astype(np.float32),
        "page": page,
        "item": np.arange(len(page), dtype=np.int64),
        "has_text": has_text,
    }


def write_embedding_file(path: Path, arrays: dict, epoch: int, page_ids: list[str] | None) -> Path:
    metadata = {"format": "collapse-toolkit/embeddings", "version": "1", "epoch": str(epoch), "split": "val"}
    save_file(arrays, str(path), metadata=metadata)
    if page_ids is not None:
        path.with_name(path.name.replace(".safetensors", ".pages.json")).write_text(json.dumps(page_ids))
    return path


def step_record(epoch: int, step: int, values: dict, active: dict) -> dict:
    components = {
        name: {"value": values[name], "weight": WEIGHTS[name], "active": active[name]} for name in COMPONENTS
    }
    loss = sum(WEIGHTS[name] * values[name] for name in COMPONENTS)
    return {"kind": "step", "epoch": epoch, "step": step, "loss": loss, "lr": 0.001, "grad_norm": 1.0,
            "components": components}


def make_run(
    root: Path,
    *,
    epochs: int = 3,
    pages: int = 8,
    panels_per_page: int = 5,
    dim: int = 16,
    seed: int = 0,
    page_ids: list[str] | None = None,
    validation_losses: list[float] | None = None,
    steps_per_epoch: int = 4,
    zero_reconstruction_steps: int = 1,
    shrink_per_epoch: float = 0.0,
    run_info: dict | None = None,
    best_checkpoint_epoch: int | None = None,
) -> Path:
    """Write a run directory with ``epochs`` epochs of embeddings and a metrics.jsonl.

    In every epoch the first ``zero_reconstruction_steps`` steps have ``active = 0`` for reconstruction.
    ``validation_losses`` (one per epoch) decide the best epoch; ``None`` writes no validation records.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "embeddings").mkdir(exist_ok=True)
    if page_ids is None:
        page_ids = [f"page_{index:03d}" for index in range(pages)]
    for epoch in range(1, epochs + 1):
        arrays = epoch_arrays(epoch, pages=pages, panels_per_page=panels_per_page, dim=dim, seed=seed,
                              shrink=min(0.99, shrink_per_epoch * (epoch - 1)))
        write_embedding_file(root / "embeddings" / f"epoch_{epoch:04d}.safetensors", arrays, epoch, page_ids)

    records = []
    step = 0
    for epoch in range(1, epochs + 1):
        for index in range(steps_per_epoch):
            step += 1
            values = {"contrastive": 3.0 - 0.2 * epoch - 0.01 * index, "reconstruction": 1.0 / epoch,
                      "alignment": 2.0 - 0.1 * epoch}
            active = {"contrastive": 30 + index, "reconstruction": 0 if index < zero_reconstruction_steps else 6,
                      "alignment": 20}
            if active["reconstruction"] == 0:
                values["reconstruction"] = 0.0
            records.append(step_record(epoch, step, values, active))
        if validation_losses is not None:
            components = {name: {"value": validation_losses[epoch - 1] / 2, "weight": WEIGHTS[name], "active": 10}
                          for name in COMPONENTS}
            records.append({"kind": "validation", "epoch": epoch, "step": step, "loss": validation_losses[epoch - 1],
                            "components": components})
    (root / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))

    if run_info is not None:
        (root / "run.json").write_text(json.dumps(run_info))
    if best_checkpoint_epoch is not None:
        import torch

        (root / "checkpoints").mkdir(exist_ok=True)
        checkpoint = {"format": "collapse-toolkit/checkpoint", "version": 1, "epoch": best_checkpoint_epoch,
                      "embeddings": f"embeddings/epoch_{best_checkpoint_epoch:04d}.safetensors"}
        torch.save(checkpoint, root / "checkpoints" / "best.pt")
    return root

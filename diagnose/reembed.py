"""Re-embed a dataset with a trainer checkpoint whose epoch embedding file is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diagnose.io import EmbeddingSet, InputError, MemoryArray


def embed_checkpoint(checkpoint_path: Path, manifest: Path, split: str = "val") -> EmbeddingSet:
    """Embed the usable pages of ``manifest`` in ``split`` with the checkpoint's model (eval mode, on CPU).

    ``split`` is "val" or "train" (the checkpoint's own validation split) or "all". The checkpoint's data
    settings (page types, panel cap) apply. The result has the layout of a per-epoch embedding file,
    with ``item`` = row index.
    """
    from trainer.config import TrainerError
    from trainer.loop import embed_dataset

    if not Path(manifest).is_file():
        raise InputError(f"{manifest}: dataset manifest not found")
    try:
        tensors, page_ids = embed_dataset(checkpoint_path, manifest=manifest, split=split)
    except TrainerError as error:
        raise InputError(str(error)) from None

    sources = {
        name: MemoryArray(tensors[name].numpy().astype(np.float32), name, str(checkpoint_path))
        for name in ("fused", "vision", "text")
    }
    rows = sources["fused"].rows
    embedding_set = EmbeddingSet(
        source=f"{checkpoint_path} on {manifest} ({split} split)",
        sources=sources,
        page=tensors["page"].numpy().astype(np.int64),
        item=np.arange(rows, dtype=np.int64),
        has_text=tensors["has_text"].numpy().astype(bool),
        page_ids=page_ids,
    )
    if rows < 2:
        raise InputError(f"{manifest}: re-embedding gave {rows} panel(s); at least 2 are needed")
    return embedding_set

"""The one-pass collapse reductions over a Stage 3 Zarr store with dask, for stores larger than one machine.

Each block of pages becomes a partial :class:`~diagnose.collapse.CollapseAccumulator`; partials merge
pairwise in a tree. Because the sample is a bottom-k sample keyed by global row index and every page lies in
one block, the merged statistics equal those of the single-machine pass (up to float64 summation order).

Whatever scheduler is active runs the graph: the local threaded one by default, or a ``dask.distributed``
cluster when the caller has created a ``Client``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diagnose.collapse import CollapseAccumulator, VerdictThresholds
from diagnose.io import InputError


def dask_collapse_metrics(
    path: str | Path,
    *,
    thresholds: VerdictThresholds = VerdictThresholds(),
    seed: int = 0,
    pages_per_block: int | None = None,
) -> dict:
    """Collapse metrics of the valid panels of a Zarr store, computed with dask.

    ``pages_per_block`` rechunks the page axis; by default the store's own chunks are used.
    """
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise InputError("--dask needs the dask extra: pip install 'collapse-toolkit[dask]'") from None
    import zarr

    path = Path(path)
    try:
        group = zarr.open_group(str(path), mode="r")
        embeddings = da.from_zarr(group["panel_embeddings"])
        masks = da.from_zarr(group["panel_masks"])
    except KeyError as error:
        raise InputError(f"{path}: Zarr store lacks array {error}; expected panel_embeddings and panel_masks") from None
    except Exception as error:
        raise InputError(f"{path}: not a readable Zarr store ({error})") from None
    if embeddings.ndim != 3 or masks.shape != embeddings.shape[:2]:
        raise InputError(
            f"{path}: expected panel_embeddings [pages, max_panels, D] and panel_masks [pages, max_panels], got "
            f"{tuple(embeddings.shape)} and {tuple(masks.shape)}"
        )

    if np.dtype(embeddings.dtype).kind != "f":
        raise InputError(f"{path}: panel_embeddings has dtype {embeddings.dtype}; expected floating point")
    page_chunks = pages_per_block or embeddings.chunks[0][0]
    embeddings = embeddings.rechunk((page_chunks, -1, -1))
    masks = masks.astype(bool).rechunk((page_chunks, -1))
    dim = int(embeddings.shape[2])

    # Rows per block decide each block's global row offset (small: one integer per block).
    rows_per_block = dask.compute(*[block.sum() for block in masks.to_delayed().ravel()])
    row_offsets = np.concatenate([[0], np.cumsum(rows_per_block)[:-1]]).astype(np.int64)
    page_offsets = np.concatenate([[0], np.cumsum(embeddings.chunks[0])[:-1]]).astype(np.int64)
    if int(np.sum(rows_per_block)) < 2:
        raise InputError(f"{path}: store contains {int(np.sum(rows_per_block))} valid panel(s); at least 2 are needed")

    partials = [
        dask.delayed(_block_accumulator)(embedding_block, mask_block, int(page_offset), int(row_offset), dim, seed)
        for embedding_block, mask_block, page_offset, row_offset in zip(
            embeddings.to_delayed().ravel(), masks.to_delayed().ravel(), page_offsets, row_offsets
        )
    ]
    try:
        (accumulator,) = dask.compute(_tree(partials, _merge))
    except InputError as error:
        raise InputError(f"{path}: {error}") from None
    except Exception as error:  # zarr codecs raise many types for damaged chunks
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{path}: cannot read the store ({reason})") from None

    if accumulator.needs_exact_gram():
        grams = [
            dask.delayed(_block_gram)(embedding_block, mask_block)
            for embedding_block, mask_block in zip(embeddings.to_delayed().ravel(), masks.to_delayed().ravel())
        ]
        (gram,) = dask.compute(_tree(grams, np.add))
        accumulator.refine_gram([])
        accumulator.gram = gram
    return accumulator.result(thresholds)


def _block_accumulator(embeddings, masks, page_offset: int, row_offset: int, dim: int, seed: int):
    embeddings = np.asarray(embeddings)
    masks = np.asarray(masks, dtype=bool)
    rows = embeddings[masks]
    if not np.isfinite(rows).all():
        bad_page = page_offset + int(np.flatnonzero(~np.isfinite(embeddings).all(axis=2) & masks)[0] // masks.shape[1])
        raise InputError(f"panel_embeddings has NaN or infinite values in page {bad_page}")
    pages = np.repeat(np.arange(page_offset, page_offset + masks.shape[0]), masks.sum(axis=1))
    # Every page of the block is complete here, so each closes as soon as its last row is in.
    last_rows = {}
    if len(pages):
        unique, first_from_end = np.unique(pages[::-1], return_index=True)
        last_rows = dict(zip(unique.tolist(), (len(pages) - 1 - first_from_end).tolist()))
    accumulator = CollapseAccumulator(dim, seed=seed, page_last_row=last_rows, row_offset=row_offset)
    if len(rows):
        accumulator.update(rows, pages)
    return accumulator


def _block_gram(embeddings, masks) -> np.ndarray:
    rows = np.asarray(embeddings)[np.asarray(masks, dtype=bool)].astype(np.float64)
    return rows.T @ rows


def _merge(first: CollapseAccumulator, second: CollapseAccumulator) -> CollapseAccumulator:
    first.merge(second)
    return first


def _tree(items: list, combine):
    """Combine delayed values pairwise, level by level, so the graph is a balanced tree."""
    import dask

    while len(items) > 1:
        paired = [dask.delayed(combine)(items[index], items[index + 1]) for index in range(0, len(items) - 1, 2)]
        if len(items) % 2:
            paired.append(items[-1])
        items = paired
    return items[0]

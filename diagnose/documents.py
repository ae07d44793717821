"""Build the JSON documents of the commands (``collapse/1`` and friends) from input paths.

This module joins the readers of :mod:`diagnose.io` to the metric functions: it streams every modality of
an embedding set through the accumulators in chunks, checks rows for NaN and infinite values on the way,
and assembles the documents whose keys are the public contract.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from diagnose.collapse import (
    CollapseAccumulator,
    NonFiniteRowError,
    PairAccumulator,
    VerdictThresholds,
    collapse_course,
    entropy_rank,
    last_row_of_each_page,
    worst_verdict,
)
from diagnose.io import (
    ArraySource,
    CheckpointWithoutEmbeddings,
    EmbeddingSet,
    InputError,
    load_embeddings,
    resolve_epochs,
)

COLLAPSE_SCHEMA = "collapse/1"
DEFAULT_CHUNK_ROWS = 32_768

# Called after each chunk with (label, rows done, rows in total), for progress display.
RowsCallback = Callable[[str, int, int], None]


def collapse_document(
    path: str | Path,
    *,
    modalities: list[str] | None = None,
    thresholds: VerdictThresholds = VerdictThresholds(),
    all_epochs: bool = True,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    seed: int = 0,
    on_rows: RowsCallback | None = None,
    use_dask: bool = False,
) -> dict:
    """Return the ``collapse/1`` document of a run directory, checkpoint or embedding file.

    For a run directory with ``all_epochs`` every epoch is measured and listed under ``epochs`` (with
    ``first_collapsed_epoch``); the top-level ``modalities`` are those of the last epoch. ``use_dask``
    computes a Zarr store's reductions with dask (see :mod:`diagnose.dask_reduce`).
    """
    path = Path(path)
    if use_dask:
        if not (path.is_dir() and _is_store(path)):
            raise InputError(f"{path}: --dask works on Zarr stores only")
        from diagnose.dask_reduce import dask_collapse_metrics

        fused = dask_collapse_metrics(path, thresholds=thresholds, seed=seed)
        return {"schema": COLLAPSE_SCHEMA, "source": str(path), "modalities": {"fused": fused}, "pairs": {},
                "verdict": fused["verdict"], "epoch": None, "thresholds": vars_of(thresholds), "epochs": None}
    epochs = resolve_epochs(path)
    is_run = path.is_dir() and epochs[0][0] is not None
    if not (is_run and all_epochs):
        epochs = epochs[-1:]

    trajectory = []
    for epoch, epoch_path in epochs:
        embedding_set = load_embeddings(epoch_path, epoch=epoch)
        measured = measure_collapse(
            embedding_set, modalities=modalities, thresholds=thresholds, chunk_rows=chunk_rows, seed=seed,
            on_rows=on_rows,
        )
        trajectory.append({"epoch": embedding_set.epoch, **measured})

    last = trajectory[-1]
    document = {
        "schema": COLLAPSE_SCHEMA,
        "source": str(path),
        "modalities": last["modalities"],
        "pairs": last["pairs"],
        "verdict": last["verdict"],
        "epoch": last["epoch"],
        "thresholds": vars_of(thresholds),
        "epochs": None,
    }
    if is_run and all_epochs:
        document["epochs"] = [
            {"epoch": entry["epoch"], "modalities": entry["modalities"], "pairs": entry["pairs"],
             "verdict": entry["verdict"]}
            for entry in trajectory
        ]
        first, healthy_since = collapse_course([(entry["epoch"], entry["verdict"]) for entry in trajectory])
        document["first_collapsed_epoch"] = first
        document["healthy_since_epoch"] = healthy_since
    return document


def measure_collapse(
    embedding_set: EmbeddingSet,
    *,
    modalities: list[str] | None = None,
    thresholds: VerdictThresholds = VerdictThresholds(),
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    seed: int = 0,
    on_rows: RowsCallback | None = None,
) -> dict:
    """Measure every requested modality of one embedding set; return modalities, pairs and verdict."""
    names = modalities or embedding_set.modalities
    missing = [name for name in names if name not in embedding_set.sources]
    if missing:
        raise InputError(
            f"{embedding_set.source}: no modality {missing[0]!r} (available: {', '.join(embedding_set.modalities)})"
        )

    results = {}
    for name in names:
        source = embedding_set.sources[name]
        pages = embedding_set.pages_for(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            label = f"{name}" if embedding_set.epoch is None else f"epoch {embedding_set.epoch} {name}"
            # Text-only embeddings of panels without text all encode the empty string: leave them out.
            keep = embedding_set.has_text if name == "text" and embedding_set.text_item is None else None
            if keep is not None and keep.sum() < 2:
                raise InputError(
                    f"{embedding_set.source}: only {int(keep.sum())} panel(s) have text; "
                    "the text modality needs at least 2 (measure other modalities with --modality)"
                )
            results[name] = _stream_collapse(source, pages, thresholds, chunk_rows, seed, on_rows, label, keep)
            if keep is not None:
                results[name]["rows_without_text_excluded"] = int((~keep).sum())
        if pages is not None and results[name]["groups"] is None:
            warnings.warn(
                f"{embedding_set.source}: no page holds two rows of {name!r}; intra-page cosine is undefined",
                stacklevel=2,
            )

    pairs = {}
    pair = _stream_pair(embedding_set, chunk_rows)
    if pair is not None:
        pairs["vision-text"] = pair

    if "fused" in results:
        overall = results["fused"]["verdict"]
    else:
        overall = worst_verdict([result["verdict"] for result in results.values()])
    return {"modalities": results, "pairs": pairs, "verdict": overall}


def _stream_collapse(
    source: ArraySource,
    pages: np.ndarray | None,
    thresholds: VerdictThresholds,
    chunk_rows: int,
    seed: int,
    on_rows: RowsCallback | None,
    label: str = "",
    keep: np.ndarray | None = None,
) -> dict:
    """Stream one matrix through a collapse accumulator; ``keep`` (a row mask) selects the rows measured."""
    kept_pages = pages if keep is None or pages is None else pages[keep]
    accumulator = CollapseAccumulator(
        source.dim, seed=seed, page_last_row=None if kept_pages is None else last_row_of_each_page(kept_pages)
    )
    for start, block in source.chunks(chunk_rows):
        block_pages = None if pages is None else pages[start: start + block.shape[0]]
        if keep is not None:
            block_keep = keep[start: start + block.shape[0]]
            block = block[block_keep]
            block_pages = None if block_pages is None else block_pages[block_keep]
        try:
            accumulator.update(block, block_pages)
        except NonFiniteRowError:
            raw = source.read(start, min(start + chunk_rows, source.rows))
            _check_finite(source, start, raw)
            raise InputError(
                f"{source.path}: array {source.name!r} has values whose squares overflow float32 "
                f"in rows {start} to {start + len(raw) - 1}; rescale the embeddings"
            ) from None
        if on_rows is not None:
            on_rows(label, start + block.shape[0], source.rows)
    if accumulator.needs_exact_gram():
        accumulator.refine_gram(
            block if keep is None else block[keep[start: start + block.shape[0]]]
            for start, block in source.chunks(chunk_rows)
        )
    return accumulator.result(thresholds)


def _check_finite(source: ArraySource, start: int, block: np.ndarray) -> None:
    finite_rows = np.isfinite(block).all(axis=1)
    if not finite_rows.all():
        first_bad = start + int(np.argmin(finite_rows))
        count = int((~finite_rows).sum())
        raise InputError(
            f"{source.path}: array {source.name!r} has NaN or infinite values in row {first_bad}"
            f"{f' and {count - 1} more row(s) of that chunk' if count > 1 else ''}"
        )


def _stream_pair(embedding_set: EmbeddingSet, chunk_rows: int) -> dict | None:
    """Modality gap and alignment over panels that have both an image and a text embedding."""
    if "vision" not in embedding_set.sources or "text" not in embedding_set.sources:
        return None
    vision = embedding_set.sources["vision"]
    text = embedding_set.sources["text"]
    if vision.dim != text.dim:
        return None
    accumulator = PairAccumulator(vision.dim)

    if embedding_set.vision_item is None and embedding_set.text_item is None:
        if vision.rows != text.rows:
            raise InputError(
                f"{embedding_set.source}: 'vision' has {vision.rows} rows and 'text' {text.rows}; "
                "give vision_item and text_item to pair sets of different sizes"
            )
        has_text = embedding_set.has_text
        for start in range(0, vision.rows, chunk_rows):
            stop = min(start + chunk_rows, vision.rows)
            vision_block = vision.read(start, stop)
            text_block = text.read(start, stop)
            if has_text is not None:
                keep = has_text[start:stop]
                vision_block, text_block = vision_block[keep], text_block[keep]
            if len(vision_block):
                accumulator.update(vision_block, text_block)
    else:
        # Several captions per image: pair every text row with the image row of the same item.
        vision_items = embedding_set.items_for("vision")
        text_items = embedding_set.items_for("text")
        if vision_items is None or text_items is None:
            raise InputError(f"{embedding_set.source}: needs both vision_item and text_item to pair the sets")
        row_of_item = {item: row for row, item in enumerate(vision_items.tolist())}
        vision_rows = np.array([row_of_item.get(item, -1) for item in text_items.tolist()], dtype=np.int64)
        paired = vision_rows >= 0
        vision_all = vision.read_all()
        text_all = text.read_all()
        if paired.any():
            accumulator.update(vision_all[vision_rows[paired]], text_all[paired])
    return accumulator.result()


def weight_diagnostics(checkpoint: dict) -> dict:
    """Effective rank of every 2-D weight matrix of a checkpoint's model (no embeddings needed).

    A weight matrix whose effective rank is far below min(rows, cols) maps inputs into few directions;
    it hints at, but does not prove, a collapsed representation.
    """
    state = checkpoint.get("model_state_dict") or {}
    matrices = {}
    for name, tensor in state.items():
        if getattr(tensor, "ndim", 0) != 2:
            continue
        values = tensor.detach().double().cpu().numpy()
        if not np.isfinite(values).all():
            matrices[name] = {"shape": list(values.shape), "effective_rank": math.nan,
                              "effective_rank_ratio": math.nan, "finite": False}
            continue
        singular_values = np.linalg.svd(values, compute_uv=False)
        rank = entropy_rank(singular_values)
        matrices[name] = {
            "shape": list(values.shape),
            "effective_rank": rank,
            "effective_rank_ratio": rank / min(values.shape),
            "top_singular_share": float(singular_values[0] / singular_values.sum()) if singular_values.sum() else 0.0,
            "finite": True,
        }
    return {"epoch": checkpoint.get("epoch"), "matrices": matrices}


def vars_of(thresholds: VerdictThresholds) -> dict:
    return {name: getattr(thresholds, name) for name in thresholds.__dataclass_fields__}


def _is_store(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


# --------------------------------------------------------------------------------------------------
# retrieval/1

RETRIEVAL_SCHEMA = "retrieval/1"

# Called as progress(label, queries done, queries in total), for progress display.
QueriesCallback = Callable[[str, int, int], None]


def retrieval_document(
    path: str | Path,
    *,
    query: str = "vision",
    gallery: str = "text",
    both_directions: bool = True,
    ks: list[int] | None = None,
    scopes: tuple[str, ...] = ("global", "page"),
    index: str = "flat",
    depth: int | None = None,
    index_params: dict | None = None,
    sample: int = 1000,
    seed: int = 0,
    device: str = "auto",
    all_epochs: bool = True,
    progress: QueriesCallback | None = None,
) -> dict:
    """Return the ``retrieval/1`` document of a run directory, checkpoint or embedding file.

    For a run directory with ``all_epochs`` every epoch is measured and listed under ``epochs``. The
    top-level ``directions`` are those of the last epoch. See :func:`diagnose.retrieval.bidirectional_retrieval`
    for the figures.
    """
    path = Path(path)
    epochs = resolve_epochs(path)
    is_run = path.is_dir() and epochs[0][0] is not None and not _is_store(path)
    if not (is_run and all_epochs):
        epochs = epochs[-1:]

    trajectory = []
    for epoch, epoch_path in epochs:
        embedding_set = load_embeddings(epoch_path, epoch=epoch)
        label = "" if embedding_set.epoch is None else f"epoch {embedding_set.epoch} "
        measured = measure_retrieval(
            embedding_set, query=query, gallery=gallery, both_directions=both_directions, ks=ks, scopes=scopes,
            index=index, depth=depth, index_params=index_params, sample=sample, seed=seed, device=device,
            progress=None if progress is None else lambda name, done, total: progress(label + name, done, total),
        )
        trajectory.append({"epoch": embedding_set.epoch, **measured})

    last = trajectory[-1]
    document = {"schema": RETRIEVAL_SCHEMA, "source": str(path), **last, "epochs": None}
    if is_run and all_epochs:
        document["epochs"] = [{"epoch": entry["epoch"], "directions": entry["directions"]} for entry in trajectory]
    return document


def measure_retrieval(embedding_set: EmbeddingSet, *, query: str = "vision", gallery: str = "text",
                      progress: QueriesCallback | None = None, **options) -> dict:
    """Rank ``query`` against ``gallery`` (and back) in one embedding set; return directions, excluded, index.

    Each modality is read in chunks straight into one L2-normalised float32 matrix. ``options`` are passed
    to :func:`diagnose.retrieval.bidirectional_retrieval`. Input errors name the file.
    """
    from diagnose.retrieval import bidirectional_retrieval

    for name in (query, gallery):
        if name not in embedding_set.sources:
            raise InputError(
                f"{embedding_set.source}: no modality {name!r} for retrieval "
                f"(available: {', '.join(embedding_set.modalities)})"
            )
    same_rows = embedding_set.vision_item is None and embedding_set.text_item is None
    try:
        vectors = [_normalized_matrix(embedding_set.sources[name]) for name in (query, gallery)]
        return bidirectional_retrieval(
            vectors[0], vectors[1],
            first_items=embedding_set.items_for(query), second_items=embedding_set.items_for(gallery),
            first_pages=embedding_set.pages_for(query), second_pages=embedding_set.pages_for(gallery),
            has_text=embedding_set.has_text if same_rows else None,
            names=(query, gallery), normalized=True, progress=progress, **options,
        )
    except InputError as error:
        message = str(error)
        if message.startswith(embedding_set.source):
            raise
        raise InputError(f"{embedding_set.source}: {message}") from None


def _normalized_matrix(source: ArraySource, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> np.ndarray:
    from diagnose.retrieval import normalize_rows

    matrix = np.empty(source.shape, dtype=np.float32)
    for start, block in source.chunks(chunk_rows):
        normalize_rows(block, source.name, out=matrix[start:start + len(block)], row_offset=start)
    return matrix


__all__ = [
    "COLLAPSE_SCHEMA",
    "CheckpointWithoutEmbeddings",
    "RETRIEVAL_SCHEMA",
    "collapse_document",
    "measure_collapse",
    "measure_retrieval",
    "retrieval_document",
    "weight_diagnostics",
]

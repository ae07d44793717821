"""Bidirectional retrieval between two embedding sets: recall@K, MRR and ranks, exact and bounded in memory.

Definitions (scores are cosine similarities of L2-normalised float32 vectors):

- The positives of a query are the gallery items with the query's pair id (``item``). A query may have
  several (several captions per image), and every query must have at least one.
- ``higher`` counts the gallery items that score strictly above the query's best-scoring positive. With no
  ties the rank of the query is ``1 + higher``.
- Ties: ``tied`` non-positives and ``tied_positives`` positives score exactly the best positive score. The
  tied items are taken in uniformly random order, and every figure is the exact expectation over that
  order. The expected rank is ``1 + higher + tied / (tied_positives + 1)``, recall@K is the probability
  that the rank is at most K, and the reciprocal rank is E[1 / rank]. Ties therefore neither count fully
  against a query nor in its favour, and a collapsed model (every vector identical) scores exactly at
  chance: recall@1 = 1 / gallery size with one positive per query.
- recall@K is the mean over queries of P(rank <= K), MRR the mean of E[1 / rank], ``mean_rank`` and
  ``median_rank`` the mean and median of the expected ranks.
- ``global`` scope ranks each query against the whole gallery, ``page`` scope only against the gallery
  items of the query's own page. ``chance@1`` is the mean over queries of 1 / (gallery size seen by the
  query), and ``random_recall@1`` the mean of (positives / gallery size), the recall@1 of a random ranking.

Exact search is tiled over queries: each tile is one matrix product ``tile @ gallery.T`` followed by
vectorised comparisons against each query's best positive score, so memory is O(tile x gallery), never
O(queries x gallery). A query is always compared with scores from its own product, so its positive never
counts against it. BLAS may round the same dot product differently in different columns of one product,
which would break ties between identical gallery vectors, so each duplicate column takes the score of the
first bitwise-identical gallery row before comparing.

Approximate search ranks each query among a subset of the gallery. ``index="hnsw"`` (FAISS HNSW) and
``"ivf"`` on a GPU (FAISS IVF-Flat) return the top ``depth`` items per query. ``"ivf"`` on the CPU ranks
each query among all items of the inverted lists it probes. A query whose positives are all missing from
its subset is censored (its rank is unknown), so recall@K is exact with respect to the index (for
K <= depth), MRR is a lower bound, and the mean rank is unknown. The loss of recall against exact search
is measured on a seeded sample of queries.

Nothing here reads files or prints. Invalid input raises :class:`diagnose.io.InputError` with a one-line
message, and callers add the file name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from diagnose.io import InputError

INDEXES = ("flat", "hnsw", "ivf")
SCOPES = ("global", "page")
DEVICES = ("auto", "cpu", "gpu")
CONTRACT_KS = (1, 5, 10)
DEFAULT_DEPTH = 100
DEFAULT_SAMPLE = 1000
# Memory for one tile of scores. The tile height follows from the gallery size.
DEFAULT_TILE_BYTES = 256 * 2**20
MIN_TILE_ROWS = 8
MAX_TILE_ROWS = 4096
NORMALIZE_CHUNK_ROWS = 8192
# FAISS GPU indexes (without cuVS) return at most 2048 neighbours per query and probe at most 2048 lists,
# the k-selection limit since FAISS 1.5.1.
GPU_MAX_DEPTH = 2048
DEFAULT_NPROBE = 16
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 80
DEFAULT_EF_SEARCH = 128
# (query, probed list) pairs scored per batch in CPU IVF search.
IVF_PAIRS_PER_BATCH = 2**22

# Called as progress(label, done, total) with counts of queries ranked so far.
ProgressCallback = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------------
# Per-query counts and the expectations over tied orders


@dataclass(frozen=True)
class RankCounts:
    """Per-query counts from which every retrieval figure follows (int64 arrays, one entry per query)."""

    higher: np.ndarray
    tied: np.ndarray
    tied_positives: np.ndarray
    n_positives: np.ndarray
    gallery_size: np.ndarray
    # Approximate search only: True where no positive came back within ``depth`` results.
    censored: np.ndarray | None = None
    depth: int | None = None

    def __len__(self) -> int:
        return len(self.higher)

    def subset(self, rows: np.ndarray) -> "RankCounts":
        """Counts of the queries at positions ``rows``."""
        return replace(
            self,
            higher=self.higher[rows],
            tied=self.tied[rows],
            tied_positives=self.tied_positives[rows],
            n_positives=self.n_positives[rows],
            gallery_size=self.gallery_size[rows],
            censored=None if self.censored is None else self.censored[rows],
        )

    def _censored(self) -> np.ndarray:
        return np.zeros(len(self), bool) if self.censored is None else self.censored

    def expected_rank(self) -> np.ndarray:
        """Expected rank of each query under random order of ties (infinite for censored queries)."""
        ranks = 1.0 + self.higher + self.tied / (self.tied_positives + 1.0)
        ranks[self._censored()] = np.inf
        return ranks

    def recall_at(self, k: int) -> np.ndarray:
        """Probability that each query's rank is at most ``k`` (0 for censored queries, exact when k <= depth)."""
        recall = (1 + self.higher <= k).astype(np.float64)
        for members, distribution in self._tie_groups():
            cumulative = np.cumsum(distribution)
            allowed = k - 1 - self.higher[members]
            inside = cumulative[np.clip(allowed, 0, len(distribution) - 1)]
            recall[members] = np.where(allowed < 0, 0.0, inside)
        recall[self._censored()] = 0.0
        return recall

    def reciprocal_rank(self) -> np.ndarray:
        """E[1 / rank] of each query. Censored queries count 0, which makes the mean a lower bound."""
        reciprocal = 1.0 / (1.0 + self.higher)
        for members, distribution in self._tie_groups():
            offsets = np.arange(len(distribution), dtype=np.float64)
            distinct_higher, position = np.unique(self.higher[members], return_inverse=True)
            values = np.empty(len(distinct_higher))
            step = max(1, 2**22 // len(distribution))
            for start in range(0, len(distinct_higher), step):
                block = distinct_higher[start:start + step, None]
                values[start:start + step] = (distribution / (1.0 + block + offsets)).sum(axis=1)
            reciprocal[members] = values[position.ravel()]
        reciprocal[self._censored()] = 0.0
        return reciprocal

    def _tie_groups(self):
        """Yield (query positions, distribution of non-positives before the first positive) per tie shape."""
        rows = np.flatnonzero((self.tied > 0) & ~self._censored())
        if rows.size == 0:
            return
        shapes = np.stack([self.tied[rows], self.tied_positives[rows]], axis=1)
        distinct, group = np.unique(shapes, axis=0, return_inverse=True)
        group = group.ravel()
        order = np.argsort(group, kind="stable")
        bounds = np.searchsorted(group[order], np.arange(len(distinct) + 1))
        for index, (tied, tied_positives) in enumerate(distinct):
            members = rows[order[bounds[index]:bounds[index + 1]]]
            yield members, offset_distribution(int(tied), int(tied_positives))


def offset_distribution(tied: int, tied_positives: int) -> np.ndarray:
    """Return P(X = j) for j = 0..tied, where X counts the non-positives placed before the first positive.

    ``tied`` non-positives and ``tied_positives`` positives are shuffled uniformly. With n = tied +
    tied_positives, P(X = j) = C(n - 1 - j, tied_positives - 1) / C(n, tied_positives), computed as a
    running product of ratios so that large ties neither overflow nor lose precision.
    """
    total = tied + tied_positives
    offsets = np.arange(tied, dtype=np.float64)
    ratios = (tied - offsets) / (total - 1.0 - offsets)
    distribution = np.empty(tied + 1)
    distribution[0] = tied_positives / total
    distribution[1:] = distribution[0] * np.cumprod(ratios)
    return distribution


def retrieval_metrics(ranks: RankCounts, ks: Sequence[int] = CONTRACT_KS) -> dict:
    """Summarise per-query counts as the retrieval/1 metrics dict (recall@1, 5 and 10 always included).

    ``gallery_size`` is an integer when every query saw the same gallery (global scope) and the mean
    over queries otherwise (page scope). ``tied_queries`` counts queries with a tie at their best
    positive, and ``trivial_queries`` those whose gallery contains only positives (rank 1 by construction).
    """
    ks = sorted(set(CONTRACT_KS) | {int(k) for k in ks})
    n_queries = len(ranks)
    censored = ranks._censored()
    expected = ranks.expected_rank()
    sizes = ranks.gallery_size

    metrics: dict = {
        "n_queries": n_queries,
        "gallery_size": int(sizes[0]) if np.all(sizes == sizes[0]) else float(sizes.mean()),
    }
    for k in ks:
        metrics[f"recall@{k}"] = float(ranks.recall_at(k).mean())
    metrics["mrr"] = float(ranks.reciprocal_rank().mean())
    median = float(np.median(expected))
    metrics["median_rank"] = median if math.isfinite(median) else None
    metrics["mean_rank"] = None if censored.any() else float(expected.mean())
    metrics["chance@1"] = float(np.mean(1.0 / sizes))
    metrics["random_recall@1"] = float(np.mean(ranks.n_positives / sizes))
    metrics["tied_queries"] = int(np.count_nonzero(ranks.tied[~censored]))
    metrics["trivial_queries"] = int(np.count_nonzero(ranks.n_positives == sizes))
    if ranks.censored is not None:
        metrics["censored"] = int(np.count_nonzero(censored))
        metrics["mrr_lower_bound"] = True
    if ranks.depth is not None:
        metrics["search_depth"] = ranks.depth
    return metrics


# --------------------------------------------------------------------------------------------------
# Input preparation


def normalize_rows(
    matrix: np.ndarray, name: str = "embeddings", *, out: np.ndarray | None = None, row_offset: int = 0
) -> np.ndarray:
    """Return the rows of ``matrix`` scaled to unit L2 norm as C-ordered float32 (zero rows stay zero).

    ``out`` receives the result when given (a block of a larger buffer), and ``row_offset`` is added to
    row numbers in error messages. Raises :class:`InputError` when ``matrix`` is not a non-empty 2-D
    matrix or contains NaN or infinite values. Norms are computed in float64, so large values do not
    overflow, and the result holds no negative zeros, so bitwise-equal rows are exactly the equal ones.
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2:
        raise InputError(f"{name} must be a 2-D [N, D] matrix, got shape {tuple(matrix.shape)}")
    if matrix.shape[1] == 0:
        raise InputError(f"{name} has no columns")
    if matrix.dtype.kind not in "fiu":
        raise InputError(f"{name} has dtype {matrix.dtype}, but embeddings must be numeric")
    if out is None:
        out = np.empty(matrix.shape, dtype=np.float32)
    elif out.shape != matrix.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {matrix.shape}, got {out.dtype} {out.shape}")

    for start in range(0, len(matrix), NORMALIZE_CHUNK_ROWS):
        block = np.asarray(matrix[start:start + NORMALIZE_CHUNK_ROWS], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise InputError(
                f"{name} row {row_offset + start + bad[0]} contains NaN or infinite values "
                f"({bad.size} such rows in rows {row_offset + start}-{row_offset + start + len(block) - 1})"
            )
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        np.divide(block, np.maximum(norms, np.finfo(np.float64).tiny)[:, None], out=block)
        target = out[start:start + len(block)]
        target[...] = block
        target += 0.0  # turns -0.0 into +0.0
    return out


def first_occurrence(matrix: np.ndarray) -> np.ndarray:
    """Return, for every row, the index of the first row that is bitwise identical to it.

    Rows are hashed (a random linear hash of their bits, modulo 2**64) and rows with equal hashes are
    compared exactly, so the result is exact.
    """
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n_rows, dim = matrix.shape
    bits = matrix.view(np.uint32)
    multipliers = np.random.default_rng(20_240_917).integers(1, 2**63, size=dim, dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(n_rows, dtype=np.uint64)
    for start in range(0, n_rows, NORMALIZE_CHUNK_ROWS):
        block = bits[start:start + NORMALIZE_CHUNK_ROWS].astype(np.uint64)
        hashes[start:start + len(block)] = (block * multipliers).sum(axis=1, dtype=np.uint64)

    first = np.arange(n_rows, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    bounds = np.flatnonzero(np.diff(sorted_hashes)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [n_rows]])
    for start, stop in zip(starts[stops - starts > 1], stops[stops - starts > 1]):
        group = order[start:stop]  # ascending row numbers, because the sort is stable
        rows = matrix[group]
        if np.array_equal(rows, np.broadcast_to(rows[0], rows.shape)):
            first[group] = group[0]
            continue
        _, first_in_group, inverse = np.unique(rows, axis=0, return_index=True, return_inverse=True)
        first[group] = group[first_in_group[inverse.ravel()]]
    return first


def _validate_ids(ids, length: int, name: str, rows_name: str) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {tuple(ids.shape)}")
    if len(ids) != length:
        raise InputError(f"{name} has {len(ids)} entries but {rows_name} has {length} rows")
    if ids.dtype.kind not in "iub":
        raise InputError(f"{name} must hold integer ids, got dtype {ids.dtype}")
    return ids.astype(np.int64, copy=False)


def _validate_ks(ks: Sequence[int] | None) -> list[int]:
    if ks is None:
        return list(CONTRACT_KS)
    values = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"recall cut-off K must be a positive integer, got {k!r}")
        values.append(int(k))
    if not values:
        raise InputError("at least one recall cut-off K is needed")
    return sorted(set(values))


def _auto_tile(gallery_rows: int, tile_bytes: int = DEFAULT_TILE_BYTES) -> int:
    rows = tile_bytes // (4 * max(gallery_rows, 1))
    return int(min(MAX_TILE_ROWS, max(MIN_TILE_ROWS, rows)))


class _PositiveLookup:
    """Gallery rows grouped by pair id, to find the positives of any query."""

    def __init__(self, gallery_items: np.ndarray):
        self.order = np.argsort(gallery_items, kind="stable")
        self.sorted_items = gallery_items[self.order]

    def locate(self, query_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return, per query, the start of its positives in ``order`` and their count."""
        starts = np.searchsorted(self.sorted_items, query_items, side="left")
        stops = np.searchsorted(self.sorted_items, query_items, side="right")
        return starts, stops - starts

    def columns(self, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the gallery rows of the given queries' positives, flattened, and each query's offset."""
        offsets = np.zeros(len(counts), dtype=np.int64)
        np.cumsum(counts[:-1], out=offsets[1:])
        within = np.arange(int(counts.sum())) - np.repeat(offsets, counts)
        return self.order[np.repeat(starts, counts) + within], offsets


def _require_partners(counts: np.ndarray, query_items: np.ndarray, query_name: str, gallery_name: str,
                      where: str = "") -> None:
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        first = int(missing[0])
        raise InputError(
            f"{missing.size} of {len(counts)} {query_name} rows have no {gallery_name} row with the same "
            f"item id{where} (first: {query_name} row {first}, item {int(query_items[first])}), so check the "
            "item id arrays"
        )


# --------------------------------------------------------------------------------------------------
# Exact search: global scope


def _cpu_scorer(gallery: np.ndarray):
    def score(queries: np.ndarray, out: np.ndarray) -> None:
        np.matmul(queries, gallery.T, out=out)

    return score


def _gpu_scorer(gallery: np.ndarray):
    """Score tiles on the GPU with FAISS. The counting stays on the host."""
    # NOTE: this path needs a FAISS GPU build and has not run in the test suite, which has no GPU.
    import faiss

    resources = faiss.StandardGpuResources()

    def score(queries: np.ndarray, out: np.ndarray) -> None:
        faiss.pairwise_distance_gpu(resources, queries, gallery, D=out, metric=faiss.METRIC_INNER_PRODUCT)

    return score


def _exact_counts(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_items: np.ndarray,
    lookup: _PositiveLookup,
    first: np.ndarray,
    *,
    tile: int | None,
    scorer,
    progress: ProgressCallback | None,
    label: str,
) -> RankCounts:
    """Rank normalised ``queries`` against the whole normalised ``gallery``, one tile of queries at a time."""
    n_queries, n_gallery = len(queries), len(gallery)
    starts, counts = lookup.locate(query_items)
    rows = min(tile or _auto_tile(n_gallery), n_queries)
    scores = np.empty((rows, n_gallery), dtype=np.float32)
    flags = np.empty((rows, n_gallery), dtype=bool)
    duplicate_columns = np.flatnonzero(first != np.arange(n_gallery))
    source_columns = first[duplicate_columns]

    higher = np.empty(n_queries, dtype=np.int64)
    tied = np.empty(n_queries, dtype=np.int64)
    tied_positives = np.empty(n_queries, dtype=np.int64)
    for start in range(0, n_queries, rows):
        stop = min(start + rows, n_queries)
        block, block_flags = scores[:stop - start], flags[:stop - start]
        scorer(queries[start:stop], block)
        if duplicate_columns.size:
            block[:, duplicate_columns] = block[:, source_columns]

        # Best positive score per query, read from the same product as the scores it is compared with.
        block_counts = counts[start:stop]
        columns, offsets = lookup.columns(starts[start:stop], block_counts)
        owner = np.repeat(np.arange(stop - start), block_counts)
        positive_scores = block[owner, columns]
        best = np.maximum.reduceat(positive_scores, offsets)
        at_best = (positive_scores == best[owner]).astype(np.int64)
        tied_positives[start:stop] = np.add.reduceat(at_best, offsets)

        # Row-wise count_nonzero on contiguous rows is several times faster than a sum over axis 1.
        np.greater(block, best[:, None], out=block_flags)
        higher[start:stop] = [np.count_nonzero(row) for row in block_flags]
        np.equal(block, best[:, None], out=block_flags)
        equal = np.array([np.count_nonzero(row) for row in block_flags], dtype=np.int64)
        tied[start:stop] = equal - tied_positives[start:stop]
        if progress is not None:
            progress(label, stop, n_queries)

    return RankCounts(
        higher=higher,
        tied=tied,
        tied_positives=tied_positives,
        n_positives=counts.astype(np.int64),
        gallery_size=np.full(n_queries, n_gallery, dtype=np.int64),
    )


# --------------------------------------------------------------------------------------------------
# Exact search: page scope


def _page_counts(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_items: np.ndarray,
    gallery_items: np.ndarray,
    query_pages: np.ndarray,
    gallery_pages: np.ndarray,
    first: np.ndarray,
    *,
    names: tuple[str, str],
    tile_bytes: int,
    progress: ProgressCallback | None,
    label: str,
) -> RankCounts:
    """Rank each query only against the gallery items of its own page.

    Pages are grouped by their (queries, gallery items) shape so that each group is one batched matrix
    product of [pages, queries, D] by [pages, D, gallery items].
    """
    n_queries, dim = queries.shape
    _require_partners_on_page(query_items, gallery_items, query_pages, gallery_pages, names)
    query_order = np.argsort(query_pages, kind="stable")
    gallery_order = np.argsort(gallery_pages, kind="stable")
    query_page_ids, query_starts, query_sizes = np.unique(
        query_pages[query_order], return_index=True, return_counts=True
    )
    gallery_page_ids, gallery_starts, gallery_sizes = np.unique(
        gallery_pages[gallery_order], return_index=True, return_counts=True
    )

    # Every query page has gallery rows, because every query has a partner on its page.
    match = np.searchsorted(gallery_page_ids, query_page_ids)
    page_gallery_starts = gallery_starts[match]
    page_gallery_sizes = gallery_sizes[match]

    higher = np.empty(n_queries, dtype=np.int64)
    tied = np.empty(n_queries, dtype=np.int64)
    tied_positives = np.empty(n_queries, dtype=np.int64)
    n_positives = np.empty(n_queries, dtype=np.int64)
    gallery_size = np.empty(n_queries, dtype=np.int64)

    shapes = np.stack([query_sizes, page_gallery_sizes], axis=1)
    distinct_shapes, shape_of_page = np.unique(shapes, axis=0, return_inverse=True)
    shape_of_page = shape_of_page.ravel()
    pages_by_shape = np.argsort(shape_of_page, kind="stable")
    bounds = np.searchsorted(shape_of_page[pages_by_shape], np.arange(len(distinct_shapes) + 1))
    done = 0
    for shape_index, (page_queries, page_gallery) in enumerate(distinct_shapes):
        pages = pages_by_shape[bounds[shape_index]:bounds[shape_index + 1]]
        per_page_bytes = 4 * (page_queries + page_gallery) * dim + 16 * page_queries * page_gallery
        per_page_bytes += page_gallery * page_gallery
        batch = max(1, tile_bytes // int(per_page_bytes))
        for batch_start in range(0, len(pages), batch):
            chunk = pages[batch_start:batch_start + batch]
            query_rows = query_order[query_starts[chunk][:, None] + np.arange(page_queries)]
            gallery_rows = gallery_order[page_gallery_starts[chunk][:, None] + np.arange(page_gallery)]
            scores = np.matmul(queries[query_rows], gallery[gallery_rows].transpose(0, 2, 1))

            # Identical gallery vectors on one page take the score of the first of them.
            vector_ids = first[gallery_rows]
            first_column = np.argmax(vector_ids[:, :, None] == vector_ids[:, None, :], axis=2)
            scores = np.take_along_axis(scores, np.broadcast_to(first_column[:, None, :], scores.shape), axis=2)

            positive = query_items[query_rows][:, :, None] == gallery_items[gallery_rows][:, None, :]
            positives_per_query = positive.sum(axis=2)
            best = np.where(positive, scores, -np.inf).max(axis=2)
            equal = scores == best[:, :, None]
            at_best_positive = (equal & positive).sum(axis=2)

            higher[query_rows] = (scores > best[:, :, None]).sum(axis=2)
            tied_positives[query_rows] = at_best_positive
            tied[query_rows] = equal.sum(axis=2) - at_best_positive
            n_positives[query_rows] = positives_per_query
            gallery_size[query_rows] = page_gallery
            done += query_rows.size
            if progress is not None:
                progress(label, done, n_queries)

    return RankCounts(
        higher=higher, tied=tied, tied_positives=tied_positives, n_positives=n_positives,
        gallery_size=gallery_size,
    )


def _require_partners_on_page(query_items: np.ndarray, gallery_items: np.ndarray, query_pages: np.ndarray,
                              gallery_pages: np.ndarray, names: tuple[str, str]) -> None:
    """Raise InputError unless every query has a gallery row with its item id on its own page."""
    pair = np.dtype([("page", np.int64), ("item", np.int64)])
    gallery_keys = np.empty(len(gallery_items), dtype=pair)
    gallery_keys["page"], gallery_keys["item"] = gallery_pages, gallery_items
    gallery_keys = np.unique(gallery_keys)
    query_keys = np.empty(len(query_items), dtype=pair)
    query_keys["page"], query_keys["item"] = query_pages, query_items
    where = np.minimum(np.searchsorted(gallery_keys, query_keys), len(gallery_keys) - 1)
    missing = np.flatnonzero(gallery_keys[where] != query_keys)
    if missing.size:
        row = int(missing[0])
        raise InputError(
            f"{missing.size} of {len(query_items)} {names[0]} rows have no {names[1]} row with the same item id "
            f"on their page (first: {names[0]} row {row}, item {int(query_items[row])}, page "
            f"{int(query_pages[row])}), but page-scope retrieval needs each pair on one page"
        )


# --------------------------------------------------------------------------------------------------
# Approximate search (FAISS)


def _faiss_gpu_count() -> int:
    import faiss

    counter = getattr(faiss, "get_num_gpus", None)
    return int(counter()) if counter is not None else 0


def _default_nlist(n_gallery: int) -> int:
    # About 2 sqrt(N) lists, but at least 40 training points per list (FAISS k-means warns below 39).
    return int(max(1, min(round(2 * math.sqrt(n_gallery)), n_gallery // 40)))


def build_index(gallery: np.ndarray, kind: str, *, depth: int, params: dict | None = None, use_gpu: bool = False,
                seed: int = 0) -> tuple[object, dict]:
    """Build a FAISS inner-product index of kind ``"ivf"`` (IVF-Flat) or ``"hnsw"`` over normalised rows.

    Returns the index and a description of it (kind, parameters, device, note). ``params`` may set
    ``nlist``, ``nprobe`` and ``train_rows`` (IVF, by default about 2 sqrt(N) lists, 16 probes and 40
    training rows per list) or ``m``,
    ``ef_construction`` and ``ef_search`` (HNSW, by default 32, 80 and max(128, depth)). HNSW has no FAISS
    GPU implementation, so it is always built and searched on the CPU.
    """
    import faiss

    params = dict(params or {})
    n_gallery, dim = gallery.shape
    info: dict = {"kind": kind, "exact": False, "device": "cpu", "note": None}
    if kind == "ivf":
        nlist = int(params.get("nlist") or _default_nlist(n_gallery))
        if nlist > n_gallery:
            raise InputError(f"IVF needs at most one list per gallery row, but nlist is {nlist} for {n_gallery} rows")
        nprobe = int(min(params.get("nprobe") or DEFAULT_NPROBE, nlist, GPU_MAX_DEPTH if use_gpu else nlist))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        if use_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
            info["device"] = "gpu"
        rng = np.random.default_rng(seed)
        train_rows = int(min(n_gallery, params.get("train_rows") or 40 * nlist))
        sample = gallery[np.sort(rng.choice(n_gallery, size=train_rows, replace=False))]
        index.train(sample)
        index.add(gallery)
        index.nprobe = nprobe
        info["parameters"] = {"nlist": nlist, "nprobe": nprobe, "train_rows": train_rows}
    elif kind == "hnsw":
        m = int(params.get("m") or DEFAULT_HNSW_M)
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params.get("ef_construction") or DEFAULT_EF_CONSTRUCTION)
        index.hnsw.efSearch = int(max(params.get("ef_search") or DEFAULT_EF_SEARCH, depth))
        index.add(gallery)
        info["parameters"] = {
            "m": m, "ef_construction": int(index.hnsw.efConstruction), "ef_search": int(index.hnsw.efSearch),
        }
        if use_gpu:
            info["note"] = "FAISS has no GPU HNSW index, so it was built and searched on the CPU"
    else:
        raise InputError(f"unknown approximate index {kind!r} (expected 'ivf' or 'hnsw')")
    return index, info


def _row_dots(queries: np.ndarray, query_rows: np.ndarray, gallery: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray:
    """Return queries[query_rows[i]] . gallery[gallery_rows[i]] for every i, in chunks of bounded memory."""
    dots = np.empty(len(query_rows), dtype=np.float32)
    step = max(1, DEFAULT_TILE_BYTES // (8 * queries.shape[1]))
    for start in range(0, len(query_rows), step):
        stop = start + step
        dots[start:stop] = np.einsum(
            "ij,ij->i", queries[query_rows[start:stop]], gallery[gallery_rows[start:stop]]
        )
    return dots


def _ivf_counts(
    queries: np.ndarray,
    query_items: np.ndarray,
    gallery: np.ndarray,
    gallery_items: np.ndarray,
    lookup: _PositiveLookup,
    first: np.ndarray,
    *,
    params: dict | None,
    seed: int,
    progress: ProgressCallback | None,
    label: str,
) -> tuple[RankCounts, dict]:
    """Rank each query among the gallery items of the inverted lists it probes (IVF), on the CPU.

    FAISS k-means (spherical, seeded) splits the gallery into ``nlist`` lists, and each query probes the
    ``nprobe`` lists with the nearest centroids: the candidates FAISS IndexIVFFlat would scan. Instead
    of scanning list by list per query, each list is scored against all queries that probe it with one
    matrix product, and the candidates above the best probed positive are counted. The rank is therefore
    complete within the candidates, and a query is censored only when none of its positives is in a
    probed list. Identical gallery vectors share one list, and copies of the best positive count as
    ties. Distinct vectors are compared at float32 resolution, so exact score ties between different
    vectors are not detected here.
    """
    import faiss

    params = dict(params or {})
    n_gallery, dim = gallery.shape
    nlist = int(params.get("nlist") or _default_nlist(n_gallery))
    nprobe = int(min(params.get("nprobe") or DEFAULT_NPROBE, nlist))
    train_rows = int(min(n_gallery, params.get("train_rows") or 40 * nlist))

    if nlist > n_gallery:
        raise InputError(f"IVF needs at most one list per gallery row, but nlist is {nlist} for {n_gallery} rows")

    # Lists: seeded spherical k-means on a sample, then every gallery row goes to its nearest centroid.
    centroids = faiss.IndexFlatIP(dim)
    if nlist == 1:
        centroids.add(np.ones((1, dim), dtype=np.float32))  # one list holds everything; no k-means needed
    else:
        rng = np.random.default_rng(seed)
        sample = gallery[np.sort(rng.choice(n_gallery, size=train_rows, replace=False))]
        kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True, verbose=False)
        kmeans.train(sample)
        centroids.add(kmeans.centroids)
    assignment = np.empty(n_gallery, dtype=np.int64)
    for start in range(0, n_gallery, 65_536):
        assignment[start:start + 65_536] = centroids.search(gallery[start:start + 65_536], 1)[1][:, 0]
    assignment = assignment[first]  # copies follow their first row, whatever the rounding
    list_order = np.argsort(assignment, kind="stable")
    list_bounds = np.searchsorted(assignment[list_order], np.arange(nlist + 1))
    copies = np.bincount(first, minlength=n_gallery)

    n_queries = len(queries)
    higher = np.zeros(n_queries, dtype=np.int64)
    tied = np.zeros(n_queries, dtype=np.int64)
    tied_positives = np.ones(n_queries, dtype=np.int64)
    censored = np.zeros(n_queries, dtype=bool)
    batch = max(1, IVF_PAIRS_PER_BATCH // nprobe)
    for start in range(0, n_queries, batch):
        stop = min(start + batch, n_queries)
        block, items = queries[start:stop], query_items[start:stop]
        probes = centroids.search(block, nprobe)[1]

        # Best positive among the probed lists, and which vector it is.
        positive_starts, positive_counts = lookup.locate(items)
        columns, offsets = lookup.columns(positive_starts, positive_counts)
        owner = np.repeat(np.arange(stop - start), positive_counts)
        probed = (probes[owner] == assignment[columns][:, None]).any(axis=1)
        scores = np.where(probed, _row_dots(block, owner, gallery, columns), -np.inf)
        best = np.maximum.reduceat(scores, offsets)
        found = best > -np.inf
        at_best = np.where(scores == best[owner], np.arange(len(columns)), len(columns) - 1)
        best_vector = first[columns[np.minimum.reduceat(at_best, offsets)]]
        identical_positive = probed & (first[columns] == best_vector[owner])
        block_tied_positives = np.add.reduceat(identical_positive.astype(np.int64), offsets)

        # Count, list by list, the candidates above the best positive (positives and copies excluded).
        pair_query = np.repeat(np.arange(stop - start), nprobe)
        pair_list = probes.ravel()
        keep = found[pair_query] & (pair_list >= 0)
        pair_query, pair_list = pair_query[keep], pair_list[keep]
        order = np.argsort(pair_list, kind="stable")
        sorted_lists = pair_list[order]
        cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_lists)) + 1, [len(order)]])
        pair_higher = np.zeros(len(order), dtype=np.float64)
        for cut_start, cut_stop in zip(cuts[:-1], cuts[1:]):
            list_id = sorted_lists[cut_start] if cut_stop > cut_start else -1
            members = list_order[list_bounds[list_id]:list_bounds[list_id + 1]] if list_id >= 0 else []
            if len(members) == 0:
                continue
            pairs = order[cut_start:cut_stop]
            rows = pair_query[pairs]
            above = block[rows] @ gallery[members].T > best[rows, None]
            above &= gallery_items[members][None, :] != items[rows][:, None]
            above &= first[members][None, :] != best_vector[rows][:, None]
            pair_higher[pairs] = np.count_nonzero(above, axis=1)

        higher[start:stop] = np.rint(np.bincount(pair_query, weights=pair_higher, minlength=stop - start))
        tied_positives[start:stop] = np.where(found, block_tied_positives, 1)
        tied[start:stop] = np.where(found, copies[best_vector] - block_tied_positives, 0)
        censored[start:stop] = ~found
        if progress is not None:
            progress(label, stop, n_queries)

    ranks = RankCounts(
        higher=higher, tied=tied, tied_positives=tied_positives,
        n_positives=lookup.locate(query_items)[1].astype(np.int64),
        gallery_size=np.full(n_queries, n_gallery, dtype=np.int64), censored=censored,
    )
    return ranks, {"nlist": nlist, "nprobe": nprobe, "train_rows": train_rows}


def _approximate_counts(
    queries: np.ndarray,
    index,
    query_items: np.ndarray,
    gallery_items: np.ndarray,
    lookup: _PositiveLookup,
    first: np.ndarray,
    *,
    depth: int,
    progress: ProgressCallback | None,
    label: str,
) -> RankCounts:
    """Rank queries from the top-``depth`` list of an approximate index.

    Queries without a positive in that list are censored. Ties are counted within the list only.
    """
    n_queries, n_gallery = len(queries), len(gallery_items)
    _, n_positives = lookup.locate(query_items)
    has_duplicates = bool((first != np.arange(n_gallery)).any())
    per_query_bytes = depth * (32 + (depth if has_duplicates else 0))
    rows = int(max(1, min(65_536, DEFAULT_TILE_BYTES // per_query_bytes)))

    higher = np.zeros(n_queries, dtype=np.int64)
    tied = np.zeros(n_queries, dtype=np.int64)
    tied_positives = np.ones(n_queries, dtype=np.int64)
    censored = np.zeros(n_queries, dtype=bool)
    for start in range(0, n_queries, rows):
        stop = min(start + rows, n_queries)
        scores, labels = index.search(queries[start:stop], depth)
        valid = labels >= 0
        labels = np.where(valid, labels, 0)
        if has_duplicates:
            # Missing entries get distinct negative ids so they never merge with a real vector.
            vector_ids = np.where(valid, first[labels], -1 - np.arange(depth))
            first_column = np.argmax(vector_ids[:, :, None] == vector_ids[:, None, :], axis=2)
            scores = np.take_along_axis(scores, first_column, axis=1)

        positive = valid & (gallery_items[labels] == query_items[start:stop, None])
        found = positive.any(axis=1)
        best = np.where(positive, scores, -np.inf).max(axis=1)
        equal = valid & (scores == best[:, None])
        at_best_positive = (equal & positive).sum(axis=1)
        higher[start:stop] = np.where(found, (valid & (scores > best[:, None])).sum(axis=1), 0)
        tied_positives[start:stop] = np.where(found, at_best_positive, 1)
        tied[start:stop] = np.where(found, equal.sum(axis=1) - at_best_positive, 0)
        censored[start:stop] = ~found
        if progress is not None:
            progress(label, stop, n_queries)

    return RankCounts(
        higher=higher, tied=tied, tied_positives=tied_positives, n_positives=n_positives.astype(np.int64),
        gallery_size=np.full(n_queries, n_gallery, dtype=np.int64), censored=censored, depth=depth,
    )


# --------------------------------------------------------------------------------------------------
# Public entry points


def _resolve_device(device: str) -> tuple[bool, str | None]:
    """Return (use the GPU, note) for a device request."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "cpu":
        return False, None
    gpus = _faiss_gpu_count()
    if gpus > 0:
        return True, None
    return False, "FAISS sees no GPU, so the search ran on the CPU"


@dataclass
class _Side:
    """One embedding set prepared for ranking: normalised rows, pair ids, pages, duplicate map."""

    name: str
    vectors: np.ndarray
    items: np.ndarray
    pages: np.ndarray | None
    _first: np.ndarray | None = None
    _lookup: _PositiveLookup | None = None

    @property
    def first(self) -> np.ndarray:
        if self._first is None:
            self._first = first_occurrence(self.vectors)
        return self._first

    @property
    def lookup(self) -> _PositiveLookup:
        if self._lookup is None:
            self._lookup = _PositiveLookup(self.items)
        return self._lookup


def _prepare_side(name: str, vectors, items, pages, normalized: bool) -> _Side:
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise InputError(f"{name} must be a 2-D [N, D] matrix, got shape {tuple(vectors.shape)}")
    if len(vectors) == 0:
        raise InputError(f"{name} is empty (0 rows), but retrieval needs at least one row on each side")
    if normalized:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    else:
        vectors = normalize_rows(vectors, name)
    items = _validate_ids(items, len(vectors), f"{name} item ids", name)
    if pages is not None:
        pages = _validate_ids(pages, len(vectors), f"{name} page ids", name)
    return _Side(name=name, vectors=vectors, items=items, pages=pages)


def retrieval_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    query_items: np.ndarray,
    gallery_items: np.ndarray,
    *,
    query_pages: np.ndarray | None = None,
    gallery_pages: np.ndarray | None = None,
    tile: int | None = None,
    index: str = "flat",
    depth: int = DEFAULT_DEPTH,
    index_params: dict | None = None,
    device: str = "auto",
    seed: int = 0,
    normalized: bool = False,
    names: tuple[str, str] = ("query", "gallery"),
    progress: ProgressCallback | None = None,
) -> RankCounts:
    """Rank every query against the gallery and return the per-query counts (see :class:`RankCounts`).

    With ``query_pages`` and ``gallery_pages`` each query is ranked only against its own page, always
    exactly. Otherwise it is ranked against the whole gallery, exactly with ``index="flat"`` or
    approximately with ``"ivf"`` or ``"hnsw"`` (see :func:`_approximate_ranks`). ``normalized=True`` skips the L2
    normalisation and its NaN check for rows the caller has already normalised with
    :func:`normalize_rows`. ``tile`` sets the number of query rows per matrix product (default: as many
    as fit in 256 MiB of scores).

    Examples
    --------
    >>> import numpy as np
    >>> vectors = np.eye(3, dtype=np.float32)
    >>> ranks = retrieval_ranks(vectors, vectors, np.arange(3), np.arange(3))
    >>> ranks.expected_rank().tolist()
    [1.0, 1.0, 1.0]
    """
    query_side = _prepare_side(names[0], queries, query_items, query_pages, normalized)
    gallery_side = _prepare_side(names[1], gallery, gallery_items, gallery_pages, normalized)
    _check_dimensions(query_side, gallery_side)
    if (query_side.pages is None) != (gallery_side.pages is None):
        raise InputError("page-scope retrieval needs page ids on both sides")
    if index not in INDEXES:
        raise InputError(f"unknown index {index!r} (expected one of {', '.join(INDEXES)})")
    use_gpu, _ = _resolve_device(device)
    if query_side.pages is not None:
        return _rank_pages(query_side, gallery_side, tile_bytes=DEFAULT_TILE_BYTES, progress=progress)
    if index == "flat":
        return _rank_exact(query_side, gallery_side, tile=tile, use_gpu=use_gpu, progress=progress)[0]
    _require_partners(gallery_side.lookup.locate(query_side.items)[1], query_side.items, names[0], names[1])
    ranks, _ = _approximate_ranks(
        query_side, gallery_side, index, depth=depth, ks=list(CONTRACT_KS), params=index_params, use_gpu=use_gpu,
        seed=seed, progress=progress,
    )
    return ranks


def _approximate_ranks(query_side: _Side, gallery_side: _Side, index: str, *, depth, ks: list[int], params,
                       use_gpu: bool, seed: int, progress) -> tuple[RankCounts, dict]:
    """Rank with an approximate index and return the counts and the index description.

    ``"ivf"`` on the CPU scores the probed lists with matrix products (:func:`_ivf_counts`), unless
    ``params["search"] == "faiss"``. HNSW, and IVF on a GPU, use FAISS top-``depth`` search.
    """
    label = f"{query_side.name}->{gallery_side.name} global"
    params = dict(params or {})
    search = params.pop("search", "lists")
    if search not in ("lists", "faiss"):
        raise InputError(f"unknown IVF search {search!r} (expected 'lists' or 'faiss')")
    if index == "ivf" and not use_gpu and search == "lists":
        ranks, parameters = _ivf_counts(
            query_side.vectors, query_side.items, gallery_side.vectors, gallery_side.items, gallery_side.lookup,
            gallery_side.first, params=params, seed=seed, progress=progress, label=label,
        )
        return ranks, {"kind": index, "device": "cpu", "note": None, "parameters": {**parameters, "search": "lists"}}

    depth = _validate_depth(depth, ks, len(gallery_side.vectors), use_gpu and index == "ivf")
    built, info = build_index(gallery_side.vectors, index, depth=depth, params=params, use_gpu=use_gpu, seed=seed)
    ranks = _approximate_counts(
        query_side.vectors, built, query_side.items, gallery_side.items, gallery_side.lookup, gallery_side.first,
        depth=depth, progress=progress, label=label,
    )
    if index == "ivf":
        info["parameters"]["search"] = "faiss"
    return ranks, info


def _check_dimensions(first: _Side, second: _Side) -> None:
    if first.vectors.shape[1] != second.vectors.shape[1]:
        raise InputError(
            f"{first.name} has dimension {first.vectors.shape[1]} but {second.name} has "
            f"{second.vectors.shape[1]}, but both sides must share one embedding space"
        )


def _validate_depth(depth: int | None, ks: list[int], n_gallery: int, on_gpu: bool) -> int:
    needed = max(max(ks), max(CONTRACT_KS))
    if depth is None:
        depth = max(DEFAULT_DEPTH, needed)
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise InputError(f"search depth must be a positive integer, got {depth!r}")
    depth = int(min(depth, n_gallery))
    if depth < min(needed, n_gallery):
        raise InputError(
            f"search depth {depth} is below the largest recall cut-off {needed}. Approximate search "
            f"returns only the top {depth} results, so raise the depth to at least {needed}"
        )
    if on_gpu and depth > GPU_MAX_DEPTH:
        raise InputError(f"search depth {depth} exceeds the FAISS GPU limit of {GPU_MAX_DEPTH}")
    return depth


def _rank_exact(query_side: _Side, gallery_side: _Side, *, tile, use_gpu: bool, progress) -> tuple[RankCounts, str | None]:
    """Rank queries exactly against the whole gallery and return the counts with a note if the GPU failed."""
    starts, counts = gallery_side.lookup.locate(query_side.items)
    _require_partners(counts, query_side.items, query_side.name, gallery_side.name)
    note = None
    scorer = _cpu_scorer(gallery_side.vectors)
    if use_gpu:
        try:
            scorer = _gpu_scorer(gallery_side.vectors)
        except (RuntimeError, AttributeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            note = f"FAISS GPU setup failed ({reason}), so the search ran on the CPU"
    ranks = _exact_counts(
        query_side.vectors, gallery_side.vectors, query_side.items, gallery_side.lookup, gallery_side.first,
        tile=tile, scorer=scorer, progress=progress, label=f"{query_side.name}->{gallery_side.name} global",
    )
    return ranks, note


def _rank_pages(query_side: _Side, gallery_side: _Side, *, tile_bytes: int, progress) -> RankCounts:
    return _page_counts(
        query_side.vectors, gallery_side.vectors, query_side.items, gallery_side.items,
        query_side.pages, gallery_side.pages, gallery_side.first,
        names=(query_side.name, gallery_side.name), tile_bytes=tile_bytes, progress=progress,
        label=f"{query_side.name}->{gallery_side.name} page",
    )


def bidirectional_retrieval(
    first: np.ndarray,
    second: np.ndarray,
    *,
    first_items: np.ndarray | None = None,
    second_items: np.ndarray | None = None,
    first_pages: np.ndarray | None = None,
    second_pages: np.ndarray | None = None,
    has_text: np.ndarray | None = None,
    names: tuple[str, str] = ("vision", "text"),
    both_directions: bool = True,
    ks: Sequence[int] | None = None,
    scopes: Sequence[str] = SCOPES,
    index: str = "flat",
    depth: int | None = None,
    index_params: dict | None = None,
    sample: int = DEFAULT_SAMPLE,
    seed: int = 0,
    tile: int | None = None,
    device: str = "auto",
    normalized: bool = False,
    progress: ProgressCallback | None = None,
) -> dict:
    """Measure retrieval from ``first`` to ``second`` and back, in global and page scope.

    Returns ``{"directions": {"A->B": {"global": M, "page": M | None}, ...}, "excluded": {...},
    "index": {...}}``, where M is the dict of :func:`retrieval_metrics`. Without item ids, row i of
    ``first`` pairs with row i of ``second``, and sets of different sizes need ``first_items`` and
    ``second_items``. ``has_text`` (equal-length sets only) leaves panels whose flag is 0 out of both
    sides, and ``excluded.no_text`` counts them. ``page`` is None when the page ids are missing or the
    page scope is not requested. ``ks`` adds recall cut-offs to recall@1, 5 and 10, and a requested K above
    the gallery size is an input error.

    With ``index="ivf"`` or ``"hnsw"`` the global scope is approximate (see :func:`_approximate_ranks`;
    ``depth`` defaults to max(100, largest K) where it applies). Each direction then reports
    ``approx_recall_loss``, exact minus approximate recall@K on a seeded sample of ``sample`` queries.
    Page scope is always exact.
    """
    if names[0] == names[1]:
        raise InputError(f"query and gallery modalities must differ, got {names[0]!r} twice")
    if index not in INDEXES:
        raise InputError(f"unknown index {index!r} (expected one of {', '.join(INDEXES)})")
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if unknown or not scopes:
        raise InputError(f"unknown scope {unknown[0] if unknown else '(none)'!r} (expected 'global', 'page' or both)")
    requested_ks = _validate_ks(ks)
    use_gpu, device_note = _resolve_device(device)

    first = np.asarray(first)
    second = np.asarray(second)
    for name, matrix in zip(names, (first, second)):
        if matrix.ndim != 2:
            raise InputError(f"{name} must be a 2-D [N, D] matrix, got shape {tuple(matrix.shape)}")
    if first_items is None and second_items is None:
        if len(first) != len(second):
            raise InputError(
                f"{names[0]} has {len(first)} rows and {names[1]} {len(second)}: sets of different sizes "
                f"need {names[0]}_item and {names[1]}_item pair ids"
            )
        first_items = second_items = np.arange(len(first))
    elif first_items is None or second_items is None:
        missing = names[0] if first_items is None else names[1]
        raise InputError(f"{missing} item ids are missing, so give pair ids for both sides or for neither")
    if (first_pages is None) != (second_pages is None):
        missing = names[0] if first_pages is None else names[1]
        raise InputError(f"{missing} page ids are missing, so give page ids for both sides or for neither")
    if first_pages is None and tuple(scopes) == ("page",):
        raise InputError(
            "page-scope retrieval needs page ids ('page', or 'vision_page' and 'text_page'), and there are "
            "none, so measure the global scope instead (--scope global)"
        )

    excluded = {"no_text": 0}
    if has_text is not None:
        first, second, first_items, second_items, first_pages, second_pages, dropped = _drop_without_text(
            has_text, names, first, second, first_items, second_items, first_pages, second_pages
        )
        excluded["no_text"] = dropped

    sides = (
        _prepare_side(names[0], first, first_items, first_pages, normalized),
        _prepare_side(names[1], second, second_items, second_pages, normalized),
    )
    _check_dimensions(*sides)
    for gallery_side in sides if both_directions else sides[1:]:
        if requested_ks[-1] > len(gallery_side.vectors) and ks is not None:
            raise InputError(
                f"recall@{requested_ks[-1]} needs at least {requested_ks[-1]} gallery items, but "
                f"{gallery_side.name} has {len(gallery_side.vectors)}"
            )

    pairs = [(sides[0], sides[1])] + ([(sides[1], sides[0])] if both_directions else [])
    index_info: dict = {"kind": index, "exact": index == "flat", "device": "gpu" if use_gpu else "cpu",
                        "note": device_note}
    notes = []
    if "page" in scopes and first_pages is None:
        notes.append("no page ids, so only the global scope was measured")
    directions = {}
    for query_side, gallery_side in pairs:
        entry = {"global": None, "page": None}
        if "global" in scopes:
            entry["global"], fallback_note = _global_metrics(
                query_side, gallery_side, requested_ks, index=index, depth=depth, index_params=index_params,
                sample=sample, seed=seed, tile=tile, use_gpu=use_gpu, progress=progress,
            )
            if fallback_note is not None:
                index_info.update(device="cpu", note=fallback_note)
        if "page" in scopes and query_side.pages is not None:
            ranks = _rank_pages(query_side, gallery_side, tile_bytes=DEFAULT_TILE_BYTES, progress=progress)
            entry["page"] = retrieval_metrics(ranks, requested_ks)
            entry["page"]["pages"] = int(len(np.unique(query_side.pages)))
        directions[f"{query_side.name}->{gallery_side.name}"] = entry
    return {"directions": directions, "excluded": excluded, "index": index_info, "notes": notes}


def _drop_without_text(has_text, names, first, second, first_items, second_items, first_pages, second_pages):
    has_text = np.asarray(has_text)
    if has_text.ndim != 1 or len(has_text) != len(first) or len(first) != len(second):
        raise InputError(
            f"has_text must be 1-D with one flag per panel ({names[0]} has {len(first)} rows, "
            f"{names[1]} {len(second)}), got shape {tuple(has_text.shape)}"
        )
    keep = has_text.astype(bool)
    dropped = int(len(keep) - np.count_nonzero(keep))
    if not keep.any():
        raise InputError(f"all {len(keep)} panels have has_text = 0, so there is no {names[1]} side to retrieve")
    if dropped == 0:
        return first, second, first_items, second_items, first_pages, second_pages, 0

    def kept(values):
        return None if values is None else np.asarray(values)[keep]

    return (first[keep], second[keep], kept(first_items), kept(second_items), kept(first_pages),
            kept(second_pages), dropped)


def _global_metrics(query_side: _Side, gallery_side: _Side, ks: list[int], *, index: str, depth, index_params,
                    sample: int, seed: int, tile, use_gpu: bool, progress) -> tuple[dict, str | None]:
    """Return the global-scope metrics of one direction and a note when the search fell back to the CPU."""
    if index == "flat":
        ranks, note = _rank_exact(query_side, gallery_side, tile=tile, use_gpu=use_gpu, progress=progress)
        metrics = retrieval_metrics(ranks, ks)
        metrics["index"] = "flat"
        return metrics, note

    _require_partners(gallery_side.lookup.locate(query_side.items)[1], query_side.items, query_side.name,
                      gallery_side.name)
    reported_ks = sorted(set(CONTRACT_KS) | set(ks))
    ranks, info = _approximate_ranks(
        query_side, gallery_side, index, depth=depth, ks=reported_ks, params=index_params, use_gpu=use_gpu,
        seed=seed, progress=progress,
    )
    metrics = retrieval_metrics(ranks, ks)
    metrics["index"] = index
    metrics["index_parameters"] = info["parameters"]

    # Recall lost to the approximate index, measured against exact search on a seeded sample of queries.
    n_queries = len(query_side.vectors)
    sample_size = int(min(max(sample, 0), n_queries))
    metrics["approx_sample"] = sample_size
    metrics["approx_recall_loss"] = None
    if sample_size > 0:
        rows = np.sort(np.random.default_rng(seed).choice(n_queries, size=sample_size, replace=False))
        sampled = _Side(name=query_side.name, vectors=query_side.vectors[rows], items=query_side.items[rows],
                        pages=None)
        exact, _ = _rank_exact(sampled, gallery_side, tile=tile, use_gpu=False, progress=None)
        approximate = ranks.subset(rows)
        metrics["approx_recall_loss"] = {
            f"recall@{k}": float(exact.recall_at(k).mean() - approximate.recall_at(k).mean()) for k in reported_ks
        }
        metrics["approx_sample_mrr_exact"] = float(exact.reciprocal_rank().mean())
        metrics["approx_sample_mrr"] = float(approximate.reciprocal_rank().mean())
    note = info["note"] if info["device"] == "cpu" and use_gpu else None
    return metrics, note

"""Collapse metrics of one embedding matrix, computed in one streaming pass.

Notation: Z is the [N, D] embedding matrix and Ẑ is Z with every row L2-normalised.

Exact statistics accumulate in float64 over row chunks, so memory is O(chunk x D + D^2) whatever N is:

- the uncentred second moment Z^T Z and the column sums of Z (for RankMe, the covariance spectrum and
  the per-dimension standard deviation),
- column sums and sums of squares of Ẑ (std_l2, the exact mean cosine),
- per-page sums of Ẑ (exact intra-page and inter-page mean cosines),
- a seeded bottom-k sample (by a hash of the row index) of at most ``sample_rows`` rows of Ẑ for the sampled metrics (cosine spread
  and quantiles, uniformity).

Metric definitions:

- ``effective_rank``: RankMe (Garrido et al., "RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", ICML 2023). Singular values s of the uncentred Z,
  p = s / sum(s) + 1e-7, exp(-sum p log p). The singular values are the square roots of the eigenvalues of
  Z^T Z (the top min(N, D) of them). ``effective_rank_ratio`` = effective_rank / min(N, D).
- ``effective_rank_cov``: the same entropy over the eigenvalues of the centred covariance,
  p = λ / sum(λ) + 1e-7. Some monitoring libraries report this value under the name "RankMe"; on
  mean-shifted or anisotropic data it differs from the paper's value by more than 2x, hence both.
- ``participation_ratio``: (sum λ)^2 / sum λ^2 over the centred covariance eigenvalues.
- ``rank_99``: number of leading covariance components that explain 99% of the variance.
- ``dead_dims``: dimensions of Z whose standard deviation is below 1e-6 times the largest one (or exactly 0).
- ``std_l2``: mean over dimensions of the population standard deviation of Ẑ (the collapse monitor of
  SimSiam, Chen and He 2021); ``std_l2_ratio`` = std_l2 * sqrt(D), about 1 for vectors spread uniformly on
  the sphere and 0 for complete collapse.
- ``cosine``: distribution of Ẑ_i · Ẑ_j over pairs i != j. The mean is exact,
  (||sum Ẑ||^2 - N) / (N (N - 1)). Standard deviation and quantiles come from a seeded sample of pairs
  (``pairs_sampled`` is its size; all pairs are used when the sample contains every row and there are
  at most ``max_pairs`` of them).
- ``uniformity``: log of the mean over i != j of exp(-2 ||Ẑ_i - Ẑ_j||^2) (Wang and Isola, ICML 2020), over
  the sample (at most 10,000 rows by default).
- ``groups``: mean cosine of distinct pairs within one page (``intra_cosine``) and across pages
  (``inter_cosine``), exact from per-page sums: sum over pages of (||S_p||^2 - n_p) divided by the number of
  ordered intra-page pairs, and the rest of the pairs for inter. ``null`` without page labels or when no
  page has two panels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

ENTROPY_EPSILON = 1e-7
PRODUCT_ROWS = 32_768
# Eigenvalue floor, relative to the largest, below which float32 products trigger a float64 second pass.
# Measured: the float32 second moment of 262,144 x 512 rows (blocks of 32,768) was off by 6.5e-8 of its
# largest eigenvalue in spectral norm, and on spectra decaying to 1e-7 of the largest the effective rank
# moved by less than 1e-4 (50,000 x 256 rows), so 1e-6 leaves a margin.
SECOND_PASS_FLOOR = 1e-6
VERDICT_ORDER = ("healthy", "group_collapse", "dimensional_collapse", "complete_collapse")


@dataclass(frozen=True)
class VerdictThresholds:
    """Thresholds of the collapse verdicts, checked in the order of this class's fields.

    - complete_collapse: ``std_l2_ratio`` below ``complete_std_ratio`` or the mean cosine above
      ``complete_mean_cosine`` (every vector points the same way).
    - dimensional_collapse: ``effective_rank_ratio`` below ``min_rank_ratio`` (the vectors vary, but in
      a few directions only).
    - group_collapse: intra-page mean cosine above ``group_intra_cosine`` (panels of one page merge
      into one point although they show different things).
    """

    complete_std_ratio: float = 0.1
    complete_mean_cosine: float = 0.95
    min_rank_ratio: float = 0.1
    group_intra_cosine: float = 0.9


class NonFiniteRowError(ValueError):
    """Error for a row with NaN or infinite values, or with squares that overflow. ``row`` is its global index."""

    def __init__(self, row: int):
        super().__init__(f"row {row} has NaN or infinite values")
        self.row = row


class CollapseAccumulator:
    """Accumulate the statistics of one [N, D] matrix chunk by chunk; :meth:`result` gives the metrics."""

    def __init__(
        self,
        dim: int,
        *,
        sample_rows: int = 10_000,
        seed: int = 0,
        page_last_row: dict[int, int] | None = None,
        precision: str = "auto",
        row_offset: int = 0,
    ):
        """``page_last_row`` maps each page to the index of its last row; with it, finished pages are
        closed as the stream passes them. Without it every page sum stays in memory until :meth:`result`.

        ``precision`` "auto" multiplies float32 blocks in float32 (float64 input stays float64);
        "float64" converts every block first. ``row_offset`` is the global index of the first row this
        accumulator receives (for partial accumulators that are merged later).
        """
        self.row_offset = row_offset
        self.dim = dim
        self.page_last_row = page_last_row
        self.n = 0
        self.gram = np.zeros((dim, dim), dtype=np.float64)
        self.col_sum = np.zeros(dim, dtype=np.float64)
        self.hat_sum = np.zeros(dim, dtype=np.float64)
        self.hat_sq_sum = np.zeros(dim, dtype=np.float64)
        self.sample_rows = sample_rows
        self.seed = seed
        self.sample = np.empty((0, dim), dtype=np.float64)
        self.sample_priority = np.empty(0, dtype=np.uint64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self.precision = precision
        self.gram_precision = "float32 blocks, float64 sum"
        self.page_pairs = 0  # ordered intra-page pairs: sum n_p (n_p - 1)
        self.page_dot = 0.0  # sum over pages of ||S_p||^2 - n_p
        self.has_pages = False
        self._spectra_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._scratch_array: np.ndarray | None = None
        self.unit_rows = 0  # rows with a non-zero norm: each adds exactly 1 to sum ||Ẑ_i||^2
        self._open_pages: dict[int, tuple[np.ndarray, int]] = {}

    def update(self, rows: np.ndarray, pages: np.ndarray | None = None) -> None:
        """Add a block of rows (any float dtype) and, optionally, their page indices."""
        block = np.asarray(rows)
        narrow = block.dtype.kind == "f" and block.dtype.itemsize <= 4 and self.precision == "auto"
        block = block.astype(np.float32 if narrow else np.float64, copy=False)
        if block.dtype == np.float64:
            self.gram_precision = "float64"
        pages = None if pages is None else np.asarray(pages)
        for start in range(0, block.shape[0], PRODUCT_ROWS):
            stop = start + PRODUCT_ROWS
            self._update_block(block[start:stop], None if pages is None else pages[start:stop])

    def _update_block(self, block: np.ndarray, pages: np.ndarray | None) -> None:
        # Products run in the block's dtype over at most PRODUCT_ROWS rows and are summed in float64,
        # so float32 rounding stays near sqrt(PRODUCT_ROWS) * 6e-8 relative (an estimate).
        # needs_exact_gram() detects when the spectrum reaches down to that rounding.
        self._spectra_cache = None
        ones = np.ones(block.shape[0], dtype=block.dtype)
        squares = self._scratch(block.shape, block.dtype)
        np.multiply(block, block, out=squares)
        norms = np.sqrt((squares @ np.ones(block.shape[1], dtype=block.dtype)).astype(np.float64))
        # A NaN or infinite entry makes its row's norm non-finite, so this check costs no extra pass.
        if not np.isfinite(norms).all():
            first_bad = int(np.argmin(np.isfinite(norms)))
            raise NonFiniteRowError(self.row_offset + self.n + first_bad)
        self.gram += (block.T @ block).astype(np.float64)
        self.col_sum += (ones @ block).astype(np.float64)

        nonzero = norms > 0
        inverse_norms = np.divide(1.0, norms, out=np.zeros_like(norms), where=nonzero).astype(block.dtype)
        self.unit_rows += int(nonzero.sum())
        # Sums of Ẑ and Ẑ² as matrix-vector products, without materialising Ẑ.
        self.hat_sum += (block.T @ inverse_norms).astype(np.float64)
        self.hat_sq_sum += (squares.T @ (inverse_norms * inverse_norms)).astype(np.float64)

        self._update_sample(block, inverse_norms)
        self.n += block.shape[0]
        if pages is not None:
            self.has_pages = True
            self._update_pages(block * inverse_norms[:, None], pages)

    def __getstate__(self) -> dict:
        # The work array is per process; never ship it with a partial accumulator.
        self._flush_sample()
        state = dict(self.__dict__)
        state["_scratch_array"] = None
        return state

    def _scratch(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Return a reused work array, so that every block does not allocate (and page in) a new one."""
        if self._scratch_array is None or self._scratch_array.dtype != dtype or self._scratch_array.shape[0] < shape[0]:
            self._scratch_array = np.empty(shape, dtype=dtype)
        return self._scratch_array[: shape[0]]

    def _update_sample(self, block: np.ndarray, inverse_norms: np.ndarray) -> None:
        """Keep the rows of Ẑ with the ``sample_rows`` smallest priorities (bottom-k sampling).

        A row's priority is a hash of its index and the seed, so the sample is a uniform one, the same
        however the rows are chunked, and two partial samples merge exactly (see :meth:`merge`).
        """
        priorities = row_priorities(self.row_offset + self.n + np.arange(block.shape[0], dtype=np.uint64), self.seed)
        if self.sample.shape[0] >= self.sample_rows:
            candidates = np.flatnonzero(priorities < self.sample_priority.max())
        else:
            candidates = np.arange(block.shape[0])
        if len(candidates) == 0:
            return
        # Candidates wait in a pool and are merged once it contains a sample's worth, so the sample is not
        # copied for every block.
        self._pending.append((block[candidates] * inverse_norms[candidates, None], priorities[candidates]))
        self._pending_rows += len(candidates)
        if self._pending_rows >= self.sample_rows:
            self._flush_sample()

    def _flush_sample(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate([self.sample, *(pending_rows for pending_rows, _ in self._pending)])
        priorities = np.concatenate([self.sample_priority, *(pending for _, pending in self._pending)])
        self._pending, self._pending_rows = [], 0
        self._keep_smallest(rows.astype(np.float64, copy=False), priorities)

    def _keep_smallest(self, rows: np.ndarray, priorities: np.ndarray) -> None:
        if len(priorities) > self.sample_rows:
            keep = np.argpartition(priorities, self.sample_rows - 1)[: self.sample_rows]
            rows, priorities = rows[keep], priorities[keep]
        self.sample, self.sample_priority = rows, priorities

    def merge(self, other: "CollapseAccumulator") -> None:
        """Add the statistics of ``other``, which accumulated a disjoint set of rows.

        ``other`` must have been built with the same seed and ``row_offset`` equal to the global index of
        its first row, so that the merged sample equals the one a single pass would keep. Pages must not
        span the two accumulators.
        """
        self._spectra_cache = None
        self.n += other.n
        self.gram += other.gram
        self.col_sum += other.col_sum
        self.hat_sum += other.hat_sum
        self.hat_sq_sum += other.hat_sq_sum
        self.unit_rows += other.unit_rows
        self.page_dot += other.page_dot
        self.page_pairs += other.page_pairs
        self.has_pages = self.has_pages or other.has_pages
        for page, (page_sum, page_count) in other._open_pages.items():
            self._open_pages[page] = (page_sum, page_count)
        if other.gram_precision != self.gram_precision:
            self.gram_precision = "float64" if "float64" in (other.gram_precision, self.gram_precision) else self.gram_precision
        self._flush_sample()
        other._flush_sample()
        self._keep_smallest(np.concatenate([self.sample, other.sample]),
                            np.concatenate([self.sample_priority, other.sample_priority]))

    def _update_pages(self, normalised: np.ndarray, pages: np.ndarray) -> None:
        unique, inverse = np.unique(pages, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=len(unique))
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.add.reduceat(normalised[order], starts, axis=0)
        for page, page_sum, page_count in zip(unique.tolist(), sums, counts.tolist()):
            if page in self._open_pages:
                previous_sum, previous_count = self._open_pages[page]
                self._open_pages[page] = (previous_sum + page_sum, previous_count + page_count)
            else:
                self._open_pages[page] = (page_sum, page_count)
        # A page whose last row has been seen is reduced to two numbers, so memory stays O(open pages x D).
        if self.page_last_row is not None:
            for page in unique.tolist():
                if self.page_last_row[page] < self.n:
                    self._close_page(page)

    def needs_exact_gram(self) -> bool:
        """Return whether the spectrum reaches down to where float32 block products lose accuracy.

        The second moment is recomputed from float64 products in a second pass (see :meth:`refine_gram`)
        when the smallest retained eigenvalue of Z^T Z, or of the covariance, is below
        ``SECOND_PASS_FLOOR`` times the largest eigenvalue of Z^T Z. Exactly low-rank data (eigenvalues
        near 0) always takes the second pass; a spread spectrum does not.
        """
        if self.gram_precision != "float32 blocks, float64 sum" or self.n < 2:
            return False
        keep = min(self.n, self.dim)
        gram_eigen, covariance_eigen = self._spectra()
        if gram_eigen[0] <= 0:
            return False
        smallest = min(gram_eigen[keep - 1], covariance_eigen[min(keep, self.n - 1) - 1] * (self.n - 1))
        return bool(smallest < SECOND_PASS_FLOOR * gram_eigen[0])

    def _spectra(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues, largest first, of Z^T Z and of the covariance; cached until the statistics change."""
        if self._spectra_cache is None:
            mean = self.col_sum / self.n
            covariance = (self.gram - self.n * np.outer(mean, mean)) / (self.n - 1)
            self._spectra_cache = (np.linalg.eigvalsh(self.gram)[::-1], np.linalg.eigvalsh(covariance)[::-1])
        return self._spectra_cache

    def refine_gram(self, blocks) -> None:
        """Recompute the second moment from float64 products over ``blocks`` (the same rows again)."""
        gram = np.zeros_like(self.gram)
        for block in blocks:
            block = np.asarray(block, dtype=np.float64)
            gram += block.T @ block
        self.gram = gram
        self.gram_precision = "float64 (second pass)"
        self._spectra_cache = None

    def _close_page(self, page: int) -> None:
        page_sum, page_count = self._open_pages.pop(page)
        self.page_dot += float(page_sum @ page_sum) - page_count
        self.page_pairs += page_count * (page_count - 1)

    def result(self, thresholds: VerdictThresholds = VerdictThresholds(), max_pairs: int = 2_000_000) -> dict:
        """Compute every collapse metric from the accumulated statistics."""
        self._flush_sample()
        for page in list(self._open_pages):
            self._close_page(page)
        n, dim = self.n, self.dim
        if n < 2:
            raise ValueError(f"collapse metrics need at least 2 rows, got {n}")
        if dim == 1:
            warnings.warn("embeddings have one dimension: rank and spread metrics are trivial", stacklevel=2)

        gram_eigen, covariance_eigen = self._spectra()
        covariance_eigen = np.clip(covariance_eigen, 0.0, None)
        gram_eigen = np.clip(gram_eigen, 0.0, None)
        keep = min(n, dim)
        singular_values = np.sqrt(gram_eigen[:keep])
        effective_rank = entropy_rank(singular_values)

        total_variance = float(covariance_eigen.sum())
        if total_variance > 0:
            participation_ratio = total_variance**2 / float(np.square(covariance_eigen).sum())
            explained = np.cumsum(covariance_eigen) / total_variance
            rank_99 = int(np.searchsorted(explained, 0.99 - 1e-12) + 1)
            effective_rank_cov = entropy_rank(covariance_eigen[:keep])
        else:
            participation_ratio, rank_99, effective_rank_cov = 0.0, 0, 0.0

        mean = self.col_sum / n
        variances = (np.diag(self.gram) - n * mean * mean) / (n - 1)
        dim_std = np.sqrt(np.clip(variances, 0.0, None))
        dead_dims = int(np.sum(dim_std <= 1e-6 * max(float(dim_std.max()), 0.0)))

        hat_mean = self.hat_sum / n
        hat_std = np.sqrt(np.clip(self.hat_sq_sum / n - hat_mean**2, 0.0, None))
        std_l2 = float(hat_std.mean())
        cosine, uniformity_value = self._cosine_summary(max_pairs)
        cosine["mean"] = float((self.hat_sum @ self.hat_sum - self.unit_rows) / (n * (n - 1)))
        if self.unit_rows < n:
            warnings.warn(f"{n - self.unit_rows} row(s) are all zeros; their cosines count as 0", stacklevel=2)

        metrics = {
            "n": n,
            "dim": dim,
            "effective_rank": effective_rank,
            "effective_rank_ratio": effective_rank / keep,
            "effective_rank_cov": effective_rank_cov,
            "participation_ratio": participation_ratio,
            "rank_99": rank_99,
            "dead_dims": dead_dims,
            "std_l2": std_l2,
            "std_l2_ratio": std_l2 * math.sqrt(dim),
            "cosine": cosine,
            "uniformity": uniformity_value,
            "uniformity_rows": int(self.sample.shape[0]),
            "groups": self._group_summary(n),
            "singular_values": singular_values.tolist(),
            "gram_precision": self.gram_precision,
        }
        metrics["verdict"] = verdict(metrics, thresholds)
        return metrics

    def _cosine_summary(self, max_pairs: int) -> tuple[dict, float]:
        # Sort the sample by row index hash so the pair subsample does not depend on arrival order.
        self._flush_sample()
        order = np.argsort(self.sample_priority, kind="stable")
        return sample_pair_statistics(self.sample[order], max_pairs=max_pairs, seed=self.seed)

    def _group_summary(self, n: int) -> dict | None:
        if not self.has_pages or self.page_pairs == 0:
            return None
        all_pairs = n * (n - 1)
        all_dot = float(self.hat_sum @ self.hat_sum) - self.unit_rows
        inter_pairs = all_pairs - self.page_pairs
        return {
            "intra_cosine": self.page_dot / self.page_pairs,
            "inter_cosine": (all_dot - self.page_dot) / inter_pairs if inter_pairs else None,
            "intra_pairs": int(self.page_pairs),
        }


def entropy_rank(values: np.ndarray) -> float:
    """Exponential of the Shannon entropy of ``values / sum(values) + 1e-7`` (0 when all values are 0)."""
    values = np.asarray(values, dtype=np.float64)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values / total + ENTROPY_EPSILON
    return float(np.exp(-np.sum(p * np.log(p))))


def row_priorities(row_indices: np.ndarray, seed: int) -> np.ndarray:
    """Uniform 64-bit priorities of row indices: the SplitMix64 finaliser of (index + seed * golden ratio)."""
    with np.errstate(over="ignore"):
        value = row_indices.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        value = (value ^ (value >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        value = (value ^ (value >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return value ^ (value >> np.uint64(31))


def sample_pair_statistics(
    normalised: np.ndarray, *, max_pairs: int = 2_000_000, seed: int = 0, block: int = 1024
) -> tuple[dict, float]:
    """Cosine spread and uniformity over all pairs i != j of the unit rows ``normalised``, blockwise.

    Returns ({"std", "p05", "p50", "p95", "pairs_sampled"}, uniformity). The standard deviation and the
    uniformity use every pair; the quantiles use every pair when there are at most ``max_pairs``,
    otherwise a seeded uniform sample of about that many (drawn with replacement within each block).
    Products run in float32 (cosines to about 1e-7), sums in float64.
    """
    rows = normalised.shape[0]
    if rows < 2:
        return {"std": math.nan, "p05": math.nan, "p50": math.nan, "p95": math.nan, "pairs_sampled": 0}, math.nan
    total_pairs = rows * (rows - 1) // 2
    keep_share = min(1.0, max_pairs / total_pairs)
    rng = np.random.default_rng(seed)
    vectors = np.ascontiguousarray(normalised, dtype=np.float32)

    kept = []
    # Deviations from a shift near the mean are summed instead of the cosines, because
    # E[c^2] - E[c]^2 cancels to zero when every cosine is close to 1 (a collapsed set).
    shift: np.float32 | None = None
    deviation_sum = deviation_square_sum = potential_sum = 0.0
    upper_of_square: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for start in range(0, rows, block):
        stop = min(start + block, rows)
        width = stop - start
        cosines = vectors[start:stop] @ vectors[start:].T
        if width not in upper_of_square:
            upper_of_square[width] = np.triu_indices(width, k=1)
        # Pairs (i, j) with j > i: the strict upper triangle of the leading square, then the rest in full.
        for values in (cosines[:, :width][upper_of_square[width]], cosines[:, width:]):
            if values.size == 0:
                continue
            if shift is None:
                shift = np.float32(values.mean(dtype=np.float64))
            deviations = values - shift
            deviation_sum += float(deviations.sum(dtype=np.float64))
            deviation_square_sum += float(np.square(deviations).sum(dtype=np.float64))
            # uniformity terms exp(-2 ||x_i - x_j||^2) = exp(4 cos - 4) lie in [exp(-8), 1] for unit rows,
            # so they are summed directly, without log-sum-exp.
            potential_sum += float(np.exp(4.0 * values - 4.0).sum(dtype=np.float64))
            if keep_share < 1.0:
                count = rng.binomial(values.size, keep_share)
                flat = values.reshape(-1) if values.ndim == 1 else None
                if flat is not None:
                    kept.append(flat[rng.integers(0, flat.size, size=count)].astype(np.float64))
                else:
                    row_index = rng.integers(0, values.shape[0], size=count)
                    column_index = rng.integers(0, values.shape[1], size=count)
                    kept.append(values[row_index, column_index].astype(np.float64))
            else:
                kept.append(values.astype(np.float64).reshape(-1))

    mean_deviation = deviation_sum / total_pairs
    std = math.sqrt(max(deviation_square_sum / total_pairs - mean_deviation * mean_deviation, 0.0))
    sampled = np.concatenate(kept)
    quantiles = np.quantile(sampled, [0.05, 0.5, 0.95])
    summary = {
        "std": std,
        "p05": float(quantiles[0]),
        "p50": float(quantiles[1]),
        "p95": float(quantiles[2]),
        "pairs_sampled": int(len(sampled)),
    }
    return summary, math.log(potential_sum / total_pairs)


def verdict(metrics: dict, thresholds: VerdictThresholds = VerdictThresholds()) -> str:
    """Classify one modality's metrics as complete, dimensional or group collapse, or healthy."""
    if (metrics["std_l2_ratio"] < thresholds.complete_std_ratio
            or metrics["cosine"]["mean"] > thresholds.complete_mean_cosine):
        return "complete_collapse"
    if metrics["effective_rank_ratio"] < thresholds.min_rank_ratio:
        return "dimensional_collapse"
    groups = metrics.get("groups")
    if groups and groups["intra_cosine"] > thresholds.group_intra_cosine:
        return "group_collapse"
    return "healthy"


def worst_verdict(verdicts: list[str]) -> str:
    """Return the most severe of several verdicts."""
    return max(verdicts, key=VERDICT_ORDER.index) if verdicts else "healthy"


def collapse_course(verdicts: list[tuple[int, str | None]]) -> tuple[int | None, int | None]:
    """Return the first collapsed epoch and the epoch from which the run stayed healthy to its end.

    ``verdicts`` are (epoch, verdict) pairs in epoch order. The second value is None unless an earlier
    epoch collapsed and the last one is healthy, so that "collapsed at epoch 1" is not read as the
    state of a run that recovered.
    """
    collapsed = [epoch for epoch, verdict in verdicts if verdict not in (None, "healthy")]
    if not collapsed or verdicts[-1][1] != "healthy":
        return (collapsed[0] if collapsed else None), None
    later = [epoch for epoch, _ in verdicts if epoch > collapsed[-1]]
    return collapsed[0], later[0]


def collapse_metrics(
    embeddings: np.ndarray,
    pages: np.ndarray | None = None,
    *,
    thresholds: VerdictThresholds = VerdictThresholds(),
    sample_rows: int = 10_000,
    seed: int = 0,
    chunk_rows: int = 65_536,
) -> dict:
    """Collapse metrics of an in-memory [N, D] matrix (see the module docstring for definitions).

    Raises ``ValueError`` for fewer than 2 rows, a non-2-D input or non-finite values.
    """
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D [N, D] matrix, got shape {embeddings.shape}")
    if not np.isfinite(embeddings).all():
        bad = int((~np.isfinite(embeddings)).any(axis=1).sum())
        raise ValueError(f"embeddings hold {bad} row(s) with NaN or infinite values")
    page_last_row = None if pages is None else last_row_of_each_page(pages)
    accumulator = CollapseAccumulator(
        embeddings.shape[1], sample_rows=sample_rows, seed=seed, page_last_row=page_last_row
    )
    for start in range(0, embeddings.shape[0], chunk_rows):
        stop = start + chunk_rows
        accumulator.update(embeddings[start:stop], None if pages is None else pages[start:stop])
    if accumulator.needs_exact_gram():
        accumulator.refine_gram(embeddings[start: start + chunk_rows] for start in range(0, len(embeddings), chunk_rows))
    return accumulator.result(thresholds)


def last_row_of_each_page(pages: np.ndarray) -> dict[int, int]:
    """Map every page index to the index of its last row."""
    pages = np.asarray(pages)
    reversed_unique, reversed_first = np.unique(pages[::-1], return_index=True)
    return dict(zip(reversed_unique.tolist(), (len(pages) - 1 - reversed_first).tolist()))


def pair_metrics(vision: np.ndarray, text: np.ndarray) -> dict:
    """Modality gap and alignment of row-paired vision and text embeddings.

    ``modality_gap`` = ||mean(Ẑ_vision) - mean(Ẑ_text)|| (Liang et al., "Mind the Gap", NeurIPS 2022);
    ``alignment`` = mean ||Ẑ_vision_i - Ẑ_text_i||^2 (Wang and Isola 2020). Rows must already be
    restricted to panels that have both modalities.
    """
    vision_hat = _normalise(vision)
    text_hat = _normalise(text)
    return {
        "modality_gap": float(np.linalg.norm(vision_hat.mean(axis=0) - text_hat.mean(axis=0))),
        "alignment": float(np.square(vision_hat - text_hat).sum(axis=1).mean()),
        "n": int(vision.shape[0]),
    }


class PairAccumulator:
    """Streaming form of :func:`pair_metrics` over row chunks."""

    def __init__(self, dim: int):
        self.n = 0
        self.vision_sum = np.zeros(dim, dtype=np.float64)
        self.text_sum = np.zeros(dim, dtype=np.float64)
        self.squared_distance = 0.0

    def update(self, vision: np.ndarray, text: np.ndarray) -> None:
        vision_hat = _normalise(vision)
        text_hat = _normalise(text)
        self.n += vision_hat.shape[0]
        self.vision_sum += vision_hat.sum(axis=0)
        self.text_sum += text_hat.sum(axis=0)
        self.squared_distance += float(np.square(vision_hat - text_hat).sum())

    def result(self) -> dict | None:
        if self.n == 0:
            return None
        return {
            "modality_gap": float(np.linalg.norm((self.vision_sum - self.text_sum) / self.n)),
            "alignment": self.squared_distance / self.n,
            "n": self.n,
        }


def _normalise(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def thresholds_dict(thresholds: VerdictThresholds) -> dict:
    return asdict(thresholds)

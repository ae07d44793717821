"""Collapse metrics against independent float64 computations on data with known structure."""

import math

import numpy as np
import pytest

from diagnose.collapse import (
    CollapseAccumulator,
    collapse_course,
    collapse_metrics,
    last_row_of_each_page,
    pair_metrics,
)
from diagnose.render import collapse_course_text


def reference_rankme(z: np.ndarray) -> float:
    singular_values = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    p = singular_values / singular_values.sum() + 1e-7
    return float(np.exp(-np.sum(p * np.log(p))))


def reference_covariance_eigenvalues(z: np.ndarray) -> np.ndarray:
    centred = z.astype(np.float64) - z.astype(np.float64).mean(axis=0)
    return np.sort(np.linalg.eigvalsh(centred.T @ centred / (len(z) - 1)))[::-1]


def normalised(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def all_pair_cosines(z: np.ndarray) -> np.ndarray:
    hat = normalised(z)
    gram = hat @ hat.T
    return gram[~np.eye(len(z), dtype=bool)]


def test_isotropic_gaussian_is_healthy():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3000, 48)).astype(np.float32)
    metrics = collapse_metrics(z)

    assert metrics["effective_rank"] == pytest.approx(reference_rankme(z), rel=1e-9)
    assert metrics["effective_rank"] > 0.97 * 48
    assert metrics["verdict"] == "healthy"
    assert metrics["std_l2_ratio"] == pytest.approx(1.0, abs=0.02)
    # float32 input: products run in float32, so sums of normalised rows agree to about 1e-7.
    assert metrics["std_l2"] == pytest.approx(normalised(z).std(axis=0).mean(), rel=1e-6)
    assert metrics["cosine"]["mean"] == pytest.approx(all_pair_cosines(z).mean(), abs=1e-6)

    eigenvalues = reference_covariance_eigenvalues(z)
    assert metrics["participation_ratio"] == pytest.approx(eigenvalues.sum() ** 2 / (eigenvalues**2).sum(), rel=1e-9)
    p = eigenvalues / eigenvalues.sum() + 1e-7
    assert metrics["effective_rank_cov"] == pytest.approx(math.exp(-np.sum(p * np.log(p))), rel=1e-9)
    explained = np.cumsum(eigenvalues) / eigenvalues.sum()
    assert metrics["rank_99"] == int(np.argmax(explained >= 0.99) + 1)
    assert metrics["dead_dims"] == 0


def test_exact_rank_three_is_dimensional_collapse():
    rng = np.random.default_rng(1)
    basis = rng.standard_normal((3, 64))
    z = rng.standard_normal((4000, 3)) @ basis + 1e-6 * rng.standard_normal((4000, 64))
    z = z.astype(np.float32)
    metrics = collapse_metrics(z, chunk_rows=512)

    expected = reference_rankme(z)
    assert abs(expected - 3.0) < 0.1
    assert metrics["effective_rank"] == pytest.approx(expected, abs=5e-4)
    assert metrics["rank_99"] <= 3
    assert metrics["verdict"] == "dimensional_collapse"


def test_near_constant_vectors_are_complete_collapse():
    rng = np.random.default_rng(2)
    z = (np.full((1000, 32), 0.7) + 1e-4 * rng.standard_normal((1000, 32))).astype(np.float32)
    metrics = collapse_metrics(z)

    assert metrics["cosine"]["mean"] == pytest.approx(all_pair_cosines(z).mean(), abs=1e-6)
    assert metrics["cosine"]["mean"] > 0.999
    assert metrics["std_l2_ratio"] < 0.01
    assert metrics["verdict"] == "complete_collapse"


def test_cosine_spread_of_collapsed_set_does_not_cancel():
    # Cosines near 1 with a spread of about 5e-6, far above float32 rounding (about 1e-7).
    rng = np.random.default_rng(2)
    z = (np.full((1000, 32), 0.7) + 3e-3 * rng.standard_normal((1000, 32))).astype(np.float32)
    metrics = collapse_metrics(z)
    assert metrics["cosine"]["mean"] > 0.9999
    assert metrics["cosine"]["std"] == pytest.approx(all_pair_cosines(z).std(), rel=0.01)


def test_tight_page_clusters_are_group_collapse():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((120, 40))
    pages = np.repeat(np.arange(120), 5)
    z = (np.repeat(centres, 5, axis=0) + 0.03 * rng.standard_normal((600, 40))).astype(np.float32)
    metrics = collapse_metrics(z, pages, chunk_rows=97)

    gram = normalised(z) @ normalised(z).T
    same_page = (pages[:, None] == pages[None, :]) & ~np.eye(600, dtype=bool)
    other_page = pages[:, None] != pages[None, :]
    assert metrics["groups"]["intra_cosine"] == pytest.approx(gram[same_page].mean(), abs=1e-6)
    assert metrics["groups"]["inter_cosine"] == pytest.approx(gram[other_page].mean(), abs=1e-6)
    assert metrics["cosine"]["mean"] == pytest.approx(gram[~np.eye(600, dtype=bool)].mean(), abs=1e-6)
    float64_metrics = collapse_metrics(z.astype(np.float64), pages, chunk_rows=97)
    assert float64_metrics["groups"]["intra_cosine"] == pytest.approx(gram[same_page].mean(), abs=1e-12)
    assert float64_metrics["groups"]["inter_cosine"] == pytest.approx(gram[other_page].mean(), abs=1e-12)
    assert metrics["verdict"] == "group_collapse"


def test_groups_exact_with_unordered_pages():
    rng = np.random.default_rng(4)
    pages = rng.integers(0, 30, size=400)
    z = rng.standard_normal((400, 16)) + np.eye(16)[pages % 16] * 3
    streamed = collapse_metrics(z, pages, chunk_rows=37)

    gram = normalised(z) @ normalised(z).T
    same_page = (pages[:, None] == pages[None, :]) & ~np.eye(400, dtype=bool)
    assert streamed["groups"]["intra_cosine"] == pytest.approx(gram[same_page].mean(), abs=1e-10)
    assert streamed["groups"]["inter_cosine"] == pytest.approx(gram[pages[:, None] != pages[None, :]].mean(), abs=1e-10)


def test_streaming_closes_finished_pages():
    pages = np.repeat(np.arange(50), 4)
    accumulator = CollapseAccumulator(8, page_last_row=last_row_of_each_page(pages))
    rng = np.random.default_rng(5)
    z = rng.standard_normal((200, 8))
    for start in range(0, 200, 10):
        accumulator.update(z[start:start + 10], pages[start:start + 10])
        assert len(accumulator._open_pages) <= 1
    assert accumulator.result()["groups"]["intra_pairs"] == 50 * 4 * 3


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(6)
    z = rng.standard_normal((777, 24)) @ rng.standard_normal((24, 24))
    pages = np.repeat(np.arange(259), 3)
    whole = collapse_metrics(z, pages, chunk_rows=10_000)
    chunked = collapse_metrics(z, pages, chunk_rows=50)
    for key in ("effective_rank", "effective_rank_cov", "participation_ratio", "std_l2", "uniformity"):
        assert chunked[key] == pytest.approx(whole[key], rel=1e-9)
    assert chunked["groups"]["intra_cosine"] == pytest.approx(whole["groups"]["intra_cosine"], rel=1e-9)


def test_uniformity_matches_definition():
    rng = np.random.default_rng(7)
    z = rng.standard_normal((300, 10))
    hat = normalised(z)
    squared_distances = np.square(hat[:, None, :] - hat[None, :, :]).sum(axis=-1)
    off_diagonal = ~np.eye(300, dtype=bool)
    expected = math.log(np.exp(-2 * squared_distances[off_diagonal]).mean())
    assert collapse_metrics(z)["uniformity"] == pytest.approx(expected, rel=1e-6)


def test_cosine_quantiles_use_all_pairs_when_small():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((200, 12))
    cosines = normalised(z) @ normalised(z).T
    upper = cosines[np.triu_indices(200, k=1)]
    metrics = collapse_metrics(z)
    # Pair cosines come from float32 products of the float64 sample: about 1e-7 absolute.
    assert metrics["cosine"]["pairs_sampled"] == len(upper)
    assert metrics["cosine"]["p50"] == pytest.approx(np.quantile(upper, 0.5), abs=1e-6)
    assert metrics["cosine"]["std"] == pytest.approx(upper.std(), abs=1e-6)


def test_sampled_cosine_spread_is_seeded_and_close():
    rng = np.random.default_rng(9)
    z = rng.standard_normal((5000, 16)) + 0.5
    first = collapse_metrics(z, sample_rows=2000, seed=3)
    second = collapse_metrics(z, sample_rows=2000, seed=3)
    assert first["cosine"] == second["cosine"]
    exact_std = all_pair_cosines(z[:2500]).std()
    assert first["cosine"]["std"] == pytest.approx(exact_std, rel=0.05)
    assert first["cosine"]["pairs_sampled"] == pytest.approx(2000 * 1999 / 2, rel=0.01)


def test_dead_dimensions_counted():
    rng = np.random.default_rng(10)
    z = rng.standard_normal((500, 20))
    z[:, [3, 7, 11]] = 2.5
    assert collapse_metrics(z)["dead_dims"] == 3


def test_pair_metrics_gap_and_alignment():
    rng = np.random.default_rng(11)
    vision = rng.standard_normal((400, 16)) + 2.0
    text = rng.standard_normal((400, 16)) - 2.0
    result = pair_metrics(vision, text)
    vision_hat, text_hat = normalised(vision), normalised(text)
    assert result["modality_gap"] == pytest.approx(np.linalg.norm(vision_hat.mean(0) - text_hat.mean(0)), rel=1e-12)
    assert result["alignment"] == pytest.approx(np.mean(np.sum((vision_hat - text_hat) ** 2, axis=1)), rel=1e-12)
    assert result["modality_gap"] > 1.0


def test_collapse_metrics_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        collapse_metrics(np.zeros(10))
    with pytest.raises(ValueError, match="at least 2 rows"):
        collapse_metrics(np.ones((1, 4)))
    bad = np.ones((5, 4))
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        collapse_metrics(bad)


@pytest.mark.parametrize(("verdicts", "expected", "text"), [
    ([(1, "healthy"), (2, "healthy")], (None, None), "none"),
    ([(1, "healthy"), (2, "group_collapse")], (2, None), "2"),
    ([(1, "group_collapse"), (2, "healthy")], (1, 2), "1, healthy again from epoch 2"),
    ([(1, "group_collapse"), (2, "healthy"), (3, "complete_collapse"), (4, "healthy"), (5, "healthy")],
     (1, 4), "1, healthy again from epoch 4"),
    ([(3, "dimensional_collapse"), (7, "dimensional_collapse")], (3, None), "3"),
])
def test_collapse_course_reports_recovery(verdicts, expected, text):
    assert collapse_course(verdicts) == expected
    assert collapse_course_text(*expected) == text

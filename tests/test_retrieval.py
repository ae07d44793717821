"""Tests of diagnose.retrieval against a brute-force float64 reference over the full score matrix."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from diagnose.io import InputError
from diagnose.retrieval import (
    RankCounts,
    bidirectional_retrieval,
    first_occurrence,
    normalize_rows,
    offset_distribution,
    retrieval_metrics,
    retrieval_ranks,
)

KS = (1, 2, 5, 10)


# --------------------------------------------------------------------------------------------------
# Reference: full float64 score matrix, ties enumerated with exact fractions


def reference_metrics(queries, gallery, query_items, gallery_items, ks=KS, query_pages=None, gallery_pages=None):
    """Recall@K, MRR and ranks computed query by query from the full float64 score matrix.

    Under random order of tied items, the number X of tied non-positives ahead of the first positive
    has P(X = j) = C(t + p - 1 - j, p - 1) / C(t + p, p), evaluated here with exact fractions.
    """
    def unit(matrix):
        matrix = matrix.astype(np.float64)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        return matrix / np.where(norms == 0, 1.0, norms)

    queries, gallery = unit(queries), unit(gallery)
    recall = {k: [] for k in ks}
    reciprocal, ranks, chance = [], [], []
    for row in range(len(queries)):
        # Elementwise products summed per row: identical gallery rows get identical scores.
        scores = (gallery * queries[row]).sum(axis=1)
        candidates = np.ones(len(gallery), bool)
        if query_pages is not None:
            candidates = gallery_pages == query_pages[row]
        scores = scores[candidates]
        positive = gallery_items[candidates] == query_items[row]
        best = scores[positive].max()
        higher = int((scores > best).sum())
        equal = scores == best
        tied_positives = int((equal & positive).sum())
        tied = int(equal.sum()) - tied_positives

        total = tied + tied_positives
        distribution = [
            Fraction(math.comb(total - 1 - j, tied_positives - 1), math.comb(total, tied_positives))
            for j in range(tied + 1)
        ]
        assert sum(distribution) == 1
        ranks.append(float(sum(p * (1 + higher + j) for j, p in enumerate(distribution))))
        reciprocal.append(float(sum(p / (1 + higher + j) for j, p in enumerate(distribution))))
        for k in ks:
            recall[k].append(float(sum(p for j, p in enumerate(distribution) if 1 + higher + j <= k)))
        chance.append(1.0 / candidates.sum())

    expected = {f"recall@{k}": float(np.mean(values)) for k, values in recall.items()}
    expected.update(
        mrr=float(np.mean(reciprocal)), mean_rank=float(np.mean(ranks)), median_rank=float(np.median(ranks)),
        **{"chance@1": float(np.mean(chance))},
    )
    return expected


def assert_metrics_match(measured: dict, expected: dict):
    for key, value in expected.items():
        assert measured[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def paired_data(n_pages=40, panels=(1, 9), dim=24, noise=1.2, seed=0):
    """Aligned vision/text pairs on pages of varied size, text = vision + noise."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(panels[0], panels[1], size=n_pages)
    pages = np.repeat(np.arange(n_pages), sizes)
    vision = rng.standard_normal((len(pages), dim)).astype(np.float32)
    text = (vision + noise * rng.standard_normal(vision.shape)).astype(np.float32)
    return vision, text, pages


# --------------------------------------------------------------------------------------------------
# Exactness against the reference


def test_aligned_pairs_match_reference():
    vision, text, pages = paired_data()
    items = np.arange(len(pages))
    result = bidirectional_retrieval(vision, text, first_pages=pages, second_pages=pages, ks=KS)

    for direction, (queries, gallery) in {"vision->text": (vision, text), "text->vision": (text, vision)}.items():
        entry = result["directions"][direction]
        assert_metrics_match(entry["global"], reference_metrics(queries, gallery, items, items))
        assert_metrics_match(
            entry["page"],
            reference_metrics(queries, gallery, items, items, query_pages=pages, gallery_pages=pages),
        )
        assert entry["global"]["n_queries"] == len(items)
        assert entry["global"]["gallery_size"] == len(items)


def test_five_captions_per_image_match_reference():
    rng = np.random.default_rng(3)
    n_images, captions, dim = 36, 5, 20
    image_pages = np.repeat(np.arange(12), 3)
    vision = rng.standard_normal((n_images, dim)).astype(np.float32)
    text_items = np.repeat(np.arange(n_images), captions)
    text = (vision[text_items] + 1.5 * rng.standard_normal((len(text_items), dim))).astype(np.float32)
    vision_items = np.arange(n_images)
    text_pages = image_pages[text_items]

    result = bidirectional_retrieval(
        vision, text, first_items=vision_items, second_items=text_items,
        first_pages=image_pages, second_pages=text_pages, ks=KS,
    )

    forward = result["directions"]["vision->text"]
    assert_metrics_match(forward["global"], reference_metrics(vision, text, vision_items, text_items))
    assert_metrics_match(
        forward["page"],
        reference_metrics(vision, text, vision_items, text_items, query_pages=image_pages, gallery_pages=text_pages),
    )
    backward = result["directions"]["text->vision"]
    assert_metrics_match(backward["global"], reference_metrics(text, vision, text_items, vision_items))
    assert_metrics_match(
        backward["page"],
        reference_metrics(text, vision, text_items, vision_items, query_pages=text_pages, gallery_pages=image_pages),
    )
    assert forward["global"]["random_recall@1"] == pytest.approx(captions / len(text))
    assert backward["global"]["random_recall@1"] == pytest.approx(1 / n_images)


def test_tile_height_does_not_change_counts():
    vision, text, _ = paired_data(seed=5)
    items = np.arange(len(vision))
    reference = retrieval_ranks(vision, text, items, items)
    for tile in (1, 7, 64):
        ranks = retrieval_ranks(vision, text, items, items, tile=tile)
        assert np.array_equal(ranks.higher, reference.higher), tile
        assert np.array_equal(ranks.tied, reference.tied), tile


# --------------------------------------------------------------------------------------------------
# Ties and collapse


def test_ties_follow_expected_rank_policy():
    # The positive of query 0 has two exact copies among the non-positives, and nothing scores higher.
    query = np.array([[1.0, 0.0, 0.0]], dtype=np.float32)
    gallery = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    gallery_items = np.array([7, 8, 9, 10, 11])
    ranks = retrieval_ranks(query, gallery, np.array([7]), gallery_items)

    assert ranks.higher.tolist() == [0]
    assert ranks.tied.tolist() == [2]
    assert ranks.tied_positives.tolist() == [1]
    assert ranks.expected_rank().tolist() == [2.0]
    metrics = retrieval_metrics(ranks)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert metrics["tied_queries"] == 1


def test_ties_with_several_tied_positives():
    # Two positives and three non-positives share the best score, one item scores higher.
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    gallery = np.array([[1, 0]] + [[1, 0.2]] * 5 + [[0, 1]], dtype=np.float32)
    gallery_items = np.array([0, 1, 1, 2, 3, 4, 5])
    ranks = retrieval_ranks(query, gallery, np.array([1]), gallery_items)

    assert (ranks.higher[0], ranks.tied[0], ranks.tied_positives[0]) == (1, 3, 2)
    # X = non-positives ahead of the first positive: P(0) = 2/5, P(1) = 3/10, P(2) = 1/5, P(3) = 1/10.
    assert ranks.expected_rank()[0] == pytest.approx(2 + 3 / 3)
    assert ranks.recall_at(2)[0] == pytest.approx(2 / 5)
    assert ranks.recall_at(3)[0] == pytest.approx(7 / 10)
    assert ranks.reciprocal_rank()[0] == pytest.approx(2 / 5 / 2 + 3 / 10 / 3 + 1 / 5 / 4 + 1 / 10 / 5)


def test_duplicates_tie_in_large_products():
    # Matrix products round the same dot product differently in different columns, but duplicates must tie.
    rng = np.random.default_rng(11)
    n_gallery, dim = 1500, 128
    gallery = rng.standard_normal((n_gallery, dim)).astype(np.float32)
    copies = rng.choice(np.arange(100, n_gallery), size=200, replace=False)
    gallery[copies] = gallery[rng.integers(0, 100, size=200)]
    queries = (gallery[:300] + 0.05 * rng.standard_normal((300, dim))).astype(np.float32)
    items = np.arange(n_gallery)

    ranks = retrieval_ranks(queries, gallery, items[:300], items)
    measured = retrieval_metrics(ranks, KS)
    assert measured["tied_queries"] > 50
    assert_metrics_match(measured, reference_metrics(queries, gallery, items[:300], items))


def test_identical_vectors_score_at_chance():
    n = 50
    same = np.ones((n, 8), dtype=np.float32)
    entry = bidirectional_retrieval(same, same, scopes=["global"])["directions"]["vision->text"]["global"]

    assert entry["recall@1"] == pytest.approx(entry["chance@1"])
    assert entry["recall@1"] == pytest.approx(1 / n)
    assert entry["recall@5"] == pytest.approx(5 / n)
    assert entry["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    assert entry["mean_rank"] == pytest.approx((n + 1) / 2)
    assert entry["median_rank"] == pytest.approx((n + 1) / 2)


def test_collapsed_captions_score_random_recall():
    n_images, captions = 20, 5
    vision = np.ones((n_images, 4), dtype=np.float32)
    text = np.ones((n_images * captions, 4), dtype=np.float32)
    result = bidirectional_retrieval(
        vision, text, first_items=np.arange(n_images), second_items=np.repeat(np.arange(n_images), captions),
        scopes=["global"],
    )
    forward = result["directions"]["vision->text"]["global"]
    assert forward["recall@1"] == pytest.approx(forward["random_recall@1"])
    assert forward["recall@1"] == pytest.approx(captions / (n_images * captions))
    assert forward["mean_rank"] == pytest.approx(1 + (n_images * captions - captions) / (captions + 1))
    backward = result["directions"]["text->vision"]["global"]
    assert backward["recall@1"] == pytest.approx(1 / n_images)


def test_zero_vectors_score_at_chance():
    # A dead encoder that outputs zeros ties everything at score 0 instead of failing on the norm.
    vision, _, _ = paired_data(n_pages=10, seed=2)
    text = np.zeros_like(vision)
    entry = bidirectional_retrieval(vision, text, scopes=["global"])["directions"]["vision->text"]["global"]
    assert entry["recall@1"] == pytest.approx(entry["chance@1"])


def test_single_panel_pages_are_trivial():
    vision, text, _ = paired_data(n_pages=10, seed=4)
    pages = np.arange(len(vision))
    entry = bidirectional_retrieval(vision, text, first_pages=pages, second_pages=pages)["directions"]["vision->text"]
    page = entry["page"]
    assert page["recall@1"] == 1.0
    assert page["chance@1"] == 1.0
    assert page["mrr"] == 1.0
    assert page["trivial_queries"] == len(vision)
    assert page["gallery_size"] == 1
    assert entry["global"]["trivial_queries"] == 0


def test_page_with_one_panel_among_others():
    vision, text, pages = paired_data(n_pages=6, panels=(3, 5), seed=8)
    pages = pages.copy()
    pages[0] = pages.max() + 1  # panel 0 alone on its own page
    items = np.arange(len(pages))
    ranks = retrieval_ranks(vision, text, items, items, query_pages=pages, gallery_pages=pages)
    assert ranks.gallery_size[0] == 1
    assert ranks.recall_at(1)[0] == 1.0
    measured = retrieval_metrics(ranks, KS)
    assert_metrics_match(measured, reference_metrics(vision, text, items, items, query_pages=pages, gallery_pages=pages))


def test_offset_distribution_matches_binomials():
    for tied, positives in [(0, 1), (1, 1), (4, 2), (9, 5), (30, 3)]:
        distribution = offset_distribution(tied, positives)
        total = tied + positives
        exact = [math.comb(total - 1 - j, positives - 1) / math.comb(total, positives) for j in range(tied + 1)]
        assert distribution == pytest.approx(exact, rel=1e-12)
        assert distribution.sum() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# Panels without text, helpers, progress


def test_panels_without_text_are_excluded_and_counted():
    vision, text, pages = paired_data(seed=6)
    has_text = np.ones(len(vision), dtype=np.uint8)
    has_text[::4] = 0
    result = bidirectional_retrieval(vision, text, first_pages=pages, second_pages=pages, has_text=has_text, ks=KS)
    with_text = has_text.astype(bool)
    items = np.arange(with_text.sum())

    assert result["excluded"]["no_text"] == int((~with_text).sum())
    entry = result["directions"]["vision->text"]
    assert entry["global"]["n_queries"] == with_text.sum()
    assert_metrics_match(entry["global"], reference_metrics(vision[with_text], text[with_text], items, items))


def test_first_occurrence_groups_identical_rows():
    rng = np.random.default_rng(9)
    matrix = rng.standard_normal((40, 6)).astype(np.float32)
    matrix[[5, 17, 30]] = matrix[2]
    matrix[25] = matrix[24]
    first = first_occurrence(matrix)
    assert first[[2, 5, 17, 30]].tolist() == [2, 2, 2, 2]
    assert first[[24, 25]].tolist() == [24, 24]
    others = np.setdiff1d(np.arange(40), [5, 17, 30, 25])
    assert np.array_equal(first[others], others)


def test_normalize_rows_clears_negative_zero():
    rows = normalize_rows(np.array([[-0.0, 3.0], [0.0, 3.0], [0.0, 0.0]]))
    assert rows.dtype == np.float32
    assert np.array_equal(rows.view(np.uint32)[0], rows.view(np.uint32)[1])
    assert rows[2].tolist() == [0.0, 0.0]


def test_progress_reports_every_query():
    vision, text, pages = paired_data(seed=7)
    calls = []
    bidirectional_retrieval(vision, text, first_pages=pages, second_pages=pages, tile=16,
                            progress=lambda label, done, total: calls.append((label, done, total)))
    final = {label: (done, total) for label, done, total in calls}
    assert set(final) == {"vision->text global", "vision->text page", "text->vision global", "text->vision page"}
    assert all(done == total == len(vision) for done, total in final.values())


# --------------------------------------------------------------------------------------------------
# Approximate search


def clustered_data(n=3000, dim=32, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((clusters, dim))
    vision = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))
    text = vision + 0.8 * rng.standard_normal((n, dim))
    return vision.astype(np.float32), text.astype(np.float32)


APPROXIMATE_CASES = [("ivf", {}), ("ivf", {"search": "faiss"}), ("hnsw", {})]


@pytest.mark.parametrize(("index", "params"), APPROXIMATE_CASES, ids=["ivf-lists", "ivf-faiss", "hnsw"])
def test_approximate_loss_small_when_clustered(index, params):
    vision, text = clustered_data()
    approximate = bidirectional_retrieval(vision, text, index=index, index_params=params, depth=50, sample=500,
                                          scopes=["global"])
    exact = bidirectional_retrieval(vision, text, scopes=["global"])

    entry = approximate["directions"]["vision->text"]["global"]
    assert approximate["index"]["exact"] is False
    assert entry["index"] == index
    assert entry["approx_sample"] == 500
    assert set(entry["approx_recall_loss"]) == {"recall@1", "recall@5", "recall@10"}
    assert all(abs(loss) <= 0.03 for loss in entry["approx_recall_loss"].values())
    assert entry["mrr_lower_bound"] is True
    assert entry["censored"] >= 0
    if params.get("search") == "faiss" or index == "hnsw":
        assert entry["search_depth"] == 50
    else:
        assert "search_depth" not in entry
    exact_entry = exact["directions"]["vision->text"]["global"]
    assert entry["recall@10"] == pytest.approx(exact_entry["recall@10"], abs=0.03)
    assert entry["mrr"] <= exact_entry["mrr"] + 0.01


@pytest.mark.parametrize("search", ["lists", "faiss"])
def test_exhaustive_ivf_equals_exact_search(search):
    vision, text = clustered_data(n=800, seed=1)
    items = np.arange(len(vision))
    exact = retrieval_ranks(vision, text, items, items)
    approximate = retrieval_ranks(vision, text, items, items, index="ivf", depth=800,
                                  index_params={"nlist": 8, "nprobe": 8, "search": search})
    assert not approximate.censored.any()
    assert np.array_equal(approximate.higher, exact.higher)
    for k in (1, 5, 10):
        assert approximate.recall_at(k).mean() == pytest.approx(exact.recall_at(k).mean())


def test_ivf_lists_rank_ties_like_exact_search():
    # Collapsed text: every text vector identical, so every query ties with the whole gallery.
    vision, _ = clustered_data(n=400, seed=2)
    text = np.ones_like(vision)
    items = np.arange(len(vision))
    approximate = retrieval_ranks(vision, text, items, items, index="ivf", index_params={"nlist": 4, "nprobe": 4})
    assert not approximate.censored.any()
    assert approximate.tied.tolist() == [len(text) - 1] * len(text)
    assert approximate.recall_at(1).mean() == pytest.approx(1 / len(text))


def test_ivf_lists_censor_unprobed_positives():
    vision, text = clustered_data(n=1200, clusters=40, seed=3)
    items = np.arange(len(vision))
    shuffled = np.random.default_rng(0).permutation(items)  # pair each vision row with a random text row
    ranks = retrieval_ranks(vision, text, items, shuffled, index="ivf", index_params={"nlist": 30, "nprobe": 1})
    assert ranks.censored.sum() > len(items) // 2
    assert ranks.recall_at(1)[ranks.censored].sum() == 0
    assert retrieval_metrics(ranks)["mean_rank"] is None


def test_censored_queries_count_as_misses():
    ranks = RankCounts(
        higher=np.array([0, 3, 0]), tied=np.zeros(3, np.int64), tied_positives=np.ones(3, np.int64),
        n_positives=np.ones(3, np.int64), gallery_size=np.full(3, 100), censored=np.array([False, False, True]),
        depth=10,
    )
    metrics = retrieval_metrics(ranks)
    assert metrics["recall@1"] == pytest.approx(1 / 3)
    assert metrics["recall@5"] == pytest.approx(2 / 3)
    assert metrics["mrr"] == pytest.approx((1 + 1 / 4) / 3)
    assert metrics["mean_rank"] is None
    assert metrics["median_rank"] == 4.0
    assert metrics["censored"] == 1


# --------------------------------------------------------------------------------------------------
# Bad input


def bad_input_cases():
    vision, text, pages = paired_data(n_pages=5, panels=(2, 4), dim=6, seed=1)
    n = len(vision)
    nan_text = text.copy()
    nan_text[3, 2] = np.nan
    inf_vision = vision.copy()
    inf_vision[1, 0] = np.inf
    return [
        ("one-d", dict(first=vision[:, 0], second=text), "2-D"),
        ("dimension mismatch", dict(first=vision, second=text[:, :4]), "dimension 6 but text has 4"),
        ("row count mismatch", dict(first=vision, second=text[:-1]), "need vision_item and text_item"),
        ("item length", dict(first=vision, second=text, first_items=np.arange(n - 1), second_items=np.arange(n)),
         f"vision item ids has {n - 1} entries but vision has {n} rows"),
        ("no partner", dict(first=vision, second=text, first_items=np.arange(n) + 1000, second_items=np.arange(n)),
         f"{n} of {n} vision rows have no text row with the same item id (first: vision row 0, item 1000)"),
        ("items on one side", dict(first=vision, second=text, first_items=np.arange(n)), "text item ids are missing"),
        ("pages on one side", dict(first=vision, second=text, first_pages=pages), "text page ids are missing"),
        ("nan row", dict(first=vision, second=nan_text), "text row 3 contains NaN or infinite values"),
        ("inf row", dict(first=inf_vision, second=text), "vision row 1 contains NaN or infinite values"),
        ("k above gallery", dict(first=vision, second=text, ks=[1, n + 1]),
         f"recall@{n + 1} needs at least {n + 1} gallery items"),
        ("k not positive", dict(first=vision, second=text, ks=[0]), "positive integer"),
        ("empty side", dict(first=vision[:0], second=text[:0]), "is empty"),
        ("no text at all", dict(first=vision, second=text, has_text=np.zeros(n, np.uint8)), "has_text = 0"),
        ("unknown index", dict(first=vision, second=text, index="lsh"), "unknown index 'lsh'"),
        ("depth below k", dict(first=vision, second=text, index="hnsw", depth=5), "below the largest recall"),
        ("same modality", dict(first=vision, second=text, names=("text", "text")), "must differ"),
        ("float items", dict(first=vision, second=text, first_items=np.arange(n) + 0.5,
                             second_items=np.arange(n) + 0.5), "integer ids"),
        ("pair off its page", dict(first=vision, second=text, first_pages=pages, second_pages=np.roll(pages, 1)),
         "on their page"),
        ("page scope without pages", dict(first=vision, second=text, scopes=["page"]),
         "page-scope retrieval needs page ids"),
    ]


@pytest.mark.parametrize("case", bad_input_cases(), ids=lambda case: case[0])
def test_bad_input_raises_one_line_error(case):
    _, arguments, message = case
    with pytest.raises(InputError) as caught:
        bidirectional_retrieval(**arguments)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# Command line


CONTRACT_KEYS = {"n_queries", "gallery_size", "recall@1", "recall@5", "recall@10", "mrr", "median_rank",
                 "mean_rank", "chance@1"}
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "embeddings"


def write_epoch(path: Path, epoch: int, *, noise: float, seed: int = 0, n_pages: int = 12) -> Path:
    from safetensors.numpy import save_file

    vision, text, pages = paired_data(n_pages=n_pages, panels=(2, 6), dim=16, noise=noise, seed=seed + epoch)
    has_text = np.ones(len(pages), dtype=np.uint8)
    has_text[::5] = 0
    arrays = {"vision": vision, "text": text, "fused": vision + text, "page": pages.astype(np.int64),
              "item": np.arange(len(pages), dtype=np.int64), "has_text": has_text}
    save_file(arrays, str(path), metadata={"format": "collapse-toolkit/embeddings", "epoch": str(epoch)})
    return path


def run_cli(*arguments):
    from click.testing import CliRunner

    from diagnose.cli import main

    return CliRunner().invoke(main, ["retrieval", *arguments])


def test_cli_json_follows_contract(tmp_path):
    path = write_epoch(tmp_path / "epoch.safetensors", 3, noise=1.0)
    result = run_cli(str(path), "-k", "1,2,20", "--json", "-")
    assert result.exit_code == 0, result.output

    document = json.loads(result.stdout)
    assert document["schema"] == "retrieval/1"
    assert document["source"] == str(path)
    assert set(document["directions"]) == {"vision->text", "text->vision"}
    for entry in document["directions"].values():
        assert set(entry) == {"global", "page"}
        for metrics in entry.values():
            assert CONTRACT_KEYS <= set(metrics)
            assert {"recall@2", "recall@20"} <= set(metrics)
    assert document["excluded"]["no_text"] > 0
    assert document["epochs"] is None


def test_cli_run_directory_has_trajectory(tmp_path):
    embeddings = tmp_path / "run" / "embeddings"
    embeddings.mkdir(parents=True)
    for epoch, noise in ((1, 3.0), (2, 1.0), (3, 0.3)):
        write_epoch(embeddings / f"epoch_{epoch:04d}.safetensors", epoch, noise=noise)
    json_path = tmp_path / "retrieval.json"
    result = run_cli(str(tmp_path / "run"), "--json", str(json_path))
    assert result.exit_code == 0, result.output

    document = json.loads(json_path.read_text())
    assert [entry["epoch"] for entry in document["epochs"]] == [1, 2, 3]
    assert document["epoch"] == 3
    recall = [entry["directions"]["vision->text"]["global"]["recall@1"] for entry in document["epochs"]]
    assert recall[0] < recall[1] < recall[2]
    assert document["directions"]["vision->text"]["global"]["recall@1"] == recall[2]
    assert "Per-epoch trajectory" in result.stdout


def test_cli_collapsed_fixture_scores_at_chance():
    result = run_cli(str(FIXTURES / "collapsed.safetensors"), "--scope", "global", "--json", "-")
    assert result.exit_code == 0, result.output
    collapsed = json.loads(result.stdout)["directions"]["vision->text"]["global"]
    healthy_result = run_cli(str(FIXTURES / "healthy.safetensors"), "--scope", "global", "--json", "-")
    healthy = json.loads(healthy_result.stdout)["directions"]["vision->text"]["global"]
    assert collapsed["recall@1"] < 3 * collapsed["chance@1"]
    assert healthy["recall@1"] > 0.5


def test_cli_one_way_and_approximate(tmp_path):
    path = write_epoch(tmp_path / "epoch.safetensors", 0, noise=0.5, n_pages=150)
    result = run_cli(str(path), "--one-way", "--index", "ivf", "--nprobe", "2", "--scope", "global",
                     "--sample", "20", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert list(document["directions"]) == ["vision->text"]
    metrics = document["directions"]["vision->text"]["global"]
    assert metrics["index"] == "ivf"
    assert metrics["index_parameters"]["nprobe"] == 2
    assert metrics["approx_sample"] == 20
    assert metrics["mrr_lower_bound"] is True
    assert "WARNING" not in result.stderr


def test_cli_bad_input_exits_2(tmp_path):
    vision_only = tmp_path / "vision_only.npz"
    np.savez(vision_only, vision=np.ones((4, 3), np.float32))
    result = run_cli(str(vision_only))
    assert result.exit_code == 2
    assert f"{vision_only}: no modality 'text'" in result.stderr
    assert result.stderr.count("\n") == 1

    nan_file = tmp_path / "nan.npz"
    text = np.ones((4, 3), np.float32)
    text[2, 1] = np.nan
    np.savez(nan_file, vision=np.ones((4, 3), np.float32), text=text)
    result = run_cli(str(nan_file))
    assert result.exit_code == 2
    assert f"{nan_file}: text row 2 contains NaN or infinite values" in result.stderr

    unpaired = tmp_path / "unpaired.npz"
    np.savez(unpaired, vision=np.ones((4, 3), np.float32), text=np.ones((6, 3), np.float32),
             vision_item=np.arange(4), text_item=np.arange(6) + 2)
    result = run_cli(str(unpaired))
    assert result.exit_code == 2
    assert "2 of 4 vision rows have no text row with the same item id (first: vision row 0, item 0)" in result.stderr

    result = run_cli(str(unpaired), "-k", "1,x")
    assert result.exit_code == 2
    assert "comma-separated integers" in result.stderr


def test_cli_without_page_ids_measures_global_scope(tmp_path):
    vision, text, _ = paired_data(n_pages=6, dim=8, seed=4)
    path = tmp_path / "no_pages.npz"
    np.savez(path, vision=vision, text=text)

    result = run_cli(str(path), "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for entry in document["directions"].values():
        assert entry["page"] is None
        assert CONTRACT_KEYS <= set(entry["global"])
    assert document["notes"] == ["no page ids, so only the global scope was measured"]

    result = run_cli(str(path), "--scope", "page")
    assert result.exit_code == 2
    assert f"{path}: page-scope retrieval needs page ids" in result.stderr
    assert result.stderr.count("\n") == 1


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


@pytest.mark.skipif(faiss_gpus() > 0, reason="FAISS sees a GPU, so there is no fallback to test")
def test_gpu_request_without_gpu_falls_back_with_note():
    vision, text, _ = paired_data(n_pages=8, seed=12)
    result = bidirectional_retrieval(vision, text, scopes=["global"], device="gpu")
    reference = bidirectional_retrieval(vision, text, scopes=["global"], device="cpu")
    assert result["index"]["device"] == "cpu"
    assert "no GPU" in result["index"]["note"]
    assert result["directions"] == reference["directions"]

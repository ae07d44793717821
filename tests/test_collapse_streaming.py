"""Streamed and distributed collapse results equal the in-memory ones."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from diagnose.collapse import CollapseAccumulator, collapse_metrics
from diagnose.documents import collapse_document
from diagnose.io import InputError

EXACT_KEYS = ("effective_rank", "effective_rank_cov", "participation_ratio", "rank_99", "dead_dims", "std_l2")


def make_store(path, rng, pages=40, max_panels=6, dim=12, chunk_pages=7):
    import zarr

    counts = rng.integers(1, max_panels + 1, size=pages)
    masks = np.arange(max_panels)[None, :] < counts[:, None]
    centres = rng.standard_normal((pages, 1, dim))
    embeddings = (centres + 0.5 * rng.standard_normal((pages, max_panels, dim))).astype(np.float32)
    embeddings[~masks] = 0.0
    group = zarr.open_group(str(path), mode="w")
    group.create_array("panel_embeddings", data=embeddings, chunks=(chunk_pages, max_panels, dim))
    group.create_array("panel_masks", data=masks, chunks=(chunk_pages, max_panels))
    return embeddings[masks], np.repeat(np.arange(pages), counts)


def assert_same_metrics(first, second, exact_tolerance=1e-5):
    """Second moments of float32 rows come from float32 products over blocks that follow the chunking,
    so spectral figures agree to float32 rounding; sums of normalised rows agree to float64 rounding."""
    for key in EXACT_KEYS:
        assert first[key] == pytest.approx(second[key], rel=exact_tolerance), key
    for key in ("mean", "std", "p05", "p50", "p95"):
        assert first["cosine"][key] == pytest.approx(second["cosine"][key], abs=1e-6), key
    assert first["cosine"]["pairs_sampled"] == second["cosine"]["pairs_sampled"]
    assert first["uniformity"] == pytest.approx(second["uniformity"], abs=1e-6)
    if first["groups"] is None:
        assert second["groups"] is None
    else:
        assert first["groups"]["intra_cosine"] == pytest.approx(second["groups"]["intra_cosine"], abs=1e-6)
        assert first["groups"]["inter_cosine"] == pytest.approx(second["groups"]["inter_cosine"], abs=1e-6)
    assert first["verdict"] == second["verdict"]


def test_every_format_streams_like_memory(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((500, 16)).astype(np.float32) @ rng.standard_normal((16, 16)).astype(np.float32)
    pages = np.repeat(np.arange(100), 5).astype(np.int64)
    in_memory = collapse_metrics(matrix, pages)

    np.save(tmp_path / "m.npy", matrix)
    np.savez(tmp_path / "m.npz", fused=matrix, page=pages)
    torch.save({"fused": torch.from_numpy(matrix), "page": torch.from_numpy(pages)}, tmp_path / "m.pt")
    save_file({"fused": matrix, "page": pages}, str(tmp_path / "m.safetensors"))
    for name in ("m.npz", "m.pt", "m.safetensors"):
        streamed = collapse_document(tmp_path / name, chunk_rows=37)["modalities"]["fused"]
        assert_same_metrics(streamed, in_memory)
    without_pages = collapse_document(tmp_path / "m.npy", chunk_rows=37)["modalities"]["fused"]
    assert_same_metrics(without_pages, collapse_metrics(matrix))


def test_zarr_streams_like_memory(tmp_path):
    rng = np.random.default_rng(1)
    rows, pages = make_store(tmp_path / "store.zarr", rng)
    streamed = collapse_document(tmp_path / "store.zarr", chunk_rows=29)["modalities"]["fused"]
    assert_same_metrics(streamed, collapse_metrics(rows, pages))


def test_sample_independent_of_chunking():
    rng = np.random.default_rng(2)
    matrix = rng.standard_normal((3000, 8))
    small = collapse_metrics(matrix, sample_rows=500, chunk_rows=61)
    large = collapse_metrics(matrix, sample_rows=500, chunk_rows=3000)
    for key in ("std", "p05", "p50", "p95", "pairs_sampled"):
        assert small["cosine"][key] == large["cosine"][key], key
    assert small["uniformity"] == large["uniformity"]


def test_merged_partials_equal_one_pass():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((900, 10))
    one_pass = CollapseAccumulator(10, sample_rows=200, seed=4)
    one_pass.update(matrix)
    first = CollapseAccumulator(10, sample_rows=200, seed=4)
    first.update(matrix[:400])
    second = CollapseAccumulator(10, sample_rows=200, seed=4, row_offset=400)
    second.update(matrix[400:])
    first.merge(second)
    assert_same_metrics(first.result(), one_pass.result())


def test_dask_equals_local(tmp_path):
    pytest.importorskip("dask")
    rng = np.random.default_rng(5)
    make_store(tmp_path / "store.zarr", rng, pages=60, chunk_pages=9)
    local = collapse_document(tmp_path / "store.zarr")["modalities"]["fused"]
    distributed = collapse_document(tmp_path / "store.zarr", use_dask=True)["modalities"]["fused"]
    assert_same_metrics(distributed, local)


def test_dask_low_rank_takes_exact_pass(tmp_path):
    pytest.importorskip("dask")
    import zarr

    rng = np.random.default_rng(6)
    basis = rng.standard_normal((2, 24))
    embeddings = (rng.standard_normal((50, 4, 2)) @ basis).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "low.zarr"), mode="w")
    group.create_array("panel_embeddings", data=embeddings, chunks=(8, 4, 24))
    group.create_array("panel_masks", data=np.ones((50, 4), dtype=bool))
    result = collapse_document(tmp_path / "low.zarr", use_dask=True)["modalities"]["fused"]
    assert result["gram_precision"] == "float64 (second pass)"
    local = collapse_metrics(embeddings.reshape(200, 24))
    assert result["effective_rank"] == pytest.approx(local["effective_rank"], rel=1e-6)
    assert result["effective_rank"] == pytest.approx(2.0, abs=0.05)


def test_dask_rejects_other_inputs(tmp_path):
    np.save(tmp_path / "m.npy", np.ones((4, 3), dtype=np.float32))
    with pytest.raises(InputError, match="Zarr stores only"):
        collapse_document(tmp_path / "m.npy", use_dask=True)

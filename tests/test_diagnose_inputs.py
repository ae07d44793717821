"""Every embedding format loads, and every kind of bad input gives one line on stderr and exit 2."""

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import save_file

from diagnose.cli import main
from diagnose.documents import collapse_document


def run_collapse(*args):
    result = CliRunner().invoke(main, ["collapse", *map(str, args)])
    return result


def assert_input_error(result, fragment):
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture
def matrix():
    return np.random.default_rng(0).standard_normal((60, 8)).astype(np.float32)


def test_every_format_gives_same_metrics(tmp_path, matrix):
    pages = np.repeat(np.arange(12), 5).astype(np.int64)
    np.save(tmp_path / "a.npy", matrix)
    np.savez(tmp_path / "b.npz", fused=matrix, page=pages)
    np.savez(tmp_path / "c.npz", matrix)
    torch.save(torch.from_numpy(matrix), tmp_path / "d.pt")
    torch.save({"fused": torch.from_numpy(matrix), "page": torch.from_numpy(pages)}, tmp_path / "e.pt")
    save_file({"fused": matrix, "page": pages}, str(tmp_path / "f.safetensors"))

    import zarr

    store = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    padded = np.zeros((12, 7, 8), dtype=np.float32)
    masks = np.zeros((12, 7), dtype=bool)
    padded[:, :5] = matrix.reshape(12, 5, 8)
    masks[:, :5] = True
    store.create_array("panel_embeddings", data=padded, chunks=(5, 7, 8))
    store.create_array("panel_masks", data=masks)

    reference = collapse_document(tmp_path / "a.npy")["modalities"]["fused"]
    for name in ("b.npz", "c.npz", "d.pt", "e.pt", "f.safetensors", "g.zarr"):
        fused = collapse_document(tmp_path / name, chunk_rows=7)["modalities"]["fused"]
        assert fused["effective_rank"] == pytest.approx(reference["effective_rank"], rel=1e-6), name
        assert fused["cosine"]["mean"] == pytest.approx(reference["cosine"]["mean"], abs=1e-7), name
    with_pages = collapse_document(tmp_path / "g.zarr")["modalities"]["fused"]["groups"]
    assert with_pages == collapse_document(tmp_path / "b.npz")["modalities"]["fused"]["groups"]


def test_json_output_has_contract_keys(tmp_path, matrix):
    np.save(tmp_path / "a.npy", matrix)
    result = CliRunner().invoke(main, ["collapse", str(tmp_path / "a.npy"), "--json", str(tmp_path / "out.json")])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out.json").read_text())
    assert document["schema"] == "collapse/1"
    assert set(document) >= {"schema", "source", "modalities", "pairs", "verdict", "epochs"}
    fused = document["modalities"]["fused"]
    for key in ("n", "dim", "effective_rank", "effective_rank_ratio", "effective_rank_cov", "participation_ratio",
                "rank_99", "dead_dims", "std_l2", "std_l2_ratio", "cosine", "uniformity", "groups", "verdict"):
        assert key in fused
    assert set(fused["cosine"]) >= {"mean", "std", "p05", "p50", "p95"}


def test_missing_file(tmp_path):
    assert_input_error(run_collapse(tmp_path / "nope.safetensors"), "no such file")


@pytest.mark.parametrize("suffix", [".safetensors", ".npy", ".npz", ".pt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    assert_input_error(run_collapse(path), "empty")


def test_truncated_files(tmp_path, matrix):
    save_file({"fused": matrix}, str(tmp_path / "full.safetensors"))
    np.save(tmp_path / "full.npy", matrix)
    np.savez(tmp_path / "full.npz", fused=matrix)
    torch.save(torch.from_numpy(matrix), tmp_path / "full.pt")
    for name in ("full.safetensors", "full.npy", "full.npz", "full.pt"):
        data = (tmp_path / name).read_bytes()
        truncated = tmp_path / f"cut_{name}"
        truncated.write_bytes(data[: len(data) * 2 // 3])
        result = run_collapse(truncated)
        assert result.exit_code == 2, (name, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, (name, result.stderr)
        assert str(truncated) in result.stderr


class Payload:
    """Any class: unpickling it would run arbitrary code."""


def test_pickled_objects_refused(tmp_path):
    torch.save({"fused": Payload()}, tmp_path / "object.pt")
    result = run_collapse(tmp_path / "object.pt")
    assert_input_error(result, "contains objects that weights_only loading rejects")
    assert "Payload" in result.stderr
    assert "weights_only` set to `False`" not in result.stderr
    np.savez(tmp_path / "object.npz", fused=np.array([Payload(), Payload()], dtype=object))
    assert_input_error(run_collapse(tmp_path / "object.npz"), "pickled")
    (tmp_path / "object.npy").write_bytes(b"")
    np.save(tmp_path / "object.npy", np.array([[Payload()], [Payload()]], dtype=object), allow_pickle=True)
    assert_input_error(run_collapse(tmp_path / "object.npy"), "pickle")
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Payload()))
    # torch warns about the pickle protocol before it rejects the file, which must not add a line.
    assert_input_error(run_collapse(raw), "weights_only loading rejects")


def test_nan_and_infinite_rows(tmp_path, matrix):
    with_nan = matrix.copy()
    with_nan[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    assert_input_error(run_collapse(tmp_path / "nan.npy"), "row 17")
    with_inf = matrix.copy()
    with_inf[4] = np.inf
    save_file({"fused": with_inf}, str(tmp_path / "inf.safetensors"))
    assert_input_error(run_collapse(tmp_path / "inf.safetensors"), "row 4")


def test_too_few_rows_and_wrong_rank(tmp_path):
    np.save(tmp_path / "one.npy", np.ones((1, 8), dtype=np.float32))
    assert_input_error(run_collapse(tmp_path / "one.npy"), "at least 2")
    np.save(tmp_path / "flat.npy", np.ones(8, dtype=np.float32))
    assert_input_error(run_collapse(tmp_path / "flat.npy"), "2-D")


def test_page_array_of_wrong_length(tmp_path, matrix):
    save_file({"fused": matrix, "page": np.arange(10, dtype=np.int64)}, str(tmp_path / "pages.safetensors"))
    assert_input_error(run_collapse(tmp_path / "pages.safetensors"), "'page' has length 10")


def test_run_directory_without_epochs(tmp_path):
    (tmp_path / "run" / "embeddings").mkdir(parents=True)
    assert_input_error(run_collapse(tmp_path / "run"), "no epoch_NNNN")
    (tmp_path / "plain").mkdir()
    assert_input_error(run_collapse(tmp_path / "plain"), "not a run directory")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("1,2\n3,4\n")
    assert_input_error(run_collapse(path), "unsupported file type")


def test_unknown_modality(tmp_path, matrix):
    np.save(tmp_path / "a.npy", matrix)
    result = CliRunner().invoke(main, ["collapse", str(tmp_path / "a.npy"), "--modality", "audio"])
    assert_input_error(result, "no modality 'audio'")


def test_real_process_prints_no_traceback(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    completed = subprocess.run(
        [sys.executable, "-m", "diagnose.cli", "collapse", str(path)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert completed.stderr.count("\n") == 1
    assert "Traceback" not in completed.stderr
    assert completed.stdout == ""


def test_help_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from diagnose.cli import main\n"
        "for args in (['--help'], ['collapse', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "heavy = [name for name in ('torch', 'faiss', 'umap', 'sklearn', 'zarr') if name in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == ""


def test_text_modality_skips_panels_without_text(tmp_path, matrix):
    has_text = np.ones(60, dtype=np.uint8)
    has_text[::3] = 0
    text = matrix.copy()
    text[has_text == 0] = 1.0  # what an encoder gives every empty string
    save_file({"fused": matrix, "text": text, "has_text": has_text}, str(tmp_path / "t.safetensors"))
    document = collapse_document(tmp_path / "t.safetensors")
    assert document["modalities"]["text"]["n"] == 40
    assert document["modalities"]["text"]["rows_without_text_excluded"] == 20
    expected = collapse_document(tmp_path / "t.safetensors", modalities=["fused"])["modalities"]["fused"]
    assert document["modalities"]["fused"]["n"] == expected["n"] == 60


def test_overflowing_rows(tmp_path, matrix):
    huge = matrix.copy()
    huge[9] = 3e30  # finite in float32, but its square is not
    np.save(tmp_path / "huge.npy", huge)
    assert_input_error(run_collapse(tmp_path / "huge.npy"), "overflow")


def test_outputs_never_replace_inputs(tmp_path, matrix):
    save_file({"fused": matrix}, str(tmp_path / "v.safetensors"))
    (tmp_path / "v.pages.json").write_text("[]")
    before = (tmp_path / "v.safetensors").read_bytes()
    for target in ("v.safetensors", "v.pages.json", "../" + tmp_path.name + "/v.safetensors"):
        result = CliRunner().invoke(main, ["collapse", str(tmp_path / "v.safetensors"), "--json", str(tmp_path / target)])
        assert_input_error(result, "would overwrite an input")
    assert (tmp_path / "v.safetensors").read_bytes() == before
    assert (tmp_path / "v.pages.json").read_text() == "[]"


def test_output_folder_checked_before_work(tmp_path, matrix):
    np.save(tmp_path / "a.npy", matrix)
    result = run_collapse(tmp_path / "a.npy", "--json", tmp_path / "missing" / "out.json")
    assert_input_error(result, "folder")


@pytest.mark.parametrize("dtype", ["U3", "S3", "complex64", "datetime64[s]"])
def test_npy_with_non_real_dtype(tmp_path, dtype):
    np.save(tmp_path / "odd.npy", np.zeros((4, 3), dtype=dtype))
    assert_input_error(run_collapse(tmp_path / "odd.npy"), "dtype")


@pytest.mark.parametrize("option", ["--min-rank-ratio", "--complete-std-ratio", "--group-intra-cosine"])
def test_non_finite_thresholds_rejected(tmp_path, matrix, option):
    np.save(tmp_path / "a.npy", matrix)
    result = run_collapse(tmp_path / "a.npy", option, "nan")
    assert result.exit_code == 2
    assert "not a finite number" in result.stderr

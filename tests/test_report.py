"""`diagnose report`: a self-contained HTML page that opens offline, escapes data, and draws real pictures."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from diagnose.cli import main
from diagnose.run_summary import loss_sparsity, read_training_log
from fake_runs import epoch_arrays, make_run, write_embedding_file

SCRIPT_PAGE = "<script>alert(1)</script>"


def run_report(*args):
    return CliRunner().invoke(main, ["report", *map(str, args)])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def write_run(root):
    page_ids = [f"page_{index:03d}" for index in range(8)]
    page_ids[3] = SCRIPT_PAGE
    return make_run(
        root, epochs=3, page_ids=page_ids, validation_losses=[3.0, 2.5, 2.7],
        run_info={"config": {"preset": "default", "model": {"vision_backbone": "tiny_cnn"}}, "seed": 0},
    )


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run")


@pytest.fixture(scope="module")
def report_files(tmp_path_factory):
    """One report of a three-epoch run, rendered once for the tests that only read it."""
    folder = tmp_path_factory.mktemp("report")
    output = folder / "report.html"
    document_path = folder / "report.json"
    result = run_report(write_run(folder / "run"), "-o", output, "--map", "pca", "--json", document_path)
    assert result.exit_code == 0, result.output
    return output, json.loads(document_path.read_text()), result


def test_report_has_no_external_address(report_files):
    page = report_files[0].read_text(encoding="utf-8")
    assert re.search(r"https?://", page, re.IGNORECASE) is None
    assert re.search(r"(?<![\w:])//[A-Za-z0-9.-]+\.[A-Za-z]{2,}", page) is None
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", page, re.IGNORECASE)
    assert sources, "the report should embed its pictures"
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert re.search(r"\bhref\s*=", page, re.IGNORECASE) is None
    assert "url(" not in page
    assert "@import" not in page


def test_report_escapes_page_ids(report_files):
    page = report_files[0].read_text(encoding="utf-8")
    assert SCRIPT_PAGE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page.lower()


def test_report_sections_and_figures(report_files):
    page = report_files[0].read_text(encoding="utf-8")
    document = report_files[1]
    for heading in ("Verdict", "Key figures", "Per-epoch trajectories", "Singular-value spectrum",
                    "Pairwise cosine", "2-D maps", "Loss-signal sparsity", "Pages with the closest panels"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count("data:image/png;base64,") == 3 + 3  # trajectories, spectrum, histogram + 3 map figures
    assert document["schema"] == "report/1"
    assert [row["epoch"] for row in document["epochs"]] == [1, 2, 3]
    assert document["best_epoch"] == 2
    assert document["best_epoch_reason"] == "lowest validation loss in metrics.jsonl"
    assert [entry["label"] for entry in document["maps"]] == ["epoch 1 (first)", "epoch 2 (best)", "epoch 3 (last)"]


def test_report_retrieval_in_both_directions(report_files):
    _, document, _ = report_files
    metrics = document["epochs"][-1]["metrics"]
    for direction in ("vision->text", "text->vision"):
        assert 0.0 <= metrics[f"{direction}.recall@1"] <= metrics[f"{direction}.recall@5"] <= 1.0
        # Text embeddings are noisy copies of their vision embeddings, so retrieval beats chance.
        assert metrics[f"{direction}.recall@1"] > 2 * metrics[f"{direction}.chance@1"]


def test_report_sparsity_matches_log(report_files):
    _, document, _ = report_files
    sparsity = document["sparsity"]
    assert sparsity["reconstruction"]["steps"] == 12
    assert sparsity["reconstruction"]["zero_share"] == pytest.approx(3 / 12)
    assert sparsity["contrastive"]["zero_share"] == 0.0
    assert sparsity["reconstruction"]["active"]["min"] == 0
    assert document["epochs"][0]["metrics"]["reconstruction.zero_share"] == pytest.approx(1 / 4)
    shares = [entry["weighted_share"] for entry in sparsity.values()]
    assert sum(shares) == pytest.approx(1.0)


def test_report_terminal_summary(report_files):
    _, _, result = report_files
    assert "epoch 2 (best)" in result.stdout
    assert "verdict:" in result.stdout
    assert "report written to" in result.stderr


def test_training_log_per_epoch(tmp_path):
    run = make_run(tmp_path / "run", epochs=2, validation_losses=[2.0, 1.0], steps_per_epoch=4,
                   zero_reconstruction_steps=2)
    log = read_training_log(run / "metrics.jsonl")
    assert log.components == ["contrastive", "reconstruction", "alignment"]
    assert log.best_epoch() == 2
    assert log.epochs[1].steps == 4
    assert log.epochs[1].zero_share["reconstruction"] == 0.5
    assert log.epochs[1].validation_loss == 2.0
    assert log.epochs[2].train["alignment"] == pytest.approx(1.8)
    assert loss_sparsity(log)["reconstruction"]["zero_share"] == 0.5


def test_best_epoch_from_checkpoint(tmp_path):
    run = make_run(tmp_path / "run", epochs=3, validation_losses=None, best_checkpoint_epoch=1)
    output = tmp_path / "report.html"
    document_path = tmp_path / "report.json"
    result = run_report(run, "-o", output, "--map", "pca", "--json", document_path)
    assert result.exit_code == 0, result.output
    document = json.loads(document_path.read_text())
    assert document["best_epoch"] == 1
    assert document["best_epoch_reason"] == "epoch of checkpoints/best.pt"


def test_single_embedding_file(tmp_path):
    # 9 panels, and 9 + 9 + 7 rows in the modality map: too few for UMAP, so both maps fall back to PCA.
    arrays = epoch_arrays(4, pages=3, panels_per_page=3, dim=8, seed=1)
    path = write_embedding_file(tmp_path / "val.safetensors", arrays, 4, [f"p{index}" for index in range(3)])
    output = tmp_path / "single.html"
    document_path = tmp_path / "single.json"
    result = run_report(path, "-o", output, "--json", document_path)
    assert result.exit_code == 0, result.output
    page = output.read_text()
    document = json.loads(document_path.read_text())
    assert "Per-epoch trajectories" not in page
    assert "Singular-value spectrum" in page
    assert document["is_run"] is False
    assert [row["epoch"] for row in document["epochs"]] == [4]
    assert document["maps"][0]["method"] == "PCA"
    assert document["maps"][0]["modality_method"] == "PCA"
    assert "too few points for UMAP (9 &lt; 30)" in page
    assert "too few points for UMAP (25 &lt; 30)" in page


def test_report_without_vision_and_text(tmp_path):
    matrix = np.random.default_rng(0).standard_normal((40, 6)).astype(np.float32)
    np.save(tmp_path / "plain.npy", matrix)
    output = tmp_path / "plain.html"
    document_path = tmp_path / "plain.json"
    result = run_report(tmp_path / "plain.npy", "-o", output, "--map", "pca", "--json", document_path)
    assert result.exit_code == 0, result.output
    page = output.read_text()
    document = json.loads(document_path.read_text())
    assert "no vision and text matrices, so retrieval was not measured" in page
    assert document["maps"][0]["modality_method"] is None
    assert document["epochs"][0]["metrics"]["vision->text.recall@1"] is None
    assert "Pages with the closest panels" not in page


def test_report_replaces_file_atomically(run_dir, tmp_path):
    output = tmp_path / "out" / "report.html"
    output.parent.mkdir()
    output.write_text("old")
    result = run_report(run_dir, "-o", output, "--map", "pca", "--no-retrieval")
    assert result.exit_code == 0, result.output
    assert output.read_text().startswith("<!DOCTYPE html>")
    assert sorted(path.name for path in output.parent.iterdir()) == ["report.html"]


@pytest.mark.parametrize("case", ["missing", "folder", "bad_log", "not_embeddings"])
def test_report_bad_input(tmp_path, run_dir, case):
    output = tmp_path / "report.html"
    if case == "missing":
        result = run_report(tmp_path / "nowhere", "-o", output)
        assert_one_line_error(result, "no such file or directory")
    elif case == "folder":
        result = run_report(run_dir, "-o", tmp_path / "absent" / "report.html")
        assert_one_line_error(result, "does not exist")
    elif case == "bad_log":
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        lines[2] = "{not json"
        (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        result = run_report(run_dir, "-o", output, "--map", "pca")
        assert_one_line_error(result, "metrics.jsonl: line 3 is not valid JSON")
    else:
        (tmp_path / "notes.txt").write_text("hello")
        result = run_report(tmp_path / "notes.txt", "-o", output)
        assert_one_line_error(result, "unsupported file type .txt")
    assert not output.exists()


def test_interrupted_last_log_line_is_skipped(run_dir, tmp_path):
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "step", "epoch": 3, "st')
    result = run_report(run_dir, "-o", tmp_path / "report.html", "--map", "pca", "--no-retrieval")
    assert result.exit_code == 0, result.output
    assert "incomplete JSON and was ignored" in result.stderr


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--enable-logging=stderr", "--v=0", "--hide-scrollbars",
]


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_chromium(report_files, tmp_path):
    from PIL import Image

    html_path = report_files[0]
    screenshot = tmp_path / "report.png"
    completed = subprocess.run(
        [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1280,2000", html_path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "Uncaught" not in completed.stderr
    assert "ERROR:CONSOLE" not in completed.stderr
    assert "Failed to load resource" not in completed.stderr

    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1_000_000)
    assert colours is not None
    assert len(colours) > 500, f"the screenshot has only {len(colours)} distinct colours"
    pixels = np.asarray(image)
    assert (pixels < 128).any(axis=2).mean() > 0.01, "the screenshot has almost no dark pixels (no text or lines)"


def test_umap_map_and_progress(tmp_path):
    run = make_run(tmp_path / "run", epochs=2, pages=12, panels_per_page=5, validation_losses=[2.0, 1.0])
    output = tmp_path / "report.html"
    document_path = tmp_path / "report.json"
    result = run_report(run, "-o", output, "--json", document_path, "--no-retrieval")
    assert result.exit_code == 0, result.output
    document = json.loads(document_path.read_text())
    assert {entry["method"] for entry in document["maps"]} == {"UMAP"}
    assert "computing UMAP map of epoch 2 (60 points)..." in result.stderr
    assert "UMAP map of the fused embeddings of all 60 panels" in output.read_text()

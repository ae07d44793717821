"""`diagnose compare`: per-epoch figures of two runs with B - A deltas, as a table, JSON and an HTML page."""

import json
import re

import pytest
from click.testing import CliRunner

from diagnose.cli import main
from fake_runs import epoch_arrays, make_run, write_embedding_file


def run_compare(*args):
    return CliRunner().invoke(main, ["compare", *map(str, args)])


def assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """Run A has epochs 1-3; run B has epochs 1-4 and collapses towards one point as it trains."""
    folder = tmp_path_factory.mktemp("compare")
    run_a = make_run(folder / "a", epochs=3, seed=1, validation_losses=[3.0, 2.0, 2.5],
                     run_info={"config": {"preset": "default", "objectives": {"detach_target": True}}})
    run_b = make_run(folder / "b", epochs=4, seed=2, validation_losses=[3.5, 3.0, 2.9, 2.8], shrink_per_epoch=0.3,
                     zero_reconstruction_steps=2,
                     run_info={"config": {"preset": "legacy", "objectives": {"detach_target": False}}})
    html_path = folder / "compare.html"
    result = run_compare(run_a, run_b, "--json", "-", "--html", html_path)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), html_path, result


def test_compare_json_keys(comparison):
    document, _, _ = comparison
    assert document["schema"] == "compare/1"
    assert len(document["runs"]) == 2
    assert document["runs"][0].endswith("a")
    assert document["runs"][1].endswith("b")
    for entry in document["epochs"]:
        assert {"epoch", "metrics"} <= set(entry)
        for values in entry["metrics"].values():
            assert set(values) == {"a", "b", "delta"}
    assert "fused.effective_rank" in document["epochs"][0]["metrics"]
    assert "vision->text.recall@1" in document["epochs"][0]["metrics"]
    assert "reconstruction.zero_share" in document["epochs"][0]["metrics"]


def test_deltas_are_b_minus_a(comparison):
    document, _, _ = comparison
    checked = 0
    for entry in document["epochs"][:3]:
        assert entry["present"] == "both"
        for name, values in entry["metrics"].items():
            if values["a"] is None or values["b"] is None:
                assert values["delta"] is None, name
                continue
            assert values["delta"] == pytest.approx(values["b"] - values["a"], abs=1e-12), name
            checked += 1
    assert checked > 60
    first = document["epochs"][0]["metrics"]
    assert first["loss.validation"] == {"a": 3.0, "b": 3.5, "delta": pytest.approx(0.5)}
    assert first["reconstruction.zero_share"]["delta"] == pytest.approx(0.5 - 0.25)


def test_epoch_in_one_run_only(comparison):
    document, _, _ = comparison
    assert [entry["epoch"] for entry in document["epochs"]] == [1, 2, 3, 4]
    only_b = document["epochs"][3]
    assert only_b["present"] == "b"
    assert only_b["verdict"]["a"] is None
    rank = only_b["metrics"]["fused.effective_rank"]
    assert rank["a"] is None
    assert rank["b"] is not None
    assert rank["delta"] is None


def test_last_and_best_epochs_compared(comparison):
    document, _, _ = comparison
    assert document["last"]["epoch"] == {"a": 3, "b": 4}
    assert document["best_epoch"] == {"a": 2, "b": 4}
    last = document["last"]["metrics"]["fused.cosine_mean"]
    assert last["delta"] == pytest.approx(last["b"] - last["a"])
    # Run B shrinks towards one vector, so its last epoch is much more collapsed than run A's.
    assert last["delta"] > 0.3
    assert document["best"]["epoch"] == {"a": 2, "b": 4}


def test_config_differences(comparison):
    document, _, _ = comparison
    keys = {item["key"]: item for item in document["config_differences"]}
    assert keys["preset"] == {"key": "preset", "a": "default", "b": "legacy"}
    assert keys["objectives.detach_target"]["b"] is False


def test_compare_table_on_terminal(comparison):
    _, _, result = comparison
    # With --json - the tables go to stderr so that stdout holds only the document.
    assert "Last epochs" in result.stderr
    assert "B - A" in result.stderr
    assert "4 (only B)" in result.stderr


def test_compare_html_self_contained(comparison):
    _, html_path, _ = comparison
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert re.search(r"https?://", page, re.IGNORECASE) is None
    sources = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]+)""", page, re.IGNORECASE)
    assert len(sources) == 1
    assert sources[0].startswith("data:image/png;base64,")
    assert "<h2>Trajectories</h2>" in page
    assert "<h2>Configuration differences</h2>" in page
    assert "class='worse'" in page
    assert "class='better'" in page


def test_compare_two_embedding_files(tmp_path):
    first = write_embedding_file(tmp_path / "a.safetensors", epoch_arrays(2, pages=4, panels_per_page=4, dim=8, seed=3),
                                 2, None)
    second = write_embedding_file(tmp_path / "b.safetensors",
                                  epoch_arrays(5, pages=4, panels_per_page=4, dim=8, seed=4, shrink=0.9), 5, None)
    result = run_compare(first, second, "--json", tmp_path / "out.json", "--last-only")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out.json").read_text())
    assert len(document["epochs"]) == 1
    entry = document["epochs"][0]
    assert entry["epoch"] is None
    assert entry["epochs_compared"] == {"a": 2, "b": 5}
    assert entry["present"] == "both"
    rank = entry["metrics"]["fused.std_l2_ratio"]
    assert rank["delta"] == pytest.approx(rank["b"] - rank["a"])
    assert "Every epoch" not in result.stdout


@pytest.mark.parametrize("case", ["missing", "text_file", "empty_folder", "bad_html_folder"])
def test_compare_bad_input(tmp_path, case):
    run = make_run(tmp_path / "run", epochs=1, validation_losses=[1.0])
    if case == "missing":
        result = run_compare(run, tmp_path / "absent")
        assert_one_line_error(result, "absent: no such file or directory")
    elif case == "text_file":
        (tmp_path / "notes.txt").write_text("not a run")
        result = run_compare(tmp_path / "notes.txt", run)
        assert_one_line_error(result, "notes.txt: unsupported file type .txt")
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        result = run_compare(run, tmp_path / "empty")
        assert_one_line_error(result, "not a run directory")
    else:
        result = run_compare(run, run, "--html", tmp_path / "absent" / "page.html")
        assert_one_line_error(result, "does not exist")

"""Loss-signal sparsity: the step-log summary, the exact and simulated predictions, and the command."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from rich.console import Console

from diagnose.cli import main
from diagnose.io import InputError
from diagnose.sparsity import (
    SamplerSettings,
    TrainSplit,
    exact_prediction,
    observed_sparsity,
    predict_sparsity,
    read_step_log,
    simulated_prediction,
    sparsity_document,
    zero_signal_probability,
)
from trainer import loop
from trainer.config import DataConfig
from trainer.data import load_dataset
from trainer_dataset import PageSpec, grid_page, simple_dataset, tiny_config, write_dataset

WEIGHTS = {"contrastive": 1.0, "reconstruction": 0.5, "alignment": 0.3}


def invoke(*args):
    return CliRunner().invoke(main, ["sparsity", *[str(arg) for arg in args]])


def assert_input_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def step(epoch: int, number: int, active: dict, values: dict | None = None) -> dict:
    values = values or {name: 1.0 for name in WEIGHTS}
    components = {name: {"value": values[name], "weight": WEIGHTS[name], "active": active[name]} for name in WEIGHTS}
    return {"kind": "step", "epoch": epoch, "step": number, "loss": 0.0, "lr": 1e-3, "grad_norm": 1.0,
            "components": components}


# Reconstruction gets no signal in 3 of 8 steps (2 in epoch 1, 1 in epoch 2). Alignment is silent in 2
# steps: one with 0 pairs, and one with a single pair, which gives InfoNCE no negative.
ACTIVE = [
    (1, {"contrastive": 5, "reconstruction": 0, "alignment": 4}),
    (1, {"contrastive": 6, "reconstruction": 2, "alignment": 1}),
    (1, {"contrastive": 0, "reconstruction": 0, "alignment": 3}),
    (1, {"contrastive": 8, "reconstruction": 3, "alignment": 5}),
    (2, {"contrastive": 4, "reconstruction": 1, "alignment": 0}),
    (2, {"contrastive": 9, "reconstruction": 1, "alignment": 2}),
    (2, {"contrastive": 2, "reconstruction": 0, "alignment": 6}),
    (2, {"contrastive": 7, "reconstruction": 4, "alignment": 7}),
]


def log_records() -> list[dict]:
    records = []
    for number, (epoch, active) in enumerate(ACTIVE, start=1):
        values = {"contrastive": 2.0, "reconstruction": 1.0 if active["reconstruction"] else 0.0,
                  "alignment": 4.0 if active["alignment"] >= 2 else 0.0}
        records.append(step(epoch, number, active, values))
        if number in (4, 8):
            records.append({"kind": "validation", "epoch": epoch, "loss": 1.0, "components": {}})
    return records


def write_log(folder: Path, records: list[dict], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return path


# --------------------------------------------------------------------------------------------------
# Observed sparsity


def test_zero_shares_of_constructed_log(tmp_path):
    write_log(tmp_path / "run", log_records())
    document = sparsity_document(tmp_path / "run", request=None)

    components = document["components"]
    assert components["reconstruction"]["steps"] == 8
    assert components["reconstruction"]["zero_share"] == 3 / 8
    assert components["contrastive"]["zero_share"] == 1 / 8
    assert components["alignment"]["zero_share"] == 2 / 8
    assert components["alignment"]["min_active"] == 2
    assert document["predicted"] is None
    assert document["schema"] == "sparsity/1"


def test_zero_shares_per_epoch(tmp_path):
    write_log(tmp_path / "run", log_records())
    epochs = sparsity_document(tmp_path / "run")["epochs"]
    assert [entry["epoch"] for entry in epochs] == [1, 2]
    assert [entry["steps"] for entry in epochs] == [4, 4]
    assert [entry["components"]["reconstruction"]["zero_share"] for entry in epochs] == [2 / 4, 1 / 4]
    assert [entry["components"]["alignment"]["zero_share"] for entry in epochs] == [1 / 4, 1 / 4]


def test_active_distribution(tmp_path):
    write_log(tmp_path / "run", log_records())
    active = sparsity_document(tmp_path / "run")["components"]["contrastive"]["active"]
    counts = [entry[1]["contrastive"] for entry in ACTIVE]
    assert active["min"] == 0
    assert active["max"] == 9
    assert active["median"] == float(np.median(counts)) == 5.5
    assert active["p95"] == pytest.approx(np.percentile(counts, 95))
    assert active["mean"] == pytest.approx(sum(counts) / 8)


def test_weighted_share(tmp_path):
    write_log(tmp_path / "run", log_records())
    components = sparsity_document(tmp_path / "run")["components"]
    # Sums of weight * value: contrastive 8 * 2.0, reconstruction 5 steps * 0.5, alignment 6 steps * 0.3 * 4.
    contrastive, reconstruction, alignment = 16.0, 2.5, 7.2
    total = contrastive + reconstruction + alignment
    assert components["contrastive"]["weighted_share"] == pytest.approx(contrastive / total)
    assert components["reconstruction"]["weighted_share"] == pytest.approx(reconstruction / total)
    assert components["alignment"]["weighted_share"] == pytest.approx(alignment / total)


def test_skipped_steps_counted(tmp_path):
    records = log_records()
    records[1]["skipped"] = True
    records[1]["components"]["contrastive"]["value"] = float("nan")
    write_log(tmp_path / "run", records)
    document = sparsity_document(tmp_path / "run")
    assert document["skipped_steps"] == 1
    assert [entry["skipped_steps"] for entry in document["epochs"]] == [1, 0]
    # The NaN value is left out of the weighted sums: 7 steps * 2.0 for contrastive.
    total = 14.0 + 2.5 + 7.2
    assert document["components"]["contrastive"]["weighted_share"] == pytest.approx(14.0 / total)


def test_starved_flag_and_threshold():
    observed = observed_sparsity(log_records(), threshold=0.2)
    assert observed["starved"] == ["reconstruction", "alignment"]
    assert observed_sparsity(log_records(), threshold=0.5)["starved"] == []


def test_epoch_restriction(tmp_path):
    write_log(tmp_path / "run", log_records())
    document = sparsity_document(tmp_path / "run", epoch=2)
    assert document["epoch"] == 2
    assert document["components"]["reconstruction"]["zero_share"] == 1 / 4
    with pytest.raises(InputError, match="no step records of epoch 7"):
        sparsity_document(tmp_path / "run", epoch=7)


def test_truncated_last_line_warns(tmp_path):
    log = write_log(tmp_path / "run", log_records(), tail='{"kind": "step", "epoch": 2, "st')
    with pytest.warns(UserWarning, match="line 11 is cut off"):
        read = read_step_log(log)
    assert len(read.records) == 8
    assert read.truncated_line == 11

    result = invoke(tmp_path / "run", "--json", "-", "--no-predict")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning:") == 1
    assert "line 11 is cut off" in result.stderr
    assert json.loads(result.stdout)["truncated_line"] == 11


def test_invalid_json_inside_log_exit_2(tmp_path):
    log = write_log(tmp_path / "run", log_records())
    lines = log.read_text().splitlines()
    lines[2] = lines[2][:-5]
    log.write_text("\n".join(lines) + "\n")
    assert_input_error(invoke(tmp_path / "run"), "metrics.jsonl: line 3 is not valid JSON")


def test_cut_line_with_newline_exit_2(tmp_path):
    # A final line that ends in a newline was written whole, so invalid JSON there is an error.
    write_log(tmp_path / "run", log_records(), tail='{"kind": "st\n')
    assert_input_error(invoke(tmp_path / "run"), "line 11 is not valid JSON")


@pytest.mark.parametrize("mutate, fragment", [
    (lambda record: record.pop("epoch"), "step record lacks 'epoch'"),
    (lambda record: record["components"]["alignment"].pop("active"), "component 'alignment' lacks 'active'"),
    (lambda record: record["components"]["contrastive"].update(active=-1), "must be a non-negative integer"),
    (lambda record: record["components"]["contrastive"].update(value="high"), "'value' must be a number"),
    (lambda record: record.pop("kind"), "record has no 'kind'"),
    (lambda record: record.update(components=[]), "'components' must be a non-empty object"),
])
def test_missing_fields_exit_2(tmp_path, mutate, fragment):
    records = log_records()
    # Line 6 is the fifth step record (line 5 is a validation record).
    mutate(records[5])
    write_log(tmp_path / "run", records)
    assert_input_error(invoke(tmp_path / "run"), "metrics.jsonl: line 6", fragment)


def test_empty_log_exit_2(tmp_path):
    write_log(tmp_path / "run", [])
    assert_input_error(invoke(tmp_path / "run"), "metrics.jsonl: the log is empty")


def test_log_without_steps_exit_2(tmp_path):
    write_log(tmp_path / "run", [{"kind": "validation", "epoch": 1, "loss": 1.0, "components": {}}])
    assert_input_error(invoke(tmp_path / "run"), "no step records")


def test_missing_inputs_exit_2(tmp_path):
    assert_input_error(invoke(tmp_path / "absent"), "absent: no such file or directory")
    (tmp_path / "empty_run").mkdir()
    assert_input_error(invoke(tmp_path / "empty_run"), "no metrics.jsonl in this run directory")
    (tmp_path / "weights.pt").write_bytes(b"\x80\x02")
    assert_input_error(invoke(tmp_path / "weights.pt"), "expected a run directory, a metrics.jsonl")


def test_invalid_config_for_run_exit_2(tmp_path):
    write_log(tmp_path / "run", log_records())
    config = tmp_path / "broken.toml"
    config.write_text('[optim]\nbatch_size = "eight"\n')
    assert_input_error(invoke(tmp_path / "run", "--config", config), "broken.toml", "optim.batch_size")


def test_fail_on_starved(tmp_path):
    write_log(tmp_path / "run", log_records())
    starved = invoke(tmp_path / "run", "--fail-on", "starved")
    assert starved.exit_code == 1, starved.output
    assert "starved" in starved.stdout
    relaxed = invoke(tmp_path / "run", "--fail-on", "starved", "--max-zero-share", "0.5")
    assert relaxed.exit_code == 0, relaxed.output
    assert "no component starved" in relaxed.stdout


def test_json_contract(tmp_path):
    write_log(tmp_path / "run", log_records())
    result = invoke(tmp_path / "run", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) >= {"schema", "source", "components", "predicted", "starved", "epochs", "threshold"}
    for entry in document["components"].values():
        assert set(entry) >= {"steps", "zero_share", "active", "weighted_share"}
        assert set(entry["active"]) >= {"min", "median", "p95", "max"}


def test_gate_reads_sparsity_from_run(tmp_path):
    write_log(tmp_path / "run", log_records())
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nmetric = "sparsity.components.reconstruction.zero_share"\nmax = 0.3\n'
                     '[[rule]]\nmetric = "sparsity.components.contrastive.zero_share"\nmax = 0.3\n')
    output = tmp_path / "gate.json"
    result = CliRunner().invoke(main, ["gate", str(tmp_path / "run"), "--thresholds", str(rules), "--json", str(output)])
    gate = json.loads(output.read_text())
    assert result.exit_code == 1, result.output
    assert [rule["value"] for rule in gate["rules"]] == [3 / 8, 1 / 8]
    assert [rule["passed"] for rule in gate["rules"]] == [False, True]

    epoch_two = CliRunner().invoke(main, ["gate", str(tmp_path / "run"), "--thresholds", str(rules), "--epoch", "2"])
    assert epoch_two.exit_code == 0, epoch_two.output


# --------------------------------------------------------------------------------------------------
# Exact prediction


def split_of(panels: list[int], texts: list[int]) -> TrainSplit:
    return TrainSplit(manifest="constructed", pages=len(panels), panel_counts=np.array(panels),
                      text_counts=np.array(texts), skipped={}, fingerprint="")


@pytest.mark.parametrize("pages, multi, batch", [(24, 3, 4), (30, 10, 5), (12, 1, 6), (40, 36, 8)])
def test_multi_panel_zero_is_hypergeometric(pages, multi, batch):
    split = split_of([2] * multi + [1] * (pages - multi), [1] * pages)
    prediction = exact_prediction(split, batch)
    expected = math.comb(pages - multi, batch) / math.comb(pages, batch)
    assert prediction["reconstruction"]["zero_share"] == pytest.approx(expected, rel=1e-9)
    assert prediction["contrastive"]["zero_share"] == pytest.approx(expected, rel=1e-9)
    assert prediction["reconstruction"]["zero_share_last_batch"] is None


def test_alignment_zero_closed_form():
    # 7 pages without text, 5 with one panel of text, 8 with three: fewer than 2 pairs needs at most one
    # page with text, and that page must have a single text panel.
    texts = [0] * 7 + [1] * 5 + [3] * 8
    split = split_of([2] * 20, texts)
    for batch in (1, 2, 4, 5):
        expected = (math.comb(7, batch) + 5 * math.comb(7, batch - 1)) / math.comb(20, batch)
        assert zero_signal_probability(np.array(texts), 2, batch) == pytest.approx(expected, rel=1e-9)
    assert exact_prediction(split, 5)["alignment"]["zero_share"] == pytest.approx(
        (math.comb(7, 5) + 5 * math.comb(7, 4)) / math.comb(20, 5), rel=1e-9
    )


def test_dynamic_programme_matches_enumeration():
    from itertools import combinations

    active = np.array([0, 0, 0, 1, 1, 2, 2, 3, 0, 1])
    for need in (1, 2, 3, 4):
        for batch in (1, 2, 3, 5):
            draws = list(combinations(range(active.size), batch))
            expected = sum(active[list(draw)].sum() < need for draw in draws) / len(draws)
            assert zero_signal_probability(active, need, batch) == pytest.approx(expected, abs=1e-12)


def test_last_batch_weighted_per_step():
    # 10 pages in batches of 4: two full batches and a last batch of 2, so three steps per epoch.
    split = split_of([2, 2, 2] + [1] * 7, [1] * 10)
    prediction = exact_prediction(split, 4)["reconstruction"]
    full = math.comb(7, 4) / math.comb(10, 4)
    last = math.comb(7, 2) / math.comb(10, 2)
    assert prediction["zero_share_full_batch"] == pytest.approx(full)
    assert prediction["zero_share_last_batch"] == pytest.approx(last)
    assert prediction["zero_share"] == pytest.approx((2 * full + last) / 3)
    # An epoch's steps hold every page once: 3 pages with 2+ panels over 3 steps.
    assert prediction["expected_active"] == pytest.approx(1.0)


def test_smallest_batch_size_by_scan():
    panels = [2] * 6 + [1] * 30
    texts = [2] * 6 + [1] * 10 + [0] * 20
    split = split_of(panels, texts)
    found = predict_sparsity(split, 4, target=0.05)["min_batch_size"]
    sizes = [size for size in range(1, 37)
             if all(entry["zero_share"] < 0.05 for entry in exact_prediction(split, size).values())]
    assert found["batch_size"] == sizes[0]
    assert found["target"] == 0.05
    assert all(share < 0.05 for share in found["zero_share"].values())
    assert not all(entry["zero_share"] < 0.05 for entry in exact_prediction(split, sizes[0] - 1).values())


# --------------------------------------------------------------------------------------------------
# Simulation


def test_simulation_agrees_with_exact():
    panels = [2] * 8 + [1] * 22
    texts = [1] * 12 + [0] * 18
    split = split_of(panels, texts)
    exact = exact_prediction(split, 4)
    simulated, simulation = simulated_prediction(split, 4, SamplerSettings("random"), epochs=400, seed=5)
    assert simulation["epochs"] == 400
    for name in ("reconstruction", "alignment"):
        error = simulated[name]["standard_error"]
        assert 0 < error < 0.02
        assert abs(simulated[name]["zero_share"] - exact[name]["zero_share"]) < 4 * error, name
        assert simulated[name]["expected_active"] == pytest.approx(exact[name]["expected_active"])


def test_balanced_simulation_removes_zeros():
    # 30 pages in 8 batches: 8 pages with 2+ panels give one to each batch, and 12 single-panel pages
    # with text give each batch its second text panel.
    split = split_of([2] * 8 + [1] * 22, [1] * 20 + [0] * 10)
    sampler = SamplerSettings("balanced", min_multi_panel_pages=1, min_text_panels=2)
    predicted = predict_sparsity(split, 4, sampler=sampler, epochs=50)
    assert predicted["method"] == "simulation"
    assert predicted["components"]["reconstruction"]["zero_share"] == 0.0
    assert predicted["components"]["alignment"]["zero_share"] == 0.0
    assert predicted["simulation"]["shortfall_epochs"] == 0
    random = exact_prediction(split, 4)
    assert random["reconstruction"]["zero_share"] > 0.2
    assert random["alignment"]["zero_share"] > 0.05


def test_balanced_simulation_reports_shortfall():
    # Each batch contains exactly one of the 8 pages with 2+ panels (one text panel each), and only 4
    # single-panel pages have text, so at most 4 of the 8 batches reach 2 text panels.
    split = split_of([2] * 8 + [1] * 22, [1] * 12 + [0] * 18)
    sampler = SamplerSettings("balanced", min_multi_panel_pages=1, min_text_panels=2)
    predicted = predict_sparsity(split, 4, sampler=sampler, epochs=50)
    assert predicted["components"]["reconstruction"]["zero_share"] == 0.0
    assert predicted["components"]["alignment"]["zero_share"] == 0.5
    assert predicted["simulation"]["shortfall_epochs"] == 50


def test_exact_rejects_balanced_sampler():
    split = split_of([2, 1, 1, 2], [1, 1, 0, 0])
    with pytest.raises(InputError, match="random sampler only"):
        predict_sparsity(split, 2, sampler=SamplerSettings("balanced"), method="exact")


# --------------------------------------------------------------------------------------------------
# Datasets


def mixed_dataset(root: Path) -> Path:
    """12 good pages (4 single-panel, 2 without text) plus one page per skip rule the prediction must apply."""
    pages = [grid_page(f"g{index:02d}", count) for index, count in enumerate([3, 2, 1, 4, 1, 2, 2, 1, 3, 1, 2, 5])]
    pages[4] = grid_page("g04", 1, [None])
    pages[6] = grid_page("g06", 2, [None, ""])
    pages += [
        grid_page("too_many", 9),
        grid_page("cover", 2, page_type="cover"),
        PageSpec("no_image", grid_page("x", 2).panels, write_image=False),
        PageSpec("bad_json", [], raw_annotation="{not json"),
    ]
    return write_dataset(root, pages)


def test_load_without_images_matches_full_load(tmp_path, monkeypatch):
    manifest = mixed_dataset(tmp_path / "data")
    full = load_dataset(DataConfig(manifest=str(manifest)))

    def no_decoding(*args, **kwargs):
        raise AssertionError("a page image was decoded")

    monkeypatch.setattr("PIL.Image.Image.convert", no_decoding)
    light = load_dataset(DataConfig(manifest=str(manifest)), load_images=False)

    assert [page.page_id for page in light.pages] == [page.page_id for page in full.pages]
    assert [len(page.panels) for page in light.pages] == [len(page.panels) for page in full.pages]
    assert [p.has_text for p in light.panels] == [p.has_text for p in full.panels]
    assert [p.layout for p in light.panels] == [p.layout for p in full.panels]
    assert light.skipped == full.skipped
    assert light.skipped["missing_image"] == 1
    assert light.skipped["too_many_panels"] == 1
    assert light.fingerprint == full.fingerprint
    assert all(panel.image is None for panel in light.panels)


def test_dataset_prediction_uses_trainer_split(tmp_path):
    manifest = mixed_dataset(tmp_path / "data")
    result = invoke(manifest, "--batch-size", "3", "--json", "-")
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)["predicted"]
    assert json.loads(result.stdout)["components"] == {}

    dataset = load_dataset(DataConfig(manifest=str(manifest)), load_images=False)
    assert predicted["dataset"]["pages"] == len(dataset.pages) == 12
    from trainer.data import split_pages

    train, _ = split_pages(dataset, 0.2, 0)
    panels = [len(dataset.pages[index].panels) for index in train]
    single = sum(count == 1 for count in panels)
    assert predicted["dataset"]["train_pages"] == len(train)
    full, last = divmod(len(train), 3)
    zero_steps = full * math.comb(single, 3) / math.comb(len(train), 3)
    steps = full
    if last:
        zero_steps += math.comb(single, last) / math.comb(len(train), last)
        steps += 1
    expected = zero_steps / steps
    assert predicted["components"]["reconstruction"]["zero_share"] == pytest.approx(expected)
    assert predicted["batch_size"] == 3
    assert predicted["method"] == "exact"


def test_dataset_prediction_follows_config(tmp_path):
    manifest = mixed_dataset(tmp_path / "data")
    config = tmp_path / "train.toml"
    config.write_text(f'[data]\nmanifest = {json.dumps(str(manifest))}\npage_types = []\nmax_panels = 12\n'
                      '[optim]\nbatch_size = 2\n')
    result = invoke(config, "--json", "-")
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)["predicted"]
    # The config keeps the cover page and the page of 9 panels.
    assert predicted["dataset"]["pages"] == 14
    assert predicted["batch_size"] == 2

    with_csv = invoke(manifest, "--config", config, "--set", "optim.batch_size=4", "--json", "-")
    assert with_csv.exit_code == 0, with_csv.output
    assert json.loads(with_csv.stdout)["predicted"]["batch_size"] == 4
    assert json.loads(with_csv.stdout)["predicted"]["dataset"]["pages"] == 14


def test_dataset_input_errors(tmp_path):
    manifest = mixed_dataset(tmp_path / "data")
    assert_input_error(invoke(manifest), "give --batch-size")
    assert_input_error(invoke(tmp_path / "absent.csv", "--batch-size", "2"), "absent.csv: no such file")
    broken = tmp_path / "broken.csv"
    broken.write_text("page,path\n")
    assert_input_error(invoke(broken, "--batch-size", "2"), "manifest lacks column(s)")
    assert_input_error(invoke(manifest, "--batch-size", "2", "--set", "data.max_panels=0"), "data.max_panels")


def test_starved_prediction_fails_dataset(tmp_path):
    manifest = simple_dataset(tmp_path / "data", [1, 1, 1, 2, 1, 1, 1, 1, 1, 1])
    result = invoke(manifest, "--batch-size", "1", "--fail-on", "starved")
    assert result.exit_code == 1, result.output
    assert "starved" in result.stdout


# --------------------------------------------------------------------------------------------------
# A trained run: observed beside predicted


def test_run_observed_matches_prediction(tmp_path):
    # With one page per batch every epoch visits each page once, so the observed zero share equals the
    # share of train pages without signal, which the exact prediction must give.
    manifest = simple_dataset(tmp_path / "data", [3, 1, 2, 1, 1, 4, 1, 2, 1, 1], no_text={(0, 1), (2, 0)})
    config = tiny_config(manifest, "optim.batch_size=1", "optim.epochs=1", "model.dim=8",
                         "model.projection_hidden=8", "objectives.reconstruction_hidden=8")
    loop.fit(config, tmp_path / "run", console=Console(file=io.StringIO()))

    result = invoke(tmp_path / "run", "--json", "-")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    predicted = document["predicted"]
    assert predicted is not None
    assert predicted["batch_size"] == 1
    for name in ("contrastive", "reconstruction", "alignment"):
        assert document["components"][name]["zero_share"] == pytest.approx(predicted["components"][name]["zero_share"])
        assert document["components"][name]["active"]["mean"] == pytest.approx(predicted["components"][name]["expected_active"])
    assert "Observed and predicted" in invoke(tmp_path / "run").stdout

    (tmp_path / "data" / "manifest.csv").unlink()
    moved = invoke(tmp_path / "run", "--json", "-")
    assert moved.exit_code == 0, moved.output
    assert json.loads(moved.stdout)["predicted"] is None
    assert "warning: no prediction" in moved.stderr

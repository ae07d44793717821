"""The step guard: a non-finite loss or gradient skips the step, is counted, and too many in a row stop the run."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from trainer import loop
from trainer.artifacts import RunDirectory, load_checkpoint
from trainer.cli import main
from trainer.config import ConfigError
from trainer_dataset import simple_dataset, tiny_config

COUNTS = [3, 2, 1, 4, 2, 3, 1, 2, 3, 2]
# 7 train pages in batches of 3: steps 1-3 are epoch 1, steps 4-6 epoch 2, steps 7-9 epoch 3.
STEPS_PER_EPOCH = 3


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def make_config(tmp_path: Path, *overrides: str):
    manifest = simple_dataset(tmp_path / "data", COUNTS, {(0, 1), (3, 0)})
    return tiny_config(manifest, "optim.batch_size=3", *overrides)


def make_run(tmp_path: Path, *overrides: str) -> loop.Run:
    directory = RunDirectory(tmp_path / "run")
    directory.prepare(overwrite=False)
    return loop.setup(make_config(tmp_path, *overrides), directory, quiet_console())


def read_steps(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == "step"]


def trainable_state(run: loop.Run) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in run.model.state_dict().items()}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------------
# One step


@pytest.mark.parametrize(("target", "reason"), [("loss", "nonfinite_loss"), ("gradient", "nonfinite_gradient")])
def test_bad_step_changes_nothing(tmp_path, target, reason):
    run = make_run(tmp_path, "debug.nan_at_step=1", f"debug.nan_in={target}")
    before = trainable_state(run)
    head_before = [p.detach().clone() for p in run.objectives.parameters()]

    record = loop.train_step(run, run.inputs.batch(run.train_pages[:3]), epoch=1)

    assert record["skipped"] is True
    assert record["reason"] == reason
    assert record["skipped_steps"] == 1
    assert record["step"] == 1
    after = trainable_state(run)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    for old, new in zip(head_before, run.objectives.parameters()):
        assert torch.equal(old, new)
    # No optimiser update means no Adam moments either.
    assert run.optimizer.state_dict()["state"] == {}
    assert run.bad_steps_in_a_row == 1


def test_good_step_after_bad_one_resets_count(tmp_path):
    run = make_run(tmp_path, "debug.nan_at_step=1")
    batch = run.inputs.batch(run.train_pages[:3])
    loop.train_step(run, batch, epoch=1)
    record = loop.train_step(run, batch, epoch=1)
    assert record["skipped"] is False
    assert "reason" not in record
    assert record["skipped_steps"] == 1
    assert run.bad_steps_in_a_row == 0
    assert math.isfinite(record["loss"])


def test_scheduler_advances_on_skipped_step(tmp_path):
    skipped = make_run(tmp_path / "a", "debug.nan_at_step=1")
    plain = make_run(tmp_path / "b")
    batch = skipped.inputs.batch(skipped.train_pages[:3])
    for _ in range(2):
        loop.train_step(skipped, batch, epoch=1)
        loop.train_step(plain, batch, epoch=1)
    assert skipped.scheduler.get_last_lr() == plain.scheduler.get_last_lr()


# --------------------------------------------------------------------------------------------------
# Whole runs


def test_isolated_bad_steps_are_logged_and_counted(tmp_path):
    # Steps 3 and 4: the last step of epoch 1 and the first of epoch 2.
    config = make_config(tmp_path, "optim.epochs=2", "debug.nan_at_step=3", "debug.nan_steps=2")
    run = loop.fit(config, tmp_path / "run", console=quiet_console())

    steps = read_steps(tmp_path / "run")
    assert [record["step"] for record in steps] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [record["skipped"] for record in steps] == [False, False, True, True, False, False]
    assert [record["skipped_steps"] for record in steps] == [0, 0, 1, 2, 2, 2]
    assert [record.get("reason") for record in steps[2:4]] == ["nonfinite_loss", "nonfinite_loss"]
    assert math.isnan(steps[2]["loss"])

    assert run.skipped_steps == 2
    assert run.history[0]["skipped_steps"] == 1
    assert run.history[1]["skipped_steps"] == 1
    assert math.isfinite(run.history[0]["train_loss"])
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["skipped_steps"] == 2


def test_bad_steps_in_a_row_stop_run(tmp_path):
    first_bad = STEPS_PER_EPOCH + 1
    config = make_config(
        tmp_path, "optim.epochs=3", f"debug.nan_at_step={first_bad}", "debug.nan_steps=10",
        "optim.max_bad_steps_in_a_row=3",
    )
    run_dir = tmp_path / "run"
    with pytest.raises(loop.TrainingDiverged) as raised:
        loop.fit(config, run_dir, console=quiet_console())

    message = str(raised.value)
    assert "\n" not in message
    assert f"training stopped at epoch 2, step {first_bad + 2}: 3 steps in a row" in message
    assert "last: nonfinite_loss" in message
    assert "checkpoints/last.pt (epoch 1) is the last good checkpoint" in message

    steps = read_steps(run_dir)
    assert [record["step"] for record in steps] == list(range(1, first_bad + 3))
    assert [record["skipped_steps"] for record in steps[-3:]] == [1, 2, 3]

    checkpoints = run_dir / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["best.pt", "epoch_0001.pt", "last.pt"]
    assert digest(checkpoints / "last.pt") == digest(checkpoints / "epoch_0001.pt")
    last = load_checkpoint(checkpoints / "last.pt")
    assert last["epoch"] == 1
    assert all(torch.isfinite(tensor).all() for tensor in last["model_state_dict"].values())


def test_bad_steps_before_first_checkpoint(tmp_path):
    config = make_config(tmp_path, "debug.nan_at_step=1", "debug.nan_steps=5", "optim.max_bad_steps_in_a_row=2")
    with pytest.raises(loop.TrainingDiverged, match="no checkpoint was written yet"):
        loop.fit(config, tmp_path / "run", console=quiet_console())


def test_cli_stop_exits_1_with_one_line(tmp_path, capfd):
    manifest = simple_dataset(tmp_path / "data", COUNTS)
    config_path = tmp_path / "tiny.toml"
    config_path.write_text(
        f'device = "cpu"\n[data]\nmanifest = {json.dumps(str(manifest))}\nval_fraction = 0.3\n'
        "[model]\ndim = 16\nprojection_hidden = 16\nlayout_hidden = 8\n"
        "[objectives]\nreconstruction_hidden = 16\n[optim]\nepochs = 2\nbatch_size = 3\n"
        "max_bad_steps_in_a_row = 2\n[debug]\nnan_at_step = 4\nnan_steps = 2\nnan_in = \"gradient\"\n"
    )
    with pytest.raises(SystemExit) as raised:
        main(["fit", "--config", str(config_path), "--out", str(tmp_path / "run")])
    assert raised.value.code == 1

    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("trainer:")]
    assert len(lines) == 1
    assert lines[0].startswith("trainer: error: training stopped at epoch 2, step 5: 2 steps in a row")
    assert "last: nonfinite_gradient" in lines[0]


# --------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("optim.max_bad_steps_in_a_row=0", "optim.max_bad_steps_in_a_row: expected at least 1"),
        ("debug.nan_in=weights", "debug.nan_in: expected loss or gradient"),
        ("debug.nan_at_step=0", "debug.nan_at_step: expected at least 1"),
    ],
)
def test_guard_config_is_validated(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make_config(tmp_path, override)

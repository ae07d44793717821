"""Resume after a kill: a run killed at any moment, even inside a checkpoint write, finishes as if never stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.artifacts import CRASH_IN_CHECKPOINT_VARIABLE, RunDirectory, load_checkpoint
from trainer.cli import main
from trainer.config import TrainerError
from trainer_dataset import simple_dataset

REPO = Path(__file__).resolve().parents[1]
COUNTS = [3, 2, 1, 4, 2, 3, 1, 2, 3, 2, 2, 3]
EPOCHS = 3
# Seconds to wait for a trainer subprocess; generous because test jobs share small machines.
SUBPROCESS_TIMEOUT = 240


def write_config(tmp_path: Path) -> Path:
    """A tiny CPU config with dropout on, so that resuming must restore the RNG states to match."""
    manifest = simple_dataset(tmp_path / "data", COUNTS, {(0, 1), (3, 0), (5, 2)})
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'device = "cpu"\n[data]\nmanifest = {json.dumps(str(manifest))}\nval_fraction = 0.25\n'
        "[model]\ndim = 16\nprojection_hidden = 16\nlayout_hidden = 8\ndropout = 0.2\n"
        f"[objectives]\nreconstruction_hidden = 16\n[optim]\nepochs = {EPOCHS}\nbatch_size = 3\n"
    )
    return path


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def trainer_process(argv: list[str], **extra_env: str) -> subprocess.Popen:
    """Start ``python -m trainer`` with one torch thread, as the in-process runs use."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "trainer", *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def count_step_records(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "step"' in line for line in path.read_text().splitlines())


def assert_same_final_checkpoint(run_dir: Path, reference_dir: Path) -> None:
    final = f"epoch_{EPOCHS:04d}.pt"
    resumed = load_checkpoint(run_dir / "checkpoints" / final)
    reference = load_checkpoint(reference_dir / "checkpoints" / final)
    assert resumed["step"] == reference["step"]
    for key in ("model_state_dict", "objectives_state_dict"):
        assert resumed[key].keys() == reference[key].keys()
        for name, tensor in reference[key].items():
            assert torch.equal(resumed[key][name], tensor), f"{key}[{name}]"
    resumed_moments = resumed["optimizer_state_dict"]["state"]
    reference_moments = reference["optimizer_state_dict"]["state"]
    assert resumed_moments.keys() == reference_moments.keys()
    for index, state in reference_moments.items():
        for name, value in state.items():
            assert torch.equal(resumed_moments[index][name], value), f"optimizer state {index}.{name}"


def stale_temporaries(run_dir: Path) -> list[Path]:
    return [path for folder in (run_dir, run_dir / "checkpoints", run_dir / "embeddings") for path in folder.glob(".*.tmp-*")]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Uninterrupted runs of the tiny config, with the random and the balanced sampler."""
    root = tmp_path_factory.mktemp("reference")
    config = write_config(root)
    runs = {}
    for sampler in ("random", "balanced"):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            code = run_cli(["fit", "--config", str(config), "--out", str(root / sampler), "--set", f"data.sampler={sampler}"])
        finally:
            torch.set_num_threads(previous)
        assert code == 0
        runs[sampler] = root / sampler
    return config, runs


# --------------------------------------------------------------------------------------------------
# Killed runs


def test_kill_inside_checkpoint_write(references, tmp_path):
    config, runs = references
    run_dir = tmp_path / "run"
    process = trainer_process(["fit", "--config", str(config), "--out", str(run_dir)], **{CRASH_IN_CHECKPOINT_VARIABLE: "2"})
    _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == -signal.SIGKILL, err

    # The kill left a written but unrenamed checkpoint, and the records of epoch 2.
    assert [path.name.split(".tmp-")[0] for path in stale_temporaries(run_dir)] == [".epoch_0002.pt"]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert max(record["epoch"] for record in read_metrics(run_dir)) == 2

    assert run_cli(["resume", str(run_dir)]) == 0
    assert_same_final_checkpoint(run_dir, runs["random"])
    assert read_metrics(run_dir) == read_metrics(runs["random"])
    assert stale_temporaries(run_dir) == []
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_epoch"] == [1]


def test_kill_before_first_checkpoint(references, tmp_path):
    config, runs = references
    run_dir = tmp_path / "run"
    process = trainer_process(["fit", "--config", str(config), "--out", str(run_dir)], **{CRASH_IN_CHECKPOINT_VARIABLE: "1"})
    _, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == -signal.SIGKILL, err
    assert not (run_dir / "checkpoints" / "last.pt").exists()

    assert run_cli(["resume", str(run_dir)]) == 0
    assert_same_final_checkpoint(run_dir, runs["random"])
    assert read_metrics(run_dir) == read_metrics(runs["random"])


def test_kill_during_training_steps(references, tmp_path):
    config, runs = references
    run_dir = tmp_path / "run"
    process = trainer_process(["fit", "--config", str(config), "--out", str(run_dir), "--set", "data.sampler=balanced"])
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    # Epoch 1 has 3 steps, so the kill lands in epoch 2 or later, after the first checkpoint.
    while count_step_records(run_dir) < 5:
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read()
        assert time.monotonic() < deadline, "no step records appeared in time"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == -signal.SIGKILL

    assert run_cli(["resume", str(run_dir)]) == 0
    assert_same_final_checkpoint(run_dir, runs["balanced"])
    assert read_metrics(run_dir) == read_metrics(runs["balanced"])
    checkpoint = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["sampler_state_dict"] == {"seed": 1, "epoch": EPOCHS}


# --------------------------------------------------------------------------------------------------
# Missing or unloadable checkpoints


def copy_run(source: Path, target: Path) -> Path:
    """Copy a finished run; last.pt becomes a file of its own rather than a link to the last epoch's."""
    shutil.copytree(source, target)
    return target


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_candidates_newest_first(tmp_path):
    directory = RunDirectory(tmp_path)
    directory.checkpoints_dir.mkdir()
    for name in ("epoch_0002.pt", "epoch_0010.pt", "epoch_0009.pt", "best.pt", "last.pt", ".epoch_0011.pt.tmp-7"):
        (directory.checkpoints_dir / name).write_bytes(b"")
    names = [path.name for path in directory.resume_candidates()]
    assert names == ["last.pt", "epoch_0010.pt", "epoch_0009.pt", "epoch_0002.pt", "best.pt"]


def test_resume_from_best_when_only_it_remains(references, tmp_path, capfd):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    for path in [checkpoints / "last.pt", *checkpoints.glob("epoch_*.pt")]:
        path.unlink()
    best_epoch = load_checkpoint(checkpoints / "best.pt")["epoch"]
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    assert f"resuming from {checkpoints / 'best.pt'} (epoch {best_epoch})" in capfd.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_epoch"] == [best_epoch]
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == EPOCHS


def test_finished_resume_replaces_damaged_last(references, tmp_path, capfd):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    truncate(checkpoints / "last.pt")
    final = checkpoints / f"epoch_{EPOCHS:04d}.pt"
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    assert f"resuming from {final} (epoch {EPOCHS})" in capfd.readouterr().err
    assert (checkpoints / "last.pt").read_bytes() == final.read_bytes()
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == EPOCHS
    assert read_metrics(run_dir) == read_metrics(runs["random"])


def rewrite_checkpoint(path: Path, change) -> None:
    """Load a checkpoint, apply ``change`` to its dict and save it again, still loadable with weights_only."""
    checkpoint = torch.load(path, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, path)


def wrong_shape(checkpoint: dict) -> None:
    state = checkpoint["model_state_dict"]
    name = next(key for key, tensor in state.items() if tensor.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])


BAD_CONTENTS = {
    "no_model_state": (lambda checkpoint: checkpoint.pop("model_state_dict"), "missing key 'model_state_dict'"),
    "no_config": (lambda checkpoint: checkpoint.pop("config"), "missing key 'config'"),
    "epoch_text": (lambda checkpoint: checkpoint.update(epoch="two"), "'epoch' is str 'two', expected an integer"),
    "epoch_bool": (lambda checkpoint: checkpoint.update(epoch=True), "'epoch' is bool True, expected an integer"),
    "epoch_zero": (lambda checkpoint: checkpoint.update(epoch=0), "'epoch' is 0, expected 1 or more"),
    "optimizer_list": (
        lambda checkpoint: checkpoint.update(optimizer_state_dict=[]), "'optimizer_state_dict' is list"
    ),
}


@pytest.mark.parametrize("damage", sorted(BAD_CONTENTS))
def test_load_checkpoint_rejects_bad_contents(references, tmp_path, damage):
    _, runs = references
    change, fragment = BAD_CONTENTS[damage]
    path = tmp_path / "last.pt"
    shutil.copy(runs["random"] / "checkpoints" / "last.pt", path)
    rewrite_checkpoint(path, change)
    with pytest.raises(TrainerError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: invalid checkpoint: ")
    assert fragment in message


@pytest.mark.parametrize("damage", ["no_model_state", "no_config", "epoch_text"])
def test_resume_skips_checkpoint_with_bad_contents(references, tmp_path, capfd, damage):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    rewrite_checkpoint(checkpoints / "last.pt", BAD_CONTENTS[damage][0])
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    err = capfd.readouterr().err
    assert f"{checkpoints / 'last.pt'}: invalid checkpoint" in err
    assert f"resuming from {checkpoints / f'epoch_{EPOCHS:04d}.pt'} (epoch {EPOCHS})" in err
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == EPOCHS


def test_resume_rejects_wrong_weight_shape(references, tmp_path, capfd):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    rewrite_checkpoint(last, wrong_shape)
    before = last.read_bytes()
    metrics = (run_dir / "metrics.jsonl").read_text()
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 2
    err = capfd.readouterr().err
    # The progress line "resuming from ..." comes first, then the error.
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0] == f"resuming from {last} (epoch {EPOCHS})"
    assert len(lines) == 2
    assert f"{last}: model_state_dict does not match the model of its config (size mismatch: " in lines[1]
    assert last.read_bytes() == before
    assert (run_dir / "metrics.jsonl").read_text() == metrics


def test_resume_without_last_uses_newest_epoch(references, tmp_path, capfd):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    (run_dir / "checkpoints" / "last.pt").unlink()
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    newest = run_dir / "checkpoints" / f"epoch_{EPOCHS:04d}.pt"
    assert f"resuming from {newest} (epoch {EPOCHS})" in capfd.readouterr().err
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_epoch"] == [EPOCHS]
    assert read_metrics(run_dir) == read_metrics(runs["random"])


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_resume_skips_unloadable_checkpoints(references, tmp_path, capfd, damage):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    if damage == "delete":
        (checkpoints / "last.pt").unlink()
    else:
        truncate(checkpoints / "last.pt")
    truncate(checkpoints / f"epoch_{EPOCHS:04d}.pt")
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    err = capfd.readouterr().err
    assert f"{checkpoints / f'epoch_{EPOCHS:04d}.pt'}: cannot load checkpoint" in err
    assert f"resuming from {checkpoints / f'epoch_{EPOCHS - 1:04d}.pt'} (epoch {EPOCHS - 1})" in err
    assert json.loads((run_dir / "run.json").read_text())["resumed_from_epoch"] == [EPOCHS - 1]
    assert_same_final_checkpoint(run_dir, runs["random"])
    assert read_metrics(run_dir) == read_metrics(runs["random"])
    assert load_checkpoint(checkpoints / "last.pt")["epoch"] == EPOCHS


def test_resume_fails_when_no_checkpoint_loads(references, tmp_path, capfd):
    _, runs = references
    run_dir = copy_run(runs["random"], tmp_path / "run")
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "last.pt").unlink()
    for path in [*checkpoints.glob("epoch_*.pt"), checkpoints / "best.pt"]:
        truncate(path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "every checkpoint (last.pt, epoch_NNNN.pt, best.pt) failed to load" in lines[0]
    assert "epoch_0001.pt: cannot load checkpoint" in lines[0]
    assert "best.pt: cannot load checkpoint" in lines[0]
    # The failed resume keeps the run's records.
    assert (run_dir / "metrics.jsonl").read_text() == metrics


# --------------------------------------------------------------------------------------------------
# metrics.jsonl truncation


def step(epoch: int, number: int) -> str:
    return json.dumps({"kind": "step", "epoch": epoch, "step": number, "loss": 1.0})


def test_open_metrics_drops_later_and_torn_records(tmp_path):
    directory = RunDirectory(tmp_path)
    kept = [step(1, 1), step(1, 2), json.dumps({"kind": "validation", "epoch": 1, "step": 2, "loss": 1.0})]
    later = [step(2, 3), json.dumps({"kind": "validation", "epoch": 2, "step": 3, "loss": 1.0}), step(3, 4)]
    torn = step(3, 5)[:17]
    directory.metrics_path.write_text("\n".join(kept + later) + "\n" + torn)

    directory.open_metrics(keep_through_epoch=1, keep_through_step=2)
    directory.log_metrics({"kind": "step", "epoch": 2, "step": 3, "loss": 0.5})
    directory.close()

    lines = directory.metrics_path.read_text().splitlines()
    assert lines[:3] == kept
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 2, 3]
    assert json.loads(lines[-1])["loss"] == 0.5


def test_reader_ranks_write_nothing(tmp_path):
    directory = RunDirectory(tmp_path / "run", writer=False)
    directory.prepare(overwrite=False)
    directory.open_metrics()
    directory.log_metrics({"kind": "step", "epoch": 1, "step": 1})
    directory.write_run_info({"config": {}})
    relative = directory.write_embeddings(
        1, torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2), torch.ones(2), ["a", "b"]
    )
    directory.save_checkpoint({"epoch": 1}, is_best=True)
    directory.close()
    assert relative == "embeddings/epoch_0001.safetensors"
    assert not (tmp_path / "run").exists()

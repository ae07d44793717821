"""Safety of `trainer fit`: what --overwrite may delete, seed ranges, and unwritable run directories."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from trainer import loop
from trainer.artifacts import RUN_FORMAT, RunDirectory, save_safetensors, save_torch
from trainer.cli import main
from trainer.config import MAX_SEED, ConfigError, TrainerError, load_config
from trainer_dataset import simple_dataset, tiny_config

COUNTS = [3, 2, 1, 4, 2, 3]


@pytest.fixture(autouse=True)
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_config(tmp_path: Path, manifest: Path, extra: str = "") -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'{extra}device = "cpu"\n[data]\nmanifest = {json.dumps(str(manifest))}\nval_fraction = 0.3\n'
        "[model]\ndim = 16\nprojection_hidden = 16\nlayout_hidden = 8\n"
        "[objectives]\nreconstruction_hidden = 16\n[optim]\nepochs = 1\nbatch_size = 4\n"
    )
    return path


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def error_lines(capfd) -> list[str]:
    return capfd.readouterr().err.strip().splitlines()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def user_folder(root: Path) -> Path:
    (root / "embeddings").mkdir(parents=True)
    (root / "checkpoints").mkdir()
    (root / "embeddings" / "thesis_vectors.npy").write_bytes(b"vectors")
    (root / "checkpoints" / "model_final.pt").write_bytes(b"weights")
    return root


# --------------------------------------------------------------------------------------------------
# --overwrite


@pytest.mark.parametrize(
    ("run_json", "fragment"),
    [
        (None, "no run.json"),
        ("{}", "run.json has no format='collapse-toolkit/run'"),
        ('{"format": "someone-else/run"}', "run.json has no format='collapse-toolkit/run'"),
        ("[1, 2]", "run.json has no format='collapse-toolkit/run'"),
        ("{not json", "cannot read run information"),
    ],
)
def test_overwrite_rejects_foreign_folder(tmp_path, capfd, run_json, fragment):
    config = write_config(tmp_path, simple_dataset(tmp_path / "data", COUNTS))
    out = user_folder(tmp_path / "out")
    if run_json is not None:
        (out / "run.json").write_text(run_json)
    before = snapshot(out)

    argv = ["fit", "--config", str(config), "--out", str(out), "--overwrite", "--set", "optim.epochs=1"]
    assert run_cli(argv) == 2
    lines = error_lines(capfd)
    assert len(lines) == 1
    assert str(out) in lines[0]
    assert fragment in lines[0]
    assert snapshot(out) == before
    # The check runs before setup, which would have created the feature cache.
    assert not (out / "cache").exists()


def test_overwrite_deletes_only_run_files(tmp_path):
    config = tiny_config(simple_dataset(tmp_path / "data", COUNTS), "optim.epochs=1")
    out = user_folder(tmp_path / "out")
    (out / "run.json").write_text(json.dumps({"format": RUN_FORMAT}))
    (out / "notes.txt").write_text("keep me")
    (out / "metrics.jsonl").write_text("old\n")
    stale = [
        out / ".run.json.tmp-123",
        out / "embeddings" / "epoch_0009.safetensors",
        out / "embeddings" / "epoch_0009.pages.json",
        out / "checkpoints" / "epoch_0009.pt",
        out / "checkpoints" / ".last.pt.tmp-123",
    ]
    for path in stale:
        path.write_bytes(b"old")
    kept = {name: (out / name).read_bytes() for name in ("notes.txt", "embeddings/thesis_vectors.npy", "checkpoints/model_final.pt")}

    loop.fit(config, out, overwrite=True, console=Console(file=io.StringIO()))

    for path in stale:
        assert not path.exists(), path
    for name, content in kept.items():
        assert (out / name).read_bytes() == content, name
    assert json.loads((out / "run.json").read_text())["format"] == RUN_FORMAT
    assert "old" not in (out / "metrics.jsonl").read_text().splitlines()
    assert (out / "checkpoints" / "epoch_0001.pt").is_file()


def test_overwrite_accepts_leftover_cache(tmp_path):
    # A run that stopped in setup leaves only its feature cache; --overwrite may reuse that folder.
    (tmp_path / "run" / "cache").mkdir(parents=True)
    RunDirectory(tmp_path / "run").check_writable(overwrite=True)
    with pytest.raises(TrainerError, match="not empty"):
        RunDirectory(tmp_path / "run").check_writable(overwrite=False)


# --------------------------------------------------------------------------------------------------
# Seeds


@pytest.mark.parametrize("key", ["seed", "data.seed"])
@pytest.mark.parametrize("value", ["-1", str(MAX_SEED + 1), "99999999999999999999"])
def test_seed_out_of_range_rejected(tmp_path, key, value):
    with pytest.raises(ConfigError, match=f"invalid value for {key}: expected an integer from 0 to {MAX_SEED}"):
        load_config(None, [f"{key}={value}"])


def test_cli_fit_rejects_huge_seed(tmp_path, capfd):
    config = write_config(tmp_path, simple_dataset(tmp_path / "data", COUNTS), extra="seed = 99999999999999999999\n")
    assert run_cli(["fit", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    lines = error_lines(capfd)
    assert len(lines) == 1
    assert str(config) in lines[0]
    assert "invalid value for seed" in lines[0]
    assert not (tmp_path / "run").exists()


def test_largest_seed_trains(tmp_path):
    config = tiny_config(simple_dataset(tmp_path / "data", COUNTS), "optim.epochs=1", f"seed={MAX_SEED}", f"data.seed={MAX_SEED}")
    run = loop.fit(config, tmp_path / "run", console=Console(file=io.StringIO()))
    assert run.epoch == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seed"] == MAX_SEED


# --------------------------------------------------------------------------------------------------
# Unwritable run directories


def test_cli_out_under_file_exits_2_before_loading_data(tmp_path, capfd):
    # The manifest does not exist, so a data error would show if the output check came later.
    config = write_config(tmp_path, tmp_path / "absent" / "manifest.csv")
    parent = tmp_path / "not_a_folder"
    parent.write_text("a regular file")
    out = parent / "run"

    assert run_cli(["fit", "--config", str(config), "--out", str(out)]) == 2
    lines = error_lines(capfd)
    assert len(lines) == 1
    assert str(out) in lines[0]
    assert "cannot create or write the run directory" in lines[0]
    assert parent.read_text() == "a regular file"


def test_cli_config_symlink_loop_exits_2(tmp_path, capfd):
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    assert run_cli(["fit", "--config", str(tmp_path / "loop1"), "--out", str(tmp_path / "run")]) == 2
    lines = error_lines(capfd)
    assert len(lines) == 1
    assert "loop1" in lines[0]


def test_probe_leaves_no_new_folder(tmp_path):
    RunDirectory(tmp_path / "a" / "b" / "run").check_writable(overwrite=False)
    assert not (tmp_path / "a").exists()


def test_artifact_write_error_is_trainer_error(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.prepare(overwrite=False)

    # A folder where run.json should go makes the rename fail with an OSError.
    directory.run_json_path.mkdir()
    with pytest.raises(TrainerError, match="cannot write run artifact") as raised:
        directory.write_run_info({"format": RUN_FORMAT})
    assert "\n" not in str(raised.value)

    # A file where the checkpoints folder should be.
    directory.checkpoints_dir.rmdir()
    directory.checkpoints_dir.write_text("in the way")
    with pytest.raises(TrainerError, match="cannot write run artifact"):
        directory.save_checkpoint({"epoch": 1, "weights": torch.zeros(2)}, is_best=True)

    directory.embeddings_dir.rmdir()
    directory.embeddings_dir.write_text("in the way")
    empty = torch.zeros(2, 4)
    with pytest.raises(TrainerError, match="cannot write run artifact") as raised:
        directory.write_embeddings(1, empty, empty, empty, torch.zeros(2), torch.ones(2), ["p0", "p1"])
    assert f"'trainer resume {directory.path}' continues from the last checkpoint" in str(raised.value)


FULL_DEVICE = Path("/dev/full")


@pytest.mark.skipif(not FULL_DEVICE.exists(), reason="needs /dev/full, whose writes fail with ENOSPC")
def test_save_torch_reports_full_disk():
    with pytest.raises(OSError) as raised:
        save_torch({"weights": torch.zeros(100_000)}, FULL_DEVICE)
    assert raised.value.errno == errno.ENOSPC


def test_save_safetensors_raises_os_error(tmp_path):
    # safetensors writes a temporary file next to the target and renames it, so the missing folder fails.
    with pytest.raises(OSError, match="No such file or directory"):
        save_safetensors({"weights": torch.zeros(10)}, tmp_path / "missing" / "weights.safetensors")


def test_save_torch_writes_loadable_file(tmp_path):
    path = tmp_path / "payload.pt"
    save_torch({"weights": torch.arange(5.0)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(5.0))


def test_stale_temporaries_include_safetensors_own(tmp_path):
    directory = RunDirectory(tmp_path / "run")
    directory.prepare(overwrite=False)
    ours = directory.checkpoints_dir / ".epoch_0002.pt.tmp-4242"
    theirs = directory.embeddings_dir / ".tmpAb12Cd"
    epoch_file = directory.embeddings_dir / "epoch_0001.safetensors"
    for path in (ours, theirs, epoch_file):
        path.write_bytes(b"partial")

    removed = directory.remove_stale_temporaries()
    assert sorted(removed) == sorted([ours, theirs])
    assert epoch_file.exists()

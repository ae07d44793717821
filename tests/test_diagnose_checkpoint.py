"""`diagnose collapse` on checkpoints: with their epoch file, without it, and re-embedded with --data."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from diagnose.cli import main

REPOSITORY = Path(__file__).resolve().parent.parent
FIXTURE_MANIFEST = REPOSITORY / "fixtures" / "comics" / "manifest.csv"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "trainer", "fit", "--config", str(REPOSITORY / "configs" / "default.toml"),
         "--out", str(run), "--set", "optim.epochs=1"],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr
    return run


def collapse_json(tmp_path, *args):
    out = tmp_path / "collapse.json"
    result = CliRunner().invoke(main, ["collapse", *map(str, args), "--json", str(out)])
    assert result.exit_code == 0, result.output
    return result, json.loads(out.read_text())


def test_checkpoint_uses_its_epoch_file(tmp_path, run_dir):
    _, from_checkpoint = collapse_json(tmp_path, run_dir / "checkpoints" / "last.pt")
    _, from_file = collapse_json(tmp_path, run_dir / "embeddings" / "epoch_0001.safetensors")
    assert from_checkpoint["epoch"] == 1
    assert from_checkpoint["modalities"]["fused"] == from_file["modalities"]["fused"]
    assert set(from_checkpoint["modalities"]) == {"fused", "vision", "text"}
    assert "vision-text" in from_checkpoint["pairs"]


def test_checkpoint_alone_gives_weight_diagnostics(tmp_path, run_dir):
    lonely = tmp_path / "alone" / "last.pt"
    lonely.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", lonely)

    result, document = collapse_json(tmp_path, lonely)
    assert "weight-space diagnostics only" in result.stderr
    assert "--data" in result.stderr
    assert document["verdict"] is None
    matrices = document["weights"]["matrices"]
    assert matrices, "expected the 2-D weights of the model"
    for entry in matrices.values():
        assert len(entry["shape"]) == 2
        assert 1.0 <= entry["effective_rank"] <= min(entry["shape"]) + 1e-6


def test_checkpoint_alone_reembeds_with_data(tmp_path, run_dir):
    lonely = tmp_path / "alone" / "last.pt"
    lonely.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", lonely)
    shutil.copytree(run_dir / "cache", tmp_path / "cache") if (run_dir / "cache").is_dir() else None

    # By default the validation split is embedded, so the figures match the run's own epoch file.
    result, document = collapse_json(tmp_path, lonely, "--data", FIXTURE_MANIFEST)
    _, from_file = collapse_json(tmp_path, run_dir / "embeddings" / "epoch_0001.safetensors")
    fused = document["modalities"]["fused"]
    assert document["split"] == "val"
    assert fused["n"] == from_file["modalities"]["fused"]["n"]
    assert fused["effective_rank"] == pytest.approx(from_file["modalities"]["fused"]["effective_rank"], rel=1e-4)
    assert document["verdict"] == from_file["verdict"]
    assert fused["groups"] is not None
    assert "(val split)" in result.stderr

    # Every usable fixture page with --split all.
    _, everything = collapse_json(tmp_path, lonely, "--data", FIXTURE_MANIFEST, "--split", "all")
    assert everything["modalities"]["fused"]["n"] == 288


def test_missing_data_manifest(tmp_path, run_dir):
    lonely = tmp_path / "alone" / "last.pt"
    lonely.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "last.pt", lonely)
    result = CliRunner().invoke(main, ["collapse", str(lonely), "--data", str(tmp_path / "none.csv")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'none.csv'}: dataset manifest not found"]


def test_reembed_rejects_wrong_weight_shape(tmp_path, run_dir):
    lonely = tmp_path / "alone" / "last.pt"
    lonely.parent.mkdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    state = checkpoint["model_state_dict"]
    name = next(key for key, tensor in state.items() if tensor.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    torch.save(checkpoint, lonely)

    result = CliRunner().invoke(main, ["collapse", str(lonely), "--data", str(FIXTURE_MANIFEST)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {lonely}: model_state_dict does not match the model of its config (")
    assert "size mismatch" in lines[0]

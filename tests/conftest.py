"""Shared fixtures: runs of the bundled configs, trained once per test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run torch on one thread in tests: two OpenMP threads slow down many times over when other jobs
    share a 2-core machine. Training subprocesses keep their own setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def bundled_run(tmp_path_factory):
    """Return a function that trains ``configs/NAME`` on the fixtures once and returns its run directory."""
    runs: dict[str, Path] = {}

    def train(config_name: str) -> Path:
        if config_name not in runs:
            run_dir = tmp_path_factory.mktemp("bundled") / Path(config_name).stem
            completed = subprocess.run(
                [sys.executable, "-m", "trainer", "fit", "--config", str(REPOSITORY / "configs" / config_name),
                 "--out", str(run_dir), "--set", "device=\"cpu\""],
                capture_output=True, text=True, timeout=900,
            )
            assert completed.returncode == 0, completed.stderr
            runs[config_name] = run_dir
        return runs[config_name]

    return train

"""The bundled configs on the bundled fixtures: skip counts, the collapse config and the feature cache."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from trainer import loop
from trainer.config import load_config
from trainer.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures" / "comics"
KEPT_TYPES = {"narrative", "story"}

pytestmark = pytest.mark.skipif(not (FIXTURES / "manifest.csv").is_file(), reason="bundled fixtures not generated")


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def fused_statistics(run_dir: Path, epoch: int) -> tuple[float, float]:
    """Return (mean pairwise cosine, RankMe effective rank) of an epoch's fused validation embeddings."""
    fused = load_file(str(run_dir / "embeddings" / f"epoch_{epoch:04d}.safetensors"))["fused"].double()
    count = fused.shape[0]
    unit = torch.nn.functional.normalize(fused, dim=-1)
    mean_cosine = float((unit.sum(dim=0).square().sum() - count) / (count * (count - 1)))
    singular = torch.linalg.svdvals(fused)
    share = singular / singular.sum() + 1e-7
    return mean_cosine, float(torch.exp(-(share * share.log()).sum()))


def test_fixture_skip_counts_match_generator():
    config = load_config(REPO / "configs" / "default.toml")
    dataset = load_dataset(config.data)
    malformed = json.loads((FIXTURES / "malformed.json").read_text())
    labels = json.loads((FIXTURES / "labels.json").read_text())

    expected = {}
    for reason in malformed.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected["page_type_filtered"] = sum(1 for page_type in labels.values() if page_type not in KEPT_TYPES)
    assert {reason: count for reason, count in dataset.skipped.items() if count} == expected

    kept_ids = {page.page_id for page in dataset.pages}
    assert not kept_ids & set(malformed)
    assert all(labels[page_id] in KEPT_TYPES for page_id in kept_ids)


def test_collapse_config_collapses(bundled_run):
    collapse = load_config(REPO / "configs" / "collapse.toml", ["device=cpu"])
    default = load_config(REPO / "configs" / "default.toml", ["device=cpu"])
    collapse_run, default_run = bundled_run("collapse.toml"), bundled_run("default.toml")

    collapse_cosine, collapse_rank = fused_statistics(collapse_run, collapse.optim.epochs)
    default_cosine, default_rank = fused_statistics(default_run, default.optim.epochs)
    assert collapse_cosine > 0.99
    assert collapse_rank < 3.0
    assert default_cosine < 0.8
    assert default_rank > 8.0

    # The verdicts of `diagnose collapse` on the last checkpoints of both runs.
    from diagnose.documents import collapse_document

    collapsed = collapse_document(collapse_run / "checkpoints" / "last.pt")
    healthy = collapse_document(default_run / "checkpoints" / "last.pt")
    assert collapsed["verdict"] == "complete_collapse"
    assert healthy["verdict"] == "healthy"


@pytest.mark.slow
def test_pretrained_fit_reuses_feature_cache(tmp_path, monkeypatch):
    from trainer.backbones import EfficientNetLite0, MiniLM

    overrides = ["optim.epochs=1", "device=cpu", f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"]
    config = load_config(REPO / "configs" / "pretrained.toml", overrides)
    first = loop.fit(config, tmp_path / "first", console=quiet_console())
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    def fail(*args, **kwargs):
        raise AssertionError("a frozen backbone ran although its features were cached")

    monkeypatch.setattr(EfficientNetLite0, "features", fail)
    monkeypatch.setattr(MiniLM, "encode", fail)
    second = loop.fit(config, tmp_path / "second", console=quiet_console())
    assert second.history[0]["val_loss"] == first.history[0]["val_loss"]

"""The balanced batch sampler and the per-component gradient-norm probe of the trainer."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from trainer import loop
from trainer.artifacts import RunDirectory
from trainer.config import ConfigError
from trainer.data import iterate_batches
from trainer.sampler import BalancedBatchSampler
from trainer_dataset import simple_dataset, tiny_config


def make_sampler(panels, texts, batch_size, **options) -> BalancedBatchSampler:
    pages = list(range(100, 100 + len(panels)))
    return BalancedBatchSampler(pages, panels, texts, batch_size, **options)


def batch_counts(sampler: BalancedBatchSampler, batch: list[int], panels, texts) -> tuple[int, int]:
    positions = [page - 100 for page in batch]
    return sum(panels[p] >= 2 for p in positions), sum(texts[p] for p in positions)


def epoch(sampler: BalancedBatchSampler, number: int) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


# 12 pages with 2+ panels (half of them without text) and 28 single-panel pages, 10 of them with text.
PANELS = [3, 2, 4, 2, 5, 2, 3, 2, 2, 6, 2, 3] + [1] * 28
TEXTS = [3, 0, 4, 0, 5, 0, 3, 0, 0, 6, 0, 3] + [1] * 10 + [0] * 18


# --------------------------------------------------------------------------------------------------
# Epoch plan


def test_every_page_once_per_epoch():
    sampler = make_sampler(PANELS, TEXTS, batch_size=6)
    for number in (1, 2, 3):
        batches = epoch(sampler, number)
        assert sorted(page for batch in batches for page in batch) == list(range(100, 140))
        assert [len(batch) for batch in batches] == [len(batch) for batch in iterate_batches(range(40), 6)]
        assert len(batches) == len(sampler) == 7


def test_minimums_met_when_data_allows():
    # 10 batches of 4 pages: one page with 2+ panels and 2 panels with text fit in each.
    sampler = make_sampler(PANELS, TEXTS, batch_size=4, min_multi_panel_pages=1, min_text_panels=2)
    for number in range(1, 21):
        for batch in epoch(sampler, number):
            multi, text = batch_counts(sampler, batch, PANELS, TEXTS)
            assert multi >= 1, (number, batch)
            assert text >= 2, (number, batch)
        assert not sampler.shortfall


def test_random_batches_miss_the_minimums():
    # The same split under plain shuffling: the balanced sampler's guarantee is not a property of the data.
    generator = torch.Generator().manual_seed(0)
    misses = 0
    for _ in range(20):
        for batch in iterate_batches(range(40), 4, generator):
            multi = sum(PANELS[p] >= 2 for p in batch)
            text = sum(TEXTS[p] for p in batch)
            misses += multi < 1 or text < 2
    assert misses > 20


def test_text_repair_swaps_between_batches():
    # Every page has 2 panels, so pass 1 fills each batch; only swaps can pair text-free pages with text.
    panels = [2] * 12
    texts = [0] * 6 + [4] * 6
    sampler = make_sampler(panels, texts, batch_size=2, min_multi_panel_pages=2, min_text_panels=2)
    for number in range(1, 11):
        for batch in epoch(sampler, number):
            assert batch_counts(sampler, batch, panels, texts) == (2, 4)
        assert not sampler.shortfall


def test_multi_panel_minimum_capped_at_batch_size():
    # The last batch has one page, so it needs one page with 2+ panels, not two.
    panels = [2] * 7
    sampler = make_sampler(panels, [2] * 7, batch_size=3, min_multi_panel_pages=5, min_text_panels=0)
    batches = epoch(sampler, 1)
    assert [len(batch) for batch in batches] == [3, 3, 1]
    assert not sampler.shortfall


def test_shortfall_warned_once(caplog):
    # 12 pages with 2+ panels cannot give 2 to each of 20 batches of 2 pages.
    sampler = make_sampler(PANELS, TEXTS, batch_size=2, min_multi_panel_pages=2, min_text_panels=0)
    with caplog.at_level(logging.WARNING, logger="trainer.sampler"):
        first = epoch(sampler, 1)
        epoch(sampler, 2)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1
    assert "fewer than 2 pages with 2+ panels" in warnings[0]
    assert "the train split has 12 such pages" in warnings[0]
    assert len(first) == 20


def test_shortfall_spread_evenly():
    sampler = make_sampler(PANELS, TEXTS, batch_size=2, min_multi_panel_pages=2, min_text_panels=0, warn=False)
    batches = epoch(sampler, 1)
    multi_counts = [batch_counts(sampler, batch, PANELS, TEXTS)[0] for batch in batches]
    assert sorted(multi_counts) == [0] * 8 + [1] * 12
    assert sampler.shortfall.short_multi_panel == 20
    assert sampler.shortfall.batches == 20


def test_no_minimums_is_plain_shuffle():
    sampler = make_sampler(PANELS, TEXTS, batch_size=5, min_multi_panel_pages=0, min_text_panels=0)
    batches = epoch(sampler, 1)
    assert sorted(page for batch in batches for page in batch) == list(range(100, 140))
    assert not sampler.shortfall


# --------------------------------------------------------------------------------------------------
# Determinism and state


def test_same_seed_and_epoch_repeat():
    first = make_sampler(PANELS, TEXTS, batch_size=4, seed=7)
    second = make_sampler(PANELS, TEXTS, batch_size=4, seed=7)
    assert epoch(first, 3) == epoch(second, 3)
    assert epoch(first, 3) == epoch(first, 3)


def test_epochs_and_seeds_differ():
    sampler = make_sampler(PANELS, TEXTS, batch_size=4, seed=7)
    other_seed = make_sampler(PANELS, TEXTS, batch_size=4, seed=8)
    assert epoch(sampler, 1) != epoch(sampler, 2)
    assert epoch(sampler, 1) != epoch(other_seed, 1)


def test_state_dict_restores_plan():
    sampler = make_sampler(PANELS, TEXTS, batch_size=4, seed=3)
    sampler.set_epoch(5)
    state = sampler.state_dict()
    assert state == {"seed": 3, "epoch": 5}

    restored = make_sampler(PANELS, TEXTS, batch_size=4, seed=0)
    restored.load_state_dict(dict(state))
    assert list(restored) == list(sampler)


def test_rejects_mismatched_counts():
    with pytest.raises(ValueError, match="differ in length"):
        BalancedBatchSampler([0, 1], [2], [1, 1], batch_size=2)


# --------------------------------------------------------------------------------------------------
# In the trainer


# 14 pages, 10 with 2+ panels: any 10-page train split has enough for 5 batches of 2 pages.
COUNTS = [3, 2, 1, 1, 2, 3, 1, 2, 2, 2, 1, 4, 2, 3]


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def make_run(tmp_path: Path, *overrides: str) -> loop.Run:
    manifest = simple_dataset(tmp_path / "data", COUNTS)
    config = tiny_config(manifest, *overrides)
    directory = RunDirectory(tmp_path / "run")
    directory.check_writable(overwrite=False)
    directory.prepare(overwrite=False)
    return loop.setup(config, directory, quiet_console())


def test_trainer_balanced_batches(tmp_path):
    run = make_run(tmp_path, "data.sampler=balanced", "optim.batch_size=2", "data.min_multi_panel_pages=1")
    assert isinstance(run.sampler, BalancedBatchSampler)
    for number in (1, 2):
        batches = loop.epoch_batches(run, number)
        assert sorted(page for batch in batches for page in batch) == sorted(run.train_pages)
        for batch in batches:
            assert any(COUNTS[page] >= 2 for page in batch), batch
    assert loop.epoch_batches(run, 2) == loop.epoch_batches(make_run(tmp_path / "again", "data.sampler=balanced",
                                                                     "optim.batch_size=2",
                                                                     "data.min_multi_panel_pages=1"), 2)


def test_trainer_random_sampler_by_default(tmp_path):
    run = make_run(tmp_path)
    assert run.sampler is None
    expected = list(iterate_batches(run.train_pages, 4, torch.Generator().manual_seed(loop.SHUFFLE_SEED_OFFSET)))
    assert loop.epoch_batches(run, 1) == expected


@pytest.mark.parametrize("override, fragment", [
    ("data.sampler=sorted", "expected random or balanced"),
    ("data.min_text_panels=-1", "data.min_text_panels"),
    ("objectives.grad_probe_every=-2", "objectives.grad_probe_every"),
])
def test_config_rejects_bad_values(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny_config(tmp_path / "manifest.csv", override)


# --------------------------------------------------------------------------------------------------
# Gradient-norm probe


def trained_parameters(tmp_path: Path, *overrides: str) -> tuple[list[torch.Tensor], list[dict]]:
    run = make_run(tmp_path, *overrides)
    records = []
    for step in range(3):
        pages = run.train_pages[step * 2: step * 2 + 4]
        records.append(loop.train_step(run, run.inputs.batch(pages), epoch=1))
    parameters = [p.detach().clone() for p in loop.optimised_parameters(run.model, run.objectives)]
    return parameters, records


def test_probe_leaves_training_unchanged(tmp_path):
    without, plain_records = trained_parameters(tmp_path / "off")
    with_probe, probe_records = trained_parameters(tmp_path / "on", "objectives.grad_probe_every=1")
    assert len(without) == len(with_probe)
    for before, after in zip(without, with_probe):
        assert torch.equal(before, after)
    assert [r["loss"] for r in plain_records] == [r["loss"] for r in probe_records]
    assert [r["grad_norm"] for r in plain_records] == [r["grad_norm"] for r in probe_records]


def test_probe_logs_every_k_steps(tmp_path):
    _, records = trained_parameters(tmp_path, "objectives.grad_probe_every=2")
    logged = [all("grad_norm" in component for component in record["components"].values()) for record in records]
    assert logged == [False, True, False]
    norms = {name: component["grad_norm"] for name, component in records[1]["components"].items()}
    assert all(np.isfinite(value) and value > 0 for value in norms.values()), norms


def test_probe_norm_matches_separate_backward(tmp_path):
    run = make_run(tmp_path)
    batch = run.inputs.batch(run.train_pages[:4])
    # Eval mode has no dropout, so the graph is fixed and both computations see the same values.
    run.model.eval()
    run.objectives.eval()
    output = run.objectives(run.model(batch), batch.page, batch.has_text, run.mask_generator)
    norms = loop.component_grad_norms(run.model, output)
    assert set(norms) == {"contrastive", "reconstruction", "alignment"}

    parameters = [p for p in run.model.parameters() if p.requires_grad]
    assert all(p.grad is None for p in parameters)
    for name in ("alignment", "contrastive"):
        run.model.zero_grad(set_to_none=True)
        component = output.components[name]
        (component.weight * component.value).backward(retain_graph=True)
        direct = float(torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]))
        assert norms[name] == pytest.approx(direct, rel=1e-5)


def test_probe_zero_for_silent_component(tmp_path):
    run = make_run(tmp_path)
    single = [page for page in run.train_pages if COUNTS[page] == 1][:1]
    batch = run.inputs.batch(single)
    output = run.objectives(run.model(batch), batch.page, batch.has_text, run.mask_generator)
    norms = loop.component_grad_norms(run.model, output)
    assert output.components["reconstruction"].active == 0
    assert norms["reconstruction"] == 0.0
    assert norms["contrastive"] == 0.0

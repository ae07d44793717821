"""The training loop end to end on tiny datasets: validation, clipping, logs, artifacts, resume and the CLI."""

from __future__ import annotations

import io
import json
import math
import stat
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from trainer import loop
from trainer.artifacts import RunDirectory, load_checkpoint
from trainer.cli import main
from trainer.config import TrainerError
from trainer_dataset import PageSpec, simple_dataset, tiny_config, write_dataset

# Panels per page, and the (page, panel) pairs without text.
COUNTS = [3, 2, 1, 4, 2, 3, 1, 2, 3, 2]
NO_TEXT = {(0, 1), (3, 0), (3, 2), (5, 2), (9, 0)}


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def make_dataset(tmp_path: Path) -> Path:
    return simple_dataset(tmp_path / "data", COUNTS, NO_TEXT)


def make_run(tmp_path: Path, *overrides: str) -> loop.Run:
    config = tiny_config(make_dataset(tmp_path), *overrides)
    directory = RunDirectory(tmp_path / "run")
    directory.check_writable(overwrite=False)
    directory.prepare(overwrite=False)
    return loop.setup(config, directory, quiet_console())


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_active(pages: list[int]) -> dict[str, int]:
    """Count by hand from COUNTS and NO_TEXT which anchors, pages and pairs can contribute."""
    multi = [page for page in pages if COUNTS[page] >= 2]
    pairs = sum(1 for page in pages for panel in range(COUNTS[page]) if (page, panel) not in NO_TEXT)
    return {
        "contrastive": sum(COUNTS[page] for page in multi),
        "reconstruction": len(multi),
        "alignment": pairs if pairs >= 2 else 0,
    }


# --------------------------------------------------------------------------------------------------
# Validation


def test_validation_loss_repeats_by_default(tmp_path):
    run = make_run(tmp_path)
    first, first_embeddings = loop.validate(run, epoch=1)
    second, second_embeddings = loop.validate(run, epoch=1)
    assert first["loss"] == second["loss"]
    assert first["components"] == second["components"]
    assert torch.equal(first_embeddings["fused"], second_embeddings["fused"])


def test_validation_loss_varies_in_legacy(tmp_path):
    run = make_run(tmp_path, "preset=legacy")
    losses = {loop.validate(run, epoch=1)[0]["loss"] for _ in range(3)}
    assert len(losses) > 1


def test_validation_switches_modes(tmp_path):
    seen = []
    for preset, objectives_training in (("default", False), ("legacy", True)):
        run = make_run(tmp_path / preset, f"preset={preset}")
        run.objectives.register_forward_pre_hook(
            lambda module, args, run=run: seen.append((preset, run.model.training, module.training))
        )
        loop.validate(run, epoch=1)
        assert seen[-1] == (preset, False, objectives_training)
        assert run.model.training
        assert run.objectives.training


# --------------------------------------------------------------------------------------------------
# One step: clipping and active counts


def blow_up_head_gradients(run: loop.Run) -> None:
    for parameter in run.objectives.reconstruction_head.parameters():
        parameter.register_hook(lambda grad: grad * 1e6)


def total_norm(parameters) -> float:
    return float(torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None]))


def test_clipping_covers_objectives_head(tmp_path):
    run = make_run(tmp_path, "optim.grad_clip=1.0")
    blow_up_head_gradients(run)
    record = loop.train_step(run, run.inputs.batch(run.train_pages[:4]), epoch=1)
    assert record["grad_norm"] > 1e3
    assert total_norm(run.objectives.parameters()) <= 1.0 + 1e-4
    assert total_norm(loop.optimised_parameters(run.model, run.objectives)) <= 1.0 + 1e-4


def test_legacy_clipping_skips_objectives_head(tmp_path):
    run = make_run(tmp_path, "optim.grad_clip=1.0", "preset=legacy")
    blow_up_head_gradients(run)
    record = loop.train_step(run, run.inputs.batch(run.train_pages[:4]), epoch=1)
    assert total_norm(run.objectives.parameters()) > 1e3
    assert total_norm(p for p in run.model.parameters() if p.requires_grad) <= 1.0 + 1e-4
    assert record["grad_norm"] == pytest.approx(total_norm(loop.optimised_parameters(run.model, run.objectives)), rel=1e-3)


def test_step_record_counts_active_terms(tmp_path):
    run = make_run(tmp_path)
    pages = run.train_pages[:4]
    record = loop.train_step(run, run.inputs.batch(pages), epoch=1)
    assert {name: item["active"] for name, item in record["components"].items()} == expected_active(pages)
    assert record["pages"] == 4
    assert record["panels"] == sum(COUNTS[page] for page in pages)


# --------------------------------------------------------------------------------------------------
# Whole runs


def test_fit_writes_every_artifact(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=2", "optim.batch_size=3")
    console = quiet_console()
    run_dir = tmp_path / "run"
    run = loop.fit(config, run_dir, console=console)

    info = json.loads((run_dir / "run.json").read_text())
    assert info["config"]["optim"]["epochs"] == 2
    assert set(info["versions"]) >= {"python", "torch", "numpy"}
    assert info["device"] == "cpu"
    assert info["seed"] == 0
    assert info["dataset_fingerprint"] == run.dataset.fingerprint
    assert info["skipped"]["bbox_zero_size"] == 0
    assert info["dataset"]["val_pages"] == len(run.val_pages) == 3

    steps_per_epoch = math.ceil(len(run.train_pages) / 3)
    records = read_metrics(run_dir)
    assert [r["kind"] for r in records] == (["step"] * steps_per_epoch + ["validation"]) * 2
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 2 * steps_per_epoch + 1))
    for record in records:
        assert set(record) >= {"kind", "epoch", "loss", "components"}
        assert set(record["components"]) == {"contrastive", "reconstruction", "alignment"}
        for component in record["components"].values():
            assert set(component) == {"value", "weight", "active"}
    for record in (r for r in records if r["kind"] == "step"):
        assert set(record) >= {"step", "lr", "grad_norm"}

    val_panels = sum(COUNTS[page] for page in run.val_pages)
    for epoch in (1, 2):
        path = run_dir / "embeddings" / f"epoch_{epoch:04d}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        assert metadata == {"format": "collapse-toolkit/embeddings", "version": "1", "epoch": str(epoch), "split": "val"}
        for name in ("fused", "vision", "text"):
            assert tensors[name].shape == (val_panels, 32)
            assert tensors[name].dtype == torch.float32
        assert tensors["page"].dtype == torch.int64
        assert torch.equal(tensors["item"], torch.arange(val_panels))
        assert tensors["has_text"].dtype == torch.uint8
        expected_pages = [page for position, page in enumerate(run.val_pages) for _ in range(COUNTS[page])]
        assert tensors["page"].tolist() == [run.val_pages.index(page) for page in expected_pages]
        page_ids = json.loads((path.parent / f"epoch_{epoch:04d}.pages.json").read_text())
        assert page_ids == [f"p{page:03d}" for page in run.val_pages]
        assert (run_dir / "checkpoints" / f"epoch_{epoch:04d}.pt").is_file()

    validation_losses = [r["loss"] for r in records if r["kind"] == "validation"]
    best = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert best["val_loss"] == min(validation_losses)
    assert last["epoch"] == 2
    assert last["embeddings"] == "embeddings/epoch_0002.safetensors"
    assert not [path for path in run_dir.rglob(".*tmp*")]

    output_lines = console.file.getvalue().strip().splitlines()
    assert output_lines[0].startswith(f"data {run.dataset.manifest}: 10 pages (7 train, 3 validation), 23 panels")
    assert [line.split()[:2] for line in output_lines[1:]] == [["epoch", "1/2"], ["epoch", "2/2"]]


def test_artifacts_get_default_file_mode(tmp_path):
    # Frozen backbones make the run write its feature cache under RUN/cache.
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1", "model.vision_frozen=true", "model.text_frozen=true")
    run_dir = tmp_path / "run"
    loop.fit(config, run_dir, console=quiet_console())
    # open() applies the process umask to mode 0o666, as for any newly created file.
    reference = tmp_path / "reference"
    with open(reference, "w"):
        pass
    expected = stat.S_IMODE(reference.stat().st_mode)

    files = [path for path in run_dir.rglob("*") if path.is_file()]
    names = {path.relative_to(run_dir).as_posix() for path in files}
    assert "embeddings/epoch_0001.safetensors" in names
    assert any(name.startswith("cache/") and name.endswith(".safetensors") for name in names)
    for path in files:
        assert oct(stat.S_IMODE(path.stat().st_mode)) == oct(expected), path.relative_to(run_dir)


def test_keep_last_deletes_older_epoch_checkpoints(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=4", "checkpoints.keep_last=2")
    run_dir = tmp_path / "run"
    loop.fit(config, run_dir, console=quiet_console())

    names = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert [name for name in names if name.startswith("epoch_")] == ["epoch_0003.pt", "epoch_0004.pt"]
    assert "last.pt" in names
    assert "best.pt" in names
    # best.pt is loadable whichever epoch it came from, deleted or kept.
    validation_losses = [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "validation"]
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best["val_loss"] == min(validation_losses)
    assert len(list((run_dir / "embeddings").glob("epoch_*.safetensors"))) == 4


def test_validation_record_counts_match_pages(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1", "optim.batch_size=16")
    run = loop.fit(config, tmp_path / "run", console=quiet_console())
    step, validation = read_metrics(tmp_path / "run")
    assert {name: item["active"] for name, item in step["components"].items()} == expected_active(run.train_pages)
    assert {name: item["active"] for name, item in validation["components"].items()} == expected_active(run.val_pages)


def test_checkpoint_weights_only_rebuilds_model(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1")
    run = loop.fit(config, tmp_path / "run", console=quiet_console())
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["format"] == "collapse-toolkit/checkpoint"
    assert checkpoint["version"] == 1
    for key in ("config", "model_state_dict", "objectives_state_dict", "optimizer_state_dict",
                "scheduler_state_dict", "rng_state", "embeddings", "val_loss"):
        assert key in checkpoint, key
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1

    model, _ = loop.build_model(run.config, torch.device("cpu"))
    model.load_checkpoint_state_dict(checkpoint["model_state_dict"])
    model.eval()
    with torch.no_grad():
        fused = torch.cat([model(run.inputs.batch([page])).fused for page in run.val_pages])
    with safe_open(str(tmp_path / "run" / checkpoint["embeddings"]), framework="pt") as handle:
        assert torch.allclose(fused, handle.get_tensor("fused"), atol=1e-5)


def test_embed_dataset_matches_epoch_file(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1")
    run = loop.fit(config, tmp_path / "run", console=quiet_console())
    embeddings, page_ids = loop.embed_dataset(tmp_path / "run" / "checkpoints" / "last.pt")
    assert page_ids == [f"p{page:03d}" for page in range(len(COUNTS))]
    assert embeddings["fused"].shape == (sum(COUNTS), 32)

    rows = [row for row, page in enumerate(embeddings["page"].tolist()) if page in run.val_pages]
    with safe_open(str(tmp_path / "run" / "embeddings" / "epoch_0001.safetensors"), framework="pt") as handle:
        for name in ("fused", "vision", "text"):
            assert torch.allclose(embeddings[name][rows], handle.get_tensor(name), atol=1e-5), name
        assert torch.equal(embeddings["has_text"][rows].to(torch.uint8), handle.get_tensor("has_text"))


def test_embed_dataset_val_split_reproduces_epoch_file(tmp_path):
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1")
    run = loop.fit(config, tmp_path / "run", console=quiet_console())
    embeddings, page_ids = loop.embed_dataset(tmp_path / "run" / "checkpoints" / "last.pt", split="val")
    assert page_ids == [f"p{page:03d}" for page in run.val_pages]

    with safe_open(str(tmp_path / "run" / "embeddings" / "epoch_0001.safetensors"), framework="pt") as handle:
        assert torch.equal(embeddings["page"], handle.get_tensor("page"))
        assert torch.allclose(embeddings["fused"], handle.get_tensor("fused"), atol=1e-5)

    train, train_ids = loop.embed_dataset(tmp_path / "run" / "checkpoints" / "last.pt", split="train")
    assert train_ids == [f"p{page:03d}" for page in run.train_pages]
    assert train["fused"].shape[0] == sum(COUNTS[page] for page in run.train_pages)
    with pytest.raises(TrainerError, match="unknown split 'test'"):
        loop.embed_dataset(tmp_path / "run" / "checkpoints" / "last.pt", split="test")


def test_fit_is_deterministic_on_cpu(tmp_path):
    manifest = make_dataset(tmp_path)
    runs = []
    for name in ("a", "b"):
        loop.fit(tiny_config(manifest, "optim.epochs=1"), tmp_path / name, console=quiet_console())
        runs.append(read_metrics(tmp_path / name))
    assert runs[0] == runs[1]


def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    manifest = make_dataset(tmp_path)
    loop.fit(tiny_config(manifest, "optim.epochs=2"), tmp_path / "whole", console=quiet_console())

    original_train_epoch = loop.train_epoch

    def interrupted(run, epoch):
        if epoch == 2:
            original_train_epoch(run, epoch)
            raise KeyboardInterrupt
        return original_train_epoch(run, epoch)

    monkeypatch.setattr(loop, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        loop.fit(tiny_config(manifest, "optim.epochs=2"), tmp_path / "split", console=quiet_console())
    monkeypatch.setattr(loop, "train_epoch", original_train_epoch)
    resumed = loop.resume(tmp_path / "split", console=quiet_console())

    assert resumed.epoch == 2
    assert read_metrics(tmp_path / "split") == read_metrics(tmp_path / "whole")
    assert json.loads((tmp_path / "split" / "run.json").read_text())["resumed_from_epoch"] == [1]


def test_refuses_non_empty_run_directory(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    config = tiny_config(make_dataset(tmp_path), "optim.epochs=1")
    with pytest.raises(TrainerError, match="not empty"):
        loop.fit(config, tmp_path / "run", console=quiet_console())

    # --overwrite replaces only a folder whose run.json marks it as a run of this trainer.
    (tmp_path / "run" / "run.json").write_text(json.dumps({"format": "collapse-toolkit/run"}))
    stale = tmp_path / "run" / "embeddings" / "epoch_0009.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    loop.fit(config, tmp_path / "run", overwrite=True, console=quiet_console())
    assert not stale.exists()
    assert (tmp_path / "run" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()

    # A run that fails during setup leaves the earlier run in place.
    broken = tiny_config(make_dataset(tmp_path), "model.vision_backbone=resnet")
    with pytest.raises(TrainerError, match="unknown vision backbone"):
        loop.fit(broken, tmp_path / "run", overwrite=True, console=quiet_console())
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


def test_nan_loss_step_is_skipped(tmp_path):
    run = make_run(tmp_path)
    with torch.no_grad():
        run.model.fusion.norm.weight.fill_(float("nan"))
    before = run.model.layout_encoder[0].weight.detach().clone()
    record = loop.train_step(run, run.inputs.batch(run.train_pages[:2]), epoch=1)
    assert record["skipped"] is True
    assert record["reason"] == "nonfinite_loss"
    assert record["skipped_steps"] == 1
    assert torch.equal(run.model.layout_encoder[0].weight, before)


# --------------------------------------------------------------------------------------------------
# Command line


def write_config(tmp_path: Path, manifest: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'device = "cpu"\n[data]\nmanifest = {json.dumps(str(manifest))}\nval_fraction = 0.3\n'
        "[model]\ndim = 16\nprojection_hidden = 16\nlayout_hidden = 8\n"
        "[objectives]\nreconstruction_hidden = 16\n[optim]\nepochs = 1\nbatch_size = 4\n"
    )
    return path


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def test_cli_fit_and_refusal(tmp_path, capfd):
    config = write_config(tmp_path, make_dataset(tmp_path))
    run_dir = tmp_path / "run"
    assert run_cli(["fit", "--config", str(config), "--out", str(run_dir), "--set", "optim.epochs=2"]) == 0
    err = capfd.readouterr().err
    assert "epoch 1/2" in err
    assert "epoch 2/2" in err
    assert (run_dir / "checkpoints" / "epoch_0002.pt").is_file()

    assert run_cli(["fit", "--config", str(config), "--out", str(run_dir)]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "not empty; pass --overwrite" in lines[0]

    assert run_cli(["fit", "--config", str(config), "--out", str(run_dir), "--overwrite"]) == 0
    assert not (run_dir / "checkpoints" / "epoch_0002.pt").exists()


def test_cli_nothing_usable_exits_2(tmp_path, capfd):
    manifest = write_dataset(
        tmp_path / "data",
        [PageSpec("a", [([0, 0, 0, 10], "zero width")]), PageSpec("b", [([0, 0, 10, 10], "x")], write_image=False)],
    )
    config = write_config(tmp_path, manifest)
    assert run_cli(["fit", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert str(manifest) in lines[0]
    assert "no usable pages" in lines[0]
    assert "bbox_zero_size 1" in lines[0]
    assert "missing_image 1" in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--set", "optim.sped=1"], "unknown config key 'optim.sped'"),
        (["--set", "model.vision_backbone=resnet"], "model.vision_backbone: unknown vision backbone 'resnet'"),
        (["--set", "checkpoints.keep_last=-1"], "invalid value for checkpoints.keep_last"),
    ],
)
def test_cli_bad_config_exits_2(tmp_path, capfd, extra, fragment):
    config = write_config(tmp_path, make_dataset(tmp_path))
    assert run_cli(["fit", "--config", str(config), "--out", str(tmp_path / "run"), *extra]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert fragment in lines[0]


def test_cli_resume_finished_and_missing_runs(tmp_path, capfd):
    config = write_config(tmp_path, make_dataset(tmp_path))
    run_dir = tmp_path / "run"
    assert run_cli(["fit", "--config", str(config), "--out", str(run_dir)]) == 0
    before = (run_dir / "metrics.jsonl").read_text()
    capfd.readouterr()

    assert run_cli(["resume", str(run_dir)]) == 0
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert "trained through epoch 1" in capfd.readouterr().err

    assert run_cli(["resume", str(tmp_path / "nowhere")]) == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert "checkpoint not found" in lines[0]


def test_cli_missing_config_file_exits_2(tmp_path, capfd):
    assert run_cli(["fit", "--config", str(tmp_path / "absent.toml"), "--out", str(tmp_path / "run")]) == 2
    assert "config file not found" in capfd.readouterr().err

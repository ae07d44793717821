"""Data-parallel training under torchrun (gloo on CPU), the shared feature cache, batch loading and compile."""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from trainer import loop
from trainer.artifacts import RunDirectory, load_checkpoint
from trainer.backbones import build_text_backbone, build_vision_backbone
from trainer.cli import main
from trainer.config import DataConfig
from trainer.data import PanelInputs, load_batches, load_dataset, split_pages
from trainer.distributed import Distributed, _ScaleGradient, batch_labels, shard_bounds, shutdown
from trainer.model import PanelEncoder
from trainer_dataset import simple_dataset, tiny_config

REPO = Path(__file__).resolve().parents[1]
COUNTS = [3, 2, 1, 4, 2, 3, 1, 2, 3, 2]
NO_TEXT = {(0, 1), (3, 0), (3, 2), (5, 2), (9, 0)}
# Seconds to wait for torchrun; generous because test jobs share small machines.
TORCHRUN_TIMEOUT = 300
# Largest differences seen between the 2-rank and 1-process embeddings after 6 steps: 4e-6 in this test,
# and 3e-4 in the same run without its skipped step. Both come from rounding differences of about 1e-7 in
# the gradients, which AdamW's first normalised steps enlarge.
EMBEDDING_TOLERANCE = 1e-3


def quiet_console() -> Console:
    return Console(file=io.StringIO(), width=200)


def write_config(tmp_path: Path, manifest: Path, *lines: str) -> Path:
    """A tiny CPU config without dropout. 7 train pages in batches of 3 leave a last batch of 1 page,
    so one rank gets an empty slice; 3 validation pages split 1 + 2."""
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'device = "cpu"\n[data]\nmanifest = {json.dumps(str(manifest))}\nval_fraction = 0.3\n'
        "[model]\ndim = 32\nprojection_hidden = 32\nlayout_hidden = 16\ndropout = 0.0\n"
        "[objectives]\nreconstruction_hidden = 32\nreconstruction_dropout = 0.0\n"
        "[optim]\nepochs = 2\nbatch_size = 3\n" + "".join(line + "\n" for line in lines)
    )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """Run ``python -m trainer`` under torchrun on the loopback interface."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if platform.system() == "Linux":
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "trainer", *argv,
    ]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT)


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    return raised.value.code


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------------
# Sharding and collectives in one process


def test_shard_bounds_split_evenly():
    assert shard_bounds(7, 2) == [0, 3, 7]
    assert shard_bounds(1, 2) == [0, 0, 1]
    assert shard_bounds(10, 3) == [0, 3, 6, 10]


def test_shards_cover_global_batch():
    pages = [9, 4, 7, 1, 3]
    ranks = [Distributed(rank=rank, world_size=2) for rank in range(2)]
    assert [rank.shard(pages) for rank in ranks] == [[9, 4], [7, 1, 3]]
    offsets = [0, 3, 5, 6, 10, 12, 15, 16, 18, 21, 23]
    assert ranks[0].panel_counts(pages, offsets) == [COUNTS[9] + COUNTS[4], COUNTS[7] + COUNTS[1] + COUNTS[3]]
    assert ranks[0].panel_counts([5], offsets) == [0, COUNTS[5]]


def test_single_process_collectives_pass_through():
    single = Distributed()
    rows = torch.randn(4, 3)
    assert single.gather_rows(rows, [4]) is rows
    assert single.gather_with_local_grad(rows, [4]) is rows
    assert single.any_true([False, True]) == [False, True]
    assert single.sum([1.5, 2]) == [1.5, 2.0]
    assert single.gather_objects({"a": 1}) == [{"a": 1}]
    assert single.wrap(torch.nn.Linear(2, 2)).__class__ is torch.nn.Linear


def test_scale_gradient_multiplies_backward_only():
    tensor = torch.tensor([1.0, -2.0], requires_grad=True)
    scaled = _ScaleGradient.apply(tensor, 3.0)
    assert torch.equal(scaled, tensor)
    (scaled * torch.tensor([1.0, 2.0])).sum().backward()
    assert torch.equal(tensor.grad, torch.tensor([3.0, 6.0]))


def test_batch_labels_match_collated_batch(tmp_path):
    config = tiny_config(simple_dataset(tmp_path / "data", COUNTS, NO_TEXT))
    directory = RunDirectory(tmp_path / "run")
    run = loop.setup(config, directory, quiet_console())
    pages = [3, 0, 8, 5]
    batch = run.inputs.batch(pages)
    labels = batch_labels(pages, run.inputs.offsets, run.inputs.has_text, Distributed(rank=1, world_size=2), run.device)
    assert torch.equal(labels.page, batch.page)
    assert torch.equal(labels.has_text, batch.has_text)
    assert labels.counts == [COUNTS[3] + COUNTS[0], COUNTS[8] + COUNTS[5]]


@pytest.mark.parametrize("finished", [True, False])
def test_shutdown_destroys_the_group_it_created(tmp_path, finished):
    import torch.distributed as torch_dist

    store = torch_dist.FileStore(str(tmp_path / "store"), 1)
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        # A one-rank group replaces a real job here, so the barrier returns at once.
        shutdown(Distributed(rank=0, world_size=2, backend="gloo", owns_group=True), finished)
        assert not torch_dist.is_initialized()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def test_shutdown_leaves_a_callers_group(tmp_path):
    import torch.distributed as torch_dist

    store = torch_dist.FileStore(str(tmp_path / "store"), 1)
    torch_dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shutdown(Distributed(rank=0, world_size=2, backend="gloo", owns_group=False), True)
        assert torch_dist.is_initialized()
    finally:
        torch_dist.destroy_process_group()


def test_fit_drops_the_training_wrapper(tmp_path):
    manifest = simple_dataset(tmp_path / "data", COUNTS, NO_TEXT)
    run = loop.fit(tiny_config(manifest, "optim.epochs=1"), tmp_path / "run", console=quiet_console())
    # Under torchrun the wrapper references the process group. The encoder remains for the caller.
    assert run.loss_module is None
    assert run.history and isinstance(run.model, PanelEncoder)


# --------------------------------------------------------------------------------------------------
# torchrun with two gloo ranks


def test_two_ranks_match_one_process(tmp_path):
    manifest = simple_dataset(tmp_path / "data", COUNTS, NO_TEXT)
    config = write_config(tmp_path, manifest, "[debug]", "nan_at_step = 2")
    assert run_cli(["fit", "--config", str(config), "--out", str(tmp_path / "one"), "--set", "objectives.gather=true"]) == 0

    completed = torchrun(["fit", "--config", str(config), "--out", str(tmp_path / "two"), "--set", "objectives.gather=true"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "epoch 2/2" in completed.stderr
    assert completed.stderr.count("epoch 2/2") == 1, "only rank 0 prints epoch summaries"

    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo"}

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["kind"], r["epoch"], r["step"], r["pages"], r["panels"]) for r in two] == [
        (r["kind"], r["epoch"], r["step"], r["pages"], r["panels"]) for r in one
    ]
    # Step 2 is skipped on both ranks (debug.nan_at_step), so their parameters stay equal.
    assert [r.get("skipped") for r in two if r["kind"] == "step"] == [False, True, False, False, False, False]
    for first, second in zip(one, two):
        if first.get("skipped"):
            continue
        assert second["loss"] == pytest.approx(first["loss"], rel=1e-5, abs=1e-6)
        for name, component in first["components"].items():
            assert second["components"][name]["active"] == component["active"]

    for epoch in (1, 2):
        name = f"epoch_{epoch:04d}"
        single = load_file(str(tmp_path / "one" / "embeddings" / f"{name}.safetensors"))
        ranks = load_file(str(tmp_path / "two" / "embeddings" / f"{name}.safetensors"))
        for key in ("page", "item", "has_text"):
            assert torch.equal(ranks[key], single[key]), key
        for key in ("fused", "vision", "text"):
            assert torch.allclose(ranks[key], single[key], atol=EMBEDDING_TOLERANCE, rtol=0), key
        pages_json = f"{name}.pages.json"
        assert (tmp_path / "two" / "embeddings" / pages_json).read_text() == (
            tmp_path / "one" / "embeddings" / pages_json
        ).read_text()

    checkpoint = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    assert checkpoint["world_size"] == 2
    assert len(checkpoint["rank_rng_states"]) == 2


def test_two_ranks_local_objectives_share_cache(tmp_path):
    manifest = simple_dataset(tmp_path / "data", COUNTS, NO_TEXT)
    config = write_config(tmp_path, manifest)
    frozen = ["--set", "model.vision_frozen=true", "--set", "model.text_frozen=true"]
    run_dir = tmp_path / "run"
    completed = torchrun(["fit", "--config", str(config), "--out", str(run_dir), *frozen])
    assert completed.returncode == 0, completed.stderr[-3000:]

    # Rank 0 computed every feature and rank 1 read them, so the report shows no cache hits.
    assert "vision features (tiny_cnn, frozen): 23 computed, 0 from the cache" in completed.stderr
    caches = sorted(path.name.split("-")[0] for path in (run_dir / "cache").glob("*.safetensors"))
    assert caches == ["text", "vision"]
    assert list((run_dir / "cache").glob(".*.tmp-*")) == []

    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    train_pages, val_pages = split_pages(dataset, 0.3, seed=0)
    steps = [record for record in read_metrics(run_dir) if record["kind"] == "step"]
    assert [record["step"] for record in steps] == list(range(1, 7))
    assert [record["pages"] for record in steps[:3]] == [3, 3, 1]
    # Each rank's slice keeps its pages whole, so over an epoch the anchors with a positive are the
    # panels of the train pages with 2 or more panels, as in one process.
    assert sum(record["components"]["contrastive"]["active"] for record in steps[:3]) == sum(
        COUNTS[page] for page in train_pages if COUNTS[page] >= 2
    )
    fused = load_file(str(run_dir / "embeddings" / "epoch_0002.safetensors"))["fused"]
    assert fused.shape[0] == sum(COUNTS[page] for page in val_pages)
    assert torch.isfinite(fused).all()

    # A resume with the same world size continues the run.
    completed = torchrun(["resume", str(run_dir)])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "trained through epoch 2" in completed.stderr


# --------------------------------------------------------------------------------------------------
# Feature cache and batch loading


def frozen_backbones():
    torch.manual_seed(0)
    return build_vision_backbone("tiny_cnn", frozen=True), build_text_backbone("hashed_bow", frozen=True)


def test_cached_and_recomputed_features_embed_alike(tmp_path):
    dataset = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "data", COUNTS, NO_TEXT))))
    vision, text = frozen_backbones()
    config = tiny_config(dataset.manifest).model
    torch.manual_seed(1)
    model = PanelEncoder(vision, text, config).eval()
    cache = tmp_path / "cache"
    pages = list(range(len(COUNTS)))

    computed = PanelInputs(dataset, vision, text, cache, torch.device("cpu"))
    cached = PanelInputs(dataset, vision, text, cache, torch.device("cpu"))
    inline = PanelInputs(dataset, vision, text, cache, torch.device("cpu"), cache_features=False)
    # The 5 panels without text share one text: 23 distinct images, 23 - 5 + 1 distinct texts.
    assert [stats.computed for stats in computed.feature_stats] == [23, 19]
    assert [stats.computed for stats in cached.feature_stats] == [0, 0]
    assert inline.feature_stats == []

    with torch.no_grad():
        from_computed = model(computed.batch(pages))
        from_cache = model(cached.batch(pages))
        from_backbones = model(inline.batch(pages))
    for name in ("fused", "vision", "text"):
        assert torch.equal(getattr(from_cache, name), getattr(from_computed, name)), name
        assert torch.allclose(getattr(from_backbones, name), getattr(from_cache, name), atol=1e-5), name
    assert inline.batch(pages).pixels is not None


def test_cache_writers_merge(tmp_path):
    vision, text = frozen_backbones()
    cache = tmp_path / "cache"
    first = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "a", [2, 3]))))
    second = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "b", [4, 1]))))
    PanelInputs(first, vision, text, cache, torch.device("cpu"))
    PanelInputs(second, vision, text, cache, torch.device("cpu"))

    # The second writer kept the first one's features, so both datasets now come from the cache.
    for dataset in (first, second):
        again = PanelInputs(dataset, vision, text, cache, torch.device("cpu"))
        assert [stats.computed for stats in again.feature_stats] == [0, 0]
    stored = load_file(str(next(cache.glob("vision-*.safetensors"))))
    assert stored["features"].shape[0] == 5 + 5


def test_lazy_crops_match_hashes(tmp_path):
    import hashlib

    from PIL import Image

    manifest = simple_dataset(tmp_path / "data", [3, 2])
    dataset = load_dataset(DataConfig(manifest=str(manifest), image_cache_mb=0))
    panel = dataset.pages[0].panels[1]
    assert panel.crop.pages.bytes == 0

    with Image.open(tmp_path / "data" / "pages" / "p000.png") as page:
        expected = page.convert("RGB").crop(panel.crop.box)
    image = panel.image
    assert image.tobytes() == expected.tobytes()
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest()
    assert digest == panel.image_hash


def test_page_cache_keeps_budget(tmp_path):
    from PIL import Image

    from trainer.data import PageImageCache

    page_bytes = 96 * 128 * 3
    cache = PageImageCache(2 * page_bytes)
    for name in ("a", "b", "c"):
        cache.put(tmp_path / name, Image.new("RGB", (96, 128)))
    assert cache.bytes == 2 * page_bytes
    assert list(cache._images) == [tmp_path / "b", tmp_path / "c"]

    cache.put(tmp_path / "large", Image.new("RGB", (300, 300)))
    assert tmp_path / "large" not in cache._images


def test_page_deleted_after_load_names_file(tmp_path):
    from trainer.data import DataError

    manifest = simple_dataset(tmp_path / "data", [3, 2])
    dataset = load_dataset(DataConfig(manifest=str(manifest), image_cache_mb=0))
    page = tmp_path / "data" / "pages" / "p001.png"
    page.unlink()
    with pytest.raises(DataError, match="p001.png: page image became unreadable"):
        dataset.pages[1].panels[0].image


def test_worker_batches_equal_direct(tmp_path):
    dataset = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "data", COUNTS, NO_TEXT))))
    torch.manual_seed(0)
    inputs = PanelInputs(
        dataset, build_vision_backbone("tiny_cnn"), build_text_backbone("hashed_bow"), None, torch.device("cpu")
    )
    batches = [[3, 0], [], [9, 8, 7]]
    direct = list(load_batches(inputs, batches))
    from_workers = list(load_batches(inputs, batches, num_workers=1))
    assert len(from_workers) == 3
    for expected, received in zip(direct, from_workers):
        assert torch.equal(received.pixels, expected.pixels)
        assert torch.equal(received.page, expected.page)
        assert received.texts == expected.texts
    assert direct[1].pixels.shape == (0, 3, 64, 64)


@pytest.mark.slow
def test_compiled_model_trains_like_eager(tmp_path):
    manifest = simple_dataset(tmp_path / "data", COUNTS, NO_TEXT)
    eager = loop.fit(tiny_config(manifest, "optim.epochs=1", "model.dropout=0.0"), tmp_path / "eager", console=quiet_console())
    compiled = loop.fit(
        tiny_config(manifest, "optim.epochs=1", "model.dropout=0.0", "model.compile=true"),
        tmp_path / "compiled",
        console=quiet_console(),
    )
    assert compiled.history[0]["val_loss"] == pytest.approx(eager.history[0]["val_loss"], rel=1e-4)

"""Dataset reading, skip counts, layout features, the split, batches and the frozen-feature cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import DataError, PanelInputs, iterate_batches, load_dataset, split_pages
from trainer_dataset import PAGE_HEIGHT, PAGE_WIDTH, PageSpec, grid_page, simple_dataset, write_dataset

EXPECTED_SKIPS = {
    "invalid_manifest_row": 1,
    "duplicate_page": 1,
    "unlabelled": 1,
    "page_type_filtered": 2,
    "unreadable_json": 1,
    "invalid_annotation": 1,
    "no_panels": 1,
    "too_many_panels": 1,
    "bbox_zero_size": 1,
    "bbox_outside_page": 2,
    "missing_image": 1,
    "unreadable_image": 1,
    "size_mismatch": 1,
}


def write_mixed_dataset(root: Path) -> Path:
    good = [grid_page("good_a", 3), grid_page("good_b", 2, texts=[None, "hello there"]), grid_page("good_c", 1)]
    bad = [
        grid_page("cover", 1, page_type="cover"),
        grid_page("ad", 2, page_type="advertisement"),
        grid_page("nolabel", 2),
        PageSpec("broken_json", [], raw_annotation='{"image_width": 96, "panels": ['),
        PageSpec("schema", [], raw_annotation='{"image_width": "wide", "image_height": 128, "panels": []}'),
        PageSpec("empty", []),
        grid_page("crowded", 9),
        PageSpec("flat", [([2, 2, 40, 0], "flat")]),
        PageSpec("outside", [([60, 10, 50, 20], "too wide")]),
        PageSpec("negative", [([-5, 10, 20, 20], "left of page")]),
        PageSpec("noimage", [([2, 2, 40, 40], "gone")], write_image=False),
        PageSpec("garbled", [([2, 2, 40, 40], "garbled")]),
        PageSpec("oversized", [([1000, 10, 40, 40], "far right")], extra={"image_width": 99999}),
    ]
    manifest = write_dataset(root, good + bad, unlabelled=("nolabel",))
    (root / "pages" / "garbled.png").write_bytes(b"not a png at all")
    with open(manifest, "a") as handle:
        handle.write("good_a,pages/good_a.png,annotations/good_a.json\n")
        handle.write("extra,pages/good_b.png,annotations/good_b.json,surplus\n")
    return manifest


def test_skip_counts_per_reason(tmp_path):
    manifest = write_mixed_dataset(tmp_path)
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    assert [page.page_id for page in dataset.pages] == ["good_a", "good_b", "good_c"]
    assert dataset.skipped == EXPECTED_SKIPS
    assert "good_a: page id repeats" in dataset.skipped_examples["duplicate_page"][0]


def test_max_panels_cap_from_config(tmp_path):
    manifest = write_dataset(tmp_path, [grid_page("a", 3), grid_page("b", 5)])
    dataset = load_dataset(DataConfig(manifest=str(manifest), max_panels=4))
    assert [page.page_id for page in dataset.pages] == ["a"]
    assert dataset.skipped["too_many_panels"] == 1


def test_empty_page_types_keep_unlabelled_pages(tmp_path):
    manifest = write_dataset(tmp_path, [grid_page("a", 2), grid_page("cover", 1, page_type="cover")], unlabelled=("a",))
    (tmp_path / "labels.json").unlink()
    dataset = load_dataset(DataConfig(manifest=str(manifest), page_types=[]))
    assert [page.page_id for page in dataset.pages] == ["a", "cover"]


def test_missing_labels_file_is_an_error_when_filtering(tmp_path):
    manifest = write_dataset(tmp_path, [grid_page("a", 2)])
    (tmp_path / "labels.json").unlink()
    with pytest.raises(DataError, match="labels file not found"):
        load_dataset(DataConfig(manifest=str(manifest)))


def test_panel_record_fields(tmp_path):
    spec = PageSpec("p", [([10, 20, 30, 60], "Hi!"), ([50, 0, 46, 128], None), ([0, 100, 40, 20], "   ")])
    manifest = write_dataset(tmp_path, [spec])
    page = load_dataset(DataConfig(manifest=str(manifest))).pages[0]
    first, second, third = page.panels

    assert first.image.size == (30, 60)
    assert first.layout == pytest.approx((0.5, 1800 / (PAGE_WIDTH * PAGE_HEIGHT), 0, 0, 0, 25 / PAGE_WIDTH, 50 / PAGE_HEIGHT))
    assert first.text == "Hi!"
    assert first.has_text is True
    assert second.text == ""
    assert second.has_text is False
    assert third.has_text is False
    assert second.layout[5:] == pytest.approx((73 / PAGE_WIDTH, 0.5))
    assert {panel.page for panel in page.panels} == {0}


def test_crop_scales_when_image_resolution_differs(tmp_path):
    spec = PageSpec("p", [([10, 20, 30, 60], "Hi")])
    manifest = write_dataset(tmp_path, [spec])
    image_path = tmp_path / "pages" / "p.png"
    Image.open(image_path).resize((PAGE_WIDTH * 2, PAGE_HEIGHT * 2)).save(image_path)
    panel = load_dataset(DataConfig(manifest=str(manifest))).pages[0].panels[0]
    assert panel.image.size == (60, 120)
    assert panel.layout[0] == pytest.approx(0.5)


def test_crop_scales_with_rounded_image_size(tmp_path):
    # 401 / 2 = 200.5 rounds to 200 when the page image is halved, so the aspect ratios differ slightly.
    spec = PageSpec("p", [([100, 200, 100, 100], "Hi")], width=300, height=401)
    manifest = write_dataset(tmp_path, [spec])
    image_path = tmp_path / "pages" / "p.png"
    Image.open(image_path).resize((150, 200)).save(image_path)
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    assert dataset.skipped["size_mismatch"] == 0
    assert dataset.pages[0].panels[0].image.size == (50, 50)


@pytest.mark.parametrize("load_images", [True, False])
def test_declared_size_unlike_image_is_skipped(tmp_path, load_images):
    # The panel lies inside the declared 99999 px width, far right of the 96 px image.
    oversized = PageSpec("oversized", [([1000, 10, 40, 40], "far right")], extra={"image_width": 99999})
    manifest = write_dataset(tmp_path, [grid_page("good", 2), oversized])
    dataset = load_dataset(DataConfig(manifest=str(manifest)), load_images=load_images)

    assert [page.page_id for page in dataset.pages] == ["good"]
    assert dataset.skipped["size_mismatch"] == 1
    detail = dataset.skipped_examples["size_mismatch"][0]
    assert detail.startswith("oversized: ")
    assert "99999x128" in detail
    assert f"{PAGE_WIDTH}x{PAGE_HEIGHT}" in detail


def test_image_stretched_in_one_direction_is_skipped(tmp_path):
    manifest = write_dataset(tmp_path, [grid_page("good", 2), grid_page("stretched", 2)])
    image_path = tmp_path / "pages" / "stretched.png"
    Image.open(image_path).resize((PAGE_WIDTH * 2, PAGE_HEIGHT)).save(image_path)
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    assert [page.page_id for page in dataset.pages] == ["good"]
    assert dataset.skipped["size_mismatch"] == 1


def test_manifest_row_with_extra_field_is_skipped(tmp_path):
    manifest = write_dataset(tmp_path, [grid_page("good", 2), grid_page("shifted", 2)])
    lines = manifest.read_text().splitlines()
    # An unquoted comma in the image path shifts the annotation path into a fourth field.
    lines[2] = "shifted,pages/shif,ted.png,annotations/shifted.json"
    lines.append("padded,pages/good.png,annotations/good.json,one,two")
    manifest.write_text("\n".join(lines) + "\n")
    dataset = load_dataset(DataConfig(manifest=str(manifest)))

    assert [page.page_id for page in dataset.pages] == ["good"]
    assert dataset.skipped["invalid_manifest_row"] == 2
    first, second = dataset.skipped_examples["invalid_manifest_row"]
    assert first == "shifted: manifest line 3 has 1 field more than the 3 header columns"
    assert second == "padded: manifest line 4 has 2 fields more than the 3 header columns"


HUGE_INTEGER = "1" + "0" * 400


@pytest.mark.parametrize(
    "annotation",
    [
        # Integers too large for a float, as a page size and inside a bbox.
        f'{{"image_width": {HUGE_INTEGER}, "image_height": 128, "panels": [{{"bbox": [0, 0, 10, 10]}}]}}',
        f'{{"image_width": 96, "image_height": 128, "panels": [{{"bbox": [0, 0, {HUGE_INTEGER}, 10]}}]}}',
        # A page of under one pixel, whose area underflows to zero.
        '{"image_width": 2e-200, "image_height": 3e-200, "panels": [{"bbox": [0, 0, 2e-200, 3e-200]}]}',
        '{"image_width": 0.5, "image_height": 128, "panels": [{"bbox": [0, 0, 0.5, 128]}]}',
    ],
    ids=["huge_width", "huge_bbox", "tiny_page", "half_pixel_width"],
)
@pytest.mark.parametrize("load_images", [True, False])
def test_unusable_annotation_numbers_are_skipped(tmp_path, annotation, load_images):
    manifest = write_dataset(tmp_path, [grid_page("good", 2), PageSpec("odd", [], raw_annotation=annotation)])
    dataset = load_dataset(DataConfig(manifest=str(manifest)), load_images=load_images)

    assert [page.page_id for page in dataset.pages] == ["good"]
    assert dataset.skipped["invalid_annotation"] == 1
    assert dataset.skipped_examples["invalid_annotation"][0].startswith("odd: ")


def test_nothing_usable_names_the_manifest(tmp_path):
    manifest = write_dataset(tmp_path, [PageSpec("x", [([0, 0, 0, 5], "zero")]), grid_page("y", 2, page_type="ad")])
    with pytest.raises(DataError) as raised:
        load_dataset(DataConfig(manifest=str(manifest)))
    message = str(raised.value)
    assert str(manifest) in message
    assert "no usable pages" in message
    assert "bbox_zero_size 1" in message
    assert "page_type_filtered 1" in message


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "manifest not found"),
        ("page_id,image\n", "lacks column(s) image_path, json_path"),
        ("page_id,image_path,json_path\n", "lists no pages"),
    ],
)
def test_bad_manifest_is_an_error(tmp_path, content, fragment):
    manifest = tmp_path / "manifest.csv"
    if content is not None:
        manifest.write_text(content)
    with pytest.raises(DataError, match=re.escape(fragment)):
        load_dataset(DataConfig(manifest=str(manifest)))


def test_split_is_seeded_disjoint_and_by_page(tmp_path):
    manifest = simple_dataset(tmp_path, [2] * 20)
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    train, val = split_pages(dataset, 0.25, seed=0)
    assert len(val) == 5
    assert sorted(train + val) == list(range(20))
    assert split_pages(dataset, 0.25, seed=0) == (train, val)
    assert split_pages(dataset, 0.25, seed=1) != (train, val)


def test_split_stable_when_pages_added(tmp_path):
    small = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "a", [2] * 20))))
    large = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path / "b", [2] * 30))))
    _, small_val = split_pages(small, 0.2, seed=3)
    _, large_val = split_pages(large, 0.2, seed=3)
    small_ids = {small.pages[index].page_id for index in small_val}
    large_ids = {large.pages[index].page_id for index in large_val}
    # The larger split takes more validation pages, and every page of the smaller one stays in it.
    assert small_ids <= large_ids


def test_split_needs_two_pages(tmp_path):
    dataset = load_dataset(DataConfig(manifest=str(simple_dataset(tmp_path, [2]))))
    with pytest.raises(DataError, match="at least 2"):
        split_pages(dataset, 0.2, seed=0)


def test_fingerprint_tracks_annotations(tmp_path):
    manifest = simple_dataset(tmp_path, [2, 3])
    first = load_dataset(DataConfig(manifest=str(manifest))).fingerprint
    assert load_dataset(DataConfig(manifest=str(manifest))).fingerprint == first
    annotation = tmp_path / "annotations" / "p001.json"
    content = json.loads(annotation.read_text())
    content["panels"][0]["text"] = "changed"
    annotation.write_text(json.dumps(content))
    assert load_dataset(DataConfig(manifest=str(manifest))).fingerprint != first


def test_fingerprint_tracks_page_images(tmp_path):
    manifest = simple_dataset(tmp_path, [2, 3])
    first = load_dataset(DataConfig(manifest=str(manifest))).fingerprint
    image_path = tmp_path / "pages" / "p001.png"
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    image.putpixel((0, 0), tuple(255 - value for value in image.getpixel((0, 0))))
    image.save(image_path)

    assert load_dataset(DataConfig(manifest=str(manifest))).fingerprint != first
    # A header-only load hashes the same bytes.
    light = load_dataset(DataConfig(manifest=str(manifest)), load_images=False).fingerprint
    assert light == load_dataset(DataConfig(manifest=str(manifest))).fingerprint


def test_iterate_batches_shuffles_reproducibly():
    pages = list(range(10))
    plain = list(iterate_batches(pages, 4))
    assert plain == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = list(iterate_batches(pages, 4, torch.Generator().manual_seed(5)))
    second = list(iterate_batches(pages, 4, torch.Generator().manual_seed(5)))
    assert first == second
    assert sorted(sum(first, [])) == pages
    assert first != plain


class CountingBackbone(torch.nn.Module):
    """A frozen stand-in wrapper that counts how many items reach the wrapped backbone."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.frozen = True
        self.out_dim = backbone.out_dim
        self.cache_key = backbone.cache_key
        self.name = backbone.name
        self.items = 0
        if hasattr(backbone, "preprocess"):
            self.preprocess = backbone.preprocess

    def forward(self, inputs):
        self.items += len(inputs)
        return self.backbone(inputs)


def test_frozen_features_cached(tmp_path):
    from trainer.backbones import build_text_backbone, build_vision_backbone

    manifest = simple_dataset(tmp_path / "data", [3, 2, 2], no_text={(0, 0)})
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    torch.manual_seed(0)
    vision = CountingBackbone(build_vision_backbone("tiny_cnn", frozen=True))
    text = CountingBackbone(build_text_backbone("hashed_bow", frozen=True))
    cache = tmp_path / "cache"

    inputs = PanelInputs(dataset, vision, text, cache, torch.device("cpu"))
    assert vision.items == 7
    assert text.items == 7
    assert [(stats.kind, stats.distinct, stats.computed) for stats in inputs.feature_stats] == [
        ("vision", 7, 7), ("text", 7, 7),
    ]
    assert inputs.vision_features.shape == (7, vision.out_dim)
    assert len(list(cache.glob("vision-*.safetensors"))) == 1
    assert len(list(cache.glob("text-*.safetensors"))) == 1

    # Batches reuse the cached rows, so the backbones never run again.
    batch = inputs.batch([2, 0])
    assert vision.items == 7
    assert batch.pixels is None
    assert batch.texts is None
    assert torch.equal(batch.vision_features[:2], inputs.vision_features[5:7])

    again = PanelInputs(dataset, vision, text, cache, torch.device("cpu"))
    assert vision.items == 7
    assert text.items == 7
    assert [stats.computed for stats in again.feature_stats] == [0, 0]
    assert torch.equal(again.vision_features, inputs.vision_features)
    assert torch.equal(again.text_features, inputs.text_features)


def test_trainable_backbones_get_raw_inputs(tmp_path):
    from trainer.backbones import build_text_backbone, build_vision_backbone

    manifest = simple_dataset(tmp_path, [3, 2], no_text={(1, 1)})
    dataset = load_dataset(DataConfig(manifest=str(manifest)))
    vision = build_vision_backbone("tiny_cnn")
    text = build_text_backbone("hashed_bow")
    inputs = PanelInputs(dataset, vision, text, tmp_path / "cache", torch.device("cpu"))
    batch = inputs.batch([1, 0])

    assert batch.vision_features is None
    assert batch.pixels.shape == (5, 3, vision.input_size, vision.input_size)
    assert batch.texts[:2] == ["page 1 panel 0 word10", ""]
    assert batch.page.tolist() == [0, 0, 1, 1, 1]
    assert batch.dataset_page.tolist() == [1, 1, 0, 0, 0]
    assert batch.has_text.tolist() == [True, False, True, True, True]
    assert batch.layout.shape == (5, 7)
    assert not (tmp_path / "cache").exists()

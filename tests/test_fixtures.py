"""Tests for the bundled comic-page fixtures and the script that generates them."""

from __future__ import annotations

import csv
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import load_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
COMICS = FIXTURES / "comics"
EMBEDDINGS = FIXTURES / "embeddings"
README = FIXTURES / "README.md"

USED_LABELS = ("narrative", "story")
PANEL_CAP = 8
MALFORMED_REASONS = {"bbox_outside_page", "bbox_zero_size", "missing_image", "unreadable_json", "too_many_panels"}

# Words the dialogue uses for the drawn objects and their colours.
OBJECT_WORDS = re.compile(
    r"\b(sun|moon|tree|house|cottage|car|boat|sailboat|fish|cat|kitten|star|rain cloud|storm cloud"
    r"|mountain|peak|flower|blossom)\b"
)
COLOUR_WORDS = re.compile(r"\b(red|orange|yellow|green|blue|purple|pink|brown)\b")
BUBBLE_FILL = (255, 255, 255)


# ---------------------------------------------------------------------------------------
# Helpers


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root/comics and root/embeddings, keyed by relative path."""
    hashes = {}
    for sub in ("comics", "embeddings"):
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                hashes[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def read_manifest() -> list[dict[str, str]]:
    with open(COMICS / "manifest.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def valid_pages() -> list[tuple[dict[str, str], dict]]:
    """Manifest rows and annotations of the narrative and story pages that are not malformed."""
    labels = read_json(COMICS / "labels.json")
    malformed = read_json(COMICS / "malformed.json")
    pages = []
    for row in read_manifest():
        if labels[row["page_id"]] in USED_LABELS and row["page_id"] not in malformed:
            pages.append((row, read_json(COMICS / row["json_path"])))
    return pages


def readme_table(first_column: str) -> dict[str, int]:
    """Read the README table whose header starts with first_column into {first cell: count}."""
    lines = README.read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    table = {}
    for line in lines[header + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        table[cells[0]] = int(cells[1])
    return table


def effective_rank(matrix: np.ndarray) -> float:
    """Effective rank (RankMe): exp of the entropy of the normalised singular values, uncentred."""
    singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    p = singular / singular.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def mean_pair_cosine(matrix: np.ndarray, mask: np.ndarray) -> float:
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    return float((unit @ unit.T)[mask].mean())


# ---------------------------------------------------------------------------------------
# Regeneration


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fixtures")
    result = subprocess.run(
        [sys.executable, str(FIXTURES / "generate.py"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_regeneration_is_byte_identical(regenerated):
    committed = file_hashes(FIXTURES)
    fresh = file_hashes(regenerated)
    versions = f"Pillow {PIL.__version__}, numpy {np.__version__}"

    assert sorted(fresh) == sorted(committed), f"file sets differ ({versions})"
    changed = [name for name in committed if committed[name] != fresh[name]]
    assert changed == [], f"regenerated files differ from the committed ones ({versions}): {changed[:5]}"


def test_generate_rejects_file_as_output(tmp_path):
    target = tmp_path / "not_a_directory"
    target.write_text("x")
    result = subprocess.run(
        [sys.executable, str(FIXTURES / "generate.py"), "--out", str(target)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert str(target) in result.stderr
    assert "not a directory" in result.stderr


# ---------------------------------------------------------------------------------------
# Manifest, labels and counts


def test_manifest_parses_with_relative_paths():
    with open(COMICS / "manifest.csv", newline="", encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n")
    rows = read_manifest()
    labels = read_json(COMICS / "labels.json")
    missing_images = {page for page, reason in read_json(COMICS / "malformed.json").items() if reason == "missing_image"}
    page_ids = [row["page_id"] for row in rows]

    assert header == "page_id,image_path,json_path"
    assert len(set(page_ids)) == len(page_ids)
    assert set(labels) == set(page_ids)
    for row in rows:
        for column in ("image_path", "json_path"):
            assert not Path(row[column]).is_absolute(), row
            assert ".." not in Path(row[column]).parts, row
        assert (COMICS / row["json_path"]).is_file(), row
        assert (COMICS / row["image_path"]).is_file() == (row["page_id"] not in missing_images), row


def test_counts_match_readme():
    labels = read_json(COMICS / "labels.json")
    malformed = read_json(COMICS / "malformed.json")
    pages = valid_pages()
    panels = [panel for _, annotation in pages for panel in annotation["panels"]]
    documented = readme_table("what")

    assert documented["pages in the manifest"] == len(read_manifest())
    assert documented["narrative pages"] == sum(labels[row["page_id"]] == "narrative" for row, _ in pages)
    assert documented["story pages"] == sum(labels[row["page_id"]] == "story" for row, _ in pages)
    assert documented["non-narrative pages"] == sum(label not in USED_LABELS for label in labels.values())
    assert documented["malformed pages"] == len(malformed)
    assert documented["panels on narrative and story pages"] == len(panels)
    assert documented["panels without text"] == sum(not panel.get("text") for panel in panels)
    assert documented["panels without a text key"] == sum("text" not in panel for panel in panels)


def test_panels_per_page_match_readme():
    counts = [len(annotation["panels"]) for _, annotation in valid_pages()]
    documented = readme_table("panels")

    assert {int(n): pages for n, pages in documented.items()} == {n: counts.count(n) for n in set(counts)}
    assert min(counts) == 1
    assert max(counts) == PANEL_CAP
    assert counts.count(1) >= 3
    assert sum(3 <= n <= 6 for n in counts) > len(counts) / 2


def test_malformed_pages_match_readme():
    malformed = read_json(COMICS / "malformed.json")
    documented = readme_table("reason")

    assert set(malformed.values()) == MALFORMED_REASONS
    assert documented == {reason: list(malformed.values()).count(reason) for reason in MALFORMED_REASONS}


def test_enough_narrative_pages():
    labels = read_json(COMICS / "labels.json")
    non_narrative = {label for label in labels.values() if label not in USED_LABELS}

    assert len(valid_pages()) >= 56
    assert non_narrative == {"cover", "advertisement", "credits"}


# ---------------------------------------------------------------------------------------
# Pages and panels


def test_valid_pages_are_well_formed():
    for row, annotation in valid_pages():
        width, height = annotation["image_width"], annotation["image_height"]
        with Image.open(COMICS / row["image_path"]) as image:
            assert image.size == (width, height), row["page_id"]
        assert 1 <= len(annotation["panels"]) <= PANEL_CAP, row["page_id"]

        boxes = [panel["bbox"] for panel in annotation["panels"]]
        for x, y, w, h in boxes:
            assert w > 0, row["page_id"]
            assert h > 0, row["page_id"]
            assert x >= 0, row["page_id"]
            assert y >= 0, row["page_id"]
            assert x + w <= width, row["page_id"]
            assert y + h <= height, row["page_id"]
            assert min(w, h) >= 100, f"{row['page_id']}: panel thinner than 100 px"
        for i, (x, y, w, h) in enumerate(boxes):
            for x2, y2, w2, h2 in boxes[i + 1:]:
                overlap = min(x + w, x2 + w2) > max(x, x2) and min(y + h, y2 + h2) > max(y, y2)
                assert not overlap, f"{row['page_id']}: panels overlap"


def test_malformed_pages_have_their_defect():
    labels = read_json(COMICS / "labels.json")
    rows = {row["page_id"]: row for row in read_manifest()}

    for page_id, reason in read_json(COMICS / "malformed.json").items():
        row = rows[page_id]
        assert labels[page_id] == "narrative", page_id
        if reason == "unreadable_json":
            with pytest.raises(json.JSONDecodeError):
                read_json(COMICS / row["json_path"])
            continue

        annotation = read_json(COMICS / row["json_path"])
        width, height = annotation["image_width"], annotation["image_height"]
        boxes = [panel["bbox"] for panel in annotation["panels"]]
        outside = [b for b in boxes if b[0] < 0 or b[1] < 0 or b[0] + b[2] > width or b[1] + b[3] > height]
        zero = [b for b in boxes if b[2] <= 0 or b[3] <= 0]
        image_exists = (COMICS / row["image_path"]).is_file()

        assert len(outside) == (1 if reason == "bbox_outside_page" else 0), page_id
        assert len(zero) == (1 if reason == "bbox_zero_size" else 0), page_id
        assert image_exists == (reason != "missing_image"), page_id
        assert (len(boxes) > PANEL_CAP) == (reason == "too_many_panels"), page_id


def test_dialogue_names_colour_and_object():
    texts = [panel["text"] for _, annotation in valid_pages() for panel in annotation["panels"] if panel.get("text")]
    openings = {" ".join(text.split()[:2]) for text in texts}

    for text in texts:
        assert OBJECT_WORDS.search(text), text
        assert COLOUR_WORDS.search(text), text
    assert len(set(texts)) > 0.8 * len(texts)
    assert len(openings) >= 15


def test_no_text_share_and_forms():
    panels = [panel for _, annotation in valid_pages() for panel in annotation["panels"]]
    without_text = [panel for panel in panels if not panel.get("text")]

    assert 0.10 <= len(without_text) / len(panels) <= 0.20
    assert any("text" not in panel for panel in without_text)
    assert any(panel.get("text") == "" for panel in without_text)


def test_bubbles_drawn_only_with_text():
    for row, annotation in valid_pages():
        with Image.open(COMICS / row["image_path"]) as image:
            pixels = np.asarray(image.convert("RGB"))
        for panel in annotation["panels"]:
            x, y, w, h = panel["bbox"]
            white = int(np.all(pixels[y:y + h, x:x + w] == BUBBLE_FILL, axis=-1).sum())
            if panel.get("text"):
                assert white >= 300, f"{row['page_id']}: no bubble in a panel with text"
            else:
                assert white == 0, f"{row['page_id']}: bubble in a panel without text"


def test_panels_of_a_page_share_setting():
    page_settings = set()
    for row, annotation in valid_pages():
        with Image.open(COMICS / row["image_path"]) as image:
            pixels = np.asarray(image.convert("RGB")).astype(np.int32)
        packed = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]

        # The sky and ground colours cover a good part of every panel of the page.
        shared = None
        for x, y, w, h in (panel["bbox"] for panel in annotation["panels"]):
            colours, counts = np.unique(packed[y:y + h, x:x + w], return_counts=True)
            common = set(colours[counts >= 0.05 * w * h].tolist())
            shared = common if shared is None else shared & common
        shared.discard(0xFFFFFF)  # the bubble fill
        assert shared, f"{row['page_id']}: no colour common to all panels"
        page_settings.add(frozenset(shared))

    assert len(page_settings) >= 6


# ---------------------------------------------------------------------------------------
# Embedding files


@pytest.mark.parametrize("name", ["healthy", "collapsed"])
def test_embedding_file_layout(name):
    path = EMBEDDINGS / f"{name}.safetensors"
    tensors = load_file(path)
    with safe_open(path, framework="np") as handle:
        metadata = handle.metadata()
    page_ids = read_json(EMBEDDINGS / f"{name}.pages.json")
    count = len(tensors["fused"])

    assert metadata == {"format": "collapse-toolkit/embeddings", "version": "1", "epoch": "0", "split": "val"}
    assert 150 <= count <= 250
    for modality in ("fused", "vision", "text"):
        assert tensors[modality].shape == (count, 32), modality
        assert tensors[modality].dtype == np.float32, modality
    assert tensors["page"].dtype == np.int64
    assert tensors["item"].dtype == np.int64
    assert tensors["has_text"].dtype == np.uint8
    np.testing.assert_array_equal(tensors["item"], np.arange(count))
    assert len(page_ids) == int(tensors["page"].max()) + 1
    assert set(np.unique(tensors["page"]).tolist()) == set(range(len(page_ids)))


def test_embedding_pages_follow_annotations():
    tensors = load_file(EMBEDDINGS / "healthy.safetensors")
    annotations = {row["page_id"]: annotation for row, annotation in valid_pages()}
    page_ids = read_json(EMBEDDINGS / "healthy.pages.json")

    expected_page, expected_text = [], []
    for index, page_id in enumerate(page_ids):
        for panel in annotations[page_id]["panels"]:
            expected_page.append(index)
            expected_text.append(int(bool(panel.get("text"))))
    np.testing.assert_array_equal(tensors["page"], expected_page)
    np.testing.assert_array_equal(tensors["has_text"], expected_text)


def test_healthy_embeddings_are_spread():
    tensors = load_file(EMBEDDINGS / "healthy.safetensors")
    fused = tensors["fused"]
    page = tensors["page"]
    distinct = ~np.eye(len(fused), dtype=bool)
    same_page = (page[:, None] == page[None, :]) & distinct
    has_text = tensors["has_text"].astype(bool)
    similarity = tensors["vision"][has_text] @ tensors["text"][has_text].T

    assert effective_rank(fused) / fused.shape[1] > 0.8
    assert abs(mean_pair_cosine(fused, distinct)) < 0.1
    assert mean_pair_cosine(fused, same_page) < 0.5
    assert mean_pair_cosine(fused, same_page) > mean_pair_cosine(fused, distinct & ~same_page)
    assert (similarity.argmax(axis=1) == np.arange(len(similarity))).mean() > 0.5


def test_collapsed_embeddings_are_collapsed():
    tensors = load_file(EMBEDDINGS / "collapsed.safetensors")
    for modality in ("fused", "vision", "text"):
        matrix = tensors[modality]
        distinct = ~np.eye(len(matrix), dtype=bool)
        assert effective_rank(matrix) / matrix.shape[1] < 0.1, modality
        assert mean_pair_cosine(matrix, distinct) > 0.99, modality

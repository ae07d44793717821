"""Write small comic-page datasets in the trainer's layout, so tests know every count exactly."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

PAGE_WIDTH = 96
PAGE_HEIGHT = 128


@dataclass
class PageSpec:
    page_id: str
    # Panels as (bbox [x, y, w, h], text or None).
    panels: list[tuple[list[float], str | None]]
    page_type: str = "narrative"
    width: int = PAGE_WIDTH
    height: int = PAGE_HEIGHT
    write_image: bool = True
    # Raw annotation text that replaces the generated JSON (for unreadable records).
    raw_annotation: str | None = None
    extra: dict = field(default_factory=dict)


def grid_page(page_id: str, panel_count: int, texts: list[str | None] | None = None, page_type: str = "narrative") -> PageSpec:
    """A page of ``panel_count`` panels stacked in rows of two; texts default to a phrase per panel."""
    rows = (panel_count + 1) // 2
    cell_height = PAGE_HEIGHT // max(rows, 1)
    panels = []
    for index in range(panel_count):
        row, column = divmod(index, 2)
        bbox = [column * (PAGE_WIDTH // 2) + 2, row * cell_height + 2, PAGE_WIDTH // 2 - 4, cell_height - 4]
        text = texts[index] if texts is not None else f"{page_id} says line {index}"
        panels.append((bbox, text))
    return PageSpec(page_id, panels, page_type=page_type)


def write_dataset(root: Path, pages: list[PageSpec], unlabelled: tuple[str, ...] = ()) -> Path:
    """Write pages, annotations, labels.json and manifest.csv under ``root``; return the manifest path."""
    (root / "pages").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    labels = {}
    rows = []
    for page_number, spec in enumerate(pages):
        image_path = f"pages/{spec.page_id}.png"
        json_path = f"annotations/{spec.page_id}.json"
        if spec.write_image:
            _draw_page(spec, page_number).save(root / image_path)
        if spec.raw_annotation is not None:
            (root / json_path).write_text(spec.raw_annotation)
        else:
            annotation = {
                "image_width": spec.width,
                "image_height": spec.height,
                "panels": [
                    {"bbox": bbox, **({"text": text} if text is not None else {})} for bbox, text in spec.panels
                ],
                **spec.extra,
            }
            (root / json_path).write_text(json.dumps(annotation))
        if spec.page_id not in unlabelled:
            labels[spec.page_id] = spec.page_type
        rows.append((spec.page_id, image_path, json_path))

    (root / "labels.json").write_text(json.dumps(labels))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["page_id", "image_path", "json_path"])
        writer.writerows(rows)
    return manifest


def simple_dataset(root: Path, panel_counts: list[int], no_text: set[tuple[int, int]] = frozenset()) -> Path:
    """Write one valid page per entry of ``panel_counts``; ``no_text`` lists (page, panel) without text."""
    pages = []
    for page_number, count in enumerate(panel_counts):
        texts = [
            None if (page_number, index) in no_text else f"page {page_number} panel {index} word{page_number * 10 + index}"
            for index in range(count)
        ]
        pages.append(grid_page(f"p{page_number:03d}", count, texts))
    return write_dataset(root, pages)


def _draw_page(spec: PageSpec, page_number: int) -> Image.Image:
    image = Image.new("RGB", (int(spec.width), int(spec.height)), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    for index, (bbox, _) in enumerate(spec.panels):
        x, y, w, h = bbox
        if w <= 0 or h <= 0:
            continue
        colour = ((page_number * 53 + index * 97) % 256, (page_number * 29 + index * 151) % 256, (index * 71 + 40) % 256)
        draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour, outline=(20, 20, 20))
        draw.ellipse([x + w * 0.2, y + h * 0.2, x + w * (0.4 + 0.1 * (index % 4)), y + h * 0.7], fill=(255 - colour[0], 30, 200))
    return image


def tiny_config(manifest: Path, *overrides: str):
    """A fast CPU config on ``manifest``: small dimensions, 2 epochs, 4 pages per batch."""
    from trainer.config import load_config

    base = [
        f"data.manifest={json.dumps(str(manifest))}",
        "data.val_fraction=0.3",
        "model.dim=32",
        "model.projection_hidden=32",
        "model.layout_hidden=16",
        "objectives.reconstruction_hidden=32",
        "optim.epochs=2",
        "optim.batch_size=4",
        "device=cpu",
    ]
    return load_config(None, base + list(overrides))

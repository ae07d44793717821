"""Panel dataset: manifest reading, page validation, the train/validation split, features and batches.

A dataset directory contains a manifest CSV (``page_id,image_path,json_path``, paths relative to the
manifest), a labels JSON mapping page id to page type, page images and one annotation JSON per page:
``{"image_width": W, "image_height": H, "panels": [{"bbox": [x, y, w, h], "text": "..."}, ...]}``.

Bad records are skipped, never fatal, and counted per reason (see ``SKIP_REASONS``). Only a dataset
with no usable page raises :class:`DataError`.

Panels keep no pixels. Loading decodes each page once, to check it and to hash every panel's crop,
and a panel's ``image`` is cropped again from its page on demand. Decoded pages stay in a per-dataset
cache of ``data.image_cache_mb`` megabytes, least recently used out first. So a small dataset is
decoded once, and memory stays bounded for a dataset of tens of thousands of pages.

Frozen backbones run once per distinct panel. Their features are kept in memory and on disk, keyed by
the backbone's ``cache_key`` and a SHA-256 of the panel's content, so later epochs and later runs skip
the backbone. Trainable backbones run on every step. Runs and ranks may share a cache folder. A
writer takes a lock file, merges its features with the file's current content and renames the
result into place, so a reader gets a whole file and no writer drops another's features.
"""

from __future__ import annotations

import contextlib
import csv
from collections import OrderedDict
import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer.config import DataConfig, TrainerError

log = logging.getLogger(__name__)

LAYOUT_FEATURES = 7
MANIFEST_COLUMNS = ("page_id", "image_path", "json_path")
SKIP_REASONS = (
    "invalid_manifest_row",
    "duplicate_page",
    "unlabelled",
    "page_type_filtered",
    "unreadable_json",
    "invalid_annotation",
    "no_panels",
    "too_many_panels",
    "bbox_zero_size",
    "bbox_outside_page",
    "missing_image",
    "unreadable_image",
    "size_mismatch",
)
# Examples kept per skip reason for run.json and the error message.
MAX_SKIP_EXAMPLES = 3
# Slack for float bounding boxes that end exactly on the page edge.
BBOX_TOLERANCE = 1e-6


class DataError(TrainerError):
    """A dataset that cannot be used at all; the message names the file."""


class PageImageCache:
    """Decoded RGB page images by path, within a budget of ``max_bytes``; the least recently used go first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._images: OrderedDict[Path, Image.Image] = OrderedDict()

    def get(self, path: Path) -> Image.Image:
        """Return the decoded page, decoding it again if it is not cached."""
        image = self._images.get(path)
        if image is not None:
            self._images.move_to_end(path)
            return image
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (OSError, Image.DecompressionBombError) as error:
            raise DataError(f"{path}: page image became unreadable after the dataset was loaded ({error})") from None
        self.put(path, image)
        return image

    def put(self, path: Path, image: Image.Image) -> None:
        size = image.width * image.height * len(image.getbands())
        if size > self.max_bytes:
            return
        self._images[path] = image
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._images.popitem(last=False)
            self.bytes -= evicted.width * evicted.height * len(evicted.getbands())


@dataclass(frozen=True)
class PanelCrop:
    """The source of a panel's pixels: its page image and the crop box (left, top, right, bottom) in pixels."""

    path: Path
    box: tuple[int, int, int, int]
    pages: PageImageCache

    def load(self) -> Image.Image:
        return self.pages.get(self.path).crop(self.box)


@dataclass
class Panel:
    # None when the dataset was loaded with ``load_images=False``; ``image_hash`` is then empty.
    crop: PanelCrop | None
    text: str
    # aspect ratio w/h, area ratio panel/page, three reserved zeros, centre x / W, centre y / H
    layout: tuple[float, ...]
    page: int
    has_text: bool
    image_hash: str
    text_hash: str

    @property
    def image(self) -> Image.Image | None:
        """The panel's RGB crop, cut from its page on each access; None without a ``crop``."""
        return None if self.crop is None else self.crop.load()


@dataclass
class Page:
    page_id: str
    page_type: str | None
    panels: list[Panel]


@dataclass
class PanelDataset:
    """Usable pages of one manifest, with skip counts and a content fingerprint."""

    manifest: Path
    pages: list[Page]
    skipped: dict[str, int]
    skipped_examples: dict[str, list[str]]
    # SHA-256 over the manifest, labels and annotation bytes (page images are not hashed).
    fingerprint: str

    @property
    def panels(self) -> list[Panel]:
        return [panel for page in self.pages for panel in page.panels]

    def panel_offsets(self) -> list[int]:
        """Return the flat index of each page's first panel, plus the total panel count at the end."""
        offsets = [0]
        for page in self.pages:
            offsets.append(offsets[-1] + len(page.panels))
        return offsets


class _SkipRecord(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------------
# Loading


def load_dataset(config: DataConfig, load_images: bool = True) -> PanelDataset:
    """Read the manifest and every page it lists; skip bad records and count them per reason.

    With ``load_images=False`` no page image is decoded: panels carry their text and layout but no
    crop. Every skip rule still applies, and an image is read and hashed but only its header is parsed.
    So the pages, panels and fingerprint match a full load, except for an image whose header is valid
    but whose pixel data is truncated or corrupt, which a full load skips as ``unreadable_image``.
    """
    manifest = Path(config.manifest)
    rows, manifest_bytes = _read_manifest(manifest)
    labels, labels_bytes = _read_labels(manifest, config)
    page_images = PageImageCache(config.image_cache_mb * 2**20)
    reader = _PageReader(manifest, labels, set(config.page_types), config.max_panels, load_images, page_images)
    reader.digest.update(manifest_bytes)
    reader.digest.update(labels_bytes)

    skipped = {reason: 0 for reason in SKIP_REASONS}
    examples: dict[str, list[str]] = {}
    pages: list[Page] = []
    seen: set[str] = set()
    for line, row in rows:
        page_id = (row.get("page_id") or "").strip()
        try:
            if page_id in seen:
                raise _SkipRecord("duplicate_page", f"page id repeats on manifest line {line}")
            pages.append(reader.read(line, row, page_id, page_index=len(pages)))
            seen.add(page_id)
        except _SkipRecord as skip:
            skipped[skip.reason] += 1
            reason_examples = examples.setdefault(skip.reason, [])
            if len(reason_examples) < MAX_SKIP_EXAMPLES:
                reason_examples.append(f"{page_id or f'manifest line {line}'}: {skip.detail}")

    if not pages:
        raise DataError(f"{manifest}: no usable pages (skipped: {skipped_summary(skipped)})")
    return PanelDataset(manifest, pages, skipped, examples, reader.digest.hexdigest())


def _read_manifest(manifest: Path) -> tuple[list[tuple[int, dict[str, str]]], bytes]:
    try:
        raw = manifest.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{manifest}: manifest not found") from None
    except OSError as error:
        raise DataError(f"{manifest}: cannot read manifest ({error.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{manifest}: manifest is not UTF-8 text") from None

    reader = csv.DictReader(text.splitlines())
    columns = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in MANIFEST_COLUMNS if name not in columns]
    if missing:
        raise DataError(
            f"{manifest}: manifest lacks column(s) {', '.join(missing)}; expected header "
            f"{','.join(MANIFEST_COLUMNS)}, found {','.join(columns) or 'nothing'}"
        )
    reader.fieldnames = columns
    # Line 1 is the header.
    rows = [(index + 2, row) for index, row in enumerate(reader)]
    if not rows:
        raise DataError(f"{manifest}: manifest lists no pages")
    return rows, raw


def _read_labels(manifest: Path, config: DataConfig) -> tuple[dict[str, str], bytes]:
    path = manifest.parent / config.labels
    if not path.is_file():
        if config.page_types:
            raise DataError(
                f"{path}: labels file not found; it is needed to keep page types "
                f"{', '.join(config.page_types)} (set data.page_types=[] to keep every page)"
            )
        return {}, b""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read labels file ({error.strerror})") from None
    try:
        labels = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: labels file is not valid JSON ({error})") from None
    if not isinstance(labels, dict) or not all(isinstance(value, str) for value in labels.values()):
        raise DataError(f"{path}: labels file must be a JSON object mapping page id to page type")
    return labels, raw


class _PageReader:
    """Reads one manifest row into a Page, raising _SkipRecord with the first problem found."""

    def __init__(
        self,
        manifest: Path,
        labels: dict[str, str],
        kept_types: set[str],
        max_panels: int,
        load_images: bool = True,
        page_images: PageImageCache | None = None,
    ):
        self.folder = manifest.parent
        self.labels = labels
        self.kept_types = kept_types
        self.max_panels = max_panels
        self.load_images = load_images
        self.page_images = page_images if page_images is not None else PageImageCache(0)
        self.digest = hashlib.sha256()

    def read(self, line: int, row: dict[str, str], page_id: str, page_index: int) -> Page:
        # csv.DictReader collects the fields beyond the header's columns in a list under the key None.
        extra_fields = row.get(None)
        if extra_fields:
            columns = len(row) - 1
            plural = "field" if len(extra_fields) == 1 else "fields"
            raise _SkipRecord(
                "invalid_manifest_row",
                f"manifest line {line} has {len(extra_fields)} {plural} more than the {columns} header columns",
            )
        image_name = (row.get("image_path") or "").strip()
        json_name = (row.get("json_path") or "").strip()
        if not page_id or not image_name or not json_name:
            raise _SkipRecord("invalid_manifest_row", f"manifest line {line} has an empty field")

        # Annotation bytes enter the fingerprint even for pages that the type filter drops.
        json_path = self.folder / json_name
        try:
            annotation_bytes = json_path.read_bytes()
        except OSError as error:
            self.digest.update(f"unreadable:{json_name}".encode())
            raise _SkipRecord("unreadable_json", f"{json_path}: {error.strerror}") from None
        self.digest.update(annotation_bytes)

        page_type = self.labels.get(page_id)
        if self.kept_types:
            if page_type is None:
                raise _SkipRecord("unlabelled", "page id not in the labels file")
            if page_type not in self.kept_types:
                raise _SkipRecord("page_type_filtered", f"page type {page_type!r}")

        try:
            annotation = json.loads(annotation_bytes)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _SkipRecord("unreadable_json", f"{json_path}: {error}") from None
        width, height, panel_specs = _parse_annotation(annotation, json_path)
        if not panel_specs:
            raise _SkipRecord("no_panels", f"{json_path}: the page has no panels")
        if len(panel_specs) > self.max_panels:
            raise _SkipRecord(
                "too_many_panels", f"{json_path}: {len(panel_specs)} panels (cap {self.max_panels})"
            )
        boxes = [_parse_bbox(spec, index, width, height, json_path) for index, spec in enumerate(panel_specs)]

        image_path = self.folder / image_name
        if not image_path.is_file():
            raise _SkipRecord("missing_image", f"{image_path} not found")
        try:
            # The image bytes enter the fingerprint, so a replaced page image counts as a changed dataset.
            image_bytes = image_path.read_bytes()
            self.digest.update(image_bytes)
            with Image.open(io.BytesIO(image_bytes)) as opened:
                # Image.open reads only the header; convert() decodes the pixels.
                image_size = opened.size
                image = opened.convert("RGB") if self.load_images else None
        except (OSError, Image.DecompressionBombError) as error:
            raise _SkipRecord("unreadable_image", f"{image_path}: {error}") from None
        _check_page_size(width, height, image_size, json_path, image_path)

        panels = [
            _make_panel(image, image_path, self.page_images, box, spec.get("text") or "", width, height, page_index)
            for box, spec in zip(boxes, panel_specs)
        ]
        if image is not None:
            self.page_images.put(image_path, image)
        return Page(page_id, page_type, panels)


def _parse_annotation(annotation: object, json_path: Path) -> tuple[float, float, list[dict]]:
    if not isinstance(annotation, dict):
        raise _SkipRecord("invalid_annotation", f"{json_path}: expected a JSON object")
    width = annotation.get("image_width")
    height = annotation.get("image_height")
    # A page under one pixel cannot be cropped, and its area can underflow to zero in the layout features.
    if not _is_number(width) or not _is_number(height) or width < 1 or height < 1:
        raise _SkipRecord(
            "invalid_annotation", f"{json_path}: image_width and image_height must be numbers of at least 1 pixel"
        )
    panel_specs = annotation.get("panels")
    if not isinstance(panel_specs, list) or not all(isinstance(spec, dict) for spec in panel_specs):
        raise _SkipRecord("invalid_annotation", f"{json_path}: 'panels' must be a list of objects")
    for index, spec in enumerate(panel_specs):
        text = spec.get("text")
        if text is not None and not isinstance(text, str):
            raise _SkipRecord("invalid_annotation", f"{json_path}: panel {index} text is not a string")
    return float(width), float(height), panel_specs


def _parse_bbox(spec: dict, index: int, width: float, height: float, json_path: Path) -> tuple[float, ...]:
    bbox = spec.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(value) for value in bbox):
        raise _SkipRecord("invalid_annotation", f"{json_path}: panel {index} bbox must be [x, y, w, h]")
    x, y, w, h = (float(value) for value in bbox)
    if w <= 0 or h <= 0:
        raise _SkipRecord("bbox_zero_size", f"{json_path}: panel {index} bbox {bbox} has no area")
    tolerance_x = BBOX_TOLERANCE * width
    tolerance_y = BBOX_TOLERANCE * height
    if x < -tolerance_x or y < -tolerance_y or x + w > width + tolerance_x or y + h > height + tolerance_y:
        raise _SkipRecord(
            "bbox_outside_page",
            f"{json_path}: panel {index} bbox {bbox} leaves the {width:g}x{height:g} page",
        )
    return x, y, w, h


def _check_page_size(
    width: float, height: float, image_size: tuple[int, int], json_path: Path, image_path: Path
) -> None:
    """Raise a ``size_mismatch`` skip unless the image is the declared page scaled by one factor.

    Boxes are scaled from the declared size to the image, so an image stored at another resolution
    is accepted. Because a resize rounds to whole pixels, one side may be off by up to one pixel.
    """
    image_width, image_height = image_size
    height_from_width = height * image_width / width
    width_from_height = width * image_height / height
    if abs(height_from_width - image_height) <= 1 or abs(width_from_height - image_width) <= 1:
        return
    raise _SkipRecord(
        "size_mismatch",
        f"{json_path} declares a {width:g}x{height:g} page, but {image_path} is {image_width}x{image_height} "
        "pixels, which is not that page at any scale",
    )


def _is_number(value: object) -> bool:
    """Return whether ``value`` is an int or float that converts to a finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    # JSON integers have no size limit, and float() raises OverflowError beyond about 1.8e308.
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _make_panel(
    image: Image.Image | None,
    image_path: Path,
    page_images: PageImageCache,
    box: tuple[float, ...],
    text: str,
    width: float,
    height: float,
    page_index: int,
) -> Panel:
    x, y, w, h = box
    layout = (w / h, (w * h) / (width * height), 0.0, 0.0, 0.0, (x + w / 2) / width, (y + h / 2) / height)
    text_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if image is None:
        return Panel(None, text, layout, page_index, bool(text.strip()), "", text_hash)

    # The annotation may describe the page at another resolution than the stored image.
    scale_x = image.width / width
    scale_y = image.height / height
    left = min(int(round(x * scale_x)), image.width - 1)
    top = min(int(round(y * scale_y)), image.height - 1)
    right = max(int(round((x + w) * scale_x)), left + 1)
    bottom = max(int(round((y + h) * scale_y)), top + 1)
    crop = image.crop((left, top, right, bottom))
    image_hash = hashlib.sha256(f"{crop.mode}:{crop.width}x{crop.height}:".encode() + crop.tobytes()).hexdigest()
    # NOTE: the pixels are read again from image_path later, so a page file replaced during a run
    # gives crops that no longer match image_hash.
    source = PanelCrop(image_path, (left, top, right, bottom), page_images)
    return Panel(source, text, layout, page_index, bool(text.strip()), image_hash, text_hash)


# --------------------------------------------------------------------------------------------------
# Split and batches


def split_pages(dataset: PanelDataset, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split page indices into train and validation sets, by page, reproducibly for a seed.

    Pages are ordered by a seeded hash of their page id, so a page keeps its side of the split when
    other pages are added to or removed from the manifest. Both lists come back in manifest order.
    """
    count = len(dataset.pages)
    if count < 2:
        raise DataError(f"{dataset.manifest}: {count} usable page; at least 2 are needed for a validation split")
    val_count = min(max(1, round(val_fraction * count)), count - 1)
    order = sorted(
        range(count),
        key=lambda index: hashlib.sha256(f"{seed}:{dataset.pages[index].page_id}".encode()).hexdigest(),
    )
    val = sorted(order[:val_count])
    train = sorted(order[val_count:])
    return train, val


def iterate_batches(
    page_indices: Sequence[int], batch_size: int, generator: torch.Generator | None = None
) -> Iterator[list[int]]:
    """Yield lists of at most ``batch_size`` page indices, shuffled when a generator is given."""
    order = list(page_indices)
    if generator is not None:
        permutation = torch.randperm(len(order), generator=generator).tolist()
        order = [order[index] for index in permutation]
    for start in range(0, len(order), batch_size):
        yield order[start: start + batch_size]


@dataclass
class PanelBatch:
    """Panels of a set of pages, flattened; the panels of each page are contiguous.

    ``page`` is the page's position in this batch (0 .. pages - 1). Exactly one of ``vision_features``
    (cached frozen-backbone output) and ``pixels`` (backbone input) is set, and likewise one of
    ``text_features`` and ``texts``.
    """

    page: torch.Tensor
    dataset_page: torch.Tensor
    layout: torch.Tensor
    has_text: torch.Tensor
    vision_features: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    texts: list[str] | None = None

    @property
    def num_pages(self) -> int:
        return int(self.page.max().item()) + 1 if self.page.numel() else 0

    @property
    def num_panels(self) -> int:
        return int(self.page.numel())

    def to(self, device: torch.device) -> "PanelBatch":
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return PanelBatch(
            page=move(self.page),
            dataset_page=move(self.dataset_page),
            layout=move(self.layout),
            has_text=move(self.has_text),
            vision_features=move(self.vision_features),
            pixels=move(self.pixels),
            text_features=move(self.text_features),
            texts=self.texts,
        )

    def pin_memory(self) -> "PanelBatch":
        """Return a copy in page-locked memory, for faster copies to a GPU (``DataLoader(pin_memory=True)`` calls it)."""

        def pin(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.pin_memory()

        return PanelBatch(
            page=pin(self.page),
            dataset_page=pin(self.dataset_page),
            layout=pin(self.layout),
            has_text=pin(self.has_text),
            vision_features=pin(self.vision_features),
            pixels=pin(self.pixels),
            text_features=pin(self.text_features),
            texts=self.texts,
        )


# --------------------------------------------------------------------------------------------------
# Backbone features


class PanelInputs:
    """Model inputs for every panel of a dataset: cached features for frozen backbones, raw inputs otherwise.

    ``vision_backbone`` and ``text_backbone`` follow the ``trainer.backbones`` interface (``frozen``,
    ``cache_key``, ``out_dim``; vision also ``preprocess`` and ``input_size``). With
    ``cache_features=False`` frozen backbones get raw inputs too and run on every step.
    """

    def __init__(
        self,
        dataset: PanelDataset,
        vision_backbone,
        text_backbone,
        cache_dir: Path | None,
        device: torch.device,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
        chunk_size: int = 64,
        cache_features: bool = True,
    ):
        self.dataset = dataset
        self.vision_backbone = vision_backbone
        self.offsets = dataset.panel_offsets()
        panels = dataset.panels
        self.panels = panels
        self.layout = torch.tensor([panel.layout for panel in panels], dtype=torch.float32)
        self.has_text = torch.tensor([panel.has_text for panel in panels], dtype=torch.bool)

        self.vision_features: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None
        self.feature_stats: list[FeatureStats] = []
        if vision_backbone.frozen and cache_features:
            self.vision_features, stats = _cached_features(
                kind="vision",
                backbone=vision_backbone,
                hashes=[panel.image_hash for panel in panels],
                compute=lambda indices: vision_backbone(
                    torch.stack([vision_backbone.preprocess(panels[index].image) for index in indices]).to(device)
                ),
                cache_dir=cache_dir,
                chunk_size=chunk_size,
                progress=progress,
            )
            self.feature_stats.append(stats)
        if text_backbone.frozen and cache_features:
            self.text_features, stats = _cached_features(
                kind="text",
                backbone=text_backbone,
                hashes=[panel.text_hash for panel in panels],
                compute=lambda indices: text_backbone([panels[index].text for index in indices]),
                cache_dir=cache_dir,
                chunk_size=chunk_size,
                progress=progress,
            )
            self.feature_stats.append(stats)

    def batch(self, page_indices: Sequence[int]) -> PanelBatch:
        """Collate the panels of the given pages, in the given page order."""
        flat: list[int] = []
        local_page: list[int] = []
        for position, page_index in enumerate(page_indices):
            start, stop = self.offsets[page_index], self.offsets[page_index + 1]
            flat.extend(range(start, stop))
            local_page.extend([position] * (stop - start))
        index = torch.tensor(flat, dtype=torch.long)

        batch = PanelBatch(
            page=torch.tensor(local_page, dtype=torch.long),
            dataset_page=torch.tensor([self.panels[i].page for i in flat], dtype=torch.long),
            layout=self.layout[index],
            has_text=self.has_text[index],
        )
        if self.vision_features is not None:
            batch.vision_features = self.vision_features[index]
        elif flat:
            batch.pixels = torch.stack([self.vision_backbone.preprocess(self.panels[i].image) for i in flat])
        else:
            # A rank's slice of a small last batch can be empty under torchrun.
            size = self.vision_backbone.input_size
            batch.pixels = torch.empty(0, 3, size, size)
        if self.text_features is not None:
            batch.text_features = self.text_features[index]
        else:
            batch.texts = [self.panels[i].text for i in flat]
        return batch


def load_batches(
    inputs: PanelInputs, page_batches: Sequence[Sequence[int]], num_workers: int = 0, pin_memory: bool = False
) -> Iterable[PanelBatch]:
    """Yield ``inputs.batch(pages)`` for each list of pages, in order.

    With ``num_workers`` > 0 worker processes build the batches ahead of the training step, which pays
    off when batches need image preprocessing. ``pin_memory`` returns them in page-locked memory.
    """
    if num_workers == 0 and not pin_memory:
        return (inputs.batch(pages) for pages in page_batches)
    from torch.utils.data import DataLoader

    return DataLoader(
        [list(pages) for pages in page_batches],
        batch_size=None,
        shuffle=False,
        collate_fn=inputs.batch,
        num_workers=num_workers,
        pin_memory=pin_memory,
    )


@dataclass
class FeatureStats:
    """Feature counts and time for one frozen backbone: computed by the backbone or read from the cache."""

    kind: str
    backbone: str
    # Distinct panel contents, and how many of them ran through the backbone (the rest came from the cache).
    distinct: int
    computed: int
    seconds: float


def _cached_features(
    kind: str,
    backbone,
    hashes: list[str],
    compute: Callable[[list[int]], torch.Tensor],
    cache_dir: Path | None,
    chunk_size: int,
    progress: Callable[[str, int], Callable[[int], None]] | None,
) -> tuple[torch.Tensor, FeatureStats]:
    """Return [panels, out_dim] float32 features on the CPU, running the backbone only on uncached content."""
    started = time.perf_counter()
    # The backbone hashes its weights to build the key, so it is read once.
    cache_key = backbone.cache_key
    name = getattr(backbone, "name", cache_key)
    cache_path = None
    known: dict[str, torch.Tensor] = {}
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{kind}-{_safe_name(cache_key)}.safetensors"
        known = _read_feature_cache(cache_path, backbone.out_dim)

    first_index: dict[str, int] = {}
    for index, content_hash in enumerate(hashes):
        if content_hash not in known:
            first_index.setdefault(content_hash, index)
    missing = list(first_index.values())

    if missing:
        advance = progress(f"{kind} features ({name})", len(missing)) if progress else None
        with torch.no_grad():
            for start in range(0, len(missing), chunk_size):
                chunk = missing[start: start + chunk_size]
                features = compute(chunk).detach().float().cpu()
                for row, index in enumerate(chunk):
                    known[hashes[index]] = features[row].clone()
                if advance:
                    advance(len(chunk))
        if cache_path is not None:
            _write_feature_cache(cache_path, known, backbone.out_dim)

    stats = FeatureStats(kind, name, len(set(hashes)), len(missing), time.perf_counter() - started)
    return torch.stack([known[content_hash] for content_hash in hashes]), stats


def _safe_name(cache_key: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", cache_key)[:60]
    return f"{readable}-{hashlib.sha256(cache_key.encode()).hexdigest()[:12]}"


def _read_feature_cache(path: Path, out_dim: int) -> dict[str, torch.Tensor]:
    if not path.is_file():
        return {}
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        hashes, features = tensors["hashes"], tensors["features"]
    except (OSError, SafetensorError, KeyError) as error:
        log.warning("ignoring unreadable feature cache %s (%s); features will be recomputed", path, error)
        return {}
    if features.ndim != 2 or features.shape[1] != out_dim or hashes.shape != (features.shape[0], 32):
        log.warning("ignoring feature cache %s with unexpected shapes; features will be recomputed", path)
        return {}
    return {bytes(row.tolist()).hex(): feature for row, feature in zip(hashes, features)}


def _write_feature_cache(path: Path, known: dict[str, torch.Tensor], out_dim: int) -> None:
    from trainer.artifacts import atomic_write, save_safetensors

    path.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(path.with_name(path.name + ".lock")):
        # Another run may have added features since this one read the file.
        merged = _read_feature_cache(path, out_dim)
        merged.update(known)
        keys = sorted(merged)
        hashes = torch.tensor([list(bytes.fromhex(key)) for key in keys], dtype=torch.uint8)
        features = torch.stack([merged[key] for key in keys]).contiguous()
        with atomic_write(path) as temporary:
            save_safetensors({"hashes": hashes, "features": features}, temporary)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); a no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def skipped_summary(skipped: dict[str, int]) -> str:
    """Format non-zero skip counts as 'reason N, reason N' (or 'none')."""
    parts = [f"{reason} {count}" for reason, count in skipped.items() if count]
    return ", ".join(parts) or "none"

"""Readers for every embedding input that ``diagnose`` accepts.

Each reader validates at the boundary and raises :class:`InputError` with a one-line message naming the
file and the problem. Matrices are exposed as :class:`ArraySource` objects that read row ranges on
demand, so metric code can stream a file in chunks without mapping or loading the whole matrix.

Supported inputs:

- run directories written by the trainer (``embeddings/epoch_NNNN.safetensors``),
- trainer checkpoints (``*.pt`` holding ``format = "collapse-toolkit/checkpoint"``), resolved to the
  embedding file of their epoch,
- ``.safetensors``, ``.npz`` (named arrays or one unnamed array), ``.npy`` (one [N, D] matrix),
- ``.pt`` holding a tensor or a dict of tensors (loaded with ``weights_only=True``),
- the historical Stage 3 Zarr store: ``panel_embeddings`` [pages, max_panels, D] with boolean
  ``panel_masks`` [pages, max_panels] and an optional metadata JSON list.

Pickled objects are never loaded.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

EMBEDDINGS_FORMAT = "collapse-toolkit/embeddings"
CHECKPOINT_FORMAT = "collapse-toolkit/checkpoint"
MODALITY_NAMES = ("fused", "vision", "text")
# Arrays that describe rows rather than hold embeddings.
INDEX_NAMES = ("page", "item", "has_text", "vision_item", "text_item", "vision_page", "text_page")
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.safetensors$")


class InputError(Exception):
    """Bad input: the message is one line naming the file and the problem (command-line exit status 2)."""


# --------------------------------------------------------------------------------------------------
# Array sources: row-range readers over one 2-D matrix


class ArraySource:
    """One [rows, dim] matrix that can be read in row ranges."""

    shape: tuple[int, int]
    dtype: np.dtype
    name: str
    path: str

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        return self.read(0, self.rows)

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, block) pairs covering all rows in order."""
        for start in range(0, self.rows, chunk_rows):
            yield start, self.read(start, min(start + chunk_rows, self.rows))


class MemoryArray(ArraySource):
    """A matrix already in memory (npz members, torch tensors, small files)."""

    def __init__(self, array: np.ndarray, name: str, path: str):
        self.array = array
        self.shape = tuple(array.shape)  # type: ignore[assignment]
        self.dtype = array.dtype
        self.name = name
        self.path = path

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])


class NpyArray(ArraySource):
    """A ``.npy`` matrix read with explicit file reads (no memory map, so resident memory stays bounded)."""

    def __init__(self, path: Path, name: str = "fused"):
        self.path = str(path)
        self.name = name
        with open(path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            except ValueError as error:
                raise InputError(f"{path}: not a valid .npy file ({error})") from None
            self.offset = handle.tell()
        if dtype.hasobject:
            raise InputError(f"{path}: contains Python objects (pickle), which are never loaded")
        if dtype.kind not in "fiu":
            raise InputError(f"{path}: array has dtype {dtype}; embeddings must be real numbers (float or int)")
        if fortran and len(shape) > 1:
            raise InputError(f"{path}: Fortran-ordered arrays are not supported; save it C-ordered")
        self.dtype = dtype
        self.shape = tuple(shape)  # type: ignore[assignment]
        expected = self.offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        actual = path.stat().st_size
        if actual < expected:
            raise InputError(f"{path}: file is truncated ({actual} bytes, header promises {expected})")

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as handle:
            self._read_into(handle, start, out)
        return out

    def chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start row, block) pairs; every block is a view of one reused buffer, valid until the next."""
        buffer = np.empty((min(chunk_rows, self.rows), self.shape[1]), dtype=self.dtype)
        with open(self.path, "rb") as handle:
            for start in range(0, self.rows, chunk_rows):
                block = buffer[: min(chunk_rows, self.rows - start)]
                self._read_into(handle, start, block)
                yield start, block

    def _read_into(self, handle, start: int, out: np.ndarray) -> None:
        handle.seek(self.offset + start * self.shape[1] * self.dtype.itemsize)
        if handle.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise InputError(f"{self.path}: file ended early while reading row {start}")


class SafetensorsArray(ArraySource):
    """One tensor of a ``.safetensors`` file, read by row slices."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.path = str(path)
        self.name = name
        self.shape = tuple(shape)  # type: ignore[assignment]
        self.dtype = dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(self.path, framework="numpy") as handle:
            return np.asarray(handle.get_slice(self.name)[start:stop])


class ZarrPanelArray(ArraySource):
    """Valid panels of a Stage 3 Zarr store, flattened page by page in page order."""

    def __init__(self, path: Path, embeddings, masks: np.ndarray):
        self.path = str(path)
        self.name = "fused"
        self.embeddings = embeddings
        self.masks = masks
        self.page_counts = masks.sum(axis=1).astype(np.int64)
        self.page_starts = np.concatenate([[0], np.cumsum(self.page_counts)])
        self.shape = (int(self.page_starts[-1]), int(embeddings.shape[2]))
        self.dtype = np.dtype(embeddings.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        first_page = int(np.searchsorted(self.page_starts, start, side="right") - 1)
        last_page = int(np.searchsorted(self.page_starts, stop, side="left"))
        try:
            block = np.asarray(self.embeddings[first_page:last_page])
        except Exception as error:  # zarr and its codecs raise many types for damaged chunks
            raise InputError(
                f"{self.path}: cannot read panel_embeddings of pages {first_page} to {last_page - 1} "
                f"({_first_line(error)})"
            ) from None
        valid = block[self.masks[first_page:last_page]]
        offset = start - int(self.page_starts[first_page])
        return valid[offset: offset + (stop - start)]


# --------------------------------------------------------------------------------------------------
# The embedding set


@dataclass
class EmbeddingSet:
    """Embeddings of one epoch or file: one :class:`ArraySource` per modality plus row metadata.

    ``page``, ``item`` and ``has_text`` describe the rows of every modality of that length. A file with
    sets of different sizes (several captions per image) gives ``vision_item`` / ``text_item`` and
    optionally ``vision_page`` / ``text_page`` instead.
    """

    source: str
    sources: dict[str, ArraySource]
    page: np.ndarray | None = None
    item: np.ndarray | None = None
    has_text: np.ndarray | None = None
    vision_item: np.ndarray | None = None
    text_item: np.ndarray | None = None
    vision_page: np.ndarray | None = None
    text_page: np.ndarray | None = None
    epoch: int | None = None
    page_ids: list[str] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def modalities(self) -> list[str]:
        return list(self.sources)

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        """Every modality as an in-memory float32 matrix (reads whole files; prefer ``sources`` at scale)."""
        for name, source in self.sources.items():
            if name not in self._loaded:
                self._loaded[name] = np.ascontiguousarray(source.read_all(), dtype=np.float32)
        return self._loaded

    def items_for(self, name: str) -> np.ndarray | None:
        """Pair ids of the rows of modality ``name``."""
        specific = {"vision": self.vision_item, "text": self.text_item}.get(name)
        return specific if specific is not None else self.item

    def pages_for(self, name: str) -> np.ndarray | None:
        """Page index of the rows of modality ``name``."""
        specific = {"vision": self.vision_page, "text": self.text_page}.get(name)
        return specific if specific is not None else self.page


# --------------------------------------------------------------------------------------------------
# Resolving a path to epochs


def resolve_epochs(path: str | Path) -> list[tuple[int | None, Path]]:
    """Return ``(epoch, embedding file)`` pairs for a run directory, a checkpoint or an embedding file.

    A run directory gives every epoch in order; a trainer checkpoint gives the file of its epoch; any
    other file gives itself with epoch ``None``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir() and not _is_zarr(path):
        return _run_epochs(path)
    if path.suffix == ".pt":
        checkpoint = _checkpoint_header(path)
        if checkpoint is not None:
            return [_checkpoint_embeddings(path, checkpoint)]
    return [(None, path)]


def find_run_dir(path: Path) -> Path | None:
    """Return the run directory a checkpoint belongs to (``RUN/checkpoints/x.pt``), if it looks like one."""
    parent = path.resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "embeddings").is_dir():
        return parent.parent
    return None


def _run_epochs(run_dir: Path) -> list[tuple[int | None, Path]]:
    embeddings_dir = run_dir / "embeddings"
    if not embeddings_dir.is_dir():
        raise InputError(f"{run_dir}: not a run directory (no embeddings/ folder)")
    epochs = []
    for entry in embeddings_dir.iterdir():
        match = EPOCH_FILE.match(entry.name)
        if match:
            epochs.append((int(match.group(1)), entry))
    if not epochs:
        raise InputError(f"{embeddings_dir}: run directory contains no epoch_NNNN.safetensors files")
    return sorted(epochs)


def _checkpoint_header(path: Path) -> dict | None:
    """Load a trainer checkpoint's plain fields, or ``None`` when ``path`` is some other ``.pt`` file."""
    payload = _torch_load(path)
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return payload
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Load a trainer checkpoint with ``weights_only=True``; raise :class:`InputError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    checkpoint = _checkpoint_header(path)
    if checkpoint is None:
        raise InputError(f"{path}: not a collapse-toolkit checkpoint (no format={CHECKPOINT_FORMAT!r} key)")
    return checkpoint


def _checkpoint_embeddings(path: Path, checkpoint: dict) -> tuple[int | None, Path]:
    relative = checkpoint.get("embeddings")
    epoch = checkpoint.get("epoch")
    epoch = int(epoch) if isinstance(epoch, (int, np.integer)) else None
    if not relative:
        raise CheckpointWithoutEmbeddings(path, checkpoint)
    run_dir = find_run_dir(path) or path.resolve().parent.parent
    target = run_dir / str(relative)
    if not target.is_file():
        raise CheckpointWithoutEmbeddings(path, checkpoint)
    return epoch, target


class CheckpointWithoutEmbeddings(InputError):
    """A checkpoint whose epoch embedding file is missing; callers may fall back to weight diagnostics."""

    def __init__(self, path: Path, checkpoint: dict):
        super().__init__(
            f"{path}: checkpoint has no embedding file next to it; pass its run directory instead, or "
            "run `diagnose collapse CHECKPOINT --data MANIFEST` to re-embed a dataset with it"
        )
        self.path = path
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------------------------
# Loading one embedding file


def load_embeddings(path: str | Path, epoch: int | None = None) -> EmbeddingSet:
    """Open one embedding input (any supported format) and validate its shapes and metadata.

    Row contents (NaN or infinite values) are checked by the metric passes, which read every row anyway.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_zarr(path):
            embedding_set = _load_zarr(path)
        else:
            epochs = resolve_epochs(path)
            epoch, last = epochs[-1]
            return load_embeddings(last, epoch=epoch)
    elif path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty")
    elif path.suffix == ".safetensors":
        embedding_set = _load_safetensors(path)
    elif path.suffix == ".npz":
        embedding_set = _load_npz(path)
    elif path.suffix == ".npy":
        embedding_set = EmbeddingSet(source=str(path), sources={"fused": NpyArray(path)})
    elif path.suffix in (".pt", ".pth"):
        checkpoint = _checkpoint_header(path)
        if checkpoint is not None:
            epoch, target = _checkpoint_embeddings(path, checkpoint)
            return load_embeddings(target, epoch=epoch)
        embedding_set = _load_torch(path)
    else:
        raise InputError(
            f"{path}: unsupported file type {path.suffix or '(none)'}; expected .safetensors, .npz, .npy, "
            ".pt, a Zarr store or a run directory"
        )
    if epoch is not None:
        embedding_set.epoch = epoch
    _validate(embedding_set, path)
    return embedding_set


def _from_named_arrays(path: Path, arrays: dict[str, object], make_source) -> EmbeddingSet:
    """Build an :class:`EmbeddingSet` from named arrays; ``make_source(name)`` wraps one matrix."""
    sources: dict[str, ArraySource] = {}
    index: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if name in INDEX_NAMES:
            index[name] = value  # type: ignore[assignment]
        else:
            sources[name] = make_source(name)
    if not sources:
        raise InputError(f"{path}: contains no embedding matrix (found only {sorted(arrays)})")
    # Known modalities first, in their usual order, then any others as stored.
    order = [name for name in MODALITY_NAMES if name in sources] + [n for n in sources if n not in MODALITY_NAMES]
    sources = {name: sources[name] for name in order}
    embedding_set = EmbeddingSet(source=str(path), sources=sources)
    for name, value in index.items():
        setattr(embedding_set, name, _index_array(path, name, value))
    return embedding_set


def _index_array(path: Path, name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1:
        raise InputError(f"{path}: array {name!r} must be 1-D, got shape {tuple(array.shape)}")
    if name == "has_text":
        if array.dtype.kind not in "biu":
            raise InputError(f"{path}: array 'has_text' must be boolean or integer, got {array.dtype}")
        return array.astype(bool)
    if array.dtype.kind not in "iu":
        raise InputError(f"{path}: array {name!r} must hold integers, got {array.dtype}")
    return array.astype(np.int64)


def _load_safetensors(path: Path) -> EmbeddingSet:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {}
            index = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                shape = tuple(tensor_slice.get_shape())
                if name in INDEX_NAMES:
                    index[name] = handle.get_tensor(name)
                else:
                    shapes[name] = (shape, _safetensors_dtype(path, name, tensor_slice.get_dtype()))
    except InputError:
        raise
    except Exception as error:  # the library raises several types for corrupt or truncated files
        raise InputError(f"{path}: not a readable safetensors file ({_first_line(error)})") from None

    arrays = {**index, **{name: None for name in shapes}}
    embedding_set = _from_named_arrays(
        path, arrays, lambda name: SafetensorsArray(path, name, shapes[name][0], shapes[name][1])
    )
    embedding_set.metadata = metadata
    if "epoch" in metadata and metadata["epoch"].lstrip("-").isdigit():
        embedding_set.epoch = int(metadata["epoch"])
    sidecar = path.with_name(path.name[: -len(".safetensors")] + ".pages.json")
    if sidecar.is_file():
        embedding_set.page_ids = _read_page_ids(sidecar)
    return embedding_set


def _safetensors_dtype(path: Path, name: str, dtype: str) -> np.dtype:
    known = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.float32}
    if dtype not in known:
        raise InputError(f"{path}: tensor {name!r} has dtype {dtype}; embeddings must be floating point")
    if dtype == "BF16":
        raise InputError(f"{path}: tensor {name!r} is bfloat16, which numpy cannot read; save it as float32")
    return np.dtype(known[dtype])


def _read_page_ids(path: Path) -> list[str]:
    try:
        page_ids = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable page-id list ({_first_line(error)})") from None
    if not isinstance(page_ids, list):
        raise InputError(f"{path}: page-id sidecar must be a JSON list of page ids")
    return [str(page_id) for page_id in page_ids]


def _load_npz(path: Path) -> EmbeddingSet:
    try:
        if not zipfile.is_zipfile(path):
            raise InputError(f"{path}: not a .npz archive, or a truncated one (no zip directory found)")
        # Open the file here so that it is closed even when numpy fails to parse the archive.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:
        if "pickle" in str(error).lower():
            raise InputError(f"{path}: contains pickled objects, which are never loaded") from None
        raise InputError(f"{path}: not a readable .npz archive ({_first_line(error)})") from None
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise InputError(f"{path}: not a readable .npz archive ({_first_line(error)})") from None
    if not arrays:
        raise InputError(f"{path}: archive contains no arrays")
    if list(arrays) == ["arr_0"]:
        arrays = {"fused": arrays["arr_0"]}
    return _from_named_arrays(path, arrays, lambda name: _memory_source(path, name, arrays[name]))


def _load_torch(path: Path) -> EmbeddingSet:
    payload = _torch_load(path)
    import torch

    if isinstance(payload, torch.Tensor):
        payload = {"fused": payload}
    if not isinstance(payload, dict) or not payload:
        raise InputError(f"{path}: expected a tensor or a dict of tensors, got {type(payload).__name__}")
    arrays = {}
    for name, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        if value.dtype == torch.bfloat16:
            value = value.float()
        arrays[str(name)] = value.detach().cpu().numpy()
    return _from_named_arrays(path, arrays, lambda name: _memory_source(path, name, arrays[name]))


def _torch_load(path: Path):
    from trainer.torch_files import TorchFileError, load_weights_only

    try:
        return load_weights_only(path)
    except TorchFileError as error:
        raise InputError(f"{path}: {error}") from None


def _memory_source(path: Path, name: str, array) -> MemoryArray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiu":
        raise InputError(f"{path}: array {name!r} has dtype {array.dtype}; embeddings must be numeric")
    return MemoryArray(array, name, str(path))


def _is_zarr(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


def _load_zarr(path: Path) -> EmbeddingSet:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        embeddings = group["panel_embeddings"]
        masks = np.asarray(group["panel_masks"][...])
    except KeyError as error:
        raise InputError(f"{path}: Zarr store lacks array {error}; expected panel_embeddings and panel_masks") from None
    except Exception as error:
        raise InputError(f"{path}: not a readable Zarr store ({_first_line(error)})") from None
    if len(embeddings.shape) != 3:
        raise InputError(
            f"{path}: panel_embeddings must be [pages, max_panels, D], got shape {tuple(embeddings.shape)}"
        )
    if masks.shape != tuple(embeddings.shape[:2]):
        raise InputError(
            f"{path}: panel_masks has shape {masks.shape}, expected {tuple(embeddings.shape[:2])} "
            "to match panel_embeddings"
        )
    if masks.dtype != bool:
        masks = masks.astype(bool)
    if np.dtype(embeddings.dtype).kind != "f":
        raise InputError(f"{path}: panel_embeddings has dtype {embeddings.dtype}; expected floating point")

    source = ZarrPanelArray(path, embeddings, masks)
    page = np.repeat(np.arange(masks.shape[0], dtype=np.int64), source.page_counts)
    embedding_set = EmbeddingSet(source=str(path), sources={"fused": source}, page=page)
    metadata_path = _zarr_metadata_path(path)
    if metadata_path is not None:
        embedding_set.page_ids = _zarr_page_ids(metadata_path, masks.shape[0])
    return embedding_set


def _zarr_metadata_path(path: Path) -> Path | None:
    for candidate in (path / "metadata.json", path.with_suffix(".json"), path.parent / "metadata.json"):
        if candidate.is_file():
            return candidate
    return None


def _zarr_page_ids(path: Path, n_pages: int) -> list[str] | None:
    try:
        records = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable metadata JSON ({_first_line(error)})") from None
    if not isinstance(records, list) or len(records) != n_pages:
        raise InputError(f"{path}: metadata must be a JSON list with one record per page ({n_pages})")
    return [str(record.get("canonical_id", index)) if isinstance(record, dict) else str(index)
            for index, record in enumerate(records)]


# --------------------------------------------------------------------------------------------------
# Validation


def _validate(embedding_set: EmbeddingSet, path: Path) -> None:
    for name, source in embedding_set.sources.items():
        if len(source.shape) != 2:
            raise InputError(
                f"{path}: array {name!r} must be a 2-D [N, D] matrix, got shape {tuple(source.shape)}"
            )
        if source.rows < 2:
            raise InputError(f"{path}: array {name!r} has {source.rows} row(s); at least 2 are needed")
        if source.dim < 1:
            raise InputError(f"{path}: array {name!r} has no columns")

    per_name = {
        "vision_item": "vision", "vision_page": "vision", "text_item": "text", "text_page": "text",
    }
    for index_name, modality in per_name.items():
        values = getattr(embedding_set, index_name)
        if values is None:
            continue
        if modality not in embedding_set.sources:
            raise InputError(f"{path}: has {index_name!r} but no {modality!r} matrix")
        rows = embedding_set.sources[modality].rows
        if len(values) != rows:
            raise InputError(f"{path}: {index_name!r} has length {len(values)}, but {modality!r} has {rows} rows")

    for index_name in ("page", "item", "has_text"):
        values = getattr(embedding_set, index_name)
        if values is None:
            continue
        described = [
            name for name, source in embedding_set.sources.items()
            if getattr(embedding_set, f"{name}_{'page' if index_name == 'page' else 'item'}", None) is None
            or index_name == "has_text"
        ]
        for name in described:
            rows = embedding_set.sources[name].rows
            if len(values) != rows:
                raise InputError(f"{path}: {index_name!r} has length {len(values)}, but {name!r} has {rows} rows")

    if embedding_set.page_ids is not None and embedding_set.page is not None and len(embedding_set.page):
        if int(embedding_set.page.max()) >= len(embedding_set.page_ids) or int(embedding_set.page.min()) < 0:
            raise InputError(
                f"{path}: page index out of range of the {len(embedding_set.page_ids)} page ids in the sidecar"
            )


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

"""The measurements of a run, epoch by epoch, shared by ``diagnose report`` and ``diagnose compare``.

:func:`summarize_run` measures every epoch of a run directory: collapse metrics and global-scope
vision/text retrieval in both directions. It also reads the training log, ``metrics.jsonl``, for the
per-epoch loss components, the share of steps in which each component had no active anchor, page or
pair (its zero share), and the best epoch. :func:`key_metrics` flattens one epoch's figures to one name each,
the names that the comparison and the report's JSON document use.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from diagnose.collapse import collapse_course
from diagnose.documents import DEFAULT_CHUNK_ROWS, measure_collapse
from diagnose.io import EmbeddingSet, InputError, load_checkpoint, load_embeddings, resolve_epochs
from diagnose.sparsity import min_active

RETRIEVAL_DIRECTIONS = ("vision->text", "text->vision")

ProgressCallback = Callable[[str], None]


# --------------------------------------------------------------------------------------------------
# The training log (metrics.jsonl)


@dataclass
class EpochLosses:
    """Loss figures of one epoch: means over its step records, and its validation record."""

    epoch: int
    steps: int
    train_loss: float | None
    validation_loss: float | None
    train: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    # Share of the epoch's steps in which the component gave no signal (active below its minimum).
    zero_share: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingLog:
    """The parsed ``metrics.jsonl`` of a run."""

    path: Path
    components: list[str]
    epochs: dict[int, EpochLosses]
    step_records: list[dict]

    def best_epoch(self) -> int | None:
        """Return the epoch with the lowest finite validation loss (the earliest on a tie), if any."""
        candidates = [
            (losses.validation_loss, epoch) for epoch, losses in self.epochs.items()
            if losses.validation_loss is not None and math.isfinite(losses.validation_loss)
        ]
        return min(candidates)[1] if candidates else None


def read_training_log(path: str | Path) -> TrainingLog:
    """Parse a run's ``metrics.jsonl`` (step and validation records) into per-epoch loss figures.

    Records of other kinds are ignored. A last line that is not valid JSON (a run interrupted while
    writing) is skipped with a warning. Any other invalid line raises :class:`InputError` naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the training log ({error})") from None

    step_records: list[dict] = []
    validation_records: dict[int, dict] = {}
    components: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                warnings.warn(f"{path}: line {number} is incomplete JSON and was ignored", stacklevel=2)
                continue
            raise InputError(f"{path}: line {number} is not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or record.get("kind") not in ("step", "validation"):
            continue
        _check_record(path, number, record)
        for name in record.get("components") or {}:
            if name not in components:
                components.append(name)
        if record["kind"] == "step":
            step_records.append(record)
        else:
            validation_records[int(record["epoch"])] = record

    steps_by_epoch: dict[int, list[dict]] = {}
    for record in step_records:
        steps_by_epoch.setdefault(record["epoch"], []).append(record)
    epochs: dict[int, EpochLosses] = {}
    for epoch in sorted(set(steps_by_epoch) | set(validation_records)):
        steps = steps_by_epoch.get(epoch, [])
        validation = validation_records.get(epoch)
        losses = EpochLosses(
            epoch=epoch,
            steps=len(steps),
            train_loss=_mean([record.get("loss") for record in steps]),
            validation_loss=_finite_or_none(validation.get("loss")) if validation else None,
        )
        for name in components:
            values = [_component(record, name).get("value") for record in steps]
            losses.train[name] = _mean(values)
            present = [record for record in steps if name in (record.get("components") or {})]
            if present:
                starved = [_component(record, name).get("active", 0) < min_active(name) for record in present]
                losses.zero_share[name] = sum(starved) / len(present)
            if validation is not None and name in (validation.get("components") or {}):
                losses.validation[name] = _finite_or_none(_component(validation, name).get("value"))
        epochs[epoch] = losses
    return TrainingLog(path=path, components=components, epochs=epochs, step_records=step_records)


def _check_record(path: Path, number: int, record: dict) -> None:
    epoch = record.get("epoch")
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise InputError(f"{path}: line {number} has no integer 'epoch' (got {epoch!r})")
    components = record.get("components", {})
    if not isinstance(components, dict):
        raise InputError(f"{path}: line {number}: 'components' must be an object, got {type(components).__name__}")
    for name, component in components.items():
        if not isinstance(component, dict):
            raise InputError(f"{path}: line {number}: component {name!r} must be an object with value and active")
        for key in ("active", "weight"):
            value = component.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise InputError(f"{path}: line {number}: component {name!r} has a non-numeric {key!r} ({value!r})")


def _component(record: dict, name: str) -> dict:
    return (record.get("components") or {}).get(name) or {}


def _finite_or_none(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _mean(values) -> float | None:
    finite = [value for value in (_finite_or_none(value) for value in values) if value is not None]
    return sum(finite) / len(finite) if finite else None


def loss_sparsity(log: TrainingLog) -> dict:
    """Summarise the loss-signal sparsity of every component over all step records.

    The figures are those of ``diagnose sparsity`` (:func:`diagnose.sparsity.summarize_components`): a
    step gives a component no signal when its active count is below the component's minimum.
    """
    from diagnose.sparsity import summarize_components

    records = [record for record in log.step_records if isinstance(record.get("components"), dict)]
    return summarize_components(records) if records else {}



# --------------------------------------------------------------------------------------------------
# Measuring the epochs of a run


@dataclass
class EpochSummary:
    """The measurements of one epoch's embedding file."""

    epoch: int | None
    path: Path
    panels: int
    collapse: dict
    retrieval: dict | None
    retrieval_note: str | None = None


@dataclass
class RunSummary:
    """Everything the report and the comparison need about one run (or one embedding file)."""

    source: str
    is_run: bool
    epochs: list[EpochSummary]
    log: TrainingLog | None = None
    best_epoch: int | None = None
    best_reason: str | None = None
    run_info: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def last(self) -> EpochSummary:
        return self.epochs[-1]

    def epoch_summary(self, epoch: int | None) -> EpochSummary | None:
        for summary in self.epochs:
            if summary.epoch == epoch:
                return summary
        return None

    def losses(self, epoch: int | None) -> EpochLosses | None:
        if self.log is None or epoch is None:
            return None
        return self.log.epochs.get(epoch)

    def first_collapsed_epoch(self) -> int | None:
        return collapse_course(self._verdicts())[0]

    def healthy_since_epoch(self) -> int | None:
        """Return the epoch from which a run that collapsed earlier stayed healthy (see ``collapse_course``)."""
        return collapse_course(self._verdicts())[1]

    def _verdicts(self) -> list[tuple[int, str | None]]:
        return [(summary.epoch, summary.collapse["verdict"]) for summary in self.epochs]


def summarize_run(
    path: str | Path,
    *,
    retrieval: bool = True,
    seed: int = 0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    progress: ProgressCallback | None = None,
) -> RunSummary:
    """Measure every epoch of a run directory, or the one epoch of a checkpoint or embedding file.

    For a run directory the training log gives the per-epoch losses and the best epoch: the lowest
    validation loss in ``metrics.jsonl``, else the epoch of ``checkpoints/best.pt``.
    """
    path = Path(path)
    epoch_files = resolve_epochs(path)
    is_run = path.is_dir() and epoch_files[0][0] is not None and not _is_zarr(path)
    summary = RunSummary(source=str(path), is_run=is_run, epochs=[])
    # The log and run.json are cheap to read, so their errors surface before any epoch is measured.
    if is_run:
        _read_run_files(path, summary)

    for epoch, epoch_path in epoch_files:
        if progress is not None and len(epoch_files) > 1:
            progress(f"measuring epoch {epoch} ({epoch_path.name})...")
        embedding_set = load_embeddings(epoch_path, epoch=epoch)
        measured = measure_epoch(embedding_set, Path(epoch_path), retrieval=retrieval, seed=seed,
                                 chunk_rows=chunk_rows)
        summary.epochs.append(measured)
        if measured.retrieval_note:
            where = f"epoch {measured.epoch}" if measured.epoch is not None else Path(epoch_path).name
            summary.notes.append(f"{where}: {measured.retrieval_note}")

    if summary.best_epoch is not None and summary.epoch_summary(summary.best_epoch) is None:
        summary.notes.append(f"the best epoch ({summary.best_epoch}) has no embedding file; its figures are missing")
    return summary


def measure_epoch(embedding_set: EmbeddingSet, path: Path, *, retrieval: bool = True, seed: int = 0,
                  chunk_rows: int = DEFAULT_CHUNK_ROWS) -> EpochSummary:
    """Measure collapse and (when the set has vision and text) bidirectional retrieval of one epoch."""
    collapse = measure_collapse(embedding_set, chunk_rows=chunk_rows, seed=seed)
    first = embedding_set.modalities[0]
    panels = embedding_set.sources["fused" if "fused" in embedding_set.sources else first].rows
    measured, note = _retrieval(embedding_set, seed) if retrieval else (None, None)
    return EpochSummary(epoch=embedding_set.epoch, path=path, panels=panels, collapse=collapse, retrieval=measured,
                        retrieval_note=note)


def _retrieval(embedding_set: EmbeddingSet, seed: int) -> tuple[dict | None, str | None]:
    """Global-scope retrieval vision->text and text->vision; (None, reason) when it cannot be measured."""
    from diagnose.retrieval import bidirectional_retrieval

    if "vision" not in embedding_set.sources or "text" not in embedding_set.sources:
        return None, "no vision and text matrices, so retrieval was not measured"
    arrays = embedding_set.arrays
    vision, text = arrays["vision"], arrays["text"]
    vision_items = embedding_set.items_for("vision")
    text_items = embedding_set.items_for("text")
    same_rows = len(vision) == len(text) and embedding_set.vision_item is None and embedding_set.text_item is None
    has_text = embedding_set.has_text if same_rows else None
    try:
        measured = bidirectional_retrieval(
            vision, text, first_items=vision_items, second_items=text_items, has_text=has_text,
            names=("vision", "text"), scopes=("global",), seed=seed,
        )
    except InputError as error:
        return None, f"retrieval was not measured ({error})"
    return measured, None


def _read_run_files(run_dir: Path, summary: RunSummary) -> None:
    metrics_path = run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        summary.log = read_training_log(metrics_path)
        best = summary.log.best_epoch()
        if best is not None:
            summary.best_epoch, summary.best_reason = best, "lowest validation loss in metrics.jsonl"
    else:
        summary.notes.append("no metrics.jsonl in the run directory: no loss trajectories or sparsity table")

    best_checkpoint = run_dir / "checkpoints" / "best.pt"
    if summary.best_epoch is None and best_checkpoint.is_file():
        epoch = load_checkpoint(best_checkpoint).get("epoch")
        if isinstance(epoch, int):
            summary.best_epoch, summary.best_reason = epoch, "epoch of checkpoints/best.pt"

    run_json = run_dir / "run.json"
    if run_json.is_file():
        try:
            info = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            summary.notes.append(f"run.json could not be read ({error})")
        else:
            summary.run_info = info if isinstance(info, dict) else None


def _is_zarr(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / "zarr.json").is_file()


# --------------------------------------------------------------------------------------------------
# Key metrics of an epoch, flattened to one name each


@dataclass(frozen=True)
class KeyMetric:
    """A figure shown per epoch. ``better`` is +1 when higher is better, -1 when lower is, 0 when neither."""

    name: str
    label: str
    better: int


BASE_KEY_METRICS = (
    KeyMetric("fused.effective_rank", "effective rank (fused)", +1),
    KeyMetric("fused.effective_rank_ratio", "effective rank / min(N, D) (fused)", +1),
    KeyMetric("fused.std_l2_ratio", "std_l2 x sqrt(D) (fused)", +1),
    KeyMetric("fused.cosine_mean", "mean cosine (fused)", -1),
    # Contrastive positives are panels of one page, so a higher intra-page cosine is neither good nor bad
    # until it nears the group-collapse bound.
    KeyMetric("fused.intra_cosine", "intra-page cosine (fused)", 0),
    KeyMetric("fused.inter_cosine", "inter-page cosine (fused)", -1),
    KeyMetric("vision.effective_rank", "effective rank (vision)", +1),
    KeyMetric("text.effective_rank", "effective rank (text)", +1),
    KeyMetric("vision-text.modality_gap", "modality gap", -1),
    KeyMetric("vision-text.alignment", "vision-text distance (mean squared)", -1),
    KeyMetric("vision->text.recall@1", "recall@1 vision->text", +1),
    KeyMetric("vision->text.recall@5", "recall@5 vision->text", +1),
    KeyMetric("vision->text.mrr", "MRR vision->text", +1),
    KeyMetric("text->vision.recall@1", "recall@1 text->vision", +1),
    KeyMetric("text->vision.recall@5", "recall@5 text->vision", +1),
    KeyMetric("text->vision.mrr", "MRR text->vision", +1),
    KeyMetric("loss.train", "training loss (mean over steps)", -1),
    KeyMetric("loss.validation", "validation loss", -1),
)


def key_metric_specs(components: list[str]) -> list[KeyMetric]:
    """Return the key metrics, with a validation value, a training mean and a zero share per loss component."""
    specs = list(BASE_KEY_METRICS)
    for name in components:
        specs.append(KeyMetric(f"{name}.validation", f"{name} (validation)", -1))
    for name in components:
        specs.append(KeyMetric(f"{name}.train", f"{name} (training mean)", -1))
    for name in components:
        specs.append(KeyMetric(f"{name}.zero_share", f"{name} zero share", -1))
    return specs


def key_metrics(epoch_summary: EpochSummary | None, losses: EpochLosses | None) -> dict[str, float | None]:
    """Flatten the figures of one epoch to ``{key metric name: value}`` (None where not measured)."""
    values: dict[str, float | None] = {}
    modalities = epoch_summary.collapse["modalities"] if epoch_summary else {}
    for name in ("fused", "vision", "text"):
        metrics = modalities.get(name) or {}
        groups = metrics.get("groups") or {}
        values[f"{name}.effective_rank"] = metrics.get("effective_rank")
        values[f"{name}.effective_rank_ratio"] = metrics.get("effective_rank_ratio")
        values[f"{name}.std_l2_ratio"] = metrics.get("std_l2_ratio")
        values[f"{name}.cosine_mean"] = (metrics.get("cosine") or {}).get("mean")
        values[f"{name}.intra_cosine"] = groups.get("intra_cosine")
        values[f"{name}.inter_cosine"] = groups.get("inter_cosine")

    pair = (epoch_summary.collapse["pairs"].get("vision-text") if epoch_summary else None) or {}
    values["vision-text.modality_gap"] = pair.get("modality_gap")
    values["vision-text.alignment"] = pair.get("alignment")

    directions = ((epoch_summary.retrieval or {}).get("directions") if epoch_summary else None) or {}
    for direction in RETRIEVAL_DIRECTIONS:
        scope = (directions.get(direction) or {}).get("global") or {}
        for metric in ("recall@1", "recall@5", "mrr", "chance@1"):
            values[f"{direction}.{metric}"] = scope.get(metric)

    values["loss.train"] = losses.train_loss if losses else None
    values["loss.validation"] = losses.validation_loss if losses else None
    if losses is not None:
        for name, value in losses.validation.items():
            values[f"{name}.validation"] = value
        for name, value in losses.train.items():
            values[f"{name}.train"] = value
        for name, value in losses.zero_share.items():
            values[f"{name}.zero_share"] = value
    return {name: _finite_or_none(value) for name, value in values.items()}


def epoch_table(summary: RunSummary) -> list[dict]:
    """Return ``[{"epoch", "verdict", "metrics"}]`` for every epoch that has embeddings or log records."""
    epochs = [entry.epoch for entry in summary.epochs]
    if summary.log is not None:
        epochs += [epoch for epoch in summary.log.epochs if epoch not in epochs]
    rows = []
    for epoch in sorted(epochs, key=lambda value: (value is None, value if value is not None else 0)):
        entry = summary.epoch_summary(epoch)
        rows.append({
            "epoch": epoch,
            "verdict": entry.collapse["verdict"] if entry else None,
            "metrics": key_metrics(entry, summary.losses(epoch)),
        })
    return rows



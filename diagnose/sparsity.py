"""Loss-signal sparsity: how often each loss term had something to train on, observed and predicted.

Each term of the training loss is an exact zero when its batch gives it nothing to work on:

- contrastive: no anchor has a positive, because no page of the batch has 2 or more panels;
- reconstruction: no page of the batch has 2 or more panels;
- alignment: fewer than 2 panels of the batch have text (InfoNCE needs a negative).

The trainer logs each term's ``active`` count per step (anchors, pages, image-text pairs). A step gives
a term no signal when that count is below the term's minimum, ``MIN_ACTIVE``: 2 for alignment, whose
count can be 1 while its loss is 0, and 1 for every other term.

Observed figures come from the step records of ``metrics.jsonl``. Per component:

- ``zero_share``: share of the step records carrying the component that gave it no signal;
- ``active``: min, mean, median, 95th percentile (linear interpolation) and max of the active count;
- ``weighted_share``: sum over steps of weight * value, divided by the same sum over every component.
  Non-finite values are left out of both sums.

Predicted figures come from the dataset alone: the pages that the trainer keeps (page filter, panel
cap, every skip rule) and its train/validation split, without decoding page images. A batch of the
random sampler is a uniform draw of ``b`` train pages without replacement (``b`` is the batch size, or
the remainder for the last batch of an epoch). The probability that a term gets no signal is exact
(:func:`zero_signal_probability`), and the per-step figure weights full and last batches as
``trainer.data.iterate_batches`` produces them. The balanced sampler is predicted by a seeded
simulation of the sampler itself, with a standard error over simulated epochs.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from diagnose.io import InputError

SPARSITY_SCHEMA = "sparsity/1"
DEFAULT_MAX_ZERO_SHARE = 0.05
DEFAULT_TARGET = 0.01
DEFAULT_SIMULATED_EPOCHS = 200
# Simulated epochs per batch size tried while searching the smallest batch size for the balanced sampler.
SEARCH_SIMULATED_EPOCHS = 20
COMPONENTS = ("contrastive", "reconstruction", "alignment")
# Smallest active count with which a term gives a signal; terms not listed need 1.
MIN_ACTIVE = {"alignment": 2}
STEP_FIELDS = ("epoch", "step", "components")
COMPONENT_FIELDS = ("value", "weight", "active")


def min_active(component: str) -> int:
    return MIN_ACTIVE.get(component, 1)


# --------------------------------------------------------------------------------------------------
# Reading metrics.jsonl


@dataclass
class StepLog:
    """The step records of one ``metrics.jsonl``; ``truncated_line`` is the skipped partial last line."""

    path: Path
    records: list[dict]
    truncated_line: int | None = None


def resolve_log_path(path: Path) -> Path:
    """Return the ``metrics.jsonl`` of a run directory, or ``path`` itself for a file."""
    if path.is_dir():
        log_path = path / "metrics.jsonl"
        if not log_path.is_file():
            raise InputError(f"{path}: no metrics.jsonl in this run directory")
        return log_path
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return path


def read_step_log(path: str | Path) -> StepLog:
    """Read and validate the step records of a run directory's ``metrics.jsonl`` (or that file).

    A last line without its newline that is not valid JSON is what a run stopped while writing leaves
    behind: it is skipped with a warning. Any other invalid line, a step record without ``epoch``,
    ``step`` or a complete ``components`` table, and a log without step records raise
    :class:`InputError` naming the file and line. Validation records and kinds other than ``step`` are
    read past.
    """
    log_path = resolve_log_path(Path(path))
    try:
        text = log_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{log_path}: not UTF-8 text (invalid byte at offset {error.start})") from None
    except OSError as error:
        raise InputError(f"{log_path}: cannot read the log ({error.strerror})") from None
    if not text.strip():
        raise InputError(f"{log_path}: the log is empty, so there are no step records")

    lines = text.split("\n")
    # With a final newline the split ends in an empty string, so the last real line was complete.
    partial_last = len(lines) if not text.endswith("\n") else None
    records = []
    truncated_line = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == partial_last:
                truncated_line = number
                warnings.warn(
                    f"{log_path}: line {number} is cut off (no final newline, invalid JSON) and was skipped; "
                    "the run probably stopped while writing it",
                    stacklevel=2,
                )
                continue
            raise InputError(f"{log_path}: line {number} is not valid JSON ({error.msg} at column {error.colno})") from None
        if _check_record(record, log_path, number):
            records.append(record)

    if not records:
        raise InputError(f"{log_path}: no step records (records with \"kind\": \"step\")")
    return StepLog(log_path, records, truncated_line)


def _check_record(record: Any, log_path: Path, number: int) -> bool:
    """Raise InputError for a malformed record; return whether it is a step record."""
    where = f"{log_path}: line {number}"
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "kind" not in record:
        raise InputError(f"{where}: record has no 'kind'")
    if record["kind"] != "step":
        return False

    for key in STEP_FIELDS:
        if key not in record:
            raise InputError(f"{where}: step record lacks {key!r}")
    for key in ("epoch", "step"):
        if not _is_integer(record[key]):
            raise InputError(f"{where}: step record {key!r} must be an integer, got {record[key]!r}")
    components = record["components"]
    if not isinstance(components, dict) or not components:
        raise InputError(f"{where}: step record 'components' must be a non-empty object")
    for name, component in components.items():
        if not isinstance(component, dict):
            raise InputError(f"{where}: component {name!r} must be an object with value, weight and active")
        for key in COMPONENT_FIELDS:
            if key not in component:
                raise InputError(f"{where}: component {name!r} lacks {key!r}")
        for key in ("value", "weight"):
            if isinstance(component[key], bool) or not isinstance(component[key], (int, float)):
                raise InputError(f"{where}: component {name!r} {key!r} must be a number, got {component[key]!r}")
        if not _is_integer(component["active"]) or component["active"] < 0:
            raise InputError(
                f"{where}: component {name!r} 'active' must be a non-negative integer, got {component['active']!r}"
            )
    return True


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --------------------------------------------------------------------------------------------------
# Observed sparsity


def observed_sparsity(records: Sequence[dict], threshold: float = DEFAULT_MAX_ZERO_SHARE) -> dict:
    """Summarise step records: per component over all steps, and the same per epoch.

    Returns ``{"components": {NAME: summary}, "epochs": [{"epoch", "steps", "skipped_steps", "components"}],
    "starved", "skipped_steps"}``. A component is starved when its zero share is above ``threshold``.
    ``skipped_steps`` counts records marked ``"skipped": true``, steps whose update the trainer dropped
    for a non-finite loss or gradient. They still count in the zero shares, which measure whether the
    batch gave a term something to work on.
    """
    components = summarize_components(records, threshold)
    epochs = []
    for epoch in sorted({record["epoch"] for record in records}):
        in_epoch = [record for record in records if record["epoch"] == epoch]
        epochs.append({
            "epoch": epoch,
            "steps": len(in_epoch),
            "skipped_steps": _skipped_steps(in_epoch),
            "components": summarize_components(in_epoch, threshold),
        })
    starved = [name for name, summary in components.items() if summary["starved"]]
    return {"components": components, "epochs": epochs, "starved": starved, "skipped_steps": _skipped_steps(records)}


def _skipped_steps(records: Sequence[dict]) -> int:
    return sum(record.get("skipped") is True for record in records)


def summarize_components(records: Sequence[dict], threshold: float = DEFAULT_MAX_ZERO_SHARE) -> dict:
    """Return ``{NAME: {"steps", "zero_share", "active", "weighted_share", "min_active", "starved"}}``.

    ``weighted_share`` is null when the weighted values of every component sum to zero.
    """
    names = list(dict.fromkeys(name for record in records for name in record["components"]))
    weighted = {name: 0.0 for name in names}
    for record in records:
        for name, component in record["components"].items():
            product = component["weight"] * component["value"]
            if math.isfinite(product):
                weighted[name] += product
    total = sum(weighted.values())

    summaries = {}
    for name in names:
        active = np.array(
            [record["components"][name]["active"] for record in records if name in record["components"]],
            dtype=np.int64,
        )
        zero_share = float(np.mean(active < min_active(name)))
        summaries[name] = {
            "steps": int(active.size),
            "zero_share": zero_share,
            "active": {
                "min": int(active.min()),
                "mean": float(active.mean()),
                "median": float(np.median(active)),
                "p95": float(np.percentile(active, 95)),
                "max": int(active.max()),
            },
            "weighted_share": weighted[name] / total if total != 0 else None,
            "min_active": min_active(name),
            "starved": zero_share > threshold,
        }
    return summaries


# --------------------------------------------------------------------------------------------------
# The train split as the trainer loads it


@dataclass
class TrainSplit:
    """Per-page counts of the train split that decide each term's signal, and where they came from."""

    manifest: str
    pages: int
    panel_counts: np.ndarray
    text_counts: np.ndarray
    skipped: dict[str, int]
    fingerprint: str

    @property
    def train_pages(self) -> int:
        return int(self.panel_counts.size)

    def page_active(self) -> dict[str, np.ndarray]:
        """Return each page's contribution to each component's active count, as the objectives count it."""
        multi_panel = self.panel_counts >= 2
        return {
            "contrastive": np.where(multi_panel, self.panel_counts, 0),
            "reconstruction": multi_panel.astype(np.int64),
            "alignment": self.text_counts.copy(),
        }

    def describe(self) -> dict:
        return {
            "manifest": self.manifest,
            "pages": self.pages,
            "train_pages": self.train_pages,
            "train_panels": int(self.panel_counts.sum()),
            "train_text_panels": int(self.text_counts.sum()),
            "multi_panel_pages": int((self.panel_counts >= 2).sum()),
            "skipped": {reason: count for reason, count in self.skipped.items() if count},
            "fingerprint": self.fingerprint,
        }


def load_train_split(data_config) -> TrainSplit:
    """Load the trainer's train split of ``data_config`` (a ``trainer.config.DataConfig``) without images.

    Raises :class:`InputError` with the trainer's message when the dataset cannot be used.
    """
    from trainer.config import TrainerError
    from trainer.data import load_dataset, split_pages
    from trainer.sampler import page_signal_counts

    try:
        dataset = load_dataset(data_config, load_images=False)
        train_pages, _ = split_pages(dataset, data_config.val_fraction, data_config.seed)
    except TrainerError as error:
        raise InputError(str(error)) from None
    panel_counts, text_counts = page_signal_counts(dataset, train_pages)
    return TrainSplit(
        manifest=str(dataset.manifest),
        pages=len(dataset.pages),
        panel_counts=np.asarray(panel_counts, dtype=np.int64),
        text_counts=np.asarray(text_counts, dtype=np.int64),
        skipped=dataset.skipped,
        fingerprint=dataset.fingerprint,
    )


# --------------------------------------------------------------------------------------------------
# Exact prediction for the random sampler


def zero_signal_probability(page_active: np.ndarray, need: int, batch: int) -> float:
    """Return P(the active counts of a batch sum to less than ``need``) for a uniform draw of pages.

    The batch is ``batch`` pages drawn without replacement from the pages whose active counts are
    ``page_active``. For ``need = 1`` this is the hypergeometric C(N - m, batch) / C(N, batch), with
    m pages of non-zero count; :class:`ZeroSignalModel` gives the general form.
    """
    return ZeroSignalModel(page_active, need).probability(batch)


class ZeroSignalModel:
    """The exact probability that a uniform draw of pages gives one term less than ``need`` active.

    Only the draws whose total stays below ``need`` count, and such a draw contains at most ``need - 1``
    pages with a non-zero count. A dynamic programme over the distinct non-zero counts (each below
    ``need``) enumerates those draws as ``ways[(total, pages)]``, and the rest of the batch comes from
    the ``n_zero`` pages with a zero count:

        P = sum over (total < need, j) of ways[(total, j)] * C(n_zero, batch - j) / C(N, batch)

    The programme runs once per dataset, so each batch size then costs O(need^2). The binomial ratios
    are evaluated in log space, so the result is exact up to float rounding.
    """

    def __init__(self, page_active: np.ndarray, need: int):
        self.pages = int(page_active.size)
        self.need = need
        self.zero_pages = int((page_active == 0).sum())
        values, counts = np.unique(page_active[(page_active > 0) & (page_active < need)], return_counts=True)

        ways: dict[tuple[int, int], int] = {(0, 0): 1}
        for value, group_size in zip(values.tolist(), counts.tolist()):
            extended: dict[tuple[int, int], int] = {}
            for (total, pages), count in ways.items():
                for chosen in range(group_size + 1):
                    new_total = total + chosen * value
                    if new_total >= need:
                        break
                    key = (new_total, pages + chosen)
                    extended[key] = extended.get(key, 0) + count * math.comb(group_size, chosen)
            ways = extended
        self.ways = ways

    def probability(self, batch: int) -> float:
        if batch < 1 or batch > self.pages:
            raise ValueError(f"batch of {batch} pages drawn from {self.pages}")
        if self.need <= 0:
            return 0.0
        log_all = _log_comb(self.pages, batch)
        probability = 0.0
        for (_, pages), count in self.ways.items():
            rest = batch - pages
            if 0 <= rest <= self.zero_pages:
                probability += count * math.exp(_log_comb(self.zero_pages, rest) - log_all)
        return min(probability, 1.0)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def epoch_batch_sizes(train_pages: int, batch_size: int) -> tuple[int, int]:
    """Return (full batches per epoch, pages in the last smaller batch or 0), as iterate_batches cuts them."""
    return train_pages // batch_size, train_pages % batch_size


class ExactPrediction:
    """Per-step zero shares and expected active counts of the random sampler, for any batch size."""

    def __init__(self, split: TrainSplit):
        self.train_pages = split.train_pages
        page_active = split.page_active()
        self.active_totals = {name: float(values.sum()) for name, values in page_active.items()}
        self.models = {name: ZeroSignalModel(values, min_active(name)) for name, values in page_active.items()}

    def predict(self, batch_size: int) -> dict[str, dict]:
        full, last = epoch_batch_sizes(self.train_pages, batch_size)
        steps = full + (1 if last else 0)
        predictions = {}
        for name, model in self.models.items():
            full_zero = model.probability(batch_size) if full else None
            last_zero = model.probability(last) if last else None
            zero_share = ((full_zero or 0.0) * full + (last_zero or 0.0) * (1 if last else 0)) / steps
            # A uniform draw of b pages has an expected active count of b times the mean per page, and
            # an epoch's steps together hold every train page once.
            expected_active = self.active_totals[name] / steps
            predictions[name] = {
                "zero_share": zero_share,
                "zero_share_full_batch": full_zero,
                "zero_share_last_batch": last_zero,
                "expected_active": expected_active,
                "standard_error": None,
                "min_active": model.need,
            }
        return predictions


def exact_prediction(split: TrainSplit, batch_size: int) -> dict[str, dict]:
    """Predict each component's zero share and expected active count per step under the random sampler."""
    return ExactPrediction(split).predict(batch_size)


# --------------------------------------------------------------------------------------------------
# Simulation of the trainer's samplers


@dataclass
class SamplerSettings:
    """The trainer sampler to simulate and its per-batch minimums (used by the balanced sampler only)."""

    name: str = "random"
    min_multi_panel_pages: int = 2
    min_text_panels: int = 2


def simulated_prediction(
    split: TrainSplit, batch_size: int, sampler: SamplerSettings, epochs: int = DEFAULT_SIMULATED_EPOCHS, seed: int = 0
) -> tuple[dict[str, dict], dict]:
    """Predict by running the trainer's sampler for ``epochs`` epochs and counting each batch's signal.

    Returns the per-component predictions and a description of the simulation. ``standard_error`` is
    the standard deviation of the per-epoch zero shares over the square root of ``epochs``, because
    steps within one epoch are not independent (each page appears once). When no simulated step gives
    a component a zero, its standard error is 0, and the one-sided 95% upper bound of the zero share
    is about 3 / (simulated steps) (the rule of three).
    """
    if epochs < 2:
        raise ValueError(f"a simulation needs at least 2 epochs for its standard error, got {epochs}")
    page_active = split.page_active()
    full, last = epoch_batch_sizes(split.train_pages, batch_size)
    draw_epoch, shortfall_epochs = _epoch_drawer(split, batch_size, sampler, seed)

    zero_per_epoch = {name: np.zeros(epochs) for name in page_active}
    zero_full = {name: 0 for name in page_active}
    zero_last = {name: 0 for name in page_active}
    active_sum = {name: 0.0 for name in page_active}
    for epoch in range(epochs):
        batches = draw_epoch(epoch + 1)
        lengths = np.array([len(batch) for batch in batches])
        order = np.concatenate([np.asarray(batch, dtype=np.int64) for batch in batches])
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        is_last = lengths != batch_size
        for name, values in page_active.items():
            batch_active = np.add.reduceat(values[order], starts)
            zero = batch_active < min_active(name)
            zero_per_epoch[name][epoch] = zero.mean()
            zero_full[name] += int(zero[~is_last].sum())
            zero_last[name] += int(zero[is_last].sum())
            active_sum[name] += float(batch_active.sum())

    steps = full + (1 if last else 0)
    predictions = {}
    for name in page_active:
        shares = zero_per_epoch[name]
        predictions[name] = {
            "zero_share": float(shares.mean()),
            "zero_share_full_batch": zero_full[name] / (full * epochs) if full else None,
            "zero_share_last_batch": zero_last[name] / epochs if last else None,
            "expected_active": active_sum[name] / (steps * epochs),
            "standard_error": float(shares.std(ddof=1) / math.sqrt(epochs)),
            "min_active": min_active(name),
        }
    simulation = {"epochs": epochs, "steps": steps * epochs, "seed": seed, "shortfall_epochs": shortfall_epochs()}
    return predictions, simulation


def _epoch_drawer(split: TrainSplit, batch_size: int, sampler: SamplerSettings, seed: int):
    """Return ``draw(epoch) -> batches of positions`` for the sampler, and a count of epochs with a shortfall."""
    positions = list(range(split.train_pages))
    if sampler.name == "random":
        import torch

        from trainer.data import iterate_batches

        # The trainer shuffles with one generator that advances from epoch to epoch.
        generator = torch.Generator().manual_seed(seed)
        return (lambda epoch: list(iterate_batches(positions, batch_size, generator))), (lambda: None)

    if sampler.name == "balanced":
        from trainer.sampler import BalancedBatchSampler

        balanced = BalancedBatchSampler(
            positions, split.panel_counts, split.text_counts, batch_size,
            min_multi_panel_pages=sampler.min_multi_panel_pages, min_text_panels=sampler.min_text_panels,
            seed=seed, warn=False,
        )
        short = []

        def draw(epoch: int) -> list[list[int]]:
            balanced.set_epoch(epoch)
            batches = list(balanced)
            if balanced.shortfall:
                short.append(epoch)
            return batches

        return draw, (lambda: len(short))
    raise InputError(f"unknown sampler {sampler.name!r}; expected random or balanced")


# --------------------------------------------------------------------------------------------------
# Prediction: method choice and the smallest batch size


def predict_sparsity(
    split: TrainSplit,
    batch_size: int,
    sampler: SamplerSettings = SamplerSettings(),
    method: str = "auto",
    epochs: int = DEFAULT_SIMULATED_EPOCHS,
    seed: int = 0,
    target: float = DEFAULT_TARGET,
    threshold: float = DEFAULT_MAX_ZERO_SHARE,
) -> dict:
    """Return the ``predicted`` part of the ``sparsity/1`` document for one batch size.

    ``method`` is ``exact`` (random sampler only), ``simulate``, or ``auto`` (exact for the random
    sampler, simulation for the balanced one). ``min_batch_size`` is the smallest batch size whose
    predicted zero share is below ``target`` for every component, by the same method. The zero share
    is not monotonic in the batch size, because the last batch of an epoch can be small, so the
    search tries every size upwards from 1.
    """
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 page, got {batch_size}")
    if batch_size > split.train_pages:
        warnings.warn(
            f"batch size {batch_size} is larger than the {split.train_pages} train pages: "
            "every step holds the whole train split",
            stacklevel=2,
        )
        batch_size = split.train_pages
    if method == "auto":
        method = "exact" if sampler.name == "random" else "simulate"
    if method == "exact" and sampler.name != "random":
        raise InputError("the exact prediction covers the random sampler only; use --method simulate")

    simulation = None
    exact = ExactPrediction(split)
    if method == "exact":
        components = exact.predict(batch_size)
    else:
        components, simulation = simulated_prediction(split, batch_size, sampler, epochs, seed)
    for prediction in components.values():
        prediction["starved"] = prediction["zero_share"] > threshold

    full, last = epoch_batch_sizes(split.train_pages, batch_size)
    document = {
        "batch_size": batch_size,
        "sampler": sampler.name,
        "method": "exact" if method == "exact" else "simulation",
        "steps_per_epoch": full + (1 if last else 0),
        "last_batch_pages": last or batch_size,
        "dataset": split.describe(),
        "components": components,
        "starved": [name for name, prediction in components.items() if prediction["starved"]],
        "simulation": simulation,
        "min_batch_size": smallest_batch_size(split, exact, sampler, target, seed),
    }
    if sampler.name == "balanced":
        document["min_multi_panel_pages"] = sampler.min_multi_panel_pages
        document["min_text_panels"] = sampler.min_text_panels
    return document


def smallest_batch_size(
    split: TrainSplit, exact: ExactPrediction, sampler: SamplerSettings, target: float, seed: int
) -> dict:
    """Return the smallest batch size with every predicted zero share below ``target``, or null if none.

    For the random sampler the search is exact, whatever ``method`` the main prediction used, and
    tries every size up to the train split. For the balanced sampler it simulates
    ``SEARCH_SIMULATED_EPOCHS`` epochs per size and needs the estimate plus two standard errors below
    the target, so simulation noise does not pick a size that is too small. It stops at the random
    sampler's exact result, because simulating every size of a large split is slow, and
    ``searched_up_to`` is the largest size tried.
    """
    exact_size = None
    for batch_size in range(1, split.train_pages + 1):
        shares = _zero_shares(exact.predict(batch_size))
        if all(share < target for share in shares.values()):
            exact_size = batch_size
            break
    if sampler.name == "random":
        return _search_result(target, exact_size, shares if exact_size else None, exact_size or split.train_pages, "exact")

    limit = exact_size or split.train_pages
    for batch_size in range(1, limit + 1):
        components, _ = simulated_prediction(split, batch_size, sampler, SEARCH_SIMULATED_EPOCHS, seed)
        upper = {name: entry["zero_share"] + 2 * entry["standard_error"] for name, entry in components.items()}
        if all(bound < target for bound in upper.values()):
            return _search_result(target, batch_size, _zero_shares(components), batch_size, "simulation")
    return _search_result(target, None, None, limit, "simulation")


def _zero_shares(components: dict[str, dict]) -> dict[str, float]:
    return {name: prediction["zero_share"] for name, prediction in components.items()}


def _search_result(
    target: float, batch_size: int | None, shares: dict | None, searched_up_to: int, method: str
) -> dict:
    return {"target": target, "batch_size": batch_size, "zero_share": shares, "searched_up_to": searched_up_to,
            "method": method}


# --------------------------------------------------------------------------------------------------
# Documents


@dataclass
class PredictionRequest:
    """Prediction settings: batch size (None takes the config's), trainer config, sampler, method and seed."""

    batch_size: int | None = None
    config_path: Path | None = None
    overrides: tuple[str, ...] = ()
    sampler: str | None = None
    method: str = "auto"
    epochs: int = DEFAULT_SIMULATED_EPOCHS
    seed: int = 0
    target: float = DEFAULT_TARGET


def sparsity_document(
    path: str | Path,
    request: PredictionRequest | None = None,
    threshold: float = DEFAULT_MAX_ZERO_SHARE,
    epoch: int | None = None,
) -> dict:
    """Build the ``sparsity/1`` document of a run directory, a ``metrics.jsonl``, or a dataset.

    A run directory or log gives the observed figures, and the prediction too when its ``run.json``
    config (or ``request.config_path``) names a readable dataset: a failed prediction is then a
    warning. A dataset (manifest ``.csv`` or trainer ``.toml`` config) gives the prediction only, and
    ``components`` is empty. ``epoch`` restricts the observed figures to that epoch's steps.
    ``request=None`` skips the prediction.
    """
    path = Path(path)
    if _is_dataset_input(path):
        if request is None:
            raise InputError(f"{path}: a dataset has no step log; it can only be predicted from")
        predicted = predict_from_dataset(path, request, threshold)
        observed = {"components": {}, "epochs": [], "starved": [], "skipped_steps": None}
        return _document(path, observed, predicted, threshold, None)

    if path.is_file() and path.suffix.lower() != ".jsonl":
        raise InputError(
            f"{path}: expected a run directory, a metrics.jsonl, a manifest .csv or a trainer .toml config"
        )
    log = read_step_log(path)
    records = log.records
    if epoch is not None:
        records = [record for record in records if record["epoch"] == epoch]
        if not records:
            known = sorted({record["epoch"] for record in log.records})
            raise InputError(f"{log.path}: no step records of epoch {epoch} (epochs: {', '.join(map(str, known))})")
    observed = observed_sparsity(records, threshold)
    predicted = None
    if request is not None:
        predicted = _predict_for_run(log.path.parent, request, threshold)
    document = _document(path, observed, predicted, threshold, log.truncated_line)
    if epoch is not None:
        document["epoch"] = epoch
    return document


def _document(path: Path, observed: dict, predicted: dict | None, threshold: float, truncated_line: int | None) -> dict:
    return {
        "schema": SPARSITY_SCHEMA,
        "source": str(path),
        "components": observed["components"],
        "predicted": predicted,
        "threshold": threshold,
        "starved": observed["starved"],
        "epochs": observed["epochs"],
        "skipped_steps": observed["skipped_steps"],
        "truncated_line": truncated_line,
    }


def _is_dataset_input(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".toml")


def predict_from_dataset(path: Path, request: PredictionRequest, threshold: float) -> dict:
    """Predict from a manifest CSV (with ``request.config_path`` for the trainer settings) or a TOML config."""
    from trainer.config import TrainerError, load_config

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    config_path = path if path.suffix.lower() == ".toml" else request.config_path
    overrides = list(request.overrides)
    if path.suffix.lower() == ".csv":
        overrides.append(f"data.manifest={json.dumps(str(path))}")
    try:
        config = load_config(config_path, overrides)
    except TrainerError as error:
        raise InputError(str(error)) from None

    batch_size = request.batch_size
    if batch_size is None:
        if config_path is None:
            raise InputError(f"{path}: give --batch-size (or --config, whose optim.batch_size is used)")
        batch_size = config.optim.batch_size
    return _predict(config, batch_size, request, threshold)


def _predict_for_run(run_dir: Path, request: PredictionRequest, threshold: float) -> dict | None:
    """Predict for the run's own config and dataset; warn and return None when that is impossible.

    An invalid ``--config`` is an input error, because the user asked for it.
    """
    from trainer.config import TrainerError, config_from_dict, load_config

    explicit = None
    if request.config_path is not None:
        try:
            explicit = load_config(request.config_path, request.overrides)
        except TrainerError as error:
            raise InputError(str(error)) from None
    try:
        if explicit is not None:
            config = explicit
        else:
            config = config_from_dict(_run_config(run_dir), source=str(run_dir / "run.json"))
            if request.overrides:
                warnings.warn("--set applies to --config or a dataset; the run's own config is used as is", stacklevel=2)
        batch_size = request.batch_size or config.optim.batch_size
        predicted = _predict(config, batch_size, request, threshold)
    except (InputError, TrainerError) as error:
        warnings.warn(f"no prediction: {error}", stacklevel=2)
        return None

    recorded = _run_fingerprint(run_dir)
    if recorded is not None and recorded != predicted["dataset"]["fingerprint"]:
        warnings.warn(
            f"{predicted['dataset']['manifest']}: the dataset changed since the run was written "
            "(fingerprint differs from run.json), so the prediction may not match the run",
            stacklevel=2,
        )
    return predicted


def _run_config(run_dir: Path) -> dict:
    info_path = run_dir / "run.json"
    if not info_path.is_file():
        raise InputError(f"{run_dir}: no run.json with the run's config")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{info_path}: not a readable JSON file ({error})") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise InputError(f"{info_path}: has no 'config' table")
    return info["config"]


def _run_fingerprint(run_dir: Path) -> str | None:
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return info.get("dataset_fingerprint") if isinstance(info, dict) else None


def _predict(config, batch_size: int, request: PredictionRequest, threshold: float) -> dict:
    split = load_train_split(config.data)
    sampler_name = request.sampler or config.data.sampler
    sampler = SamplerSettings(sampler_name, config.data.min_multi_panel_pages, config.data.min_text_panels)
    return predict_sparsity(
        split, batch_size, sampler=sampler, method=request.method, epochs=request.epochs, seed=request.seed,
        target=request.target, threshold=threshold,
    )

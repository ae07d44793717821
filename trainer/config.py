"""Training configuration: dataclasses, TOML loading, ``--set`` overrides and presets.

A config file is TOML with the sections ``[data]``, ``[model]``, ``[objectives]`` (with
``[objectives.weights]``) and ``[optim]`` plus the top-level keys ``seed``, ``device`` and ``preset``.
A file may start from another one with ``extends = "other.toml"``, and its own keys then win.

Paths inside a file are relative to that file. Paths given with ``--set`` or left at their default
are relative to the working directory. ``load_config`` makes them all absolute.

The ``legacy`` preset reproduces the historical training script:

- objectives in train mode during validation, and an unseeded validation mask,
- an undetached reconstruction target,
- one-directional alignment (image to text only),
- gradient clipping over the model's parameters only.

A preset only changes defaults. A key set explicitly in the file or with ``--set`` wins over it, so
``preset = "legacy"`` with ``objectives.symmetric_alignment = true`` measures one fix at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Largest seed accepted. NumPy, torch and Python's random all take it, and torch.Generator still takes
# it plus the small per-stream and per-rank offsets that the loop adds (torch accepts up to 2**64 - 1).
MAX_SEED = 2**63 - 1


class TrainerError(Exception):
    """Bad input for the trainer: the message is one line naming the file or key and the problem."""

    # Exit status of the ``trainer`` command for this error.
    exit_code = 2


class ConfigError(TrainerError):
    """Invalid configuration file, key or value."""


@dataclass
class DataConfig:
    manifest: str = "fixtures/comics/manifest.csv"
    # Page-type labels; a relative path is read next to the manifest.
    labels: str = "labels.json"
    # An empty list keeps every page, labelled or not.
    page_types: list[str] = field(default_factory=lambda: ["narrative", "story"])
    max_panels: int = 8
    val_fraction: float = 0.2
    # Seed of the train/validation split only, so the split stays fixed while the training seed varies.
    seed: int = 0
    # Frozen-backbone feature cache; None means <run dir>/cache.
    cache_dir: str | None = None
    # False runs frozen backbones on every step instead of once per panel (for benchmarks).
    cache_features: bool = True
    # MiB of decoded page images kept per process. Panel crops are cut from them on demand.
    image_cache_mb: int = 1024
    # Processes that build batches: None picks 4 (at most) when a batch needs image preprocessing on
    # CUDA, else 0 (batches are built in the training process).
    num_workers: int | None = None
    # "random": shuffled pages cut into batches. "balanced": every batch gets at least the minimums
    # below where the train split allows it (trainer.sampler).
    sampler: str = "random"
    # Pages with at least 2 panels per batch (the contrastive and reconstruction terms need one).
    min_multi_panel_pages: int = 2
    # Panels with text per batch (the alignment term needs 2).
    min_text_panels: int = 2


@dataclass
class ModelConfig:
    vision_backbone: str = "tiny_cnn"
    text_backbone: str = "hashed_bow"
    # None keeps the backbone's own default (pretrained encoders are frozen, small ones are trained).
    vision_frozen: bool | None = None
    text_frozen: bool | None = None
    pretrained: bool = True
    dim: int = 128
    projection_hidden: int = 256
    layout_hidden: int = 64
    dropout: float = 0.1
    # Compile the projections, the fusion and a trainable vision backbone with torch.compile.
    compile: bool = False


@dataclass
class LossWeights:
    contrastive: float = 1.0
    reconstruction: float = 0.5
    alignment: float = 0.3


@dataclass
class ObjectivesConfig:
    weights: LossWeights = field(default_factory=LossWeights)
    temperature: float = 0.07
    # None uses `temperature` for alignment too.
    alignment_temperature: float | None = None
    reconstruction_hidden: int = 256
    reconstruction_dropout: float = 0.1
    detach_target: bool = True
    detach_context: bool = False
    symmetric_alignment: bool = True
    eval_in_validation: bool = True
    seeded_validation_mask: bool = True
    # Under torchrun, compute the objectives over the embeddings of every rank's pages, so that
    # negatives come from the whole global batch (trainer.distributed).
    gather: bool = False
    # Every K optimiser steps, log each weighted component's gradient norm on the model's parameters
    # (one extra backward pass per component); 0 turns the probe off.
    grad_probe_every: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 5
    # Pages per batch: every panel of a page lands in the same batch.
    batch_size: int = 8
    # Maximum global gradient norm; 0 disables clipping.
    grad_clip: float = 1.0
    clip_all_params: bool = True
    warmup_fraction: float = 0.05
    # The cosine schedule decays to lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # A step with a non-finite loss or gradient is skipped, and this many in a row stop the run.
    max_bad_steps_in_a_row: int = 5


@dataclass
class CheckpointConfig:
    # Epoch checkpoints (checkpoints/epoch_NNNN.pt) kept on disk: the newest keep_last, or all with 0.
    # last.pt and best.pt are separate links or copies, so they are kept either way.
    keep_last: int = 0


@dataclass
class DebugConfig:
    """Fault injection for tests of the step guard; leave unset in real runs."""

    # Make the loss (nan_in = "loss") or one gradient (nan_in = "gradient") NaN at optimiser steps
    # nan_at_step .. nan_at_step + nan_steps - 1, counted from 1 as in metrics.jsonl.
    nan_at_step: int | None = None
    nan_steps: int = 1
    nan_in: str = "loss"


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0
    # "auto" picks CUDA when torch detects a GPU, else CPU; "cpu", "cuda" and "cuda:N" force a device.
    device: str = "auto"
    preset: str = "default"


# Defaults that each preset changes, as dotted keys.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "legacy": {
        "objectives.eval_in_validation": False,
        "objectives.seeded_validation_mask": False,
        "objectives.detach_target": False,
        "objectives.symmetric_alignment": False,
        "optim.clip_all_params": False,
    },
}

# Batch samplers of the train split (data.sampler).
SAMPLERS = ("random", "balanced")

# Keys holding file paths, resolved against the config file's folder.
PATH_KEYS = ("data.manifest", "data.cache_dir")


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> TrainConfig:
    """Build the config from an optional TOML file and ``key=value`` overrides, then validate it."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_toml_tree(Path(path), chain=())
    # Errors in a key given with --set name --set, not the file.
    key_sources: dict[str, str] = {}
    for override in overrides:
        key, value = parse_override(override)
        _set_dotted(tree, key, value, source="--set")
        key_sources[key] = "--set"
    config = config_from_dict(tree, source=str(path) if path is not None else "--set", key_sources=key_sources)

    # Absolute paths keep run.json and checkpoints usable from another working directory.
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value:
            setattr(getattr(config, section), name, os.path.abspath(value))
    return config


def config_from_dict(
    tree: dict[str, Any], source: str = "config", key_sources: dict[str, str] | None = None
) -> TrainConfig:
    """Build and validate a config from a nested dict (a parsed file, or ``config_to_dict`` output).

    ``key_sources`` names, for some dotted keys, where their value came from, in place of ``source``.
    """
    key_sources = key_sources or {}
    preset = tree.get("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"{source}: unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")

    config = TrainConfig()
    for key, value in PRESETS[preset].items():
        _assign(config, key, value, source=f"preset {preset}")
    for key, value in _flatten(tree, source=source):
        _assign(config, key, value, source=key_sources.get(key, source))

    validate_config(config, source=source, key_sources=key_sources)
    return config


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Return the config as nested plain values (safe for JSON and ``torch.load(weights_only=True)``)."""
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as a TOML literal, or kept as a string if it is not one."""
    key, separator, raw = text.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, for example objectives.temperature=0.1")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _read_toml_tree(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError(f"{path}: 'extends' loops back to a file that is already being read")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read config file ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML ({error})") from None

    folder = resolved.parent
    for key in PATH_KEYS:
        value = _get_dotted(tree, key)
        if isinstance(value, str) and value:
            _set_dotted(tree, key, os.path.normpath(folder / value), source=str(path))

    base_name = tree.pop("extends", None)
    if base_name is None:
        return tree
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: 'extends' must be a path string, got {base_name!r}")
    base = _read_toml_tree(folder / base_name, chain=chain + (resolved,))
    return _merge(base, tree)


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _flatten(tree: dict[str, Any], source: str, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict):
            if _is_section(key):
                items.extend(_flatten(value, source, prefix=f"{key}."))
                continue
            if _field_hint(key, source) is not None:
                raise ConfigError(f"{source}: {key} is a value, not a table")
        items.append((key, value))
    return items


def _get_dotted(tree: dict[str, Any], key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set_dotted(tree: dict[str, Any], key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = tree
    for index, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[: index + 1])} is a value, not a table")
        node = child
    node[parts[-1]] = value


# --------------------------------------------------------------------------------------------------
# Typed assignment


def _is_section(key: str) -> bool:
    node: Any = TrainConfig()
    for part in key.split("."):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return dataclasses.is_dataclass(node)


def _field_hint(key: str, source: str) -> Any:
    """Return the type hint of a leaf key, or None for a section; raise ConfigError for an unknown key."""
    node_type: Any = TrainConfig
    parts = key.split(".")
    for index, part in enumerate(parts):
        hints = typing.get_type_hints(node_type)
        if part not in hints:
            where = ".".join(parts[:index]) or "the top level"
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{source}: unknown config key {key!r} (valid keys in {where}: {known})")
        node_type = hints[part]
        if not dataclasses.is_dataclass(node_type) and index < len(parts) - 1:
            raise ConfigError(f"{source}: unknown config key {key!r} ({'.'.join(parts[: index + 1])} is a value)")
    return None if dataclasses.is_dataclass(node_type) else node_type


def _assign(config: TrainConfig, key: str, value: Any, source: str) -> None:
    hint = _field_hint(key, source)
    if hint is None:
        raise ConfigError(f"{source}: {key} is a table; set one of its keys, for example {key}.<name>=VALUE")
    parts = key.split(".")
    node: Any = config
    for part in parts[:-1]:
        node = getattr(node, part)
    setattr(node, parts[-1], _coerce(key, value, hint, source))


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = next(arg for arg in args if arg is not type(None))

    def invalid(expected: str) -> ConfigError:
        return ConfigError(f"{source}: invalid value for {key}: expected {expected}, got {value!r}")

    if hint is bool:
        if not isinstance(value, bool):
            raise invalid("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise invalid("a string")
        return value
    if typing.get_origin(hint) is list:
        # "--set data.page_types=narrative,story" arrives as one string.
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise invalid("a list of strings")
        return list(value)
    raise AssertionError(f"unhandled config type {hint!r} for {key}")


# --------------------------------------------------------------------------------------------------
# Validation


def validate_config(config: TrainConfig, source: str = "config", key_sources: dict[str, str] | None = None) -> None:
    """Raise ConfigError naming the first key whose value is out of range."""
    checks: list[tuple[str, bool, str]] = [
        ("data.manifest", bool(config.data.manifest), "a path to the manifest CSV"),
        ("data.max_panels", config.data.max_panels >= 1, "at least 1"),
        ("data.val_fraction", 0.0 < config.data.val_fraction < 1.0, "between 0 and 1 (exclusive)"),
        ("data.sampler", config.data.sampler in SAMPLERS, " or ".join(SAMPLERS)),
        ("data.min_multi_panel_pages", config.data.min_multi_panel_pages >= 0, "zero or more"),
        ("data.min_text_panels", config.data.min_text_panels >= 0, "zero or more"),
        ("model.dim", config.model.dim >= 1, "at least 1"),
        ("model.projection_hidden", config.model.projection_hidden >= 1, "at least 1"),
        ("model.layout_hidden", config.model.layout_hidden >= 1, "at least 1"),
        ("model.dropout", 0.0 <= config.model.dropout < 1.0, "in [0, 1)"),
        ("objectives.temperature", _positive(config.objectives.temperature), "a positive number"),
        ("objectives.reconstruction_hidden", config.objectives.reconstruction_hidden >= 1, "at least 1"),
        ("objectives.reconstruction_dropout", 0.0 <= config.objectives.reconstruction_dropout < 1.0, "in [0, 1)"),
        ("objectives.grad_probe_every", config.objectives.grad_probe_every >= 0, "zero (off) or more steps"),
        ("optim.lr", _positive(config.optim.lr), "a positive number"),
        ("optim.weight_decay", config.optim.weight_decay >= 0.0, "zero or more"),
        ("optim.epochs", config.optim.epochs >= 1, "at least 1"),
        ("optim.batch_size", config.optim.batch_size >= 1, "at least 1 page"),
        ("optim.grad_clip", config.optim.grad_clip >= 0.0 and math.isfinite(config.optim.grad_clip), "zero or more"),
        ("optim.warmup_fraction", 0.0 <= config.optim.warmup_fraction < 1.0, "in [0, 1)"),
        ("optim.min_lr_ratio", 0.0 <= config.optim.min_lr_ratio <= 1.0, "in [0, 1]"),
        ("optim.max_bad_steps_in_a_row", config.optim.max_bad_steps_in_a_row >= 1, "at least 1"),
        ("data.num_workers", config.data.num_workers is None or config.data.num_workers >= 0, "zero or more"),
        ("data.image_cache_mb", config.data.image_cache_mb >= 0, "zero or more MiB"),
        ("checkpoints.keep_last", config.checkpoints.keep_last >= 0, "zero (keep all) or more epochs"),
        ("debug.nan_at_step", config.debug.nan_at_step is None or config.debug.nan_at_step >= 1, "at least 1"),
        ("debug.nan_steps", config.debug.nan_steps >= 1, "at least 1"),
        ("debug.nan_in", config.debug.nan_in in ("loss", "gradient"), "loss or gradient"),
        ("device", _valid_device(config.device), "auto, cpu, cuda or cuda:N"),
        ("seed", 0 <= config.seed <= MAX_SEED, f"an integer from 0 to {MAX_SEED} (2**63 - 1)"),
        ("data.seed", 0 <= config.data.seed <= MAX_SEED, f"an integer from 0 to {MAX_SEED} (2**63 - 1)"),
    ]
    if config.objectives.alignment_temperature is not None:
        checks.append(
            ("objectives.alignment_temperature", _positive(config.objectives.alignment_temperature),
             "a positive number")
        )
    for name in ("contrastive", "reconstruction", "alignment"):
        weight = getattr(config.objectives.weights, name)
        checks.append((f"objectives.weights.{name}", weight >= 0.0 and math.isfinite(weight), "zero or more"))

    for key, passed, expected in checks:
        if not passed:
            value = _get_value(config, key)
            origin = (key_sources or {}).get(key, source)
            raise ConfigError(f"{origin}: invalid value for {key}: expected {expected}, got {value!r}")


def _positive(value: float) -> bool:
    return value > 0.0 and math.isfinite(value)


def _valid_device(device: str) -> bool:
    if device in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _get_value(config: TrainConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


# --------------------------------------------------------------------------------------------------
# Rendering


def config_to_toml(config: TrainConfig) -> str:
    """Render the resolved config as TOML that ``load_config`` reads back (unset values become comments)."""
    lines: list[str] = []
    tree = config_to_dict(config)
    scalars = {key: value for key, value in tree.items() if not isinstance(value, dict)}
    lines.extend(_toml_lines(scalars))
    _append_tables(lines, tree, prefix="")
    return "\n".join(lines) + "\n"


def _append_tables(lines: list[str], tree: dict[str, Any], prefix: str) -> None:
    for name, value in tree.items():
        if not isinstance(value, dict):
            continue
        table = f"{prefix}{name}"
        scalars = {key: item for key, item in value.items() if not isinstance(item, dict)}
        lines.append("")
        lines.append(f"[{table}]")
        lines.extend(_toml_lines(scalars))
        _append_tables(lines, value, prefix=f"{table}.")


def _toml_lines(values: dict[str, Any]) -> list[str]:
    lines = []
    for key, value in values.items():
        if value is None:
            lines.append(f"# {key} is unset")
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise AssertionError(f"unhandled TOML value {value!r}")

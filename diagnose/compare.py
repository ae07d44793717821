"""``diagnose compare``: two runs side by side, epoch by epoch, with the change from run A to run B.

Epochs are matched by number. An epoch that only one run has keeps its figures on that side, and its
other side and delta are null. Every delta is B - A. The document also compares the last epoch of A with
the last epoch of B, whatever their numbers, because runs of different lengths end at different epochs.
The best epochs are compared the same way. When neither input is a run directory (two embedding files
or checkpoints), their single epochs are compared directly.
"""

from __future__ import annotations

import json

from diagnose.report import (
    Markup,
    escape,
    figure_html,
    format_figure,
    generated_at,
    html_page,
    html_table,
    section,
    toolkit_version,
    verdict_badge,
)
from diagnose.run_summary import EpochSummary, RunSummary, epoch_table, key_metric_specs, key_metrics

COMPARE_SCHEMA = "compare/1"
RUN_COLORS = {"a": "#1f77b4", "b": "#ff7f0e"}


def compare_runs(a: RunSummary, b: RunSummary) -> dict:
    """Return the ``compare/1`` document of runs ``a`` and ``b``.

    ``epochs`` contains ``{"epoch", "present", "verdict": {"a", "b"}, "metrics": {name: {"a", "b", "delta"}}}``
    for every epoch of either run; ``present`` is ``"both"``, ``"a"`` or ``"b"``. ``last`` and ``best``
    compare the last (best) epoch of each run. ``metric_definitions`` gives each metric's label and
    whether higher (+1) or lower (-1) values are better.
    """
    components = _components(a) + [name for name in _components(b) if name not in _components(a)]
    specs = key_metric_specs(components)
    rows_a = {row["epoch"]: row for row in epoch_table(a)}
    rows_b = {row["epoch"]: row for row in epoch_table(b)}

    if not a.is_run and not b.is_run:
        # Two single embedding files: compare them whatever epoch their metadata names.
        row_a, row_b = next(iter(rows_a.values())), next(iter(rows_b.values()))
        epoch = row_a["epoch"] if row_a["epoch"] == row_b["epoch"] else None
        entries = [_entry(epoch, row_a, row_b, specs)]
        entries[0]["epochs_compared"] = {"a": row_a["epoch"], "b": row_b["epoch"]}
    else:
        epochs = sorted(set(rows_a) | set(rows_b), key=lambda value: (value is None, value or 0))
        entries = [_entry(epoch, rows_a.get(epoch), rows_b.get(epoch), specs) for epoch in epochs]

    return {
        "schema": COMPARE_SCHEMA,
        "runs": [a.source, b.source],
        "epochs": entries,
        "last": _side_by_side(a, a.last, b, b.last, specs),
        "best": _side_by_side(a, a.epoch_summary(a.best_epoch), b, b.epoch_summary(b.best_epoch), specs,
                              epochs=(a.best_epoch, b.best_epoch)),
        "best_epoch": {"a": a.best_epoch, "b": b.best_epoch},
        "first_collapsed_epoch": {"a": a.first_collapsed_epoch() if a.is_run else None,
                                  "b": b.first_collapsed_epoch() if b.is_run else None},
        "config_differences": config_differences(a.run_info, b.run_info),
        "metric_definitions": {spec.name: {"label": spec.label, "better": spec.better} for spec in specs},
        "notes": {"a": list(a.notes), "b": list(b.notes)},
    }


def _components(summary: RunSummary) -> list[str]:
    return list(summary.log.components) if summary.log is not None else []


def _pair(value_a, value_b) -> dict:
    delta = value_b - value_a if value_a is not None and value_b is not None else None
    return {"a": value_a, "b": value_b, "delta": delta}


def _entry(epoch, row_a: dict | None, row_b: dict | None, specs) -> dict:
    if row_a and row_b:
        present = "both"
    else:
        present = "a" if row_a else "b"
    metrics = {
        spec.name: _pair(row_a["metrics"].get(spec.name) if row_a else None,
                         row_b["metrics"].get(spec.name) if row_b else None)
        for spec in specs
    }
    return {
        "epoch": epoch,
        "present": present,
        "verdict": {"a": row_a["verdict"] if row_a else None, "b": row_b["verdict"] if row_b else None},
        "metrics": metrics,
    }


def _side_by_side(a: RunSummary, entry_a: EpochSummary | None, b: RunSummary, entry_b: EpochSummary | None,
                  specs, epochs: tuple | None = None) -> dict:
    """Compare one epoch of each run; ``epochs`` names them when an epoch may lack embeddings."""
    if epochs is not None:
        epoch_a, epoch_b = epochs
    else:
        epoch_a = entry_a.epoch if entry_a else None
        epoch_b = entry_b.epoch if entry_b else None
    metrics_a = key_metrics(entry_a, a.losses(epoch_a))
    metrics_b = key_metrics(entry_b, b.losses(epoch_b))
    return {
        "epoch": {"a": epoch_a, "b": epoch_b},
        "verdict": {"a": entry_a.collapse["verdict"] if entry_a else None,
                    "b": entry_b.collapse["verdict"] if entry_b else None},
        "metrics": {spec.name: _pair(metrics_a.get(spec.name), metrics_b.get(spec.name)) for spec in specs},
    }


def config_differences(info_a: dict | None, info_b: dict | None) -> list[dict]:
    """Return ``[{"key", "a", "b"}]`` for every configuration value that differs between two run.json files."""
    if not info_a or not info_b:
        return []
    flat_a = _flatten(info_a.get("config") or {})
    flat_b = _flatten(info_b.get("config") or {})
    differences = []
    for key in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(key) != flat_b.get(key):
            differences.append({"key": key, "a": flat_a.get(key), "b": flat_b.get(key)})
    return differences


def _flatten(value, prefix: str = "") -> dict:
    if not isinstance(value, dict):
        return {prefix: value}
    flat = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def change_class(delta: float | None, better: int) -> str:
    """Return ``"better"``, ``"worse"`` or ``""`` for a delta of a metric whose better direction is ``better``."""
    if delta is None or better == 0 or abs(delta) < 1e-12:
        return ""
    return "better" if delta * better > 0 else "worse"


# --------------------------------------------------------------------------------------------------
# The comparison page


COMPARE_PANELS = (
    ("Effective rank (fused)", "effective rank", ["fused.effective_rank"]),
    ("std_l2 x sqrt(D) (fused)", "1 = spread, 0 = collapsed", ["fused.std_l2_ratio"]),
    ("Mean pairwise cosine (fused)", "mean cosine", ["fused.cosine_mean"]),
    ("Intra- (solid) and inter-page (dashed) cosine", "mean cosine", ["fused.intra_cosine", "fused.inter_cosine"]),
    ("Modality gap (vision-text)", "distance", ["vision-text.modality_gap"]),
    ("Recall@1: vision->text (solid), text->vision (dashed)", "recall",
     ["vision->text.recall@1", "text->vision.recall@1"]),
    ("Recall@5: vision->text (solid), text->vision (dashed)", "recall",
     ["vision->text.recall@5", "text->vision.recall@5"]),
    ("Loss: validation (solid), training (dashed)", "loss", ["loss.validation", "loss.train"]),
)
LINESTYLES = ("-", "--", ":", "-.")


def compare_panels(document: dict, labels: tuple[str, str]) -> list:
    """Return the overlaid trajectory panels: run A and run B in two colours, one line style per metric."""
    from diagnose.plots import Panel, Series

    entries = [entry for entry in document["epochs"] if entry["epoch"] is not None]
    epochs = [entry["epoch"] for entry in entries]
    definitions = document["metric_definitions"]

    def panel(title: str, ylabel: str, names: list[str], ylim=None) -> Panel:
        series = []
        for side, label in zip(("a", "b"), labels):
            for style, name in zip(LINESTYLES, names):
                values = [entry["metrics"][name][side] for entry in entries]
                series.append(Series(f"{label}: {definitions[name]['label']}", epochs, values,
                                     color=RUN_COLORS[side], linestyle=style))
        return Panel(title, ylabel, series, ylim=ylim)

    panels = []
    for title, ylabel, names in COMPARE_PANELS:
        ylim = (0.0, 1.02) if "recall" in names[0] else None
        panels.append(panel(title, ylabel, names, ylim))
    components = [name[: -len(".validation")] for name in definitions if name.endswith(".validation")
                  and name != "loss.validation"]
    for component in components:
        panels.append(panel(f"{component}: validation (solid), training (dashed)", "loss",
                            [f"{component}.validation", f"{component}.train"]))
    if components:
        zero_panel = Panel("Zero share of each component (steps with no signal)", "share of steps", [],
                           ylim=(-0.02, 1.02))
        for side, label in zip(("a", "b"), labels):
            for style, component in zip(LINESTYLES, components):
                values = [entry["metrics"][f"{component}.zero_share"][side] for entry in entries]
                zero_panel.series.append(Series(f"{label}: {component}", epochs, values, color=RUN_COLORS[side],
                                                linestyle=style))
        panels.append(zero_panel)
    return panels


def compare_html(document: dict, a: RunSummary, b: RunSummary) -> str:
    """Return the self-contained comparison page: overlaid trajectories and the tables of the document."""
    from diagnose import plots

    parts = [
        "<h1>Run comparison</h1>"
        f"<p class='meta'>A: {escape(a.source)}<br>B: {escape(b.source)}<br>generated {generated_at()} &middot; "
        f"collapse-toolkit {escape(toolkit_version())}. Every delta is B - A; green marks a change for the "
        "better, red for the worse.</p>",
        _verdicts_section(document),
    ]
    if (a.is_run or b.is_run) and any(entry["epoch"] is not None for entry in document["epochs"]):
        figure = plots.trajectory_figure(compare_panels(document, ("A", "B")))
        parts.append(section("Trajectories", figure_html(
            plots.png_data_uri(figure),
            "Per-epoch figures of run A (blue) and run B (orange). Retrieval is global-scope recall over panels "
            "that have text. Loss components are unweighted.",
            "overlaid trajectories")))
    definitions = document["metric_definitions"]
    parts.append(_side_by_side_section("Last epochs", document["last"], definitions))
    if document["best"]["epoch"]["a"] is not None or document["best"]["epoch"]["b"] is not None:
        parts.append(_side_by_side_section("Best epochs (lowest validation loss)", document["best"], definitions))
    parts.append(_epochs_section(document))
    if document["config_differences"]:
        rows = [[item["key"], _config_text(item["a"]), _config_text(item["b"])]
                for item in document["config_differences"]]
        parts.append(section("Configuration differences", html_table(["setting", "A", "B"], rows)))
    return html_page("Run comparison", "\n".join(parts))


def _verdicts_section(document: dict) -> str:
    rows = []
    for side in ("a", "b"):
        rows.append([
            side.upper(), Markup(verdict_badge(document["last"]["verdict"][side])),
            _epoch(document["last"]["epoch"][side]), _epoch(document["best_epoch"][side]),
            _epoch(document["first_collapsed_epoch"][side], "none"),
        ])
    headers = ["run", "verdict (last epoch)", "last epoch", "best epoch", "first collapsed epoch"]
    return section("Verdicts", html_table(headers, rows))


def _metric_rows(metrics: dict, definitions: dict) -> tuple[list[list], list[str]]:
    """Return table rows (label, A, B, delta) and row classes for the metrics measured on either side."""
    rows, classes = [], []
    for name, definition in definitions.items():
        values = metrics.get(name)
        if values is None or (values["a"] is None and values["b"] is None):
            continue
        rows.append([definition["label"], format_figure(values["a"]), format_figure(values["b"]),
                     Markup(f"<span class='delta'>{escape(signed(values['delta']))}</span>")])
        classes.append(change_class(values["delta"], definition["better"]))
    return rows, classes


def _side_by_side_section(title: str, comparison: dict, definitions: dict) -> str:
    epochs = comparison["epoch"]
    headers = ["figure", f"A ({_epoch(epochs['a'])})", f"B ({_epoch(epochs['b'])})", "B - A"]
    verdicts = comparison["verdict"]
    rows = [["verdict", Markup(verdict_badge(verdicts["a"])), Markup(verdict_badge(verdicts["b"])), ""]]
    classes = [""]
    metric_rows, metric_classes = _metric_rows(comparison["metrics"], definitions)
    return section(title, html_table(headers, rows + metric_rows, numeric_from=1, row_classes=classes + metric_classes))


def _epochs_section(document: dict) -> str:
    headers = ["epoch", "figure", "A", "B", "B - A"]
    rows, classes = [], []
    for entry in document["epochs"]:
        only = "" if entry["present"] == "both" else f" (only {entry['present'].upper()})"
        rows.append([_epoch(entry["epoch"]) + only, "verdict", Markup(verdict_badge(entry["verdict"]["a"])),
                     Markup(verdict_badge(entry["verdict"]["b"])), ""])
        classes.append("")
        metric_rows, metric_classes = _metric_rows(entry["metrics"], document["metric_definitions"])
        rows.extend([["", *row] for row in metric_rows])
        classes.extend(metric_classes)
    table = html_table(headers, rows, numeric_from=2, row_classes=classes)
    return section("Every epoch", f"<details><summary>every key figure of every epoch</summary>{table}</details>")


def _epoch(epoch, missing: str = "-") -> str:
    return f"epoch {epoch}" if epoch is not None else missing


def signed(value) -> str:
    """Format a delta with its sign ("+0.12", "-3.4"); "-" when it is missing."""
    if value is None:
        return "-"
    text = format_figure(value)
    return text if text.startswith("-") or value == 0 else f"+{text}"


def _config_text(value) -> str:
    return "(absent)" if value is None else json.dumps(value)

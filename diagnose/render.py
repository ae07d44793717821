"""Rich tables of the command documents. Rendering only: every figure comes from the document."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def format_number(value, digits: int = 4) -> str:
    """Format a figure for a table: four significant digits, "-" for missing values."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


VERDICT_STYLES = {
    "healthy": "green",
    "group_collapse": "yellow",
    "dimensional_collapse": "red",
    "complete_collapse": "bold red",
}


COLLAPSE_ROWS = [
    ("n", "rows (N)"),
    ("dim", "dimensions (D)"),
    ("effective_rank", "effective rank (RankMe)"),
    ("effective_rank_ratio", "  / min(N, D)"),
    ("effective_rank_cov", "effective rank, centred covariance"),
    ("participation_ratio", "participation ratio"),
    ("rank_99", "components for 99% variance"),
    ("dead_dims", "dead dimensions"),
    ("std_l2", "std of L2-normalised (std_l2)"),
    ("std_l2_ratio", "  x sqrt(D)"),
    ("cosine.mean", "cosine mean (exact)"),
    ("cosine.std", "cosine std"),
    ("cosine.p05", "cosine p05"),
    ("cosine.p50", "cosine p50"),
    ("cosine.p95", "cosine p95"),
    ("uniformity", "uniformity (log, lower is more uniform)"),
    ("groups.intra_cosine", "intra-page cosine"),
    ("groups.inter_cosine", "inter-page cosine"),
]


def _lookup(document: dict, dotted: str):
    value = document
    for key in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def verdict_text(verdict: str | None) -> str:
    if verdict is None:
        return "-"
    style = VERDICT_STYLES.get(verdict, "")
    return f"[{style}]{verdict}[/]" if style else verdict


def render_collapse(document: dict, console: Console) -> None:
    """Print the collapse table, the modality pairs, the trajectory and the verdict."""
    modalities = document.get("modalities") or {}
    epoch = document.get("epoch")
    title = f"Collapse: {document['source']}" + (f" (epoch {epoch})" if epoch is not None else "")
    if modalities:
        table = Table(title=title, title_justify="left")
        table.add_column("metric")
        for name in modalities:
            table.add_column(name, justify="right")
        for key, label in COLLAPSE_ROWS:
            table.add_row(label, *(format_number(_lookup(metrics, key)) for metrics in modalities.values()))
        table.add_row("verdict", *(verdict_text(metrics["verdict"]) for metrics in modalities.values()))
        console.print(table)

    for pair_name, pair in (document.get("pairs") or {}).items():
        console.print(
            f"{pair_name}: modality gap {format_number(pair['modality_gap'])}, "
            f"alignment {format_number(pair['alignment'])} over {pair['n']} panels with both"
        )

    weights = document.get("weights")
    if weights:
        _render_weights(weights, console)

    epochs = document.get("epochs")
    if epochs:
        _render_trajectory(epochs, console)
        first = document.get("first_collapsed_epoch")
        console.print(f"first collapsed epoch: {first if first is not None else 'none'}")

    if document.get("verdict") is not None:
        console.print(f"verdict: {verdict_text(document['verdict'])}")


GATE_REASON_COLUMN_MIN_WIDTH = 120


def render_gate(document: dict, console: Console) -> None:
    """Print one row per gate rule (value, bound, baseline, delta, result, reason) and the outcome.

    On consoles narrower than 120 columns the reasons are printed under the table, one line per failed
    rule, so that the metric paths stay readable.
    """
    from rich.markup import escape

    from diagnose.gate_reports import describe_bounds, describe_delta

    reason_column = console.width >= GATE_REASON_COLUMN_MIN_WIDTH
    table = Table(title="Gate", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("result", no_wrap=True, min_width=6)
    table.add_column("metric", overflow="fold", min_width=20)
    table.add_column("value", justify="right")
    table.add_column("bound")
    table.add_column("baseline", justify="right")
    table.add_column("delta", justify="right")
    if reason_column:
        table.add_column("reason", ratio=2)
    for result in document["rules"]:
        value = result["value"]
        metric = escape(result["metric"])
        if result.get("name"):
            metric = f"[bold]{escape(result['name'])}[/]\n{metric}"
        cells = [
            str(result["number"]),
            "[green]pass[/]" if result["passed"] else "[bold red]FAIL[/]",
            metric,
            escape(format_number(value) if not isinstance(value, str) else value),
            escape(describe_bounds(result)),
            format_number(result["baseline"]),
            describe_delta(result),
        ]
        if reason_column:
            cells.append(escape(result["reason"] or ""))
        table.add_row(*cells)
    console.print(table)

    failed = [result for result in document["rules"] if not result["passed"]]
    if not reason_column:
        for result in failed:
            label = f"rule {result['number']}" + (f" ({result['name']})" if result.get("name") else "")
            console.print(f"[bold red]FAIL[/] {escape(label)}: {escape(result['reason'] or 'failed')}")
    if failed:
        console.print(f"gate: [bold red]failed[/] ({len(failed)} of {len(document['rules'])} rules)")
    else:
        console.print(f"gate: [green]passed[/] ({len(document['rules'])} rules)")


def _render_trajectory(epochs: list[dict], console: Console) -> None:
    table = Table(title="Per-epoch trajectory (fused, or the first modality)", title_justify="left")
    for column in ("epoch", "effective rank", "ratio", "std_l2 x sqrt(D)", "cosine mean", "intra-page",
                   "inter-page", "modality gap", "verdict"):
        table.add_column(column, justify="right")
    for entry in epochs:
        modalities = entry["modalities"]
        name = "fused" if "fused" in modalities else next(iter(modalities))
        metrics = modalities[name]
        pair = (entry.get("pairs") or {}).get("vision-text") or {}
        table.add_row(
            str(entry["epoch"]),
            format_number(metrics["effective_rank"]),
            format_number(metrics["effective_rank_ratio"]),
            format_number(metrics["std_l2_ratio"]),
            format_number(metrics["cosine"]["mean"]),
            format_number(_lookup(metrics, "groups.intra_cosine")),
            format_number(_lookup(metrics, "groups.inter_cosine")),
            format_number(pair.get("modality_gap")),
            verdict_text(entry["verdict"]),
        )
    console.print(table)


def _render_weights(weights: dict, console: Console) -> None:
    table = Table(title=f"Weight-space diagnostics (epoch {weights.get('epoch')})", title_justify="left")
    for column in ("matrix", "shape", "effective rank", "ratio", "top singular share"):
        table.add_column(column, justify="right" if column != "matrix" else "left")
    for name, entry in weights["matrices"].items():
        table.add_row(
            name,
            "x".join(str(size) for size in entry["shape"]),
            format_number(entry["effective_rank"]),
            format_number(entry["effective_rank_ratio"]),
            format_number(entry.get("top_singular_share")),
        )
    console.print(table)

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


RETRIEVAL_ROWS = [
    ("n_queries", "queries"),
    ("gallery_size", "gallery size"),
    ("mrr", "MRR"),
    ("median_rank", "median rank"),
    ("mean_rank", "mean rank"),
    ("chance@1", "chance recall@1"),
    ("tied_queries", "queries with ties"),
]


def render_retrieval(document: dict, console: Console) -> None:
    """Print the retrieval table of the last epoch, the approximate-search figures and the trajectory."""
    columns = [
        (f"{direction} {scope}", metrics)
        for direction, entry in document["directions"].items()
        for scope, metrics in entry.items()
        if metrics is not None
    ]
    epoch = document.get("epoch")
    title = f"Retrieval: {document['source']}" + (f" (epoch {epoch})" if epoch is not None else "")
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name, _ in columns:
        table.add_column(name, justify="right")
    recall_keys = sorted({key for _, metrics in columns for key in metrics if key.startswith("recall@")},
                         key=lambda key: int(key.split("@")[1]))
    for key in recall_keys:
        table.add_row(key, *(format_number(metrics.get(key)) for _, metrics in columns))
    for key, label in RETRIEVAL_ROWS:
        table.add_row(label, *(format_number(metrics.get(key)) for _, metrics in columns))
    if any("censored" in metrics for _, metrics in columns):
        table.add_row("censored queries", *(format_number(metrics.get("censored")) for _, metrics in columns))
    console.print(table)

    for name, metrics in columns:
        losses = metrics.get("approx_recall_loss")
        if losses:
            figures = ", ".join(f"{key} {format_number(value)}" for key, value in losses.items())
            console.print(
                f"{name}: {metrics['index']} search lost {figures} of recall against exact search on "
                f"{metrics['approx_sample']} sampled queries, and its MRR is a lower bound."
            )
    excluded = (document.get("excluded") or {}).get("no_text")
    if excluded:
        console.print(f"left out {excluded} panels without text (has_text = 0) on both sides")
    note = (document.get("index") or {}).get("note")
    if note:
        console.print(f"note: {note}")

    epochs = document.get("epochs")
    if epochs:
        _render_retrieval_trajectory(epochs, console)


def _render_retrieval_trajectory(epochs: list[dict], console: Console) -> None:
    directions = list(epochs[-1]["directions"])
    table = Table(title="Per-epoch trajectory (global scope)", title_justify="left")
    table.add_column("epoch", justify="right")
    for direction in directions:
        for k in (1, 5, 10):
            table.add_column(f"{direction} R@{k}", justify="right")
    for entry in epochs:
        cells = []
        for direction in directions:
            metrics = (entry["directions"].get(direction) or {}).get("global") or {}
            cells.extend(format_number(metrics.get(f"recall@{k}")) for k in (1, 5, 10))
        table.add_row(str(entry["epoch"]), *cells)
    console.print(table)


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

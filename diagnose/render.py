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


def lookup(document: dict, dotted: str):
    """Return the value at a dotted path of nested dicts, or None when a key is missing."""
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


def collapse_course_text(first: int | None, healthy_since: int | None) -> str:
    """Describe the first collapsed epoch, and the recovery when the run ended healthy."""
    if first is None:
        return "none"
    if healthy_since is None:
        return str(first)
    return f"{first}, healthy again from epoch {healthy_since}"


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
            table.add_row(label, *(format_number(lookup(metrics, key)) for metrics in modalities.values()))
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
        course = collapse_course_text(document.get("first_collapsed_epoch"), document.get("healthy_since_epoch"))
        console.print(f"first collapsed epoch: {course}")

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
    for note in document.get("notes") or []:
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
            format_number(lookup(metrics, "groups.intra_cosine")),
            format_number(lookup(metrics, "groups.inter_cosine")),
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


def _signed(value) -> str:
    if value is None:
        return "-"
    text = format_number(value)
    return text if text.startswith("-") or value == 0 else f"+{text}"


def _delta_text(delta, better: int) -> str:
    """Format a signed delta in green for a change for the better and in red for one for the worse."""
    text = _signed(delta)
    if delta is None or better == 0 or abs(delta) < 1e-12:
        return text
    return f"[green]{text}[/]" if delta * better > 0 else f"[red]{text}[/]"


def render_report(document: dict, console: Console) -> None:
    """Print the verdict of a report and the key figures of its first, best and last epochs."""
    from rich.markup import escape

    from diagnose.run_summary import key_metric_specs

    rows = {row["epoch"]: row for row in document["epochs"]}
    chosen = {}
    if document["epochs"]:
        chosen.setdefault(document["epochs"][0]["epoch"], []).append("first")
    if document["best_epoch"] in rows:
        chosen.setdefault(document["best_epoch"], []).append("best")
    if document["last_epoch"] in rows:
        chosen.setdefault(document["last_epoch"], []).append("last")
    chosen = {epoch: roles for epoch, roles in sorted(chosen.items(), key=lambda item: (item[0] is None, item[0] or 0))}
    components = list(document["sparsity"] or {})

    table = Table(title=f"Report: {escape(document['source'])}", title_justify="left")
    table.add_column("figure")
    for epoch, roles in chosen.items():
        name = f"epoch {epoch}" if epoch is not None else "file"
        table.add_column(f"{name} ({', '.join(roles)})" if document["is_run"] else name, justify="right")
    table.add_row("verdict", *(verdict_text(rows[epoch]["verdict"]) for epoch in chosen))
    for spec in key_metric_specs(components):
        values = [rows[epoch]["metrics"].get(spec.name) for epoch in chosen]
        if any(value is not None for value in values):
            table.add_row(spec.label, *(format_number(value) for value in values))
    console.print(table)
    if document["is_run"]:
        course = collapse_course_text(document["first_collapsed_epoch"], document.get("healthy_since_epoch"))
        best = document["best_epoch"]
        best_text = f"{best} ({document['best_epoch_reason']})" if best is not None else "unknown"
        console.print(f"best epoch: {best_text}; first collapsed epoch: {course}")
    console.print(f"verdict: {verdict_text(document['verdict'])}")


def render_compare(document: dict, console: Console, *, last_only: bool = False) -> None:
    """Print the last epochs of two runs side by side and, unless ``last_only``, every epoch, with B - A."""
    from rich.markup import escape

    definitions = document["metric_definitions"]
    run_a, run_b = (escape(run) for run in document["runs"])
    console.print(f"A: {run_a}\nB: {run_b}")

    last = document["last"]
    epochs = last["epoch"]
    table = Table(title="Last epochs", title_justify="left")
    table.add_column("figure")
    table.add_column(f"A (epoch {epochs['a']})", justify="right")
    table.add_column(f"B (epoch {epochs['b']})", justify="right")
    table.add_column("B - A", justify="right")
    table.add_row("verdict", verdict_text(last["verdict"]["a"]), verdict_text(last["verdict"]["b"]), "")
    _add_compare_rows(table, last["metrics"], definitions)
    console.print(table)

    if not last_only:
        table = Table(title="Every epoch (B - A)", title_justify="left")
        for column in ("epoch", "figure", "A", "B", "B - A"):
            table.add_column(column, justify="left" if column in ("epoch", "figure") else "right")
        for entry in document["epochs"]:
            only = "" if entry["present"] == "both" else f" (only {entry['present'].upper()})"
            epoch = entry["epoch"] if entry["epoch"] is not None else "-"
            table.add_row(f"{epoch}{only}", "verdict", verdict_text(entry["verdict"]["a"]),
                          verdict_text(entry["verdict"]["b"]), "", end_section=False)
            _add_compare_rows(table, entry["metrics"], definitions, first_column="")
            table.add_section()
        console.print(table)

    best = document["best_epoch"]
    console.print(f"best epoch: A {best['a'] if best['a'] is not None else '-'}, "
                  f"B {best['b'] if best['b'] is not None else '-'}")


def _add_compare_rows(table: Table, metrics: dict, definitions: dict, first_column: str | None = None) -> None:
    for name, definition in definitions.items():
        values = metrics.get(name)
        if values is None or (values["a"] is None and values["b"] is None):
            continue
        cells = [definition["label"], format_number(values["a"]), format_number(values["b"]),
                 _delta_text(values["delta"], definition["better"])]
        table.add_row(*([first_column] if first_column is not None else []), *cells)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render_sparsity(document: dict, console: Console) -> None:
    """Print the observed sparsity table, observed against predicted, the per-epoch zero shares and
    the prediction's summary lines."""
    observed = document.get("components") or {}
    predicted = document.get("predicted")
    predicted_components = (predicted or {}).get("components") or {}
    threshold = document.get("threshold")

    if observed:
        table = Table(title=f"Loss-signal sparsity: {document['source']}", title_justify="left")
        for column in ("component", "steps", "zero share", "active min / median / p95 / max", "loss share", "status"):
            table.add_column(column, justify="right" if column in ("steps", "zero share", "loss share") else "left")
        for name, entry in observed.items():
            active = entry["active"]
            spread = " / ".join(format_number(active[key]) for key in ("min", "median", "p95", "max"))
            status = "[red]starved[/]" if entry.get("starved") else "ok"
            table.add_row(name, str(entry["steps"]), _percent(entry["zero_share"]), spread,
                          _percent(entry["weighted_share"]), status)
        console.print(table)
    if observed and predicted_components:
        table = Table(title="Observed and predicted", title_justify="left")
        for column in ("component", "zero share", "predicted", "mean active", "predicted active"):
            table.add_column(column, justify="left" if column == "component" else "right")
        for name, entry in observed.items():
            prediction = predicted_components.get(name)
            table.add_row(name, _percent(entry["zero_share"]), _predicted_share(prediction),
                          format_number(entry["active"].get("mean")),
                          format_number(prediction["expected_active"] if prediction else None))
        console.print(table)
    if observed:
        _render_sparsity_epochs(document.get("epochs") or [], console)
    elif predicted_components:
        table = Table(title=f"Predicted loss-signal sparsity: {document['source']}", title_justify="left")
        for column in ("component", "zero share", "full batches", "last batch", "expected active", "status"):
            table.add_column(column, justify="left" if column in ("component", "status") else "right")
        for name, prediction in predicted_components.items():
            table.add_row(
                name, _predicted_share(prediction), _percent(prediction["zero_share_full_batch"]),
                _percent(prediction["zero_share_last_batch"]), format_number(prediction["expected_active"]),
                "[red]starved[/]" if prediction.get("starved") else "ok",
            )
        console.print(table)

    if predicted:
        _render_prediction_summary(predicted, console)
    if observed and threshold is not None:
        starved = document.get("starved") or []
        verdict = f"[red]starved[/]: {', '.join(starved)}" if starved else "no component starved"
        console.print(f"{verdict} (zero share above {_percent(threshold)})")
    if document.get("skipped_steps"):
        console.print(f"{document['skipped_steps']} steps were skipped by the trainer (non-finite loss or gradient)")


def _predicted_share(prediction: dict | None) -> str:
    if prediction is None:
        return "-"
    error = prediction.get("standard_error")
    if error is None:
        return _percent(prediction["zero_share"])
    return f"{_percent(prediction['zero_share'])} ± {_percent(error)}"


def _render_sparsity_epochs(epochs: list[dict], console: Console) -> None:
    if len(epochs) < 2:
        return
    names = list(dict.fromkeys(name for epoch in epochs for name in epoch["components"]))
    table = Table(title="Zero share per epoch", title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("steps", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for epoch in epochs:
        shares = [_percent((epoch["components"].get(name) or {}).get("zero_share")) for name in names]
        table.add_row(str(epoch["epoch"]), str(epoch["steps"]), *shares)
    console.print(table)


def _pages(count: int) -> str:
    return f"{count} page" if count == 1 else f"{count} pages"


def _render_prediction_summary(predicted: dict, console: Console) -> None:
    dataset = predicted["dataset"]
    method = predicted["method"]
    if predicted.get("simulation"):
        simulation = predicted["simulation"]
        method = f"simulation of {simulation['epochs']} epochs (seed {simulation['seed']}, ± one standard error)"
    console.print(
        f"prediction: {predicted['sampler']} sampler, {method}; batch size {predicted['batch_size']}, "
        f"{predicted['steps_per_epoch']} steps per epoch (last batch: {_pages(predicted['last_batch_pages'])}); "
        f"{dataset['train_pages']} train pages of {dataset['pages']} usable, "
        f"{dataset['multi_panel_pages']} with 2+ panels, {dataset['train_text_panels']} panels with text",
        markup=False, highlight=False,
    )
    search = predicted.get("min_batch_size") or {}
    if search:
        size = search.get("batch_size")
        found = str(size) if size is not None else f"none up to {search.get('searched_up_to')}"
        console.print(f"smallest batch size with every zero share under {_percent(search['target'])}: {found}",
                      markup=False, highlight=False)

"""The ``diagnose report`` page: one self-contained HTML file with the pictures of a run.

:func:`build_report` turns a :class:`~diagnose.run_summary.RunSummary` into HTML. The page shows the
verdict, the key figures of the first, best and last epochs, per-epoch trajectories, singular-value
spectra, pairwise-cosine histograms, 2-D maps coloured by page and by modality, the loss-signal sparsity
table and the pages whose panels lie closest together.

The page is self-contained: pictures are base64 PNG ``data:`` URIs, the CSS is inline, there is no
script and no address of any other host, so it opens offline and can be attached to a CI job. Every
string that comes from the data (page ids, paths, configuration values) is HTML-escaped. The HTML
helpers at the end of this module are shared with the ``diagnose compare`` page.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from diagnose.io import ArraySource, EmbeddingSet, load_embeddings
from diagnose.plots import MAX_LEGEND_PAGES
from diagnose.render import collapse_course_text, lookup
from diagnose.run_summary import (
    EpochSummary,
    ProgressCallback,
    RunSummary,
    epoch_table,
    key_metric_specs,
    key_metrics,
    loss_sparsity,
)

REPORT_SCHEMA = "report/1"
DEFAULT_MAP_POINTS = 3000
DEFAULT_HISTOGRAM_PAIRS = 20_000
TOP_PAGES = 10
READ_CHUNK_ROWS = 32_768


@dataclass
class ReportOptions:
    """Settings of the pictures: map method, sample sizes and the seed of every sample."""

    map_method: str = "auto"
    map_points: int = DEFAULT_MAP_POINTS
    histogram_pairs: int = DEFAULT_HISTOGRAM_PAIRS
    seed: int = 0


def chosen_epochs(summary: RunSummary) -> list[tuple[str, EpochSummary]]:
    """Return the first, best and last epochs that have embeddings, each once, labelled with its roles."""
    roles: dict[int, list[str]] = {}
    chosen: list[EpochSummary] = []
    candidates = [("first", summary.epochs[0]), ("best", summary.epoch_summary(summary.best_epoch)),
                  ("last", summary.last)]
    for role, entry in candidates:
        if entry is None:
            continue
        if id(entry) not in roles:
            roles[id(entry)] = []
            chosen.append(entry)
        roles[id(entry)].append(role)
    chosen.sort(key=summary.epochs.index)

    labelled = []
    for entry in chosen:
        name = f"epoch {entry.epoch}" if entry.epoch is not None else Path(entry.path).name
        if summary.is_run:
            name += f" ({', '.join(roles[id(entry)])})"
        labelled.append((name, entry))
    return labelled


# --------------------------------------------------------------------------------------------------
# Building the report


def build_report(summary: RunSummary, options: ReportOptions = ReportOptions(),
                 progress: ProgressCallback | None = None) -> tuple[str, dict]:
    """Draw the report of ``summary`` and return the HTML text and the ``report/1`` JSON document.

    Histograms and maps are drawn for the first, best and last epochs, whose embedding files are read
    again. The trajectories need only the summary.
    """
    from diagnose import plots

    chosen = chosen_epochs(summary)
    histograms: dict[str, list[tuple[str, np.ndarray]]] = {}
    maps = []
    top_pages = None
    without_text = 0
    for label, entry in chosen:
        embedding_set = load_embeddings(entry.path, epoch=entry.epoch)
        for name in embedding_set.modalities:
            sample = _pair_cosines(embedding_set, name, options.histogram_pairs, options.seed)
            histograms.setdefault(name, []).append((label, sample))
        maps.append(_epoch_map(label, entry, embedding_set, options, progress))
        if entry is summary.last:
            top_pages = closest_pages(embedding_set)
            without_text = panels_without_text(embedding_set)

    spectra = _spectrum_series(chosen)
    figures = {"trajectories": None, "spectrum": None, "histogram": None}
    if summary.is_run:
        figures["trajectories"] = plots.png_data_uri(
            plots.trajectory_figure(trajectory_panels(summary), marked_epochs=_marked_epochs(summary))
        )
    if spectra:
        figures["spectrum"] = plots.png_data_uri(plots.spectrum_figure(spectra))
    if histograms:
        figures["histogram"] = plots.png_data_uri(plots.cosine_histogram_figure(histograms))

    histogram_pairs = {name: int(len(samples[0][1])) for name, samples in histograms.items()}
    document = report_document(summary, maps, histogram_pairs)
    document["panels_without_text"] = without_text
    page = _report_page(summary, chosen, document, figures, maps, top_pages)
    return page, document


def report_document(summary: RunSummary, maps: list[dict], histogram_pairs: dict[str, int]) -> dict:
    """Return the ``report/1`` JSON document: the figures behind the pictures."""
    last = summary.last
    return {
        "schema": REPORT_SCHEMA,
        "source": summary.source,
        "is_run": summary.is_run,
        "verdict": last.collapse["verdict"],
        "last_epoch": last.epoch,
        "best_epoch": summary.best_epoch,
        "best_epoch_reason": summary.best_reason,
        "first_collapsed_epoch": summary.first_collapsed_epoch() if summary.is_run else None,
        "healthy_since_epoch": summary.healthy_since_epoch() if summary.is_run else None,
        "epochs": epoch_table(summary),
        "sparsity": loss_sparsity(summary.log) if summary.log is not None else None,
        "maps": [{key: value for key, value in entry.items() if key != "image"} for entry in maps],
        "histogram_pairs": histogram_pairs,
        "notes": list(summary.notes),
    }


def read_rows(source: ArraySource, rows: np.ndarray, chunk_rows: int = READ_CHUNK_ROWS) -> np.ndarray:
    """Read the given sorted, distinct ``rows`` of ``source`` chunk by chunk, as float64.

    Only chunks that contain a requested row are read, so memory is O(chunk x D + len(rows) x D).
    """
    out = np.empty((len(rows), source.dim), dtype=np.float64)
    filled = 0
    for start in range(0, source.rows, chunk_rows):
        stop = min(start + chunk_rows, source.rows)
        low, high = np.searchsorted(rows, [start, stop])
        if low == high:
            continue
        block = source.read(start, stop)
        out[filled: filled + high - low] = block[rows[low:high] - start]
        filled += high - low
    return out


def _candidate_rows(embedding_set: EmbeddingSet, name: str) -> np.ndarray:
    """Return the rows of modality ``name`` to draw from: for text, only panels that have text."""
    rows = embedding_set.sources[name].rows
    has_text = embedding_set.has_text
    if name == "text" and has_text is not None and len(has_text) == rows and np.count_nonzero(has_text) >= 2:
        return np.flatnonzero(has_text)
    return np.arange(rows)


def _pair_cosines(embedding_set: EmbeddingSet, name: str, max_pairs: int, seed: int) -> np.ndarray:
    """Return the cosines of a seeded sample of pairs of distinct panels of one modality."""
    from diagnose.plots import normalise_rows, sample_pairs

    candidates = _candidate_rows(embedding_set, name)
    first, second = sample_pairs(len(candidates), max_pairs, seed)
    needed = np.unique(np.concatenate([candidates[first], candidates[second]]))
    vectors = normalise_rows(read_rows(embedding_set.sources[name], needed))
    first_rows = np.searchsorted(needed, candidates[first])
    second_rows = np.searchsorted(needed, candidates[second])
    return np.einsum("ij,ij->i", vectors[first_rows], vectors[second_rows])


def panels_without_text(embedding_set: EmbeddingSet) -> int:
    """Count the panels whose ``has_text`` flag is 0 (0 without a text matrix or flags)."""
    has_text = embedding_set.has_text
    if "text" not in embedding_set.sources or has_text is None:
        return 0
    return int(len(has_text) - np.count_nonzero(has_text))


def _spectrum_series(chosen: list[tuple[str, EpochSummary]]) -> dict[str, list[tuple[str, list[float]]]]:
    spectra: dict[str, list[tuple[str, list[float]]]] = {}
    for label, entry in chosen:
        for name, metrics in entry.collapse["modalities"].items():
            values = metrics.get("singular_values")
            if values:
                spectra.setdefault(name, []).append((label, values))
    return spectra


def _marked_epochs(summary: RunSummary) -> dict[str, float]:
    marked = {}
    if summary.best_epoch is not None:
        marked["best"] = summary.best_epoch
    first_collapsed = summary.first_collapsed_epoch()
    if first_collapsed is not None:
        marked["first collapsed"] = first_collapsed
    return marked


def trajectory_panels(summary: RunSummary) -> list:
    """Return the per-epoch panels of the report: collapse, retrieval, losses and zero shares."""
    from diagnose.plots import MODALITY_COLORS, Panel, Series

    rows = epoch_table(summary)
    epochs = [row["epoch"] for row in rows]

    def series(metric: str, label: str, color=None, linestyle="-") -> Series:
        return Series(label, epochs, [row["metrics"].get(metric) for row in rows], color=color, linestyle=linestyle)

    modalities = [name for name in ("fused", "vision", "text") if name in summary.last.collapse["modalities"]]
    panels = [
        Panel("Effective rank (RankMe)", "effective rank",
              [series(f"{name}.effective_rank", name, MODALITY_COLORS[name]) for name in modalities]),
        Panel("Per-dimension spread: std_l2 x sqrt(D)", "1 = spread, 0 = collapsed",
              [series(f"{name}.std_l2_ratio", name, MODALITY_COLORS[name]) for name in modalities]),
        Panel("Mean pairwise cosine", "mean cosine",
              [series(f"{name}.cosine_mean", name, MODALITY_COLORS[name]) for name in modalities]),
        Panel("Intra- and inter-page cosine (fused)", "mean cosine",
              [series("fused.intra_cosine", "intra-page", "#d62728"),
               series("fused.inter_cosine", "inter-page", "#9467bd")]),
        Panel("Modality gap and alignment (vision-text)", "distance",
              [series("vision-text.modality_gap", "modality gap", "#8c564b"),
               series("vision-text.alignment", "alignment (mean squared distance)", "#e377c2")]),
        Panel("Retrieval recall, global scope", "recall", [
            series("vision->text.recall@1", "vision->text @1", "#1f77b4"),
            series("vision->text.recall@5", "vision->text @5", "#1f77b4", "--"),
            series("text->vision.recall@1", "text->vision @1", "#ff7f0e"),
            series("text->vision.recall@5", "text->vision @5", "#ff7f0e", "--"),
            series("vision->text.chance@1", "chance @1", "#7f7f7f", ":"),
        ], ylim=(0.0, 1.02)),
    ]
    if summary.log is not None:
        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
        loss_series = [series("loss.validation", "total, validation", "#000000"),
                       series("loss.train", "total, training", "#000000", "--")]
        zero_series = []
        for index, name in enumerate(summary.log.components):
            color = palette[index % len(palette)]
            loss_series.append(series(f"{name}.validation", f"{name}, validation", color))
            loss_series.append(series(f"{name}.train", f"{name}, training", color, "--"))
            zero_series.append(series(f"{name}.zero_share", name, color))
        panels.append(Panel("Loss: total (weighted) and components (unweighted)", "loss", loss_series))
        panels.append(Panel("Zero share: steps in which a component gave no signal", "share of steps",
                            zero_series, ylim=(-0.02, 1.02)))
    return panels


# --------------------------------------------------------------------------------------------------
# Maps and pages


def _epoch_map(label: str, entry: EpochSummary, embedding_set: EmbeddingSet, options: ReportOptions,
               progress: ProgressCallback | None) -> dict:
    """Compute and draw the two maps of one epoch; return the picture and how it was made."""
    from diagnose import plots

    generator = np.random.default_rng(options.seed)
    name = "fused" if "fused" in embedding_set.sources else embedding_set.modalities[0]
    total_rows = embedding_set.sources[name].rows
    rows = _sample_rows(total_rows, options.map_points, generator)
    page_index, page_names = _page_labels(embedding_set, name)
    epoch_text = f"epoch {entry.epoch}" if entry.epoch is not None else Path(entry.path).name
    by_page = plots.compute_map(read_rows(embedding_set.sources[name], rows), method=options.map_method,
                                seed=options.seed, label=epoch_text, progress=progress)

    by_modality = None
    modality_labels = None
    stacked = _modality_rows(embedding_set, rows, options, generator)
    if stacked is not None:
        stacked_matrix, modality_labels = stacked
        by_modality = plots.compute_map(stacked_matrix, method=options.map_method, seed=options.seed,
                                        label=f"{epoch_text}, all modalities", progress=progress)

    figure = plots.map_figure(by_page, page_index[rows], page_names, by_modality, modality_labels,
                              title=f"{label}: verdict {entry.collapse['verdict']}", modality=name)
    return {
        "label": label,
        "epoch": entry.epoch,
        "modality": name,
        "points": int(len(rows)),
        "rows": int(total_rows),
        "pages": int(len(np.unique(page_index[rows]))),
        "method": by_page.method,
        "fallback_reason": by_page.reason,
        "modality_points": int(len(modality_labels)) if modality_labels is not None else None,
        "modality_method": by_modality.method if by_modality is not None else None,
        "modality_fallback_reason": by_modality.reason if by_modality is not None else None,
        "image": plots.png_data_uri(figure),
    }


def _sample_rows(rows: int, limit: int, generator: np.random.Generator) -> np.ndarray:
    if rows <= limit:
        return np.arange(rows)
    return np.sort(generator.choice(rows, size=limit, replace=False))


def _page_labels(embedding_set: EmbeddingSet, name: str) -> tuple[np.ndarray, list[str]]:
    """Return a page index per row of modality ``name`` and the display name of every index."""
    rows = embedding_set.sources[name].rows
    pages = embedding_set.pages_for(name)
    if pages is None:
        return np.zeros(rows, dtype=np.int64), ["(no page labels)"]
    count = int(pages.max()) + 1 if len(pages) else 0
    page_ids = embedding_set.page_ids
    if page_ids is not None and len(page_ids) >= count:
        return pages, list(page_ids)
    return pages, [f"page {index}" for index in range(count)]


def _modality_rows(embedding_set: EmbeddingSet, fused_rows: np.ndarray, options: ReportOptions,
                   generator: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """Stack sampled rows of fused, vision and text (text only for panels that have it) for one map.

    Returns None when fewer than two modalities of one dimension exist.
    """
    sources = embedding_set.sources
    names = [name for name in ("fused", "vision", "text") if name in sources]
    if len(names) < 2 or len({sources[name].dim for name in names}) != 1:
        return None
    reference_rows = sources[names[0]].rows
    blocks, labels = [], []
    for name in names:
        source = sources[name]
        if source.rows == reference_rows:
            rows = fused_rows
        else:
            rows = _sample_rows(source.rows, options.map_points, generator)
        has_text = embedding_set.has_text
        if name == "text" and has_text is not None and len(has_text) == source.rows:
            rows = rows[has_text[rows]]
        blocks.append(read_rows(source, rows))
        labels.extend([name] * len(rows))
    return np.concatenate(blocks), np.array(labels)


def closest_pages(embedding_set: EmbeddingSet, limit: int = TOP_PAGES) -> dict | None:
    """Return the pages whose panels lie closest together: the highest mean intra-page cosine.

    A page whose panels all map to nearly one point is where group collapse starts. Pages with one
    panel have no pair and are left out. Returns None without page labels.
    """
    name = "fused" if "fused" in embedding_set.sources else embedding_set.modalities[0]
    pages = embedding_set.pages_for(name)
    if pages is None:
        return None
    from diagnose.plots import normalise_rows

    source = embedding_set.sources[name]
    _, page_names = _page_labels(embedding_set, name)
    distinct, inverse, counts = np.unique(pages, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    sums = np.zeros((len(distinct), source.dim))
    for start, block in source.chunks(READ_CHUNK_ROWS):
        np.add.at(sums, inverse[start: start + len(block)], normalise_rows(block))

    entries = []
    for index, page in enumerate(distinct.tolist()):
        count = int(counts[index])
        if count < 2:
            continue
        # Mean over ordered pairs i != j of the page: (||sum of its rows||^2 - n) / (n (n - 1)).
        intra = (float(sums[index] @ sums[index]) - count) / (count * (count - 1))
        entries.append({"page": page_names[page], "panels": count, "intra_cosine": intra})
    entries.sort(key=lambda entry: -entry["intra_cosine"])
    return {"modality": name, "pages": len(entries), "top": entries[:limit]}


# --------------------------------------------------------------------------------------------------
# The report page


def _report_page(summary: RunSummary, chosen: list[tuple[str, EpochSummary]], document: dict, figures: dict,
                 maps: list[dict], top_pages: dict | None) -> str:
    parts = [
        f"<h1>Collapse report</h1><p class='meta'>{escape(summary.source)} &middot; generated {generated_at()}"
        f" &middot; collapse-toolkit {escape(toolkit_version())}</p>",
        _summary_section(summary, document),
        _key_figures_section(summary, chosen),
    ]
    if figures["trajectories"]:
        parts.append(section("Per-epoch trajectories", figure_html(
            figures["trajectories"],
            "Collapse, retrieval and loss figures per epoch. The dotted vertical lines mark the best epoch and "
            "the first collapsed epoch. Retrieval is global-scope recall over panels that have text; "
            "'chance @1' is 1 / gallery size. Loss components are unweighted means over the epoch's steps "
            "(dashed) and the validation value (solid).",
            "trajectories")))
    if figures["spectrum"]:
        parts.append(section("Singular-value spectrum", figure_html(
            figures["spectrum"],
            "Singular values of the uncentred embedding matrix, divided by the largest, on a log scale. A flat "
            "spectrum uses many directions; a steep fall after a few values is dimensional collapse."
            + _without_text_note(document["panels_without_text"], "spectrum"),
            "spectrum")))
    if figures["histogram"]:
        pairs = ", ".join(f"{name}: {count:,}" for name, count in document["histogram_pairs"].items())
        parts.append(section("Pairwise cosine", figure_html(
            figures["histogram"],
            f"Cosine of pairs of distinct panels, from a seeded sample of pairs ({pairs} pairs per epoch). "
            "Mass piled near 1 means the vectors point the same way."
            + _without_text_note(document["panels_without_text"], "histogram"),
            "histogram")))
    parts.append(_maps_section(maps))
    if summary.log is not None:
        parts.append(_sparsity_section(document["sparsity"], summary.log.path))
    if top_pages is not None:
        parts.append(_pages_section(top_pages, summary.last))
    parts.append(_epochs_section(summary, document))
    if summary.run_info:
        parts.append(_run_info_section(summary.run_info))
    parts.append(_definitions_section())
    return html_page(f"Collapse report: {summary.source}", "\n".join(parts))


def _without_text_note(count: int, picture: str) -> str:
    if count == 0:
        return ""
    if picture == "spectrum":
        return (f" The text spectrum, like the text collapse figures, includes the {count:,} panels without text, "
                "whose text embedding carries no text.")
    return f" The text histogram leaves out the {count:,} panels without text."


def _summary_section(summary: RunSummary, document: dict) -> str:
    last = summary.last
    items = [
        ("verdict", Markup(verdict_badge(document["verdict"]))),
        ("epoch" if not summary.is_run else "last epoch", _epoch_text(last.epoch)),
        ("panels", f"{last.panels:,}"),
    ]
    if summary.is_run:
        first_collapsed = document["first_collapsed_epoch"]
        items.append(("epochs with embeddings", str(len(summary.epochs))))
        items.append(("best epoch", f"{_epoch_text(summary.best_epoch)} ({summary.best_reason})"
                      if summary.best_epoch is not None else "unknown (no validation loss and no best.pt)"))
        items.append(("first collapsed epoch", collapse_course_text(first_collapsed, document["healthy_since_epoch"])))
    rows = "".join(f"<tr><th>{escape(label)}</th><td>{cell(value)}</td></tr>" for label, value in items)
    notes = "".join(f"<li>{escape(note)}</li>" for note in summary.notes)
    body = f"<table class='summary'>{rows}</table>"
    if notes:
        body += f"<p><strong>Notes</strong></p><ul class='notes'>{notes}</ul>"
    return section("Verdict", body)


def _key_figures_section(summary: RunSummary, chosen: list[tuple[str, EpochSummary]]) -> str:
    components = summary.log.components if summary.log is not None else []
    columns = [(label, key_metrics(entry, summary.losses(entry.epoch))) for label, entry in chosen]
    headers = ["figure", *(label for label, _ in columns)]
    rows = [["verdict", *(Markup(verdict_badge(entry.collapse["verdict"])) for _, entry in chosen)]]
    for spec in key_metric_specs(components):
        values = [metrics.get(spec.name) for _, metrics in columns]
        if all(value is None for value in values):
            continue
        rows.append([spec.label, *(format_figure(value) for value in values)])
    return section("Key figures", html_table(headers, rows, numeric_from=1))


def _maps_section(maps: list[dict]) -> str:
    parts = []
    for entry in maps:
        caption = _map_caption(entry)
        parts.append(figure_html(entry["image"], caption, "map"))
    return section("2-D maps", "".join(parts))


def _map_caption(entry: dict) -> str:
    sampled = (f"a seeded sample of {entry['points']:,} of {entry['rows']:,} panels"
               if entry["points"] < entry["rows"] else f"all {entry['rows']:,} panels")
    text = (f"{entry['label']}. Left: {entry['method']} map of the {entry['modality']} embeddings of {sampled}, "
            "coloured by page")
    if entry["pages"] > MAX_LEGEND_PAGES:
        text += f" ({entry['pages']:,} pages share {MAX_LEGEND_PAGES} colours, so one colour marks several pages)"
    if entry["fallback_reason"]:
        text += f" (PCA fallback: {entry['fallback_reason']})"
    text += "."
    if entry["modality_method"] is not None:
        text += (f" Right: one {entry['modality_method']} map of fused, vision and text embeddings together "
                 f"({entry['modality_points']:,} points; text only for panels that have it), coloured by modality")
        if entry["modality_fallback_reason"]:
            text += f" (PCA fallback: {entry['modality_fallback_reason']})"
        text += ". Separate vision and text clouds are the modality gap."
    if entry["method"] == "UMAP":
        text += " UMAP uses the cosine metric and a fixed random_state; distances between clusters are not to scale."
    return text


def _sparsity_section(sparsity: dict, log_path: Path) -> str:
    headers = ["component", "steps", "zero share", "active min", "active median", "active p95", "active max",
               "share of weighted loss"]
    rows = []
    for name, entry in sparsity.items():
        active = entry["active"]
        rows.append([
            name, format_figure(entry["steps"]), _percent(entry["zero_share"]), format_figure(active["min"]),
            format_figure(active["median"]), format_figure(active["p95"]), format_figure(active["max"]),
            _percent(entry["weighted_share"]),
        ])
    caption = (
        f"From the step records of {escape(log_path.name)}. 'Zero share' is the share of optimiser steps in which "
        "the component had no contributing anchor, page or pair (active = 0), so it returned zero loss and no "
        "gradient. 'Active' counts contrastive anchors with a positive, reconstruction pages with at least two "
        "panels, and alignment panels with both an image and text."
    )
    return section("Loss-signal sparsity", html_table(headers, rows, numeric_from=1) + f"<p class='caption'>{caption}</p>")


def _pages_section(top_pages: dict, last: EpochSummary) -> str:
    headers = ["page", "panels", "intra-page cosine"]
    rows = [[entry["page"], str(entry["panels"]), format_figure(entry["intra_cosine"])] for entry in top_pages["top"]]
    caption = (f"The {len(rows)} of {top_pages['pages']} pages with two or more panels whose {top_pages['modality']} "
               f"embeddings lie closest together in {_epoch_text(last.epoch)} (mean cosine between the page's panels).")
    return section("Pages with the closest panels", html_table(headers, rows, numeric_from=1)
                   + f"<p class='caption'>{escape(caption)}</p>")


def _epochs_section(summary: RunSummary, document: dict) -> str:
    components = summary.log.components if summary.log is not None else []
    specs = [spec for spec in key_metric_specs(components)
             if any(row["metrics"].get(spec.name) is not None for row in document["epochs"])]
    epochs = document["epochs"]
    headers = ["figure", *(_epoch_text(row["epoch"]) for row in epochs)]
    rows = [["verdict", *(Markup(verdict_badge(row["verdict"])) for row in epochs)]]
    for spec in specs:
        rows.append([spec.label, *(format_figure(row["metrics"].get(spec.name)) for row in epochs)])
    return section("All epochs", "<details open><summary>every key figure per epoch</summary>"
                   f"<div class='wide'>{html_table(headers, rows, numeric_from=1)}</div></details>")


RUN_INFO_FIELDS = (
    ("created", "created"), ("device", "device"), ("seed", "seed"), ("config.preset", "preset"),
    ("config.model.vision_backbone", "vision backbone"), ("config.model.text_backbone", "text backbone"),
    ("config.model.dim", "embedding dimension"), ("config.objectives.weights", "loss weights"),
    ("config.objectives.temperature", "temperature"), ("config.objectives.detach_target", "detach target"),
    ("config.objectives.symmetric_alignment", "symmetric alignment"),
    ("config.objectives.eval_in_validation", "objectives in eval mode for validation"),
    ("config.optim.epochs", "epochs"), ("config.optim.lr", "learning rate"),
    ("config.optim.batch_size", "batch size"), ("dataset_fingerprint", "dataset fingerprint"),
)


def _run_info_section(info: dict) -> str:
    rows = []
    for path, label in RUN_INFO_FIELDS:
        value = lookup(info, path)
        if value is not None:
            rows.append([label, json.dumps(value) if isinstance(value, (dict, list, bool)) else str(value)])
    body = html_table(["setting", "value"], rows) if rows else ""
    body += ("<details><summary>run.json</summary><pre>"
             f"{escape(json.dumps(info, indent=2, default=str))}</pre></details>")
    return section("Run", body)


DEFINITIONS = (
    ("effective rank", "RankMe (Garrido et al., ICML 2023): exp of the entropy of the normalised singular values "
     "of the uncentred matrix; divided by min(N, D) for the ratio."),
    ("std_l2 x sqrt(D)", "mean per-dimension standard deviation of the L2-normalised vectors times sqrt(D): "
     "about 1 for vectors spread over the sphere, 0 when every vector is the same."),
    ("mean cosine", "mean cosine over all pairs of distinct panels (exact)."),
    ("intra- / inter-page cosine", "mean cosine of pairs of panels on the same page / on different pages."),
    ("modality gap", "distance between the means of the normalised vision and text embeddings (Liang et al., 2022); "
     "alignment is the mean squared distance between a panel's vision and text embeddings."),
    ("recall@K", "share of queries whose paired item ranks in the top K of the whole gallery; ties are counted "
     "as a random order. MRR is the mean reciprocal rank."),
    ("verdicts", "complete_collapse (std_l2 ratio < 0.1 or mean cosine > 0.95), dimensional_collapse "
     "(effective rank ratio < 0.1), group_collapse (intra-page cosine > 0.9), else healthy; default bounds."),
)


def _definitions_section() -> str:
    rows = "".join(f"<dt>{escape(term)}</dt><dd>{escape(text)}</dd>" for term, text in DEFINITIONS)
    return section("Definitions", f"<dl>{rows}</dl>")


def _epoch_text(epoch) -> str:
    return f"epoch {epoch}" if epoch is not None else "-"


def _percent(value) -> str:
    return "-" if value is None else f"{100.0 * value:.1f}%"


# --------------------------------------------------------------------------------------------------
# HTML helpers, shared with the comparison page


class Markup(str):
    """Text that is already HTML and is inserted without escaping."""


def escape(value) -> str:
    """HTML-escape a value's text, quotes included, for element content and attribute values."""
    return html.escape(str(value), quote=True)


def cell(value) -> str:
    return value if isinstance(value, Markup) else escape(value)


def format_figure(value) -> str:
    from diagnose.render import format_number

    return format_number(value)


VERDICT_CLASSES = {"healthy": "ok", "group_collapse": "warn", "dimensional_collapse": "bad",
                   "complete_collapse": "bad"}


def verdict_badge(verdict: str | None) -> str:
    if verdict is None:
        return "<span class='badge'>-</span>"
    return f"<span class='badge {VERDICT_CLASSES.get(verdict, '')}'>{escape(verdict)}</span>"


def html_table(headers: list[str], rows: list[list], *, numeric_from: int | None = None,
               row_classes: list[str] | None = None) -> str:
    """Return an HTML table; cells are escaped unless they are :class:`Markup`. Columns from index
    ``numeric_from`` on are right-aligned."""
    def aligned(index: int) -> str:
        return " class='num'" if numeric_from is not None and index >= numeric_from else ""

    head = "".join(f"<th{aligned(index)}>{cell(header)}</th>" for index, header in enumerate(headers))
    body = []
    for row_index, row in enumerate(rows):
        row_class = f" class='{escape(row_classes[row_index])}'" if row_classes and row_classes[row_index] else ""
        cells = "".join(f"<td{aligned(index)}>{cell(value)}</td>" for index, value in enumerate(row))
        body.append(f"<tr{row_class}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def figure_html(data_uri: str, caption: str, alt: str) -> str:
    """Return a ``<figure>`` holding a ``data:`` PNG and its escaped caption."""
    if not data_uri.startswith("data:image/png;base64,"):
        raise ValueError("figures must be embedded as data:image/png;base64 URIs")
    return (f"<figure><img src=\"{data_uri}\" alt=\"{escape(alt)}\">"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


PAGE_STYLE = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; color: #1d2125;
       background: #ffffff; margin: 0 auto; max-width: 1280px; padding: 16px 24px 48px; line-height: 1.45; }
h1 { font-size: 1.6em; margin: 0.2em 0; }
h2 { font-size: 1.2em; border-bottom: 1px solid #d9dde1; padding-bottom: 4px; margin-top: 1.8em; }
.meta { color: #5f6b76; font-size: 0.9em; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 0.86em; margin: 8px 0; }
th, td { border: 1px solid #d9dde1; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { white-space: nowrap; }
thead th { background: #f1f3f5; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
table.summary th { background: #f7f8f9; font-weight: 600; }
tr.better .delta { color: #1a7f37; font-weight: 600; } tr.worse .delta { color: #cf222e; font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; background: #e8eaed; font-weight: 600; }
.badge.ok { background: #dafbe1; color: #116329; } .badge.warn { background: #fff8c5; color: #7d4e00; }
.badge.bad { background: #ffebe9; color: #a40e26; }
figure { margin: 12px 0 20px; } figure img { max-width: 100%; height: auto; border: 1px solid #eceef0; }
figcaption, .caption { color: #4a545e; font-size: 0.86em; max-width: 1100px; }
.wide { overflow-x: auto; } pre { background: #f6f8fa; padding: 8px; overflow-x: auto; font-size: 0.8em; }
dt { font-weight: 600; margin-top: 6px; } dd { margin-left: 16px; color: #4a545e; font-size: 0.9em; }
ul.notes { color: #7d4e00; }
"""


def html_page(title: str, body: str) -> str:
    """Wrap ``body`` in a complete HTML document with the inline style sheet and no external resource."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def generated_at() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def toolkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("collapse-toolkit")
    except PackageNotFoundError:
        return "(not installed)"

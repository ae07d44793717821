"""Figures of the report and comparison pages, and the 2-D maps behind them.

Figures are built with matplotlib's object-oriented API (``matplotlib.figure.Figure``) and saved as PNG,
which matplotlib renders with its Agg backend. pyplot is never imported, so drawing a report opens no
window and leaves the caller's pyplot backend alone. matplotlib, umap-learn and scikit-learn are imported
inside the functions, so importing this module is cheap.

Nothing here prints: callers pass a ``progress`` callback to hear about slow steps.
"""

from __future__ import annotations

import base64
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# UMAP needs a k-nearest-neighbour graph; below this many points the map is drawn with PCA instead.
UMAP_MIN_POINTS = 30
UMAP_NEIGHBORS = 15
# Pages get distinct colours (and a legend) up to this count; beyond it colours repeat.
MAX_LEGEND_PAGES = 20
MODALITY_COLORS = {"fused": "#1f77b4", "vision": "#ff7f0e", "text": "#2ca02c"}
FIGURE_DPI = 100

ProgressCallback = Callable[[str], None]


@dataclass
class Series:
    """One line of a panel: y values over x (None and NaN leave a gap)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    color: str | None = None
    linestyle: str = "-"
    marker: str | None = "o"


@dataclass
class Panel:
    """One subplot of a trajectory figure."""

    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    logy: bool = False
    ylim: tuple[float, float] | None = None


@dataclass
class MapResult:
    """A 2-D layout of some embedding rows and how it was computed."""

    coordinates: np.ndarray
    method: str
    reason: str | None = None


def png_data_uri(figure) -> str:
    """Render ``figure`` to PNG and return it as a ``data:`` URI for an ``<img src>``.

    The PNG's ``Software`` text chunk, which matplotlib fills with its name and web address by default,
    is left out so that the file contains no external address at all.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def matplotlib_text(text: str) -> str:
    """Escape ``$`` so that matplotlib draws text from the data literally instead of as mathtext."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _as_float(values: Sequence[float | None]) -> np.ndarray:
    return np.array([math.nan if value is None else float(value) for value in values], dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Trajectories


def trajectory_figure(panels: list[Panel], *, marked_epochs: dict[str, float] | None = None, columns: int = 2):
    """Draw one subplot per panel, epochs on the x axis; ``marked_epochs`` adds labelled vertical lines."""
    rows = math.ceil(len(panels) / columns)
    figure = _figure(6.2 * columns, 3.0 * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, panel in enumerate(panels):
        axis = axes[index // columns][index % columns]
        _draw_panel(axis, panel, marked_epochs or {})
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    return figure


def _draw_panel(axis, panel: Panel, marked_epochs: dict[str, float]) -> None:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for series in panel.series:
        y = _as_float(series.y)
        if not np.isfinite(y).any():
            continue
        if panel.logy:
            y = np.where(y > 0, y, np.nan)
        axis.plot(list(series.x), y, label=matplotlib_text(series.label), color=series.color,
                  linestyle=series.linestyle, marker=series.marker, markersize=3.5, linewidth=1.5)
        drawn = True
    low, high = axis.get_xlim()
    for label, epoch in marked_epochs.items():
        axis.axvline(epoch, color="#888888", linestyle=":", linewidth=1)
        # Labels in the right half of the axis go to the left of their line, so they are not clipped.
        right_half = epoch > (low + high) / 2
        axis.annotate(label, xy=(epoch, 1.0), xycoords=("data", "axes fraction"), xytext=(-2 if right_half else 2, -10),
                      textcoords="offset points", fontsize=7, color="#666666", ha="right" if right_half else "left")
    axis.set_title(panel.title, fontsize=10, loc="left")
    axis.set_xlabel("epoch", fontsize=8)
    axis.set_ylabel(panel.ylabel, fontsize=8)
    axis.tick_params(labelsize=8)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(True, alpha=0.3)
    if panel.logy and drawn:
        axis.set_yscale("log")
    if panel.ylim is not None:
        axis.set_ylim(*panel.ylim)
    if drawn:
        entries = len(axis.get_legend_handles_labels()[1])
        if entries > 5:
            # A long legend inside the axes would hide lines, so it goes below them.
            axis.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False)
        else:
            axis.legend(fontsize=7, loc="best", framealpha=0.8)
    else:
        axis.text(0.5, 0.5, "no data", transform=axis.transAxes, ha="center", va="center", color="#999999")


# --------------------------------------------------------------------------------------------------
# Spectrum and cosine histogram


def spectrum_figure(spectra: dict[str, list[tuple[str, Sequence[float]]]]):
    """Plot singular-value spectra, one subplot per modality, one line per (label, singular values).

    Each spectrum is divided by its largest value, so epochs of different scale share one log axis. A
    collapsed representation shows as a steep drop after the first few values.
    """
    names = list(spectra)
    figure = _figure(4.2 * len(names), 3.4)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    for axis, name in zip(axes, names):
        for label, values in spectra[name]:
            values = np.asarray(values, dtype=np.float64)
            if values.size == 0 or not np.isfinite(values).all() or values.max() <= 0:
                continue
            normalised = values / values.max()
            # Singular values that are exactly zero cannot be drawn on a log axis.
            normalised = np.where(normalised > 0, normalised, np.nan)
            axis.plot(np.arange(1, values.size + 1), normalised, label=matplotlib_text(label), linewidth=1.5)
        axis.set_yscale("log")
        axis.set_title(f"{name}", fontsize=10, loc="left")
        axis.set_xlabel("index of singular value", fontsize=8)
        axis.set_ylabel("singular value / largest", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(True, which="both", alpha=0.25)
        axis.legend(fontsize=7)
    return figure


def sample_pairs(rows: int, max_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the row indices (i, j) of distinct pairs: every pair i < j when there are at most
    ``max_pairs``, else a seeded sample of ``max_pairs`` pairs drawn uniformly, with replacement, from the
    pairs i != j."""
    total_pairs = rows * (rows - 1) // 2
    if total_pairs <= max_pairs:
        return np.triu_indices(rows, k=1)
    generator = np.random.default_rng(seed)
    first = generator.integers(0, rows, size=max_pairs)
    # Drawing the second index from the other rows - 1 positions keeps i != j without rejection.
    second = generator.integers(0, rows - 1, size=max_pairs)
    return first, second + (second >= first)


def cosine_histogram_figure(samples: dict[str, list[tuple[str, np.ndarray]]]):
    """Overlay histograms of pairwise cosines, one subplot per modality, one outline per (label, sample)."""
    names = list(samples)
    figure = _figure(4.2 * len(names), 3.2)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    bins = np.linspace(-1.0, 1.0, 81)
    for axis, name in zip(axes, names):
        for label, cosines in samples[name]:
            if len(cosines) == 0:
                continue
            axis.hist(np.clip(cosines, -1.0, 1.0), bins=bins, histtype="step", density=True, linewidth=1.5,
                      label=matplotlib_text(f"{label} (mean {float(np.mean(cosines)):.2f})"))
        axis.set_title(name, fontsize=10, loc="left")
        axis.set_xlabel("cosine of a pair of panels", fontsize=8)
        axis.set_ylabel("density", fontsize=8)
        axis.set_xlim(-1.0, 1.0)
        axis.tick_params(labelsize=8)
        axis.grid(True, alpha=0.25)
        axis.legend(fontsize=7)
    return figure


# --------------------------------------------------------------------------------------------------
# 2-D maps


def compute_map(matrix: np.ndarray, *, method: str = "auto", seed: int = 0, label: str = "",
                progress: ProgressCallback | None = None) -> MapResult:
    """Lay out the rows of ``matrix`` in 2-D with UMAP (cosine metric, seeded) or PCA.

    ``method`` is ``"umap"``, ``"pca"`` or ``"auto"``. UMAP is used for ``"auto"`` and ``"umap"`` when
    there are at least ``UMAP_MIN_POINTS`` rows; with fewer rows, or when umap-learn is not installed, the
    map falls back to PCA and ``reason`` gives the cause. ``label`` names the map in the progress message.
    """
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"unknown map method {method!r}; expected auto, umap or pca")
    matrix = normalise_rows(matrix)
    points = matrix.shape[0]
    if method == "pca":
        return MapResult(_pca_map(matrix, seed), "PCA")
    if points < UMAP_MIN_POINTS:
        return MapResult(_pca_map(matrix, seed), "PCA",
                         f"too few points for UMAP ({points} < {UMAP_MIN_POINTS})")
    try:
        with warnings.catch_warnings():
            # umap-learn 0.5 warns at import that its optional TensorFlow model is unavailable.
            warnings.filterwarnings("ignore", message=".*ParametricUMAP.*")
            import umap
    except ImportError as error:
        return MapResult(_pca_map(matrix, seed), "PCA", f"umap-learn is not available ({error})")

    if progress is not None:
        progress(f"computing UMAP map of {label or 'embeddings'} ({points} points)...")
    reducer = umap.UMAP(n_neighbors=min(UMAP_NEIGHBORS, points - 1), n_components=2, metric="cosine",
                        random_state=seed, n_jobs=1)
    with warnings.catch_warnings():
        # umap-learn warns that a fixed random_state disables parallelism, which is the point here.
        warnings.filterwarnings("ignore", message=".*random_state.*")
        warnings.filterwarnings("ignore", message=".*n_jobs.*")
        warnings.filterwarnings("ignore", category=UserWarning, module="umap")
        coordinates = reducer.fit_transform(matrix)
    return MapResult(np.asarray(coordinates, dtype=np.float64), "UMAP")


def _pca_map(matrix: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    components = min(2, matrix.shape[0], matrix.shape[1])
    coordinates = np.zeros((matrix.shape[0], 2), dtype=np.float64)
    centred = matrix - matrix.mean(axis=0)
    if components and np.abs(centred).max() > 0:
        coordinates[:, :components] = PCA(n_components=components, random_state=seed).fit_transform(matrix)
    return coordinates


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Return the rows of ``matrix`` scaled to unit L2 norm in float64 (zero rows stay zero)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, np.finfo(np.float64).tiny)


def map_figure(by_page: MapResult, pages: np.ndarray, page_names: list[str],
               by_modality: MapResult | None, modalities: np.ndarray | None, *, title: str,
               modality: str = "fused"):
    """Draw the page-coloured map and, when given, the modality-coloured map side by side.

    ``pages`` contains an index into ``page_names`` for every row of ``by_page``, and ``modalities`` the
    modality name of every row of ``by_modality``.
    """
    import matplotlib

    panel_count = 2 if by_modality is not None else 1
    figure = _figure(6.0 * panel_count, 5.2)
    axes = figure.subplots(1, panel_count, squeeze=False)[0]
    figure.suptitle(matplotlib_text(title), fontsize=11, x=0.01, horizontalalignment="left")

    axis = axes[0]
    distinct = np.unique(pages)
    palette = matplotlib.colormaps["tab20"]
    colours = {page: palette(index % 20) for index, page in enumerate(distinct)}
    point_size = _point_size(len(pages))
    for page in distinct:
        rows = pages == page
        axis.scatter(by_page.coordinates[rows, 0], by_page.coordinates[rows, 1], s=point_size,
                     color=colours[page], label=matplotlib_text(page_names[int(page)]), alpha=0.85,
                     edgecolors="none")
    axis.set_title(f"{matplotlib_text(modality)}, coloured by page ({len(distinct)} pages)", fontsize=9, loc="left")
    if len(distinct) <= MAX_LEGEND_PAGES:
        axis.legend(fontsize=6, markerscale=1.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    _plain_axes(axis, by_page.method)

    if by_modality is not None and modalities is not None:
        axis = axes[1]
        for name in dict.fromkeys(modalities.tolist()):
            rows = modalities == name
            axis.scatter(by_modality.coordinates[rows, 0], by_modality.coordinates[rows, 1], s=point_size,
                         color=MODALITY_COLORS.get(name), label=f"{matplotlib_text(name)} ({int(rows.sum())})",
                         alpha=0.75, edgecolors="none")
        axis.set_title("fused, vision and text, coloured by modality", fontsize=9, loc="left")
        axis.legend(fontsize=7, markerscale=1.5, loc="best", framealpha=0.7)
        _plain_axes(axis, by_modality.method)
    return figure


def _point_size(points: int) -> float:
    return float(np.clip(3000.0 / max(points, 1), 3.0, 40.0))


def _plain_axes(axis, method: str) -> None:
    axis.set_xlabel(f"{method} 1", fontsize=8)
    axis.set_ylabel(f"{method} 2", fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])

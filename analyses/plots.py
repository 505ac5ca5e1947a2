"""PNG figures of the analyses (matplotlib's object API on the Agg canvas; no pyplot state).

Every figure has a title, the training step on its x axes, labelled y axes and a legend. A y axis
turns logarithmic when its data are positive and span more than two decades (S_rel is heavy
tailed). A series keeps its colour in every panel of a figure. Each function writes one PNG to
``path`` and returns ``path``.

Figures are laid out on a fixed grid of panels (margins in inches, no layout engine: a grid of
ten panels draws in a fraction of the time) and saved at a modest resolution as a PNG of at most
:data:`PNG_COLOURS` colours, which keeps an embedded report small.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import matplotlib as mpl
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullLocator
from PIL import Image

from analyses.curves import MeasureCurves
from analyses.phases import Phases
from analyses.training import Series
from recorder.rundir.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # stubs only: not imported at run time

STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.titley": 1.0,  # a fixed title position: placing it above the ticks measured every label
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "figure.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.2,
    "savefig.dpi": 90,
}
PANEL_SIZE = (3.0, 2.2)  # inches per panel
# Margins and gaps around the panels, in inches: room for the titles, tick labels and axis labels.
MARGIN = {"left": 1.0, "right": 0.25, "bottom": 0.55, "top": 0.75}
GAP = {"columns": 0.9, "shared_columns": 0.2, "rows": 0.7}
LEGEND_WIDTH = 1.9  # inches at the right of a figure with a legend for all its panels
PNG_COLOURS = 64
STEP_LABEL = "training step"
CLASS_COLUMNS = 5  # panels a row in the class-pair grid
SERIES_COLOURS = "tab10"


@dataclass
class OverlayRow:
    """One row of :func:`plot_overlay_grid`: ``data[column][line] = (steps [N], values [N])``."""

    ylabel: str
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    reference: float | None = None  # a dotted horizontal line (no effect / no separation)
    ylim: tuple[float, float] | None = None


@contextmanager
def _figure(
    path: Path,
    title: str,
    num_panels: int,
    max_cols: int = 4,
    share_y: bool = False,
    legend: bool = False,
    layout: Literal["grid", "constrained"] = "grid",
) -> Iterator[tuple[Figure, list[Axes]]]:
    """A styled figure with ``num_panels`` panels in a grid, saved to ``path`` as a PNG on exit
    (:func:`~recorder.rundir.files.atomic_write_bytes`: a link at ``path`` is replaced, not followed).

    ``share_y``: one y scale for every panel, tick labels on the first column only; ``legend``:
    room at the right for one legend of the whole figure (:func:`_figure_legend`); ``layout``:
    ``grid`` (fixed margins) or ``constrained`` (matplotlib's layout engine, for panels with
    legends outside their axes; slower).
    """
    ncols = min(num_panels, max_cols)
    nrows = math.ceil(num_panels / ncols)
    gap = GAP["shared_columns"] if share_y else GAP["columns"]
    right = MARGIN["right"] + (LEGEND_WIDTH if legend else 0.0)
    width = MARGIN["left"] + ncols * PANEL_SIZE[0] + (ncols - 1) * gap + right
    height = MARGIN["top"] + nrows * PANEL_SIZE[1] + (nrows - 1) * GAP["rows"] + MARGIN["bottom"]
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(width, height), layout="constrained" if layout == "constrained" else None)
        if layout == "grid":
            fig.subplots_adjust(
                left=MARGIN["left"] / width,
                right=1 - right / width,
                bottom=MARGIN["bottom"] / height,
                top=1 - MARGIN["top"] / height,
                wspace=gap / PANEL_SIZE[0],
                hspace=GAP["rows"] / PANEL_SIZE[1],
            )
        grid = fig.subplots(nrows, ncols, squeeze=False, sharey="all" if share_y else "none")
        axes = list(grid.ravel())
        for k, ax in enumerate(axes):
            ax.set_visible(k < num_panels)
            if share_y and k % ncols:
                ax.tick_params(labelleft=False)
        fig.suptitle(title)
        yield fig, axes[:num_panels]
        _save_png(fig, path)


def _save_png(fig: Figure, path: Path) -> None:
    """``fig`` as a PNG of at most :data:`PNG_COLOURS` colours (a quarter of the bytes of a
    full-colour one, for line art)."""
    rgba = io.BytesIO()
    fig.savefig(rgba, format="png")
    with Image.open(rgba) as image:
        palette = image.convert("RGB").quantize(
            PNG_COLOURS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE
        )
    png = io.BytesIO()
    palette.save(png, format="png")
    atomic_write_bytes(path, png.getbuffer(), durable=False)  # derived files: rewritten by a rerun


def _figure_legend(fig: Figure, handles: Sequence[Any], labels: Sequence[str]) -> None:
    """One legend for the whole figure, in the room :func:`_figure` left at the right."""
    width = fig.get_figwidth()
    left = 1 - (LEGEND_WIDTH + MARGIN["right"] - 0.15) / width
    fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(left, fig.subplotpars.top), frameon=False)


def _series_colours(labels: Sequence[str]) -> dict[str, Any]:
    """A colour per series label, the same in every panel of a figure."""
    cmap = mpl.colormaps[SERIES_COLOURS]
    return {label: cmap(k % cmap.N) for k, label in enumerate(labels)}


_PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def _scale_y(ax: Axes, values: npt.ArrayLike) -> None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) and v.min() > 0 and v.max() / v.min() > 100:
        ax.set_yscale("log")
        ax.yaxis.set_minor_locator(NullLocator())  # decades only: minor ticks cost most of the drawing
        ax.yaxis.set_major_formatter(_PLAIN)  # 0.001, not 10^-3 typeset by mathtext (slow)


def plot_class_pairs(
    curves: MeasureCurves,
    class_names: Sequence[str],
    path: Path,
    stat: str = "mean",
    std: np.ndarray | None = None,
) -> Path:
    """The paper's figure: one panel per updated class ``b``, ``A[b, b]`` against every ``A[a, b]``,
    on one y scale for every panel.

    Each observed class keeps its colour in every panel; the same-class curve is thick and black.
    With ``std`` ``[S, K, K]`` (the spread over runs; ``curves`` then holds their mean), each
    curve gets a band of one standard deviation.
    """
    A = curves.classpair(stat)  # [S, K, K]
    K = A.shape[-1]
    cmap = mpl.colormaps["tab10" if K <= 10 else "tab20"]
    colors = [cmap(a % cmap.N) for a in range(K)]
    same_style: dict[str, Any] = {"color": "black", "linewidth": 2.4}
    selfs = "self pairs included" if curves.include_self else "self pairs excluded"
    runs = "" if std is None else ", mean ± sd over runs"
    title = (
        f"{curves.store}, {curves.measure}: how an update on one class moves each class "
        f"({stat} S_rel over the pairs of two classes, {selfs}{runs})"
    )
    with _figure(path, title, K, max_cols=CLASS_COLUMNS, share_y=True, legend=True) as (fig, axes):
        for b, ax in enumerate(axes):
            if b % CLASS_COLUMNS == 0:
                ax.set_ylabel(f"S_rel ({curves.measure}), class a")
            for a in [*(a for a in range(K) if a != b), b]:  # the same-class curve on top
                style = same_style if a == b else {"color": colors[a]}
                ax.plot(curves.steps, A[:, a, b], **style)
                if std is not None:
                    lo, hi = A[:, a, b] - std[:, a, b], A[:, a, b] + std[:, a, b]
                    ax.fill_between(curves.steps, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
            ax.set_title(f"updated on class {class_names[b]}")
            ax.set_xlabel(STEP_LABEL)
        _scale_y(axes[0], A)  # shared by every panel
        handles = [Line2D([], [], **same_style)] + [Line2D([], [], color=c) for c in colors]
        labels = ["same class (a = b)"] + [f"class {name}" for name in class_names]
        _figure_legend(fig, handles, labels)
    return path


@dataclass
class BandPanel:
    """One panel of :func:`plot_band_panels`: ``lines[label] = (steps [N], values [N], low [N],
    high [N])``, the band from ``low`` to ``high`` (NaN: no band)."""

    title: str
    ylabel: str
    lines: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    reference: float | None = None  # a dotted horizontal line (no effect / no separation)
    ylim: tuple[float, float] | None = None


def plot_band_panels(panels: Sequence[BandPanel], path: Path, title: str) -> Path:
    """Panels side by side, each overlaying lines with their bands (one colour per label, one
    legend for all)."""
    colors = _series_colours(list(dict.fromkeys(label for p in panels for label in p.lines)))
    with _figure(path, title, len(panels), max_cols=3, legend=True) as (fig, axes):
        for panel, ax in zip(panels, axes, strict=True):
            for label, (x, y, lo, hi) in panel.lines.items():
                ax.plot(x, y, marker=".", markersize=3, color=colors[label])
                ax.fill_between(x, lo, hi, color=colors[label], alpha=0.2, linewidth=0)
            if panel.reference is not None:
                ax.axhline(panel.reference, color="grey", linestyle=":")
            if panel.ylim is not None:
                ax.set_ylim(*panel.ylim)
            else:
                _scale_y(ax, np.concatenate([y for _, y, _, _ in panel.lines.values()]))
            ax.set_title(panel.title)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(panel.ylabel)
        _figure_legend(fig, [Line2D([], [], color=c, marker=".") for c in colors.values()], list(colors))
    return path


def plot_phases(
    steps: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, Phases]],
    path: Path,
    title: str,
) -> Path:
    """The S_rel trajectory and its phases (:mod:`analyses.phases`), one panel per
    ``(measure, values [S], std [S] or NaN, phases)``: the values with their band, the fitted
    lines and the transition step (a vertical line) with the rate of change of each phase."""
    with _figure(path, title, len(panels), max_cols=3) as (_, axes):
        for (measure, y, std, phases), ax in zip(panels, axes, strict=True):
            if np.isfinite(std).any():
                ax.fill_between(steps, y - std, y + std, alpha=0.2, linewidth=0, label="± sd over runs")
            ax.plot(steps, y, marker=".", markersize=3, label="median S_rel over pairs")
            if phases.found:
                assert phases.step is not None  # a transition has a step
                before, after = phases.rates
                ax.plot(steps, phases.fit, color="black", linestyle="--", label="two-phase fit")
                ax.axvline(
                    phases.step,
                    color="tab:red",
                    linestyle=":",
                    label=f"transition at step {phases.step}\nrate {before:.3g} -> {after:.3g} per step",
                )
            elif phases.rates:
                ax.plot(
                    steps, phases.fit, color="grey", linestyle="--", label=f"no transition ({phases.reason})"
                )
            ax.set_title(measure)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("S_rel, median over pairs")
            ax.legend(loc="best")
    return path


def plot_trajectory(curves: Sequence[MeasureCurves], path: Path, title: str) -> Path:
    """Median S_rel over probe pairs ``i != j`` with its interquartile band, one panel per measure."""
    with _figure(path, title, len(curves), max_cols=3) as (_, axes):
        for c, ax in zip(curves, axes, strict=True):
            lo, med, hi = c.quantiles.T
            ax.fill_between(c.steps, lo, hi, alpha=0.25, label="25th-75th percentile")
            ax.plot(c.steps, med, marker=".", markersize=3, label="median")
            ax.set_title(c.measure)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("S_rel over pairs i != j")
            _scale_y(ax, c.quantiles)
            ax.legend(loc="best")
    return path


def plot_overlay_grid(rows: Sequence[OverlayRow], path: Path, title: str) -> Path:
    """A grid of panels, one figure row per key of ``data`` (e.g. a measure) and one figure column
    per :class:`OverlayRow` (e.g. a statistic); each panel overlays one line per key of
    ``data[key]`` (e.g. a replay configuration), in the same colour in every panel."""
    keys = list(dict.fromkeys(key for row in rows for key in row.data))
    colors = _series_colours(
        list(dict.fromkeys(line for row in rows for d in row.data.values() for line in d))
    )
    with _figure(path, title, len(rows) * len(keys), max_cols=len(rows), legend=True) as (fig, axes):
        for k, key in enumerate(keys):
            for r, row in enumerate(rows):
                ax = axes[k * len(rows) + r]
                lines = row.data.get(key, {})
                for label, (x, y) in lines.items():
                    ax.plot(x, y, marker=".", markersize=3, color=colors[label])
                if row.reference is not None:
                    ax.axhline(row.reference, color="grey", linestyle=":")
                ax.set_title(f"{key}: {row.ylabel}")
                ax.set_xlabel(STEP_LABEL)
                ax.set_ylabel(row.ylabel)
                if row.ylim is not None:
                    ax.set_ylim(*row.ylim)
                else:
                    _scale_y(ax, np.concatenate([y for _, y in lines.values()]) if lines else [])
        _figure_legend(fig, [Line2D([], [], color=c, marker=".") for c in colors.values()], list(colors))
    return path


def plot_training(series: dict[str, dict[str, Series]], path: Path, title: str) -> Path:
    """Training curves (:func:`analyses.training.training_series`): a loss panel, an accuracy
    panel and one for any other metric. Per-step metrics are lines, per-epoch metrics markers;
    a metric keeps its colour in every panel."""
    groups: dict[str, list[Series]] = {}
    for s in (s for by_name in series.values() for s in by_name.values()):
        key = "loss" if "loss" in s.name else "accuracy" if "acc" in s.name else "other metrics"
        groups.setdefault(key, []).append(s)
    colors = _series_colours([s.name for members in groups.values() for s in members])
    with _figure(path, title, len(groups), max_cols=3) as (_, axes):
        for (group, members), ax in zip(groups.items(), axes, strict=True):
            for s in members:
                if s.kind == "epoch":
                    ax.plot(
                        s.steps,
                        s.values,
                        marker="o",
                        markersize=4,
                        color=colors[s.name],
                        label=f"{s.name} (per epoch)",
                    )
                else:
                    ax.plot(s.steps, s.values, alpha=0.8, linewidth=0.9, color=colors[s.name], label=s.name)
            ax.set_title(group)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(group)
            if group == "loss":
                _scale_y(ax, np.concatenate([s.values for s in members]))
            ax.legend(loc="best")
    return path

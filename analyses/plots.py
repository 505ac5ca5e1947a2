"""PNG figures of the analyses (matplotlib's object API on the Agg canvas; no pyplot state).

Every figure has a title, the training step on its x axes, labelled y axes and a legend. A y axis
turns logarithmic when its data are positive and span more than two decades (S_rel is heavy
tailed). Each function writes one PNG to ``path`` and returns ``path``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib as mpl
import numpy as np
import numpy.typing as npt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analyses.curves import MeasureCurves
from analyses.phases import Phases
from analyses.training import Series
from recorder.rundir.files import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # stubs only: not imported at run time

STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "lines.linewidth": 1.3,
    "savefig.dpi": 120,
}
PANEL_SIZE = (4.2, 3.0)  # inches per panel
STEP_LABEL = "training step"


@dataclass
class OverlayRow:
    """One row of :func:`plot_overlay_grid`: ``data[column][line] = (steps [N], values [N])``."""

    ylabel: str
    data: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
    reference: float | None = None  # a dotted horizontal line (no effect / no separation)


@contextmanager
def _figure(
    path: Path, title: str, num_panels: int, max_cols: int = 4
) -> Iterator[tuple[Figure, list[Axes]]]:
    """A styled figure with ``num_panels`` panels in a grid, saved to ``path`` as a PNG on exit
    (:func:`~recorder.rundir.files.atomic_write_bytes`: a link at ``path`` is replaced, not followed)."""
    ncols = min(num_panels, max_cols)
    nrows = math.ceil(num_panels / ncols)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(PANEL_SIZE[0] * ncols, PANEL_SIZE[1] * nrows + 0.5), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False)
        axes = list(grid.ravel())
        for ax in axes[num_panels:]:
            ax.set_visible(False)
        fig.suptitle(title)
        yield fig, axes[:num_panels]
        png = io.BytesIO()
        fig.savefig(png, format="png")
        atomic_write_bytes(path, png.getbuffer())


def _scale_y(ax: Axes, values: npt.ArrayLike) -> None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) and v.min() > 0 and v.max() / v.min() > 100:
        ax.set_yscale("log")


def plot_class_pairs(
    curves: MeasureCurves,
    class_names: Sequence[str],
    path: Path,
    stat: str = "mean",
    std: np.ndarray | None = None,
) -> Path:
    """The paper's figure: one panel per updated class ``b``, ``A[b, b]`` against every ``A[a, b]``.

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
    title = f"{curves.store}: class-pair S_rel, {curves.measure} ({stat} over pairs, {selfs}{runs})"
    with _figure(path, title, K) as (fig, axes):
        for b, ax in enumerate(axes):
            for a in [*(a for a in range(K) if a != b), b]:  # the same-class curve on top
                style = same_style if a == b else {"color": colors[a]}
                ax.plot(curves.steps, A[:, a, b], **style)
                if std is not None:
                    lo, hi = A[:, a, b] - std[:, a, b], A[:, a, b] + std[:, a, b]
                    ax.fill_between(curves.steps, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
            ax.set_title(f"updated on class {class_names[b]}")
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(f"A[a, b] ({curves.measure})")
            _scale_y(ax, A)  # one scale for every panel
        handles = [Line2D([], [], **same_style)] + [Line2D([], [], color=c) for c in colors]
        labels = ["same class (a = b)"] + [f"observed class {name}" for name in class_names]
        fig.legend(handles, labels, loc="outside right upper")
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
    """Panels side by side, each overlaying lines with their bands (one colour per label)."""
    labels = list(dict.fromkeys(label for p in panels for label in p.lines))
    cmap = mpl.colormaps["tab10"]
    colors = {label: cmap(k % cmap.N) for k, label in enumerate(labels)}
    with _figure(path, title, len(panels), max_cols=3) as (_, axes):
        for panel, ax in zip(panels, axes, strict=True):
            for label, (x, y, lo, hi) in panel.lines.items():
                ax.plot(x, y, marker=".", color=colors[label], label=label)
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
            ax.legend(loc="best")
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
            ax.plot(steps, y, marker=".", label="median S_rel over pairs")
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
            ax.set_ylabel("S_rel over pairs i != j")
            ax.legend(loc="best")
    return path


def plot_trajectory(curves: Sequence[MeasureCurves], path: Path, title: str) -> Path:
    """Median S_rel over probe pairs ``i != j`` with its interquartile band, one panel per measure."""
    with _figure(path, title, len(curves), max_cols=3) as (_, axes):
        for c, ax in zip(curves, axes, strict=True):
            lo, med, hi = c.quantiles.T
            ax.fill_between(c.steps, lo, hi, alpha=0.25, label="25th-75th percentile")
            ax.plot(c.steps, med, marker=".", label="median")
            ax.set_title(c.measure)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("S_rel over pairs i != j")
            _scale_y(ax, c.quantiles)
            ax.legend(loc="best")
    return path


def plot_overlay_grid(rows: Sequence[OverlayRow], path: Path, title: str) -> Path:
    """A grid of panels, one figure row per key of ``data`` (e.g. a measure) and one figure column
    per :class:`OverlayRow` (e.g. a statistic); each panel overlays one line per key of
    ``data[key]`` (e.g. a replay configuration)."""
    keys = list(dict.fromkeys(key for row in rows for key in row.data))
    with _figure(path, title, len(rows) * len(keys), max_cols=len(rows)) as (_, axes):
        for k, key in enumerate(keys):
            for r, row in enumerate(rows):
                ax = axes[k * len(rows) + r]
                lines = row.data.get(key, {})
                for label, (x, y) in lines.items():
                    ax.plot(x, y, marker=".", label=label)
                if row.reference is not None:
                    ax.axhline(row.reference, color="grey", linestyle=":")
                ax.set_title(key)
                ax.set_xlabel(STEP_LABEL)
                ax.set_ylabel(row.ylabel)
                _scale_y(ax, np.concatenate([y for _, y in lines.values()]) if lines else [])
                if lines:
                    ax.legend(loc="best")
    return path


def plot_training(series: dict[str, dict[str, Series]], path: Path, title: str) -> Path:
    """Training curves (:func:`analyses.training.training_series`): a loss panel, an accuracy
    panel and one for any other metric. Per-step metrics are lines, per-epoch metrics markers."""
    groups: dict[str, list[Series]] = {}
    for s in (s for by_name in series.values() for s in by_name.values()):
        key = "loss" if "loss" in s.name else "accuracy" if "acc" in s.name else "other metrics"
        groups.setdefault(key, []).append(s)
    with _figure(path, title, len(groups), max_cols=3) as (_, axes):
        for (group, members), ax in zip(groups.items(), axes, strict=True):
            for s in members:
                if s.kind == "epoch":
                    ax.plot(s.steps, s.values, marker="o", markersize=4, label=f"{s.name} (per epoch)")
                else:
                    ax.plot(s.steps, s.values, alpha=0.8, linewidth=0.9, label=s.name)
            ax.set_title(group)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel(group)
            if group == "loss":
                _scale_y(ax, np.concatenate([s.values for s in members]))
            ax.legend(loc="best")
    return path

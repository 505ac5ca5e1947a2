"""The figures of an analysis (:func:`analyses.report.analyze`), drawn by :mod:`analyses.plots`
(imported with this module: ``analyze --no-figures`` never loads matplotlib).

Each function writes its PNG files into ``out`` and returns one entry per file:
``{"file", "caption", "section"}``, ``file`` relative to ``out`` and ``section`` where the report
shows it: ``key`` (first: the measures compared in each store, the stores compared, a regression's
trajectory and phases), ``classpairs`` (the class-pair grids, folded), ``modules`` (where elasticity
lives: :func:`module_figure`) or ``training``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.lines import Line2D

from analyses.curves import MeasureCurves, nan_mean
from analyses.groups import band
from analyses.modules import KINDS, ModuleShares
from analyses.phases import MIN_SIZE, Phases
from analyses.plots import (
    STEP_LABEL,
    BandPanel,
    OverlayRow,
    _figure,
    _figure_legend,
    _series_colours,
    plot_band_panels,
    plot_class_pairs,
    plot_overlay_grid,
    plot_phases,
    plot_training,
    plot_trajectory,
)
from analyses.published import PAPER_MEASURES
from analyses.results import ReplayResult
from analyses.training import Series

if TYPE_CHECKING:  # analyses.report imports this module when it draws
    from analyses.report import MeasureAnalysis

Figure = dict[str, str]


def store_figures(
    store: str,
    result: ReplayResult,
    analysis: dict[str, MeasureAnalysis],
    class_names: list[str] | None,
    drawn: list[str],
    out: Path,
) -> list[Figure]:
    """The figures of one store (``result``: one of its runs): for classification, the measures
    compared and the class-pair grid of each measure of ``drawn`` (classes named ``class_names``);
    for regression, the trajectory and the phases of every measure."""
    if not analysis:
        return []
    stem = _stem(store)
    runs = len(next(iter(analysis.values())).runs.runs)
    over = f" (mean over {runs} runs)" if runs > 1 else ""
    figures = []
    if result.is_classification:
        assert class_names is not None  # classification stores have classes
        file = f"{stem}_separation_auc.png"
        plot_band_panels(_measure_panels(analysis), out / file, f"{store}: the measures compared{over}")
        level = next(a.auc.level for a in analysis.values() if a.auc is not None)
        caption = (
            f"{store}: separation AUC (same- vs cross-class pairs, {level:.0%} bootstrap interval "
            f"over probes) and same/cross ratio (class mean, ± sd over runs){over}"
        )
        figures.append({"file": file, "caption": caption, "section": "key"})
        for m in (m for m in drawn if m in analysis):
            a = analysis[m]
            file = f"{stem}_classpairs_{m}.png"
            std = band(a.runs.stack("classpairs")).std if runs > 1 else None
            plot_class_pairs(a.runs.mean_curves(), class_names, out / file, std=std)
            caption = f"{store}: class-pair S_rel over training, {m}{over}"
            figures.append({"file": file, "caption": caption, "section": "classpairs"})
        return figures
    file = f"{stem}_trajectory.png"
    mean = [a.runs.mean_curves() for a in analysis.values()]
    plot_trajectory(mean, out / file, f"{store}: S_rel over training (pairs i != j){over}")
    caption = f"{store}: S_rel trajectory, median and quartiles over pairs{over}"
    figures.append({"file": file, "caption": caption, "section": "key"})
    panels: list[tuple[str, np.ndarray, np.ndarray, Phases]] = []
    for m, a in analysis.items():
        if len(a.runs.steps) >= 2 * MIN_SIZE:
            assert a.phases is not None  # regression measures have phases
            b = band(a.runs.stack("quantiles")[:, :, 1])
            panels.append((m, b.mean, b.std, a.phases["mean"]))
    if panels:
        file = f"{stem}_phases.png"
        steps = next(iter(analysis.values())).runs.steps
        plot_phases(steps, panels, out / file, f"{store}: elastic and inelastic phases{over}")
        caption = f"{store}: the transition located on the median S_rel trajectory{over}"
        figures.append({"file": file, "caption": caption, "section": "key"})
    return figures


def _measure_panels(analysis: dict[str, MeasureAnalysis]) -> list[BandPanel]:
    """Separation AUC (bootstrap interval) and same/cross class-mean ratio (± sd over runs) of
    the paper's measures (:data:`PAPER_MEASURES`) when the store holds two of them, else of all."""
    paper = {m: a for m, a in analysis.items() if m in PAPER_MEASURES}
    analysis = paper if len(paper) > 1 else analysis
    auc = BandPanel(
        "separation AUC", "P(same-class S_rel > cross-class S_rel)", {}, reference=0.5, ylim=(0, 1)
    )
    ratio = BandPanel("same/cross ratio, class mean", "same-class / cross-class S_rel", {}, reference=1.0)
    for m, a in analysis.items():
        steps = a.runs.steps
        assert a.auc is not None  # classification measures have the AUC
        auc.lines[m] = (steps, a.auc.point, a.auc.low, a.auc.high)
        b = band(nan_mean(a.runs.stack("same_cross"), axis=2))  # [R, S] class means -> [S]
        ratio.lines[m] = (steps, b.mean, b.mean - b.std, b.mean + b.std)
    return [auc, ratio]


def comparison_figure(
    curves: dict[str, dict[str, MeasureCurves]], measures: list[str], out: Path
) -> list[Figure]:
    """``comparison.png``: the ``measures`` of every store of ``curves`` (store -> measure -> its
    mean curves) side by side, one row per measure; nothing when no store holds them."""
    rows = [
        OverlayRow("separation AUC", {m: {} for m in measures}, reference=0.5, ylim=(0, 1)),
        OverlayRow("same/cross ratio, class mean", {m: {} for m in measures}, reference=1.0),
        OverlayRow("median S_rel over pairs", {m: {} for m in measures}),
    ]
    for name, per_store in curves.items():
        for m in (m for m in measures if m in per_store):
            c = per_store[m]
            if c.classpairs is not None:
                assert c.auc is not None  # classification, as the class pairs say
                rows[0].data[m][name] = (c.steps, c.auc)
                rows[1].data[m][name] = (c.steps, nan_mean(c.same_cross("mean"), axis=1))
            else:
                rows[2].data[m][name] = (c.steps, c.quantiles[:, 1])
    rows = [row for row in rows if any(row.data.values())]
    if not rows:
        return []
    plot_overlay_grid(rows, out / "comparison.png", "Replay configurations side by side")
    caption = f"Stores compared: {', '.join(curves)} ({', '.join(measures)})"
    return [{"file": "comparison.png", "caption": caption, "section": "key"}]


def module_figure(shares: ModuleShares, out: Path) -> list[Figure]:
    """``<store>_modules.png``: each module's share of the first-order change over training, one
    panel for same-class pairs and one for cross-class pairs; a module keeps its colour in both,
    the total (the ``linear`` measure's class-pair mean) is dashed."""
    file = f"{_stem(shares.store)}_modules.png"
    over = f" (mean over {shares.runs} runs)" if shares.runs > 1 else ""
    title = f"{shares.store}: where the first-order change comes from, module by module{over}"
    labels = [f"module {m}" for m in shares.modules]
    colours = _series_colours(labels)
    total: dict[str, Any] = {"color": "black", "linestyle": "--"}
    with _figure(out / file, title, len(KINDS), legend=True) as (fig, axes):
        for (kind, pairs), ax in zip(KINDS.items(), axes, strict=True):
            for label, y in zip(labels, shares.share(kind).T, strict=True):
                ax.plot(shares.steps, y, marker=".", markersize=3, color=colours[label])
            ax.plot(shares.steps, shares.total(kind), **total)
            ax.axhline(0, color="grey", linestyle=":")
            ax.set_title(pairs)
            ax.set_xlabel(STEP_LABEL)
            ax.set_ylabel("share of the change (1: self change)")
        handles = [Line2D([], [], color=c, marker=".") for c in colours.values()] + [Line2D([], [], **total)]
        _figure_legend(fig, handles, [*labels, "all modules (= linear)"])
    selfs = "self pairs included" if shares.include_self else "self pairs excluded"
    runs = f", mean over {shares.runs} runs" if shares.runs > 1 else ""
    caption = (
        f"{shares.store}: how much each module moves the probes of the updated probe's class (same-class "
        f"pairs) and of other classes (cross-class pairs), in units of the updated probe's own change "
        f"({selfs}{runs})"
    )
    return [{"file": file, "caption": caption, "section": "modules"}]


def training_figure(series: dict[str, dict[str, Series]], title: str, out: Path) -> list[Figure]:
    """``training.png`` from the series of :func:`analyses.training.training_series` (nothing
    when there is none)."""
    if not any(series.values()):
        return []
    plot_training(series, out / "training.png", title)
    return [{"file": "training.png", "caption": "Training curves (metrics.jsonl)", "section": "training"}]


def class_names(result: ReplayResult, extra: dict[str, Any]) -> list[str] | None:
    """The class labels of a classification store, each with its name from ``extra["class_names"]``
    (the run's ``spec.json``) when that names every class; None for regression."""
    if result.classes is None:
        return None
    names = [str(c) for c in result.classes]
    given = extra.get("class_names") or []
    return [f"{c} ({n})" for c, n in zip(names, given, strict=True)] if len(given) == len(names) else names


def _stem(store: str) -> str:
    """The store's name as the start of a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", store)

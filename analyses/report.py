"""``analyze``: every replay store of a run directory or a run group (:mod:`recorder.rundir.group`)
into figures, a JSON summary and a report.

A run directory is analyzed as a group of one run. For a group, each store name is taken from
every run that holds it, on the snapshot steps done in all of them (:mod:`analyses.groups`):
curves are means over runs with bands of one standard deviation. Writes into
``PATH/analysis/`` (or ``out_dir``):

- ``<store>_classpairs_<measure>.png``: the paper's class-pair curves (classification);
- ``<store>_separation_auc.png``: the measures compared: separation AUC with its bootstrap
  interval over probes, and the same/cross ratio (classification);
- ``<store>_trajectory.png``: median S_rel over probe pairs with its quartile band (regression);
- ``<store>_phases.png``: the elastic-to-inelastic transition of each measure (regression, with
  enough snapshots);
- ``comparison.png``: stores side by side, when there are several;
- ``training.png``: the training curves of ``metrics.jsonl``;
- ``summary.json``: the numbers (see :func:`analyze`), and ``report.html``: one self-contained
  page with the figures embedded, the tables and each store's configuration.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.bootstrap import AucEstimate, auc_with_ci
from analyses.curves import MeasureCurves, nan_mean
from analyses.groups import Band, RunCurves, band, member_results, run_curves
from analyses.html import render_report
from analyses.phases import MIN_SIZE, Phases, detect_transition
from analyses.plots import (
    BandPanel,
    OverlayRow,
    plot_band_panels,
    plot_class_pairs,
    plot_overlay_grid,
    plot_phases,
    plot_training,
    plot_trajectory,
)
from analyses.published import PAPER_MEASURES, PUBLISHED
from analyses.results import ReplayResult
from analyses.tables import (
    PAPER_NOTE,
    PHASES_HEADER,
    PHASES_NOTE,
    SUMMARY_HEADER,
    SUMMARY_NOTE,
    paper_header,
    paper_rows,
    phase_rows,
    summary_rows,
)
from analyses.training import Series, training_series
from recorder.rundir.errors import ResultsError
from recorder.rundir.files import atomic_write_bytes, atomic_write_json, finite_or_none, make_folder
from recorder.rundir.group import is_group, read_group
from recorder.rundir.run import RunDir

BOOTSTRAP_REPLICATES = 500
CI_LEVEL = 0.95


def analyze(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    include_self: bool = False,
    measures: list[str] | None = None,
) -> dict[str, Any]:
    """Analyze every replay store of ``run_dir``; write figures, ``summary.json`` and ``report.html``.

    Args:
        run_dir: a run directory holding one or more ``<name>.zarr`` replay stores, or a run
            group whose runs hold them.
        out_dir: where to write; default ``run_dir/analysis``.
        include_self: count the self pairs ``i = j`` in the same-class cell (the paper's
            protocol, SPEC §5); the class-pair aggregates are recomputed from the measures
            when the stores hold the other choice. The paper table always includes them.
        measures: the measures to analyze (default: every stored one).

    Returns the summary written to ``summary.json`` (numbers of a group are means over its runs):

    - ``run_dir``, ``out_dir``, ``task``, ``preset``, ``include_self``, ``runs`` (run names),
      ``group`` (``group.json``'s ``config``, None for a run directory);
    - ``stores``: per store ``paths`` (one per run), ``runs``, ``config``, ``dtype``,
      ``classification``, ``classes``, ``stored_include_self``, ``snapshots`` {done (common to
      the runs), stored, first_step, last_step}, ``error_estimate_max`` and ``measures``: per
      measure ``median_S`` {first, final, time_average} (median over pairs ``i != j``) and, for
      classification, ``separation_auc`` {final, time_average, ci: {level, replicates,
      final: [lo, hi], time_average: [lo, hi]}, std_time_average (over runs)},
      ``same_cross_ratio`` {mean, median}: ``[K]`` time-averaged ratio per updated class (the
      SPEC §5 table; mean over runs), ``same_cross_ratio_std`` (over runs),
      ``same_cross_ratio_class_mean`` {mean, median}; for regression ``phases`` {mean: the
      transition of the run-mean trajectory, runs: run -> its transition}
      (:meth:`analyses.phases.Phases.to_json`);
    - ``paper`` (None unless the runs come from a preset of :data:`analyses.published.PUBLISHED`):
      ``data``, ``classes``, ``class_names``, ``test_acc`` {ours, std, published} and ``stores``:
      per classification store, per measure of :data:`PAPER_MEASURES` it holds, ``ours`` and
      ``std`` ``[K]`` (time-averaged same/cross ratio, self pairs included, mean and sd over
      runs) and ``published`` ``[K]`` or None;
    - ``skipped``: stores without a done snapshot (``run/store`` in a group) and runs of a group
      without a store, with the reason;
    - ``comparison`` (None with a single store): ``stores`` and ``measures``: per measure stored
      in several stores, per store, that store's measure summary;
    - ``training``: ``step`` and ``epoch`` (per-step and per-epoch metrics of ``metrics.jsonl``),
      each metric name -> {final, step} (its last value, mean over runs, and the step it was
      logged at; ``std`` over runs in a group);
    - ``figures``: [{file, caption}], files relative to ``out_dir``.

    Non-finite numbers are written as null.

    Raises :class:`ResultsError` (a :class:`RunDirError`) when there is no usable store or a
    requested measure is stored nowhere.
    """
    path = Path(run_dir)
    group = read_group(path) if is_group(path) else None
    results = member_results(path)  # run -> stores
    run_paths = {name: path / name if group else path for name in results}
    spec = RunDir(next(iter(run_paths.values()))).spec
    names = _select_measures([r for rs in results.values() for r in rs], measures)
    stores_by_name: dict[str, dict[str, ReplayResult]] = {}
    skipped = (
        {} if group is None else {m.name: "no replay store" for m in group.members if m.name not in results}
    )
    for run, rs in results.items():
        for r in rs:
            if r.num_snapshots:
                stores_by_name.setdefault(r.name, {})[run] = r
            else:
                skipped[f"{run}/{r.name}" if group else r.name] = "no completed snapshot"
    if not stores_by_name:
        raise ResultsError(f"{path}: no replay store has a completed snapshot ({', '.join(skipped)})")
    out = make_folder(Path(out_dir) if out_dir is not None else path / "analysis")

    figures: list[dict[str, str]] = []
    stores, curves = {}, {}
    for store, by_run in stores_by_name.items():
        analysis = _analyze_store(by_run, names, include_self)
        if analysis is None:
            skipped[store] = "no snapshot step done in every run"
            continue
        curves[store] = analysis
        stores[store] = _store_summary(by_run, analysis)
        figures += _store_figures(store, next(iter(by_run.values())), analysis, spec.extra, out)
    if not stores:
        raise ResultsError(f"{path}: no replay store has a snapshot done in every run")

    comparison = None
    if len(stores) > 1:
        mean_curves = {s: {m: a.runs.mean_curves() for m, a in per.items()} for s, per in curves.items()}
        comparison, comparison_figures = _comparison(mean_curves, stores, out)
        figures += comparison_figures
    series = {run: training_series(RunDir(p).metrics()) for run, p in run_paths.items()}
    if any(any(s.values()) for s in series.values()):
        plot_training(_named_series(series), out / "training.png", f"{path.name}: training curves")
        figures.append({"file": "training.png", "caption": "Training curves (metrics.jsonl)"})
    training = _training_summary(series)
    notes = []
    labels = next(iter(next(iter(stores_by_name.values())).values())).labels
    if spec.task == "classification" and labels is not None and len(np.unique(labels)) < 2:
        notes.append(
            "every probe is of one class: same-class/cross-class comparisons (class pairs, "
            "separation AUC, the SPEC §5 table) are undefined; record probes of two classes or more"
        )

    summary = {
        "run_dir": str(path),
        "out_dir": str(out),
        "task": spec.task,
        "preset": spec.preset,
        "include_self": include_self,
        "runs": list(results),
        "group": None if group is None else group.config,
        "stores": stores,
        "paper": _paper_section(spec, stores_by_name, stores, training),
        "skipped": skipped,
        "comparison": comparison,
        "training": training,
        "figures": figures,
        "notes": notes,
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_bytes(out / "report.html", render_report(summary, out).encode())
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """Short aligned text tables of ``summary``: per store and measure, the final and
    time-averaged separation AUC (with its bootstrap interval), the time-averaged same/cross
    ratio (from the mean and the median aggregates) and the final median S; then the SPEC §5
    table beside the published numbers and the regression phases, where there are any; notes
    on the protocol below."""
    lines = _aligned(SUMMARY_HEADER, summary_rows(summary)) + [SUMMARY_NOTE]
    if summary["paper"]:
        lines += ["", f"SPEC §5, {summary['paper']['data']}:"]
        lines += _aligned(paper_header(summary["paper"]), paper_rows(summary["paper"])) + [PAPER_NOTE]
    phases = phase_rows(summary)
    if phases:
        lines += ["", "Elastic-to-inelastic transition:"] + _aligned(PHASES_HEADER, phases) + [PHASES_NOTE]
    selfs = "included" if summary["include_self"] else "excluded"
    n = len(summary["runs"])
    runs = (
        "" if summary["group"] is None else f"{n} runs, means over runs. " if n > 1 else "A group of 1 run. "
    )
    lines.append(f"{runs}Self pairs {selfs}. Report: {Path(summary['out_dir']) / 'report.html'}")
    lines += [f"Note: {note}" for note in summary.get("notes", [])]
    return "\n".join(lines)


def _aligned(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> list[str]:
    rows = [list(header), *rows]
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


# ----------------------------------------------------------------------------- one store over the runs


@dataclass
class MeasureAnalysis:
    """One measure of one store over the runs: the curves, and the AUC estimate (classification)
    or the phases (regression): ``"mean"`` -> those of the run-mean trajectory and, with several
    runs, run name -> those of the run."""

    runs: RunCurves
    auc: AucEstimate | None
    phases: dict[str, Phases] | None


def _analyze_store(
    by_run: dict[str, ReplayResult], names: list[str], include_self: bool
) -> dict[str, MeasureAnalysis] | None:
    """Every requested measure of one store (run -> its result); None without a common step."""
    first = next(iter(by_run.values()))
    measures = [m for m in names if all(m in r.measure_names for r in by_run.values())]
    out = {}
    for m in measures:
        runs, positions = run_curves(by_run, m, include_self)
        if len(runs.steps) == 0:
            return None
        auc = phases = None
        if first.is_classification:
            labels: list[np.ndarray] = []
            for r in by_run.values():
                assert r.labels is not None  # the runs of a store share its task
                labels.append(r.labels)
            auc = auc_with_ci(
                [r.measures[m].read()[positions[run]] for run, r in by_run.items()],
                labels,
                replicates=BOOTSTRAP_REPLICATES,
                level=CI_LEVEL,
            )
        else:
            medians = runs.stack("quantiles")[:, :, 1]  # [R, S]
            phases = {"mean": detect_transition(runs.steps, nan_mean(medians))}
            if len(runs.runs) > 1:
                phases.update(
                    {run: detect_transition(runs.steps, y) for run, y in zip(runs.runs, medians, strict=True)}
                )
        out[m] = MeasureAnalysis(runs, auc, phases)
    return out


def _store_summary(by_run: dict[str, ReplayResult], analysis: dict[str, MeasureAnalysis]) -> dict[str, Any]:
    r = next(iter(by_run.values()))
    steps = next(iter(analysis.values())).runs.steps if analysis else r.steps
    return {
        "paths": [str(x.path) for x in by_run.values()],
        "runs": list(by_run),
        "config": r.config,
        "dtype": r.dtype,
        "classification": r.is_classification,
        "classes": None if r.classes is None else [str(c) for c in r.classes],
        "stored_include_self": r.include_self,
        "snapshots": {
            "done": len(steps),
            "stored": max(x.num_stored for x in by_run.values()),
            "first_step": int(steps[0]),
            "last_step": int(steps[-1]),
        },
        # None if any is unknown (NaN)
        "error_estimate_max": _num(max(np.max(x.error_estimate) for x in by_run.values())),
        "measures": {m: _measure_summary(a) for m, a in analysis.items()},
    }


def _measure_summary(a: MeasureAnalysis) -> dict[str, Any]:
    median = a.runs.mean_curves().quantiles[:, 1]
    out: dict[str, Any] = {
        "median_S": {
            "first": _num(median[0]),
            "final": _num(median[-1]),
            "time_average": _num(nan_mean(median)),
        }
    }
    group = len(a.runs.runs) > 1
    if a.auc is not None:
        e = a.auc
        out["separation_auc"] = {
            "final": _num(e.point[-1]),
            "time_average": _num(e.average),
            "ci": {
                "level": e.level,
                "replicates": e.replicates,
                "final": [_num(e.final_low), _num(e.final_high)],
                "time_average": [_num(e.average_low), _num(e.average_high)],
            },
        }
        if group:
            out["separation_auc"]["std_time_average"] = _num(band(nan_mean(a.runs.stack("auc"), axis=1)).std)
        stats = a.runs.curves[0].classpairs
        assert stats is not None  # classification, as the AUC says
        ratios = {stat: band(a.runs.stack("ratio_table", stat)) for stat in stats}  # [K] each
        out["same_cross_ratio"] = {stat: _nums(b.mean) for stat, b in ratios.items()}
        if group:
            out["same_cross_ratio_std"] = {stat: _nums(b.std) for stat, b in ratios.items()}
        out["same_cross_ratio_class_mean"] = {
            stat: _num(nan_mean(np.where(np.isfinite(b.mean), b.mean, np.nan))) for stat, b in ratios.items()
        }
    if a.phases is not None:
        out["phases"] = {
            "mean": a.phases["mean"].to_json(),
            "runs": {run: p.to_json() for run, p in a.phases.items() if run != "mean"},
        }
    return out


def _paper_section(
    spec: Any,
    stores_by_name: dict[str, dict[str, ReplayResult]],
    stores: dict[str, Any],
    training: dict[str, Any],
) -> dict[str, Any] | None:
    """The SPEC §5 table (self pairs included) beside the published numbers, for a paper preset."""
    published = PUBLISHED.get(spec.preset)
    if published is None:
        return None
    acc = training["epoch"].get("test_acc", {})
    section: dict[str, Any] = {
        "data": published.data,
        "classes": list(spec.extra.get("classes", published.classes)),
        "class_names": spec.extra.get("class_names"),
        "test_acc": {"ours": acc.get("final"), "std": acc.get("std"), "published": published.test_acc},
        "stores": {},
    }
    for store, by_run in stores_by_name.items():
        if store not in stores or not stores[store]["classification"]:
            continue
        rows = {}
        for m in PAPER_MEASURES:
            if m not in stores[store]["measures"]:
                continue
            ratio = band(run_curves(by_run, m, include_self=True)[0].stack("ratio_table"))
            rows[m] = {
                "ours": _nums(ratio.mean),
                "std": _nums(ratio.std),
                "published": list(published.same_cross[m]) if m in published.same_cross else None,
            }
        section["stores"][store] = rows
    return section


# ----------------------------------------------------------------------------- figures


def _store_figures(
    store: str, result: ReplayResult, analysis: dict[str, MeasureAnalysis], extra: dict[str, Any], out: Path
) -> list[dict[str, str]]:
    """The figures of one store; classes are named by ``extra["class_names"]`` (the run's
    ``spec.json``) when it names each of them, by their labels otherwise."""
    if not analysis:
        return []
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", store)
    runs = len(next(iter(analysis.values())).runs.runs)
    over = f" (mean over {runs} runs)" if runs > 1 else ""
    figures = []
    if result.is_classification:
        assert result.classes is not None  # classification stores have classes
        names = [str(c) for c in result.classes]
        if len(extra.get("class_names") or []) == len(names):
            names = [f"{c} ({n})" for c, n in zip(names, extra["class_names"], strict=True)]
        for m, a in analysis.items():
            file = f"{stem}_classpairs_{m}.png"
            std = band(a.runs.stack("classpairs")).std if runs > 1 else None
            plot_class_pairs(a.runs.mean_curves(), names, out / file, std=std)
            figures.append({"file": file, "caption": f"{store}: class-pair S_rel over training, {m}{over}"})
        file = f"{stem}_separation_auc.png"
        plot_band_panels(_measure_panels(analysis), out / file, f"{store}: the measures compared{over}")
        level = f"{CI_LEVEL:.0%}"
        figures.append(
            {
                "file": file,
                "caption": f"{store}: separation AUC (same- vs cross-class pairs, {level} bootstrap interval "
                f"over probes) and same/cross ratio (class mean, ± sd over runs){over}",
            }
        )
    else:
        file = f"{stem}_trajectory.png"
        mean = [a.runs.mean_curves() for a in analysis.values()]
        plot_trajectory(mean, out / file, f"{store}: S_rel over training (pairs i != j){over}")
        figures.append(
            {"file": file, "caption": f"{store}: S_rel trajectory, median and quartiles over pairs{over}"}
        )
        panels: list[tuple[str, np.ndarray, np.ndarray, Phases]] = []
        for m, a in analysis.items():
            if len(a.runs.steps) >= 2 * MIN_SIZE:
                assert a.phases is not None  # regression measures have phases
                panels.append((m, *_median_band(a.runs), a.phases["mean"]))
        if panels:
            file = f"{stem}_phases.png"
            steps = next(iter(analysis.values())).runs.steps
            plot_phases(steps, panels, out / file, f"{store}: elastic and inelastic phases{over}")
            figures.append(
                {
                    "file": file,
                    "caption": f"{store}: the transition located on the median S_rel trajectory{over}",
                }
            )
    return figures


def _median_band(runs: RunCurves) -> tuple[np.ndarray, np.ndarray]:
    b: Band = band(runs.stack("quantiles")[:, :, 1])
    return b.mean, b.std


def _measure_panels(analysis: dict[str, MeasureAnalysis]) -> list[BandPanel]:
    """Separation AUC (bootstrap interval) and same/cross class-mean ratio (± sd over runs) of
    the paper's measures (:data:`PAPER_MEASURES`) when the store holds two of them, else of all."""
    paper = {m: a for m, a in analysis.items() if m in PAPER_MEASURES}
    analysis = paper if len(paper) > 1 else analysis
    auc = BandPanel("separation AUC", "P(same-class S > cross-class S)", {}, reference=0.5, ylim=(0, 1))
    ratio = BandPanel("same/cross ratio, class mean", "A[b, b] / mean A[a != b, b]", {}, reference=1.0)
    for m, a in analysis.items():
        steps = a.runs.steps
        assert a.auc is not None  # classification measures have the AUC
        auc.lines[m] = (steps, a.auc.point, a.auc.low, a.auc.high)
        b = band(nan_mean(a.runs.stack("same_cross"), axis=2))  # [R, S] class means -> [S]
        ratio.lines[m] = (steps, b.mean, b.mean - b.std, b.mean + b.std)
    return [auc, ratio]


def _comparison(
    curves: dict[str, dict[str, MeasureCurves]], stores: dict[str, Any], out: Path
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The measures stored in more than one store, side by side: the summary section (per
    measure and store, that store's measure summary) and ``comparison.png``."""
    counts = Counter(m for per_store in curves.values() for m in per_store)
    common = [m for m, n in counts.items() if n > 1]
    section = {
        "stores": list(curves),
        "measures": {
            m: {name: s["measures"][m] for name, s in stores.items() if m in s["measures"]} for m in common
        },
    }
    rows = [
        OverlayRow("separation AUC", {m: {} for m in common}, reference=0.5),
        OverlayRow("same/cross ratio, class mean", {m: {} for m in common}, reference=1.0),
        OverlayRow("median S_rel over pairs", {m: {} for m in common}),
    ]
    for name, per_store in curves.items():
        for m, c in per_store.items():
            if m not in common:
                continue
            if c.classpairs is not None:
                assert c.auc is not None  # classification, as the class pairs say
                rows[0].data[m][name] = (c.steps, c.auc)
                rows[1].data[m][name] = (c.steps, nan_mean(c.same_cross("mean"), axis=1))
            else:
                rows[2].data[m][name] = (c.steps, c.quantiles[:, 1])
    rows = [row for row in rows if any(row.data.values())]
    if not rows:
        return section, []
    plot_overlay_grid(rows, out / "comparison.png", "Replay configurations side by side")
    return section, [{"file": "comparison.png", "caption": f"Stores compared: {', '.join(curves)}"}]


# ----------------------------------------------------------------------------- training


def _named_series(series: dict[str, dict[str, dict[str, Series]]]) -> dict[str, dict[str, Series]]:
    """One run's series as they are; several runs' series renamed ``<run> <metric>``."""
    if len(series) == 1:
        return next(iter(series.values()))
    named: dict[str, dict[str, Series]] = {}
    for run, by_kind in series.items():
        for kind, by_name in by_kind.items():
            for name, s in by_name.items():
                label = f"{run} {name}"
                named.setdefault(kind, {})[label] = Series(label, s.kind, s.steps, s.values)
    return named


def _training_summary(series: dict[str, dict[str, dict[str, Series]]]) -> dict[str, Any]:
    """Per kind and metric (logged in every run): the final value (mean over runs), its step
    (the first run's) and, for several runs, the sd of the final values."""
    runs = list(series.values())
    out: dict[str, Any] = {}
    for kind in runs[0]:
        out[kind] = {}
        for name, first in runs[0][kind].items():
            if not all(name in r[kind] for r in runs):
                continue
            finals = np.array([r[kind][name].values[-1] for r in runs])
            row = {"final": _num(finals.mean()), "step": int(first.steps[-1])}
            if len(runs) > 1:
                row["std"] = _num(band(finals).std)
            out[kind][name] = row
    return out


# ----------------------------------------------------------------------------- numbers


def _select_measures(results: list[ReplayResult], measures: list[str] | None) -> list[str]:
    stored = list(dict.fromkeys(m for r in results for m in r.measure_names))
    if measures is None:
        return stored
    unknown = [m for m in measures if m not in stored]
    if unknown:
        raise ResultsError(f"measure(s) {', '.join(unknown)} not in any store; stored: {', '.join(stored)}")
    return list(measures)


def _num(x: Any) -> float | None:
    return finite_or_none(float(x))


def _nums(x: np.ndarray) -> list[float | None]:
    return [_num(v) for v in x]

"""``analyze``: every replay store of a run directory or a run group (:mod:`recorder.rundir.group`)
into figures, a JSON summary and a report.

A run directory is analyzed as a group of one run. For a group, each store name is taken from
every run that holds it, on the snapshot steps done in all of them (:mod:`analyses.groups`):
curves are means over runs with bands of one standard deviation. Writes into
``PATH/analysis/`` (or ``out_dir``):

- ``<store>_classpairs_<measure>.png``: the paper's class-pair curves (classification), of the
  headline measure (:func:`analyses.headline.headline_measure`) unless measures are named;
- ``<store>_separation_auc.png``: the measures compared: separation AUC with its bootstrap
  interval over probes, and the same/cross ratio (classification);
- ``<store>_trajectory.png``: median S_rel over probe pairs with its quartile band (regression);
- ``<store>_phases.png``: the elastic-to-inelastic transition of each measure (regression, with
  enough snapshots);
- ``<store>_modules.png``: where elasticity lives, each module's share of the first-order change
  over training (stores replayed with ``--module-split``, :mod:`analyses.modules`);
- ``comparison.png``: stores side by side, when there are several (the same measures);
- ``training.png``: the training curves of ``metrics.jsonl``;
- ``summary.json``: the numbers (see :func:`analyze`), and ``report.html``: one self-contained
  page (:mod:`analyses.html`): headline sentences, the key figures and tables, the rest folded.

The figures (:mod:`analyses.figures`, matplotlib) are drawn only when asked for. A folder that
cannot be written, or a full disk, gives a one-line :class:`ResultsError`; files written before
stay complete (every file is written whole, then renamed into place).
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.bootstrap import AucEstimate, auc_with_ci
from analyses.curves import MeasureCurves, nan_mean
from analyses.groups import RunCurves, band, member_results, run_curves
from analyses.headline import headline, headline_measure, status_lines
from analyses.html import render_report
from analyses.modules import ModuleShares, describe, module_shares
from analyses.phases import Phases, detect_transition
from analyses.published import PAPER_MEASURES, PUBLISHED
from analyses.results import ReplayResult, eps_note
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
from recorder.rundir.files import (
    atomic_write_bytes,
    atomic_write_json,
    finite_or_none,
    make_folder,
    temp_sibling,
)
from recorder.rundir.group import is_group, read_group
from recorder.rundir.run import RunDir

BOOTSTRAP_REPLICATES = 200
CI_LEVEL = 0.95


def analyze(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    include_self: bool = False,
    measures: list[str] | None = None,
    stores: list[str] | None = None,
    figures: bool = True,
    replicates: int = BOOTSTRAP_REPLICATES,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Analyze every replay store of ``run_dir``; write figures, ``summary.json`` and ``report.html``.

    Args:
        run_dir: a run directory holding one or more ``<name>.zarr`` replay stores, or a run
            group whose runs hold them.
        out_dir: where to write; default ``run_dir/analysis``.
        include_self: count the self pairs ``i = j`` in the same-class cell (the paper's
            protocol, SPEC §5); the class-pair aggregates are recomputed from the measures
            when the stores hold the other choice. The paper table always includes them.
        measures: the measures to analyze (default: every stored one). The class-pair grids and
            the comparison figure show these; by default the headline measure's only
            (:func:`analyses.headline.headline_measure`).
        stores: the stores to analyze, by name (default: every one).
        figures: draw the figures (False: the numbers and the report only).
        replicates: bootstrap replicates of the separation AUC's interval (its cost grows with them).
        tensorboard: also write the curves as TensorBoard events into this folder
            (:mod:`analyses.tensorboard`).

    Returns the summary written to ``summary.json`` (numbers of a group are means over its runs):

    - ``run_dir``, ``out_dir``, ``task``, ``preset``, ``include_self``, ``runs`` (run names),
      ``group`` (``group.json``'s ``config``, None for a run directory);
    - ``stores``: per store ``paths`` (one per run), ``runs``, ``config``, ``dtype``,
      ``classification``, ``classes``, ``stored_include_self``, ``snapshots`` {done (common to
      the runs), stored (in the store, done or not), listed (in the run's manifest, or stored if
      more), first_step, last_step (of the done ones), last_listed_step, partial (fewer done than
      listed)},
      ``error_estimate_max`` and ``measures``: per
      measure ``median_S`` {first, final, time_average} (median over pairs ``i != j``) and, for
      classification, ``separation_auc`` {first, final, time_average, ci: {level, replicates,
      final: [lo, hi], time_average: [lo, hi]}, std_time_average (over runs)},
      ``same_cross_ratio`` {mean, median}: ``[K]`` time-averaged ratio per updated class (the
      SPEC §5 table; mean over runs), ``same_cross_ratio_std`` (over runs),
      ``same_cross_ratio_class_mean`` {mean, median}; for regression ``phases`` {mean: the
      transition of the run-mean trajectory, runs: run -> its transition}
      (:meth:`analyses.phases.Phases.to_json`);
      ``modules`` (only a store replayed with ``--module-split``): each module's share of the
      first-order change of same- and cross-class pairs at the final snapshot
      (:meth:`analyses.modules.ModuleShares.summary`);
    - ``paper`` (None unless the runs come from a preset of :data:`analyses.published.PUBLISHED`):
      ``data``, ``classes``, ``class_names``, ``test_acc`` {ours, std, published, metric: the
      metric of ours, ``train_sample_acc`` where logged (the published one's kind: training
      images), else ``test_acc``} and ``stores``:
      per classification store, per measure of :data:`PAPER_MEASURES` it holds, ``ours`` and
      ``std`` ``[K]`` (time-averaged same/cross ratio, self pairs included, mean and sd over
      runs) and ``published`` ``[K]`` or None;
    - ``skipped``: stores without a done snapshot or with a single probe (``run/store`` in a
      group) and runs of a group without a store, with the reason;
    - ``comparison`` (None with a single store): ``stores`` and ``measures``: per measure stored
      in several stores, per store, that store's measure summary;
    - ``training``: ``step`` and ``epoch`` (per-step and per-epoch metrics of ``metrics.jsonl``),
      each metric name -> {final, step} (its last value, mean over runs, and the step it was
      logged at; ``std`` over runs in a group);
    - ``figures``: [{file, caption, section}], files relative to ``out_dir`` (``section``: see
      :mod:`analyses.figures`);
    - ``tensorboard``: the folder of the TensorBoard events, or None;
    - ``status``: lines on the stores replayed in part and those skipped
      (:func:`analyses.headline.status_lines`); ``headline``: sentences on the results
      (:func:`analyses.headline.headline`).

    Non-finite numbers are written as null.

    Raises :class:`ResultsError` (a :class:`RunDirError`) when there is no usable store, a
    requested measure or store is not there, a stored array is damaged, or the output folder
    cannot be written.
    """
    path = Path(run_dir)
    group = read_group(path) if is_group(path) else None
    results = _select_stores(member_results(path), stores)  # run -> stores
    runs = {name: RunDir(path / name if group else path) for name in results}
    for member in runs.values():
        member.warn_if_unfinished()
    spec = next(iter(runs.values())).spec
    names = _select_measures([r for rs in results.values() for r in rs], measures)
    drawn = names if measures is not None else [headline_measure(names)]
    stores_by_name: dict[str, dict[str, ReplayResult]] = {}
    skipped = (
        {} if group is None else {m.name: "no replay store" for m in group.members if m.name not in results}
    )
    for run, rs in results.items():
        for r in rs:
            unusable = _unusable(r)
            if unusable:
                skipped[f"{run}/{r.name}" if group else r.name] = unusable
            else:
                stores_by_name.setdefault(r.name, {})[run] = r
    if not stores_by_name:
        reasons = "; ".join(f"{store}: {why}" for store, why in skipped.items())
        raise ResultsError(f"{path}: no replay store to analyze ({reasons})")
    out = _writable_folder(Path(out_dir) if out_dir is not None else path / "analysis")

    analyzed, curves = {}, {}
    for store, by_run in stores_by_name.items():
        analysis = _analyze_store(by_run, names, include_self, replicates)
        if analysis is None:
            skipped[store] = "no snapshot step done in every run"
            continue
        curves[store] = analysis
        analyzed[store] = _store_summary(by_run, {run: runs[run] for run in by_run}, analysis)
    if not analyzed:
        raise ResultsError(f"{path}: no replay store has a snapshot done in every run")
    shares = {s: x for s in analyzed if (x := module_shares(stores_by_name[s])) is not None}
    for store, x in shares.items():
        analyzed[store]["modules"] = x.summary()

    comparison = None
    mean_curves = {s: {m: a.runs.mean_curves() for m, a in per.items()} for s, per in curves.items()}
    if len(analyzed) > 1:
        comparison = _comparison(mean_curves, analyzed)
    series = {run: training_series(r.metrics()) for run, r in runs.items()}
    training = _training_summary(series)
    notes = []
    labels = next(iter(next(iter(stores_by_name.values())).values())).labels
    if spec.task == "classification" and labels is not None and len(np.unique(labels)) < 2:
        notes.append(
            "every probe is of one class: same-class/cross-class comparisons (class pairs, "
            "separation AUC, the paper's table) are undefined; record probes of two classes or more"
        )
    for store, by_run in stores_by_name.items():  # measures whose rows are mostly eps
        notes += [n for run, r in by_run.items() if (n := eps_note(r, f"{run}/{store}" if group else store))]

    summary: dict[str, Any] = {
        "run_dir": str(path),
        "out_dir": str(out),
        "task": spec.task,
        "preset": spec.preset,
        "include_self": include_self,
        "runs": list(results),
        "group": None if group is None else group.config,
        "stores": analyzed,
        "paper": _paper_section(spec, stores_by_name, analyzed, training),
        "skipped": skipped,
        "comparison": comparison,
        "training": training,
        "figures": [],
        "notes": notes,
        "tensorboard": None if tensorboard is None else str(tensorboard),
    }
    summary["status"], summary["headline"] = status_lines(summary), headline(summary)
    with _writing_into(out):
        if figures:
            summary["figures"] = _draw(
                curves, stores_by_name, mean_curves, drawn, shares, series, spec.extra, out, path.name
            )
        atomic_write_json(out / "summary.json", summary)
        atomic_write_bytes(out / "report.html", render_report(summary, out).encode(), durable=False)
    if tensorboard is not None:
        from analyses.tensorboard import write_events

        with _writing_into(Path(tensorboard)):
            write_events(mean_curves, Path(tensorboard))
    return summary


def _draw(
    curves: dict[str, dict[str, MeasureAnalysis]],
    stores_by_name: dict[str, dict[str, ReplayResult]],
    mean_curves: dict[str, dict[str, MeasureCurves]],
    drawn: list[str],
    shares: dict[str, ModuleShares],
    series: dict[str, dict[str, dict[str, Series]]],
    extra: dict[str, Any],
    out: Path,
    name: str,
) -> list[dict[str, str]]:
    """Every figure (:mod:`analyses.figures`, imported here: matplotlib only when drawing): of each
    store (with its module ``shares`` where it has them), of the ``drawn`` measures stored in
    several stores side by side, of the training of the run (or group) ``name``."""
    from analyses.figures import (
        class_names,
        comparison_figure,
        module_figure,
        store_figures,
        training_figure,
    )

    figures = []
    for store, analysis in curves.items():
        result = next(iter(stores_by_name[store].values()))
        figures += store_figures(store, result, analysis, class_names(result, extra), drawn, out)
        if store in shares:
            figures += module_figure(shares[store], out)
    if len(curves) > 1:
        counts = Counter(m for per_store in mean_curves.values() for m in per_store)
        figures += comparison_figure(mean_curves, [m for m in drawn if counts[m] > 1], out)
    return figures + training_figure(_named_series(series), f"{name}: training curves", out)


def _writable_folder(out: Path) -> Path:
    """``out``, created if need be, once a file could be created in it: before any work, so that
    a folder that cannot be written fails fast (:func:`_writing_into` says why)."""
    with _writing_into(out):
        make_folder(out)
        probe = temp_sibling(out / "summary.json")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        probe.unlink()
    return out


@contextmanager
def _writing_into(out: Path) -> Iterator[None]:
    """Within: a failure to write (a folder without write permission, a read-only file system, a
    full disk) raises a one-line :class:`ResultsError` that says where and what to do."""
    try:
        yield
    except OSError as e:
        where = e.filename or out
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResultsError(
                f"{where}: no space left on the device ({e.strerror}); free some space, or pass "
                "--out DIR to write the analysis elsewhere (files written before are complete)"
            ) from None
        raise ResultsError(
            f"{out}: cannot write the analysis there ({where}: {e.strerror}); pass --out DIR to "
            "write it elsewhere"
        ) from None


def format_table(summary: dict[str, Any]) -> str:
    """Short aligned text tables of ``summary``: per store and measure, the final and
    time-averaged separation AUC (with its bootstrap interval), the time-averaged same/cross
    ratio (from the mean and the median aggregates) and the final median S; then the SPEC §5
    table beside the published numbers and the regression phases, where there are any; notes
    on the protocol below."""
    lines = _aligned(SUMMARY_HEADER, summary_rows(summary)) + [SUMMARY_NOTE]
    if summary["paper"]:
        lines += ["", f"The paper's table, {summary['paper']['data']}:"]
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
    lines += [
        f"Where elasticity lives, {store}: {describe(s['modules'])}"
        for store, s in summary["stores"].items()
        if "modules" in s
    ]
    lines += summary["status"]
    if summary["headline"]:
        lines += ["", "In short:"] + [f"- {sentence}" for sentence in summary["headline"]]
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
    by_run: dict[str, ReplayResult], names: list[str], include_self: bool, replicates: int
) -> dict[str, MeasureAnalysis] | None:
    """Every requested measure of one store (run -> its result), the AUC's interval from
    ``replicates`` bootstrap replicates; None without a common step."""
    first = next(iter(by_run.values()))
    measures = [m for m in names if all(m in r.measure_names for r in by_run.values())]
    out = {}
    for m in measures:
        matrices = {run: r.measures[m].read() for run, r in by_run.items()}  # [S_r, P, P], read once
        runs, positions = run_curves(by_run, m, include_self, matrices)
        if len(runs.steps) == 0:
            return None
        auc = phases = None
        if first.is_classification:
            labels: list[np.ndarray] = []
            for r in by_run.values():
                assert r.labels is not None  # the runs of a store share its task
                labels.append(r.labels)
            auc = auc_with_ci(
                [matrices[run][positions[run]] for run in by_run],
                labels,
                replicates=replicates,
                level=CI_LEVEL,
                points=runs.stack("auc"),
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


def _store_summary(
    by_run: dict[str, ReplayResult], runs: dict[str, RunDir], analysis: dict[str, MeasureAnalysis]
) -> dict[str, Any]:
    """The summary of one store (run -> its result; run -> its run directory)."""
    r = next(iter(by_run.values()))
    steps = next(iter(analysis.values())).runs.steps if analysis else r.steps
    stored = max(x.num_stored for x in by_run.values())
    listed = max(stored, *(len(run.manifest) for run in runs.values()))
    last_steps = [int(x.stored_steps[-1]) for x in by_run.values() if x.num_stored]
    last_steps += [run.manifest[-1].step for run in runs.values() if run.manifest]
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
            "stored": stored,
            "listed": listed,
            "first_step": int(steps[0]),
            "last_step": int(steps[-1]),
            "last_listed_step": max(last_steps),
            "partial": len(steps) < listed,
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
            "first": _num(e.point[0]),
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
    # the published accuracy is on training images: compare it with ours of that kind where logged
    metric = "train_sample_acc" if "train_sample_acc" in training["epoch"] else "test_acc"
    acc = training["epoch"].get(metric, {})
    section: dict[str, Any] = {
        "data": published.data,
        "classes": list(spec.extra.get("classes", published.classes)),
        "class_names": spec.extra.get("class_names"),
        "test_acc": {
            "ours": acc.get("final"),
            "std": acc.get("std"),
            "published": published.test_acc,
            "metric": metric,
        },
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


# ----------------------------------------------------------------------------- comparison


def _comparison(curves: dict[str, dict[str, MeasureCurves]], stores: dict[str, Any]) -> dict[str, Any]:
    """The measures stored in more than one store, side by side: per measure and store, that
    store's measure summary."""
    counts = Counter(m for per_store in curves.values() for m in per_store)
    common = [m for m, n in counts.items() if n > 1]
    return {
        "stores": list(curves),
        "measures": {
            m: {name: s["measures"][m] for name, s in stores.items() if m in s["measures"]} for m in common
        },
    }


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


def _select_stores(
    results: dict[str, list[ReplayResult]], stores: list[str] | None
) -> dict[str, list[ReplayResult]]:
    """``results`` (run -> its stores) restricted to the stores named ``stores`` (None: all)."""
    if stores is None:
        return results
    stored = list(dict.fromkeys(r.name for rs in results.values() for r in rs))
    unknown = [s for s in stores if s not in stored]
    if unknown:
        raise ResultsError(f"store(s) {', '.join(unknown)} not found; stored: {', '.join(stored)}")
    chosen = {run: [r for r in rs if r.name in stores] for run, rs in results.items()}
    return {run: rs for run, rs in chosen.items() if rs}


def _unusable(result: ReplayResult) -> str:
    """Why the store ``result`` cannot be analyzed ("" when it can)."""
    if not result.num_snapshots:
        return "no completed snapshot"
    if len(result.targets) < 2:
        return "a single probe: S_rel is measured between pairs of probes"
    return ""


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

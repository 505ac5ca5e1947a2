"""The runs of a run group (:mod:`recorder.rundir.group`) side by side: one measure of one replay
store, taken from every run that holds it, on the snapshot steps that every such run has done.

A single run directory is a group of one. Shapes: ``R`` runs, ``S`` common snapshots, ``K``
classes. Bands over runs are the mean and the sample standard deviation (``ddof=1``; NaN for a
single run), NaN entries left out.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from analyses.curves import MeasureCurves, measure_curves, nan_mean
from analyses.results import ReplayResult, load_results
from recorder.rundir.group import is_group, read_group
from recorder.rundir.run import RunDir
from replay.store import store_paths


@dataclass
class Band:
    """Mean and sample standard deviation over runs: ``mean``, ``std`` ``[...]``."""

    mean: np.ndarray
    std: np.ndarray


def band(x: np.ndarray) -> Band:
    """The band of ``x`` ``[R, ...]`` over its first axis."""
    x = np.asarray(x, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one run, or all NaN: NaN
        std = np.nanstd(x, axis=0, ddof=1) if len(x) > 1 else np.full(x.shape[1:], np.nan)
    return Band(nan_mean(x), std)


def member_results(path: str | Path) -> dict[str, list[ReplayResult]]:
    """Run name -> its replay stores, for every member of the group ``path`` holding at least one
    (a plain run directory: itself, named after its folder). Raises
    :class:`~recorder.rundir.errors.RunDirError` for a path that is neither a run directory nor a
    group, :class:`~analyses.results.ResultsError` when no member has a store."""
    path = Path(path)
    if not is_group(path):
        RunDir(path)  # the clear error for a path that is no run directory
        return {path.name: load_results(path)}
    found = {}
    for member in read_group(path).members:
        if store_paths(member):
            found[member.name] = load_results(member)
    if not found:
        load_results(path)  # raises the "no replay stores" error, naming the group
    return found


@dataclass
class RunCurves:
    """One measure of one store over the runs that hold it.

    Attributes:
        store, measure: where the curves come from.
        runs: ``[R]`` run names.
        steps: ``[S]`` the snapshot steps done in every run.
        curves: ``[R]`` each run's :class:`MeasureCurves` on ``steps``.
    """

    store: str
    measure: str
    runs: list[str]
    steps: np.ndarray
    curves: list[MeasureCurves]

    def stack(self, name: str, stat: str = "mean") -> np.ndarray:
        """``[R, S, ...]``: ``quantiles`` ``[R, S, 3]``, ``auc`` ``[R, S]``, ``classpairs``
        ``[R, S, K, K]``, ``same_cross`` ``[R, S, K]`` (of ``stat``) or ``ratio_table`` ``[R, K]``."""
        if name == "classpairs":
            return np.stack([c.classpair(stat) for c in self.curves])
        if name in ("same_cross", "ratio_table"):
            return np.stack([getattr(c, name)(stat) for c in self.curves])
        return np.stack([getattr(c, name) for c in self.curves])

    def mean_curves(self) -> MeasureCurves:
        """The curves averaged over the runs (one run: its own curves)."""
        c = self.curves[0]
        return dataclasses.replace(
            c,
            quantiles=nan_mean(self.stack("quantiles")),
            auc=None if c.auc is None else nan_mean(self.stack("auc")),
            classpairs=None
            if c.classpairs is None
            else {stat: nan_mean(self.stack("classpairs", stat)) for stat in c.classpairs},
        )


def run_curves(
    results: dict[str, ReplayResult],
    measure: str,
    include_self: bool = False,
    matrices: dict[str, np.ndarray] | None = None,
) -> tuple[RunCurves, dict[str, np.ndarray]]:
    """The curves of ``measure`` in ``results`` (run name -> the run's store), on the common
    steps, and each run's done-snapshot positions ``[S]`` of those steps (to index its arrays).
    ``matrices``: run name -> ``measures/<measure>`` of its done snapshots, when already read."""
    common = sorted(set.intersection(*(set(r.steps.tolist()) for r in results.values())))
    positions = {name: np.searchsorted(r.steps, common) for name, r in results.items()}
    curves = []
    for name, r in results.items():
        S = None if matrices is None else matrices[name]
        c, keep = measure_curves(r, measure, include_self, S), positions[name]
        curves.append(
            dataclasses.replace(
                c,
                steps=c.steps[keep],
                quantiles=c.quantiles[keep],
                auc=None if c.auc is None else c.auc[keep],
                classpairs=None if c.classpairs is None else {s: a[keep] for s, a in c.classpairs.items()},
            )
        )
    store = next(iter(results.values())).name
    return RunCurves(store, measure, list(results), np.asarray(common, dtype=np.int64), curves), positions

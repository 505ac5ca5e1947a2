"""S_rel curves over training for one measure of one replay store (SPEC §4, §5).

Shapes: ``S`` done snapshots, ``P`` probes, ``K`` classes. ``A[s, a, b]`` is the class-pair
aggregate at snapshot ``s``: observed class ``a``, updated class ``b``.

- Class-pair curves ``A[:, a, b]``: the stored ``classpairs/<m>/<stat>`` when the store was
  aggregated with the requested ``include_self``, otherwise recomputed from ``measures/<m>``.
- The same/cross ratio of updated class ``b``: ``A[b, b] / mean_{a != b} A[a, b]``; its average
  over the snapshots is the paper's table (SPEC §5; the paper includes the self pairs).
- The separation AUC at every snapshot (SPEC §4).
- The trajectory summary: quartiles of ``S[i, j]`` over the pairs ``i != j`` at every snapshot
  (for regression, where there are no classes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from analyses.classpairs import separation_auc
from analyses.results import ReplayResult
from replay.classpairs import STATS, aggregate

QUANTILES = (25, 50, 75)


@dataclass
class MeasureCurves:
    """Curves of one measure of one store over its done snapshots.

    Attributes:
        store, measure: where they come from.
        steps: ``[S]`` training steps.
        quantiles: ``[S, 3]`` 25th, 50th and 75th percentile of ``S[i, j]`` over pairs ``i != j``.
        auc: ``[S]`` separation AUC; None for regression.
        classpairs: stat (``mean``, ``median``) -> ``[S, K, K]`` ``A[a, b]``; None for regression.
        include_self: whether ``classpairs`` include the self pairs ``i = j``.
    """

    store: str
    measure: str
    steps: np.ndarray
    quantiles: np.ndarray
    auc: np.ndarray | None
    classpairs: dict[str, np.ndarray] | None
    include_self: bool

    def classpair(self, stat: str = "mean") -> np.ndarray:
        """``[S, K, K]`` ``classpairs[stat]``; classification only."""
        assert self.classpairs is not None  # class pairs exist for classification runs only
        return self.classpairs[stat]

    def same_cross(self, stat: str = "mean") -> np.ndarray:
        """``[S, K]`` same/cross ratio of each updated class at every snapshot."""
        return same_cross_ratio(self.classpair(stat))

    def ratio_table(self, stat: str = "mean") -> np.ndarray:
        """``[K]`` time-averaged same/cross ratio per updated class (the SPEC §5 table)."""
        return nan_mean(self.same_cross(stat))


def measure_curves(
    result: ReplayResult, measure: str, include_self: bool = False, S: np.ndarray | None = None
) -> MeasureCurves:
    """Derive all the curves of ``measures/<measure>`` of ``result``, read once (or given as ``S``
    ``[S, P, P]``, the array as :meth:`~analyses.results.SnapshotArray.read` reads it)."""
    if S is None:
        S = result.measures[measure].read()  # [S, P, P]
    off = ~np.eye(S.shape[-1], dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN snapshots stay NaN
        quantiles = np.nanpercentile(S[:, off], QUANTILES, axis=-1).T  # [S, 3]
    auc: np.ndarray | None = None
    classpairs: dict[str, np.ndarray] | None = None
    labels = result.labels
    if labels is not None:  # result.is_classification
        auc = separation_auc(S, labels)
        if include_self == result.include_self:
            classpairs = {stat: result.classpairs[measure][stat].read() for stat in STATS}
        else:
            assert result.classes is not None  # classification stores have classes
            K = len(result.classes)
            classpairs = {stat: aggregate(S, labels, K, include_self, stat) for stat in STATS}
    return MeasureCurves(
        store=result.name,
        measure=measure,
        steps=result.steps,
        quantiles=quantiles,
        auc=auc,
        classpairs=classpairs,
        include_self=include_self,
    )


def same_cross_ratio(A: np.ndarray) -> np.ndarray:
    """``[..., K]``: ``A[..., b, b] / mean_{a != b} A[..., a, b]`` for ``A`` ``[..., K, K]``."""
    eye = np.eye(A.shape[-1], dtype=bool)
    same = np.diagonal(A, axis1=-2, axis2=-1)
    cross = nan_mean(np.where(eye, np.nan, A), axis=-2)  # cells without pairs (NaN) left out
    with np.errstate(divide="ignore", invalid="ignore"):
        return same / cross


def nan_mean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Mean of ``x`` along ``axis`` with NaN entries left out (NaN where all are NaN).

    Along axis 0 of an ``[S, ...]`` array: the time average over the snapshots.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(np.asarray(x, dtype=np.float64), axis=axis)

"""A bootstrap confidence interval for the separation AUC (SPEC §4), resampling the probes.

One replicate draws, within each class, as many probes as the class has, with replacement: probe
``i`` is drawn ``c_i`` times. Its pairs are the pairs ``(i, j)`` of distinct probes (``i != j``),
each counted ``c_i * c_j`` times, and its statistic is the separation AUC of that weighted set
(ties count one half; NaN entries are left out). The runs of a group are resampled
independently and averaged replicate by replicate: the interval is that of the mean over runs
under probe sampling (the spread over runs is reported apart). Intervals are percentile
intervals; the point estimate is the AUC of the probes as they are.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix

from analyses.classpairs import separation_auc
from analyses.curves import nan_mean


@dataclass
class AucEstimate:
    """The separation AUC over ``S`` snapshots, mean over runs, with its bootstrap interval.

    Attributes:
        point, low, high: ``[S]`` the AUC at each snapshot and its interval.
        average, average_low, average_high: the time-averaged AUC and its interval.
        final_low, final_high: the interval of the AUC at the last snapshot.
        level: the interval's coverage (0.95: the 2.5th to 97.5th percentile).
        replicates: bootstrap replicates drawn.
    """

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray
    average: float
    average_low: float
    average_high: float
    final_low: float
    final_high: float
    level: float
    replicates: int


def resample_counts(labels: np.ndarray, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, P]`` times each probe is drawn, a stratified resample (per class) in each replicate."""
    labels = np.asarray(labels)
    counts = np.zeros((replicates, len(labels)))
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        draws = rng.integers(0, len(members), size=(replicates, len(members)))  # [B, n_c]
        counts[:, members] = (draws[:, :, None] == np.arange(len(members))).sum(axis=1)
    return counts


def weighted_auc(S: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``[B, T]`` separation AUC of ``S`` ``[T, P, P]`` with pair ``(i, j)`` weighted ``c_i c_j``
    for the probe counts ``counts`` ``[B, P]`` (all ones: :func:`analyses.classpairs.separation_auc`).

    At each snapshot the distinct same-class values ``v_1 < ... < v_m`` cut the cross-class
    values into ``2 m + 1`` bins (below ``v_1``, equal to ``v_1``, between ``v_1`` and ``v_2``,
    ...). One sparse product sums the weights of every replicate by bin (``G`` ``[2m + 1, B]``)
    and by same-class value (``H`` ``[m, B]``); the cross weight below ``v_k`` and that tied with
    it follow from the cumulative sums of ``G``. The weights are integers, so every sum is exact
    and the result does not depend on the order of summation.
    """
    labels = np.asarray(labels)
    ii, jj = np.nonzero(~np.eye(len(labels), dtype=bool))  # pairs i != j
    same = labels[ii] == labels[jj]
    weights = np.ascontiguousarray((counts[:, ii] * counts[:, jj]).T)  # [n_pairs, B]
    out = np.full((len(counts), len(S)), np.nan)
    for t, matrix in enumerate(np.asarray(S, dtype=np.float64)):
        values = matrix[ii, jj]
        keep = ~np.isnan(values)
        pos, cross = np.flatnonzero(keep & same), np.flatnonzero(keep & ~same)
        levels, level = np.unique(values[pos], return_inverse=True)  # [m], [n_same]
        # bin 2k: between levels k - 1 and k; bin 2k + 1: equal to level k
        x = values[cross]
        bins = np.searchsorted(levels, x, "left") + np.searchsorted(levels, x, "right")
        m = len(levels)
        G = _sum_by(bins, cross, 2 * m + 1, weights)  # [2m + 1, B] cross weight per bin
        H = _sum_by(level, pos, m, weights)  # [m, B] same-class weight per level
        below = np.zeros((2 * m + 2, len(counts)))
        np.cumsum(G, axis=0, out=below[1:])  # below[2k + 1]: cross weight below level k
        wins = (H * (below[1:-1:2] + below[2::2])).sum(axis=0) / 2  # ties count one half
        total = H.sum(axis=0) * below[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, t] = np.where(total > 0, wins / total, np.nan)
    return out


def _sum_by(groups: np.ndarray, pairs: np.ndarray, num_groups: int, weights: np.ndarray) -> np.ndarray:
    """``[num_groups, B]``: the rows ``weights[pairs]`` summed by ``groups`` (one sparse product)."""
    one_hot = csr_matrix((np.ones(len(pairs)), (groups, pairs)), shape=(num_groups, len(weights)))
    return np.asarray(one_hot @ weights)


def auc_with_ci(
    matrices: list[np.ndarray],
    labels: list[np.ndarray],
    replicates: int = 500,
    level: float = 0.95,
    seed: int = 0,
    points: np.ndarray | None = None,
) -> AucEstimate:
    """The separation AUC of runs ``r`` (``matrices[r]`` ``[S, P_r, P_r]`` on common snapshots,
    ``labels[r]`` ``[P_r]``), mean over runs, with a bootstrap interval over the probes.
    ``points`` ``[R, S]``: the AUC of each run at each snapshot, when already computed."""
    rng = np.random.default_rng(seed)
    if points is None:
        points = np.stack([separation_auc(S, y) for S, y in zip(matrices, labels, strict=True)])
    point = np.mean(points, axis=0)  # [S]
    boot = np.mean(
        [
            weighted_auc(S, y, resample_counts(y, replicates, rng))
            for S, y in zip(matrices, labels, strict=True)
        ],
        axis=0,
    )  # [B, S]
    q = [50 * (1 - level), 50 * (1 + level)]
    low, high = _percentiles(boot, q)
    (average_low, average_high) = _percentiles(nan_mean(boot, axis=1), q)
    return AucEstimate(
        point=point,
        low=low,
        high=high,
        average=float(nan_mean(point)),
        average_low=float(average_low),
        average_high=float(average_high),
        final_low=float(low[-1]),
        final_high=float(high[-1]),
        level=level,
        replicates=replicates,
    )


def _percentiles(x: np.ndarray, q: list[float]) -> np.ndarray:
    """Percentiles ``q`` of ``x`` ``[B, ...]`` over the replicates, NaN replicates left out
    (NaN where all are): ``[len(q), ...]``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanpercentile(x, q, axis=0)

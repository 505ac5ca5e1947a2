"""A bootstrap confidence interval for the separation AUC (SPEC §4), resampling the probes.

One replicate draws, within each class, as many probes as the class has, with replacement: probe
``i`` is drawn ``c_i`` times. Its pairs are the pairs ``(i, j)`` of distinct probes (``i != j``),
each counted ``c_i * c_j`` times, and its statistic is the separation AUC of that weighted set
(ties count one half; NaN entries are left out). The runs of a group are resampled
independently and averaged replicate by replicate: the interval is that of the mean over runs
under probe sampling (the spread over runs is reported apart). Intervals are percentile
intervals; the point estimate is the AUC of the probes as they are.

Above :data:`MAX_PAIRS` pairs (more than about 300 probes), each replicate's AUC is taken over one
fixed random subset of :data:`MAX_PAIRS` pairs (the same in every replicate and snapshot), which
keeps the cost of a replicate bounded whatever the number of probes. The subset adds to each
replicate a sampling error of at most ``0.5 / sqrt(MAX_PAIRS)`` in standard deviation (0.0016),
small beside the spread from resampling hundreds of probes, and it widens the interval rather
than narrowing it; the point estimate stays that of every pair.
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
    for the probe counts ``counts`` ``[B, P]`` (integers; all ones:
    :func:`analyses.classpairs.separation_auc`), over at most :data:`MAX_PAIRS` pairs (module
    docstring).

    At each snapshot the distinct same-class values ``v_1 < ... < v_m`` cut the cross-class
    values into ``2 m + 1`` bins (below ``v_1``, equal to ``v_1``, between ``v_1`` and ``v_2``,
    ...). The snapshots go in blocks: one sparse product sums the weights of every replicate by
    bin (``G`` ``[sum of 2m + 1, B]``) and by same-class value (``H`` ``[sum of m, B]``) over a
    whole block; the cross weight below ``v_k`` and that tied with it follow from the cumulative
    sums of ``G``. The weights are integers and a block's sums stay below ``2**24``, so every sum
    is exact (in float32, float64 where a block's weight is larger) and the result does not
    depend on the order of summation nor on the blocks.
    """
    labels = np.asarray(labels)
    ii, jj = np.nonzero(~np.eye(len(labels), dtype=bool))  # pairs i != j
    if len(ii) > MAX_PAIRS:  # module docstring
        subset = np.sort(np.random.default_rng(0).choice(len(ii), MAX_PAIRS, replace=False))
        ii, jj = ii[subset], jj[subset]
    same = labels[ii] == labels[jj]
    values = np.asarray(S, dtype=np.float64)[:, ii, jj]  # [T, n_pairs]
    snapshot_weight = max(float(np.max(counts.sum(axis=1), initial=0)) ** 2, 1.0)  # >= the pair weight
    rows = (3 * int(same.sum()) + 1) * max(len(counts), 1)  # >= entries of G and H per snapshot
    block = max(1, min(_BLOCK_ENTRIES // rows, int(_EXACT_FLOAT32 // snapshot_weight)))
    exact32 = block * snapshot_weight <= _EXACT_FLOAT32
    weights = np.ascontiguousarray(
        (counts[:, ii] * counts[:, jj]).T, dtype=np.float32 if exact32 else np.float64
    )  # [n_pairs, B]
    out = np.full((len(counts), len(S)), np.nan)
    for start in range(0, len(S), block):
        out[:, start : start + block] = _block_auc(values[start : start + block], same, weights)
    return out


MAX_PAIRS = 100_000  # pairs a replicate's AUC is taken over (module docstring)
_BLOCK_ENTRIES = 2**22  # entries of G and H per block (memory)
_EXACT_FLOAT32 = 2**22  # a block's cross weight: its sums, doubled, stay exact in float32


def _block_auc(values: np.ndarray, same: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``[B, T]`` weighted separation AUC of the pair values ``values`` ``[T, n_pairs]`` (NaN left
    out), ``same`` ``[n_pairs]`` marking same-class pairs, ``weights`` ``[n_pairs, B]``."""
    T, n = values.shape
    rank = _dense_rank(values)  # [T, n_pairs]
    keep = ~np.isnan(values)
    ts, qs = np.nonzero(keep & same)  # same-class pairs
    tc, qc = np.nonzero(keep & ~same)  # cross-class pairs
    is_level = np.zeros((T, n), dtype=np.int64)  # rank d of snapshot t is a same-class value
    is_level[ts, rank[ts, qs]] = 1
    upto = np.cumsum(is_level, axis=1)  # [T, n]: same-class values of rank <= d
    m = is_level.sum(axis=1)  # [T] distinct same-class values per snapshot
    off_g = np.concatenate([[0], np.cumsum(2 * m + 1)])  # [T + 1] first bin of each snapshot
    off_h = np.concatenate([[0], np.cumsum(m)])  # [T + 1] first level of each snapshot
    dc = rank[tc, qc]
    bins = 2 * upto[tc, dc] - is_level[tc, dc]  # bin 2k: below level k, 2k + 1: equal to it
    level = upto[ts, rank[ts, qs]] - 1
    GH = _sum_by(
        np.concatenate([off_g[tc] + bins, off_g[-1] + off_h[ts] + level]),
        np.concatenate([qc, qs]),
        off_g[-1] + off_h[-1],
        weights,
    )
    G, H = GH[: off_g[-1]], GH[off_g[-1] :].astype(np.float64)  # [sum 2m + 1, B], [sum m, B]
    below = np.zeros((off_g[-1] + 1, weights.shape[1]), dtype=weights.dtype)
    np.cumsum(G, axis=0, out=below[1:])  # below[r]: the block's cross weight in bins < r
    snapshot = np.repeat(np.arange(T), m)  # [sum m] snapshot of each level
    bin_2k = off_g[snapshot] + 2 * (np.arange(len(snapshot)) - off_h[snapshot])
    start = below[off_g[snapshot]]  # cross weight of the snapshots before
    wins = H * (below[bin_2k + 1] - start + (below[bin_2k + 2] - start)).astype(np.float64)
    levels = np.arange(len(snapshot))
    cross = (below[off_g[1:]] - below[off_g[:-1]]).astype(np.float64)  # [T, B]
    total = _sum_by(snapshot, levels, T, H) * cross
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, _sum_by(snapshot, levels, T, wins) / 2 / total, np.nan).T


def _dense_rank(values: np.ndarray) -> np.ndarray:
    """``[T, n]``: the rank of each value among the distinct values of its row (NaN last)."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    step = np.ones(values.shape, dtype=np.int64)
    step[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    rank = np.empty(values.shape, dtype=np.int64)
    np.put_along_axis(rank, order, np.cumsum(step, axis=1) - 1, axis=1)
    return rank


def _sum_by(groups: np.ndarray, pairs: np.ndarray, num_groups: int, weights: np.ndarray) -> np.ndarray:
    """``[num_groups, B]``: the rows ``weights[pairs]`` summed by ``groups`` (one sparse product)."""
    one_hot = csr_matrix(
        (np.ones(len(pairs), dtype=weights.dtype), (groups, pairs)), shape=(num_groups, len(weights))
    )
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

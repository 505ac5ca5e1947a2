"""Class-pair aggregates and the separation statistic of SPEC §4.

``S`` is a stack of measure matrices ``[..., P, P]``: row ``i`` the probe updated on, column ``j``
the probe observed. ``labels`` ``[P]`` are the probes' classes.

- ``A[a, b] = stat{ S[i, j] : class(i) = b, class(j) = a }`` (observed class ``a``, updated class
  ``b``); the self pairs ``i = j`` are excluded unless ``include_self`` (the paper's protocol).
- The separation AUC: the probability that a random same-class pair ``(i, j)``, ``i != j``, has a
  larger ``S`` than a random cross-class pair (ties count one half); 0.5 means no separation.

NaN entries (from non-finite weights) are left out of every statistic.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import rankdata

STATS = ("mean", "median")


def pair_masks(labels: np.ndarray, num_classes: int, include_self: bool = False) -> np.ndarray:
    """Boolean masks ``[K, K, P, P]``: ``masks[a, b, i, j]`` selects class(i) = b, class(j) = a."""
    labels = np.asarray(labels)
    onehot = labels[:, None] == np.arange(num_classes)[None, :]  # [P, K]
    masks = onehot.T[None, :, :, None] & onehot.T[:, None, None, :]  # [a, b, i, j]
    if not include_self:
        masks = masks & ~np.eye(len(labels), dtype=bool)
    return masks


def aggregate(
    S: np.ndarray, labels: np.ndarray, num_classes: int, include_self: bool = False, stat: str = "mean"
) -> np.ndarray:
    """Class-pair aggregate ``[..., K, K]`` of ``S`` ``[..., P, P]``; NaN where a cell has no pairs."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}")
    S = np.asarray(S, dtype=np.float64)
    masks = pair_masks(labels, num_classes, include_self)
    fn = np.nanmean if stat == "mean" else np.nanmedian
    out = np.full(S.shape[:-2] + (num_classes, num_classes), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        for a in range(num_classes):
            for b in range(num_classes):
                m = masks[a, b]
                if m.any():
                    out[..., a, b] = fn(S[..., m], axis=-1)
    return out


def separation_auc(S: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Separation AUC ``[...]`` of ``S`` ``[..., P, P]`` (Mann-Whitney U / (n_same * n_cross))."""
    S = np.asarray(S, dtype=np.float64)
    labels = np.asarray(labels)
    same = labels[:, None] == labels[None, :]
    off = ~np.eye(len(labels), dtype=bool)
    same_sel, cross_sel = same & off, ~same
    flat = S.reshape((-1,) + S.shape[-2:])
    out = np.full(flat.shape[0], np.nan)
    for k, mat in enumerate(flat):
        s, c = mat[same_sel], mat[cross_sel]
        s, c = s[~np.isnan(s)], c[~np.isnan(c)]
        if len(s) == 0 or len(c) == 0:
            continue
        ranks = rankdata(np.concatenate([s, c]))
        u = ranks[: len(s)].sum() - len(s) * (len(s) + 1) / 2
        out[k] = u / (len(s) * len(c))
    return out.reshape(S.shape[:-2])

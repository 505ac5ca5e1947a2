"""The separation statistic of class pairs (the aggregates ``A`` themselves are computed by
:mod:`replay.classpairs`, and the replay store holds them).

``S`` is a stack of measure matrices ``[..., P, P]``: row ``i`` the probe updated on, column ``j``
the probe observed. ``labels`` ``[P]`` are the probes' classes.

- The separation AUC: the probability that a random same-class pair ``(i, j)``, ``i != j``, has a
  larger ``S`` than a random cross-class pair (ties count one half); 0.5 means no separation.

NaN entries (from non-finite weights) are left out of every statistic.
"""

from __future__ import annotations

import numpy as np


def separation_auc(S: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Separation AUC ``[...]`` of ``S`` ``[..., P, P]``: Mann-Whitney's U / (n_same * n_cross),
    U counting for each same-class value the cross-class values below it and half those equal
    to it (a sum of halves: exact)."""
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
        c = np.sort(c)
        u = (np.searchsorted(c, s, "left").sum() + np.searchsorted(c, s, "right").sum()) / 2
        out[k] = u / (len(s) * len(c))
    return out.reshape(S.shape[:-2])

"""Class-pair aggregates of SPEC §4, which the replay store holds as ``classpairs/<m>/<stat>``.

``S`` is a stack of measure matrices ``[..., P, P]``: row ``i`` the probe updated on, column ``j``
the probe observed. ``labels`` ``[P]`` are the probes' classes (indices ``0 .. K-1``).

``A[a, b] = stat{ S[i, j] : class(i) = b, class(j) = a }`` (observed class ``a``, updated class
``b``); the self pairs ``i = j`` are excluded unless ``include_self`` (the paper's protocol). NaN
entries (from non-finite weights) are left out of every statistic.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

STATS = ("mean", "median")


def aggregate(
    S: np.ndarray, labels: np.ndarray, num_classes: int, include_self: bool = False, stat: str = "mean"
) -> np.ndarray:
    """Class-pair aggregate ``[..., K, K]`` of ``S`` ``[..., P, P]``; NaN where a cell has no pairs.

    Each cell reads its own block of rows and columns (memory: one block, not ``K^2`` masks of
    ``P x P``), its values in the order of ``(i, j)``."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {STATS}")
    S = np.asarray(S, dtype=np.float64)
    labels = np.asarray(labels)
    members = [np.flatnonzero(labels == k) for k in range(num_classes)]
    fn = np.nanmean if stat == "mean" else np.nanmedian
    out = np.full(S.shape[:-2] + (num_classes, num_classes), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells stay NaN
        for a, observed in enumerate(members):
            for b, updated in enumerate(members):
                block = S[..., updated[:, None], observed[None, :]]  # [..., rows i, columns j]
                keep = np.ones(block.shape[-2:], dtype=bool)
                if a == b and not include_self:
                    keep &= ~np.eye(len(updated), dtype=bool)
                if keep.any():
                    out[..., a, b] = fn(block[..., keep], axis=-1)
    return out


def class_labels(targets: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The classes of a classification run's probe targets ``[P]``: the index of each probe's
    class ``[P]`` in the sorted distinct labels, and those labels (the ``K`` axis)."""
    classes = sorted(int(c) for c in np.unique(targets))
    position = {c: k for k, c in enumerate(classes)}
    return np.array([position[int(t)] for t in targets], dtype=np.int64), classes


def pair_sums(
    values: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, num_classes: int, include_self: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums and counts ``[..., K, K]`` (observed class ``a``, updated class ``b``) of the finite
    ``values`` ``[..., B, P]`` of the updated probes ``rows`` ``[B]`` against every probe, probe
    classes ``labels`` ``[P]``: one block's part of a class-pair mean (self pairs left out unless
    ``include_self``)."""
    onehot = torch.nn.functional.one_hot(labels, num_classes).to(values.dtype)  # [P, K]
    valid = values.isfinite()
    if not include_self:
        valid &= torch.arange(values.shape[-1], device=values.device) != rows[:, None]
    kept = torch.where(valid, values, 0)
    sums = torch.einsum("...bp,bk,pa->...ak", kept, onehot[rows], onehot)
    counts = torch.einsum("...bp,bk,pa->...ak", valid.to(values.dtype), onehot[rows], onehot)
    return sums, counts

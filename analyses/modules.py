"""Where elasticity lives: each module's share of the first-order change over training.

A store replayed with ``--module-split`` holds ``module_share`` ``[S, M, K, K]`` (snapshot, module,
observed_class, updated_class) and the ``M`` module names. With ``U_i`` the update on probe ``i``,
``U_i^(m)`` its part in module ``m``'s parameters and ``J_j`` the Jacobian of probe ``j``'s outputs,
module ``m``'s share of the first-order change of ``j`` is

    share_m[i, j] = <J_j U_i^(m), J_j U_i> / ||J_j U_i|| / (||J_i U_i|| + ratio_eps),

the part of ``m``'s change along the whole change, in units of the self change: the shares of
the modules sum to the ``linear`` measure ``S[i, j]``. ``module_share[s, m, a, b]`` is their mean
over the pairs with ``class(j) = a`` (observed), ``class(i) = b`` (updated), as the class-pair
means of the measures (self pairs as the store's ``include_self``).

Per done snapshot and module (``S`` done snapshots, ``M`` modules; cells without pairs, NaN,
left out):

- **same-class share** ``[S, M]``: the mean of the diagonal cells ``a = b``;
- **cross-class share** ``[S, M]``: the mean of the cells ``a != b``;
- **fraction** ``[S, M]``: a share over the sum of the modules' shares (the total, the class-pair
  mean of ``linear``), NaN where the total is 0. The fractions of the modules sum to 1; a module
  whose change points against the whole change has a negative share and fraction.

For a run group the shares are means over the runs, on the snapshot steps done in every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analyses.curves import nan_mean
from analyses.results import ReplayResult
from recorder.rundir.errors import ResultsError
from recorder.rundir.files import finite_or_none

KINDS = {"same": "same-class pairs", "cross": "cross-class pairs"}


def same_cross_shares(module_share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same-class and the cross-class share ``[S, M]`` each of ``module_share`` ``[S, M, K, K]``
    (see the module docstring)."""
    off = ~np.eye(module_share.shape[-1], dtype=bool)
    same = nan_mean(np.diagonal(module_share, axis1=-2, axis2=-1), axis=-1)
    return same, nan_mean(module_share[..., off], axis=-1)


@dataclass
class ModuleShares:
    """Each module's share of the first-order change of one store (mean over its runs).

    Attributes:
        store: the store's name; modules: the ``M`` module names.
        steps: ``[S]`` training step of each snapshot (done in every run).
        same, cross: ``[S, M]`` the same-class and the cross-class share of each module.
        include_self: whether the store's class-pair means count the self pairs.
        runs: how many runs the shares are means over.
    """

    store: str
    modules: tuple[str, ...]
    steps: np.ndarray
    same: np.ndarray
    cross: np.ndarray
    include_self: bool
    runs: int

    def share(self, kind: str) -> np.ndarray:
        """``[S, M]`` the share of each module over the pairs ``kind`` (a key of :data:`KINDS`)."""
        return self.same if kind == "same" else self.cross

    def total(self, kind: str) -> np.ndarray:
        """``[S]`` the modules' shares summed: the class-pair mean of ``linear``."""
        return self.share(kind).sum(axis=1)

    def fraction(self, kind: str) -> np.ndarray:
        """``[S, M]`` each module's share over the total (NaN where the total is 0)."""
        total = self.total(kind)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total != 0, self.share(kind) / total, np.nan)

    def summary(self) -> dict[str, Any]:
        """The final snapshot as JSON: ``step``, ``snapshots``, ``runs``, ``include_self``,
        ``modules`` ``[M]``, and ``[M]`` lists aligned with it: ``same_class``, ``cross_class``
        (shares), ``same_class_fraction``, ``cross_class_fraction``; ``total`` {same_class,
        cross_class} (the class-pair mean of ``linear``). Non-finite numbers as None."""
        out: dict[str, Any] = {
            "step": int(self.steps[-1]),
            "snapshots": len(self.steps),
            "runs": self.runs,
            "include_self": self.include_self,
            "modules": list(self.modules),
        }
        for kind in KINDS:
            out[f"{kind}_class"] = _nums(self.share(kind)[-1])
            out[f"{kind}_class_fraction"] = _nums(self.fraction(kind)[-1])
        out["total"] = {f"{kind}_class": finite_or_none(float(self.total(kind)[-1])) for kind in KINDS}
        return out


def module_shares(by_run: dict[str, ReplayResult]) -> ModuleShares | None:
    """The module shares of one store (run name -> the run's store) on the snapshot steps done in
    every run, means over the runs; None unless every run's store holds ``module_share``.

    Raises :class:`ResultsError` when the runs' stores split the model into different modules."""
    results = list(by_run.values())
    if any(r.module_share is None for r in results):
        return None
    first = results[0]
    for name, r in by_run.items():
        if r.modules != first.modules:
            raise ResultsError(
                f"{r.path}: modules {', '.join(r.modules)} in run {name}, {', '.join(first.modules)} in "
                f"{next(iter(by_run))}: the runs of a group split the same model"
            )
    common = sorted(set.intersection(*(set(r.steps.tolist()) for r in results)))
    same, cross = [], []
    for r in results:
        assert r.module_share is not None  # checked above
        keep = np.searchsorted(r.steps, common)
        s, c = same_cross_shares(r.module_share.read()[keep])
        same.append(s)
        cross.append(c)
    return ModuleShares(
        store=first.name,
        modules=first.modules,
        steps=np.asarray(common, dtype=np.int64),
        same=nan_mean(np.stack(same)),
        cross=nan_mean(np.stack(cross)),
        include_self=first.include_self,
        runs=len(results),
    )


def describe(summary: dict[str, Any]) -> str:
    """A sentence on :meth:`ModuleShares.summary`: the module that carries the largest part of
    the same-class and of the cross-class change at the final snapshot."""
    largest = {}
    for kind, pairs in KINDS.items():
        fractions = summary[f"{kind}_class_fraction"]
        known = [(f, m) for f, m in zip(fractions, summary["modules"], strict=True) if f is not None]
        if known:
            largest[pairs] = max(known)
    at = f"At step {summary['step']}"
    if not largest:
        return f"{at} the first-order change is zero or unknown."
    if len({m for _, m in largest.values()}) == 1:
        m = next(iter(largest.values()))[1]
        parts = ", ".join(f"{f:.0%} of it for {pairs}" for pairs, (f, _) in largest.items())
        return f"{at}, module {m} carries the largest part of the first-order change: {parts}."
    parts = "; ".join(f"module {m} for {pairs} ({f:.0%})" for pairs, (f, m) in largest.items())
    return f"{at}, the largest part of the first-order change comes from {parts}."


def _nums(x: np.ndarray) -> list[float | None]:
    return [finite_or_none(float(v)) for v in x]

"""The linearisation gap: how far a replay's exact output change is from its first-order
prediction, per snapshot, from a store holding both a finite measure and ``linear``.

The finite measure (``orig_logits_l2`` for classification, ``orig_outputs_l2`` for regression)
has the numerator ``F[i, j] = ||D[i, j]||``, the exact change ``D[i, j] = f(x_j; w + U_i) -
f(x_j; w)``; ``linear`` has ``L[i, j] = ||J_j . U_i||``, the same norm of the first-order change.
A store keeps the ratios ``S[i, j] = N[i, j] / (N[i, i] + eps)`` (``eps``: its ``ratio_eps``) and
the self changes ``N[i, i]`` (``self_change/<m>``), so ``N[i, j] = S[i, j] (N[i, i] + eps)``. A
store written before it kept self changes still gives them where ``eps`` is positive and the
store float64 (every precision but ``float32``): on the diagonal ``S[i, i] = N[i, i] / (N[i, i] +
eps)``, so ``N[i, i] = eps S[i, i] / (1 - S[i, i])``, exact while ``1 - S[i, i]`` is resolved: its
rounding, ``1.1e-16``, is a relative error of about ``1.1e-16 N[i, i] / eps``. Rows where ``1 -
S[i, i]`` falls below :data:`RESOLVED` (``N[i, i]`` above ``1e9 eps``: relative error above about
``1e-7``) are left out.

Per snapshot:

- **change gap** ``sqrt(sum (F - L)^2) / sqrt(sum F^2)`` over every pair of the resolved rows (self
  pairs included): the relative difference between the sizes of the exact and first-order
  changes. As ``| ||a|| - ||b|| | <= ||a - b||``, it is a lower bound of the relative gap between
  the changes themselves, ``||D - J U||_F / ||D||_F``;
- **vector gap** (a store that holds ``linearisation_gap``, written by replay from the change
  vectors themselves): the median and the largest over updated probes ``i`` of
  ``||D[i] - J U_i|| / ||D[i]||`` (over every observed probe and output);
- **measure gap** ``||S_f - S_l||_F / ||S_f||_F`` over the pairs ``i != j``: what is left of the
  change gap in S_rel, where each row is divided by its own self change (a gap common to a row
  cancels);
- the store's estimated relative error of its measures: gaps below it are not resolved.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.plots import OverlayRow, plot_overlay_grid
from analyses.results import ReplayResult
from recorder.rundir.files import atomic_write_json, make_folder, to_json
from replay.store import open_store

FINITE = ("orig_logits_l2", "orig_outputs_l2")  # the finite measures with linear's norm (l2 of outputs)
RESOLVED = 1e-9  # smallest 1 - S[i, i] from which N[i, i] is recovered


def numerators(
    S: np.ndarray, eps: float, own: np.ndarray | None = None, from_diagonal: bool = True
) -> np.ndarray:
    """The numerators ``N`` ``[..., P, P]`` of the ratios ``S = N / (diag(N) + eps)`` ``[..., P, P]``
    from the self changes ``own`` ``[..., P]`` where they are finite, else (``from_diagonal``: S in
    float64) from the diagonal of ``S``; NaN in the rows where neither resolves them (module
    docstring)."""
    diagonal = np.diagonal(S, axis1=-2, axis2=-1)  # [..., P]
    room = 1 - diagonal
    resolved = (room >= RESOLVED) & (eps > 0) & from_diagonal
    recovered = np.where(resolved, eps * diagonal / np.where(resolved, room, 1), np.nan)
    if own is not None:
        recovered = np.where(np.isfinite(own), own, recovered)
    return S * (recovered + eps)[..., None]


@dataclass
class LinearisationGap:
    """The linearisation gap of one store over its done snapshots.

    Attributes:
        store: the store's name; finite: the finite measure compared with ``linear``.
        steps: ``[S]`` training steps.
        change_gap: ``[S]`` relative gap of the change sizes (NaN: no row resolved, as in a store
            without self changes whose ``eps`` is 0 or whose dtype is float32).
        measure_gap: ``[S]`` relative gap of the measures.
        resolved: ``[S]`` share of the rows whose numerators were recovered (both measures).
        error_estimate: ``[S]`` the store's estimated relative error of its measures.
        vector_gap, vector_gap_max: ``[S]`` the median and the largest gap of the change vectors
            over updated probes (NaN for a store without ``linearisation_gap``).
    """

    store: str
    finite: str
    steps: np.ndarray
    change_gap: np.ndarray
    measure_gap: np.ndarray
    resolved: np.ndarray
    error_estimate: np.ndarray
    vector_gap: np.ndarray
    vector_gap_max: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return to_json(
            {
                "store": self.store,
                "finite": self.finite,
                "steps": self.steps,
                "change_gap": self.change_gap,
                "measure_gap": self.measure_gap,
                "resolved": self.resolved,
                "error_estimate": self.error_estimate,
                "vector_gap": self.vector_gap,
                "vector_gap_max": self.vector_gap_max,
            }
        )

    def summary(self) -> str:
        """One line: the gaps at the first, middle and last snapshot."""
        picks = sorted({0, len(self.steps) // 2, len(self.steps) - 1})
        at = ", ".join(
            f"step {self.steps[s]}: {self.change_gap[s]:.2g} / {self.measure_gap[s]:.2g}" for s in picks
        )
        vectors = ""
        if np.isfinite(self.vector_gap).any():
            vectors = "; change vectors, median over probes: " + ", ".join(
                f"step {self.steps[s]}: {self.vector_gap[s]:.2g}" for s in picks
            )
        return (
            f"linearisation gap of {self.store} ({self.finite} against linear), change sizes / S_rel: {at}"
            f"{vectors} (measures' estimated error up to {np.nanmax(self.error_estimate, initial=0):.1g})"
        )


def linearisation_gap(result: ReplayResult) -> LinearisationGap | None:
    """The gap of the store ``result`` (None when it lacks ``linear`` or a finite measure of
    :data:`FINITE`)."""
    finite = next((m for m in FINITE if m in result.measure_names), None)
    if finite is None or "linear" not in result.measure_names or not result.num_snapshots:
        return None
    S_f, S_l = result.measures[finite].read(), result.measures["linear"].read()  # [S, P, P]
    eps = float(result.config.get("ratio_eps", 0.0))
    own, vectors = stored_self_changes(result), stored_vector_gaps(result)  # [S, P] the latter
    F, L = (
        numerators(S, eps, own.get(m), from_diagonal=result.dtype == "float64")
        for m, S in ((finite, S_f), ("linear", S_l))
    )
    rows = np.isfinite(F).all(-1) & np.isfinite(L).all(-1)  # [S, P]
    off = ~np.eye(S_f.shape[-1], dtype=bool)
    with np.errstate(invalid="ignore", divide="ignore"):
        change = np.array([_relative(F[s, r], L[s, r]) for s, r in enumerate(rows)])
        measure = np.array([_relative(S_f[s][off], S_l[s][off]) for s in range(len(S_f))])
    return LinearisationGap(
        store=result.name,
        finite=finite,
        steps=result.steps,
        change_gap=change,
        measure_gap=measure,
        resolved=rows.mean(-1),
        error_estimate=result.error_estimate,
        vector_gap=_over_probes(np.nanmedian, vectors),
        vector_gap_max=_over_probes(np.nanmax, vectors),
    )


def stored_vector_gaps(result: ReplayResult) -> np.ndarray:
    """``[S, P]`` the store's ``linearisation_gap`` at its done snapshots (NaN where it has none)."""
    store = open_store(result.path)
    done = np.flatnonzero(store.done)
    if store.linearisation_gap is None:
        return np.full((len(done), len(store.targets)), np.nan)
    return np.asarray(store.linearisation_gap.read(done), dtype=np.float64)


def _over_probes(statistic: Any, gaps: np.ndarray) -> np.ndarray:
    """``statistic`` (NaN-ignoring) over the probes of ``gaps`` ``[S, P]`` -> ``[S]``, NaN where a
    snapshot has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN
        return statistic(gaps, axis=-1)


def stored_self_changes(result: ReplayResult) -> dict[str, np.ndarray]:
    """measure name -> ``[S, P]`` the self changes the store ``result`` holds (NaN where it does
    not say), at its done snapshots; empty for a store written before it kept them."""
    store = open_store(result.path)
    done = np.flatnonzero(store.done)
    return {m: np.asarray(a.read(done), dtype=np.float64) for m, a in store.self_change.items()}


def _relative(exact: np.ndarray, first_order: np.ndarray) -> float:
    """``||exact - first_order|| / ||exact||`` (NaN for no entries)."""
    return float(np.linalg.norm(exact - first_order) / np.linalg.norm(exact)) if exact.size else np.nan


def write_linearisation(gap: LinearisationGap, out_dir: str | Path) -> Path:
    """``<store>_linearisation.png`` (the gaps over training, and the estimated error of the
    measures) and ``<store>_linearisation.json`` into ``out_dir``; returns the figure's path."""
    out = make_folder(out_dir)
    atomic_write_json(out / f"{gap.store}_linearisation.json", gap.to_json())
    lines = {
        **(
            {"change vectors (median over probes)": (gap.steps, gap.vector_gap)}
            if np.isfinite(gap.vector_gap).any()
            else {}
        ),
        "change sizes": (gap.steps, gap.change_gap),
        "S_rel": (gap.steps, gap.measure_gap),
        "measures' estimated error": (gap.steps, gap.error_estimate),
    }
    row = OverlayRow("relative gap, exact vs first order", {f"{gap.finite} against linear": lines})
    title = f"{gap.store}: the exact output change against its first-order prediction"
    return plot_overlay_grid([row], out / f"{gap.store}_linearisation.png", title)

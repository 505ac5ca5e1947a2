"""The replay stores of a run directory as analyses see them: only their done snapshots.

Every ``RUN_DIR/<name>.zarr`` store is one replay configuration, read through
:func:`replay.store.open_store` (which knows the layout, README.md "Replay store").
:func:`load_results` opens them all (sorted by name) and returns one :class:`ReplayResult` each.
Only the *done* snapshots of a store are visible through a result: ``S`` below is the number of
done snapshots, ``P`` the number of probes, ``K`` the number of classes. Measure and class-pair
arrays stay on disk until :meth:`SnapshotArray.read` is called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recorder.rundir.errors import ResultsError
from recorder.rundir.files import is_number
from replay.measures import eps_dominated
from replay.store import StoredArray, open_store, store_paths


class SnapshotArray:
    """A stored array ``[S_all, ...]`` seen through the done snapshots: shape ``[S, ...]``.

    ``store``, ``name``: where it is (``<store>/<name>``); ``done_index`` ``[S]``: the positions of
    the done snapshots, at training steps ``steps`` ``[S]``.
    """

    def __init__(self, array: StoredArray, done_index: np.ndarray, store: Path, name: str, steps: np.ndarray):
        self._array = array
        self._done_index = done_index
        self._store, self._name, self._steps = store, name, steps

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._done_index),) + self._array.shape[1:]

    def read(self) -> np.ndarray:
        """The done snapshots as a float64 array ``[S, ...]`` (read from disk now).

        Raises :class:`ResultsError` naming the first damaged snapshot when a chunk cannot be
        decoded (bytes changed or cut from outside)."""
        if len(self._done_index) == 0:
            return np.empty(self.shape)
        try:
            return np.asarray(self._array.read(self._done_index), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - damaged bytes raise whatever the codec raises
            raise self._damaged(e) from None

    def _damaged(self, error: Exception) -> ResultsError:
        """The error naming the first done snapshot whose chunk cannot be read (a replay of the
        store checks the chunks of its done snapshots and recomputes the damaged ones)."""
        k = next((k for k in range(len(self._done_index)) if not self._readable(k)), 0)
        s = self._done_index[k]
        return ResultsError(
            f"{self._store}: {self._name} of snapshot {s} (step {self._steps[k]}) is damaged "
            f"({type(error).__name__}: {error}); rerun the replay that wrote this store: it recomputes "
            "that snapshot"
        )

    def _readable(self, k: int) -> bool:
        try:
            self._array.read(self._done_index[k : k + 1])
        except Exception:  # noqa: BLE001 - as in :meth:`read`
            return False
        return True


@dataclass
class ReplayResult:
    """One replay store, restricted to its done snapshots.

    Attributes:
        name: the store's name (``RUN_DIR/<name>.zarr``).
        path: the store's path.
        config: the replay configuration (store attribute ``config``, update rule included).
        run_spec: the run's ``spec.json`` as stored with the arrays.
        dtype: the dtype the measures were computed in.
        include_self: whether the stored class-pair aggregates include the self pairs.
        measure_names: the stored measures, in store order.
        num_stored: snapshots in the store, done or not.
        stored_steps: ``[num_stored]`` training step of each snapshot in the store, done or not.
        steps, epochs: ``[S]`` training step and epoch of each done snapshot.
        targets: ``probe_targets``, ``[P]`` classes or ``[P]`` / ``[P, C]`` regression targets.
        labels: ``[P]`` class index in ``0 .. K-1`` of each probe; None for regression.
        classes: the ``K`` class labels; None for regression.
        error_estimate: ``[S]`` estimated relative error of the stored measures.
        arithmetic: ``[S]`` the arithmetic that computed each snapshot (``""``: not stored).
        eps_dominated: measure name -> ``[S]`` how many probes' self change ``N[i, i]`` the
            ratio's ``eps`` exceeds 1% of (:func:`replay.measures.eps_dominated`): their rows of
            ``S`` are mostly ``eps``; empty for a store that holds no self changes.
        measures: measure name -> ``[S, P, P]`` (row updated on, column observed).
        classpairs: measure name -> stat (``mean``, ``median``) -> ``[S, K, K]`` ``A[a, b]``;
            empty for regression.
        ntk: ``[S, P, P]`` the empirical neural tangent kernel (a replay with ``--ntk``), or None.
        module_share: ``[S, M, K, K]`` each module's share of the first-order change, class-pair
            means (a replay with ``--module-split``, :mod:`analyses.modules`), or None.
        modules: the ``M`` module names of ``module_share`` (empty without it).
    """

    name: str
    path: Path
    config: dict[str, Any]
    run_spec: dict[str, Any]
    dtype: str
    include_self: bool
    measure_names: tuple[str, ...]
    num_stored: int
    stored_steps: np.ndarray
    steps: np.ndarray
    epochs: np.ndarray
    targets: np.ndarray
    labels: np.ndarray | None
    classes: list | None
    error_estimate: np.ndarray
    measures: dict[str, SnapshotArray]
    classpairs: dict[str, dict[str, SnapshotArray]]
    arithmetic: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    eps_dominated: dict[str, np.ndarray] = field(default_factory=dict)
    ntk: SnapshotArray | None = None
    module_share: SnapshotArray | None = None
    modules: tuple[str, ...] = ()

    @property
    def is_classification(self) -> bool:
        return self.labels is not None

    @property
    def num_snapshots(self) -> int:
        return len(self.steps)


def load_results(run_dir: str | Path) -> list[ReplayResult]:
    """Open every ``*.zarr`` store in ``run_dir``, sorted by name.

    Raises :class:`ResultsError` when there is no store, or when one is unreadable or does not
    follow the layout (the message names the store and what is wrong).
    """
    run_dir = Path(run_dir)
    paths = store_paths(run_dir)
    if not paths:
        raise ResultsError(
            f"{run_dir}: no replay stores (*.zarr); run `python cli.py replay {run_dir}` first"
        )
    return [load_result(p) for p in paths]


def load_result(path: str | Path) -> ReplayResult:
    """Open one replay store (see :func:`load_results`)."""
    store = open_store(path)
    done_index = np.flatnonzero(store.done)
    steps = store.steps[done_index]
    eps: Any = store.config.get("ratio_eps")  # JSON as stored: a number, or nothing to flag by

    def seen(array: StoredArray, name: str) -> SnapshotArray:
        return SnapshotArray(array, done_index, store.path, name, steps)

    return ReplayResult(
        name=store.name,
        path=store.path,
        config=store.config,
        run_spec=store.run_spec,
        dtype=store.dtype,
        include_self=store.include_self,
        measure_names=store.measure_names,
        num_stored=len(store.done),
        stored_steps=store.steps,
        steps=steps,
        epochs=store.epochs[done_index],
        targets=store.targets,
        labels=store.labels,
        classes=store.classes,
        error_estimate=store.error_estimate[done_index],
        measures={m: seen(a, f"measures/{m}") for m, a in store.measures.items()},
        classpairs={
            m: {stat: seen(a, f"classpairs/{m}/{stat}") for stat, a in stats.items()}
            for m, stats in store.classpairs.items()
        },
        arithmetic=store.arithmetic[done_index],
        ntk=None if store.ntk is None else seen(store.ntk, "ntk"),
        module_share=None if store.module_share is None else seen(store.module_share, "module_share"),
        modules=store.modules,
        eps_dominated={
            m: eps_dominated(torch.as_tensor(seen(a, f"self_change/{m}").read()), float(eps)).sum(-1).numpy()
            for m, a in (store.self_change if is_number(eps) else {}).items()
        },
    )


def eps_note(result: ReplayResult, where: str) -> str | None:
    """A note on the measures of ``result`` (a store named ``where``) whose rows are mostly ``eps``
    at some snapshot (:attr:`ReplayResult.eps_dominated`), or None."""
    flagged = {m: int((n > 0).sum()) for m, n in result.eps_dominated.items() if (n > 0).any()}
    if not flagged:
        return None
    at = ", ".join(f"{m} at {k} of {result.num_snapshots} snapshots" for m, k in flagged.items())
    return (
        f"{where}: ratio eps {result.config['ratio_eps']:g} exceeds 1% of the self change N[i, i] of "
        f"some probes ({at}): their rows of S are mostly eps; a replay with a smaller --ratio-eps "
        "(0 suits tiny steps) avoids it"
    )

"""The replay stores of a run directory as analyses see them: only their done snapshots.

Every ``RUN_DIR/<name>.zarr`` store is one replay configuration, read through
:func:`replay.store.open_store` (which knows the layout, README.md "Replay store").
:func:`load_results` opens them all (sorted by name) and returns one :class:`ReplayResult` each.
Only the *done* snapshots of a store are visible through a result: ``S`` below is the number of
done snapshots, ``P`` the number of probes, ``K`` the number of classes. Measure and class-pair
arrays stay on disk until :meth:`SnapshotArray.read` is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recorder.rundir.errors import ResultsError
from replay.store import StoredArray, open_store, store_paths


class SnapshotArray:
    """A stored array ``[S_all, ...]`` seen through the done snapshots: shape ``[S, ...]``."""

    def __init__(self, array: StoredArray, done_index: np.ndarray):
        self._array = array
        self._done_index = done_index

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._done_index),) + self._array.shape[1:]

    def read(self) -> np.ndarray:
        """The done snapshots as a float64 array ``[S, ...]`` (read from disk now)."""
        if len(self._done_index) == 0:
            return np.empty(self.shape)
        return np.asarray(self._array.read(self._done_index), dtype=np.float64)


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
        steps, epochs: ``[S]`` training step and epoch of each done snapshot.
        targets: ``probe_targets``, ``[P]`` classes or ``[P]`` / ``[P, C]`` regression targets.
        labels: ``[P]`` class index in ``0 .. K-1`` of each probe; None for regression.
        classes: the ``K`` class labels; None for regression.
        error_estimate: ``[S]`` estimated relative error of the stored measures.
        measures: measure name -> ``[S, P, P]`` (row updated on, column observed).
        classpairs: measure name -> stat (``mean``, ``median``) -> ``[S, K, K]`` ``A[a, b]``;
            empty for regression.
    """

    name: str
    path: Path
    config: dict[str, Any]
    run_spec: dict[str, Any]
    dtype: str
    include_self: bool
    measure_names: tuple[str, ...]
    num_stored: int
    steps: np.ndarray
    epochs: np.ndarray
    targets: np.ndarray
    labels: np.ndarray | None
    classes: list | None
    error_estimate: np.ndarray
    measures: dict[str, SnapshotArray]
    classpairs: dict[str, dict[str, SnapshotArray]]

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
    return ReplayResult(
        name=store.name,
        path=store.path,
        config=store.config,
        run_spec=store.run_spec,
        dtype=store.dtype,
        include_self=store.include_self,
        measure_names=store.measure_names,
        num_stored=len(store.done),
        steps=store.steps[done_index],
        epochs=store.epochs[done_index],
        targets=store.targets,
        labels=store.labels,
        classes=store.classes,
        error_estimate=store.error_estimate[done_index],
        measures={m: SnapshotArray(a, done_index) for m, a in store.measures.items()},
        classpairs={
            m: {stat: SnapshotArray(a, done_index) for stat, a in stats.items()}
            for m, stats in store.classpairs.items()
        },
    )

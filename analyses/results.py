"""Read the replay stores of a run directory (the zarr layout of README.md, "Replay store").

Every ``RUN_DIR/<name>.zarr`` store is one replay configuration. :func:`load_results` opens them
all (sorted by name) and returns one :class:`ReplayResult` each. Only the *done* snapshots of a
store are visible through a result: ``S`` below is the number of done snapshots, ``P`` the
number of probes, ``K`` the number of classes. Measure and class-pair arrays stay on disk until
:meth:`SnapshotArray.read` is called.

Classes: the store attribute ``classes`` lists the class labels (values of ``probe_targets``)
that index the ``K`` axis of ``classpairs/<m>/*``, in order (an integer ``K`` stands for
``0 .. K-1``; absent or null, the sorted distinct probe labels). A store with integer
``probe_targets`` of shape ``[P]`` is a classification store; anything else is regression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from analyses.classpairs import STATS
from recorder.rundir.errors import ResultsError


class SnapshotArray:
    """A stored array ``[S_all, ...]`` seen through the done snapshots: shape ``[S, ...]``."""

    def __init__(self, array: zarr.Array, done_index: np.ndarray):
        self._array = array
        self._done_index = done_index

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._done_index),) + tuple(self._array.shape[1:])

    def read(self) -> np.ndarray:
        """The done snapshots as a float64 array ``[S, ...]`` (read from disk now)."""
        if len(self._done_index) == 0:
            return np.empty(self.shape)
        return np.asarray(self._array.oindex[self._done_index], dtype=np.float64)


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
    paths = sorted(p for p in run_dir.glob("*.zarr") if p.is_dir())
    if not paths:
        raise ResultsError(
            f"{run_dir}: no replay stores (*.zarr); run `python cli.py replay {run_dir}` first"
        )
    return [load_result(p) for p in paths]


def load_result(path: str | Path) -> ReplayResult:
    """Open one replay store (see :func:`load_results`)."""
    path = Path(path)
    try:
        return _load(path)
    except ResultsError:
        raise
    except KeyError as e:
        raise ResultsError(f"{path}: not a replay store: missing {e.args[0]!r}") from None
    except (OSError, ValueError, TypeError) as e:
        raise ResultsError(f"{path}: unreadable replay store ({type(e).__name__}: {e})") from None


def _load(path: Path) -> ReplayResult:
    group = zarr.open_group(path, mode="r", zarr_format=3)
    attrs = dict(group.attrs)

    def array(key: str, ndim: int) -> zarr.Array:
        arr = group[key]
        if not isinstance(arr, zarr.Array) or arr.ndim != ndim:
            raise ResultsError(f"{path}: {key!r} must be an array with {ndim} dimensions")
        return arr

    done = np.asarray(array("done", 1)[:], dtype=bool)
    num_stored = len(done)
    done_index = np.flatnonzero(done)
    per_snapshot = {key: array(key, 1) for key in ("step", "epoch", "error_estimate")}
    targets_arr = group["probe_targets"]
    if not isinstance(targets_arr, zarr.Array) or targets_arr.ndim not in (1, 2):
        raise ResultsError(f"{path}: 'probe_targets' must be an array [P] or [P, C]")
    targets = np.asarray(targets_arr[:])
    num_probes = targets.shape[0]

    measure_names = attrs.get("measures")
    if not isinstance(measure_names, list) or not all(isinstance(m, str) for m in measure_names):
        raise ResultsError(f"{path}: attribute 'measures' must be a list of measure names")
    measures = {m: array(f"measures/{m}", 3) for m in measure_names}
    for key, arr in [*per_snapshot.items(), *((f"measures/{m}", a) for m, a in measures.items())]:
        if arr.shape[0] != num_stored:
            raise ResultsError(f"{path}: {key!r} has {arr.shape[0]} snapshots, 'done' has {num_stored}")
    for m, arr in measures.items():
        if arr.shape[1:] != (num_probes, num_probes):
            raise ResultsError(
                f"{path}: 'measures/{m}' is {arr.shape}, expected [S, {num_probes}, {num_probes}]"
            )

    labels, classes = _class_axis(path, targets, attrs.get("classes"))
    classpairs: dict[str, dict[str, SnapshotArray]] = {}
    if labels is not None:
        for m in measure_names:
            classpairs[m] = {}
            for stat in STATS:
                arr = array(f"classpairs/{m}/{stat}", 3)
                if arr.shape != (num_stored, len(classes), len(classes)):
                    raise ResultsError(
                        f"{path}: 'classpairs/{m}/{stat}' is {arr.shape}, expected "
                        f"[{num_stored}, {len(classes)}, {len(classes)}]"
                    )
                classpairs[m][stat] = SnapshotArray(arr, done_index)

    def done_values(key: str) -> np.ndarray:
        return np.asarray(per_snapshot[key][:])[done_index]

    return ReplayResult(
        name=path.name.removesuffix(".zarr"),
        path=path,
        config=attrs.get("config") or {},
        run_spec=attrs.get("run_spec") or {},
        dtype=str(attrs.get("dtype", "unknown")),
        include_self=bool(attrs.get("include_self", False)),
        measure_names=tuple(measure_names),
        num_stored=num_stored,
        steps=done_values("step").astype(np.int64),
        epochs=done_values("epoch").astype(np.int64),
        targets=targets,
        labels=labels,
        classes=classes,
        error_estimate=done_values("error_estimate").astype(np.float64),
        measures={m: SnapshotArray(a, done_index) for m, a in measures.items()},
        classpairs=classpairs,
    )


def _class_axis(path: Path, targets: np.ndarray, classes: Any) -> tuple[np.ndarray | None, list | None]:
    """Probe class indices ``[P]`` into the ``K`` axis, and the ``K`` class labels.

    (None, None) for regression targets (floating point, or ``[P, C]``).
    """
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        return None, None
    if classes is None:
        classes = sorted(int(c) for c in np.unique(targets))
    elif isinstance(classes, int) and not isinstance(classes, bool):
        classes = list(range(classes))
    elif not isinstance(classes, list):
        raise ResultsError(f"{path}: attribute 'classes' must be a list of class labels or a count")
    position = {c: k for k, c in enumerate(classes)}
    missing = sorted({int(t) for t in targets} - set(position))
    if missing:
        raise ResultsError(f"{path}: probe classes {missing} are not in the attribute 'classes' {classes}")
    labels = np.array([position[int(t)] for t in targets], dtype=np.int64)
    return labels, classes

"""The replay store ``RUN_DIR/<name>.zarr`` (zarr v3), in the layout of README "Replay store":
the one module that knows it. :func:`_layout` declares every array and :class:`_Plan` the
attributes; :class:`ReplayStore` writes a store and :func:`open_store` reads one.

``S`` snapshots (the run's manifest), ``P`` probes, ``C`` outputs, ``K`` probe classes, ``m`` a
measure. Arrays (name: shape, dimension names):

- ``step``, ``epoch``: ``[S]`` int64 (snapshot); ``done``: ``[S]`` bool (snapshot), set last;
- ``probe_targets``: ``[P]`` (probe) classes or ``[P]`` / ``[P, C]`` (probe, output) targets;
- ``base_outputs``: ``[S, P, C]`` (snapshot, probe, output); ``probe_loss``, ``update_norm``:
  ``[S, P]`` (snapshot, probe); ``error_estimate``: ``[S]`` (snapshot); ``fallback``: ``[S]``
  int8 (snapshot), 0 or ``1 +`` the index of the note in the attribute ``fallback_notes`` why the
  snapshot was computed otherwise than its precision says (:data:`replay.engine.FALLBACK_NOTES`);
- ``arithmetic``: ``[S]`` int8 (snapshot), ``1 +`` the index in the attribute ``arithmetics``
  of the arithmetic that computed the snapshot (``auto``: the one it settled on), 0 for a snapshot
  written before this array existed;
- ``self_change/<m>``: ``[S, P]`` (snapshot, updated), what each row of ``measures/<m>`` divides
  by before ``ratio_eps`` (:func:`replay.measures.self_change`): ``S`` under another ``eps``
  follows from it;
- ``recorded_lr``: ``[S]`` float64 (snapshot), a rule that replays the recorded optimizer only
  (``recorded``): the learning rate of its first parameter group at each snapshot, as the run's
  manifest lists it (NaN where it does not);
- ``measures/<m>``: ``[S, P, P]`` (snapshot, updated, observed);
- ``classpairs/<m>/<stat>``: ``[S, K, K]`` (snapshot, observed_class, updated_class), one per stat
  of :data:`~replay.classpairs.STATS`, classification only;
- ``linearisation_gap``: ``[S, P]`` (snapshot, updated), where the measures hold ``linear`` and a
  finite one: ``||D[i] - J U_i|| / ||D[i]||`` over every observed probe and output, how far the
  exact change of an update is from its first-order prediction;
- ``ntk``: ``[S, P, P]`` (snapshot, probe, other_probe), the empirical neural tangent kernel, where
  the configuration asks for it (``ntk``);
- ``module_share``: ``[S, M, K, K]`` (snapshot, module, observed_class, updated_class), the
  class-pair means of each module's share of the first-order change
  (:func:`replay.firstorder.module_shares`), where the configuration asks for it
  (``module_split``); the attribute ``modules`` names the ``M`` modules.

Attributes: ``config``, ``run_spec``, ``dtype``, ``precision``, ``measures``, ``classes`` (the
``K`` class labels, null for regression), ``include_self``, ``evaluation_mode`` (``eval``: running
statistics of normalization layers, no dropout), ``fallback_notes``, ``arithmetics`` (the
arithmetics ``arithmetic`` indexes) and, with ``recorded_lr``, ``recorded_optimizer`` (the recorded
optimizer's class). ``config`` holds the update settings its
rule uses only. Floating point arrays are of ``dtype`` (the configuration's storage dtype; float64
for ``recorded_lr``) and filled with NaN, the others with zeros.

Arrays ``[S, ...]`` are chunked one snapshot per chunk (``done`` included: a ``[S]`` array of
chunks of 1), checked whenever a store is opened for writing: writing one snapshot touches only
its own chunk files, so the ranks of a distributed replay can write different snapshots at once.
When the manifest has grown, the ``[S, ...]`` arrays are extended.

Crash safety and the write lock: :mod:`replay.crashsafe`; a store always has its full layout,
and snapshot ``s`` counts as written only once ``done[s]`` is set, last.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from recorder.rundir.errors import ReplayError, ReplayWarning, ResultsError
from recorder.rundir.files import temp_sibling
from recorder.rundir.snapshot import SnapshotEntry
from recorder.rundir.spec import RunSpec
from replay.classpairs import STATS, aggregate, class_labels
from replay.config import ReplayConfig
from replay.crashsafe import damaged_rows, exclusive_writer, flush_to_disk, read_chunkwise, remove_orphans
from replay.engine import EVALUATION_MODE, FALLBACK_NOTES, SnapshotResult
from replay.plan import ARITHMETIC
from replay.updates import RULES

__all__ = ["ReplayStore", "StoredArray", "StoredReplay", "exclusive_writer", "open_store", "store_paths"]

_SUFFIX = ".zarr"  # RUN_DIR/<name>.zarr


@dataclass(frozen=True)
class _ArraySpec:
    """One array of a store: shape, dtype and dimension names; per-snapshot arrays have a leading
    ``snapshot`` axis of one snapshot per chunk, the others are one chunk."""

    shape: tuple[int, ...]  # without the snapshot axis for per-snapshot arrays
    dtype: Any
    dims: tuple[str, ...]
    per_snapshot: bool = True
    # added after stores were first released: an older store lacks it (read as its fill value,
    # created when the store is resumed)
    added_later: bool = False

    @property
    def fill(self) -> Any:
        return np.nan if np.issubdtype(self.dtype, np.floating) else np.zeros((), self.dtype).item()

    def full_shape(self, num_snapshots: int) -> tuple[int, ...]:
        return ((num_snapshots,) + self.shape) if self.per_snapshot else self.shape

    @property
    def chunks(self) -> tuple[int, ...]:
        """One snapshot per chunk; arrays without a snapshot axis are one chunk."""
        return ((1,) + self.shape) if self.per_snapshot else self.shape


def _measure_key(m: str) -> str:
    return f"measures/{m}"


def _self_change_key(m: str) -> str:
    return f"self_change/{m}"


def _classpair_key(m: str, stat: str) -> str:
    return f"classpairs/{m}/{stat}"


def _layout(
    targets: np.ndarray,
    num_outputs: int,
    num_classes: int,
    measures: Sequence[str],
    dtype: Any,
    recorded: bool = False,
    ntk: bool = False,
    modules: Sequence[str] = (),
) -> dict[str, _ArraySpec]:
    """Array name -> :class:`_ArraySpec`: every array of a store (the module docstring's list).

    ``targets`` ``[P]`` / ``[P, C]``: the probe targets; no class pairs when ``num_classes`` is 0.
    ``dtype``: the storage dtype name (:func:`_read` passes the attribute as stored: it checks
    only shapes). ``recorded``: the rule replays the recorded optimizer (``recorded_lr``); ``ntk``,
    ``modules``: the tangent kernel and the module shares of these modules are stored.
    """
    num_probes = len(targets)
    layout = {
        "step": _ArraySpec((), np.int64, ("snapshot",)),
        "epoch": _ArraySpec((), np.int64, ("snapshot",)),
        "done": _ArraySpec((), np.bool_, ("snapshot",)),
        "probe_targets": _ArraySpec(
            targets.shape, targets.dtype, ("probe", "output")[: targets.ndim], per_snapshot=False
        ),
        "base_outputs": _ArraySpec((num_probes, num_outputs), dtype, ("snapshot", "probe", "output")),
        "probe_loss": _ArraySpec((num_probes,), dtype, ("snapshot", "probe")),
        "update_norm": _ArraySpec((num_probes,), dtype, ("snapshot", "probe")),
        "error_estimate": _ArraySpec((), dtype, ("snapshot",)),
        "fallback": _ArraySpec((), np.int8, ("snapshot",), added_later=True),
        "arithmetic": _ArraySpec((), np.int8, ("snapshot",), added_later=True),
    }
    if recorded:
        layout["recorded_lr"] = _ArraySpec((), np.float64, ("snapshot",), added_later=True)
    for m in measures:
        layout[_measure_key(m)] = _ArraySpec(
            (num_probes, num_probes), dtype, ("snapshot", "updated", "observed")
        )
        layout[_self_change_key(m)] = _ArraySpec(
            (num_probes,), dtype, ("snapshot", "updated"), added_later=True
        )
        if num_classes:
            for stat in STATS:
                layout[_classpair_key(m, stat)] = _ArraySpec(
                    (num_classes, num_classes), dtype, ("snapshot", "observed_class", "updated_class")
                )
    if "linear" in measures and len(measures) > 1:
        layout["linearisation_gap"] = _ArraySpec(
            (num_probes,), dtype, ("snapshot", "updated"), added_later=True
        )
    if ntk:
        layout["ntk"] = _ArraySpec((num_probes, num_probes), dtype, ("snapshot", "probe", "other_probe"))
    if modules:
        layout["module_share"] = _ArraySpec(
            (len(modules), num_classes, num_classes),
            dtype,
            ("snapshot", "module", "observed_class", "updated_class"),
        )
    return layout


def _class_labels(targets: np.ndarray, classes: list) -> np.ndarray:
    """``[P]`` index of each probe's class (``targets`` ``[P]``) in ``classes``."""
    position = {c: k for k, c in enumerate(classes)}
    return np.array([position[int(t)] for t in targets], dtype=np.int64)


@dataclass(frozen=True)
class _Plan:
    """What a store of one configuration for one run must look like."""

    attrs: dict[str, Any]
    layout: dict[str, _ArraySpec]
    targets: np.ndarray  # [P] or [P, C]
    labels: np.ndarray | None  # [P] index of each probe's class in attrs["classes"]
    num_classes: int

    @classmethod
    def make(
        cls,
        config: ReplayConfig,
        spec: RunSpec,
        targets: torch.Tensor,
        measures: tuple[str, ...],
        modules: tuple[str, ...],
    ) -> _Plan:
        targets_np = targets.numpy()
        classification = spec.task == "classification"
        classes = class_labels(targets_np)[1] if classification else None
        recorded = RULES[config.update.rule].needs_state
        attrs = {
            "config": config.to_json(),
            "run_spec": spec.to_json(),
            "dtype": config.storage_dtype,
            "precision": config.precision,
            "measures": list(measures),
            "classes": classes,
            "include_self": config.include_self,
            "evaluation_mode": EVALUATION_MODE,
            "fallback_notes": list(FALLBACK_NOTES),
            "arithmetics": list(ARITHMETIC),
            **({"recorded_optimizer": spec.optimizer} if recorded else {}),
            **({"modules": list(modules)} if modules else {}),
        }
        num_classes = len(classes or ())
        layout = _layout(
            targets_np,
            spec.num_outputs,
            num_classes,
            measures,
            config.storage_dtype,
            recorded,
            config.ntk,
            modules,
        )
        labels = _class_labels(targets_np, classes) if classes is not None else None  # classification
        return cls(attrs, layout, targets_np, labels, num_classes)


class ReplayStore:
    """One replay store opened for writing by one configuration.

    :meth:`prepare` (one process, holding :func:`exclusive_writer`) creates, resumes or extends
    it; :meth:`attach` opens a prepared store in the other ranks of a distributed replay.
    """

    def __init__(self, path: Path, group: zarr.Group, plan: _Plan, include_self: bool):
        self.path = path
        self._group = group
        # Every chunk is written, of fill values too: a done snapshot's missing chunk is damage.
        self._arrays = {
            name: _array(group, name).with_config({"write_empty_chunks": True}) for name in plan.layout
        }
        self._plan = plan
        self._include_self = include_self
        self.done = _done_flags(group)  # [S]

    @classmethod
    def prepare(
        cls,
        path: Path,
        config: ReplayConfig,
        spec: RunSpec,
        entries: list[SnapshotEntry],
        targets: torch.Tensor,
        measures: tuple[str, ...],
        modules: tuple[str, ...] = (),
    ) -> ReplayStore:
        """Create the store, or reopen one written with the same configuration for the same run,
        extend it to ``entries`` (the run's manifest) and remove what killed writers left behind.

        ``targets`` ``[P]`` / ``[P, C]``: the run's probe targets; ``modules``: those of the module
        shares (``module_split``). Raises :class:`ReplayError` when
        ``path`` holds another configuration or another run, is a symbolic link (never written
        through), or cannot be written.
        """
        path = Path(path)
        if path.is_symlink():
            raise ReplayError(
                f"{path}: is a symbolic link; refusing to write through it (choose another --name)"
            )
        plan = _Plan.make(config, spec, targets, measures, modules)
        try:
            remove_orphans(path)
            if not path.exists():
                _create(path, plan, len(entries))
            group = _open_existing(path, plan, config, len(entries))
            _add_missing_attributes(group, plan.attrs)
            _unmark_damaged(path, group, plan.layout)
            _extend(group, plan.layout, entries)
            flush_to_disk(path)
        except OSError as e:
            raise ReplayError(f"{path}: cannot write the replay store ({e})") from None
        return cls(path, group, plan, config.include_self)

    @classmethod
    def attach(
        cls,
        path: Path,
        config: ReplayConfig,
        spec: RunSpec,
        entries: list[SnapshotEntry],
        targets: torch.Tensor,
        measures: tuple[str, ...],
        modules: tuple[str, ...] = (),
    ) -> ReplayStore:
        """Open a store that :meth:`prepare` has made ready for ``entries``; writes nothing."""
        path = Path(path)
        plan = _Plan.make(config, spec, targets, measures, modules)
        group = _open_existing(path, plan, config, len(entries))
        done = _array(group, "done")
        if done.shape[0] != len(entries):
            raise ReplayError(f"{path}: holds {done.shape[0]} snapshots, expected {len(entries)}")
        return cls(path, group, plan, config.include_self)

    def write(self, s: int, result: SnapshotResult) -> None:
        """Store everything of snapshot ``s`` (whole chunks), flush it to disk, then mark it done.

        ``result`` holds ``base_outputs`` ``[P, C]``, ``probe_loss`` and ``update_norm`` ``[P]``
        and every measure ``[P, P]``; the class pairs ``[K, K]`` are aggregated from the measures.
        """
        a, plan = self._arrays, self._plan
        try:
            a["base_outputs"][s] = result.base_outputs.numpy()
            a["probe_loss"][s] = result.probe_loss.numpy()
            a["update_norm"][s] = result.update_norm.numpy()
            a["error_estimate"][s] = result.error_estimate
            a["fallback"][s] = result.fallback
            a["arithmetic"][s] = 1 + list(ARITHMETIC).index(result.arithmetic) if result.arithmetic else 0
            for name, S in result.measures.items():
                a[_measure_key(name)][s] = S.numpy()
            for name, own in result.self_change.items():
                a[_self_change_key(name)][s] = own.numpy()
            if result.linearisation_gap is not None:
                a["linearisation_gap"][s] = result.linearisation_gap.numpy()
            if result.ntk is not None:
                a["ntk"][s] = result.ntk.numpy()
            if result.module_share is not None:
                a["module_share"][s] = result.module_share.numpy()
            if plan.labels is not None:
                stacked = np.stack([S.numpy() for S in result.measures.values()])  # [M, P, P]
                for stat in STATS:
                    A = aggregate(
                        stacked, plan.labels, plan.num_classes, self._include_self, stat
                    )  # [M, K, K]
                    for name, A_m in zip(result.measures, A, strict=True):
                        a[_classpair_key(name, stat)][s] = A_m
            flush_to_disk(self.path)
            a["done"][s] = True
        except OSError as e:
            raise ReplayError(f"{self.path}: cannot write snapshot {s} ({e})") from None
        self.done[s] = True

    def read_done(self) -> np.ndarray:
        """``done`` ``[S]`` as it is on disk now (other ranks may have written since opening)."""
        return _done_flags(self._group)


class StoredArray:
    """A per-snapshot array ``[S, ...]`` of a store opened by :func:`open_store`, read from disk
    only by :meth:`read`."""

    def __init__(self, array: zarr.Array):
        self._array = array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    def read(self, snapshots: np.ndarray) -> np.ndarray:
        """The snapshots at the indices ``snapshots`` ``[n]``: ``[n, ...]``, in the stored dtype."""
        return np.asarray(self._array.oindex[snapshots])


@dataclass(frozen=True)
class StoredReplay:
    """A replay store as :func:`open_store` reads it: ``S`` stored snapshots, done or not.

    Attributes:
        name: the store's name (``RUN_DIR/<name>.zarr``).
        path: the store's path.
        config, run_spec, dtype, include_self: the store attributes of these names.
        measure_names: the attribute ``measures``, in store order.
        done, steps, epochs, error_estimate: ``[S]`` arrays of these names.
        arithmetic: ``[S]`` the name of the arithmetic that computed each snapshot (``""`` where
            the store does not say: written before it did).
        targets: ``probe_targets``, ``[P]`` classes or ``[P]`` / ``[P, C]`` regression targets.
        labels: ``[P]`` class index in ``0 .. K-1`` of each probe; None for regression.
        classes: the ``K`` class labels; None for regression.
        measures: measure name -> ``[S, P, P]``.
        classpairs: measure name -> stat -> ``[S, K, K]``; empty for regression.
        self_change: measure name -> ``[S, P]`` (NaN where the store does not say); empty for a
            store written before these arrays existed.
        linearisation_gap: ``[S, P]``, None where the store has none.
        ntk: ``[S, P, P]``, None where the store has none.
        module_share: ``[S, M, K, K]``, None where the store has none.
        modules: the attribute ``modules``, the ``M`` module names (empty without module shares).
    """

    name: str
    path: Path
    config: dict[str, Any]
    run_spec: dict[str, Any]
    dtype: str
    include_self: bool
    measure_names: tuple[str, ...]
    done: np.ndarray
    steps: np.ndarray
    epochs: np.ndarray
    error_estimate: np.ndarray
    targets: np.ndarray
    labels: np.ndarray | None
    classes: list | None
    measures: dict[str, StoredArray]
    classpairs: dict[str, dict[str, StoredArray]]
    arithmetic: np.ndarray
    self_change: dict[str, StoredArray]
    linearisation_gap: StoredArray | None = None
    ntk: StoredArray | None = None
    module_share: StoredArray | None = None
    modules: tuple[str, ...] = ()


def store_paths(run_dir: str | Path) -> list[Path]:
    """The replay stores ``RUN_DIR/<name>.zarr`` of the run directory ``run_dir``, sorted by name."""
    return sorted(p for p in Path(run_dir).glob(f"*{_SUFFIX}") if p.is_dir())


def open_store(path: str | Path) -> StoredReplay:
    """Open the replay store ``path`` for reading and check its layout (:func:`_layout`, from
    its attributes and ``probe_targets``); reads the ``[S]`` arrays and ``probe_targets`` now.

    Classes: the attribute ``classes`` lists the class labels (values of ``probe_targets``) that
    index the ``K`` axis of the class pairs, in order (an integer ``K`` stands for ``0 .. K-1``;
    absent or null, the sorted distinct probe labels). A store with integer ``probe_targets`` of
    shape ``[P]`` is a classification store; anything else is regression.

    Raises :class:`ResultsError` when the store is unreadable or does not follow the layout (the
    message names the store and what is wrong).
    """
    path = Path(path)
    try:
        return _read(path)
    except ResultsError:
        raise
    except KeyError as e:
        raise ResultsError(f"{path}: not a replay store: missing {e.args[0]!r}") from None
    except (OSError, ValueError, TypeError) as e:
        raise ResultsError(f"{path}: unreadable replay store ({type(e).__name__}: {e})") from None


def _read(path: Path) -> StoredReplay:
    """:func:`open_store`, raising what zarr raises on a missing or unreadable array."""
    group = zarr.open_group(path, mode="r", zarr_format=3)
    attrs: dict[str, Any] = dict(group.attrs)  # JSON as stored: checked where used
    measures = attrs.get("measures")
    if not isinstance(measures, list) or not all(isinstance(m, str) for m in measures):
        raise ResultsError(f"{path}: attribute 'measures' must be a list of measure names")
    stored_targets = group["probe_targets"]
    if not isinstance(stored_targets, zarr.Array) or stored_targets.ndim not in (1, 2):
        raise ResultsError(f"{path}: 'probe_targets' must be an array [P] or [P, C]")
    targets = np.asarray(stored_targets[:])
    labels, classes = _class_axis(path, targets, attrs.get("classes"))
    done = group["done"]
    num_stored = done.shape[0] if isinstance(done, zarr.Array) and done.ndim else 0
    modules = attrs.get("modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ResultsError(f"{path}: attribute 'modules' must be a list of module names")
    if modules and not classes:
        raise ResultsError(f"{path}: attribute 'modules' needs classes (module shares are class-pair means)")
    config = attrs.get("config")
    layout = _layout(
        targets,
        attrs["run_spec"]["num_outputs"],
        len(classes or ()),
        measures,
        attrs.get("dtype"),
        _replays_recorded(config),
        isinstance(config, dict) and config.get("ntk") is True,
        modules,
    )
    arrays: dict[str, zarr.Array] = {}  # the layout's arrays, checked
    for name, spec in layout.items():
        if spec.added_later and name not in group:
            continue
        array, expected = group[name], spec.full_shape(num_stored)
        if not isinstance(array, zarr.Array) or array.shape != expected:
            shape = list(array.shape) if isinstance(array, zarr.Array) else "a group"
            raise ResultsError(
                f"{path}: {name!r} must be an array {list(expected)} ({', '.join(spec.dims)}), not {shape}"
            )
        arrays[name] = array
    return StoredReplay(
        name=path.name.removesuffix(_SUFFIX),
        path=path,
        config=attrs.get("config") or {},
        run_spec=attrs["run_spec"],
        dtype=str(attrs.get("dtype", "unknown")),
        include_self=bool(attrs.get("include_self", False)),
        measure_names=tuple(measures),
        done=np.asarray(arrays["done"][:], dtype=bool),
        steps=np.asarray(arrays["step"][:], dtype=np.int64),
        epochs=np.asarray(arrays["epoch"][:], dtype=np.int64),
        error_estimate=np.asarray(arrays["error_estimate"][:], dtype=np.float64),
        targets=targets,
        labels=labels,
        classes=classes,
        measures={m: StoredArray(arrays[_measure_key(m)]) for m in measures},
        classpairs={
            m: {stat: StoredArray(arrays[_classpair_key(m, stat)]) for stat in STATS}
            for m in (measures if classes else ())
        },
        arithmetic=_arithmetic_names(path, arrays.get("arithmetic"), attrs.get("arithmetics"), num_stored),
        self_change={
            m: StoredArray(arrays[_self_change_key(m)]) for m in measures if _self_change_key(m) in arrays
        },
        linearisation_gap=StoredArray(arrays["linearisation_gap"]) if "linearisation_gap" in arrays else None,
        ntk=StoredArray(arrays["ntk"]) if "ntk" in arrays else None,
        module_share=StoredArray(arrays["module_share"]) if "module_share" in arrays else None,
        modules=tuple(modules),
    )


def _arithmetic_names(path: Path, codes: zarr.Array | None, names: Any, num_stored: int) -> np.ndarray:
    """``[S]`` the arithmetic of each snapshot from the array ``arithmetic`` (``1 +`` an index into
    the attribute ``arithmetics``; 0 or no array: ``""``)."""
    if codes is None:
        return np.full(num_stored, "", dtype=object)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ResultsError(f"{path}: attribute 'arithmetics' must be a list of arithmetic names")
    stored = np.asarray(codes[:], dtype=np.int64)
    if ((stored < 0) | (stored > len(names))).any():
        raise ResultsError(f"{path}: 'arithmetic' holds codes beyond the attribute 'arithmetics'")
    return np.array([""] + names, dtype=object)[stored]


def _replays_recorded(config: Any) -> bool:
    """Whether the store configuration ``config`` (JSON as stored) names a rule that replays the
    recorded optimizer."""
    rule = RULES.get(config.get("update", {}).get("rule")) if isinstance(config, dict) else None
    return rule is not None and rule.needs_state


def _class_axis(path: Path, targets: np.ndarray, classes: Any) -> tuple[np.ndarray | None, list | None]:
    """Probe class indices ``[P]`` into the ``K`` axis, and the ``K`` class labels (the attribute
    ``classes``, see :func:`open_store`); (None, None) for regression targets (floating point, or
    ``[P, C]``)."""
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        return None, None
    if classes is None:
        classes = sorted(int(c) for c in np.unique(targets))
    elif isinstance(classes, int) and not isinstance(classes, bool):
        classes = list(range(classes))
    elif not isinstance(classes, list):
        raise ResultsError(f"{path}: attribute 'classes' must be a list of class labels or a count")
    missing = sorted({int(t) for t in targets} - set(classes))
    if missing:
        raise ResultsError(f"{path}: probe classes {missing} are not in the attribute 'classes' {classes}")
    return _class_labels(targets, classes), classes


def _create(path: Path, plan: _Plan, n: int) -> None:
    """Build the store in a new temporary directory (mode ``0o777`` less the umask), flush it and
    rename it to ``path`` (atomic)."""
    tmp = temp_sibling(path)
    os.mkdir(tmp, 0o777)
    try:
        group = zarr.open_group(tmp, mode="w", attributes=plan.attrs, zarr_format=3)
        for name, spec in plan.layout.items():
            _create_array(group, name, spec, n)
        _array(group, "probe_targets")[...] = plan.targets
        flush_to_disk(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _create_array(group: zarr.Group, name: str, spec: _ArraySpec, n: int) -> zarr.Array:
    """The array ``name`` of ``spec`` for ``n`` snapshots in ``group``, filled with its fill value."""
    return group.create_array(
        name,
        shape=spec.full_shape(n),
        chunks=spec.chunks,
        dtype=spec.dtype,
        fill_value=spec.fill,
        dimension_names=spec.dims,
    )


def _open_existing(path: Path, plan: _Plan, config: ReplayConfig, n: int) -> zarr.Group:
    """Open ``path`` (zarr v3 only) and check that it belongs to this run and this configuration
    and has the layout of ``plan``, one snapshot per chunk (at most ``n`` snapshots)."""
    not_a_store = f"{path}: exists but is not a replay store; choose another --name (or delete it)"
    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        stored: dict[str, Any] = dict(group.attrs)  # JSON as stored
        stored_config = ReplayConfig.from_json(stored["config"])
        arrays = {name: group.get(name) for name in plan.layout}
    except (KeyError, ValueError, TypeError, OSError, ReplayError):
        raise ReplayError(not_a_store) from None
    if stored_config.identity() != config.identity():
        diff = {
            k: (v, config.identity()[k])
            for k, v in stored_config.identity().items()
            if config.identity()[k] != v
        }
        details = "; ".join(f"{k}: stored {old}, requested {new}" for k, (old, new) in diff.items())
        raise ReplayError(
            f"{path}: holds a replay with a different configuration ({details}); "
            "choose another --name (or delete that store)"
        )
    other_run = f"{path}: was written for a different run (%s differ); delete it or move it"
    if stored.get("run_spec") != plan.attrs["run_spec"]:
        raise ReplayError(other_run % "specs")
    checked: dict[str, zarr.Array] = {}
    for name, spec in plan.layout.items():
        array = arrays[name]
        if array is None and spec.added_later:  # a store from before the array existed
            done = arrays["done"]
            num_stored = done.shape[0] if isinstance(done, zarr.Array) else 0
            array = _create_array(group, name, spec, num_stored)
        if not isinstance(array, zarr.Array) or array.dtype != np.dtype(spec.dtype):
            raise ReplayError(f"{path}: {name!r} is missing or has another dtype; {not_a_store}")
        if (array.shape[1:] if spec.per_snapshot else array.shape) != spec.shape:
            raise ReplayError(other_run % f"shapes of {name!r}")
        if array.chunks != spec.chunks or array.shards is not None:
            raise ReplayError(f"{path}: {name!r} is not chunked one snapshot per chunk; {not_a_store}")
        checked[name] = array
    try:
        same_probes = np.array_equal(checked["probe_targets"][...], plan.targets)
    except Exception:  # noqa: BLE001 - a chunk damaged from outside: not readable, so not the same
        same_probes = False
    if not same_probes:
        raise ReplayError(other_run % "probes")
    if checked["done"].shape[0] > n:
        raise ReplayError(f"{path}: holds {checked['done'].shape[0]} snapshots but the run lists only {n}")
    return group


def _array(group: zarr.Group, name: str) -> zarr.Array:
    """The array ``name`` of ``group``, a store whose layout :func:`_open_existing` checked."""
    array = group[name]
    if not isinstance(array, zarr.Array):
        raise ReplayError(f"{group.store}: {name!r} is not an array")
    return array


def _done_flags(group: zarr.Group) -> np.ndarray:
    """``done`` ``[S]``, counting a snapshot whose ``done`` or ``step`` chunk is damaged as not done."""
    done, done_ok = read_chunkwise(_array(group, "done"))
    _, step_ok = read_chunkwise(_array(group, "step"))  # never shorter: :func:`_extend` grows it first
    return done.astype(bool) & done_ok & step_ok[: len(done)]


def _add_missing_attributes(group: zarr.Group, attrs: dict[str, Any]) -> None:
    """Give a store written before some of the attributes ``attrs`` existed the ones it lacks (as
    :func:`_open_existing` gives it the arrays added later); the attributes it has stay."""
    missing = {k: v for k, v in attrs.items() if k not in group.attrs}
    if missing:
        group.attrs.update(missing)


def _unmark_damaged(path: Path, group: zarr.Group, layout: dict[str, _ArraySpec]) -> None:
    """Mark not done, with a warning naming them, the done snapshots with a chunk that cannot be
    decoded or a missing measure chunk (:func:`~replay.crashsafe.damaged_rows`): damage from
    outside, which analyses would read as NaN or fail on. They are then recomputed."""
    done = np.flatnonzero(_done_flags(group))
    damaged: dict[int, list[str]] = {}
    for name, spec in layout.items():
        if spec.per_snapshot and name != "done" and len(done):
            root = path if name.startswith(_measure_key("")) else None
            for s in damaged_rows(_array(group, name), done, root):
                damaged.setdefault(s, []).append(name)
    if not damaged:
        return
    rows = sorted(damaged)
    for s in rows:
        _array(group, "done")[s] = False
    steps = read_chunkwise(_array(group, "step"))[0]
    names = sorted({n for found in damaged.values() for n in found})
    warnings.warn(
        f"{path}: snapshot steps {[int(steps[s]) for s in rows]} were done but their chunks of "
        f"{', '.join(names[:4])}{', ...' if len(names) > 4 else ''} are missing or damaged; "
        "recomputing them",
        ReplayWarning,
        stacklevel=2,
    )


def _extend(group: zarr.Group, layout: dict[str, _ArraySpec], entries: list[SnapshotEntry]) -> None:
    """Grow the per-snapshot arrays to the manifest and (re)write steps and epochs of the
    snapshots not done (idempotent, so a crash in here is harmless)."""
    n = len(entries)
    done = _done_flags(group)
    steps = np.array([e.step for e in entries], dtype=np.int64)
    stored_steps = read_chunkwise(_array(group, "step"))[0][: len(done)]
    if not np.array_equal(stored_steps[done], steps[: len(done)][done]):
        raise ReplayError(f"{group.store}: its snapshot steps differ from the run's manifest")
    for name, spec in layout.items():  # "step" first (see :func:`_done_flags`)
        if spec.per_snapshot:
            array = _array(group, name)
            if array.shape[0] < n:
                array.resize(spec.full_shape(n))
    todo = np.flatnonzero(~np.concatenate([done, np.zeros(n - len(done), dtype=bool)]))
    if len(todo):
        _array(group, "step")[todo[0] :] = steps[todo[0] :]
        _array(group, "epoch")[todo[0] :] = np.array([e.epoch for e in entries[todo[0] :]], dtype=np.int64)
        if "recorded_lr" in layout:
            lrs = [np.nan if e.lr is None else e.lr for e in entries[todo[0] :]]
            _array(group, "recorded_lr")[todo[0] :] = np.array(lrs, dtype=np.float64)

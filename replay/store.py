"""The replay store ``RUN_DIR/<name>.zarr`` (zarr v3), in the layout of README "Replay store".

``S`` snapshots (the run's manifest), ``P`` probes, ``C`` outputs, ``K`` probe classes. Arrays
``[S, ...]`` are chunked one snapshot per chunk (``done`` included: a ``[S]`` array of chunks of
1), checked whenever a store is opened: writing one snapshot touches only its own chunk files,
so the ranks of a distributed replay can write different snapshots at once. When the manifest
has grown, the ``[S, ...]`` arrays are extended.

Crash safety, for a process killed at any moment (and a machine that goes down):

- a new store is built in a temporary directory and renamed into place, so a store always has
  its full layout;
- zarr's ``LocalStore`` writes every chunk and metadata file to a temporary ``*.partial`` file
  and renames it over the old one, so a killed writer leaves the old file (or none) and an
  orphaned ``*.partial`` file, never a torn chunk; orphans are removed when a store is prepared;
- snapshot ``s`` counts as written only once ``done[s]`` is set, which happens last, after the
  file system holding the store has been flushed (``syncfs``): ``done`` never covers a chunk
  that is not on disk. Undone snapshots are recomputed on resume and their chunks written whole
  (zarr does not read a chunk it overwrites entirely), so whatever they held does not matter;
- a chunk of ``done`` or ``step`` that cannot be decoded (damage from outside) counts as not
  done, so that snapshot is recomputed and its chunks rewritten.

One writer at a time: :func:`exclusive_writer` holds an OS lock on ``RUN_DIR/<name>.zarr.lock``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from analyses.classpairs import STATS, aggregate
from recorder.rundir.errors import ReplayError, RunDirError
from recorder.rundir.snapshot import SnapshotEntry
from recorder.rundir.spec import RunSpec
from replay.config import ReplayConfig
from replay.engine import SnapshotResult

_ORPHAN = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's temporary file of an interrupted write
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs  # Linux
except (OSError, AttributeError, TypeError):
    _syncfs = None


@dataclass(frozen=True)
class _ArraySpec:
    shape: tuple[int, ...]  # without the snapshot axis for per-snapshot arrays
    dtype: Any
    dims: tuple[str, ...]
    per_snapshot: bool = True

    @property
    def fill(self) -> Any:
        return np.nan if np.issubdtype(self.dtype, np.floating) else np.zeros((), self.dtype).item()

    def full_shape(self, num_snapshots: int) -> tuple[int, ...]:
        return ((num_snapshots,) + self.shape) if self.per_snapshot else self.shape

    @property
    def chunks(self) -> tuple[int, ...]:
        """One snapshot per chunk; arrays without a snapshot axis are one chunk."""
        return ((1,) + self.shape) if self.per_snapshot else self.shape


def _layout(targets: np.ndarray, num_outputs: int, num_classes: int, measures: tuple[str, ...], dtype: str):
    """Array name -> :class:`_ArraySpec` (README table)."""
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
    }
    for m in measures:
        layout[f"measures/{m}"] = _ArraySpec(
            (num_probes, num_probes), dtype, ("snapshot", "updated", "observed")
        )
        if num_classes:
            for stat in STATS:
                layout[f"classpairs/{m}/{stat}"] = _ArraySpec(
                    (num_classes, num_classes), dtype, ("snapshot", "observed_class", "updated_class")
                )
    return layout


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
        cls, config: ReplayConfig, spec: RunSpec, targets: torch.Tensor, measures: tuple[str, ...]
    ) -> _Plan:
        targets_np = targets.numpy()
        classification = spec.task == "classification"
        classes = sorted(int(c) for c in np.unique(targets_np)) if classification else None
        attrs = {
            "config": config.to_json(),
            "run_spec": spec.to_json(),
            "dtype": config.storage_dtype,
            "precision": config.precision,
            "measures": list(measures),
            "classes": classes,
            "include_self": config.include_self,
        }
        num_classes = len(classes or ())
        layout = _layout(targets_np, spec.num_outputs, num_classes, measures, config.storage_dtype)
        labels = np.searchsorted(classes, targets_np) if classification else None
        return cls(attrs, layout, targets_np, labels, num_classes)


class ReplayStore:
    """One replay store opened for writing by one configuration.

    :meth:`prepare` (one process, holding :func:`exclusive_writer`) creates, resumes or extends
    it; :meth:`attach` opens a prepared store in the other ranks of a distributed replay.
    """

    def __init__(self, path: Path, group: zarr.Group, plan: _Plan, include_self: bool):
        self.path = path
        self._group = group
        self._arrays = {name: group[name] for name in plan.layout}
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
    ) -> ReplayStore:
        """Create the store, or reopen one written with the same configuration for the same run,
        extend it to ``entries`` (the run's manifest) and remove what killed writers left behind.

        ``targets`` ``[P]`` / ``[P, C]``: the run's probe targets. Raises :class:`ReplayError` when
        ``path`` holds another configuration or another run, or cannot be written.
        """
        path = Path(path)
        plan = _Plan.make(config, spec, targets, measures)
        try:
            _remove_orphans(path)
            if not path.exists():
                _create(path, plan, len(entries))
            group = _open_existing(path, plan, config, len(entries))
            _extend(group, plan.layout, entries)
            _flush_to_disk(path)
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
    ) -> ReplayStore:
        """Open a store that :meth:`prepare` has made ready for ``entries``; writes nothing."""
        path = Path(path)
        plan = _Plan.make(config, spec, targets, measures)
        group = _open_existing(path, plan, config, len(entries))
        if group["done"].shape[0] != len(entries):
            raise ReplayError(f"{path}: holds {group['done'].shape[0]} snapshots, expected {len(entries)}")
        return cls(path, group, plan, config.include_self)

    def write(self, s: int, result: SnapshotResult) -> None:
        """Store everything of snapshot ``s`` (whole chunks), flush it to disk, then mark it done."""
        a, plan = self._arrays, self._plan
        try:
            a["base_outputs"][s] = result.base_outputs.numpy()
            a["probe_loss"][s] = result.probe_loss.numpy()
            a["update_norm"][s] = result.update_norm.numpy()
            a["error_estimate"][s] = result.error_estimate
            for name, S in result.measures.items():
                a[f"measures/{name}"][s] = S.numpy()
            if plan.labels is not None:
                stacked = np.stack([S.numpy() for S in result.measures.values()])  # [M, P, P]
                for stat in STATS:
                    A = aggregate(
                        stacked, plan.labels, plan.num_classes, self._include_self, stat
                    )  # [M, K, K]
                    for name, A_m in zip(result.measures, A, strict=True):
                        a[f"classpairs/{name}/{stat}"][s] = A_m
            _flush_to_disk(self.path)
            a["done"][s] = True
        except OSError as e:
            raise ReplayError(f"{self.path}: cannot write snapshot {s} ({e})") from None
        self.done[s] = True

    def read_done(self) -> np.ndarray:
        """``done`` ``[S]`` as it is on disk now (other ranks may have written since opening)."""
        return _done_flags(self._group)


@contextmanager
def exclusive_writer(path: Path) -> Iterator[None]:
    """Hold the write lock of the store ``path``: an OS lock (``flock``) on ``<path>.lock``,
    which the kernel releases when this process ends, however it ends.

    Raises :class:`ReplayError` while another process holds it, and
    :class:`~recorder.runfiles.RunDirError` when the lock file cannot be created (the run
    directory is read-only).
    """
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunDirError(
            f"{path.parent}: cannot write the replay store {path.name} there ({e.strerror}); "
            "replay needs a writable run directory (copy it somewhere writable)"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
            raise ReplayError(
                f"{path}: another replay ({holder}) is writing this store now; wait for it to "
                "finish, or replay into another --name"
            ) from None
        except OSError as e:  # a file system without locks
            raise ReplayError(f"{lock}: cannot lock the replay store ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flush_to_disk(path: Path) -> None:
    """Make every write so far to the file system holding ``path`` durable (``syncfs``; ``sync``
    where the C library has no ``syncfs``)."""
    if _syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _remove_orphans(path: Path) -> None:
    """Delete what killed writers of ``path`` left: temporary stores beside it and zarr's
    ``*.partial`` files inside it (only the lock holder may call this)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if path.is_dir():
        for partial in path.rglob("*.partial"):
            if _ORPHAN.search(partial.name):
                partial.unlink(missing_ok=True)


def _create(path: Path, plan: _Plan, n: int) -> None:
    """Build the store in a temporary directory, flush it and rename it to ``path`` (atomic)."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        group = zarr.open_group(tmp, mode="w", attributes=plan.attrs, zarr_format=3)
        for name, spec in plan.layout.items():
            group.create_array(
                name,
                shape=spec.full_shape(n),
                chunks=spec.chunks,
                dtype=spec.dtype,
                fill_value=spec.fill,
                dimension_names=spec.dims,
            )
        group["probe_targets"][...] = plan.targets
        _flush_to_disk(tmp)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _open_existing(path: Path, plan: _Plan, config: ReplayConfig, n: int) -> zarr.Group:
    """Open ``path`` (zarr v3 only) and check that it belongs to this run and this configuration
    and has the layout of ``plan``, one snapshot per chunk (at most ``n`` snapshots)."""
    not_a_store = f"{path}: exists but is not a replay store; choose another --name (or delete it)"
    try:
        group = zarr.open_group(path, mode="r+", zarr_format=3)
        stored = dict(group.attrs)
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
    for name, spec in plan.layout.items():
        array = arrays[name]
        if not isinstance(array, zarr.Array) or array.dtype != np.dtype(spec.dtype):
            raise ReplayError(f"{path}: {name!r} is missing or has another dtype; {not_a_store}")
        if (array.shape[1:] if spec.per_snapshot else array.shape) != spec.shape:
            raise ReplayError(other_run % f"shapes of {name!r}")
        if array.chunks != spec.chunks or array.shards is not None:
            raise ReplayError(f"{path}: {name!r} is not chunked one snapshot per chunk; {not_a_store}")
    try:
        same_probes = np.array_equal(arrays["probe_targets"][...], plan.targets)
    except Exception:  # noqa: BLE001 - a chunk damaged from outside: not readable, so not the same
        same_probes = False
    if not same_probes:
        raise ReplayError(other_run % "probes")
    if arrays["done"].shape[0] > n:
        raise ReplayError(f"{path}: holds {arrays['done'].shape[0]} snapshots but the run lists only {n}")
    return group


def _read_chunkwise(array: zarr.Array) -> tuple[np.ndarray, np.ndarray]:
    """The values of a ``[S]`` array and whether each could be read: a chunk damaged from outside
    (it cannot be decoded) reads as the fill value and ``False``."""
    try:
        return np.asarray(array[:]), np.ones(array.shape[0], dtype=bool)
    except Exception:  # noqa: BLE001 - damaged bytes raise whatever the codec raises
        values = np.full(array.shape[0], array.fill_value, dtype=array.dtype)
        readable = np.zeros(array.shape[0], dtype=bool)
        for s in range(array.shape[0]):
            try:
                values[s] = array[s]
                readable[s] = True
            except Exception:  # noqa: BLE001
                pass
        return values, readable


def _done_flags(group: zarr.Group) -> np.ndarray:
    """``done`` ``[S]``, counting a snapshot whose ``done`` or ``step`` chunk is damaged as not done."""
    done, done_ok = _read_chunkwise(group["done"])
    _, step_ok = _read_chunkwise(group["step"])  # never shorter: :func:`_extend` grows it first
    return done.astype(bool) & done_ok & step_ok[: len(done)]


def _extend(group: zarr.Group, layout: dict[str, _ArraySpec], entries: list[SnapshotEntry]) -> None:
    """Grow the per-snapshot arrays to the manifest and (re)write steps and epochs of the
    snapshots not done (idempotent, so a crash in here is harmless)."""
    n = len(entries)
    done = _done_flags(group)
    steps = np.array([e.step for e in entries], dtype=np.int64)
    stored_steps = _read_chunkwise(group["step"])[0][: len(done)]
    if not np.array_equal(stored_steps[done], steps[: len(done)][done]):
        raise ReplayError(f"{group.store}: its snapshot steps differ from the run's manifest")
    for name, spec in layout.items():  # "step" first (see :func:`_done_flags`)
        if spec.per_snapshot and group[name].shape[0] < n:
            group[name].resize(spec.full_shape(n))
    todo = np.flatnonzero(~np.concatenate([done, np.zeros(n - len(done), dtype=bool)]))
    if len(todo):
        group["step"][todo[0] :] = steps[todo[0] :]
        group["epoch"][todo[0] :] = np.array([e.epoch for e in entries[todo[0] :]], dtype=np.int64)

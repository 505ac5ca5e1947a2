"""The run directory as a whole: :class:`RunDir` reads and validates it, :func:`create_run_dir`
and :class:`RunWriter` write it.

A run directory holds everything replay needs and nothing that executes::

    RUN_DIR/
      spec.json            RunSpec: model factory + kwargs, task, loss, optimizer type, seed, versions
      probes.safetensors   "inputs" [P, ...] (or "inputs.<name>" [P, ...] each), "targets" [P]
                           (int64 classes) or [P, C] (float); see :mod:`recorder.rundir.probes`
      manifest.json        {"format": 1, "complete": bool, "snapshots": [SnapshotEntry, ...]},
                           rewritten atomically ("complete": false while being recorded)
      metrics.jsonl        one JSON object per line: {"step": .., "epoch": .., <metric>: ..}
      snapshots/step_00000012.safetensors     (see :mod:`recorder.rundir.snapshot`)

A snapshot is listed in the manifest only after its file is complete on disk (written to a
temporary name, fsynced, renamed), so a crash leaves only complete, listed snapshots. Every
reader here turns malformed input into a :class:`RunDirError` naming the file (a damaged
snapshot file into its subclass :class:`CorruptSnapshotError`), never another exception; nothing
read from a run directory is executed (JSON and safetensors only, no pickle).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from recorder.rundir.errors import CorruptSnapshotError, RunDirError, UnfinishedRunWarning
from recorder.rundir.files import (
    MAX_JSON_BYTES,
    atomic_write_bytes,
    atomic_write_json,
    make_folder,
    parse_json,
    read_file,
    sha256,
)
from recorder.rundir.probes import Inputs, decode_probes, encode_probes, probe_problem
from recorder.rundir.snapshot import (
    Snapshot,
    SnapshotEntry,
    decode_snapshot,
    encode_snapshot,
    weight_skeleton,
)
from recorder.rundir.spec import RunSpec
from recorder.rundir.trajectory import FORMAT_VERSION, TrajectoryWriter

MAX_METRICS_BYTES = 1 << 30  # metrics.jsonl is read only up to this size
MAX_PROBES_BYTES = 16 << 30  # probes.safetensors is read only up to this size


class RunDir:
    """Read access to a run directory, validating everything it reads.

    >>> run = RunDir("runs/digits")       # doctest: +SKIP
    >>> run.spec.model.factory, len(run.manifest)

    ``complete``: the manifest's ``"complete"`` field, False while the recorder writes the run
    or when it was stopped before training finished; True without the field (runs written before
    it existed) or without a manifest.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise RunDirError(f"{self.path}: no such run directory")
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: not a directory")
        if not os.access(self.path, os.R_OK | os.X_OK):
            raise RunDirError(f"{self.path}: run directory is not readable")
        if not (self.path / "spec.json").exists():
            raise RunDirError(f"{self.path}: not a run directory (no spec.json); record one first")
        self.spec = RunSpec.from_json(self._read_json("spec.json"), where=str(self.path / "spec.json"))
        self.manifest, self.complete = self._read_manifest()

    def _read_json(self, name: str) -> Any:
        """The JSON file ``name`` (relative to the run directory), at most ``MAX_JSON_BYTES``."""
        p = self.path / name
        return parse_json(read_file(p, MAX_JSON_BYTES, allowed="a JSON file may hold"), str(p))

    def _read_manifest(self) -> tuple[list[SnapshotEntry], bool]:
        where = str(self.path / "manifest.json")
        if not (self.path / "manifest.json").exists():
            return [], True
        obj = self._read_json("manifest.json")
        if not isinstance(obj, dict) or not isinstance(obj.get("snapshots"), list):
            raise RunDirError(f"{where}: expected {{'format': {FORMAT_VERSION}, 'snapshots': [...]}}")
        if obj.get("format", FORMAT_VERSION) != FORMAT_VERSION:
            raise RunDirError(
                f"{where}: format {obj['format']!r} is not supported (expected {FORMAT_VERSION})"
            )
        entries = [SnapshotEntry.from_json(e, f"{where} entry {k}") for k, e in enumerate(obj["snapshots"])]
        steps = [e.step for e in entries]
        if steps != sorted(set(steps)):
            raise RunDirError(f"{where}: snapshot steps must be strictly increasing")
        complete = obj.get("complete", True)
        if not isinstance(complete, bool):
            raise RunDirError(f"{where}: 'complete' must be true or false, not {complete!r}")
        return entries, complete

    def warn_if_unfinished(self) -> None:
        """Warn (:class:`UnfinishedRunWarning`) when the recording did not finish."""
        if not self.complete:
            warnings.warn(
                f"{self.path}: the recording did not finish (interrupted, or still being written); "
                f"using the {len(self.manifest)} snapshots it lists",
                UnfinishedRunWarning,
                stacklevel=2,
            )

    def probes(self) -> tuple[Inputs, torch.Tensor]:
        """The probe set (:mod:`recorder.rundir.probes`): inputs ``[P, ...]`` (one tensor, or named
        tensors) and targets ``[P]`` (int64 classes) or ``[P, C]`` (floats), finite."""
        p = self.path / "probes.safetensors"
        data = read_file(p, MAX_PROBES_BYTES, allowed="a probe set may hold")
        inputs, targets = decode_probes(data, str(p))
        problem = probe_problem(self.spec.task, self.spec.num_outputs, inputs, targets)
        if problem:
            raise RunDirError(f"{p}: {problem}")
        return inputs, targets

    def _read_snapshot(self, entry: SnapshotEntry, length: int | None = None) -> bytes:
        """The bytes of the snapshot file of ``entry`` (its first ``length``), refused before
        reading when the file is larger than the manifest says (:class:`CorruptSnapshotError`)."""
        return read_file(
            self.path / entry.file,
            entry.bytes,
            CorruptSnapshotError,
            missing=f"listed in the manifest (step {entry.step}) but missing",
            allowed=f"the manifest lists for step {entry.step}",
            length=length,
        )

    def load_snapshot(self, entry: SnapshotEntry, verify: bool = True) -> Snapshot:
        """Read one listed snapshot, checking its size and checksum unless ``verify`` is False
        (a file larger than the manifest says is never read).

        A missing, unreadable, truncated or corrupted file raises :class:`CorruptSnapshotError`.
        """
        p = self.path / entry.file
        data = self._read_snapshot(entry)
        if verify and (len(data) != entry.bytes or sha256(data) != entry.sha256):
            raise CorruptSnapshotError(
                f"{p}: checksum mismatch (step {entry.step}): the file is truncated or corrupted"
            )
        snap = decode_snapshot(data, str(p))
        if snap.step != entry.step:
            raise CorruptSnapshotError(f"{p}: holds step {snap.step}, the manifest says {entry.step}")
        snap.nonfinite = [k for k, v in snap.params.items() if not torch.isfinite(v).all()]
        return snap

    def weight_skeleton(self, entry: SnapshotEntry) -> dict[str, torch.Tensor]:
        """The parameters of the snapshot of ``entry`` as tensors on the ``meta`` device (names,
        shapes, dtypes), read from its safetensors header alone: no tensor data is read.
        Raises :class:`CorruptSnapshotError` for a missing file or a malformed header."""
        p = self.path / entry.file
        return weight_skeleton(lambda n: self._read_snapshot(entry, n), str(p))

    def metrics(self) -> list[dict[str, Any]]:
        """Per-step / per-epoch metrics (``metrics.jsonl``); torn or malformed lines are ignored."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        data = read_file(p, MAX_METRICS_BYTES, allowed="metrics.jsonl may hold")
        for line in data.decode(errors="replace").splitlines():
            try:
                row = parse_json(line, str(p))
            except RunDirError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def create_run_dir(
    path: str | os.PathLike,
    spec: RunSpec,
    inputs: Inputs,
    targets: torch.Tensor,
    complete: bool | None = None,
) -> None:
    """Create a run directory: ``spec.json``, ``probes.safetensors`` (inputs [P, ...] or named
    tensors [P, ...], targets [P] or [P, C]) and an empty manifest (``complete``: its field, see
    :class:`~recorder.rundir.trajectory.TrajectoryWriter`). Refuses a directory that already
    holds a run."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / "spec.json").exists():
        raise RunDirError(f"{path}: already holds a run; choose a new run directory")
    make_folder(path / "snapshots")
    atomic_write_json(path / "spec.json", spec.to_json())
    atomic_write_bytes(path / "probes.safetensors", encode_probes(inputs, targets))
    TrajectoryWriter(path, complete).write_manifest()


class RunWriter:
    """A synchronous writer of a whole run directory from :class:`Snapshot` records (the recorder
    creates the directory the same way and writes its snapshots from :mod:`recorder.writer`)."""

    def __init__(self, path: str | os.PathLike, spec: RunSpec, inputs: Inputs, targets: torch.Tensor):
        create_run_dir(path, spec, inputs, targets)
        self.path = Path(path)
        self._trajectory = TrajectoryWriter(path)

    def add_snapshot(
        self,
        snapshot: Snapshot,
        epoch: int = 0,
        lr: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> SnapshotEntry:
        """Write one snapshot file, then list it. Steps must increase."""
        entry = self._trajectory.add_snapshot(snapshot.step, [encode_snapshot(snapshot)], epoch, lr, metrics)
        self._trajectory.commit()
        return SnapshotEntry.from_json(entry, str(self.path / "manifest.json"))

    def log_metrics(self, *rows: dict[str, Any]) -> None:
        """Append metrics rows to ``metrics.jsonl`` durably (see :meth:`TrajectoryWriter.log_metrics`)."""
        self._trajectory.log_metrics(*rows)
        self._trajectory.commit()

"""The growing part of a run directory: snapshot files, the manifest that lists them and the
metrics rows, written crash-safely with nothing but the standard library.

It imports neither torch nor safetensors, so the recorder's writer process
(:mod:`recorder.writer`) starts in milliseconds; :class:`recorder.rundir.run.RunWriter` writes
through the same :class:`TrajectoryWriter`. A snapshot file is a safetensors file: an 8-byte
little-endian header length, the JSON header (padded with spaces to a multiple of 8 bytes), then
the tensors' bytes back to back in the order of their offsets.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from recorder.rundir.files import Buffer, atomic_write_bytes, finite_or_none, fsync_path, open_regular, sha256

FORMAT_VERSION = 1


def snapshot_filename(step: int) -> str:
    return f"snapshots/step_{step:08d}.safetensors"


def safetensors_header(tensors_json: str, metadata: dict[str, str]) -> bytes:
    """The first bytes of a safetensors file: the header's length (8 bytes, little endian), then
    the header, a JSON object of ``__metadata__`` and the tensors' entries ``tensors_json`` (JSON
    object members, without braces), padded with spaces so the tensor data starts at a multiple
    of 8 bytes."""
    members = ['"__metadata__":' + json.dumps(metadata, separators=(",", ":"))]
    header = ("{" + ",".join(members + ([tensors_json] if tensors_json else [])) + "}").encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def optimizer_metadata(type_name: str, groups: list[dict[str, Any]]) -> str:
    """The optimizer's entry of a snapshot's metadata: its type and per-group hyperparameters."""
    return json.dumps({"type": type_name, "groups": groups})


def snapshot_metadata(step: int, optimizer: str | None) -> dict[str, str]:
    """A snapshot file's ``__metadata__``: its step, the format and, when recorded, the optimizer
    (:func:`optimizer_metadata`)."""
    metadata = {"step": str(step), "format": str(FORMAT_VERSION)}
    if optimizer is not None:
        metadata["optimizer"] = optimizer
    return metadata


class TrajectoryWriter:
    """Adds snapshot files and metrics rows to the run directory ``path``; :meth:`commit` makes
    them durable and lists the new snapshots in ``manifest.json``.

    ``complete``: the manifest's ``"complete"`` field, for a recording: False while it is being
    written, True once :meth:`finish` says training finished (a manifest without the field, as
    runs written before it existed, counts as complete); None writes no field.

    A snapshot is listed only once its file is on disk, so a crash, even of the machine, leaves
    only complete, listed snapshots. Committing several snapshots at once costs one round of
    fsyncs (the recorder's writer process commits once a second, on a thread of its own, so
    that writing never waits for the disk). The manifest is
    rewritten atomically from the entries' JSON kept as text, so a long run costs a join, not a
    re-encoding of every entry.
    """

    def __init__(self, path: str | os.PathLike, complete: bool | None = None):
        self.path = Path(path)
        self.complete = complete
        self.steps: list[int] = []  # written, listed or not
        self._listed: list[str] = []  # each listed entry's JSON
        self._unlisted: list[dict[str, Any]] = []  # written, not yet durable
        self._rows_unsynced = False

    @property
    def listed(self) -> int:
        """How many snapshots ``manifest.json`` lists (as written to disk by this writer)."""
        return len(self._listed)

    def write_manifest(self, listed: list[str] | None = None) -> None:
        """Write ``manifest.json`` listing ``listed`` (entries' JSON; default: those listed so far)."""
        body = ",\n  ".join(self._listed if listed is None else listed)
        complete = "" if self.complete is None else f', "complete": {json.dumps(self.complete)}'
        text = f'{{"format": {FORMAT_VERSION}{complete}, "snapshots": [\n  {body}\n]}}\n'
        atomic_write_bytes(self.path / "manifest.json", text.encode())

    def finish(self) -> None:
        """Mark the recording complete in ``manifest.json`` (after the last :meth:`commit`)."""
        self.complete = True
        self.write_manifest()

    def add_snapshot(
        self,
        step: int,
        chunks: Iterable[Buffer],
        epoch: int = 0,
        lr: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Write the snapshot file of ``step`` (the concatenation of ``chunks``: a framed header and
        the tensors' bytes) and return its manifest entry, listed by the next :meth:`commit`.
        Steps must increase."""
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"snapshot step {step} is not after {self.steps[-1]}")
        chunks = list(chunks)
        rel = snapshot_filename(step)
        atomic_write_bytes(self.path / rel, *chunks, durable=False)
        entry = {
            "step": step,
            "epoch": epoch,
            "file": rel,
            "sha256": sha256(*chunks),
            "bytes": sum(memoryview(c).nbytes for c in chunks),
            "lr": finite_or_none(lr),
            "metrics": {k: finite_or_none(float(v)) for k, v in (metrics or {}).items()},
        }
        self.steps.append(step)
        self._unlisted.append(entry)
        return entry

    def log_metrics(self, *rows: dict[str, Any]) -> None:
        """Append metrics rows to ``metrics.jsonl`` (made durable by the next :meth:`commit`; a
        torn line after a crash is skipped on read)."""
        if not rows:
            return
        lines = [
            json.dumps({k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}) + "\n"
            for row in rows
        ]
        fd = open_regular(self.path / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with open(fd, "a") as f:
            f.write("".join(lines))
        self._rows_unsynced = True

    def take_uncommitted(self) -> tuple[list[dict[str, Any]], bool]:
        """What was written since the last take: the new entries, and whether rows were appended."""
        taken = self._unlisted, self._rows_unsynced
        self._unlisted, self._rows_unsynced = [], False
        return taken

    def commit(self, taken: tuple[list[dict[str, Any]], bool] | None = None) -> None:
        """fsync what was written (``taken``, default: everything since the last take), then list
        the new snapshots. Commits must not run concurrently."""
        entries, rows = self.take_uncommitted() if taken is None else taken
        if rows:
            fsync_path(self.path / "metrics.jsonl")
        if not entries:
            return
        for entry in entries:
            fsync_path(self.path / entry["file"])
        fsync_path(self.path / "snapshots")  # the renames
        listed = self._listed + [json.dumps(entry, sort_keys=True) for entry in entries]
        self.write_manifest(listed)
        self._listed = listed  # only once on disk: a failed write lists nothing new

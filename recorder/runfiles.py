"""The run-directory format: the one place that writes and reads it.

A run directory holds everything replay needs and nothing that executes::

    RUN_DIR/
      spec.json            RunSpec: model factory + kwargs, task, loss, optimizer type, seed, versions
      probes.safetensors   "inputs" [P, ...], "targets" [P] (int64 classes) or [P, C] (float)
      manifest.json        {"format": 1, "snapshots": [SnapshotEntry, ...]}, rewritten atomically
      metrics.jsonl        one JSON object per line: {"step": .., "epoch": .., <metric>: ..}
      snapshots/step_00000012.safetensors
                           "params.<name>", "buffers.<name>", "optim.<param name>.<state key>";
                           metadata "step" and "optimizer" (JSON: type and per-group hyperparameters)

A snapshot is listed in the manifest only after its file is complete on disk (written to a
temporary name, fsynced, renamed), so a crash leaves only complete, listed snapshots. Every
reader here turns malformed input into a :class:`RunDirError` naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
TASKS = ("classification", "regression")
LOSSES = ("cross_entropy", "mse", "half_sse")


class RunDirError(Exception):
    """A run directory (or one of its files) is missing, unreadable or malformed."""


# ----------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename (crash safe)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- records


@dataclass
class ModelSpec:
    """A model named by a registered factory (see :mod:`recorder.models`) and its kwargs."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    """What replay needs to rebuild the model and its loss (``spec.json``)."""

    model: ModelSpec
    task: str  # "classification" | "regression"
    loss: str  # "cross_entropy" | "mse" (torch's mean) | "half_sse" (0.5 * sum of squares)
    num_outputs: int
    optimizer: str | None = None  # class name of the training optimizer, e.g. "AdamW"
    seed: int | None = None
    preset: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "spec.json") -> RunSpec:
        if not isinstance(obj, dict):
            raise RunDirError(f"{where}: expected a JSON object")
        try:
            model = obj["model"]
            if not isinstance(model, dict) or not isinstance(model.get("factory"), str):
                raise RunDirError(f"{where}: 'model' must be {{'factory': str, 'kwargs': {{...}}}}")
            kwargs = model.get("kwargs", {})
            if not isinstance(kwargs, dict):
                raise RunDirError(f"{where}: model 'kwargs' must be an object")
            spec = cls(
                model=ModelSpec(model["factory"], kwargs),
                task=obj["task"],
                loss=obj["loss"],
                num_outputs=obj["num_outputs"],
                optimizer=obj.get("optimizer"),
                seed=obj.get("seed"),
                preset=obj.get("preset"),
                versions=obj.get("versions", {}),
                extra=obj.get("extra", {}),
                format=obj.get("format", FORMAT_VERSION),
            )
        except KeyError as e:
            raise RunDirError(f"{where}: missing field {e.args[0]!r}") from None
        if spec.task not in TASKS:
            raise RunDirError(f"{where}: task {spec.task!r} is not one of {TASKS}")
        if spec.loss not in LOSSES:
            raise RunDirError(f"{where}: loss {spec.loss!r} is not one of {LOSSES}")
        if (
            not isinstance(spec.num_outputs, int)
            or isinstance(spec.num_outputs, bool)
            or spec.num_outputs < 1
        ):
            raise RunDirError(f"{where}: num_outputs must be a positive integer")
        if spec.format != FORMAT_VERSION:
            raise RunDirError(f"{where}: format {spec.format!r} is not supported (expected {FORMAT_VERSION})")
        return spec


@dataclass
class SnapshotEntry:
    """One manifest line: a complete snapshot file and what was known at its step."""

    step: int
    epoch: int
    file: str  # relative to the run directory
    sha256: str
    bytes: int
    lr: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> SnapshotEntry:
        if not isinstance(obj, dict):
            raise RunDirError(f"{where}: snapshot entry must be an object")
        try:
            entry = cls(
                step=obj["step"],
                epoch=obj.get("epoch", 0),
                file=obj["file"],
                sha256=obj["sha256"],
                bytes=obj["bytes"],
                lr=obj.get("lr"),
                metrics=obj.get("metrics", {}),
            )
        except KeyError as e:
            raise RunDirError(f"{where}: snapshot entry lacks {e.args[0]!r}") from None
        ints = (entry.step, entry.epoch, entry.bytes)
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints):
            raise RunDirError(f"{where}: step, epoch and bytes must be non-negative integers")
        if not isinstance(entry.file, str) or not isinstance(entry.sha256, str):
            raise RunDirError(f"{where}: file and sha256 must be strings")
        rel = Path(entry.file)
        if rel.is_absolute() or ".." in rel.parts:
            raise RunDirError(f"{where}: snapshot file {entry.file!r} points outside the run directory")
        if not isinstance(entry.metrics, dict):
            raise RunDirError(f"{where}: metrics must be an object")
        return entry


@dataclass
class OptimizerRecord:
    """The training optimizer as recorded with a snapshot.

    ``groups``: one dict per parameter group, its hyperparameters at that step (``lr`` after any
    scheduler, ``betas``, ``eps``, ``weight_decay``, ``momentum``, ...) and ``params``, the names
    of its parameters. ``state``: parameter name -> {state key -> tensor} (``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``step``).
    """

    type: str
    groups: list[dict[str, Any]]
    state: dict[str, dict[str, torch.Tensor]]


@dataclass
class Snapshot:
    """The weights (and optimizer state, when recorded) at one training step."""

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    optimizer: OptimizerRecord | None
    nonfinite: list[str] = field(default_factory=list)  # parameter names holding NaN or Inf


# ----------------------------------------------------------------------------- snapshot files


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """Serialize a snapshot to safetensors bytes (tensors must be on the CPU)."""
    tensors = {f"params.{k}": v.contiguous() for k, v in snapshot.params.items()}
    tensors.update({f"buffers.{k}": v.contiguous() for k, v in snapshot.buffers.items()})
    metadata = {"step": str(snapshot.step), "format": str(FORMAT_VERSION)}
    if snapshot.optimizer is not None:
        for name, state in snapshot.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim.{name}.{key}"] = value.contiguous()
        metadata["optimizer"] = json.dumps(
            {"type": snapshot.optimizer.type, "groups": snapshot.optimizer.groups}
        )
    return st_save(tensors, metadata=metadata)


def decode_snapshot(data: bytes, where: str) -> Snapshot:
    """Parse safetensors bytes written by :func:`encode_snapshot`."""
    try:
        tensors = st_load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError, OverflowError) as e:
        raise RunDirError(f"{where}: not a readable safetensors file ({e})") from None
    try:
        step = int(metadata["step"])
    except (KeyError, ValueError):
        raise RunDirError(f"{where}: metadata lacks an integer 'step'") from None
    params, buffers, raw_state = {}, {}, {}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "params":
            params[name] = value
        elif kind == "buffers":
            buffers[name] = value
        elif kind == "optim":
            pname, _, skey = name.rpartition(".")
            raw_state.setdefault(pname, {})[skey] = value
        else:
            raise RunDirError(f"{where}: unexpected tensor {key!r}")
    optimizer = None
    if "optimizer" in metadata:
        try:
            meta = json.loads(metadata["optimizer"])
            optimizer = OptimizerRecord(type=str(meta["type"]), groups=list(meta["groups"]), state=raw_state)
        except (ValueError, KeyError, TypeError):
            raise RunDirError(f"{where}: malformed optimizer metadata") from None
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in optimizer.groups):
            raise RunDirError(f"{where}: optimizer groups must be objects with a 'params' list")
    return Snapshot(step=step, params=params, buffers=buffers, optimizer=optimizer)


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def snapshot_filename(step: int) -> str:
    return f"snapshots/step_{step:08d}.safetensors"


# ----------------------------------------------------------------------------- the run directory


class RunDir:
    """Read access to a run directory, validating everything it reads.

    >>> run = RunDir("runs/digits")       # doctest: +SKIP
    >>> run.spec.model.factory, len(run.manifest)
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
        self.manifest = self._read_manifest()

    def _read_json(self, name: str) -> Any:
        p = self.path / name
        try:
            return json.loads(p.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{p}: missing") from None
        except (OSError, UnicodeDecodeError) as e:
            raise RunDirError(f"{p}: unreadable ({e})") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def _read_manifest(self) -> list[SnapshotEntry]:
        where = str(self.path / "manifest.json")
        if not (self.path / "manifest.json").exists():
            return []
        obj = self._read_json("manifest.json")
        if not isinstance(obj, dict) or not isinstance(obj.get("snapshots"), list):
            raise RunDirError(f"{where}: expected {{'snapshots': [...]}}")
        entries = [SnapshotEntry.from_json(e, f"{where} entry {k}") for k, e in enumerate(obj["snapshots"])]
        steps = [e.step for e in entries]
        if steps != sorted(set(steps)):
            raise RunDirError(f"{where}: snapshot steps must be strictly increasing")
        return entries

    def probes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe set: inputs [P, ...] and targets [P] (int64 classes) or [P, C]."""
        p = self.path / "probes.safetensors"
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise RunDirError(f"{p}: missing") from None
        except OSError as e:
            raise RunDirError(f"{p}: unreadable ({e})") from None
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, OverflowError) as e:
            raise RunDirError(f"{p}: not a readable safetensors file ({e})") from None
        if set(tensors) != {"inputs", "targets"}:
            raise RunDirError(f"{p}: expected tensors 'inputs' and 'targets', found {sorted(tensors)}")
        inputs, targets = tensors["inputs"], tensors["targets"]
        if inputs.ndim < 1 or inputs.shape[0] == 0:
            raise RunDirError(f"{p}: the probe set is empty")
        if targets.shape[:1] != inputs.shape[:1]:
            raise RunDirError(
                f"{p}: {inputs.shape[0]} inputs but {targets.shape[0] if targets.ndim else 0} targets"
            )
        if self.spec.task == "classification":
            if targets.dtype != torch.int64 or targets.ndim != 1:
                raise RunDirError(f"{p}: classification targets must be int64 of shape [P]")
            if targets.min() < 0 or targets.max() >= self.spec.num_outputs:
                raise RunDirError(f"{p}: class labels must lie in [0, {self.spec.num_outputs})")
        elif not targets.is_floating_point():
            raise RunDirError(f"{p}: regression targets must be floating point")
        return inputs, targets

    def load_snapshot(self, entry: SnapshotEntry, verify: bool = True) -> Snapshot:
        """Read one listed snapshot, checking its size and checksum unless ``verify`` is False."""
        p = self.path / entry.file
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            raise RunDirError(f"{p}: listed in the manifest (step {entry.step}) but missing") from None
        except OSError as e:
            raise RunDirError(f"{p}: unreadable ({e})") from None
        if verify and (len(data) != entry.bytes or sha256(data) != entry.sha256):
            raise RunDirError(
                f"{p}: checksum mismatch (step {entry.step}): the file is truncated or corrupted"
            )
        snap = decode_snapshot(data, str(p))
        if snap.step != entry.step:
            raise RunDirError(f"{p}: holds step {snap.step}, the manifest says {entry.step}")
        snap.nonfinite = [
            k for k, v in snap.params.items() if v.is_floating_point() and not torch.isfinite(v).all()
        ]
        return snap

    def metrics(self) -> list[dict[str, Any]]:
        """Per-step / per-epoch metrics (``metrics.jsonl``); a torn last line is ignored."""
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        for line in p.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/Inf: store them as null."""
    return None if x is None or not math.isfinite(x) else float(x)


class RunWriter:
    """Synchronous writer of a run directory (the recorder calls it from its writer thread).

    Creates the directory, writes ``spec.json`` and ``probes.safetensors`` once, then adds
    snapshots one by one: the file first (atomic), the manifest entry after it (atomic rewrite).
    """

    def __init__(self, path: str | os.PathLike, spec: RunSpec, inputs: torch.Tensor, targets: torch.Tensor):
        self.path = Path(path)
        if (self.path / "manifest.json").exists() or (self.path / "spec.json").exists():
            raise RunDirError(f"{self.path}: already holds a run; choose a new run directory")
        (self.path / "snapshots").mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "spec.json", spec.to_json())
        probes = {
            "inputs": inputs.detach().cpu().contiguous(),
            "targets": targets.detach().cpu().contiguous(),
        }
        atomic_write_bytes(self.path / "probes.safetensors", st_save(probes))
        self.entries: list[SnapshotEntry] = []
        self._write_manifest()

    def _write_manifest(self) -> None:
        atomic_write_json(
            self.path / "manifest.json",
            {"format": FORMAT_VERSION, "snapshots": [dataclasses.asdict(e) for e in self.entries]},
        )

    def add_snapshot(
        self,
        snapshot: Snapshot,
        epoch: int = 0,
        lr: float | None = None,
        metrics: dict[str, float] | None = None,
    ) -> SnapshotEntry:
        """Write one snapshot file, then list it. Steps must increase."""
        if self.entries and snapshot.step <= self.entries[-1].step:
            raise ValueError(f"snapshot step {snapshot.step} is not after {self.entries[-1].step}")
        data = encode_snapshot(snapshot)
        rel = snapshot_filename(snapshot.step)
        atomic_write_bytes(self.path / rel, data)
        entry = SnapshotEntry(
            step=snapshot.step,
            epoch=epoch,
            file=rel,
            sha256=sha256(data),
            bytes=len(data),
            lr=finite_or_none(lr),
            metrics={k: finite_or_none(float(v)) for k, v in (metrics or {}).items()},
        )
        self.entries.append(entry)
        self._write_manifest()
        return entry

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one metrics row to ``metrics.jsonl`` (a torn line after a crash is skipped on read)."""
        clean = {k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()}
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())

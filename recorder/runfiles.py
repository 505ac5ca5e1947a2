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
reader here turns malformed input into a :class:`RunDirError` naming the file (a damaged
snapshot file into its subclass :class:`CorruptSnapshotError`), never another exception; nothing
read from a run directory is executed (JSON and safetensors only, no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from recorder.trajectory import (  # noqa: F401 - re-exported: the format's writing half
    FORMAT_VERSION,
    TrajectoryWriter,
    atomic_write_bytes,
    atomic_write_json,
    finite_or_none,
    optimizer_metadata,
    safetensors_header,
    sha256,
    snapshot_filename,
    snapshot_metadata,
)

TASKS = ("classification", "regression")
LOSSES = ("cross_entropy", "mse", "half_sse")
MAX_INT = 2**63 - 1  # steps, epochs and sizes must fit an int64
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PROBE_DTYPES = WEIGHT_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class RunDirError(Exception):
    """A run directory (or one of its files) is missing, unreadable or malformed."""


class CorruptSnapshotError(RunDirError):
    """A listed snapshot file is missing, unreadable, truncated or corrupted (its checksum, its
    safetensors encoding or its step disagree with the manifest)."""


# ----------------------------------------------------------------------------- validation helpers


def _is_int(value: Any, low: int = 0) -> bool:
    """An int (not a bool) in ``[low, MAX_INT]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_json(text: str | bytes, where: str, error: type[RunDirError] = RunDirError) -> Any:
    """``json.loads`` with every failure (syntax, nesting depth, huge integers) an ``error``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # undecodable bytes, an integer too long, nesting too deep
        raise error(f"{where}: not valid JSON ({type(e).__name__})") from None


def _load_safetensors(
    data: bytes, where: str, error: type[RunDirError] = RunDirError
) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; whatever the third-party decoder raises on malformed bytes
    (SafetensorError, or KeyError for a dtype torch lacks, ...) becomes ``error``."""
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure means unreadable
        raise error(f"{where}: not a readable safetensors file ({type(e).__name__}: {e})") from None


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
        for name in ("optimizer", "preset"):
            if not isinstance(getattr(spec, name), str | None):
                raise RunDirError(f"{where}: {name} must be a string or null")
        if spec.seed is not None and not _is_int(spec.seed, low=-MAX_INT):
            raise RunDirError(f"{where}: seed must be an integer or null")
        if not isinstance(spec.versions, dict) or not isinstance(spec.extra, dict):
            raise RunDirError(f"{where}: versions and extra must be objects")
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
        if not all(_is_int(v) for v in (entry.step, entry.epoch, entry.bytes)):
            raise RunDirError(f"{where}: step, epoch and bytes must be integers in [0, 2^63)")
        if not isinstance(entry.file, str) or not isinstance(entry.sha256, str):
            raise RunDirError(f"{where}: file and sha256 must be strings")
        try:
            os.fsencode(entry.file)
            valid = entry.file.isprintable() and Path(entry.file).parts != ()
        except UnicodeError:
            valid = False
        if not valid:
            raise RunDirError(f"{where}: snapshot file {entry.file!r} is not a valid file name")
        rel = Path(entry.file)
        if rel.is_absolute() or ".." in rel.parts:
            raise RunDirError(f"{where}: snapshot file {entry.file!r} points outside the run directory")
        if entry.lr is not None and not is_number(entry.lr):
            raise RunDirError(f"{where}: lr must be a number or null")
        if not isinstance(entry.metrics, dict) or not all(
            v is None or is_number(v) for v in entry.metrics.values()
        ):
            raise RunDirError(f"{where}: metrics must be an object of numbers")
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


SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class SnapshotLayout:
    """Where each tensor of a snapshot file lies in its payload (the bytes after the header).

    ``tensors``: file name of a tensor (``params.<name>``, ``buffers.<name>``,
    ``optim.<param>.<key>``) -> (dtype, shape, begin, end) in bytes; ``nbytes``: the payload's
    size. Tensors are packed back to back by decreasing element size, then name, so every
    ``begin`` is a multiple of its element size: a uint8 payload ``[nbytes]`` can be viewed as
    each tensor in place (:meth:`views`), which lets the recorder stage a snapshot straight into
    the bytes its writer process writes.
    """

    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> SnapshotLayout:
        order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
        placed, offset = {}, 0
        for name in order:
            t = tensors[name]
            if t.dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which snapshots cannot store")
            size = t.numel() * t.element_size()
            placed[name] = (t.dtype, tuple(t.shape), offset, offset + size)
            offset += size
        return cls(placed, offset)

    def views(self, payload: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each tensor as a view of ``payload``, a uint8 tensor [nbytes]."""
        return {
            name: payload[begin:end].view(dtype).view(shape)
            for name, (dtype, shape, begin, end) in self.tensors.items()
        }

    @cached_property
    def tensors_json(self) -> str:
        """The tensors' entries of the safetensors header: JSON object members, without braces."""
        entries = {
            name: {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
            for name, (dtype, shape, begin, end) in self.tensors.items()
        }
        return json.dumps(entries, separators=(",", ":"))[1:-1]


def snapshot_tensors(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """A snapshot's tensors under their names in the file."""
    tensors = {f"params.{k}": v for k, v in snapshot.params.items()}
    tensors.update({f"buffers.{k}": v for k, v in snapshot.buffers.items()})
    if snapshot.optimizer is not None:
        for name, state in snapshot.optimizer.state.items():
            tensors.update({f"optim.{name}.{key}": value for key, value in state.items()})
    return tensors


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """A snapshot as the bytes of a safetensors file."""
    tensors = snapshot_tensors(snapshot)
    layout = SnapshotLayout.of(tensors)
    payload = torch.empty(layout.nbytes, dtype=torch.uint8)
    for name, view in layout.views(payload).items():
        view.copy_(tensors[name])
    opt = snapshot.optimizer
    metadata = snapshot_metadata(
        snapshot.step, None if opt is None else optimizer_metadata(opt.type, opt.groups)
    )
    return safetensors_header(layout.tensors_json, metadata) + payload.numpy().tobytes()


def decode_snapshot(data: bytes, where: str) -> Snapshot:
    """Parse safetensors bytes written by :func:`encode_snapshot`; anything malformed raises
    :class:`CorruptSnapshotError`."""
    tensors = _load_safetensors(data, where, CorruptSnapshotError)
    metadata = _safetensors_metadata(data, where)
    try:
        step = int(metadata["step"])
    except (KeyError, ValueError):
        raise CorruptSnapshotError(f"{where}: metadata lacks an integer 'step'") from None
    if not _is_int(step):
        raise CorruptSnapshotError(f"{where}: step {step} is out of range")
    params, buffers, raw_state = {}, {}, {}
    for key, value in tensors.items():
        kind, _, name = key.partition(".")
        if kind == "params":
            if value.dtype not in WEIGHT_DTYPES:
                raise CorruptSnapshotError(
                    f"{where}: parameter {name!r} has dtype {value.dtype}, not a float"
                )
            params[name] = value
        elif kind == "buffers":
            buffers[name] = value
        elif kind == "optim":
            pname, _, skey = name.rpartition(".")
            raw_state.setdefault(pname, {})[skey] = value
        else:
            raise CorruptSnapshotError(f"{where}: unexpected tensor {key!r}")
    optimizer = None
    if "optimizer" in metadata:
        meta = _parse_json(metadata["optimizer"], f"{where}: optimizer metadata", CorruptSnapshotError)
        if not isinstance(meta, dict) or not isinstance(meta.get("type"), str):
            raise CorruptSnapshotError(
                f"{where}: optimizer metadata must be {{'type': str, 'groups': [...]}}"
            )
        groups = meta.get("groups")
        if not isinstance(groups, list) or not all(_is_group(g) for g in groups):
            raise CorruptSnapshotError(
                f"{where}: optimizer groups must be objects with a 'params' list of names"
            )
        optimizer = OptimizerRecord(type=meta["type"], groups=groups, state=raw_state)
    return Snapshot(step=step, params=params, buffers=buffers, optimizer=optimizer)


def _is_group(group: Any) -> bool:
    """A recorded parameter group: an object with ``params``, a list of parameter names."""
    names = group.get("params") if isinstance(group, dict) else None
    return isinstance(names, list) and all(isinstance(n, str) for n in names)


def _safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes that :func:`_load_safetensors` accepted."""
    n = int.from_bytes(data[:8], "little")
    header = _parse_json(data[8 : 8 + n], where, CorruptSnapshotError)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptSnapshotError(f"{where}: safetensors __metadata__ must map names to strings")
    return meta


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

    def _read_bytes(self, name: str, error: type[RunDirError] = RunDirError, what: str = "missing") -> bytes:
        """The bytes of ``name`` (relative to the run directory); failures raise ``error``."""
        p = self.path / name
        try:
            return p.read_bytes()
        except FileNotFoundError:
            raise error(f"{p}: {what}") from None
        except (OSError, ValueError) as e:  # ValueError: a name the OS cannot take
            raise error(f"{p}: unreadable ({e})") from None

    def _read_json(self, name: str) -> Any:
        return _parse_json(self._read_bytes(name), str(self.path / name))

    def _read_manifest(self) -> list[SnapshotEntry]:
        where = str(self.path / "manifest.json")
        if not (self.path / "manifest.json").exists():
            return []
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
        return entries

    def probes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The probe set: inputs [P, ...] and targets [P] (int64 classes) or [P, C] (floats), finite."""
        p = self.path / "probes.safetensors"
        tensors = _load_safetensors(self._read_bytes("probes.safetensors"), str(p))
        if set(tensors) != {"inputs", "targets"}:
            raise RunDirError(f"{p}: expected tensors 'inputs' and 'targets', found {sorted(tensors)[:4]}")
        inputs, targets = tensors["inputs"], tensors["targets"]
        if inputs.dtype not in PROBE_DTYPES or targets.dtype not in PROBE_DTYPES:
            raise RunDirError(f"{p}: unsupported dtype {inputs.dtype} / {targets.dtype}")
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
        elif not targets.is_floating_point() or tuple(targets.shape) != (len(inputs), self.spec.num_outputs):
            raise RunDirError(f"{p}: regression targets must be floats of shape [P, {self.spec.num_outputs}]")
        for name, t in (("inputs", inputs), ("targets", targets)):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise RunDirError(f"{p}: probe {name} contain NaN or Inf")
        return inputs, targets

    def load_snapshot(self, entry: SnapshotEntry, verify: bool = True) -> Snapshot:
        """Read one listed snapshot, checking its size and checksum unless ``verify`` is False.

        A missing, unreadable, truncated or corrupted file raises :class:`CorruptSnapshotError`.
        """
        p = self.path / entry.file
        missing = f"listed in the manifest (step {entry.step}) but missing"
        data = self._read_bytes(entry.file, CorruptSnapshotError, missing)
        if verify and (len(data) != entry.bytes or sha256(data) != entry.sha256):
            raise CorruptSnapshotError(
                f"{p}: checksum mismatch (step {entry.step}): the file is truncated or corrupted"
            )
        snap = decode_snapshot(data, str(p))
        if snap.step != entry.step:
            raise CorruptSnapshotError(f"{p}: holds step {snap.step}, the manifest says {entry.step}")
        snap.nonfinite = [k for k, v in snap.params.items() if not torch.isfinite(v).all()]
        return snap

    def metrics(self) -> list[dict[str, Any]]:
        """Per-step / per-epoch metrics (``metrics.jsonl``); torn or malformed lines are ignored."""
        if not (self.path / "metrics.jsonl").exists():
            return []
        rows = []
        for line in self._read_bytes("metrics.jsonl").decode(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


def create_run_dir(
    path: str | os.PathLike, spec: RunSpec, inputs: torch.Tensor, targets: torch.Tensor
) -> None:
    """Create a run directory: ``spec.json``, ``probes.safetensors`` (inputs [P, ...], targets [P]
    or [P, C]) and an empty manifest. Refuses a directory that already holds a run."""
    path = Path(path)
    if (path / "manifest.json").exists() or (path / "spec.json").exists():
        raise RunDirError(f"{path}: already holds a run; choose a new run directory")
    (path / "snapshots").mkdir(parents=True, exist_ok=True)
    atomic_write_json(path / "spec.json", spec.to_json())
    probes = {"inputs": inputs.detach().cpu().contiguous(), "targets": targets.detach().cpu().contiguous()}
    atomic_write_bytes(path / "probes.safetensors", st_save(probes))
    TrajectoryWriter(path).write_manifest()


class RunWriter:
    """A synchronous writer of a whole run directory from :class:`Snapshot` records (the recorder
    creates the directory the same way and writes its snapshots from :mod:`recorder.writer`)."""

    def __init__(self, path: str | os.PathLike, spec: RunSpec, inputs: torch.Tensor, targets: torch.Tensor):
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

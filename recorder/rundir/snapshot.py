"""Snapshot files and their manifest entries: the weights, buffers and optimizer state at one step.

A snapshot file is a safetensors file with tensors ``params.<name>``, ``buffers.<name>`` and
``optim.<param name>.<state key>``, and metadata ``step`` and ``optimizer`` (JSON: its type and
per-group hyperparameters). Decoding validates everything and raises
:class:`~recorder.rundir.errors.CorruptSnapshotError` for anything malformed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load

from recorder.rundir.errors import CorruptSnapshotError, RunDirError
from recorder.rundir.files import is_int, is_number, parse_json
from recorder.rundir.trajectory import optimizer_metadata, safetensors_header, snapshot_metadata

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit on a header


def load_safetensors(
    data: bytes, where: str, error: type[RunDirError] = RunDirError
) -> dict[str, torch.Tensor]:
    """Decode safetensors bytes; whatever the third-party decoder raises on malformed bytes
    (SafetensorError, or KeyError for a dtype torch lacks, ...) becomes ``error``."""
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any failure means unreadable
        raise error(f"{where}: not a readable safetensors file ({type(e).__name__}: {e})") from None


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
        if not all(is_int(v) for v in (entry.step, entry.epoch, entry.bytes)):
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
    tensors = load_safetensors(data, where, CorruptSnapshotError)
    metadata = _safetensors_metadata(data, where)
    try:
        step = int(metadata["step"])
    except (KeyError, ValueError):
        raise CorruptSnapshotError(f"{where}: metadata lacks an integer 'step'") from None
    if not is_int(step):
        raise CorruptSnapshotError(f"{where}: step {step} is out of range")
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    raw_state: dict[str, dict[str, torch.Tensor]] = {}
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
        meta = parse_json(metadata["optimizer"], f"{where}: optimizer metadata", CorruptSnapshotError)
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


def weight_skeleton(read_prefix: Callable[[int], bytes], where: str) -> dict[str, torch.Tensor]:
    """The parameters ``params.<name>`` of a snapshot file as tensors on the ``meta`` device, from
    its safetensors header alone; ``read_prefix(n)``: the file's first ``n`` bytes. Anything
    malformed raises :class:`CorruptSnapshotError`."""
    n = int.from_bytes(read_prefix(8), "little")
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise CorruptSnapshotError(f"{where}: not a readable safetensors file (header of {n} bytes)")
    header = parse_json(read_prefix(8 + n)[8:], where, CorruptSnapshotError)
    if not isinstance(header, dict):
        raise CorruptSnapshotError(f"{where}: not a readable safetensors file (header is not an object)")
    dtypes = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    skeleton = {}
    for key, info in header.items():
        kind, _, name = key.partition(".")
        if kind != "params":
            continue
        shape = info.get("shape") if isinstance(info, dict) else None
        dtype = dtypes.get(str(info.get("dtype"))) if isinstance(info, dict) else None
        try:
            if dtype not in WEIGHT_DTYPES or not isinstance(shape, list) or not all(is_int(d) for d in shape):
                raise ValueError
            skeleton[name] = torch.empty(shape, dtype=dtype, device="meta")
        except (ValueError, RuntimeError):  # RuntimeError: a shape whose size overflows
            raise CorruptSnapshotError(
                f"{where}: parameter {name!r} has no float dtype and valid shape in the header"
            ) from None
    return skeleton


def _is_group(group: Any) -> bool:
    """A recorded parameter group: an object with ``params``, a list of parameter names."""
    names = group.get("params") if isinstance(group, dict) else None
    return isinstance(names, list) and all(isinstance(n, str) for n in names)


def _safetensors_metadata(data: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes that :func:`_load_safetensors` accepted."""
    n = int.from_bytes(data[:8], "little")
    header = parse_json(data[8 : 8 + n], where, CorruptSnapshotError)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptSnapshotError(f"{where}: safetensors __metadata__ must map names to strings")
    return meta

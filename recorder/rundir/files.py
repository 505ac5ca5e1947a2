"""Crash-safe writes, checksums and JSON, with nothing but the standard library.

Every file of a run directory (and every file the project writes beside it) goes through
:func:`atomic_write_bytes`: a temporary file in the same folder, then a rename, so a reader sees
the old file or the new one, never a torn one. Every JSON text read from a run directory goes
through :func:`parse_json`, every value written as JSON through :func:`to_json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from recorder.rundir.errors import RunDirError

Buffer = bytes | bytearray | memoryview
MAX_INT = 2**63 - 1  # steps, epochs and sizes must fit an int64


def atomic_write_bytes(path: str | os.PathLike, *chunks: Buffer, durable: bool = True) -> None:
    """Write the concatenation of ``chunks`` to ``path`` via a temporary file and a rename, so
    ``path`` is either absent or complete; ``durable``: fsync the file before the rename and the
    directory after it, so it is also on disk (else see :func:`fsync_path`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def sha256(*chunks: Buffer) -> str:
    """Hex SHA-256 of the concatenation of ``chunks`` (hashlib releases the GIL on large ones)."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def finite_or_none(x: float | None) -> float | None:
    """JSON has no NaN/Inf: store them as null."""
    return None if x is None or not math.isfinite(x) else float(x)



def to_json(value: Any) -> Any:
    """``value`` as JSON can hold it: tuples to lists, non-finite floats to null, tensors and numpy
    scalars or arrays to numbers or lists (a tensor of one element to its number), other objects to their
    ``repr``; recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, float):
        return finite_or_none(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    numel = getattr(value, "numel", None)  # a torch tensor of one element: its number
    if callable(numel) and numel() == 1:
        return to_json(value.item())
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return to_json(value.tolist())
    return repr(value)


def is_int(value: Any, low: int = 0) -> bool:
    """An int (not a bool) in ``[low, MAX_INT]``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= MAX_INT


def is_number(value: Any) -> bool:
    """A JSON number (int or float, not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_json(text: str | bytes, where: str, error: type[RunDirError] = RunDirError) -> Any:
    """``json.loads`` with every failure (syntax, nesting depth, huge integers) an ``error``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # undecodable bytes, an integer too long, nesting too deep
        raise error(f"{where}: not valid JSON ({type(e).__name__})") from None

"""Crash-safe writes, bounded reads, checksums and JSON, with nothing but the standard library.

Every file of a run directory (and every file the project writes beside it) goes through
:func:`atomic_write_bytes`: a new temporary file in the same folder, then a rename, so a reader
sees the old file or the new one, never a torn one, and a symbolic link planted at the file's
name is replaced, never followed. Every other open goes through :func:`open_regular` (no
symbolic links, regular files only), every read of a run directory's file through
:func:`read_file` (its size checked before reading), every JSON text read through
:func:`parse_json`, every value written as JSON through :func:`to_json`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from recorder.rundir.errors import RunDirError

Buffer = bytes | bytearray | memoryview
MAX_INT = 2**63 - 1  # steps, epochs and sizes must fit an int64
MAX_JSON_BYTES = 64 << 20  # spec.json, manifest.json, group.json: read only up to this size
MAX_JSON_DEPTH = 100  # deeper JSON is refused: code that walks it recursively would overflow


def temp_sibling(path: Path) -> Path:
    """A fresh name beside ``path`` for a temporary file or folder: ``.<name>.<random>.tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")


def atomic_write_bytes(path: str | os.PathLike, *chunks: Buffer, durable: bool = True) -> None:
    """Write the concatenation of ``chunks`` to ``path`` via a temporary file and a rename, so
    ``path`` is either absent or complete; ``durable``: fsync the file before the rename and the
    directory after it, so it is also on disk (else see :func:`fsync_path`).

    The temporary file is new (``O_EXCL``: never an existing file or link) and created with mode
    ``0o666`` less the umask, as any new file; the rename replaces whatever ``path`` is, a
    symbolic link included, without following it.
    """
    path = Path(path)
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def make_folder(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and its parents) unless it exists; raise :class:`RunDirError`
    when ``path`` is a symbolic link, so that files written into it stay where they are meant to."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise RunDirError(f"{path}: is a symbolic link; refusing to write through it")
    return path


def open_regular(
    path: str | os.PathLike,
    flags: int = os.O_RDONLY,
    mode: int = 0o666,
    error: type[RunDirError] = RunDirError,
) -> int:
    """``os.open(path, flags, mode)`` for a regular file only: never through a symbolic link
    (``O_NOFOLLOW``), never blocking on a FIFO (``O_NONBLOCK``); a link, FIFO, device, socket or
    folder raises ``error`` naming ``path``, other failures ``OSError``. Returns the descriptor."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise error(f"{path}: is a symbolic link; refusing to follow it") from None
        if e.errno == errno.ENXIO:  # a FIFO without a reader, or a socket
            raise error(f"{path}: not a regular file") from None
        raise
    kind = stat.S_IFMT(os.fstat(fd).st_mode)
    if kind != stat.S_IFREG:
        os.close(fd)
        raise error(f"{path}: not a regular file ({_KINDS.get(kind, 'special file')})")
    return fd


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def read_file(
    path: str | os.PathLike,
    limit: int,
    error: type[RunDirError] = RunDirError,
    missing: str = "missing",
    allowed: str = "allowed",
    length: int | None = None,
) -> bytes:
    """The bytes of the regular file ``path`` (its first ``length`` bytes, if given), after
    checking its size against ``limit`` (bytes; ``allowed`` says whose limit in the message).

    Every failure raises ``error`` naming ``path``: missing (message ``missing``), a symbolic
    link or not a regular file (:func:`open_regular`), larger than ``limit``, unreadable.
    """
    try:
        fd = open_regular(path, error=error)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, ValueError) as e:  # ValueError: a name the OS cannot take
        raise error(f"{path}: unreadable ({e})") from None
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > limit:
            raise error(f"{path}: {size} bytes, more than the {limit} bytes {allowed}")
        try:
            return f.read(size if length is None else min(length, size))
        except OSError as e:
            raise error(f"{path}: unreadable ({e})") from None


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory by its path."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write_bytes` of ``obj`` as indented JSON with sorted keys."""
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
    """``json.loads`` with every failure an ``error`` of one line that says where: syntax (line and
    column), nesting deeper than ``MAX_JSON_DEPTH`` and integers longer than
    ``MAX_JSON_INT_DIGITS`` digits (the key holding them, e.g. ``runs[0].seed``)."""
    scanned = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    deep = _too_deep(scanned)
    if deep is not None:  # checked before parsing: deeper nesting would exhaust the parser's stack
        raise error(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep, at {_shown(deep)}")
    huge: list[int] = []  # the digit counts of integers too long to convert
    try:
        value = json.loads(text, parse_int=lambda digits: _int(digits, huge))
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # undecodable bytes
        raise error(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
    if huge:
        path = _path_to(value, lambda node: isinstance(node, _HugeInt))
        raise error(
            f"{where}: {_shown(path or [])} is an integer of {huge[0]} digits, more than the "
            f"{MAX_JSON_INT_DIGITS} a number here may have"
        )
    return value


MAX_JSON_INT_DIGITS = 4300  # Python's own limit on converting a decimal string to an int


class _HugeInt:
    """What :func:`parse_json` parses an integer of more than ``MAX_JSON_INT_DIGITS`` digits as."""


def _int(digits: str, huge: list[int]) -> int | _HugeInt:
    """The JSON integer ``digits``; a :class:`_HugeInt` (its digit count appended to ``huge``) where
    it is too long to convert."""
    if len(digits.lstrip("-")) <= MAX_JSON_INT_DIGITS:
        return int(digits)
    huge.append(len(digits.lstrip("-")))
    return _HugeInt()


_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]')  # strings and structural characters


def _too_deep(text: str) -> list[str | int] | None:
    """The path (keys and indices) of the first list or object in the JSON ``text`` nested more
    than ``MAX_JSON_DEPTH`` deep (the outermost value is at depth 1), or None; without parsing (a
    scan of its strings and brackets)."""
    stack: list[list[Any]] = []  # per open container: [its current key or index]
    last = None  # the last string, a key when a ':' follows
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in "{[":
            if len(stack) == MAX_JSON_DEPTH:
                return [entry[0] for entry in stack]
            stack.append([None if token == "{" else 0])
        elif token in "}]":
            if stack:
                stack.pop()
        elif token == ",":
            if stack and isinstance(stack[-1][0], int):
                stack[-1][0] += 1
        elif token == ":":
            if stack:
                stack[-1][0] = last
        else:
            last = token[1:-1]
    return None


def _path_to(value: Any, found: Any) -> list[str | int] | None:
    """The path (keys and indices) of the first node of the parsed JSON ``value`` for which
    ``found(node)`` holds, or None; without recursion."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if found(node):
            return path
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack.extend((child, [*path, key]) for key, child in reversed(list(children)))
    return None


def _shown(path: list[str | int], most: int = 8) -> str:
    """A JSON path as ``runs[0].seed`` (its first ``most`` steps, then ``...``); ``the top level``
    when empty."""
    if not path:
        return "the top level"
    text = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path[:most]).lstrip(".")
    return text + ("..." if len(path) > most else "")

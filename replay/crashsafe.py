"""The file-level safety of a replay store ``RUN_DIR/<name>.zarr`` (:mod:`replay.store`): one
writer at a time, durable flushes, removal of what killed writers left behind, damaged chunks.

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
  done, so that snapshot is recomputed and its chunks rewritten; so does a done snapshot whose
  chunk of another array cannot be decoded, or whose measure chunk is missing (every chunk of a
  snapshot is written, even one of fill values only), checked by :func:`damaged_rows` when a
  store is resumed.

One writer at a time: :func:`exclusive_writer` holds an OS lock on ``RUN_DIR/<name>.zarr.lock``.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zarr

from recorder.rundir.errors import ReplayError, RunDirError
from recorder.rundir.files import open_regular

_ORPHAN = re.compile(r"\.[0-9a-f]{32}\.partial$")  # zarr's temporary file of an interrupted write
_syncfs: Callable[[int], int] | None
try:
    _syncfs = ctypes.CDLL(None, use_errno=True).syncfs  # Linux
except (OSError, AttributeError, TypeError):
    _syncfs = None


@contextmanager
def exclusive_writer(path: Path) -> Iterator[None]:
    """Hold the write lock of the store ``path``: an OS lock (``flock``) on ``<path>.lock``,
    which the kernel releases when this process ends, however it ends.

    Raises :class:`ReplayError` while another process holds it, and
    :class:`~recorder.rundir.errors.RunDirError` when the lock file cannot be created (the run
    directory is read-only) or is not a regular file (a symbolic link is never followed).
    """
    lock = path.with_name(path.name + ".lock")
    try:
        fd = open_regular(lock, os.O_RDWR | os.O_CREAT, 0o644)
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


def flush_to_disk(path: Path) -> None:
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


def remove_orphans(path: Path) -> None:
    """Delete what killed writers of ``path`` left: temporary stores beside it and zarr's
    ``*.partial`` files inside it (only the lock holder may call this)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    if path.is_dir():
        for partial in path.rglob("*.partial"):
            if _ORPHAN.search(partial.name):
                partial.unlink(missing_ok=True)


def read_chunkwise(array: zarr.Array) -> tuple[np.ndarray, np.ndarray]:
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


def damaged_rows(
    array: zarr.Array, rows: np.ndarray, root: Path | None, block_bytes: int = 64 << 20
) -> set[int]:
    """The rows ``rows`` (indices into the first axis of ``array`` ``[S, ...]``, one row per chunk)
    whose chunk cannot be decoded, or, with ``root`` (the store's folder), is missing. Reads the
    rows in blocks of about ``block_bytes``, a block that fails row by row."""
    damaged: set[int] = set()
    if root is not None:
        folder = root / array.path
        zeros = (0,) * (array.ndim - 1)
        damaged = {
            int(s) for s in rows if not (folder / array.metadata.encode_chunk_key((int(s), *zeros))).is_file()
        }
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * array.dtype.itemsize)
    per_block = max(1, block_bytes // row_bytes)
    for start in range(0, len(rows), per_block):
        block = rows[start : start + per_block]
        try:
            array.oindex[block]
        except Exception:  # noqa: BLE001 - damaged bytes raise whatever the codec raises
            for s in block:
                try:
                    array[int(s)]
                except Exception:  # noqa: BLE001
                    damaged.add(int(s))
    return damaged

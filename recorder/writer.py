"""The recorder's writer process: it writes staged snapshots to the run directory, so that the
training process spends, per snapshot, only the copies into shared memory.

The training process holds a :class:`WriterProcess`: ``slots`` shared-memory buffers (a memfd on
Linux, an unlinked temporary file elsewhere) whose file descriptors a child Python process
inherits. For each snapshot the training process copies the tensors into a free slot and sends
one JSON line on the child's stdin (the slot, the payload's size, the step, the numbers of the
layout's header entries and of the optimizer's metadata, with their texts the first time, the
manifest fields and the metrics rows logged since the last line); the child (:func:`serve`,
``python -m recorder.writer``) writes the file and its manifest entry with
:mod:`recorder.rundir.trajectory` and answers one JSON line on its stdout, which frees the slot.

The child imports only the standard library, so it starts in milliseconds, and it has its own
interpreter lock: the training thread never waits for it (a writer thread in the training process
cost a small CPU model 60% to 120% of its step time, in lock hand-overs). The training process
ends with an ``{"end": true}`` line, not by closing the pipe alone: a process forked from it after
the child started (a ``DataLoader`` worker, say) holds a copy of the pipe's writing end, and the
child would wait for its end of file as long as that process lives. When the training process
dies, the child reads the end of its stdin (once its forks are gone too), writes every snapshot it
was sent and exits.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recorder.rundir.errors import WriterError
from recorder.rundir.trajectory import TrajectoryWriter, safetensors_header, snapshot_metadata

_FULL = {  # errors of a write that found no room, as messages say them
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached",
}
MAX_SLOTS = 8  # shared-memory slots, so snapshots in flight at most
MIN_SLOTS = 2
SLOT_MEMORY = 64 << 20  # the slots' memory when the number of slots is not given (bytes)
ROWS_PER_MESSAGE = 256  # metrics rows are sent with the next snapshot, or once this many wait
COMMIT_SECONDS = 1.0  # how often written snapshots are made durable and listed


class SharedBuffer:
    """A shared-memory file of at least ``capacity`` bytes, grown on demand; its descriptor is
    inherited by the writer process."""

    def __init__(self) -> None:
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("recorder-slot")
        else:
            self.fd = os.dup(tempfile.TemporaryFile().fileno())
        self.capacity = 0
        self.map: mmap.mmap | None = None

    def ensure(self, nbytes: int) -> bool:
        """Make room for ``nbytes``; True when the buffer was remapped (earlier views are stale)."""
        if nbytes <= self.capacity and self.map is not None:
            return False
        self.capacity = max(nbytes, mmap.PAGESIZE, int(self.capacity * 1.25))
        os.ftruncate(self.fd, self.capacity)
        self.map = mmap.mmap(self.fd, self.capacity)
        return True


class WriterProcess:
    """The training process's side: slots to stage into, messages to the child, its answers.

    Errors of the child are raised, as :class:`OSError` (with the child's errno) or
    :class:`WriterError`, by the next :meth:`poll`, :meth:`acquire` or :meth:`close`.
    """

    def __init__(self, run_dir: str | os.PathLike, slots: int | None = None):
        self.buffers = [SharedBuffer() for _ in range(slots or MAX_SLOTS)]
        self._fixed = slots is not None
        self._free = list(range(len(self.buffers)))
        self._rows: list[dict[str, Any]] = []
        self._answers = b""
        self._error: BaseException | None = None
        self._texts: dict[str, int] = {}  # long texts sent to the child once, by their number
        fds = [b.fd for b in self.buffers]
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "recorder.writer", str(run_dir), *map(str, fds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=fds,
            env=env,
        )
        assert self.process.stdin is not None and self.process.stdout is not None  # both PIPE
        self._stdin: IO[bytes] = self.process.stdin
        self._stdout: IO[bytes] = self.process.stdout
        os.set_blocking(self._stdout.fileno(), False)

    @property
    def in_flight(self) -> int:
        """Slots acquired and not yet answered for."""
        return len(self.buffers) - len(self._free)

    def usable(self, nbytes: int) -> int:
        """How many slots snapshots of ``nbytes`` may use: all when their number was given, else
        as many as :data:`SLOT_MEMORY` holds, at least :data:`MIN_SLOTS`."""
        if self._fixed:
            return len(self.buffers)
        return max(MIN_SLOTS, min(len(self.buffers), SLOT_MEMORY // max(nbytes, 1)))

    def full(self, nbytes: int) -> bool:
        """Whether :meth:`acquire` of ``nbytes`` would wait for the child."""
        return min(self._free, default=len(self.buffers)) >= self.usable(nbytes)

    def acquire(self, nbytes: int) -> tuple[int, bool]:
        """A free slot with room for ``nbytes`` (waiting for the child while every usable slot is
        in flight) and whether it was remapped."""
        while self.full(nbytes):
            self._read_answers(wait=True)
        self._raise_error()
        slot = min(self._free)
        self._free.remove(slot)
        return slot, self.buffers[slot].ensure(nbytes)

    def release(self, slot: int) -> None:
        """Give back a slot that was acquired but will not be sent."""
        self._free.append(slot)

    def send_snapshots(self, snapshots: list[dict[str, Any]]) -> None:
        """Have the child write each snapshot, in one message each, with one write for all.

        A snapshot: ``slot`` and ``nbytes`` (the slot's first bytes are its tensors), ``step``,
        ``tensors_json`` (see :func:`recorder.rundir.trajectory.safetensors_header`), ``optimizer`` (see
        :func:`recorder.rundir.trajectory.snapshot_metadata`) and the manifest's ``epoch``, ``lr`` and
        ``metrics``. Both texts go to the child once each, then by number.
        """
        messages = []
        for snapshot in snapshots:
            texts: dict[int, str] = {}
            message = {k: v for k, v in snapshot.items() if k not in ("tensors_json", "optimizer")}
            message["tensors"] = self._number(snapshot["tensors_json"], texts)
            message["optimizer"] = (
                None if snapshot["optimizer"] is None else self._number(snapshot["optimizer"], texts)
            )
            messages.append({**message, "texts": texts, "rows": []})
        self._send(messages)

    def _number(self, text: str, new: dict[int, str]) -> int:
        """The number of ``text`` as the child knows it; unknown texts are added to ``new``."""
        number = self._texts.get(text)
        if number is None:
            number = self._texts[text] = len(self._texts)
            new[number] = text
        return number

    def log(self, row: dict[str, Any]) -> None:
        """Queue a metrics row; rows are sent with the next snapshots or in batches."""
        self._rows.append(row)
        if len(self._rows) >= ROWS_PER_MESSAGE:
            self.flush_rows()

    def flush_rows(self) -> None:
        if self._rows:
            self._send([])

    def poll(self) -> None:
        """Take the child's answers so far (freeing slots); raise its error if it had one."""
        self._read_answers(wait=False)
        self._raise_error()

    def close(self, raise_error: bool = True, complete: bool = False) -> None:
        """Send the remaining rows and the end, let the child finish every snapshot it was sent,
        wait for it. ``complete``: training finished (the last snapshot was sent), so the child
        marks the recording complete in the manifest once everything is listed."""
        try:
            if self.process.poll() is None:
                self._send([{"end": True, "complete": complete}])
        except WriterError:
            pass
        finally:
            try:
                self._stdin.close()
            except OSError:
                pass
            while self._read_answers(wait=True):
                pass
            self.process.wait()
            for buffer in self.buffers:
                os.close(buffer.fd)
        if raise_error:
            self._raise_error()

    def _send(self, messages: list[dict[str, Any]]) -> None:
        """Write ``messages`` to the child, after a message of the rows logged so far, if any."""
        if self._rows:
            messages = [{"rows": self._rows}, *messages]
            self._rows = []
        data = memoryview(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
        try:
            while data:
                data = data[os.write(self._stdin.fileno(), data) :]
        except (BrokenPipeError, ValueError):
            self._read_answers(wait=False)
            self._raise_error()
            raise self._gone() from None

    def _gone(self) -> WriterError:
        code = self.process.wait()
        return WriterError(f"the recorder's writer process exited unexpectedly (exit code {code})")

    def _read_answers(self, wait: bool) -> bool:
        """Read what the child has answered (``wait``: block until something or its exit);
        False once its stdout is closed."""
        fd = self._stdout.fileno()
        if wait:
            select.select([fd], [], [])
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not data:
            if self.in_flight and self._error is None:
                self._error = self._gone()
            self._free = list(range(len(self.buffers)))
            return False
        *lines, self._answers = (self._answers + data).split(b"\n")
        for line in lines:
            answer = json.loads(line)
            if answer["slot"] is not None:
                self._free.append(answer["slot"])
            if "error" in answer and self._error is None:
                errno = answer["errno"]
                self._error = OSError(errno, answer["error"]) if errno else WriterError(answer["error"])
        return True

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


# ----------------------------------------------------------------------------- the child


class _Child:
    """The writer process: the run's trajectory, the mapped slots, the first failure, and a
    thread that commits what was written every :data:`COMMIT_SECONDS`."""

    def __init__(self, run_dir: str, fds: list[int]):
        self.trajectory = TrajectoryWriter(run_dir, complete=False)
        self.fds = fds
        self.maps: dict[int, mmap.mmap] = {}
        self.texts: dict[int, str] = {}  # header entries and optimizer metadata, by number
        self.error: dict[str, Any] = {}  # the first failure, repeated in every later answer
        self.lock = threading.Lock()  # the trajectory's state, the error, stdout
        self.committing = threading.Lock()  # one commit at a time
        self.stopping = threading.Event()
        self.committer = threading.Thread(target=self._commit_every, name="commit")

    def serve(self) -> None:
        self.committer.start()
        complete = False
        try:
            for line in sys.stdin.buffer:
                message = json.loads(line)
                if message.get("end"):
                    complete = bool(message.get("complete"))
                    break
                self.handle(message)
        finally:
            self.stopping.set()
            self.committer.join()
            self.commit()
            if complete and not self.error:
                self._attempt(None, "the manifest", self.trajectory.finish)
            with self.lock:
                if self.error:
                    self._answer(None)  # a late failure (the last commit) reaches the training process

    def handle(self, message: dict[str, Any]) -> None:
        """Write a message's rows and snapshot (listed by a later commit); answer it."""
        slot = message.get("slot")
        step = message["step"] if slot is not None else None
        where = f"the snapshot of step {step}" if slot is not None else "metrics rows"

        def write() -> None:
            self.trajectory.log_metrics(*message["rows"])
            if slot is not None:
                nbytes = message["nbytes"]
                if slot not in self.maps or len(self.maps[slot]) < nbytes:
                    self.maps[slot] = mmap.mmap(self.fds[slot], os.fstat(self.fds[slot]).st_size)
                self.texts.update((int(k), v) for k, v in message["texts"].items())
                optimizer = message["optimizer"]
                metadata = snapshot_metadata(
                    message["step"], None if optimizer is None else self.texts[optimizer]
                )
                header = safetensors_header(self.texts[message["tensors"]], metadata)
                with memoryview(self.maps[slot]) as payload:
                    self.trajectory.add_snapshot(
                        message["step"],
                        [header, payload[:nbytes]],
                        epoch=message["epoch"],
                        lr=message["lr"],
                        metrics=message["metrics"],
                    )

        self._attempt(step, where, write)
        with self.lock:
            self._answer(slot)

    def commit(self) -> None:
        """Make what was written durable and list it (the disk's wait outside the lock); a
        failure is answered at once. Also after a failed write: what was written before it is
        complete."""
        with self.committing:
            with self.lock:
                taken = self.trajectory.take_uncommitted()
            try:
                self.trajectory.commit(taken)
            except Exception as e:  # noqa: BLE001 - reported to the training process
                with self.lock:
                    if not self.error:
                        self.error = self._report(None, "the manifest", e)
                        self._answer(None)

    def _commit_every(self) -> None:
        while not self.stopping.wait(COMMIT_SECONDS):
            self.commit()

    def _answer(self, slot: int | None) -> None:
        """Tell the training process; once it is gone, go on writing what it sent."""
        try:
            os.write(sys.stdout.fileno(), json.dumps({"slot": slot, **self.error}).encode() + b"\n")
        except BrokenPipeError:
            pass

    def _attempt(self, step: int | None, where: str, work: Callable[[], None]) -> None:
        """Do ``work`` unless something failed before. On its failure, the first, list what was
        written before it (:meth:`commit`), then keep the failure: nothing more is written."""
        with self.lock:
            if self.error:
                return
            try:
                work()
                return
            except Exception as e:  # noqa: BLE001 - reported to the training process
                failure = e
        self.commit()
        with self.lock:
            self.error = self.error or self._report(step, where, failure)

    def _report(self, step: int | None, where: str, error: Exception) -> dict[str, Any]:
        """A failure as an answer's fields: ``error``, one line saying what failed and how many
        snapshots the manifest lists, and ``errno``."""
        code = getattr(error, "errno", None)
        listed = self.trajectory.listed
        outcome = (
            f"{listed} snapshot{'s are' if listed != 1 else ' is'} complete and listed; the run replays"
            if listed
            else "no snapshot is listed"
        )
        if code in _FULL:
            what = f"snapshot step {step}" if step is not None else where
            message = f"{_FULL[code]} while writing {what} into {self.trajectory.path}: {outcome}"
        else:
            message = f"writing {where}: {type(error).__name__}: {error}; {outcome}"
        return {"error": message, "errno": code}


def serve(run_dir: str, fds: list[int]) -> None:
    """Write what the training process sends (see the module docstring) until its end line, or
    the end of its stdin.

    Every message gets an answer (``{"slot": ..}``, with ``error`` and ``errno`` once a write
    has failed; a failed commit is answered with ``slot`` null). Written snapshots are committed
    (made durable, then listed) every :data:`COMMIT_SECONDS`, and at the end. After a failure
    (a full disk, say) the snapshots written before it are committed, then nothing more is
    written: the manifest stays a prefix of the run, and the error says how many it lists. The
    manifest says ``"complete": false`` until an end line with ``"complete": true`` (the
    recorder's ``close()``), after which, with nothing failed, it says true.
    """
    _Child(run_dir, fds).serve()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the training process; we finish
    os.nice(10)  # yield the CPU to training; an idle core, or the slots running out, lets us run
    serve(sys.argv[1], [int(fd) for fd in sys.argv[2:]])

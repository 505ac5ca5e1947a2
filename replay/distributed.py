"""The ranks of a distributed replay: ``torchrun [--nnodes M] --nproc-per-node N cli.py replay``.

torchrun starts one process per rank and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in each. :func:`join` reads them and initializes
``torch.distributed``: gloo for a CPU replay, NCCL for a GPU one, where a plain ``cuda`` device
becomes ``cuda:<LOCAL_RANK mod n>`` of the ``n`` GPUs the process sees: GPU ``LOCAL_RANK`` where
every process sees the node's GPUs, its own where each sees one (a per-task
``CUDA_VISIBLE_DEVICES``, as under SLURM). An explicit ordinal is kept, with a warning when the
ranks of a node then likely share one GPU. Without them it gives one rank, no process group, and
every collective below does nothing.

The ranks never exchange results: each computes whole snapshots and writes them itself. They
only meet at a few points to agree that every rank got there (:meth:`Ranks.agree`, which also
carries a failing rank's message to the others, so no rank waits forever for a dead peer), and
reduce a few numbers: the manifest's length and the memory budget (the smallest of the ranks', so
that every rank plans the same blocks), and the summary's. No collective pickles (the
``*_object`` ones are not used).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from recorder.rundir.errors import ReplayError, ReplayWarning

# A rank that finishes its share early waits at the final barrier for the slowest, however long
# their snapshots take; a rank that dies is detected by torchrun, which then stops the others.
TIMEOUT = timedelta(hours=24)
MESSAGE_BYTES = 1024  # of a failing rank's error message, sent to the others

T = TypeVar("T")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world_size`` (``local_rank`` on its node).

    ``device``: where collective tensors live (the replay device for NCCL, the CPU for gloo);
    None for a single process without a process group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that prepares the store and prints the summary."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th, starting at ``rank``."""
        return list(items[self.rank :: self.world_size])

    def agree(self, error: Exception | None = None) -> None:
        """Barrier that shares failures: raise on every rank when any rank failed (``error`` is
        this rank's failure, or None). The failing rank raises its own error, the others a
        :class:`ReplayError` naming the first failing rank and its message."""
        failed: list[tuple[int, str]] = []
        if self.device is not None:
            text = "" if error is None else str(error) or type(error).__name__
            data = text.encode()[:MESSAGE_BYTES]
            mine = torch.zeros(MESSAGE_BYTES + 1, dtype=torch.uint8)
            mine[0] = error is not None
            mine[1 : 1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
            everyone = [torch.empty_like(mine, device=self.device) for _ in range(self.world_size)]
            dist.all_gather(everyone, mine.to(self.device))
            for r, t in enumerate(everyone):
                t = t.cpu()
                if t[0]:
                    failed.append((r, bytes(t[1:].tolist()).rstrip(b"\0").decode(errors="replace")))
        if error is not None:
            raise error
        if failed:
            r, message = failed[0]
            raise ReplayError(f"stopped: rank {r} failed: {message}")

    def reduce(self, values: Sequence[float], op: str) -> list[float]:
        """``values`` combined over the ranks elementwise: ``op`` is "sum", "max" or "min"."""
        if self.device is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=_OPS[op])
        return t.tolist()

    def place(self, device: str) -> str:
        """The device this rank replays on: a plain ``cuda`` becomes the rank's GPU in a
        distributed job (:func:`_rank_device`); anything else is kept."""
        return _rank_device(device, self.local_rank) if self.device is not None else device


def _rank_device(device: str, local_rank: int) -> str:
    """A plain ``cuda`` names GPU ``local_rank mod n`` of the ``n`` this process sees
    (``cuda:<local_rank>`` where it sees none: the error comes where it is used); other devices
    stay as given."""
    if device != "cuda":
        return device
    count = torch.cuda.device_count()
    return f"cuda:{local_rank % count if count else local_rank}"


def _warn_if_shared(device: str, target: torch.device) -> None:
    """Warn when an explicit ordinal ``device`` puts the ranks of this node (``LOCAL_WORLD_SIZE``)
    on one GPU: each sees several, so likely the same ones, and takes the same of them."""
    local_ranks, count = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if target.type == "cuda" and device != "cuda" and local_ranks > 1 and count > 1:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        warnings.warn(
            f"--device {device}: each of the {local_ranks} ranks on this node replays on {target} of "
            f"the {count} GPUs it sees (CUDA_VISIBLE_DEVICES={visible or 'unset: all of the node'}), "
            "so unless each rank sees other GPUs they share one, which NCCL refuses; --device cuda "
            f"gives each rank GPU LOCAL_RANK mod {count}",
            ReplayWarning,
            stacklevel=3,
        )


@contextmanager
def join(device: str) -> Iterator[Ranks]:
    """The ranks of this process's torchrun job for a replay on ``device`` (one rank outside
    torchrun). Initializes the process group unless one exists, and destroys what it initialized.

    Raises :class:`ReplayError` when the torchrun environment is malformed or the process group
    cannot be set up.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        yield Ranks()
        return
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        target = torch.device(_rank_device(device, local_rank))
        _warn_if_shared(device, target)
    except (ValueError, RuntimeError) as e:
        raise ReplayError(f"torchrun environment or device {device!r} is not usable ({e})") from None
    on_gpu = target.type == "cuda"
    created = not dist.is_initialized()
    if created:
        try:
            if on_gpu:
                torch.cuda.set_device(target)
            dist.init_process_group(
                "nccl" if on_gpu else "gloo", timeout=TIMEOUT, device_id=target if on_gpu else None
            )
        except (ValueError, RuntimeError, AssertionError) as e:
            raise ReplayError(f"cannot join the torchrun job on {target} ({e})") from None
    try:
        yield Ranks(
            dist.get_rank(), dist.get_world_size(), local_rank, target if on_gpu else torch.device("cpu")
        )
    finally:
        if created:
            dist.destroy_process_group()

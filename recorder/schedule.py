"""Snapshot schedules: which training steps the recorder snapshots.

Step ``s`` means the weights after ``s`` optimizer steps (step 0: before training). The recorder
always snapshots step 0 and the last step on top of whatever the schedule says.

A schedule can also count batches within each epoch (:meth:`Schedule.every_in_epoch`), as a
training loop's ``enumerate(loader)`` does: batch ``b`` (from 0) of epoch ``e`` of ``L`` batches
ends at step ``e * L + b + 1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Snapshot every ``every_n`` steps (0: never), at the explicit ``steps``, and after every
    batch ``b`` with ``b % epoch_every == 0`` of each epoch of ``epoch_length`` batches (0: never)."""

    every_n: int = 0
    steps: frozenset[int] = frozenset()
    epoch_every: int = 0
    epoch_length: int = 0

    @classmethod
    def every(cls, n: int) -> Schedule:
        """Steps 0, n, 2n, ..."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"Schedule.every(n) needs a positive integer, got {n!r}")
        return cls(every_n=n)

    @classmethod
    def every_in_epoch(cls, n: int, epoch_length: int) -> Schedule:
        """After batches 0, n, 2n, ... of every epoch of ``epoch_length`` batches (the batch index
        restarts at 0 each epoch): steps ``e * epoch_length + b + 1``."""
        for name, value in (("n", n), ("epoch_length", epoch_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Schedule.every_in_epoch: {name} must be a positive integer, got {value!r}")
        return cls(epoch_every=n, epoch_length=epoch_length)

    @classmethod
    def at(cls, steps: Iterable[int]) -> Schedule:
        """Exactly the given steps (non-negative integers)."""
        steps = frozenset(steps)
        bad = [s for s in steps if not isinstance(s, int) or isinstance(s, bool) or s < 0]
        if bad:
            raise ValueError(f"Schedule.at(steps) needs non-negative integers, got {sorted(map(repr, bad))}")
        return cls(steps=steps)

    @classmethod
    def log_spaced(cls, total_steps: int, num: int) -> Schedule:
        """``min(num, total_steps)`` distinct steps from 1 to ``total_steps``, geometrically spaced.

        Each step is the geometric interpolation between the previous one and ``total_steps``,
        pushed up to at least the previous step + 1 (dense early steps would otherwise collide)
        and down so that the remaining steps still fit below ``total_steps``.
        """
        if total_steps < 1 or num < 1:
            raise ValueError(
                f"Schedule.log_spaced needs total_steps >= 1 and num >= 1, got {total_steps}, {num}"
            )
        num = min(num, total_steps)
        steps = [1]
        for k in range(1, num):
            remaining = num - k  # steps still to place, this one included
            prev = steps[-1]
            target = round(prev * (total_steps / prev) ** (1 / remaining))
            steps.append(min(max(target, prev + 1), total_steps - remaining + 1))
        return cls(steps=frozenset(steps))

    def due(self, step: int) -> bool:
        """Whether ``step`` is scheduled (the recorder adds step 0 and the last step itself)."""
        in_epoch = (
            self.epoch_every > 0 and step > 0 and (step - 1) % self.epoch_length % self.epoch_every == 0
        )
        return (self.every_n > 0 and step % self.every_n == 0) or step in self.steps or in_epoch

    def to_json(self) -> dict[str, object]:
        """``every_n`` and ``steps``, and ``epoch_every`` and ``epoch_length`` where set."""
        within = (
            {"epoch_every": self.epoch_every, "epoch_length": self.epoch_length} if self.epoch_every else {}
        )
        return {"every_n": self.every_n, "steps": sorted(self.steps), **within}

"""What the trainer callbacks share: the recorder's settings, given when the callback is made, and
the optimizer steps a trainer reports, handed to the recorder once its learning-rate schedulers
have stepped.

A snapshot holds the learning rate of the step that follows it (the one the ``recorded`` update
rule replays), so :meth:`Recorder.step` must come after the scheduler's step. Trainers step some
schedulers after the hook that reports an optimizer step (Lightning's ``ReduceLROnPlateau`` and
epoch-interval schedulers, the ``Trainer``'s ``ReduceLROnPlateau``): :class:`DeferredSteps` keeps
a step until the trainer's next hook before another optimizer step, or the end of training. In
between, the weights and the optimizer state do not change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from recorder.recorder import Recorder
from recorder.rundir.probes import Inputs
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule

Metric = float | torch.Tensor  # a 0-dim tensor is read (``.item()``) when its step is recorded


@dataclass
class RecorderSettings:
    """The :class:`Recorder` arguments a callback takes when it is made (see there); the model and
    the optimizer come from the trainer when training starts. ``model_spec`` None: the callback's
    default, computed from the model."""

    run_dir: str | os.PathLike
    probes: tuple[Inputs, torch.Tensor]
    model_spec: ModelSpec | None
    task: str
    loss: str
    schedule: Schedule
    seed: int | None
    extra: dict[str, Any] | None
    max_in_flight: int | None

    def start(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        default_spec: Callable[[nn.Module], ModelSpec],
    ) -> Recorder:
        """A recorder of ``model`` and ``optimizer`` (snapshot of step 0 taken)."""
        spec = self.model_spec if self.model_spec is not None else default_spec(model)
        return Recorder(
            self.run_dir,
            model,
            optimizer,
            probes=self.probes,
            model_spec=spec,
            task=self.task,
            loss=self.loss,
            schedule=self.schedule,
            seed=self.seed,
            extra=self.extra,
            max_in_flight=self.max_in_flight,
        )


@dataclass
class _Step:
    """An optimizer step taken, not yet handed to the recorder."""

    epoch: int
    metrics: dict[str, Metric] = field(default_factory=dict)


class DeferredSteps:
    """A :class:`Recorder` fed by a trainer's hooks: :meth:`taken` when the trainer has taken an
    optimizer step, :meth:`flush` at its next hook before another one (or at the end), which calls
    ``recorder.step()``, snapshotting what the schedule asks for with the learning rate the next
    step will use."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self._pending: _Step | None = None

    def taken(self, epoch: int, **metrics: Metric) -> None:
        """One optimizer step of ``epoch`` was taken (the step before it, if still pending, is recorded first)."""
        self.flush()
        self._pending = _Step(epoch, dict(metrics))

    def add_metrics(self, metrics: dict[str, Metric]) -> None:
        """Log ``metrics`` with the pending step (nothing when every step taken is recorded)."""
        if self._pending is not None:
            self._pending.metrics.update(metrics)

    def flush(self) -> None:
        """Record the pending step, if any: its metrics logged, a snapshot if scheduled."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        self.recorder.step(epoch=step.epoch, **{k: float(v) for k, v in step.metrics.items()})

    def close(self) -> None:
        """Record the pending step and close the recorder (the last snapshot, the manifest complete)."""
        self.flush()
        self.recorder.close()

    def abandon(self, error: BaseException) -> None:
        """Stop the recorder after ``error``, keeping every snapshot taken and adding none: the
        weights may be half way through an optimizer step (a pending step is dropped)."""
        self._pending = None
        self.recorder.__exit__(type(error), error, error.__traceback__)

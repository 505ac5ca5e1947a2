"""The recorder as a Hugging Face ``transformers`` ``TrainerCallback``:
``Trainer(..., callbacks=[ElasticityCallback(...)])``.

The recorder starts at ``on_train_begin`` with the Trainer's model and optimizer (the optimizer
accelerate wraps, unwrapped), and the model spec :func:`recorder.models.transformers_spec` by
default. The ``Trainer`` (``trainer.py``, transformers 5) calls ``on_step_end`` only on optimizer
steps (never between the batches of a gradient accumulation), after ``optimizer.step()`` and
``lr_scheduler.step()``; a ``ReduceLROnPlateau`` scheduler steps later, when metrics are logged.
So each step is recorded at the next ``on_step_begin`` or at ``on_train_end``
(:class:`recorder.integrations.steps.DeferredSteps`): its snapshot holds the learning rate of the
next step, whatever the scheduler.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from recorder.integrations.steps import DeferredSteps, RecorderSettings
from recorder.models import transformers_spec
from recorder.recorder import EVERY_STEP, Recorder
from recorder.rundir.probes import Inputs
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:
    raise ImportError(
        "recorder.integrations.transformers needs Hugging Face transformers: "
        "pip install 'local-elasticity[transformers]'"
    ) from e

_ROW_KEYS = ("kind", "step", "epoch")  # what a metrics row says itself


class ElasticityCallback(TrainerCallback):
    """Record the model a ``transformers.Trainer`` trains into ``run_dir``, one recorder step per
    optimizer step, counted from the start of ``train()``; closed at ``on_train_end`` (the Trainer
    has no hook for a failed training: the recorder then writes what it staged at interpreter
    exit, the manifest marked incomplete).

    Arguments as :class:`recorder.recorder.Recorder`'s: ``probes`` (named inputs such as
    ``{"input_ids": [P, L], "attention_mask": [P, L]}``, targets ``[P]`` int64 classes),
    ``model_spec`` (default :func:`recorder.models.transformers_spec` of the model, a sequence
    classifier), ``task``, ``loss``, ``schedule``, ``seed``, ``extra``, ``max_in_flight``.

    ``metrics.jsonl``: each step's row holds the numbers the Trainer logs at that step (``loss``,
    the mean since the previous log: ``logging_steps=1`` for every step's own; ``grad_norm``,
    ``learning_rate`` of that step, evaluation metrics).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        probes: tuple[Inputs, torch.Tensor],
        model_spec: ModelSpec | None = None,
        task: str = "classification",
        loss: str = "cross_entropy",
        schedule: Schedule = EVERY_STEP,
        seed: int | None = None,
        extra: dict[str, Any] | None = None,
        max_in_flight: int | None = None,
    ):
        self.settings = RecorderSettings(
            run_dir, probes, model_spec, task, loss, schedule, seed, extra, max_in_flight
        )
        self._steps: DeferredSteps | None = None

    @property
    def recorder(self) -> Recorder | None:
        """The recorder of the current (or last) training; None before training starts."""
        return self._steps.recorder if self._steps is not None else None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin")
        while optimizer is not None and hasattr(optimizer, "optimizer"):  # accelerate's AcceleratedOptimizer
            optimizer = optimizer.optimizer
        self._steps = DeferredSteps(self.settings.start(model, optimizer, transformers_spec))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self._steps is not None
        self._steps.flush()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self._steps is not None
        # state.epoch is epoch + (batches done) / (batches an epoch): in (e, e + 1] during epoch e
        self._steps.taken(max(math.ceil(state.epoch or 0) - 1, 0))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._steps is not None and logs:
            self._steps.add_metrics(
                {
                    k: v
                    for k, v in logs.items()
                    if k not in _ROW_KEYS and isinstance(v, int | float) and not isinstance(v, bool)
                }
            )

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        assert self._steps is not None
        self._steps.close()

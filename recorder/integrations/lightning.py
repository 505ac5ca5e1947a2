"""The recorder as a PyTorch Lightning callback: ``Trainer(callbacks=[ElasticityCallback(...)])``.

The recorded model is the ``LightningModule`` itself (parameter names as it has them): its model
spec must build the same module, through a factory registered with
:func:`recorder.models.register_model` (the class itself will do); by default the module's class
name and its hyperparameters (:func:`lightning_spec`). Replay rebuilds it with
``--allow-factory module:ClassName``.

Hooks, as Lightning 2.6 calls them (``loops/training_epoch_loop.py``, ``loops/fit_loop.py``):
after an optimizer step, step-interval schedulers step before ``on_train_batch_end``, plateau
schedulers after it, epoch-interval ones after ``on_train_epoch_end``. So an optimizer step,
seen at ``on_train_batch_end`` as a change of ``trainer.global_step``, is recorded at the next
``on_train_epoch_start``, ``on_train_batch_start`` or ``on_train_end``
(:class:`recorder.integrations.steps.DeferredSteps`): its snapshot holds the learning rate of
the next step. Under gradient accumulation one recorder step is one optimizer step; its ``loss``
is the mean of the ``training_step`` losses of its batches.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recorder.integrations.steps import DeferredSteps, RecorderSettings
from recorder.models import registered_models
from recorder.recorder import EVERY_STEP, Recorder
from recorder.rundir.probes import Inputs
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule

try:
    import lightning.pytorch as pl
except ImportError as e:
    raise ImportError(
        "recorder.integrations.lightning needs PyTorch Lightning: pip install 'local-elasticity[lightning]'"
    ) from e

_ROW_KEYS = ("kind", "step", "epoch")  # what a metrics row says itself


def lightning_spec(module: nn.Module) -> ModelSpec:
    """The model spec of a ``LightningModule`` whose class is registered under its own name
    (``@register_model("LitNet")`` on ``class LitNet``) and built from its hyperparameters
    (``self.save_hyperparameters()``): ``ModelSpec(class name, hparams)``."""
    name = type(module).__name__
    if name not in registered_models():
        raise ValueError(
            f"{name} is not a registered model factory: decorate the class with "
            f'@register_model("{name}") (recorder.models) so that replay can build it again, '
            "or pass model_spec"
        )
    kwargs = dict(getattr(module, "hparams", {}))
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the hyperparameters of {name} are not JSON ({e}): pass model_spec") from None
    return ModelSpec(name, kwargs)


class ElasticityCallback(pl.Callback):
    """Record the ``LightningModule`` a ``Trainer`` fits into ``run_dir``: the recorder starts at
    ``on_train_start`` with the module and ``trainer.optimizers[0]`` (one optimizer at most),
    records every optimizer step, and closes at ``on_train_end`` (a failed fit leaves the
    snapshots taken, the manifest marked incomplete).

    Arguments as :class:`recorder.recorder.Recorder`'s: ``probes`` (inputs ``[P, ...]`` or named
    tensors, targets ``[P]`` classes or ``[P, C]`` floats), ``model_spec`` (default
    :func:`lightning_spec`), ``task``, ``loss``, ``schedule``, ``seed``, ``extra``,
    ``max_in_flight``. The module's ``forward`` must map probe inputs to outputs ``[N, C]``.
    Under DDP only global rank 0 writes. Steps count from the start of the fit (a fit resumed
    from a checkpoint starts at step 0 with the weights it resumed from).

    ``metrics.jsonl``: per step ``loss`` (when ``training_step`` returns one); per epoch the
    scalars of ``trainer.callback_metrics`` (what the module ``self.log``-ged, validation too).
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
        self._global_step = 0  # trainer.global_step at the last optimizer step counted
        self._losses: list[torch.Tensor] = []  # of the batches of the optimizer step under way
        self._ended_epoch: int | None = None  # an epoch whose row is not logged yet

    @property
    def recorder(self) -> Recorder | None:
        """The recorder of the current (or last) fit; None before training starts."""
        return self._steps.recorder if self._steps is not None else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"ElasticityCallback records one optimizer, the module has {len(trainer.optimizers)}: "
                "attach a Recorder in the module yourself"
            )
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._global_step, self._losses, self._ended_epoch = trainer.global_step, [], None
        self._steps = DeferredSteps(self.settings.start(pl_module, optimizer, lightning_spec))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._catch_up(trainer)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: torch.Tensor | Mapping[str, Any] | None,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self._steps is not None
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._losses.append(loss.detach().reshape(()))
        taken = trainer.global_step - self._global_step
        if taken == 0:
            return
        if taken > 1:
            raise ValueError(
                f"ElasticityCallback records one optimizer step a batch, batch {batch_idx} took {taken} "
                "(manual optimization): call Recorder.step() after each optimizer step yourself"
            )
        self._global_step = trainer.global_step
        metrics = {}
        if self._losses:
            # automatic optimization divides each loss by accumulate_grad_batches before returning it
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            metrics["loss"] = torch.stack(self._losses).sum() * (scale / len(self._losses))
        self._losses = []
        self._steps.taken(trainer.current_epoch, **metrics)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ended_epoch = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer)
        assert self._steps is not None
        self._steps.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._steps is not None:
            self._steps.abandon(exception)

    def _catch_up(self, trainer: pl.Trainer) -> None:
        """Record the step taken last (every scheduler has stepped since), then the row of an
        epoch that ended (its metrics, validation included, are in by now)."""
        assert self._steps is not None
        self._steps.flush()
        if self._ended_epoch is not None:
            metrics = {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k not in _ROW_KEYS and isinstance(v, torch.Tensor) and v.numel() == 1
            }
            self._steps.recorder.log_epoch(self._ended_epoch, **metrics)
            self._ended_epoch = None

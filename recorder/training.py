"""The presets' shared recipe: a generic supervised training loop with the recorder attached (one
``recorder.step()`` per optimizer step, per-epoch train and test loss, and accuracy for
classification), :func:`record_supervised` that builds, records and trains a model with it,
:func:`torch_threads` and :func:`progress_bar`."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
from torch import nn
from tqdm import tqdm

from recorder.losses import batch_loss, per_sample_loss
from recorder.models import build_model
from recorder.recorder import Recorder
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule


class Batches(Protocol):
    """Training batches (inputs, targets) with a length, iterable once per epoch: a DataLoader, say."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...


LOG_EVERY = 30.0  # seconds between the progress lines written to a log file


def progress_bar(total: int, enabled: bool = True, stream: TextIO | None = None) -> tqdm:
    """A progress bar of ``total`` steps on ``stream`` (default: standard error): redrawn in
    place on a terminal; elsewhere (a log file) written as a line every :data:`LOG_EVERY`
    seconds, not redrawn at every step."""
    stream = sys.stderr if stream is None else stream
    if stream.isatty():
        return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, file=stream)
    return tqdm(total=total, disable=not enabled, unit="step", mininterval=LOG_EVERY, file=_Lines(stream))


class _Lines:
    """A stream for tqdm that turns each in-place redraw (``"\\r" + text``) into a line of its own."""

    def __init__(self, stream: TextIO):
        self._stream = stream

    def write(self, text: str) -> None:
        line = text.strip("\r\n ")
        if line:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        self._stream.flush()


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch using ``threads`` CPU threads (None: as many as it has), then
    restore the count it had."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def record_supervised(
    run_dir: str | Path,
    model_spec: ModelSpec,
    optimizer: Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer],
    train_loader: Batches,
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    probes: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
    *,
    task: str,
    loss: str,
    epochs: int,
    seed: int,
    preset: str,
    extra: dict[str, Any],
    device: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
    eval_loaders: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> list[dict[str, float]]:
    """Record one supervised run into ``run_dir``: seed torch with ``seed``, build ``model_spec`` on
    ``device`` and its ``optimizer`` (called with the model's parameters), and :func:`train` it for
    ``epochs`` epochs on ``loss`` with the recorder attached, on ``threads`` CPU threads
    (:func:`torch_threads`). ``probes``: inputs ``[P, ...]`` and targets ``[P]`` classes or
    ``[P, C]``; ``task``, ``seed``, ``preset`` and ``extra`` go into ``spec.json``;
    ``eval_loaders`` as in :func:`train`. Returns :func:`train`'s rows."""
    torch.manual_seed(seed)
    model = build_model(model_spec).to(device)
    opt = optimizer(model.parameters())
    with (
        Recorder(
            run_dir,
            model,
            opt,
            probes=probes,
            model_spec=model_spec,
            task=task,
            loss=loss,
            schedule=schedule,
            seed=seed,
            preset=preset,
            extra=extra,
        ) as recorder,
        torch_threads(threads),
    ):
        return train(
            model,
            opt,
            loss,
            train_loader,
            test_loader,
            epochs,
            recorder,
            device,
            progress=progress,
            eval_loaders=eval_loaders,
        )


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_name: str,
    train_loader: Batches,
    test_loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    epochs: int,
    recorder: Recorder | None,
    device: str | torch.device,
    progress: bool = True,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    eval_loaders: Mapping[str, Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; return one row per epoch (also logged and printed).

    Batches are (inputs [B, ...], targets [B] classes or [B, C]). ``scheduler`` (if any) is stepped
    after every optimizer step. Rows: ``epoch``, ``train_loss``, ``test_loss`` and, for
    ``cross_entropy``, ``train_acc`` and ``test_acc``; for every ``name`` of ``eval_loaders``
    (further evaluation sets) ``<name>_loss`` and ``<name>_acc`` too. Train metrics average the
    batches of the epoch as they were trained on.
    """
    classification = loss_name == "cross_entropy"
    history = []
    bar = progress_bar(epochs * len(train_loader), progress)
    for epoch in range(epochs):
        model.train()
        loss_sum, correct, seen = 0.0, torch.zeros((), dtype=torch.int64, device=device), 0
        for inputs, targets in train_loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            outputs = model(inputs)
            loss = batch_loss(loss_name, outputs, targets)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            value = loss.item()
            if recorder is not None:
                recorder.step(epoch=epoch, loss=value)
            loss_sum += value * len(inputs)
            seen += len(inputs)
            if classification:
                correct += (outputs.argmax(dim=1) == targets).sum()
            bar.set_description(f"epoch {epoch + 1}/{epochs}", refresh=False)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update()
        row: dict[str, float] = {"train_loss": loss_sum / seen}
        if classification:
            row["train_acc"] = correct.item() / seen
        for name, loader in {"test": test_loader, **(eval_loaders or {})}.items():
            row.update({f"{name}_{k}": v for k, v in evaluate(model, loss_name, loader, device).items()})
        if recorder is not None:
            recorder.log_epoch(epoch, **row)
        history.append({"epoch": epoch, **row})
        tqdm.write(f"epoch {epoch + 1}/{epochs}  " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    bar.close()
    return history


def evaluate(
    model: nn.Module,
    loss_name: str,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: str | torch.device,
) -> dict[str, float]:
    """Mean loss (``loss``) and, for ``cross_entropy``, accuracy (``acc``) over ``loader``, in eval mode."""
    classification = loss_name == "cross_entropy"
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    with torch.no_grad():
        for inputs, targets in loader:
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            outputs = model(inputs)
            loss_sum += per_sample_loss(loss_name, outputs, targets).sum()
            if classification:
                correct += (outputs.argmax(dim=1) == targets).sum()
            seen += len(inputs)
    model.train(was_training)
    metrics = {"loss": loss_sum.item() / seen}
    if classification:
        metrics["acc"] = correct.item() / seen
    return metrics

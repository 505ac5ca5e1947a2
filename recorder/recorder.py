"""The recorder: snapshots the weights and optimizer state of a training run into a run directory
(:mod:`recorder.runfiles`) without stalling the training step.

On the training thread, :meth:`Recorder.step` only stages tensors: CUDA tensors are copied into
reused pinned CPU buffers with non-blocking copies on a side stream (which first waits for the
training stream; the training stream then waits for the side stream, so the next optimizer step
cannot overwrite a tensor still being copied, and the CPU never synchronizes); CPU tensors are
cloned. A background thread waits for the copies, encodes the snapshot and writes it atomically.
At most ``max_in_flight`` snapshots are staged at once, which bounds the memory used.
"""

from __future__ import annotations

import os
import platform
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy
import safetensors
import torch
from torch import nn

from recorder.models import build_model, check_state_matches
from recorder.runfiles import (
    LOSSES,
    TASKS,
    ModelSpec,
    OptimizerRecord,
    RunDirError,
    RunSpec,
    RunWriter,
    Snapshot,
)
from recorder.schedule import Schedule

_STOP = object()  # tells the writer thread to finish
EVERY_STEP = Schedule.every(1)


@dataclass
class _Slot:
    """Pinned host buffers for one snapshot in flight, reused across snapshots: key -> tensor."""

    pinned: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)

    def buffer_like(self, key: tuple[str, ...], t: torch.Tensor) -> torch.Tensor:
        buf = self.pinned.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self.pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf


@dataclass
class _Pending:
    """A staged snapshot on its way to the writer thread."""

    step: int
    epoch: int
    metrics: dict[str, float]
    slot: _Slot
    tensors: dict[tuple[str, ...], torch.Tensor]  # host tensors; valid once every event has fired
    events: list[torch.cuda.Event]
    optimizer: tuple[str, list[dict[str, Any]]] | None  # (class name, JSON-safe groups)


class Recorder:
    """Attach to a training loop: ``step()`` after every optimizer step, ``close()`` at the end.

    ``probes``: inputs [P, ...] and targets, [P] int64 classes (classification) or [P, C] floats
    (regression). ``model`` must be what ``build_model(model_spec)`` builds (same parameter and
    buffer names and shapes). ``optimizer`` may be None: then snapshots hold no optimizer state.
    Step 0 (the weights now) is snapshotted at construction, the last step by ``close()``.
    Errors of the writer thread are raised by the next ``step()``, ``log_epoch()`` or ``close()``.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        probes: tuple[torch.Tensor, torch.Tensor],
        model_spec: ModelSpec,
        task: str,
        loss: str,
        schedule: Schedule = EVERY_STEP,
        seed: int | None = None,
        preset: str | None = None,
        extra: dict[str, Any] | None = None,
        max_in_flight: int = 2,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        inputs, targets = probes
        num_outputs = _check_model(model, model_spec, inputs)
        _check_probes(task, inputs, targets, num_outputs)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        if optimizer is not None:
            foreign = [
                p for g in optimizer.param_groups for p in g["params"] if id(p) not in self._param_names
            ]
            if foreign:
                raise ValueError(
                    f"the optimizer holds {len(foreign)} tensor(s) that are not parameters of the model"
                )
        spec = RunSpec(
            model=model_spec,
            task=task,
            loss=loss,
            num_outputs=num_outputs,
            optimizer=type(optimizer).__name__ if optimizer is not None else None,
            seed=seed,
            preset=preset,
            versions={
                "torch": torch.__version__,
                "python": platform.python_version(),
                "numpy": numpy.__version__,
                "safetensors": safetensors.__version__,
            },
            extra={"schedule": schedule.to_json(), **(extra or {})},
        )
        self._writer = RunWriter(run_dir, spec, inputs, targets)
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.step_count = 0  # optimizer steps taken so far
        self.epoch = 0
        self._step_metrics: dict[str, float] = {}  # what step() got at the current step
        self._last_snapshot = -1
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(max_in_flight):
            self._slots.put(_Slot())
        self._queue: queue.Queue[Any] = queue.Queue()
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="recorder-writer", daemon=True)
        self._thread.start()
        self._snapshot()

    # ------------------------------------------------------------------------- training thread

    def step(self, epoch: int | None = None, **metrics: float) -> None:
        """Count one optimizer step, log its metrics and snapshot if the schedule says so.

        Metrics should be Python numbers: a CUDA tensor would cost a device synchronization.
        """
        self._check_open()
        self.step_count += 1
        if epoch is not None:
            self.epoch = epoch
        self._step_metrics = {k: float(v) for k, v in metrics.items()}
        if self._step_metrics:
            self._queue.put(
                {"kind": "step", "step": self.step_count, "epoch": self.epoch, **self._step_metrics}
            )
        if self.schedule.due(self.step_count):
            self._snapshot()

    def log_epoch(self, epoch: int, **metrics: float) -> None:
        """Log per-epoch metrics (a ``"kind": "epoch"`` row of ``metrics.jsonl``)."""
        self._check_open()
        self.epoch = epoch
        self._queue.put(
            {
                "kind": "epoch",
                "step": self.step_count,
                "epoch": epoch,
                **{k: float(v) for k, v in metrics.items()},
            }
        )

    def close(self) -> None:
        """Snapshot the last step (unless already taken), wait for every write, raise writer errors."""
        if self._closed:
            return
        try:
            if self._error is None and self._last_snapshot != self.step_count:
                self._snapshot()
        finally:
            self._stop()
        self._raise_writer_error()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # The weights may be half way through an optimizer step: keep what was recorded, add nothing.
            self._stop()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the recorder is closed")
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    def _snapshot(self) -> None:
        """Stage the model (and optimizer) at the current step and queue it for the writer."""
        tensors: dict[tuple[str, ...], torch.Tensor] = {}
        tensors.update({("params", n): p for n, p in self.model.named_parameters()})
        tensors.update({("buffers", n): b for n, b in self.model.named_buffers()})
        optimizer = None
        if self.optimizer is not None:
            groups = [self._group_record(g) for g in self.optimizer.param_groups]
            optimizer = (type(self.optimizer).__name__, groups)
            for p, state in self.optimizer.state.items():
                name = self._param_names[id(p)]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[("optim", name, key)] = value
                    elif isinstance(value, float):
                        tensors[("optim", name, key)] = torch.tensor(value, dtype=torch.float64)
                    elif isinstance(value, int):  # bool included
                        tensors[("optim", name, key)] = torch.tensor(value)
        slot = self._slots.get()  # blocks only while max_in_flight snapshots are still being written
        try:
            host, events = self._stage(tensors, slot)
        except BaseException:
            self._slots.put(slot)
            raise
        self._queue.put(
            _Pending(self.step_count, self.epoch, self._step_metrics, slot, host, events, optimizer)
        )
        self._last_snapshot = self.step_count

    def _stage(
        self, tensors: dict[tuple[str, ...], torch.Tensor], slot: _Slot
    ) -> tuple[dict[tuple[str, ...], torch.Tensor], list[torch.cuda.Event]]:
        """Host copies of ``tensors``: CPU ones cloned now, CUDA ones copied asynchronously into
        the slot's pinned buffers; the returned events fire when those copies are complete."""
        host: dict[tuple[str, ...], torch.Tensor] = {}
        on_cuda: dict[torch.device, list[tuple[tuple[str, ...], torch.Tensor]]] = {}
        for key, t in tensors.items():
            t = t.detach()
            if t.is_cuda:
                on_cuda.setdefault(t.device, []).append((key, t))
            else:
                host[key] = t.clone()
        events = []
        for device, items in on_cuda.items():
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            side, current = self._streams[device], torch.cuda.current_stream(device)
            side.wait_stream(current)  # the copies see every update queued so far
            with torch.cuda.stream(side):
                for key, t in items:
                    host[key] = slot.buffer_like(key, t).copy_(t, non_blocking=True)
            current.wait_stream(side)  # later training work cannot overwrite a tensor mid-copy
            event = torch.cuda.Event()
            event.record(side)
            events.append(event)
        return host, events

    def _group_record(self, group: dict[str, Any]) -> dict[str, Any]:
        """One parameter group's hyperparameters, JSON-safe, with ``params`` as parameter names."""
        record = {k: _json_safe(v) for k, v in group.items() if k != "params"}
        record["params"] = [self._param_names[id(p)] for p in group["params"]]
        return record

    # ------------------------------------------------------------------------- writer thread

    def _write_loop(self) -> None:
        """Write queued metrics rows (batched) and snapshots in order until told to stop."""
        while True:
            batch = [self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            rows: list[dict[str, Any]] = []
            for item in batch:
                if isinstance(item, dict):
                    rows.append(item)
                    continue
                if rows:
                    self._guarded(self._writer.log_metrics, *rows)
                    rows = []
                if item is _STOP:
                    return
                self._guarded(self._write_snapshot, item)
                self._slots.put(item.slot)
            if rows:
                self._guarded(self._writer.log_metrics, *rows)

    def _guarded(self, fn, *args) -> None:
        """Run ``fn`` unless an earlier write failed; keep its error for the training thread."""
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e

    def _write_snapshot(self, item: _Pending) -> None:
        for event in item.events:
            event.synchronize()
        parts: dict[str, dict[str, Any]] = {"params": {}, "buffers": {}, "optim": {}}
        for key, t in item.tensors.items():
            if key[0] == "optim":
                parts["optim"].setdefault(key[1], {})[key[2]] = t
            else:
                parts[key[0]][key[1]] = t
        optimizer = None
        lr = None
        if item.optimizer is not None:
            opt_type, groups = item.optimizer
            optimizer = OptimizerRecord(type=opt_type, groups=groups, state=parts["optim"])
            lr = groups[0].get("lr") if groups else None
        snapshot = Snapshot(item.step, parts["params"], parts["buffers"], optimizer)
        self._writer.add_snapshot(
            snapshot,
            epoch=item.epoch,
            lr=lr if isinstance(lr, float | int) else None,
            metrics=item.metrics,
        )


def _json_safe(value: Any) -> Any:
    """A hyperparameter as JSON: tensors to numbers or lists, tuples to lists, others to repr."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


def _check_model(model: nn.Module, spec: ModelSpec, inputs: torch.Tensor) -> int:
    """Check that ``model`` is what ``spec`` builds; return its number of outputs C.

    The spec's model is built and run on one probe input [1, ...] on the CPU with the global RNG
    forked, so recording does not change the training's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        reference = build_model(spec)
        x = inputs[:1].detach().cpu()
        if x.is_floating_point():
            reference.to(x.dtype)
        reference.eval()
        try:
            with torch.no_grad():
                out = reference(x)
        except Exception as e:
            raise ValueError(f"the probe inputs {tuple(inputs.shape)} do not fit the model: {e}") from e
    where = f"{spec.factory}(**{spec.kwargs})"
    try:
        # The spec's tensors checked against the given model: "missing" means absent from the spec.
        check_state_matches(model, dict(reference.named_parameters()), where=where)
    except RunDirError as e:
        raise ValueError(f"the model given to Recorder does not match its model_spec: {e}") from None
    buffers = {k: tuple(v.shape) for k, v in model.named_buffers()}
    expected = {k: tuple(v.shape) for k, v in reference.named_buffers()}
    if buffers != expected:
        raise ValueError(
            f"the model given to Recorder does not match its model_spec: {where} builds buffers "
            f"{expected}, the model has {buffers}"
        )
    if out.ndim != 2:
        raise ValueError(f"the model must map inputs [N, ...] to outputs [N, C], got {tuple(out.shape)}")
    return out.shape[1]


def _check_probes(task: str, inputs: torch.Tensor, targets: torch.Tensor, num_outputs: int) -> None:
    """Probe targets: [P] int64 classes in [0, C) for classification, [P, C] floats for regression."""
    if inputs.ndim < 1 or inputs.shape[0] == 0:
        raise ValueError("the probe set is empty")
    if targets.shape[:1] != inputs.shape[:1]:
        raise ValueError(f"{inputs.shape[0]} probe inputs but targets of shape {tuple(targets.shape)}")
    if task == "classification":
        if targets.dtype != torch.int64 or targets.ndim != 1:
            raise ValueError("classification probe targets must be int64 classes of shape [P]")
        if targets.min() < 0 or targets.max() >= num_outputs:
            raise ValueError(f"probe classes must lie in [0, {num_outputs})")
    elif not targets.is_floating_point() or tuple(targets.shape) != (inputs.shape[0], num_outputs):
        raise ValueError(f"regression probe targets must be floats of shape [P, {num_outputs}]")

"""The recorder: snapshots the weights and optimizer state of a training run into a run directory
(:mod:`recorder.rundir`) without stalling the training step.

On the training thread, :meth:`Recorder.step` only stages tensors into a free slot of shared
memory laid out as the snapshot file's payload (:class:`recorder.rundir.snapshot.SnapshotLayout`): CPU
tensors are copied at once; CUDA tensors with non-blocking copies on a side stream into the slot,
page-locked for the purpose (the side stream first waits for the training stream, and the
training stream then waits for the side stream, so the next optimizer step cannot overwrite a
tensor still being copied, and the CPU never synchronizes). Once its copies are complete, a
snapshot is handed to the writer process (:mod:`recorder.writer`), which writes it atomically.
At most ``max_in_flight`` snapshots are staged at once, which bounds the memory used (by
default as many as fit in 64 MiB, from 2 to 8).
"""

from __future__ import annotations

import os
import platform
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy
import safetensors
import torch
from torch import nn

from recorder.models import check_state_matches, probe_outputs, rebuild_model
from recorder.rundir.errors import RunDirError
from recorder.rundir.files import to_json
from recorder.rundir.run import create_run_dir, probe_problem
from recorder.rundir.snapshot import SnapshotLayout
from recorder.rundir.spec import LOSSES, TASKS, ModelSpec, RunSpec
from recorder.rundir.trajectory import optimizer_metadata
from recorder.schedule import Schedule
from recorder.writer import WriterProcess

EVERY_STEP = Schedule.every(1)
SEND_SECONDS = 0.1  # the longest a staged snapshot waits to be sent with others


@dataclass
class _Staged:
    """A snapshot staged in a slot, sent to the writer once ``event`` (its CUDA copies) fired."""

    slot: int
    layout: SnapshotLayout
    optimizer: str | None  # the optimizer's metadata (JSON)
    step: int
    epoch: int
    lr: float | None
    metrics: dict[str, float]
    event: torch.cuda.Event | None
    staged_at: float  # time.monotonic()


@dataclass
class _SlotViews:
    """A slot's payload as a tensor and its views for one layout, kept while neither changes."""

    payload: torch.Tensor  # uint8 [capacity], the shared memory itself
    pinned: bool  # registered with CUDA (page-locked) for asynchronous copies
    layout: SnapshotLayout | None = None  # the layout of ``views``; None before the first
    views: dict[str, torch.Tensor] = field(default_factory=dict)


class Recorder:
    """Attach to a training loop: ``step()`` after every optimizer step, ``close()`` at the end.

    ``probes``: inputs [P, ...] and targets, [P] int64 classes (classification) or [P, C] floats
    (regression). ``model`` must be what ``build_model(model_spec)`` builds (same parameter and
    buffer names and shapes). ``optimizer`` may be None: then snapshots hold no optimizer state.
    Step 0 (the weights now) is snapshotted at construction, the last step by ``close()``.
    ``max_in_flight``: snapshots staged at once (default: as many as fit in 64 MiB, 2 to 8).

    Snapshots are written by a writer process (``writer_pid``); its errors are raised by a later
    snapshot (once its answers are read: when the staging slots run out), by ``log_epoch()`` or
    by ``close()``. Written snapshots are listed in the manifest within about a second; when
    the training process dies, the writer still writes every snapshot staged more than a tenth
    of a second before.
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
        max_in_flight: int | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        inputs, targets = probes
        num_outputs = _check_model(model, model_spec, inputs)
        problem = probe_problem(task, num_outputs, inputs, targets)
        if problem:
            raise ValueError(f"probes: {problem}")
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
        create_run_dir(run_dir, spec, inputs, targets)
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.step_count = 0  # optimizer steps taken so far
        self.epoch = 0
        self._step_metrics: dict[str, float] = {}  # what step() got at the current step
        self._last_snapshot = -1
        self._layout: SnapshotLayout | None = None
        self._signature: list[tuple[str, torch.dtype, torch.Size]] = []  # of the tensors laid out
        self._optimizer_key: list[list[tuple[str, Any]]] | None = None  # the groups as last encoded
        self._optimizer_records: list[dict[str, Any]] = []  # JSON-safe
        self._optimizer_json = ""
        self._slot_views: dict[int, _SlotViews] = {}
        self._staged: deque[_Staged] = deque()  # staged, not yet sent, in step order
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._closed = False
        self._writer = WriterProcess(run_dir, max_in_flight)
        try:
            self._snapshot()
            self._send_staged(wait=True)  # step 0 goes out at once
        except BaseException:
            self._stop(raise_error=False)
            raise

    @property
    def writer_pid(self) -> int:
        """The process id of the writer process."""
        return self._writer.process.pid

    # ------------------------------------------------------------------------- training thread

    def step(self, epoch: int | None = None, **metrics: float) -> None:
        """Count one optimizer step, log its metrics and snapshot if the schedule says so.

        Metrics should be Python numbers: a CUDA tensor would cost a device synchronization.
        """
        self._check_open()
        self.step_count += 1
        if epoch is not None:
            self.epoch = epoch
        self._step_metrics = {k: float(v) for k, v in metrics.items()} if metrics else {}
        if self._step_metrics:
            self._writer.log(
                {"kind": "step", "step": self.step_count, "epoch": self.epoch, **self._step_metrics}
            )
        if self.schedule.due(self.step_count):
            self._snapshot()

    def log_epoch(self, epoch: int, **metrics: float) -> None:
        """Log per-epoch metrics (a ``"kind": "epoch"`` row of ``metrics.jsonl``)."""
        self._check_open()
        self._writer.poll()
        self.epoch = epoch
        row = {"kind": "epoch", "step": self.step_count, "epoch": epoch}
        self._writer.log({**row, **{k: float(v) for k, v in metrics.items()}})
        self._writer.flush_rows()

    def close(self) -> None:
        """Snapshot the last step (unless already taken), wait for every write, raise writer errors."""
        if self._closed:
            return
        try:
            if self._last_snapshot != self.step_count:
                self._check_open()
                self._snapshot()
        except BaseException:
            self._stop(raise_error=False)
            raise
        self._stop(raise_error=True)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # The weights may be half way through an optimizer step: keep what was recorded, add nothing.
            self._stop(raise_error=False)

    def _check_open(self) -> None:
        """Raise if closed; send staged snapshots whose copies are done."""
        if self._closed:
            raise RuntimeError("the recorder is closed")
        if self._staged and time.monotonic() >= self._staged[0].staged_at + SEND_SECONDS:
            self._send_staged(wait=False)

    def _stop(self, raise_error: bool) -> None:
        """Send what is staged, let the writer finish, release the shared memory."""
        self._closed = True
        try:
            self._send_staged(wait=True)
        finally:
            self._writer.close(raise_error=raise_error)
            for views in self._slot_views.values():
                if views.pinned:
                    _unpin(views.payload)
            self._slot_views.clear()

    def _snapshot(self) -> None:
        """Stage the model (and optimizer) at the current step into a free slot."""
        tensors: dict[str, torch.Tensor] = {
            f"params.{n}": p for n, p in self.model.named_parameters()
        }  # copied under no_grad
        tensors.update({f"buffers.{n}": b for n, b in self.model.named_buffers()})
        optimizer = None
        if self.optimizer is not None:
            optimizer = self._optimizer_metadata(self.optimizer)
            for p, state in self.optimizer.state.items():
                name = self._param_names[id(p)]
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"optim.{name}.{key}"] = value
                    elif isinstance(value, float):
                        tensors[f"optim.{name}.{key}"] = torch.tensor(value, dtype=torch.float64)
                    elif isinstance(value, int):  # bool included
                        tensors[f"optim.{name}.{key}"] = torch.tensor(value)
        signature = [(name, t.dtype, t.shape) for name, t in tensors.items()]
        if signature != self._signature or self._layout is None:
            self._layout, self._signature = SnapshotLayout.of(tensors), signature
        layout = self._layout
        if self._writer.full(layout.nbytes):
            self._send_staged(wait=True)
        slot, remapped = self._writer.acquire(layout.nbytes)
        try:
            with torch.no_grad():
                event = self._copy(tensors, self._views(slot, remapped, tensors, layout))
        except BaseException:
            self._writer.release(slot)
            raise
        groups = self._optimizer_records if optimizer is not None else []
        lr = groups[0].get("lr") if groups else None
        self._staged.append(
            _Staged(
                slot,
                layout,
                optimizer,
                self.step_count,
                self.epoch,
                lr if isinstance(lr, float | int) else None,
                self._step_metrics,
                event,
                time.monotonic(),
            )
        )
        self._last_snapshot = self.step_count
        if len(self._staged) >= max(1, self._writer.usable(layout.nbytes) // 2):
            self._send_staged(wait=False)

    def _views(
        self, slot: int, remapped: bool, tensors: dict[str, torch.Tensor], layout: SnapshotLayout
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``layout`` (the current one) as views of slot ``slot``'s shared memory,
        pinned when some tensor is on a GPU."""
        cached = self._slot_views.get(slot)
        cuda = any(t.is_cuda for t in tensors.values())
        if cached is None or remapped or (cuda and not cached.pinned):
            if cached is not None and cached.pinned:
                _unpin(cached.payload)
            payload = torch.frombuffer(self._writer.buffers[slot].map, dtype=torch.uint8)
            if cuda:
                _pin(payload)
            cached = self._slot_views[slot] = _SlotViews(payload, cuda)
        if cached.layout is not layout:
            cached.layout, cached.views = layout, layout.views(cached.payload)
        return cached.views

    def _copy(
        self, tensors: dict[str, torch.Tensor], views: dict[str, torch.Tensor]
    ) -> torch.cuda.Event | None:
        """Copy ``tensors`` into their ``views``: CPU ones now, CUDA ones asynchronously on a side
        stream; the returned event (None without CUDA tensors) fires when the copies are done."""
        on_cuda: dict[torch.device, list[str]] = {}
        on_cpu: list[str] = []
        for name, t in tensors.items():
            (on_cuda.setdefault(t.device, []) if t.is_cuda else on_cpu).append(name)
        if on_cpu:  # one call for all (the loop's per-call overhead dominates small models)
            torch._foreach_copy_([views[name] for name in on_cpu], [tensors[name] for name in on_cpu])
        event = None
        for device, names in on_cuda.items():
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            side, current = self._streams[device], torch.cuda.current_stream(device)
            side.wait_stream(current)  # the copies see every update queued so far
            with torch.cuda.stream(side):
                for name in names:
                    views[name].copy_(tensors[name], non_blocking=True)
            current.wait_stream(side)  # later training work cannot overwrite a tensor mid-copy
            event = torch.cuda.Event()
            event.record(side)  # a single device per model: the last device's event suffices
        return event

    def _send_staged(self, wait: bool) -> None:
        """Hand the staged snapshots whose copies are complete to the writer, in step order, with
        one write (``wait``: wait for the copies). The recorder calls it once half the usable
        slots are staged, or the oldest staged snapshot is :data:`SEND_SECONDS` old: one wake-up
        of the writer for several snapshots."""
        ready = 0
        for staged in self._staged:
            if staged.event is not None:
                if not wait and not staged.event.query():
                    break
                staged.event.synchronize()
            ready += 1
        if not ready:
            return
        snapshots = [self._staged.popleft() for _ in range(ready)]
        self._writer.send_snapshots(
            [
                {
                    "slot": s.slot,
                    "nbytes": s.layout.nbytes,
                    "step": s.step,
                    "tensors_json": s.layout.tensors_json,
                    "optimizer": s.optimizer,
                    "epoch": s.epoch,
                    "lr": s.lr,
                    "metrics": s.metrics,
                }
                for s in snapshots
            ]
        )

    def _optimizer_metadata(self, optimizer: torch.optim.Optimizer) -> str:
        """The optimizer's type and hyperparameters as JSON, re-encoded only when they change."""
        groups = optimizer.param_groups
        key = [
            [
                (k, tuple(v) if k == "params" else v.tolist() if isinstance(v, torch.Tensor) else v)
                for k, v in g.items()
            ]
            for g in groups
        ]
        if key != self._optimizer_key:
            self._optimizer_records = [self._group_record(g) for g in groups]
            self._optimizer_json = optimizer_metadata(type(optimizer).__name__, self._optimizer_records)
            self._optimizer_key = key
        return self._optimizer_json

    def _group_record(self, group: dict[str, Any]) -> dict[str, Any]:
        """One parameter group's hyperparameters, JSON-safe, with ``params`` as parameter names."""
        record = {k: to_json(v) for k, v in group.items() if k != "params"}
        record["params"] = [self._param_names[id(p)] for p in group["params"]]
        return record


def _pin(payload: torch.Tensor) -> None:
    """Page-lock shared memory for asynchronous device-to-host copies (as torch's own
    distributed checkpoint stager does)."""
    code = int(torch.cuda.cudart().cudaHostRegister(payload.data_ptr(), payload.numel(), 1))
    if code != 0:
        raise RuntimeError(f"could not page-lock the recorder's shared memory (cudaError {code})")


def _unpin(payload: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(payload.data_ptr())



def _check_model(model: nn.Module, spec: ModelSpec, inputs: torch.Tensor) -> int:
    """Check that ``model`` is what ``spec`` builds and takes the probe ``inputs`` ``[P, ...]``;
    return its number of outputs C (recording does not change the training's random stream)."""
    reference = rebuild_model(spec)
    out = probe_outputs(reference, inputs, spec.factory)
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

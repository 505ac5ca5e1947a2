"""The recorder: snapshots the weights and optimizer state of a training run into a run directory
(:mod:`recorder.rundir`) without stalling the training step.

On the training thread, :meth:`Recorder.step` only stages tensors into a free slot of shared
memory laid out as the snapshot file's payload (:class:`recorder.rundir.snapshot.SnapshotLayout`): CPU
tensors are copied at once; CUDA tensors with non-blocking copies on a side stream into the slot,
page-locked for the purpose (the side stream first waits for the training stream, and the
training stream then waits for the side stream, so the next optimizer step cannot overwrite a
tensor still being copied, and the CPU never synchronizes; a model on several GPUs has a side
stream and an event per device). Once the copies on every device are complete, a snapshot is
handed to the writer process (:mod:`recorder.writer`), which writes it atomically: by a later
:meth:`Recorder.step` once half the usable slots are staged, by a sender thread at most
:data:`SEND_SECONDS` after staging, by ``close()``, or at interpreter exit. At most
``max_in_flight`` snapshots are staged at once, which bounds the memory used (by default as many
as fit in 64 MiB, from 2 to 8).

Wrapped models are recorded as the module they wrap (``DistributedDataParallel``: only on global
rank 0, the recorders of other ranks record nothing; ``torch.compile``); models sharded by FSDP
are refused.
"""

from __future__ import annotations

import atexit
import os
import platform
import sys
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy
import safetensors
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recorder.models import check_state_matches, probe_outputs, rebuild_model
from recorder.rundir.errors import RunDirError
from recorder.rundir.files import to_json
from recorder.rundir.probes import Inputs, probe_problem
from recorder.rundir.run import create_run_dir
from recorder.rundir.snapshot import SnapshotLayout
from recorder.rundir.spec import LOSSES, TASKS, ModelSpec, RunSpec
from recorder.rundir.trajectory import optimizer_metadata
from recorder.schedule import Schedule
from recorder.writer import WriterProcess

EVERY_STEP = Schedule.every(1)
SEND_SECONDS = 0.1  # the longest a staged snapshot waits to be sent with others
COPY_POLL_SECONDS = 0.001  # how often the sender thread looks again at GPU copies still running
_SHARDED = [  # (module, class) of FSDP1 modules and of FSDP2's parameters (DTensor, torch 2.4's path too)
    ("torch.distributed.fsdp", "FullyShardedDataParallel"),
    ("torch.distributed.tensor", "DTensor"),
    ("torch.distributed._tensor", "DTensor"),
]


@dataclass
class _Staged:
    """A snapshot staged in a slot, sent to the writer once all ``events`` (its CUDA copies, one
    event per device) fired."""

    slot: int
    layout: SnapshotLayout
    optimizer: str | None  # the optimizer's metadata (JSON)
    step: int
    epoch: int
    lr: float | None
    metrics: dict[str, float]
    events: list[torch.cuda.Event]
    staged_at: float  # time.monotonic()


@dataclass
class _SlotViews:
    """A slot's payload as a tensor and its views for one layout, kept while neither changes."""

    payload: torch.Tensor  # uint8 [capacity], the shared memory itself
    pinned: bool  # registered with CUDA (page-locked): copies into it are asynchronous
    layout: SnapshotLayout | None = None  # the layout of ``views``; None before the first
    views: dict[str, torch.Tensor] = field(default_factory=dict)


class Recorder:
    """Attach to a training loop: ``step()`` after every optimizer step, ``close()`` at the end.

    ``probes``: inputs [P, ...] (one tensor, or a dict of named tensors [P, ...] that the model
    takes as keyword arguments, such as ``input_ids`` and ``attention_mask``) and targets, [P]
    int64 classes (classification) or [P, C] floats (regression). The model returns its outputs
    [N, C] as a tensor or as the ``logits`` of what it returns (Hugging Face models). ``model`` must be what ``build_model(model_spec)`` builds (same parameter and
    buffer names and shapes), or that module wrapped by ``DistributedDataParallel`` or
    ``torch.compile``; a model sharded by FSDP (1 or 2) is refused. Under ``torch.distributed``
    only global rank 0 records: on other ranks the recorder counts steps and writes nothing.
    ``optimizer`` may be None: then snapshots hold no optimizer state.
    Step 0 (the weights now) is snapshotted at construction, the last step by ``close()``.
    ``max_in_flight``: snapshots staged at once (default: as many as fit in 64 MiB, 2 to 8).

    Snapshots are written by a writer process (``writer_pid``); its errors are raised by a later
    snapshot (once its answers are read: when the staging slots run out), by ``log_epoch()`` or
    by ``close()``. Written snapshots are listed in the manifest within about a second; when
    the training process dies, the writer still writes every snapshot staged more than a tenth
    of a second before, and at interpreter exit without ``close()`` every staged snapshot is
    written (without a last one).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        probes: tuple[Inputs, torch.Tensor],
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
        model = _unwrap(model)
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
            extra={"schedule": schedule.to_json(), **_frozen(model), **(extra or {})},
        )
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.step_count = 0  # optimizer steps taken so far
        self.epoch = 0  # the epoch of the next step
        self._step_epoch = 0  # the epoch of the last step counted (0 before the first): a snapshot's epoch
        self._closed = False
        # The staged snapshots and the writer, shared with the sender thread; notified when the
        # recorder stops.
        self._lock = threading.Condition()
        self._send_error: Exception | None = None  # what stopped the sender thread
        self._records = not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)
        if not self._records:
            return
        create_run_dir(run_dir, spec, inputs, targets, complete=False)
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
        self._pinning = True  # False once CUDA refused to page-lock a slot: copies are then synchronous
        self._writer = WriterProcess(run_dir, max_in_flight)
        try:
            with self._lock:
                self._snapshot()
                self._send_staged(wait=True)  # step 0 goes out at once
        except BaseException:
            self._stop(raise_error=False)
            raise
        self._sender = threading.Thread(target=self._send_on_time, name="recorder-send", daemon=True)
        self._sender.start()
        atexit.register(self._stop, raise_error=True)

    @property
    def writer_pid(self) -> int:
        """The process id of the writer process (on the rank that records)."""
        return self._writer.process.pid

    # ------------------------------------------------------------------------- training thread

    def step(self, epoch: int | None = None, **metrics: float) -> None:
        """Count one optimizer step, log its metrics and snapshot if the schedule says so.

        The step belongs to ``epoch`` when given; else to the epoch of the step before, or to
        ``e + 1`` after ``log_epoch(e)`` (0 at first). So a loop that calls ``step()`` without
        ``epoch`` and ``log_epoch(e)`` at the end of epoch ``e`` labels the steps of its first
        epoch 0, of the next 1, and so on, as the presets do. A snapshot is labelled with the
        epoch of the step it follows (step 0: epoch 0).

        Metrics should be Python numbers: a CUDA tensor would cost a device synchronization.
        Not allowed during CUDA graph capture (a replayed graph runs no Python: no step would be
        counted): call it after each ``graph.replay()``.
        """
        with self._lock:
            self._check_open()
            if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "Recorder.step() was called during CUDA graph capture: a replayed graph runs no "
                    "Python, so its steps would be neither counted nor recorded; call rec.step() "
                    "outside the captured region, after each graph.replay()"
                )
            self.step_count += 1
            if epoch is not None:
                self.epoch = epoch
            self._step_epoch = self.epoch
            if not self._records:
                return
            self._step_metrics = {k: float(v) for k, v in metrics.items()} if metrics else {}
            if self._step_metrics:
                self._writer.log(
                    {"kind": "step", "step": self.step_count, "epoch": self._step_epoch, **self._step_metrics}
                )
            if self.schedule.due(self.step_count):
                self._snapshot()

    def log_epoch(self, epoch: int, **metrics: float) -> None:
        """Log per-epoch metrics (a ``"kind": "epoch"`` row of ``metrics.jsonl``) at the end of
        epoch ``epoch``: later steps belong to epoch ``epoch + 1`` (unless :meth:`step` says
        otherwise)."""
        with self._lock:
            self._check_open()
            if self._records:
                self._writer.poll()
                row = {"kind": "epoch", "step": self.step_count, "epoch": epoch}
                self._writer.log({**row, **{k: float(v) for k, v in metrics.items()}})
                self._writer.flush_rows()
            self.epoch = epoch + 1

    def close(self) -> None:
        """Snapshot the last step (unless already taken), wait for every write, raise writer errors.
        The manifest then says the recording is complete (``"complete": true``); a recorder
        stopped otherwise (an exception in its ``with`` block, the interpreter's exit, a kill)
        leaves it ``false``."""
        try:
            with self._lock:
                if self._closed:
                    return
                if self._records and self._last_snapshot != self.step_count:
                    self._check_open()
                    self._snapshot()
        except BaseException:
            self._stop(raise_error=False)  # outside the lock: it waits for the sender thread
            raise
        self._stop(raise_error=True, complete=True)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # The weights may be half way through an optimizer step: keep what was recorded, add nothing.
            self._stop(raise_error=False)

    def _check_open(self) -> None:
        """Raise if closed, or what stopped the sender thread (a writer failure)."""
        if self._closed:
            raise RuntimeError("the recorder is closed")
        if self._send_error is not None:
            raise self._send_error

    def _stop(self, raise_error: bool, complete: bool = False) -> None:
        """Send what is staged, release the shared memory once no copy into it runs, let the
        writer finish (also at interpreter exit, when ``close()`` was not called); once.
        ``complete``: training finished (``close()``). The sender thread has ended when this
        returns (none may run while the interpreter exits)."""
        try:
            self._stop_locked(raise_error, complete)
        finally:
            sender = getattr(self, "_sender", None)
            if sender is not None and sender.is_alive() and threading.current_thread() is not sender:
                sender.join()

    def _stop_locked(self, raise_error: bool, complete: bool) -> None:
        """:meth:`_stop` under the lock shared with the sender thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify()  # the sender thread ends
            if not self._records:
                return
            atexit.unregister(self._stop)
            sent = False
            try:
                self._send_staged(wait=True)
                sent = True
            finally:
                try:
                    self._wait_for_copies()
                    for views in self._slot_views.values():
                        if views.pinned:
                            _unpin(views.payload)
                    self._slot_views.clear()
                finally:  # after a failed send, its error is the one raised
                    self._writer.close(raise_error=raise_error and sent, complete=complete and sent)

    def _send_on_time(self) -> None:
        """The sender thread: send staged snapshots (whose copies are done) at most
        :data:`SEND_SECONDS` after staging, even when no later ``step()`` comes; until the
        recorder stops or a send fails (raised by the next ``step()``). Nothing wakes it: it
        sleeps until the oldest staged snapshot is due (:data:`SEND_SECONDS` when none is), so
        staging costs the training thread no hand-over to it."""
        with self._lock:
            while not self._closed:
                oldest = self._staged[0].staged_at if self._staged else time.monotonic()
                due = oldest + SEND_SECONDS - time.monotonic()
                if due > 0:
                    self._lock.wait(due)
                    continue
                try:
                    self._send_staged(wait=False)
                except Exception as e:  # noqa: BLE001 - raised on the training thread
                    self._send_error = e
                    return
                if self._staged:  # its copies still run on a GPU
                    self._lock.wait(COPY_POLL_SECONDS)

    def _wait_for_copies(self) -> None:
        """Wait for every copy queued on the side streams (before a slot is reused or unpinned)."""
        for side in self._streams.values():
            side.synchronize()

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
            staging = self._views(slot, remapped, tensors, layout)
            with torch.no_grad():
                events = self._copy(tensors, staging.views, staging.pinned)
        except BaseException:  # an error on another device, Ctrl-C: copies may be in flight
            self._wait_for_copies()
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
                self._step_epoch,
                lr if isinstance(lr, float | int) else None,
                self._step_metrics,
                events,
                time.monotonic(),
            )
        )
        self._last_snapshot = self.step_count
        if len(self._staged) >= max(1, self._writer.usable(layout.nbytes) // 2):
            self._send_staged(wait=False)

    def _views(
        self, slot: int, remapped: bool, tensors: dict[str, torch.Tensor], layout: SnapshotLayout
    ) -> _SlotViews:
        """Slot ``slot``'s shared memory with the tensors of ``layout`` (the current one) as its
        views, pinned when some tensor is on a GPU (unless CUDA refused to pin before)."""
        cached = self._slot_views.get(slot)
        cuda = any(t.is_cuda for t in tensors.values())
        if cached is None or remapped or (cuda and self._pinning and not cached.pinned):
            if cached is not None and cached.pinned:
                _unpin(cached.payload)
            payload = torch.frombuffer(self._writer.buffers[slot].map, dtype=torch.uint8)
            pinned = cuda and self._pinning and _pin(payload)
            if cuda and not pinned:
                self._pinning = False  # ordinary copies from now on
            cached = self._slot_views[slot] = _SlotViews(payload, pinned)
        if cached.layout is not layout:
            cached.layout, cached.views = layout, layout.views(cached.payload)
        return cached

    def _copy(
        self, tensors: dict[str, torch.Tensor], views: dict[str, torch.Tensor], pinned: bool
    ) -> list[torch.cuda.Event]:
        """Copy ``tensors`` into their ``views`` (``pinned``: page-locked): CPU ones now, CUDA ones
        on a side stream per device, asynchronously into pinned views; the returned events (one a
        device, none without CUDA tensors) fire when each device's copies are done."""
        on_cuda: dict[torch.device, list[str]] = {}
        on_cpu: list[str] = []
        for name, t in tensors.items():
            (on_cuda.setdefault(t.device, []) if t.is_cuda else on_cpu).append(name)
        if on_cpu:  # one call for all (the loop's per-call overhead dominates small models)
            torch._foreach_copy_([views[name] for name in on_cpu], [tensors[name] for name in on_cpu])
        events = []
        for device, names in on_cuda.items():
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            side, current = self._streams[device], torch.cuda.current_stream(device)
            side.wait_stream(current)  # the copies see every update queued so far
            with torch.cuda.stream(side):
                for name in names:
                    views[name].copy_(tensors[name], non_blocking=pinned)
            current.wait_stream(side)  # later training work cannot overwrite a tensor mid-copy
            event = torch.cuda.Event()
            event.record(side)
            events.append(event)
        return events

    def _send_staged(self, wait: bool) -> None:
        """Hand the staged snapshots whose copies are complete to the writer, in step order, with
        one write (``wait``: wait for the copies). The recorder calls it once half the usable
        slots are staged, and its sender thread once the oldest staged snapshot is
        :data:`SEND_SECONDS` old: one wake-up of the writer for several snapshots."""
        ready = 0
        for staged in self._staged:
            if not wait and not all(event.query() for event in staged.events):
                break
            for event in staged.events:
                event.synchronize()
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


def _pin(payload: torch.Tensor) -> bool:
    """Page-lock shared memory ``payload`` (uint8 [capacity]) for asynchronous device-to-host
    copies (as torch's own distributed checkpoint stager does). When CUDA refuses (a limit on
    locked memory, say), warn, clear the error CUDA keeps (the next CUDA call would raise it) and
    return False: copies into it are then synchronous."""
    cudart = torch.cuda.cudart()
    code = int(cudart.cudaHostRegister(payload.data_ptr(), payload.numel(), 1))
    if code == 0:
        return True
    cudart.cudaGetLastError()
    warnings.warn(
        f"could not page-lock the recorder's shared memory (cudaError {code}): GPU snapshots are "
        "copied synchronously",
        RuntimeWarning,
        stacklevel=2,
    )
    return False


def _unpin(payload: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(payload.data_ptr())


def _imported(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that module was imported, else None: no model holds an
    instance of a class never imported (and importing these costs seconds)."""
    return getattr(sys.modules.get(module), name, None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module to record: ``model`` itself, or the module it wraps for DistributedDataParallel
    or ``torch.compile`` (whose parameters are the wrapped module's under a prefix). A model
    sharded by FSDP (FSDP1 modules, FSDP2's DTensor parameters) is refused: its parameters are
    flattened or sharded, not the model's."""
    compiled = _imported("torch._dynamo.eval_frame", "OptimizedModule")
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model.get_submodule("_orig_mod")
        else:
            break
    sharded = tuple(cls for module, name in _SHARDED if (cls := _imported(module, name)) is not None)
    if any(isinstance(x, sharded) for x in [*model.modules(), *model.parameters(), *model.buffers()]):
        raise ValueError(
            "Recorder cannot record a model sharded by FSDP: gather a full state dict on rank 0 "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict with "
            "StateDictOptions(full_state_dict=True, cpu_offload=True)), load it into an unsharded "
            "copy of the model and record that copy"
        )
    return model


def _frozen(model: nn.Module) -> dict[str, list[str]]:
    """``{"frozen": [names]}`` of the parameters training does not update (``requires_grad=False``,
    as with adapters), which replay then holds fixed; nothing when every parameter trains."""
    names = [name for name, p in model.named_parameters() if not p.requires_grad]
    return {"frozen": names} if names else {}


def _check_model(model: nn.Module, spec: ModelSpec, inputs: Inputs) -> int:
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

"""The recorder's GPU paths on a CPU, and what it promises about flushing and wrapped models.

GPUs are faked: :class:`FakeGpuTensor` is a CPU tensor that says it lies on ``cuda:<gpu>``, and
:class:`FakeCuda` stands for ``torch.cuda``'s streams, events and runtime, with copies that finish
when a test says so. Flushing is tested in forks of the test process (one slow test runs a real
script), wrapped models with real ``torch.compile``, DDP and FSDP on a gloo group of one process.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from recorder import Recorder, RunDir, Schedule
from recorder.models import build_model
from recorder.recorder import SEND_SECONDS
from tests.helpers import wait_for_writers
from tests.test_recorder import BN_SPEC, _recorder

ROOT = Path(__file__).resolve().parent.parent
FORK = multiprocessing.get_context("fork")  # a fresh interpreter would spend seconds importing torch


# ----------------------------------------------------------------------------- fake GPUs


class FakeGpuTensor(torch.Tensor):
    """A CPU tensor that says it lies on ``cuda:<gpu>`` (``is_cuda``, ``device``); records the
    ``non_blocking`` of every copy from it in ``copies``."""

    gpu: int
    copies: list[bool] = []

    @property
    def is_cuda(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.gpu)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            cls.copies.append(kwargs.get("non_blocking", False))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def on_gpus(model: nn.Module, gpus: int) -> SimpleNamespace:
    """``model`` as the recorder sees it when split over ``gpus`` GPUs: its tensors (the same
    storage) in order, the first share on ``cuda:0``, the next on ``cuda:1``, ..."""
    named = [
        *(("p", n, t) for n, t in model.named_parameters()),
        *(("b", n, t) for n, t in model.named_buffers()),
    ]
    fakes: dict[str, list[tuple[str, torch.Tensor]]] = {"p": [], "b": []}
    for i, (kind, name, t) in enumerate(named):
        fake = t.detach().as_subclass(FakeGpuTensor)
        fake.gpu = i * gpus // len(named)
        fakes[kind].append((name, fake))
    return SimpleNamespace(named_parameters=lambda: fakes["p"], named_buffers=lambda: fakes["b"])


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.device, self.fired = cuda, None, False

    def record(self, stream: FakeStream) -> None:
        self.device = stream.device
        self.cuda.events.append(self)

    def query(self) -> bool:
        return self.fired

    def synchronize(self) -> None:
        if self.cuda.interrupt_sync:
            raise KeyboardInterrupt
        self.fired = True


class FakeStream:
    def __init__(self, cuda: FakeCuda, device: torch.device) -> None:
        if device.index in cuda.broken:
            raise RuntimeError(f"CUDA error on {device}: out of memory")
        self.cuda, self.device = cuda, device

    def wait_stream(self, other: FakeStream) -> None:
        pass

    def synchronize(self) -> None:
        self.cuda.finish(self.device.index)
        self.cuda.synchronized.add(self.device.index)


class FakeCuda:
    """``torch.cuda`` as the recorder uses it. Copies run until :meth:`finish` (or a
    synchronization); ``register_code``: what cudaHostRegister answers; ``broken``: GPUs whose
    side stream cannot be created; ``interrupt_sync``: event synchronizations raise
    KeyboardInterrupt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[FakeEvent] = []
        self.synchronized: set[int] = set()  # GPUs whose side stream was synchronized
        self.register_code = 0
        self.registered = 0  # cudaHostRegister calls
        self.unregistered_after: list[set[int]] = []  # at each cudaHostUnregister, ``synchronized``
        self.errors_cleared = 0
        self.broken: set[int] = set()
        self.interrupt_sync = False
        monkeypatch.setattr(torch.cuda, "Stream", lambda device: FakeStream(self, torch.device(device)))
        monkeypatch.setattr(
            torch.cuda, "current_stream", lambda device: FakeStream(self, torch.device(device))
        )
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "Event", lambda: FakeEvent(self))
        monkeypatch.setattr(torch.cuda, "cudart", lambda: self)
        FakeGpuTensor.copies = []

    def finish(self, gpu: int) -> None:
        """The copies queued so far on ``cuda:<gpu>`` are done."""
        for event in self.events:
            if event.device is not None and event.device.index == gpu:
                event.fired = True

    def cudaHostRegister(self, pointer: int, nbytes: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.registered += 1
        return self.register_code

    def cudaHostUnregister(self, pointer: int) -> int:  # noqa: N802
        self.unregistered_after.append(set(self.synchronized))
        return 0

    def cudaGetLastError(self) -> int:  # noqa: N802
        self.errors_cleared += 1
        return 0


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    return FakeCuda(monkeypatch)


def assert_recorded(run_dir: Path, model: nn.Module, steps: list[int]) -> None:
    """The manifest lists ``steps``; the last snapshot holds ``model``'s tensors exactly."""
    run = RunDir(run_dir)
    assert [e.step for e in run.manifest] == steps
    snapshot = run.load_snapshot(run.manifest[-1])
    for name, t in model.named_parameters():
        assert torch.equal(snapshot.params[name], t.detach()), name
    for name, t in model.named_buffers():
        assert torch.equal(snapshot.buffers[name], t), name


# ----------------------------------------------------------------------------- copies on GPUs


def test_a_snapshot_on_two_gpus_is_sent_only_once_both_copies_are_done(tmp_path, fake_cuda, monkeypatch):
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None, max_in_flight=4)
    sent: list[int] = []
    send = rec._writer.send_snapshots
    monkeypatch.setattr(
        rec._writer,
        "send_snapshots",
        lambda snapshots: (sent.extend(s["step"] for s in snapshots), send(snapshots)),
    )
    rec.model = on_gpus(model, 2)
    rec.step()
    fake_cuda.finish(1)  # the last GPU's copies are done, cuda:0's still run
    time.sleep(3 * SEND_SECONDS)  # the time to send it came
    rec.log_epoch(0)
    assert sent == []
    fake_cuda.finish(0)
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:  # now it goes out
        time.sleep(0.01)
    assert sent == [1]
    rec.close()
    assert FakeGpuTensor.copies and all(FakeGpuTensor.copies)  # pinned: asynchronous copies
    assert_recorded(tmp_path / "run", model, [0, 1])


def test_a_failed_copy_frees_its_slot_only_after_the_copies_it_queued(tmp_path, fake_cuda, monkeypatch):
    """An error on the second GPU (or Ctrl-C) after copies were queued on the first."""
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None, max_in_flight=4)
    rec.model = on_gpus(model, 2)
    fake_cuda.broken.add(1)
    freed_after = []
    release = rec._writer.release
    monkeypatch.setattr(
        rec._writer, "release", lambda slot: (freed_after.append(set(fake_cuda.synchronized)), release(slot))
    )
    with pytest.raises(RuntimeError, match="CUDA error on cuda:1"):
        rec.step()
    assert freed_after == [{0}]  # cuda:0's side stream was waited for
    rec.model = model
    rec.close()
    assert_recorded(tmp_path / "run", model, [0, 1])


def test_closing_unpins_the_slots_only_after_their_copies(tmp_path, fake_cuda):
    """Ctrl-C while ``close()`` waits for the copies: the slots are unpinned once none runs."""
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None, max_in_flight=4)
    rec.model = on_gpus(model, 2)
    rec.step()
    fake_cuda.interrupt_sync = True
    with pytest.raises(KeyboardInterrupt):
        rec.close()
    assert fake_cuda.unregistered_after == [{0, 1}]


def test_a_slot_that_cuda_cannot_pin_is_copied_synchronously(tmp_path, fake_cuda):
    fake_cuda.register_code = 2  # cudaErrorMemoryAllocation
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None, max_in_flight=4)
    rec.model = on_gpus(model, 1)
    with pytest.warns(RuntimeWarning, match="could not page-lock"):
        rec.step()
    rec.step()
    rec.close()
    assert fake_cuda.registered == 1 and fake_cuda.errors_cleared == 1  # tried once, error cleared
    assert fake_cuda.unregistered_after == []
    assert FakeGpuTensor.copies and not any(FakeGpuTensor.copies)
    assert_recorded(tmp_path / "run", model, [0, 1, 2])


def test_step_during_cuda_graph_capture_is_refused(tmp_path, monkeypatch):
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="during CUDA graph capture"):
        rec.step()
    assert rec.step_count == 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    rec.step()
    rec.close()
    assert_recorded(tmp_path / "run", model, [0, 1])


# ----------------------------------------------------------------------------- flushing


def _exit_abruptly(run_dir: str) -> None:
    """Stage, wait half a second, exit without any exit handler."""
    rec = _staged_recorder(run_dir)
    time.sleep(0.5)
    os._exit(0 if rec.step_count == 3 else 1)


def _end_script(run_dir: str) -> None:
    """Stage, then what the interpreter does when a script ends: run the exit handlers."""
    atexit._clear()  # the test process's own handlers are not this script's
    _staged_recorder(run_dir)
    atexit._run_exitfuncs()
    os._exit(0)


def _staged_recorder(run_dir: str) -> Recorder:
    """A recorder of the tiny BN model with step 0 written and steps 1 to 3 staged: fewer than
    half its slots, so no later ``step()`` would send them; never closed."""
    torch.set_num_threads(1)
    model = build_model(BN_SPEC)
    rec = _recorder(run_dir, model, None, Schedule.every(1), max_in_flight=8)
    for _ in range(3):
        rec.step()
    return rec


@pytest.mark.parametrize("end", [_exit_abruptly, _end_script])
def test_every_staged_snapshot_is_written_when_the_process_ends_without_close(tmp_path, end):
    proc = FORK.Process(target=end, args=(str(tmp_path / "run"),))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 0
    wait_for_writers(tmp_path / "run")
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0, 1, 2, 3]


@pytest.mark.slow
def test_a_script_that_ends_without_close_writes_every_staged_snapshot(tmp_path):
    script = f"from tests.test_recorder_gpu_paths import _staged_recorder; rec = _staged_recorder({str(tmp_path / 'run')!r})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, check=True, timeout=120)
    wait_for_writers(tmp_path / "run")
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- wrapped models


@pytest.mark.slow  # importing torch._dynamo takes seconds
def test_a_compiled_model_is_recorded_under_its_own_names(tmp_path):
    model = build_model(BN_SPEC)
    compiled = torch.compile(model)  # lazy: nothing is compiled before its first call
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1, momentum=0.9)
    with _recorder(tmp_path / "run", compiled, optimizer) as rec:
        model(torch.randn(4, 6)).sum().backward()
        optimizer.step()
        rec.step()
    assert_recorded(tmp_path / "run", model, [0, 1])


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one process (rank 0), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_is_recorded_as_its_module_on_rank_0_only(tmp_path, process_group, monkeypatch):
    model = build_model(BN_SPEC)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    with _recorder(tmp_path / "run", ddp, optimizer) as rec:
        ddp(torch.randn(4, 6)).sum().backward()
        optimizer.step()
        rec.step()
    assert_recorded(tmp_path / "run", model, [0, 1])
    assert set(RunDir(tmp_path / "run").load_snapshot(RunDir(tmp_path / "run").manifest[-1]).optimizer.state)

    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    with _recorder(tmp_path / "rank1", ddp, optimizer) as rec:
        rec.step(loss=1.0)
        rec.log_epoch(0, loss=1.0)
    assert rec.step_count == 1 and not (tmp_path / "rank1").exists()
    with pytest.raises(RuntimeError, match="closed"):
        rec.step()


def test_models_sharded_by_fsdp_are_refused_with_what_to_do(tmp_path, process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FSDP1 switches to NO_SHARD on one process
        fsdp1 = FullyShardedDataParallel(build_model(BN_SPEC), device_id=torch.device("cpu"))
    fsdp2 = fully_shard(build_model(BN_SPEC), mesh=dist.device_mesh.init_device_mesh("cpu", (1,)))
    for model in (fsdp1, fsdp2):
        with pytest.raises(ValueError, match=r"sharded by FSDP: gather a full state dict on rank 0") as e:
            _recorder(tmp_path / "run", model, None)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()

"""The recorder's overhead on a training step (reported by ``cli.py bench``).

One model trains with one recorder attached (snapshots every 9 steps) in blocks of ``steps``
optimizer steps; each round times a block that calls ``recorder.step()`` and a block that does
not, in random order. The overhead is the median over rounds of the ratio of the two block times,
minus one: pairing adjacent blocks cancels the drift of a shared machine. After each recorded
block the writer process writes and lists its snapshots, whose files are then deleted: no block
runs beside another's writes, and the disk holds one block's snapshots at a time (a block is
shortened to fit half the free disk, :func:`steps_that_fit`).

The overhead, end to end, is reported in two parts: the share of the step spent inside
``recorder.step()`` (staging: the copies into the writer's shared memory, and any wait for a free
slot), read off the recorded blocks alone; and the rest, spent outside it (the writer process
writing to the disk beside training: memory traffic, page cache, CPU). Beside them, the seconds
from the end of a recorded block until its last snapshot is written (the recorder's batching of
sends included): the writing that training does not wait for.

Cases: the digits MLP on a CPU (batch 32, one thread, as its preset trains) and the paper's
ResNet-18 on a GPU (batch 256, 32x32 inputs, 3 classes).
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from recorder.datasets import digits
from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.recorder import Recorder
from recorder.rundir.run import RunDir
from recorder.rundir.spec import ModelSpec
from recorder.rundir.trajectory import snapshot_filename
from recorder.schedule import Schedule
from recorder.training import torch_threads

SNAPSHOT_EVERY = 9
SETTLE_SECONDS = 300  # longest wait for the writer to list a block's snapshots


def _data(device: torch.device) -> tuple[ModelSpec, torch.Tensor, torch.Tensor, int]:
    """The case of ``device``: spec, inputs [N, ...], classes [N] and the batch size."""
    if device.type == "cuda":
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(3, (2048,), generator=generator)
        images = torch.randn((2048, 3, 32, 32), generator=generator) + 0.5 * (labels.float() - 1).view(
            -1, 1, 1, 1
        )
        return ModelSpec("resnet18_nonorm", {"num_outputs": 3}), images, labels, 256
    x, y, _, _ = digits()
    return ModelSpec("mlp", {"in_features": 64, "num_outputs": 10, "hidden": [128]}), x, y, 32


def steps_that_fit(steps: int, snapshot_bytes: int, free: int) -> int:
    """``steps``, or the largest multiple of :data:`SNAPSHOT_EVERY` below it whose snapshots, with
    the one left from before the block, fit half of ``free`` bytes of disk (``snapshot_bytes``
    each). Raises :class:`ValueError` for blocks shorter than :data:`SNAPSHOT_EVERY` (some would
    record nothing) and :class:`OSError` where not even one snapshot a block fits."""
    if steps < SNAPSHOT_EVERY:
        raise ValueError(
            f"recorder overhead: blocks of {steps} steps, fewer than one snapshot's {SNAPSHOT_EVERY}"
        )
    snapshots = free // 2 // snapshot_bytes - 1
    if snapshots < 1:
        raise OSError(
            f"recorder overhead: {free / 1e9:.3g} GB of free disk, too little for snapshots of "
            f"{snapshot_bytes / 1e9:.3g} GB"
        )
    return min(steps, snapshots * SNAPSHOT_EVERY)


def _settle(run: Path, step: int) -> float:
    """Wait until the writer has written the snapshot of ``step`` into the run directory ``run``
    and listed it with every one before it, then delete their files (the writer makes a file
    durable before listing it, so a listed file is done with). Returns the seconds until the
    snapshot was written."""
    start = time.perf_counter()
    deadline = time.monotonic() + SETTLE_SECONDS
    written = None
    while time.monotonic() < deadline:
        if written is None and (run / snapshot_filename(step)).exists():
            written = time.perf_counter() - start
        listed = RunDir(run).manifest
        if written is not None and listed and listed[-1].step >= step:
            for entry in listed:
                (run / entry.file).unlink(missing_ok=True)
            return written
        time.sleep(0.001 if written is None else 0.01)
    raise TimeoutError(f"recorder overhead: the writer did not list step {step} within {SETTLE_SECONDS} s")


def recorder_overhead(device: torch.device, steps: int = 90, rounds: int = 30) -> dict[str, Any]:
    """Median step time without the recorder and with it (seconds); the overhead end to end (their
    paired ratio minus one) and its parts as shares of the plain step: inside ``recorder.step()``
    (``inside_step``) and outside it (``outside_step``); the seconds from the end of a recorded
    block until its last snapshot is written (``write_seconds``); the block length ``steps`` (after
    :func:`steps_that_fit`) and the bytes of a snapshot."""
    torch.manual_seed(0)
    spec, x, y, batch = _data(device)
    x, y = x.to(device), y.to(device)
    model = build_model(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    # the weights, buffers and Adam's two moments of every parameter
    snapshot_bytes = sum(t.nbytes for t in model.state_dict().values()) + 2 * sum(
        p.nbytes for p in model.parameters()
    )
    steps = steps_that_fit(steps, snapshot_bytes, shutil.disk_usage(tempfile.gettempdir()).free)
    generator = torch.Generator().manual_seed(1)
    order = random.Random(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def block(recorder: Recorder | None) -> tuple[float, float]:
        """Seconds for ``steps`` steps, and of those, seconds inside ``recorder.step()``."""
        batches = torch.randint(len(x), (steps, batch), generator=generator).to(device)
        inside = 0.0
        sync()
        start = time.perf_counter()
        for index in batches:
            optimizer.zero_grad(set_to_none=True)
            batch_loss("cross_entropy", model(x[index]), y[index]).backward()
            optimizer.step()
            if recorder is not None:
                before = time.perf_counter()
                recorder.step()
                inside += time.perf_counter() - before
        sync()
        return time.perf_counter() - start, inside

    plain, recorded, ratios, inside, outside, written = [], [], [], [], [], []
    with torch_threads(1 if device.type == "cpu" else None), tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        probes = (x[:30].cpu(), y[:30].cpu())
        schedule = Schedule.every(SNAPSHOT_EVERY)
        with Recorder(
            run, model, optimizer, probes, spec, "classification", "cross_entropy", schedule
        ) as rec:

            def recorded_block() -> tuple[float, float, float]:
                """:func:`block` with ``rec``, and the seconds until its last snapshot was written."""
                seconds, inside_step = block(rec)
                return seconds, inside_step, _settle(run, rec.step_count // SNAPSHOT_EVERY * SNAPSHOT_EVERY)

            block(None), recorded_block()  # warm-up
            for _ in range(rounds):
                pair = {}
                for with_recorder in order.sample([False, True], 2):
                    time.sleep(0.05)  # the same pause before every block
                    pair[with_recorder] = recorded_block() if with_recorder else (*block(None), 0.0)
                plain.append(pair[False][0])
                recorded.append(pair[True][0])
                inside.append(pair[True][1] / pair[False][0])
                ratios.append(pair[True][0] / pair[False][0])
                outside.append(ratios[-1] - 1 - inside[-1])
                written.append(pair[True][2])
    return {
        "model": spec.factory,
        "device": str(device),
        "snapshot_every": SNAPSHOT_EVERY,
        "step_seconds": statistics.median(plain) / steps,
        "step_seconds_recorded": statistics.median(recorded) / steps,
        "overhead": statistics.median(ratios) - 1,
        "inside_step": statistics.median(inside),
        "outside_step": statistics.median(outside),
        "write_seconds": statistics.median(written),
        "steps": steps,
        "rounds": rounds,
        "snapshot_bytes": snapshot_bytes,
    }

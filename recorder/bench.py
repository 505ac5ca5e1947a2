"""The recorder's overhead on a training step (reported by ``cli.py bench``).

One model trains with one recorder attached (snapshots every 9 steps) in blocks of ``steps``
optimizer steps; each round times a block that calls ``recorder.step()`` and a block that does
not, in random order, after a pause that lets the writer process finish the previous block's
writes. The overhead is the median over rounds of the ratio of the two block times, minus one:
pairing adjacent blocks cancels the drift of a shared machine. It is reported beside the time
spent inside ``recorder.step()`` itself (the staging copies), a lower bound read off the
recorded blocks alone.

Cases: the digits MLP on a CPU (batch 32, one thread, as its preset trains) and the paper's
ResNet-18 on a GPU (batch 256, 32x32 inputs, 3 classes).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from typing import Any

import torch

from recorder.datasets import digits
from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.recorder import Recorder
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import torch_threads

SNAPSHOT_EVERY = 9


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


def recorder_overhead(device: torch.device, steps: int = 90, rounds: int = 30) -> dict[str, Any]:
    """Median step time without the recorder and with it (seconds), the overhead (their paired
    ratio minus one) and the share of the step spent in ``recorder.step()``."""
    torch.manual_seed(0)
    spec, x, y, batch = _data(device)
    x, y = x.to(device), y.to(device)
    model = build_model(spec).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
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

    plain, recorded, ratios, inside = [], [], [], []
    with torch_threads(1 if device.type == "cpu" else None), tempfile.TemporaryDirectory() as tmp:
        probes = (x[:30].cpu(), y[:30].cpu())
        schedule = Schedule.every(SNAPSHOT_EVERY)
        with Recorder(
            tmp + "/run", model, optimizer, probes, spec, "classification", "cross_entropy", schedule
        ) as rec:
            block(None), block(rec)  # warm-up
            for _ in range(rounds):
                pair = {}
                for with_recorder in order.sample([False, True], 2):
                    time.sleep(0.05)  # the writer process finishes the previous block
                    pair[with_recorder] = block(rec if with_recorder else None)
                plain.append(pair[False][0])
                recorded.append(pair[True][0])
                inside.append(pair[True][1] / pair[False][0])
                ratios.append(pair[True][0] / pair[False][0])
    return {
        "model": spec.factory,
        "device": str(device),
        "snapshot_every": SNAPSHOT_EVERY,
        "step_seconds": statistics.median(plain) / steps,
        "step_seconds_recorded": statistics.median(recorded) / steps,
        "overhead": statistics.median(ratios) - 1,
        "inside_step": statistics.median(inside),
    }

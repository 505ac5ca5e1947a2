"""Shared builders of the replay tests: tiny models, probe sets, optimizer records and run
directories written with :class:`recorder.runfiles.RunWriter`, and a wait for the recorder's
writer processes (no tests in here)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.rundir.run import RunWriter
from recorder.rundir.snapshot import OptimizerRecord, Snapshot
from recorder.rundir.spec import ModelSpec, RunSpec

NUM_CLASSES = 3
MODEL_SPECS = {
    "mlp": ModelSpec("mlp", {"in_features": 6, "num_outputs": NUM_CLASSES, "hidden": [8]}),
    "small_cnn": ModelSpec(
        "small_cnn", {"in_channels": 1, "num_outputs": NUM_CLASSES, "width": 2, "image_size": 6}
    ),
}
INPUT_SHAPES = {"mlp": (6,), "small_cnn": (1, 6, 6)}


def make_model(factory: str, seed: int = 0, num_outputs: int = NUM_CLASSES) -> nn.Module:
    """A float64 model of the tiny ``factory`` spec, seeded."""
    torch.manual_seed(seed)
    spec = MODEL_SPECS[factory]
    return build_model(ModelSpec(spec.factory, spec.kwargs | {"num_outputs": num_outputs})).double()


def make_probes(factory: str, per_class: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[P, ...]`` float64 and balanced class labels ``[P]`` (P = 3 * per_class)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    inputs = torch.randn((len(labels), *INPUT_SHAPES[factory]), generator=g, dtype=torch.float64)
    return inputs + labels.view(-1, *[1] * len(INPUT_SHAPES[factory])), labels


def run_spec(
    factory: str, task: str = "classification", loss: str = "cross_entropy", optimizer=None
) -> RunSpec:
    return RunSpec(MODEL_SPECS[factory], task=task, loss=loss, num_outputs=NUM_CLASSES, optimizer=optimizer)


def optimizer_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerRecord:
    """The optimizer as the recorder stores it: state and groups keyed by parameter name,
    hyperparameters JSON-safe (round-tripped through JSON)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        json.loads(json.dumps({k: v for k, v in g.items() if k != "params"}))
        | {"params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    state = {
        names[id(p)]: {k: v.detach().clone() for k, v in s.items() if isinstance(v, torch.Tensor)}
        for p, s in optimizer.state.items()
    }
    return OptimizerRecord(type=type(optimizer).__name__, groups=groups, state=state)


def snapshot(model: nn.Module, step: int, optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
    return Snapshot(
        step=step,
        params={n: p.detach().clone() for n, p in model.named_parameters()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        optimizer=optimizer_record(model, optimizer) if optimizer is not None else None,
    )


def train_steps(model: nn.Module, optimizer, loss: str, inputs, targets, steps: int, seed: int = 2) -> None:
    """``steps`` real optimizer steps on random mini-batches of 4."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(len(inputs), (4,), generator=g)
        optimizer.zero_grad()
        batch_loss(loss, model(inputs[batch]), targets[batch]).backward()
        optimizer.step()


def make_run(
    path: Path,
    factory: str = "mlp",
    steps: tuple[int, ...] = (0, 2, 4),
    with_state: bool = True,
    optimizer_cls=torch.optim.Adam,
    per_class: int = 3,
    **optimizer_kwargs,
) -> Path:
    """A classification run directory: ``factory`` trained with ``optimizer_cls``, a snapshot
    (with optimizer state unless ``with_state`` is False) at each of ``steps``."""
    model = make_model(factory)
    inputs, targets = make_probes(factory, per_class)
    optimizer = optimizer_cls(model.parameters(), **(optimizer_kwargs or {"lr": 1e-2}))
    writer = RunWriter(path, run_spec(factory, optimizer=optimizer_cls.__name__), inputs, targets)
    done = 0
    for step in steps:
        train_steps(model, optimizer, "cross_entropy", inputs, targets, step - done, seed=step)
        done = step
        writer.add_snapshot(snapshot(model, step, optimizer if with_state else None), epoch=step // 2)
    return path


def wait_for_writers(run_dir: Path, timeout: float = 60) -> None:
    """Wait until no recorder writer process of ``run_dir`` runs (after its training process was
    killed, the writer finishes what it was sent, then exits): found by its command line."""
    needle = f"recorder.writer\0{run_dir}\0".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = False
        for proc in Path("/proc").iterdir():
            try:
                if needle in (proc / "cmdline").read_bytes():
                    alive = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except (OSError, IndexError):
                continue
            if alive:
                break
        if not alive:
            return
        time.sleep(0.01)
    raise AssertionError(f"the writer of {run_dir} did not exit")

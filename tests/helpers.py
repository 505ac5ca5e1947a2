"""Helpers shared by the test modules (fixtures live in ``conftest.py``): small models, probe
sets, snapshots and run directories written with :class:`recorder.rundir.run.RunWriter`, a wait
for the recorder's writer processes, and synthetic replay stores written through
:class:`replay.store.ReplayStore` with known values."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path
from unittest.mock import patch

import numpy as np
import torch
from torch import nn

import replay.store
from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.rundir.files import atomic_write_json
from recorder.rundir.run import RunWriter
from recorder.rundir.snapshot import OptimizerRecord, Snapshot, SnapshotEntry
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.config import ReplayConfig
from replay.engine import SnapshotResult
from replay.store import ReplayStore

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


# ----------------------------------------------------------------------------- replay stores


def make_run_dir(path, task="classification", metrics=()):
    """A run directory with ``spec.json`` and ``metrics.jsonl`` (no snapshots: analyses need none)."""
    path.mkdir(parents=True, exist_ok=True)
    loss = "cross_entropy" if task == "classification" else "mse"
    spec = RunSpec(
        ModelSpec("mlp", {"in_features": 4, "num_outputs": 3}), task=task, loss=loss, num_outputs=3
    )
    atomic_write_json(path / "spec.json", spec.to_json())
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in metrics))
    return path


def write_store(path, measures, targets, done, steps, include_self=False, classpairs=None):
    """Write a replay store through :class:`replay.store.ReplayStore`, as a replay would.

    ``measures``: name -> ``[S, P, P]``, stored at the snapshots ``s`` where ``done[s]``; ``steps``
    ``[S]`` (epoch ``step // 10``); ``targets``: int ``[P]`` (classification) or float ``[P, C]``;
    ``classpairs``: name -> stat -> ``[S, K, K]`` stored instead of the measures' aggregates.
    """
    targets = torch.as_tensor(np.asarray(targets))
    task, loss, C = (
        ("classification", "cross_entropy", 3)
        if targets.ndim == 1
        else ("regression", "mse", targets.shape[1])
    )
    spec = RunSpec(
        ModelSpec("mlp", {"in_features": 4, "num_outputs": C}), task=task, loss=loss, num_outputs=C
    )
    config = ReplayConfig(measures=tuple(measures), precision="float64", include_self=include_self)
    entries = [SnapshotEntry(int(t), int(t) // 10, f"snapshots/step_{t}.safetensors", "", 0) for t in steps]
    store = ReplayStore.prepare(path, config, spec, entries, targets, tuple(measures))
    P = len(targets)
    for s in np.flatnonzero(done):
        result = SnapshotResult(
            base_outputs=torch.zeros(P, C, dtype=torch.float64),
            probe_loss=torch.ones(P, dtype=torch.float64),
            update_norm=torch.ones(P, dtype=torch.float64),
            measures={m: torch.as_tensor(np.asarray(S, dtype=np.float64)[s]) for m, S in measures.items()},
            amplification=torch.ones(P, dtype=torch.float64),
            error_estimate=1e-6,
        )

        def stored_classpairs(S, labels, K, include_self, stat, s=s):  # replay.store.aggregate's [M, K, K]
            return np.stack([classpairs[m][stat][s] for m in measures])

        with patch.object(replay.store, "aggregate", stored_classpairs) if classpairs else nullcontext():
            store.write(int(s), result)


LABELS6 = np.array([0, 0, 1, 1, 2, 2])
# B[a, b]: the value of S[i, j] for class(j) = a (observed), class(i) = b (updated), i != j.
B0 = np.array([[2.0, 1, 1], [1, 4, 2], [1, 1, 3]])
B1 = np.array([[3.0, 2, 1], [1, 5, 1], [2, 2, 6]])


def block_matrix(B, labels):
    """``[P, P]`` with ``S[i, j] = B[class(j), class(i)]`` off the diagonal and 1 on it."""
    S = B[labels[None, :], labels[:, None]].astype(np.float64)
    np.fill_diagonal(S, 1.0)
    return S


def autograd_jacobians(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``df_c(x_j)/dw`` ``[P, C, N]`` of ``model`` on probes ``x`` ``[P, ...]`` (every parameter,
    flattened in order), one probe and one output at a time with plain ``torch.autograd``."""
    rows = []
    for j in range(len(x)):
        out = model(x[j : j + 1])[0]
        rows.append(
            torch.stack(
                [
                    torch.cat(
                        [
                            g.flatten()
                            for g in torch.autograd.grad(o, list(model.parameters()), retain_graph=True)
                        ]
                    )
                    for o in out
                ]
            )
        )
    return torch.stack(rows)

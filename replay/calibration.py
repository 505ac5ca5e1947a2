"""The error estimate against the real error: ``python -m replay.calibration``.

Each stored snapshot carries an ``error_estimate`` (:mod:`replay.check`) that claims to bound the
real error of its measures. This module measures that claim over a matrix of

- models of :mod:`recorder.models` (:data:`MODELS`): an MLP, a small CNN, convolution with batch
  normalization, a self-attention block, a GRU, and ResNet-18 without normalization (only with
  ``--slow``), each trained with Adam (weight decay 1e-4) on random mini-batches of its probes and
  snapshotted after :data:`STAGES` steps (early, and with the probes fitted);
- update rules (:data:`RULES`): ``adam-fresh``, ``sgd`` at three learning rates, ``recorded``;
- precisions (:data:`PRECISIONS`): every mode of :mod:`replay.precision`.

The real error of a replayed snapshot is :func:`replay.check.relative_error` of its measures
against a float64 computation of the same snapshot (the largest, over measures and updated
probes, of the relative error of a row of ``S``); every measure of the task is replayed. That
computation, :meth:`Engine.reference <replay.engine.Engine.reference>`, propagates the changes in
float64 instead of differencing two float64 forward passes: under ``sgd`` at lr 1e-6 a probe that
its training fits barely moves (updates of 1e-11), and the float64 difference itself is then off
by 1e-4, more than ``mixed``. (For a model ``torch.fx`` cannot trace it is the float64 difference.) A ratio real error
/ estimate above 1 is an estimate that does not bound. :func:`main` prints every cell and, per
precision, the smallest, median and largest ratio.
"""

from __future__ import annotations

import argparse
import math
import statistics
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.rundir.snapshot import OptimizerRecord, Snapshot
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.check import relative_error
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine

NUM_CLASSES = 3
STAGES = (3, 60)  # training steps before each snapshot
PRECISIONS = ("float64", "float32", "difference32", "mixed", "auto")
RULES = {
    "adam-fresh": UpdateConfig("adam-fresh", lr=1e-4),
    "sgd-1e-2": UpdateConfig("sgd", lr=1e-2),
    "sgd-1e-4": UpdateConfig("sgd", lr=1e-4),
    "sgd-1e-6": UpdateConfig("sgd", lr=1e-6),
    "recorded": UpdateConfig("recorded"),
}


@dataclass(frozen=True)
class Model:
    """One model of the matrix: ``factory`` of :mod:`recorder.models` with ``kwargs`` (and
    :data:`NUM_CLASSES` outputs), probe inputs ``[P, *shape]`` shifted by their class,
    ``per_class`` probes of each class, trained with Adam at ``lr``."""

    factory: str
    kwargs: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()
    per_class: int = 7
    lr: float = 1e-2
    slow: bool = False  # only with --slow (and in the slow tests)


MODELS = {
    "mlp": Model("mlp", {"in_features": 6, "hidden": [16]}, (6,), per_class=16),
    "small_cnn": Model("small_cnn", {"in_channels": 1, "width": 4, "image_size": 6}, (1, 6, 6)),
    "bn_cnn": Model("bn_cnn", {}, (1, 6, 6)),
    "tiny_attention": Model("tiny_attention", {"in_features": 4}, (3, 4), per_class=4),
    "gru": Model("gru", {"in_features": 3}, (4, 3), per_class=3),
    "resnet18": Model("resnet18_nonorm", {}, (3, 32, 32), per_class=2, lr=1e-3, slow=True),
}


@dataclass
class Trained:
    """A model of the matrix after training: its run spec, probe inputs ``[P, ...]`` and classes
    ``[P]``, and one snapshot (optimizer state included) per stage of :data:`STAGES`."""

    name: str
    spec: RunSpec
    inputs: Tensor
    targets: Tensor
    snapshots: list[Snapshot]


def optimizer_record(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerRecord:
    """``optimizer``'s state and groups keyed by the parameter names of ``model``, as a recorder
    stores them (tensors copied)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"}
        | {"params": [names[id(p)] for p in g["params"]]}
        for g in optimizer.param_groups
    ]
    state = {
        names[id(p)]: {k: v.detach().clone() for k, v in s.items() if isinstance(v, Tensor)}
        for p, s in optimizer.state.items()
    }
    return OptimizerRecord(type=type(optimizer).__name__, groups=groups, state=state)


def train(name: str, stages: Sequence[int] = STAGES, seed: int = 0) -> Trained:
    """Train the model ``name`` of :data:`MODELS` (Adam, weight decay 1e-4, mini-batches of 4 of
    its probes, in train mode; initial weights, probes and batches drawn from ``seed``) and
    snapshot it after each of ``stages`` steps (in eval mode)."""
    m = MODELS[name]
    torch.manual_seed(seed)
    spec = ModelSpec(m.factory, m.kwargs | {"num_outputs": NUM_CLASSES})
    model = build_model(spec)
    generator = torch.Generator().manual_seed(seed + 1)
    targets = torch.arange(NUM_CLASSES).repeat_interleave(m.per_class)
    inputs = torch.randn((len(targets), *m.shape), generator=generator)
    inputs = inputs + targets.view(-1, *[1] * len(m.shape)).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=m.lr, weight_decay=1e-4)
    snapshots, done = [], 0
    for stage in stages:
        model.train()
        for _ in range(stage - done):
            batch = torch.randint(len(targets), (4,), generator=generator)
            optimizer.zero_grad()
            batch_loss("cross_entropy", model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
        done = stage
        model.eval()
        snapshots.append(
            Snapshot(
                step=stage,
                params={k: v.detach().clone() for k, v in model.named_parameters()},
                buffers={k: v.detach().clone() for k, v in model.named_buffers()},
                optimizer=optimizer_record(model, optimizer),
            )
        )
    run_spec = RunSpec(spec, "classification", "cross_entropy", num_outputs=NUM_CLASSES, optimizer="Adam")
    return Trained(name, run_spec, inputs, targets, snapshots)


@dataclass(frozen=True)
class Cell:
    """One cell of the matrix: the real error of the snapshot at ``step`` of ``model`` replayed
    under ``rule`` in ``precision`` (computed in ``arithmetic``), and its ``estimate``."""

    model: str
    step: int
    rule: str
    precision: str
    arithmetic: str
    real: float
    estimate: float

    @property
    def ratio(self) -> float:
        """Real error / estimate: at most 1 where the estimate bounds."""
        return self.real / self.estimate if self.estimate > 0 else math.inf


def cells(trained: Trained, rule: str, precisions: Sequence[str] = PRECISIONS) -> Iterator[Cell]:
    """The cells of ``trained`` under ``rule`` in each of ``precisions``, one per snapshot and
    precision, against the float64 reference of each snapshot (no tolerance refuses a replay)."""

    def engine(precision: str) -> Engine:
        config = ReplayConfig(RULES[rule], precision=precision, tolerance=math.inf)
        return Engine(trained.spec, trained.inputs, trained.targets, config)

    replays = {p: engine(p) for p in precisions}
    for snapshot in trained.snapshots:
        reference = next(iter(replays.values())).reference(snapshot)
        for precision, replayer in replays.items():
            result = replayer.replay_snapshot(snapshot)
            real = relative_error({k: v.double() for k, v in result.measures.items()}, reference)
            yield Cell(
                trained.name,
                snapshot.step,
                rule,
                precision,
                result.arithmetic,
                real,
                result.error_estimate,
            )


def distribution(found: Sequence[Cell]) -> dict[str, tuple[float, float, float]]:
    """Per precision: the smallest, median and largest ratio real error / estimate."""
    ratios: dict[str, list[float]] = {}
    for c in found:
        ratios.setdefault(c.precision, []).append(c.ratio)
    return {p: (min(r), statistics.median(r), max(r)) for p, r in ratios.items()}


def run_matrix(
    models: Sequence[str],
    seeds: int = 1,
    precisions: Sequence[str] = PRECISIONS,
    echo: Callable[[str], None] = print,
) -> list[Cell]:
    """Every cell of ``models``, each trained from ``seeds`` seeds, under every rule, in each of
    ``precisions``, each echoed as it comes."""
    found = []
    echo(
        f"{'model':15} {'seed':>4} {'step':>4} {'rule':10} {'precision':13} {'arithmetic':13}   real estimate ratio"
    )
    for name in models:
        for seed in range(seeds):
            trained = train(name, seed=seed)
            for rule in RULES:
                for c in cells(trained, rule, precisions):
                    found.append(c)
                    echo(
                        f"{c.model:15} {seed:4} {c.step:4} {c.rule:10} {c.precision:13} {c.arithmetic:13} "
                        f"{c.real:.1e} {c.estimate:.1e} {c.ratio:.3f}"
                    )
    return found


def main(argv: Sequence[str] | None = None) -> None:
    """Print the matrix (:func:`run_matrix`) and the distribution of real error / estimate."""
    parser = argparse.ArgumentParser(prog="python -m replay.calibration", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), help="models (default: all but slow ones)"
    )
    parser.add_argument("--slow", action="store_true", help="include ResNet-18 (minutes on a CPU)")
    parser.add_argument("--seeds", type=int, default=1, help="train each model from this many seeds")
    parser.add_argument(
        "--precisions", nargs="+", choices=PRECISIONS, default=PRECISIONS, help="(default: all)"
    )
    args = parser.parse_args(argv)
    models = args.models or [n for n, m in MODELS.items() if args.slow or not m.slow]
    warnings.simplefilter("ignore")  # the replays' warnings (eps against tiny self changes) are expected here
    found = run_matrix(models, args.seeds, args.precisions)
    print("\nreal error / estimate (at most 1 where the estimate bounds):")
    for precision, (low, mid, high) in distribution(found).items():
        count = sum(c.precision == precision for c in found)
        print(f"  {precision:13} min {low:.3g}  median {mid:.3g}  max {high:.3g}  ({count} cells)")


if __name__ == "__main__":
    main()

"""Regression presets: a depth-2 ReLU network (the ``mlp`` factory, one hidden layer) trained by
plain SGD on the batch mean of ``mse``, for the elastic-to-inelastic transition (SPEC §5).

- ``regression-teacher``: inputs from SPEC §6.1's two-Gaussian mixture, targets from a fixed
  random teacher network (an ``mlp`` of ``teacher_hidden`` units, its weights drawn from a
  seed derived from ``data_seed``).
- ``regression-diabetes``: scikit-learn's bundled diabetes data (442 patients, 10 features; no
  download).

Inputs and targets are standardized with the training split's mean and standard deviation
(targets ``[N, 1]``). The data, the teacher and the train/test split come from ``data_seed`` and
are the same in every run; the run seed draws the probe set (``probes`` training points; for the
mixture, half from each component, grouped, their components in ``spec.json`` ``extra``
``probe_classes``), the initial weights and the batch order. Presets record a run group
(:mod:`recorder.rundir.group`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from recorder.datasets import SplitData, diabetes, split_standardized, stratified_sample, teacher_regression
from recorder.presets import Preset, register_preset
from recorder.rundir.group import record_group
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import record_supervised


@dataclass
class RegressionConfig:
    """Settings shared by the regression presets."""

    hidden: int = field(default=64, metadata={"help": "width of the hidden ReLU layer"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (no momentum, no weight decay)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    epochs: int = field(default=60, metadata={"help": "training epochs"})
    probes: int = field(default=30, metadata={"help": "training points in the probe set"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of the points held out"})
    snapshot_every: int = field(default=10, metadata={"help": "snapshot every this many batches"})
    data_seed: int = field(default=0, metadata={"help": "seed of the data, teacher and split (every run)"})
    runs: int = field(
        default=3, metadata={"help": "independent runs (seeds seed, seed+1, ...): RUN_DIR/run-00, ..."}
    )
    seed: int = field(
        default=0, metadata={"help": "seed of the first run (probes, initial weights, batches)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class TeacherConfig(RegressionConfig):
    n_per_class: int = field(default=500, metadata={"help": "points of each mixture component"})
    dim: int = field(default=10, metadata={"help": "input dimension"})
    teacher_hidden: int = field(default=16, metadata={"help": "width of the teacher's hidden ReLU layer"})


@dataclass
class DiabetesConfig(RegressionConfig):
    epochs: int = field(default=100, metadata={"help": "training epochs"})


def regression_data(config: RegressionConfig) -> SplitData:
    """The preset's data (the teacher's or diabetes), split and standardized from ``data_seed``:
    ``x_*`` ``[N, d]``, ``y_*`` ``[N, 1]``, ``groups`` ``[N_train]`` the mixture components."""
    if isinstance(config, TeacherConfig):
        x, y, groups = teacher_regression(
            config.n_per_class, config.dim, config.teacher_hidden, config.data_seed
        )
    else:
        x, y, groups = diabetes()
    return split_standardized(x, y, groups, config.test_fraction, config.data_seed)


def probe_counts(groups: np.ndarray, probes: int) -> list[int]:
    """``probes`` split evenly over the distinct ``groups`` ``[N]`` (the first ones get the remainder)."""
    k = len(np.unique(groups))
    return [probes // k + (g < probes % k) for g in range(k)]


def record(run_dir: Path, config: RegressionConfig, preset: str) -> None:
    """Record the run group ``run_dir``: ``config.runs`` runs of ``preset``."""
    data = regression_data(config)
    if config.probes > len(data.x_train):
        raise ValueError(f"probes ({config.probes}) cannot exceed the {len(data.x_train)} training points")
    record_group(
        run_dir,
        preset,
        asdict(config),
        config.runs,
        config.seed,
        functools.partial(_record_run, config=config, preset=preset, data=data),
    )


def _record_run(run_dir: Path, seed: int, config: RegressionConfig, preset: str, data: SplitData) -> None:
    """One run of the group with seed ``seed``."""
    probes = stratified_sample(data.groups, probe_counts(data.groups, config.probes), seed)
    record_supervised(
        run_dir,
        ModelSpec("mlp", {"in_features": data.x_train.shape[1], "num_outputs": 1, "hidden": [config.hidden]}),
        functools.partial(torch.optim.SGD, lr=config.lr),
        DataLoader(
            TensorDataset(data.x_train, data.y_train),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        ),
        DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=1024),
        (data.x_train[probes], data.y_train[probes]),
        Schedule.every(config.snapshot_every),
        task="regression",
        loss="mse",
        epochs=config.epochs,
        seed=seed,
        preset=preset,
        extra={"config": {**asdict(config), "seed": seed}, "probe_classes": data.groups[probes].tolist()},
        progress=config.progress,
    )


_HELP = {
    "regression-teacher": "ReLU net (1 hidden layer), SGD, on a random teacher of the two-Gaussian inputs; 3 runs",
    "regression-diabetes": "ReLU net (1 hidden layer), SGD, on scikit-learn's diabetes data; 3 runs",
}
for _name, _cls in {"regression-teacher": TeacherConfig, "regression-diabetes": DiabetesConfig}.items():
    register_preset(
        Preset(name=_name, help=_HELP[_name], config_cls=_cls, record=functools.partial(record, preset=_name))
    )

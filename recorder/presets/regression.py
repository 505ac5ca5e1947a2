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
(:mod:`recorder.rungroup`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from recorder.models import build_model
from recorder.presets import Preset, register_preset
from recorder.presets.theory import two_gaussians
from recorder.recorder import Recorder
from recorder.rundir.group import record_group
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import train


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


@dataclass
class RegressionData:
    """Standardized float32 data: ``x_*`` ``[N, d]``, ``y_*`` ``[N, 1]``; ``groups`` ``[N_train]``
    the mixture component of each training point (all 0 without one)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    groups: np.ndarray


def teacher_data(config: TeacherConfig) -> RegressionData:
    """The two-Gaussian inputs and the teacher's outputs, split and standardized."""
    x, components = two_gaussians(config.n_per_class, config.dim, config.data_seed)
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # the teacher sees inputs of unit scale
    with torch.random.fork_rng(devices=[]):
        # a seed of its own: a student seeded like the teacher would start with some of its weights
        torch.manual_seed(int(np.random.SeedSequence([config.data_seed, 1]).generate_state(1)[0]))
        teacher = build_model(
            ModelSpec("mlp", {"in_features": config.dim, "num_outputs": 1, "hidden": [config.teacher_hidden]})
        )
        with torch.no_grad():
            y = teacher(torch.from_numpy(x).float()).double().numpy()  # [N, 1]
    return _split(x, y, components, config)


def diabetes_data(config: DiabetesConfig) -> RegressionData:
    """scikit-learn's diabetes data (bundled), split and standardized."""
    x, y = load_diabetes(return_X_y=True)
    return _split(x, y[:, None], np.zeros(len(x), dtype=np.int64), config)


def _split(x: np.ndarray, y: np.ndarray, groups: np.ndarray, config: RegressionConfig) -> RegressionData:
    """Train/test split (stratified by group, from ``data_seed``), standardized on the training split."""
    x_tr, x_te, y_tr, y_te, g_tr, _ = train_test_split(
        x, y, groups, test_size=config.test_fraction, stratify=groups, random_state=config.data_seed
    )
    x_mean, x_std, y_mean, y_std = x_tr.mean(0), x_tr.std(0), y_tr.mean(0), y_tr.std(0)

    def tensor(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return RegressionData(
        tensor(x_tr, x_mean, x_std),
        tensor(y_tr, y_mean, y_std),
        tensor(x_te, x_mean, x_std),
        tensor(y_te, y_mean, y_std),
        g_tr,
    )


def probe_index(groups: np.ndarray, probes: int, rng: np.random.Generator) -> np.ndarray:
    """``probes`` training points split evenly over the groups (the first ones get the remainder),
    grouped: indices ``[probes]``."""
    values = np.unique(groups)
    counts = np.full(len(values), probes // len(values)) + (np.arange(len(values)) < probes % len(values))
    return np.concatenate(
        [
            np.sort(rng.choice(np.flatnonzero(groups == g), n, replace=False))
            for g, n in zip(values, counts, strict=True)
        ]
    )


def record(run_dir: Path, config: RegressionConfig, preset: str) -> None:
    """Record the run group ``run_dir``: ``config.runs`` runs of ``preset``."""
    data = teacher_data(config) if isinstance(config, TeacherConfig) else diabetes_data(config)
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


def _record_run(
    run_dir: Path, seed: int, config: RegressionConfig, preset: str, data: RegressionData
) -> None:
    """One run of the group with seed ``seed``."""
    probes = probe_index(data.groups, config.probes, np.random.default_rng(seed))
    torch.manual_seed(seed)
    spec = ModelSpec(
        "mlp", {"in_features": data.x_train.shape[1], "num_outputs": 1, "hidden": [config.hidden]}
    )
    model = build_model(spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr)
    train_loader = DataLoader(
        TensorDataset(data.x_train, data.y_train),
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    test_loader = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=1024)
    with Recorder(
        run_dir,
        model,
        optimizer,
        probes=(data.x_train[probes], data.y_train[probes]),
        model_spec=spec,
        task="regression",
        loss="mse",
        schedule=Schedule.every(config.snapshot_every),
        seed=seed,
        preset=preset,
        extra={"config": {**asdict(config), "seed": seed}, "probe_classes": data.groups[probes].tolist()},
    ) as recorder:
        train(
            model,
            optimizer,
            "mse",
            train_loader,
            test_loader,
            config.epochs,
            recorder,
            "cpu",
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

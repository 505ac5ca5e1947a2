"""Presets for the closed-form families of SPEC §6: full-batch, small-step gradient descent with the
recorder attached, so that replay and :mod:`analyses.theory` can check each other.

Data (SPEC §6.1): a mixture of two Gaussians in ``dim`` dimensions, ``n_per_class`` points each;
class 0 has mean 1 and standard deviation 2 in every coordinate, class 1 mean 9 and standard
deviation 1. Targets: for the ridge family the one-hot class (K = 2 outputs); for the ReLU gate and
the homogeneous predictor (one output) the output of a teacher of the same family (the model
factory at the seed ``seed + 1``), so that the regression is realizable.

Training: ``torch.optim.SGD(lr, weight_decay)`` on the batch mean of ``half_sse`` over the whole
training set, in float64, for ``steps`` steps: gradient descent on
``R(w) = mean_n 0.5 ||f(x_n; w) - y_n||^2 + 0.5 weight_decay ||w||^2``, approximating its gradient
flow at time ``t = step * lr``. Snapshots: log-spaced (with step 0 and the last). Probe set:
``probes_per_class`` training points of each class, grouped by class. The run is a regression
run (targets ``[P, C]``); ``spec.json`` ``extra`` holds ``config`` (the preset's settings, from
which :func:`setup` rebuilds data and model) and ``probe_classes`` (the mixture component of
each probe).

Presets (defaults; ``lr * steps`` is the flow time reached, ``lr`` times the largest curvature of
``R`` stays near 0.1 to 0.4):

- ``theory-ridge-p10`` / ``theory-ridge-p100``: ``p`` = 10 / 100 random ReLU features of the
  ``dim`` = 100 inputs, ``V`` scaled so that the features are of unit size, ridge ``lam`` = 1;
  ``lr`` 1e-2 x 400 steps / 2.5e-3 x 1600 steps.
- ``theory-relu-gate``: ``dim`` = 10 (the curvature grows with ``dim``, and the number of steps
  with it), ``lr`` 5e-4 x 8000 steps, seed 4 (the gate starts firing on class 1, which the teacher
  leaves off).
- ``theory-homogeneous``: ``dim`` = 10, ``d`` = 2, ``lr`` 1e-3 x 10000 steps.

Replay a run with the rule of the training step, ``python cli.py replay RUN --update sgd
--weight-decay WD [--lr LR]``: then ``orig_outputs_l2`` is SPEC §6's exact one-step S_rel
(:mod:`analyses.theory.runs`).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.presets import Preset, register_preset
from recorder.recorder import Recorder
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule

CLASS_MEANS = (1.0, 9.0)
CLASS_STDS = (2.0, 1.0)
# root mean square of an input coordinate over the mixture: features relu(V x) of unit scale
INPUT_RMS = float(np.sqrt(np.mean(np.square(CLASS_MEANS) + np.square(CLASS_STDS))))


def two_gaussians(n_per_class: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §6.1's mixture: inputs ``[2 n_per_class, dim]`` float64 (class 0 first), classes ``[N]`` int64."""
    rng = np.random.default_rng([seed, 0])
    x = np.concatenate(
        [
            m + s * rng.standard_normal((n_per_class, dim))
            for m, s in zip(CLASS_MEANS, CLASS_STDS, strict=True)
        ]
    )
    return x, np.repeat(np.arange(len(CLASS_MEANS)), n_per_class)


@dataclass
class TheoryConfig(ABC):
    """Settings common to the theory presets; each family adds its model and targets (and the
    defaults of ``lr`` and ``steps``)."""

    lr: float = field(metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(metadata={"help": "gradient-descent steps (full batch)"})
    n_per_class: int = field(default=1000, metadata={"help": "training points of each of the 2 classes"})
    dim: int = field(default=100, metadata={"help": "input dimension"})
    probes_per_class: int = field(
        default=20, metadata={"help": "training points of each class in the probe set"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay (ridge penalty lam)"})
    snapshots: int = field(
        default=40, metadata={"help": "log-spaced snapshots (besides step 0 and the last)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of data, probes, initial weights and teacher"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    @abstractmethod
    def model_spec(self) -> ModelSpec:
        """The model factory and its arguments."""

    def targets(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Training targets ``[N, C]``: a teacher of the same family (factory at seed ``seed + 1``)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 1)
            teacher = build_model(self.model_spec()).to(torch.float64)
        with torch.no_grad():
            return teacher(x)


@dataclass
class RidgeConfig(TheoryConfig):
    num_features: int = field(default=10, metadata={"help": "random ReLU features p"})
    feature_seed: int = field(default=0, metadata={"help": "seed of the fixed feature matrix V"})
    feature_scale: float = field(
        default=1 / INPUT_RMS,
        metadata={
            "help": "V has entries N(0, feature_scale^2 / dim); the default gives features of unit scale"
        },
    )
    weight_decay: float = field(default=1.0, metadata={"help": "ridge penalty lam (as weight decay)"})
    lr: float = field(default=1e-2, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=400, metadata={"help": "gradient-descent steps (full batch)"})

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            "random_features",
            {
                "in_features": self.dim,
                "num_features": self.num_features,
                "num_outputs": len(CLASS_MEANS),
                "feature_seed": self.feature_seed,
                "feature_scale": self.feature_scale,
            },
        )

    def targets(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """One-hot classes ``[N, 2]``."""
        return nn.functional.one_hot(classes, len(CLASS_MEANS)).to(torch.float64)


@dataclass
class RidgeP100Config(RidgeConfig):
    num_features: int = field(default=100, metadata={"help": "random ReLU features p"})
    lr: float = field(default=2.5e-3, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=1600, metadata={"help": "gradient-descent steps (full batch)"})


@dataclass
class ReluGateConfig(TheoryConfig):
    dim: int = field(default=10, metadata={"help": "input dimension"})
    lr: float = field(default=5e-4, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=8000, metadata={"help": "gradient-descent steps (full batch)"})
    seed: int = field(
        default=4,
        metadata={
            "help": "seed of data, probes, initial weights and teacher (4: the gate starts firing on class 1, "
            "which the teacher leaves off, and training switches it off)"
        },
    )

    def model_spec(self) -> ModelSpec:
        return ModelSpec("relu_gate", {"in_features": self.dim})


@dataclass
class HomogeneousConfig(TheoryConfig):
    dim: int = field(default=10, metadata={"help": "input dimension"})
    d: int = field(default=2, metadata={"help": "degree of homogeneity (f = <w^d, x>)"})
    lr: float = field(default=1e-3, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=10000, metadata={"help": "gradient-descent steps (full batch)"})

    def model_spec(self) -> ModelSpec:
        return ModelSpec("diagonal_homogeneous", {"in_features": self.dim, "d": self.d})


@dataclass
class Setup:
    """A theory preset before training.

    Attributes:
        spec: the model factory and its arguments.
        model: the model at its initial weights (float64).
        x: ``[N, dim]`` training inputs; y: ``[N, C]`` targets; classes: ``[N]`` mixture components.
        probe_index: ``[P]`` the probes' rows of ``x``, grouped by class.
    """

    spec: ModelSpec
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    classes: torch.Tensor
    probe_index: torch.Tensor


def setup(config: TheoryConfig) -> Setup:
    """Data, targets, probes and the initial model of ``config`` (deterministic in ``config``)."""
    x_np, classes_np = two_gaussians(config.n_per_class, config.dim, config.seed)
    rng = np.random.default_rng([config.seed, 1])
    index = np.concatenate(
        [
            np.sort(rng.choice(np.flatnonzero(classes_np == c), config.probes_per_class, replace=False))
            for c in range(len(CLASS_MEANS))
        ]
    )
    x, classes = torch.from_numpy(x_np), torch.from_numpy(classes_np)
    spec = config.model_spec()
    torch.manual_seed(config.seed)
    model = build_model(spec).to(torch.float64)
    return Setup(spec, model, x, config.targets(x, classes), classes, torch.from_numpy(index))


def record(run_dir: Path, config: TheoryConfig, preset: str) -> None:
    """Train ``config``'s model by full-batch gradient descent with the recorder attached."""
    s = setup(config)
    optimizer = torch.optim.SGD(s.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small: more threads only contend (25x slower on 2 busy cores)
    try:
        with Recorder(
            run_dir,
            s.model,
            optimizer,
            probes=(s.x[s.probe_index], s.y[s.probe_index]),
            model_spec=s.spec,
            task="regression",
            loss="half_sse",
            schedule=Schedule.log_spaced(config.steps, config.snapshots),
            seed=config.seed,
            preset=preset,
            extra={"config": asdict(config), "probe_classes": s.classes[s.probe_index].tolist()},
        ) as recorder:
            for _ in tqdm(range(config.steps), disable=not config.progress, unit="step", dynamic_ncols=True):
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss("half_sse", s.model(s.x), s.y)
                loss.backward()
                optimizer.step()
                recorder.step(loss=loss.item())
    finally:
        torch.set_num_threads(threads)


PRESET_CONFIGS: dict[str, type[TheoryConfig]] = {
    "theory-ridge-p10": RidgeConfig,
    "theory-ridge-p100": RidgeP100Config,
    "theory-relu-gate": ReluGateConfig,
    "theory-homogeneous": HomogeneousConfig,
}
_HELP = {
    "theory-ridge-p10": "SPEC §6.1: ridge on p = 10 random ReLU features of the two-Gaussian data, gradient descent",
    "theory-ridge-p100": "SPEC §6.1: ridge on p = 100 random ReLU features of the two-Gaussian data, gradient descent",
    "theory-relu-gate": "SPEC §6.2: a single ReLU gate fitting a teacher gate, gradient descent",
    "theory-homogeneous": "SPEC §6.3: f = <w^d, x> fitting a teacher of the same form, gradient descent",
}
for _name, _cls in PRESET_CONFIGS.items():
    register_preset(
        Preset(name=_name, help=_HELP[_name], config_cls=_cls, record=functools.partial(record, preset=_name))
    )

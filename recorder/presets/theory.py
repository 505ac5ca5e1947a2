"""Presets for the closed-form families of SPEC §6: full-batch, small-step gradient descent with the
recorder attached, so that replay and :mod:`analyses.theory` can check each other.

Data (SPEC §6.1, :func:`recorder.datasets.theory_setup`): a mixture of two Gaussians in ``dim``
dimensions, ``n_per_class`` points each; class 0 has mean 1 and standard deviation 2 in every
coordinate, class 1 mean 9 and standard deviation 1. Targets: for the ridge family the one-hot
class (K = 2 outputs); for the ReLU gate and the homogeneous predictor (one output) the output of a
teacher of the same family (the model factory at the seed ``seed + 1``), so that the regression is
realizable.

Training: ``torch.optim.SGD(lr, weight_decay)`` on the batch mean of ``half_sse`` over the whole
training set, in float64, for ``steps`` steps: gradient descent on
``R(w) = mean_n 0.5 ||f(x_n; w) - y_n||^2 + 0.5 weight_decay ||w||^2``, approximating its gradient
flow at time ``t = step * lr``. Snapshots: log-spaced (with step 0 and the last). Probe set:
``probes_per_class`` training points of each class, grouped by class. The run is a regression
run (targets ``[P, C]``); ``spec.json`` ``extra`` holds ``config`` (the preset's settings, from
which :func:`recorder.datasets.theory_setup` rebuilds data and model) and ``probe_classes`` (the
mixture component of each probe).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from recorder.datasets import INPUT_RMS, theory_model_spec, theory_setup
from recorder.losses import batch_loss
from recorder.presets import Preset, register_preset
from recorder.recorder import Recorder
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import progress_bar, torch_threads


@dataclass
class TheoryConfig:
    """Settings common to the theory presets; each family adds its model factory and settings (and
    the defaults of ``lr`` and ``steps``)."""

    FACTORY: ClassVar[str]  # the model factory of the family

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

    def model_spec(self) -> ModelSpec:
        """The model factory and its arguments."""
        return theory_model_spec(self.FACTORY, asdict(self))


@dataclass
class RidgeConfig(TheoryConfig):
    FACTORY = "random_features"
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


@dataclass
class RidgeP100Config(RidgeConfig):
    num_features: int = field(default=100, metadata={"help": "random ReLU features p"})
    lr: float = field(default=2.5e-3, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=1600, metadata={"help": "gradient-descent steps (full batch)"})


@dataclass
class ReluGateConfig(TheoryConfig):
    FACTORY = "relu_gate"
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


@dataclass
class HomogeneousConfig(TheoryConfig):
    FACTORY = "diagonal_homogeneous"
    dim: int = field(default=10, metadata={"help": "input dimension"})
    d: int = field(default=2, metadata={"help": "degree of homogeneity (f = <w^d, x>)"})
    lr: float = field(default=1e-3, metadata={"help": "gradient-descent step (flow time per step)"})
    steps: int = field(default=10000, metadata={"help": "gradient-descent steps (full batch)"})


def record(run_dir: Path, config: TheoryConfig, preset: str) -> None:
    """Train ``config``'s model by full-batch gradient descent with the recorder attached."""
    spec = config.model_spec()
    s = theory_setup(asdict(config), spec)
    optimizer = torch.optim.SGD(s.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    # models this small: more threads only contend (25x slower on 2 busy cores)
    with (
        torch_threads(1),
        Recorder(
            run_dir,
            s.model,
            optimizer,
            probes=(s.x[s.probe_index], s.y[s.probe_index]),
            model_spec=spec,
            task="regression",
            loss="half_sse",
            schedule=Schedule.log_spaced(config.steps, config.snapshots),
            seed=config.seed,
            preset=preset,
            extra={"config": asdict(config), "probe_classes": s.classes[s.probe_index].tolist()},
        ) as recorder,
    ):
        with progress_bar(config.steps, config.progress) as bar:
            for _ in range(config.steps):
                optimizer.zero_grad(set_to_none=True)
                loss = batch_loss("half_sse", s.model(s.x), s.y)
                loss.backward()
                optimizer.step()
                recorder.step(loss=loss.item())
                bar.update()


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

"""The bundled data sets (no download) and the stratified sampler the presets draw probes with.

A registry-level module like :mod:`recorder.models`: plain functions of their settings, so that
replay and analyses can rebuild the data of a recorded run from its ``spec.json`` without the
recorder's training side.

- :func:`digits`: scikit-learn's 8x8 handwritten digits, split and standardized.
- :func:`diabetes`: scikit-learn's diabetes regression data.
- :func:`two_gaussians`: SPEC §6.1's mixture of two Gaussians; :func:`teacher_regression` the
  mixture with a random teacher network's outputs as targets.
- :func:`split_standardized`: a stratified train/test split standardized on the training split.
- :func:`stratified_sample`: random points of every class, grouped by class.
- :func:`theory_setup`: the training problem of a theory run (SPEC §6) from its stored settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

from recorder.models import build_model
from recorder.rundir.errors import DataError
from recorder.rundir.spec import ModelSpec

CLASS_MEANS = (1.0, 9.0)
CLASS_STDS = (2.0, 1.0)
# root mean square of an input coordinate over the mixture: features relu(V x) of unit scale
INPUT_RMS = float(np.sqrt(np.mean(np.square(CLASS_MEANS) + np.square(CLASS_STDS))))


def stratified_sample(
    labels: np.ndarray,
    per_class: int | Sequence[int] | None,
    seed: int | Sequence[int] | np.random.Generator,
    classes: Sequence[int] | None = None,
) -> np.ndarray:
    """Random positions in ``labels`` ``[N]``, drawn without replacement class by class: indices
    ``[M]``, grouped by class in the order of ``classes`` (default: the sorted distinct labels),
    ascending within a class.

    ``per_class``: the count of every class, a count per class, or None for all of each class (still
    drawn, so the generator advances as for a count). ``seed``: a seed of
    :func:`numpy.random.default_rng` or a generator, which is advanced in place.
    """
    rng = np.random.default_rng(seed)
    order: Sequence[int] | np.ndarray = np.unique(labels) if classes is None else classes
    counts = per_class if isinstance(per_class, Sequence) else [per_class] * len(order)
    index = []
    for c, n in zip(order, counts, strict=True):
        pool = np.flatnonzero(labels == c)
        if n is not None and n > len(pool):
            raise DataError(f"{n} examples of class {c} asked for, but it has only {len(pool)}")
        index.append(np.sort(rng.choice(pool, len(pool) if n is None else n, replace=False)))
    return np.concatenate(index)


def digits(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, split (stratified, from ``seed``) and standardized on the training
    split: x_train ``[N, 64]`` float32, y_train ``[N]`` int64, x_test ``[M, 64]``, y_test ``[M]``."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    scaler = StandardScaler().fit(x_train)

    def tensors(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(scaler.transform(a), dtype=torch.float32), torch.tensor(b, dtype=torch.int64)

    return *tensors(x_train, y_train), *tensors(x_test, y_test)


def diabetes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's diabetes data: inputs ``[442, 10]`` float64, targets ``[442, 1]``, groups
    ``[442]`` int64 (all 0: one group)."""
    x, y = load_diabetes(return_X_y=True)
    return x, y[:, None], np.zeros(len(x), dtype=np.int64)


def two_gaussians(n_per_class: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SPEC §6.1's mixture: class 0 has mean 1 and standard deviation 2 in every coordinate, class 1
    mean 9 and standard deviation 1. Inputs ``[2 n_per_class, dim]`` float64 (class 0 first),
    classes ``[N]`` int64."""
    rng = np.random.default_rng([seed, 0])
    x = np.concatenate(
        [
            m + s * rng.standard_normal((n_per_class, dim))
            for m, s in zip(CLASS_MEANS, CLASS_STDS, strict=True)
        ]
    )
    return x, np.repeat(np.arange(len(CLASS_MEANS)), n_per_class)


def teacher_regression(
    n_per_class: int, dim: int, teacher_hidden: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two-Gaussian inputs, each coordinate standardized, and the outputs of a random ``mlp``
    teacher (``teacher_hidden`` ReLU units, weights from a seed derived from ``seed``): inputs
    ``[N, dim]`` float64, targets ``[N, 1]`` float64, mixture components ``[N]`` int64."""
    x, components = two_gaussians(n_per_class, dim, seed)
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # the teacher sees inputs of unit scale
    with torch.random.fork_rng(devices=[]):
        # a seed of its own: a student seeded like the teacher would start with some of its weights
        torch.manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
        teacher = build_model(
            ModelSpec("mlp", {"in_features": dim, "num_outputs": 1, "hidden": [teacher_hidden]})
        )
        with torch.no_grad():
            y = teacher(torch.from_numpy(x).float()).double().numpy()
    return x, y, components


@dataclass
class SplitData:
    """Standardized float32 data: ``x_*`` ``[N, d]``, ``y_*`` ``[N, 1]``; ``groups`` ``[N_train]``
    the group of each training point."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    groups: np.ndarray


def split_standardized(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
) -> SplitData:
    """Train/test split of ``x`` ``[N, d]``, ``y`` ``[N, 1]`` (stratified by ``groups`` ``[N]``, from
    ``seed``), inputs and targets standardized with the training split's mean and standard deviation."""
    x_tr, x_te, y_tr, y_te, g_tr, _ = train_test_split(
        x, y, groups, test_size=test_fraction, stratify=groups, random_state=seed
    )
    x_mean, x_std, y_mean, y_std = x_tr.mean(0), x_tr.std(0), y_tr.mean(0), y_tr.std(0)

    def tensor(a: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
        return torch.tensor((a - mean) / std, dtype=torch.float32)

    return SplitData(
        tensor(x_tr, x_mean, x_std),
        tensor(y_tr, y_mean, y_std),
        tensor(x_te, x_mean, x_std),
        tensor(y_te, y_mean, y_std),
        g_tr,
    )


# theory model factory -> the settings that are its arguments (besides in_features = dim)
THEORY_MODEL_SETTINGS = {
    "random_features": ("num_features", "feature_seed", "feature_scale"),
    "relu_gate": (),
    "diagonal_homogeneous": ("d",),
}
ONE_HOT_FACTORIES = ("random_features",)  # trained on the one-hot class, not on a teacher's outputs


def theory_model_spec(factory: str, settings: Mapping[str, Any]) -> ModelSpec:
    """The model of a theory run with settings ``settings`` (``dim`` and the factory's own)."""
    kwargs = {"in_features": settings["dim"], **{k: settings[k] for k in THEORY_MODEL_SETTINGS[factory]}}
    if factory in ONE_HOT_FACTORIES:
        kwargs["num_outputs"] = len(CLASS_MEANS)
    return ModelSpec(factory, kwargs)


@dataclass
class TheorySetup:
    """A theory run before training.

    Attributes:
        model: the model at its initial weights (float64).
        x: ``[N, dim]`` training inputs; y: ``[N, C]`` targets; classes: ``[N]`` mixture components.
        probe_index: ``[P]`` the probes' rows of ``x``, grouped by class.
    """

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    classes: torch.Tensor
    probe_index: torch.Tensor


def theory_setup(settings: Mapping[str, Any], spec: ModelSpec) -> TheorySetup:
    """Data, targets, probes and the initial model of a theory run with model ``spec`` and settings
    ``settings`` (``n_per_class``, ``dim``, ``probes_per_class``, ``seed``; as ``spec.json`` ``extra``
    ``config`` stores them), deterministic in both; seeds torch's global generator with ``seed``.

    Inputs: :func:`two_gaussians`. Targets: the one-hot class (K = 2 outputs) for the ridge family
    (``random_features``), else the outputs of a teacher of the same family (the model factory at
    the seed ``seed + 1``). Probes: ``probes_per_class`` points of each class.
    """
    seed = settings["seed"]
    x_np, classes_np = two_gaussians(settings["n_per_class"], settings["dim"], seed)
    index = stratified_sample(classes_np, settings["probes_per_class"], [seed, 1])
    x, classes = torch.from_numpy(x_np), torch.from_numpy(classes_np)
    torch.manual_seed(seed)
    model = build_model(spec).to(torch.float64)
    if spec.factory in ONE_HOT_FACTORIES:
        y = nn.functional.one_hot(classes, len(CLASS_MEANS)).to(torch.float64)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            teacher = build_model(spec).to(torch.float64)
        with torch.no_grad():
            y = teacher(x)
    return TheorySetup(model, x, y, classes, torch.from_numpy(index))

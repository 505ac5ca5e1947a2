"""``spec.json``: the model (a registered factory and its kwargs), task, loss and outputs of a run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from recorder.rundir.errors import RunDirError
from recorder.rundir.files import MAX_INT, is_int
from recorder.rundir.trajectory import FORMAT_VERSION

TASKS = ("classification", "regression")
LOSSES = ("cross_entropy", "mse", "half_sse")


@dataclass
class ModelSpec:
    """A model named by a registered factory (see :mod:`recorder.models`) and its kwargs."""

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    """What replay needs to rebuild the model and its loss (``spec.json``)."""

    model: ModelSpec
    task: str  # "classification" | "regression"
    loss: str  # "cross_entropy" | "mse" (torch's mean) | "half_sse" (0.5 * sum of squares)
    num_outputs: int
    optimizer: str | None = None  # class name of the training optimizer, e.g. "AdamW"
    seed: int | None = None
    preset: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = "spec.json") -> RunSpec:
        if not isinstance(obj, dict):
            raise RunDirError(f"{where}: expected a JSON object")
        try:
            model = obj["model"]
            if not isinstance(model, dict) or not isinstance(model.get("factory"), str):
                raise RunDirError(f"{where}: 'model' must be {{'factory': str, 'kwargs': {{...}}}}")
            kwargs = model.get("kwargs", {})
            if not isinstance(kwargs, dict):
                raise RunDirError(f"{where}: model 'kwargs' must be an object")
            spec = cls(
                model=ModelSpec(model["factory"], kwargs),
                task=obj["task"],
                loss=obj["loss"],
                num_outputs=obj["num_outputs"],
                optimizer=obj.get("optimizer"),
                seed=obj.get("seed"),
                preset=obj.get("preset"),
                versions=obj.get("versions", {}),
                extra=obj.get("extra", {}),
                format=obj.get("format", FORMAT_VERSION),
            )
        except KeyError as e:
            raise RunDirError(f"{where}: missing field {e.args[0]!r}") from None
        if spec.task not in TASKS:
            raise RunDirError(f"{where}: task {spec.task!r} is not one of {TASKS}")
        if spec.loss not in LOSSES:
            raise RunDirError(f"{where}: loss {spec.loss!r} is not one of {LOSSES}")
        if (
            not isinstance(spec.num_outputs, int)
            or isinstance(spec.num_outputs, bool)
            or spec.num_outputs < 1
        ):
            raise RunDirError(f"{where}: num_outputs must be a positive integer")
        if spec.format != FORMAT_VERSION:
            raise RunDirError(f"{where}: format {spec.format!r} is not supported (expected {FORMAT_VERSION})")
        for name in ("optimizer", "preset"):
            if not isinstance(getattr(spec, name), str | None):
                raise RunDirError(f"{where}: {name} must be a string or null")
        if spec.seed is not None and not is_int(spec.seed, low=-MAX_INT):
            raise RunDirError(f"{where}: seed must be an integer or null")
        if not isinstance(spec.versions, dict) or not isinstance(spec.extra, dict):
            raise RunDirError(f"{where}: versions and extra must be objects")
        return spec


"""``probes.safetensors``: the probe set of a run, and probe inputs as the code handles them.

Probe inputs are one tensor ``[P, ...]`` (images, features, token ids), or a dict of named tensors
that share the leading axis ``P`` (``input_ids``, ``attention_mask``, ...), which the model takes
as keyword arguments (:func:`recorder.models.forward`). Targets are ``[P]`` int64 classes
(classification) or ``[P, C]`` floats (regression). On disk, one safetensors file holds
``targets`` beside ``inputs`` (one tensor) or ``inputs.<name>`` (one per named tensor): tensors
only, nothing that executes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import torch
from safetensors.torch import save as st_save
from torch import Tensor

from recorder.rundir.errors import RunDirError
from recorder.rundir.snapshot import WEIGHT_DTYPES, load_safetensors

# Probe inputs: one tensor [P, ...], or named tensors [P, ...] passed as keyword arguments.
Inputs = Tensor | dict[str, Tensor]
InputsT = TypeVar("InputsT", bound=Inputs)  # either kind, kept by a function of it

PROBE_DTYPES = WEIGHT_DTYPES + (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_PREFIX = "inputs."  # of a named input's tensor in probes.safetensors


def num_probes(inputs: Inputs) -> int:
    """``P``, the leading size of the probe inputs."""
    first = input_tensors(inputs)[0]
    return first.shape[0] if first.ndim else 0


def input_tensors(inputs: Inputs) -> list[Tensor]:
    """The tensor, or the named tensors, of ``inputs``."""
    return [inputs] if isinstance(inputs, Tensor) else list(inputs.values())


def map_inputs(fn: Callable[[Tensor], Tensor], inputs: InputsT) -> InputsT:
    """``fn`` applied to the tensor, or to every named tensor, of ``inputs``."""
    mapped = fn(inputs) if isinstance(inputs, Tensor) else {k: fn(v) for k, v in inputs.items()}
    return cast(InputsT, mapped)


def take(inputs: InputsT, index: slice | int | Tensor) -> InputsT:
    """The probes ``index`` selects along the leading axis, in every tensor of ``inputs``."""
    return map_inputs(lambda t: t[index], inputs)


def describe(inputs: Inputs) -> str:
    """Shapes and dtypes of ``inputs`` for messages: ``[8, 64] float32`` or ``{input_ids: [8, 12] int64, ...}``."""

    def one(t: Tensor) -> str:
        return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(inputs, Tensor):
        return one(inputs)
    return "{" + ", ".join(f"{k}: {one(v)}" for k, v in inputs.items()) + "}"


def probe_problem(task: str, num_outputs: int, inputs: Inputs, targets: Tensor) -> str | None:
    """What is wrong with a probe set for a run of ``task`` with ``num_outputs`` outputs, or None:
    inputs ``[P, ...]`` (or named tensors of keyword-argument names, all ``[P, ...]``) with ``P > 0``,
    of a supported dtype; targets ``[P]`` int64 classes in ``[0, C)`` (classification) or
    ``[P, C]`` floats (regression); no NaN or Inf."""
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else dict(inputs)
    if not tensors:
        return "the probe inputs hold no tensor"
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            return f"probe input {name!r} is a {type(t).__name__}, not a tensor"
        if not name.isidentifier():
            return f"probe input name {name!r} is not a keyword argument name"
        if t.dtype not in PROBE_DTYPES:
            return f"probe input {name!r} has unsupported dtype {t.dtype}"
    count = num_probes(inputs)
    if count == 0:
        return "the probe set is empty"
    if any(t.shape[:1] != (count,) for t in tensors.values()):
        return f"the named probe inputs differ in their number of probes: {describe(inputs)}"
    if targets.dtype not in PROBE_DTYPES:
        return f"targets have unsupported dtype {targets.dtype}"
    if targets.shape[:1] != (count,):
        return f"{count} inputs but {targets.shape[0] if targets.ndim else 0} targets"
    if task == "classification":
        if targets.dtype != torch.int64 or targets.ndim != 1:
            return "classification targets must be int64 classes of shape [P]"
        if targets.min() < 0 or targets.max() >= num_outputs:
            return f"class labels must lie in [0, {num_outputs})"
    elif not targets.is_floating_point() or tuple(targets.shape) != (count, num_outputs):
        return f"regression targets must be floats of shape [P, {num_outputs}]"
    for name, t in (*tensors.items(), ("targets", targets)):
        if t.is_floating_point() and not torch.isfinite(t).all():
            return f"probe {name} contain NaN or Inf"
    return None


def encode_probes(inputs: Inputs, targets: Tensor) -> bytes:
    """The bytes of ``probes.safetensors`` for ``inputs`` and ``targets`` (copied to the CPU)."""
    tensors = {"inputs": inputs} if isinstance(inputs, Tensor) else {_PREFIX + k: v for k, v in inputs.items()}
    tensors["targets"] = targets
    return st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def decode_probes(data: bytes, where: str) -> tuple[Inputs, Tensor]:
    """Inputs and targets from the bytes of ``probes.safetensors`` (checked for their layout only;
    :func:`probe_problem` checks them against a run). Raises :class:`RunDirError` naming ``where``."""
    tensors = load_safetensors(data, where)
    named = {k.removeprefix(_PREFIX): v for k, v in tensors.items() if k.startswith(_PREFIX)}
    if "targets" not in tensors or ("inputs" in tensors) == bool(named) or len(tensors) != 1 + max(1, len(named)):
        raise RunDirError(
            f"{where}: expected tensors 'targets' and either 'inputs' or 'inputs.<name>', "
            f"found {sorted(tensors)[:6]}"
        )
    return (tensors["inputs"] if "inputs" in tensors else named), tensors["targets"]

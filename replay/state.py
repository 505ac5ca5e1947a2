"""A snapshot's weights and buffers, and the probes, on the replay device in a given dtype.

The virtual step moves the *trainable* weights only: a parameter that the model built from the
spec freezes (``requires_grad=False``), or that the run's spec lists under ``extra["frozen"]``,
is held fixed like a buffer (:func:`frozen_names`). A snapshot recorded through ``torch.compile``,
whose names carry its ``_orig_mod.`` prefix, is read with the prefix stripped (:func:`uncompiled`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from recorder.models import COMPILE_PREFIX
from recorder.rundir.errors import RunDirError
from recorder.rundir.probes import InputsT, map_inputs
from recorder.rundir.snapshot import OptimizerRecord, Snapshot


def cast(t: InputsT, device: torch.device, dtype: torch.dtype) -> InputsT:
    """A fresh copy of ``t`` (a tensor, or named probe inputs) on ``device``, floating point values
    in ``dtype``.

    Always a copy: tensors read from a file may sit at any address, and CPU kernels round
    differently with the alignment of their data, which would make replays irreproducible.
    """
    return map_inputs(lambda x: x.to(device, dtype if x.is_floating_point() else x.dtype, copy=True), t)


def retype(t: InputsT, dtype: torch.dtype) -> InputsT:
    """``t`` (a tensor, or named probe inputs) in ``dtype`` where it holds floating point values;
    integer and boolean tensors (token ids, counters, masks) as they are."""
    return map_inputs(lambda x: x.to(dtype) if x.is_floating_point() else x, t)


def retyped(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``tensors`` (name -> ``[*shape]``), each by :func:`retype` in ``dtype``."""
    return {k: retype(v, dtype) for k, v in tensors.items()}


def frozen_names(model: nn.Module, extra: dict[str, Any]) -> frozenset[str]:
    """The parameters of ``model`` the virtual step leaves fixed: those it builds frozen
    (``requires_grad=False``) and those the run's spec ``extra["frozen"]`` names (a list of
    parameter names, as a recorder writes it; anything else there is ignored)."""
    names = {k for k, p in model.named_parameters() if not p.requires_grad}
    listed = extra.get("frozen") if isinstance(extra, dict) else None
    if isinstance(listed, list):
        own = dict(model.named_parameters())
        names |= {k.replace(COMPILE_PREFIX, "") for k in listed if isinstance(k, str)} & own.keys()
    return frozenset(names)


def snapshot_state(
    model: nn.Module,
    snapshot: Snapshot,
    device: torch.device,
    dtype: torch.dtype,
    frozen: Collection[str] = (),
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The snapshot's trainable parameters, and its ``frozen`` ones with ``model``'s buffers
    (overridden by the snapshot's), on ``device``, floating point values in ``dtype``: name ->
    ``[*shape]`` each."""
    params = {k: cast(snapshot.params[k], device, dtype) for k, _ in model.named_parameters()}
    own = dict(model.named_buffers())
    extra = sorted(set(snapshot.buffers) - set(own))
    if extra:
        raise RunDirError(f"snapshot step {snapshot.step}: buffers {extra[:3]} are not in the model")
    fixed = {k: params.pop(k) for k in frozen}
    return params, fixed | {k: cast(snapshot.buffers.get(k, v), device, dtype) for k, v in own.items()}


def uncompiled(snapshot: Snapshot, names: Collection[str]) -> Snapshot:
    """``snapshot`` with ``torch.compile``'s prefix ``_orig_mod.`` removed from every name (weights,
    buffers, optimizer state and groups) where the model's parameter ``names`` carry none and the
    snapshot's do; else ``snapshot`` itself."""
    if any(COMPILE_PREFIX in k for k in names) or not any(COMPILE_PREFIX in k for k in snapshot.params):
        return snapshot

    def strip(name: str) -> str:
        return name.replace(COMPILE_PREFIX, "")

    def renamed(tensors: dict[str, Any]) -> dict[str, Any]:
        return {strip(k): v for k, v in tensors.items()}

    record = snapshot.optimizer
    if record is not None:
        groups = [g | {"params": [strip(n) for n in g.get("params", [])]} for g in record.groups]
        record = OptimizerRecord(record.type, groups, renamed(record.state))
    return dataclasses.replace(
        snapshot,
        params=renamed(snapshot.params),
        buffers=renamed(snapshot.buffers),
        optimizer=record,
        nonfinite=[strip(k) for k in snapshot.nonfinite],
    )

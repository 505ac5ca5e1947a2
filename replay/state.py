"""A snapshot's weights and buffers, and the probes, on the replay device in a given dtype."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from recorder.rundir.errors import RunDirError
from recorder.rundir.snapshot import Snapshot


def cast(t: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A fresh copy of ``t`` on ``device``, floating point values in ``dtype``.

    Always a copy: tensors read from a file may sit at any address, and CPU kernels round
    differently with the alignment of their data, which would make replays irreproducible.
    """
    return t.to(device, dtype if t.is_floating_point() else t.dtype, copy=True)


def snapshot_state(
    model: nn.Module, snapshot: Snapshot, device: torch.device, dtype: torch.dtype
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The snapshot's parameters and ``model``'s buffers (overridden by the snapshot's) on
    ``device`` in ``dtype``: name -> ``[*shape]`` each."""
    params = {k: cast(snapshot.params[k], device, dtype) for k, _ in model.named_parameters()}
    own = dict(model.named_buffers())
    extra = sorted(set(snapshot.buffers) - set(own))
    if extra:
        raise RunDirError(f"snapshot step {snapshot.step}: buffers {extra[:3]} are not in the model")
    return params, {k: cast(snapshot.buffers.get(k, v), device, dtype) for k, v in own.items()}

"""Per-sample gradients and the virtual updates of a block of probes.

The loss is evaluated in float64 on the outputs in every arithmetic (the loss gradient
``softmax - one-hot`` of a well fitted probe cancels, in float32 by up to a half). For
``cross_entropy`` the network runs in the fast dtype (the logits' own rounding does not matter
there); for squared losses, whose residual ``f - y`` cancels in the forward pass itself, in the
exact dtype (:func:`network_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad

from recorder.losses import per_sample_loss
from recorder.models import forward
from recorder.rundir.errors import ReplayError
from recorder.rundir.probes import Inputs, map_inputs
from recorder.rundir.snapshot import Snapshot
from replay.batching import BATCHINGS
from replay.plan import Arithmetic


def network_dtype(loss: str, arithmetic: Arithmetic) -> torch.dtype:
    """The dtype the network runs in for the per-sample gradients (module docstring)."""
    return arithmetic.fast if loss == "cross_entropy" else arithmetic.exact


def per_sample_grads(
    model: nn.Module,
    loss: str,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Inputs,
    y: Tensor,
    loss_dtype: torch.dtype | None = None,
    strategy: str = "vmap",
    with_outputs: bool = False,
    scale: float = 1.0,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Gradient of each sample's loss alone: x ``[B, ...]`` (or named tensors, see
    :mod:`recorder.rundir.probes`), y ``[B]`` or ``[B, C]`` -> name ->
    ``[B, *shape]`` (in the dtype of ``params``). ``loss_dtype``: the dtype the outputs are cast
    to before the loss (default: theirs); ``strategy``: ``vmap`` over the samples or a ``loop``
    (:mod:`replay.batching`); ``with_outputs``: also return the model's outputs ``[B, C]`` (in the
    dtype of ``params``), which the pass computes anyway; ``scale``: the gradient of ``scale``
    times the loss."""

    def sample_loss(p: dict[str, Tensor], xi: Inputs, yi: Tensor) -> tuple[Tensor, Tensor]:
        outputs = forward(model, map_inputs(lambda t: t.unsqueeze(0), xi), (p, buffers))
        cast = outputs if loss_dtype is None else outputs.to(loss_dtype)
        yi = yi.to(cast.dtype) if yi.is_floating_point() else yi
        return scale * per_sample_loss(loss, cast, yi.unsqueeze(0))[0], outputs[0].detach()

    grads, outputs = BATCHINGS[strategy].map(grad(sample_loss, has_aux=True), (params,), (x, y))
    return (grads, outputs) if with_outputs else grads


def block_updates(
    update: Callable[..., dict[str, Tensor]],
    scale: float | None,
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    snapshot: Snapshot,
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """The updates (name -> ``[B, *shape]``) of a block from its per-sample gradients ``grads``
    (same shapes, in the dtype of ``params``) by the rule ``update`` at ``params``, and the
    gradients (None where they were taken of ``scale`` times the loss: they are the updates)."""
    if scale is not None:  # the gradients of c L are the updates c g
        return grads, None
    try:
        return update(params, grads, snapshot.optimizer), grads
    except ReplayError as e:
        raise ReplayError(f"snapshot step {snapshot.step}: {e}") from None


def update_norms(updates: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """``||U_i||`` over every weight ``[B]`` in ``dtype`` from the updates (name -> ``[B, *shape]``)."""
    return torch.stack([u.flatten(1).norm(dim=1) for u in updates.values()]).to(dtype).norm(dim=0)

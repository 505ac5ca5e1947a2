"""The training losses, defined once: training averages them over a batch, replay takes their
per-sample gradients (the functions work under ``torch.func.vmap``).

- ``cross_entropy``: outputs [N, C] logits, targets [N] int64 classes (or [N, C] probabilities).
- ``mse``: torch's mean of squared errors over the outputs of each sample; targets [N, C].
- ``half_sse``: ``0.5 * sum`` of squared errors over the outputs of each sample; targets [N, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recorder.rundir.spec import LOSSES


def per_sample_loss(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The loss of each sample: outputs [N, C], targets [N] or [N, C] -> [N]."""
    if name == "cross_entropy":
        return F.cross_entropy(outputs, targets, reduction="none")
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    if targets.shape != outputs.shape:
        raise ValueError(
            f"loss {name!r} needs targets shaped like the outputs {tuple(outputs.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    squares = (outputs - targets).square().flatten(1)
    return squares.mean(dim=1) if name == "mse" else 0.5 * squares.sum(dim=1)


def batch_loss(name: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training objective: the mean of :func:`per_sample_loss` over the batch -> scalar."""
    return per_sample_loss(name, outputs, targets).mean()

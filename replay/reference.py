"""The paper's procedure as a plain loop: for every probe, a deep copy of the model and a real
optimizer take one step on that probe alone, and the copy is evaluated on all probes.

It is the oracle of the replay tests and the baseline of the benchmark (``cli.py bench``): the
engine must agree with it to float rounding and beat it on time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recorder.losses import batch_loss
from recorder.models import forward
from recorder.rundir.probes import Inputs, num_probes, take


def stepped_copies(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss: str,
    x: Inputs,
    y: Tensor,
) -> Iterator[nn.Module]:
    """For each probe ``i`` of x ``[P, ...]`` (or named tensors), y ``[P]`` / ``[P, C]``: a deep copy of ``model`` after
    one step of ``make_optimizer(copy)`` on probe ``i`` alone (the optimizer may load a state).
    An update rule's own optimizer is ``RULES[config.rule].reference(config, record)``
    (:class:`replay.updates.Rule`)."""
    for i in range(num_probes(x)):
        clone = copy.deepcopy(model)
        optimizer = make_optimizer(clone)
        optimizer.zero_grad()
        batch_loss(loss, forward(clone, take(x, slice(i, i + 1))), y[i : i + 1]).backward()
        optimizer.step()
        yield clone


def plain_changes(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss: str,
    x: Inputs,
    y: Tensor,
) -> tuple[Tensor, Tensor]:
    """Base outputs ``f(x_j; w)`` ``[P, C]`` and new outputs ``f(x_j; w_i+)`` ``[P, P, C]`` (row ``i``:
    the copy stepped on probe ``i``, see :func:`stepped_copies`)."""
    with torch.no_grad():
        base = forward(model, x)
    rows = []
    for clone in stepped_copies(model, make_optimizer, loss, x, y):
        with torch.no_grad():
            rows.append(forward(clone, x))
    return base, torch.stack(rows)


def plain_measures(base: Tensor, new: Tensor, eps: float = 1e-8) -> dict[str, Tensor]:
    """Every classification measure by its textbook formula from base ``[P, C]`` and new outputs
    ``[P, P, C]``: name -> ``S`` ``[P, P]``, ``S[i, j] = N[i, j] / (N[i, i] + eps)``, and
    ``seed_orig`` as the paper's notebooks compute it."""
    p, q = base.softmax(-1).expand_as(new), new.softmax(-1)
    log_p, log_q = base.log_softmax(-1).expand_as(new), new.log_softmax(-1)
    numerators = {
        "orig_logits_l2": (new - base).norm(dim=-1),
        "orig_logits_l1": (new - base).abs().sum(-1),
        "orig_probs_l2": (q - p).norm(dim=-1),
        "orig_probs_l1": (q - p).abs().sum(-1),
        "kl": (p * (log_p - log_q)).sum(-1),
        "kl_reverse": (q * (log_q - log_p)).sum(-1),
        # the paper's call, kl_div(softmax(new), softmax(old)) with its default mean reduction, per pair
        "seed_kl": F.kl_div(q, p, reduction="none").mean(-1),
    }
    ratios = {name: N / (N.diagonal()[:, None] + eps) for name, N in numerators.items()}
    # the notebooks' orig: sqrt of the elementwise squared error averaged over classes, over the
    # square root of the mean squared error at the updated probe itself, plus eps
    numerator = torch.sqrt(F.mse_loss(q, p, reduction="none")).mean(-1)
    denominator = torch.stack([torch.sqrt(F.mse_loss(q[i, i], p[i, i])) + eps for i in range(len(q))])
    ratios["seed_orig"] = numerator / denominator[:, None]
    return ratios

"""Virtual update rules ``U(g)`` (SPEC §2), for a batch of per-sample gradients at once.

An update rule maps the weights ``params`` (name -> ``[*shape]``), per-sample gradients ``grads``
(name -> ``[B, *shape]``, row ``b`` the gradient of probe ``b`` alone) and the snapshot's
:class:`~recorder.runfiles.OptimizerRecord` (or None) to per-sample updates (name ->
``[B, *shape]``): ``w + U[b]`` is the weight after one optimizer step on probe ``b`` alone.

The arithmetic follows torch's single-tensor ``SGD`` / ``Adam`` step operation by operation, so
that the update agrees with a real ``optimizer.step()`` to float rounding:

- ``sgd``: ``-lr * (g + weight_decay * w)`` (torch.optim.SGD without momentum).
- ``adam-fresh``: one step of a brand-new ``torch.optim.Adam(lr, betas, eps)``, bias corrections
  included (``≈ -lr * g / (|g| + eps)``).
- ``recorded``: the training optimizer's next step from its recorded state (SGD with momentum,
  dampening, nesterov, weight decay, maximize; Adam / AdamW with coupled or decoupled weight
  decay, amsgrad, maximize), with each parameter's own group hyperparameters. A parameter with
  no state yet steps like a fresh optimizer; one in no parameter group is not updated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from recorder.rundir.errors import ReplayError
from recorder.rundir.snapshot import OptimizerRecord
from replay.config import UpdateConfig

UpdateRule = Callable[[dict[str, Tensor], dict[str, Tensor], OptimizerRecord | None], dict[str, Tensor]]

SUPPORTED_OPTIMIZERS = ("SGD", "Adam", "AdamW")

# Group hyperparameters each optimizer type needs (torch writes all of them in every param group).
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}


def sgd_step(
    w: Tensor,
    g: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> Tensor:
    """``torch.optim.SGD``'s step: w ``[*shape]``, g ``[B, *shape]``, state ``{"momentum_buffer":
    [*shape]}`` (absent: the first step) -> U ``[B, *shape]``."""
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(w, alpha=weight_decay)
    if momentum != 0:
        if "momentum_buffer" in state:
            g_momentum = _state(state, "momentum_buffer", w).mul(momentum).add(g, alpha=1 - dampening)
        else:  # the first step: the buffer starts as the gradient
            g_momentum = g
        g = g.add(g_momentum, alpha=momentum) if nesterov else g_momentum
    return g.mul(-lr)


def adam_step(
    w: Tensor,
    g: Tensor,
    state: dict[str, Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
) -> Tensor:
    """``torch.optim.Adam`` / ``AdamW``'s step: w ``[*shape]``, g ``[B, *shape]``, state
    ``{"step", "exp_avg", "exp_avg_sq"[, "max_exp_avg_sq"]}`` (empty: a fresh optimizer)
    -> U ``[B, *shape]``.

    A fresh optimizer's step is computed from its closed form ``-lr g / (|g| + eps)`` (SPEC §3,
    ``amsgrad`` or not): torch's sequence of moments and bias corrections gives the same value up
    to a few roundings of the working dtype, at twice the memory traffic."""
    beta1, beta2 = betas
    if maximize:
        g = -g
    decay = None
    if weight_decay != 0:
        if decoupled_weight_decay:
            decay = w.mul(1 - lr * weight_decay) - w
        else:
            g = g.add(w, alpha=weight_decay)
    if not state:  # a fresh optimizer: m_hat = g and v_hat = g^2 (the bias corrections undo the betas)
        fresh = torch.div(g, g.abs().add_(eps)).mul_(-lr)  # -lr g / (|g| + eps), in four passes, not nine
        return fresh if decay is None else fresh.add_(decay)
    exp_avg = torch.lerp(_state(state, "exp_avg", w), g, 1 - beta1)
    exp_avg_sq = _state(state, "exp_avg_sq", w).mul(beta2).addcmul(g, g, value=1 - beta2)
    step = float(state["step"]) + 1
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    if amsgrad:
        exp_avg_sq = torch.maximum(_state(state, "max_exp_avg_sq", w), exp_avg_sq)
    denom = _denominator(exp_avg_sq, bias_correction2_sqrt, eps)  # fresh tensors: in place
    if decay is None:  # addcdiv(0, exp_avg, denom, value) without a tensor of zeros
        return exp_avg.mul_(-lr / bias_correction1).div_(denom)
    return torch.addcdiv(decay, exp_avg, denom, value=-lr / bias_correction1)


def _denominator(exp_avg_sq: Tensor, bias_correction2_sqrt: float, eps: float) -> Tensor:
    """``exp_avg_sq.sqrt_().div_(bias_correction2_sqrt).add_(eps)`` (in place, ``exp_avg_sq >= 0``),
    the same values, faster on a CPU.

    torch's CPU square root (MKL's vector math) takes a slow path on exact zeros (8 times the time
    of other values, measured on an AMD EPYC), and most entries of a ReLU network's per-sample
    gradients, so of ``exp_avg_sq``, are exact zeros (84% of ResNet-18's in ``cli.py bench``).
    Where every value below the smallest normal number ``tiny`` ends as ``eps`` (checked: the
    result for ``tiny`` equals the one for zero, in the tensor's dtype; rounding is monotone, so
    then so does every value between), those values are raised to ``tiny`` before the root: no
    zero reaches it and no result changes (``eps`` of 1e-8 in float32 or float64, say).
    """
    if exp_avg_sq.device.type == "cpu":
        tiny = torch.finfo(exp_avg_sq.dtype).tiny
        ends = torch.tensor([0.0, tiny], dtype=exp_avg_sq.dtype).sqrt_().div_(bias_correction2_sqrt).add_(eps)
        if ends[0] == ends[1]:
            exp_avg_sq.clamp_min_(tiny)
    return exp_avg_sq.sqrt_().div_(bias_correction2_sqrt).add_(eps)


def _state(state: dict[str, Tensor], key: str, w: Tensor) -> Tensor:
    """A state tensor on ``w``'s device and dtype; zeros where the optimizer has none yet."""
    return state[key].to(w, copy=True) if key in state else torch.zeros_like(w)  # aligned copy: reproducible


def check_optimizer(record: OptimizerRecord | None, where: str) -> None:
    """Raise :class:`ReplayError` unless ``record`` can drive the ``recorded`` rule."""
    alternatives = "use --update adam-fresh or --update sgd instead"
    if record is None:
        raise ReplayError(
            f"{where} was recorded without optimizer state, which --update recorded needs "
            f"(supported optimizers: {', '.join(SUPPORTED_OPTIMIZERS)}); {alternatives}"
        )
    if record.type not in SUPPORTED_OPTIMIZERS:
        raise ReplayError(
            f"{where}: optimizer {record.type!r} is not supported by --update recorded "
            f"(supported: {', '.join(SUPPORTED_OPTIMIZERS)}); {alternatives}"
        )


def _hyperparameters(record: OptimizerRecord, group: dict[str, Any], where: str) -> dict[str, Any]:
    """The keyword arguments of :func:`sgd_step` / :func:`adam_step` from one recorded group."""
    keys = _SGD_KEYS if record.type == "SGD" else _ADAM_KEYS
    missing = [k for k in keys if k not in group]
    if missing:
        raise ReplayError(f"{where}: {record.type} parameter group lacks hyperparameters {missing}")
    hyper = {k: group[k] for k in keys}
    if record.type != "SGD":
        hyper["betas"] = tuple(hyper["betas"])
        hyper["decoupled_weight_decay"] = record.type == "AdamW" or bool(group.get("decoupled_weight_decay"))
    return hyper


def recorded_update(
    params: dict[str, Tensor], grads: dict[str, Tensor], record: OptimizerRecord | None
) -> dict[str, Tensor]:
    """The ``recorded`` rule: the recorded optimizer's next step on each probe alone."""
    check_optimizer(record, "the snapshot")
    step = adam_step if record.type in ("Adam", "AdamW") else sgd_step
    group_of = {name: group for group in record.groups for name in group["params"]}
    updates = {}
    for name, w in params.items():
        if name not in group_of:
            updates[name] = torch.zeros_like(grads[name])
            continue
        hyper = _hyperparameters(record, group_of[name], f"parameter {name!r}")
        state = record.state.get(name, {})
        required = _ADAM_STATE | ({"max_exp_avg_sq"} if hyper.get("amsgrad") else set())
        if step is adam_step and state and not required <= state.keys():
            raise ReplayError(f"parameter {name!r}: Adam state lacks {sorted(required - state.keys())}")
        updates[name] = step(w, grads[name], state, **hyper)
    return updates


def gradient_scale(config: UpdateConfig) -> float | None:
    """``c`` where the rule's update is the gradient scaled by one number, ``U = c * g`` (``sgd``
    without weight decay: ``c = -lr``), else None. The engine then differentiates ``c`` times each
    probe's loss and takes those gradients as the updates: no pass over ``P`` copies of the
    weights to scale them (they agree with ``-lr * g`` to a rounding of the working dtype)."""
    return -config.lr if config.rule == "sgd" and config.weight_decay == 0 else None


def update_rule(config: UpdateConfig) -> UpdateRule:
    """The update rule named by ``config.rule`` (see the module docstring)."""
    if config.rule == "recorded":
        return recorded_update
    if config.rule == "sgd":

        def sgd(params, grads, record):
            return {
                k: sgd_step(w, grads[k], {}, lr=config.lr, weight_decay=config.weight_decay)
                for k, w in params.items()
            }

        return sgd

    def adam_fresh(params, grads, record):
        return {
            k: adam_step(w, grads[k], {}, lr=config.lr, betas=config.betas, eps=config.eps)
            for k, w in params.items()
        }

    return adam_fresh

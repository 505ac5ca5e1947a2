"""Virtual update rules ``U(g)``, for a batch of per-sample gradients at once: each rule's
arithmetic, bound to its declaration (:mod:`replay.rules`).

An update rule maps the weights ``params`` (name -> ``[*shape]``), per-sample gradients ``grads``
(name -> ``[B, *shape]``, row ``b`` the gradient of probe ``b`` alone) and the snapshot's
:class:`~recorder.rundir.snapshot.OptimizerRecord` (or None) to per-sample updates (name ->
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

Each rule is one :class:`Rule` in the registry :data:`RULES`: its declaration (name, help,
settings, whether it reads the recorded optimizer; :data:`replay.rules.RULES`, read without
torch by the configuration and the command line) bound by :func:`bind` to how to build it, its
``torch.optim`` reference, the check of a recorded optimizer and its capabilities. The engine,
the benchmark and the replay's checks read it; a new rule is one ``declare`` in
:mod:`replay.rules` and one :func:`bind` here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from recorder.rundir.errors import ReplayError, RunDirError
from recorder.rundir.files import is_number
from recorder.rundir.snapshot import OptimizerRecord, Snapshot
from replay.rules import RECORDED_OPTIMIZERS, Declaration
from replay.rules import RULES as DECLARATIONS
from replay.state import cast

if TYPE_CHECKING:  # replay.config reads the declarations: imported for annotations only
    from replay.config import UpdateConfig

UpdateRule = Callable[[dict[str, Tensor], dict[str, Tensor], OptimizerRecord | None], dict[str, Tensor]]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class Rule:
    """One update rule of the registry :data:`RULES`.

    - ``declaration``: its :class:`~replay.rules.Declaration` (``name``, ``help``, ``settings``,
      ``needs_state``, also read as attributes of the rule);
    - ``build(config)``: the rule as an :data:`UpdateRule`;
    - ``reference(config, record)``: a factory of the real ``torch.optim`` optimizer whose one
      ``step()`` on a model is the rule (the oracle of the tests and the benchmark's loop);
    - ``check(record, params, where)``: for a rule that reads the snapshot's optimizer record
      (``needs_state``), raise unless ``record`` can drive it on weights ``params`` (name ->
      ``[*shape]``); None: the rule reads no record;
    - ``scale(config)``: ``c`` where the update is the gradient scaled by one number, ``U = c * g``,
      else None; None: never.
    """

    declaration: Declaration
    build: Callable[[UpdateConfig], UpdateRule]
    reference: Callable[[UpdateConfig, OptimizerRecord | None], OptimizerFactory]
    check: Callable[[OptimizerRecord | None, dict[str, Tensor], str], None] | None = None
    scale: Callable[[UpdateConfig], float | None] | None = None

    @property
    def name(self) -> str:
        return self.declaration.name

    @property
    def help(self) -> str:
        return self.declaration.help

    @property
    def settings(self) -> tuple[str, ...]:
        return self.declaration.settings

    @property
    def needs_state(self) -> bool:
        return self.declaration.needs_state


RULES: dict[str, Rule] = {}  # name -> rule, one per declaration of replay.rules, in binding order


def bind(
    name: str,
    build: Callable[[UpdateConfig], UpdateRule],
    reference: Callable[[UpdateConfig, OptimizerRecord | None], OptimizerFactory],
    check: Callable[[OptimizerRecord | None, dict[str, Tensor], str], None] | None = None,
    scale: Callable[[UpdateConfig], float | None] | None = None,
) -> Rule:
    """Bind the declaration ``name`` of :data:`replay.rules.RULES` to its arithmetic (the
    :class:`Rule` fields) and add the rule to :data:`RULES`: a ``check`` exactly for a rule that
    reads the recorded optimizer."""
    declaration = DECLARATIONS[name]
    if name in RULES:
        raise ValueError(f"update rule {name!r} is bound twice")
    if (check is not None) != declaration.needs_state:
        raise ValueError(f"update rule {name!r}: a check of the recorded optimizer exactly when it reads one")
    RULES[name] = rule = Rule(declaration, build, reference, check, scale)
    return rule


# ----------------------------------------------------------------------------- the arithmetic


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

    A fresh optimizer's step is computed from its closed form ``-lr g / (|g| + eps)`` (``amsgrad``
    or not): torch's sequence of moments and bias corrections gives the same value up
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
    """A state tensor ``[*shape]`` on ``w``'s device and dtype (itself where it is there already:
    :func:`record_on_device` puts a snapshot's there once); zeros where the optimizer has none yet.
    The steps never write into it."""
    return state[key].to(w) if key in state else torch.zeros_like(w)


# ----------------------------------------------------------------------------- the recorded optimizer

# Per supported optimizer type: its step and the group hyperparameters the step reads (torch
# writes all of them in every parameter group).
_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
_ADAM_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
_OPTIMIZERS: dict[str, tuple[Callable[..., Tensor], tuple[str, ...]]] = {
    "SGD": (sgd_step, _SGD_KEYS),
    "Adam": (adam_step, _ADAM_KEYS),
    "AdamW": (adam_step, _ADAM_KEYS),
}
if tuple(_OPTIMIZERS) != RECORDED_OPTIMIZERS:  # the types the recorded rule's declaration names
    raise ImportError(f"replay.rules.RECORDED_OPTIMIZERS {RECORDED_OPTIMIZERS} != {tuple(_OPTIMIZERS)}")
_ADAM_STATE = {"step", "exp_avg", "exp_avg_sq"}  # a parameter's Adam state, when it has one
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # shaped like the parameter
_NUMBERS = ("lr", "eps", "weight_decay", "momentum", "dampening")  # group hyperparameters
_FLAGS = ("amsgrad", "nesterov", "maximize", "decoupled_weight_decay")
# The ranges [low, high) of the group hyperparameters that torch.optim's constructors accept (each
# beta alone), as messages say them; the others: any finite number.
_RANGES = {
    "lr": (0.0, math.inf, "a finite number of at least 0"),
    "eps": (0.0, math.inf, "a finite number of at least 0"),
    "weight_decay": (0.0, math.inf, "a finite number of at least 0"),
    "momentum": (0.0, math.inf, "a finite number of at least 0"),
    "betas": (0.0, 1.0, "two numbers in [0, 1)"),
}
_ANY_FINITE = (-math.inf, math.inf, "a finite number")


_ALTERNATIVES = "use --update adam-fresh or --update sgd instead"  # to the recorded rule


def check_record(record: OptimizerRecord | None, params: dict[str, Tensor], where: str) -> None:
    """Raise unless ``record`` can drive the ``recorded`` rule on weights ``params`` (name ->
    ``[*shape]``): :class:`ReplayError` for no record, an unsupported optimizer, a group without
    its hyperparameters or an incomplete Adam state; :class:`RunDirError` for hyperparameters of
    the wrong types, not finite or outside the ranges ``torch.optim`` accepts (:data:`_RANGES`),
    state tensors not shaped like their parameters, or an Adam ``step`` that is not one finite
    count."""
    _checked_record(record, params, where)


def _required(record: OptimizerRecord | None, where: str) -> OptimizerRecord:
    """``record``; :class:`ReplayError` when there is none."""
    if record is None:
        raise ReplayError(
            f"{where} was recorded without optimizer state, which --update recorded needs "
            f"(supported optimizers: {', '.join(_OPTIMIZERS)}); {_ALTERNATIVES}"
        )
    return record


def _checked_record(record: OptimizerRecord | None, params: dict[str, Tensor], where: str) -> OptimizerRecord:
    """:func:`check_record`, returning ``record``."""
    supported = ", ".join(_OPTIMIZERS)
    record = _required(record, where)
    if record.type not in _OPTIMIZERS:
        raise ReplayError(
            f"{where}: optimizer {record.type!r} is not supported by --update recorded "
            f"(supported: {supported}); {_ALTERNATIVES}"
        )
    for index, group in enumerate(record.groups):
        missing = [k for k in _OPTIMIZERS[record.type][1] if k not in group]
        if missing:
            raise ReplayError(f"{where}: {record.type} parameter group lacks hyperparameters {missing}")
        betas = group.get("betas", (0.0, 0.0))
        if not (
            all(is_number(group[k]) for k in _NUMBERS if k in group)
            and all(isinstance(group[k], bool) for k in _FLAGS if k in group)
            and isinstance(betas, list | tuple)
            and len(betas) == 2
            and all(is_number(b) for b in betas)
        ):
            raise RunDirError(
                f"{where}: malformed optimizer hyperparameters { ({k: group[k] for k in group if k != 'params'}) }"
            )
        problem = _out_of_range(group)
        if problem:
            raise RunDirError(
                f"{where}: optimizer parameter group {index}: {problem} (the range torch.optim.{record.type} accepts)"
            )
    group_of = {name: group for group in record.groups for name in group["params"]}
    for name, state in record.state.items():
        for key in _STATE_KEYS:
            if key in state and name in params and state[key].shape != params[name].shape:
                raise RunDirError(
                    f"{where}: optimizer state {key!r} of {name!r} has shape {tuple(state[key].shape)}, "
                    f"the parameter {tuple(params[name].shape)}"
                )
        if record.type != "SGD" and state and name in group_of:
            required = _ADAM_STATE | ({"max_exp_avg_sq"} if group_of[name]["amsgrad"] else set())
            if not required <= state.keys():
                raise ReplayError(f"{where}: Adam state of {name!r} lacks {sorted(required - state.keys())}")
            step = state["step"]
            if step.numel() != 1 or not bool(torch.isfinite(step).all()) or float(step) < 0:
                shown = step.flatten()[:4].tolist() + (["..."] if step.numel() > 4 else [])
                raise RunDirError(
                    f"{where}: optimizer state 'step' of {name!r} is {shown} (shape {tuple(step.shape)}), "
                    "must be one finite count of at least 0"
                )
    return record


def _out_of_range(group: dict[str, Any]) -> str | None:
    """Which hyperparameter of one parameter group (their types checked) is outside the range
    that ``torch.optim``'s constructors accept (:data:`_RANGES`), or not finite, and what it must
    be; None when all are in range. (A beta of 1 would divide by zero in the bias correction; a
    NaN or infinite value would make every measure NaN.)"""
    for key in (*_NUMBERS, "betas"):
        if key in group:
            low, high, allowed = _RANGES.get(key, _ANY_FINITE)
            values = group[key] if key == "betas" else [group[key]]
            if not all(_finite(v) and low <= v < high for v in values):
                return f"{key!r} is {group[key]!r}, must be {allowed}"
    return None


def _finite(value: float) -> bool:
    """Whether the JSON number ``value`` is finite as a float (a huge integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _hyperparameters(record_type: str, group: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`sgd_step` / :func:`adam_step` from one checked group."""
    hyper = {k: group[k] for k in _OPTIMIZERS[record_type][1]}
    if record_type != "SGD":
        hyper["betas"] = tuple(hyper["betas"])
        hyper["decoupled_weight_decay"] = record_type == "AdamW" or bool(group.get("decoupled_weight_decay"))
    return hyper


def record_on_device(
    config: UpdateConfig, snapshot: Snapshot, device: torch.device, dtype: torch.dtype
) -> Snapshot:
    """``snapshot`` with its optimizer record's state tensors shaped like their parameters
    (``[*shape]`` each; a step count stays where it is) on ``device`` in ``dtype``, where the rule
    of ``config`` reads the record (``snapshot`` itself elsewhere): moved once for every block of
    a pass, not by each block. Fresh copies (:func:`~replay.state.cast`): CPU kernels round
    differently with the alignment of their data, and tensors read from a file may sit at any
    address."""
    record = snapshot.optimizer
    if record is None or not RULES[config.rule].needs_state:
        return snapshot
    state = {
        name: {k: cast(v, device, dtype) if k in _STATE_KEYS else v for k, v in tensors.items()}
        for name, tensors in record.state.items()
    }
    return dataclasses.replace(snapshot, optimizer=dataclasses.replace(record, state=state))


def recorded_update(
    params: dict[str, Tensor], grads: dict[str, Tensor], record: OptimizerRecord | None
) -> dict[str, Tensor]:
    """The ``recorded`` rule: the recorded optimizer's next step on each probe alone (params
    ``[*shape]``, grads ``[B, *shape]`` -> U ``[B, *shape]`` per name)."""
    record = _checked_record(record, params, "the snapshot")
    step = _OPTIMIZERS[record.type][0]
    group_of = {name: group for group in record.groups for name in group["params"]}
    return {
        name: step(
            w, grads[name], record.state.get(name, {}), **_hyperparameters(record.type, group_of[name])
        )
        if name in group_of
        else torch.zeros_like(grads[name])
        for name, w in params.items()
    }


def recorded_optimizer(config: UpdateConfig, record: OptimizerRecord | None) -> OptimizerFactory:
    """The recorded optimizer as a real one: ``torch.optim.<type>`` over the model's parameters with
    the recorded groups, its state loaded (copies) by parameter name."""
    record = _required(record, "the snapshot")

    def make(model: nn.Module) -> torch.optim.Optimizer:
        params = dict(model.named_parameters())
        groups = [
            {k: v for k, v in group.items() if k != "params"}
            | {"params": [params[n] for n in group["params"]]}
            for group in record.groups
        ]
        optimizer = getattr(torch.optim, record.type)(groups)
        for name, state in record.state.items():
            optimizer.state[params[name]] = {k: v.clone() for k, v in state.items()}
        return optimizer

    return make


# ----------------------------------------------------------------------------- the rules


def _sgd(config: UpdateConfig) -> UpdateRule:
    def sgd(params, grads, record):
        return {
            k: sgd_step(w, grads[k], {}, lr=config.lr, weight_decay=config.weight_decay)
            for k, w in params.items()
        }

    return sgd


def _adam_fresh(config: UpdateConfig) -> UpdateRule:
    def adam_fresh(params, grads, record):
        return {
            k: adam_step(w, grads[k], {}, lr=config.lr, betas=config.betas, eps=config.eps)
            for k, w in params.items()
        }

    return adam_fresh


bind(
    "sgd",
    build=_sgd,
    reference=lambda c, record: (
        lambda m: torch.optim.SGD(m.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    ),
    scale=lambda c: -c.lr if c.weight_decay == 0 else None,
)
bind(
    "adam-fresh",
    build=_adam_fresh,
    reference=lambda c, record: (
        lambda m: torch.optim.Adam(m.parameters(), lr=c.lr, betas=c.betas, eps=c.eps)
    ),
)
bind("recorded", build=lambda config: recorded_update, reference=recorded_optimizer, check=check_record)
if RULES.keys() != DECLARATIONS.keys():  # a declared rule without arithmetic
    raise ImportError(f"update rules declared but not bound: {sorted(DECLARATIONS.keys() - RULES.keys())}")


# ----------------------------------------------------------------------------- the engine's API


def update_rule(config: UpdateConfig) -> UpdateRule:
    """The update rule named by ``config.rule`` (see the module docstring)."""
    return RULES[config.rule].build(config)


def gradient_scale(config: UpdateConfig) -> float | None:
    """``c`` where the rule's update is the gradient scaled by one number, ``U = c * g`` (``sgd``
    without weight decay: ``c = -lr``), else None. The engine then differentiates ``c`` times each
    probe's loss and takes those gradients as the updates: no pass over ``P`` copies of the
    weights to scale them (they agree with ``-lr * g`` to a rounding of the working dtype)."""
    scale = RULES[config.rule].scale
    return None if scale is None else scale(config)

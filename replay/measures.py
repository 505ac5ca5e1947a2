"""The S_rel measures of SPEC §3, computed from output changes.

Every measure is a ratio ``S[i, j] = N[i, j] / (N[i, i] + eps)`` of a numerator ``N`` that a
:class:`Measure` computes from the :class:`Changes` of a block of updated probes ``i``: the base
outputs ``f(x_j; w)`` ``[P, C]`` and the output changes ``delta`` ``[B, P, C]``, the finite change
``D[i, j] = f(x_j; w + U_i) - f(x_j; w)``, or for ``linear`` the Jacobian-vector product
``J_j . U_i``.

Probability-space numerators are written in terms of ``delta`` (``log1p`` / ``expm1``) instead of
as differences of two softmaxes, so that a tiny change keeps its relative precision:
with ``p = softmax(base)`` and ``q = softmax(base + delta)``, ``log q - log p = delta - L`` where
``L = log(sum_c p_c exp(delta_c)) = log1p(sum_c p_c expm1(delta_c))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from replay.config import ReplayError


class Changes:
    """The output changes of a block of updated probes and what the measures derive from them,
    each computed once: ``base`` ``[P, C]`` outputs ``f(x_j; w)``, ``delta`` ``[B, P, C]``."""

    def __init__(self, base: Tensor, delta: Tensor):
        self.base, self.delta = base, delta

    @cached_property
    def p(self) -> Tensor:
        """``softmax(base)`` ``[P, C]``."""
        return torch.softmax(self.base, dim=-1)

    @cached_property
    def shift(self) -> Tensor:
        """``L = log(sum_c p_c exp(delta_c)) = log1p(sum_c p_c expm1(delta_c))`` ``[B, P, 1]``."""
        return torch.log1p((self.p * torch.expm1(self.delta)).sum(-1, keepdim=True))

    @cached_property
    def log_ratio(self) -> Tensor:
        """``log q - log p = delta - L`` ``[B, P, C]``, ``q = softmax(base + delta)``."""
        return self.delta - self.shift


@dataclass(frozen=True)
class Measure:
    """A named numerator ``N`` ``[B, P]`` of the :class:`Changes` of a block."""

    name: str
    numerator: Callable[[Changes], Tensor]
    tasks: tuple[str, ...]
    linear: bool = False  # delta is the Jacobian-vector product, not the finite change


def _norm(ord: int) -> Callable[[Changes], Tensor]:
    """``||delta||_ord`` over outputs (logits or raw outputs)."""
    return lambda c: torch.linalg.vector_norm(c.delta, ord=ord, dim=-1)


def _probs_norm(ord: int) -> Callable[[Changes], Tensor]:
    """``||softmax(base + delta) - softmax(base)||_ord``, as ``p * expm1(delta - L)``."""
    return lambda c: torch.linalg.vector_norm(c.p * torch.expm1(c.log_ratio), ord=ord, dim=-1)


def _kl(c: Changes) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c) = L - sum_c p_c delta_c``."""
    return c.shift[..., 0] - (c.p * c.delta).sum(-1)


def _kl_reverse(c: Changes) -> Tensor:
    """``KL(q || p) = sum_c q_c (delta_c - L)``."""
    return (c.p * torch.exp(c.log_ratio) * c.log_ratio).sum(-1)


def _seed_kl(c: Changes) -> Tensor:
    """The paper's code, ``kl_div(softmax(new), softmax(old))`` per pair:
    ``mean_c p_c (log p_c - q_c)`` (probabilities ``q`` used as if they were log-probabilities)."""
    q = torch.softmax(c.base + c.delta, dim=-1)
    return (torch.xlogy(c.p, c.p) - c.p * q).mean(-1)


_CLS, _REG, _ALL = ("classification",), ("regression",), ("classification", "regression")

MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("orig_logits_l2", _norm(2), _CLS),
        Measure("orig_logits_l1", _norm(1), _CLS),
        Measure("orig_probs_l2", _probs_norm(2), _CLS),
        Measure("orig_probs_l1", _probs_norm(1), _CLS),
        Measure("kl", _kl, _CLS),
        Measure("kl_reverse", _kl_reverse, _CLS),
        Measure("seed_kl", _seed_kl, _CLS),
        Measure("orig_outputs_l2", _norm(2), _REG),
        Measure("orig_outputs_l1", _norm(1), _REG),
        Measure("linear", _norm(2), _ALL, linear=True),
    )
}


def resolve_measures(names: tuple[str, ...] | None, task: str) -> tuple[Measure, ...]:
    """The measures to compute for a run of ``task`` (None: all that apply, in table order)."""
    if names is None:
        return tuple(m for m in MEASURES.values() if task in m.tasks)
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise ReplayError(f"unknown measures {unknown}; known: {', '.join(MEASURES)}")
    wrong = [n for n in names if task not in MEASURES[n].tasks]
    if wrong:
        usable = [m for m, spec in MEASURES.items() if task in spec.tasks]
        raise ReplayError(f"measures {wrong} do not apply to a {task} run; use {', '.join(usable)}")
    return tuple(MEASURES[n] for n in dict.fromkeys(names))


def ratio(numerator: Tensor, rows: Tensor, eps: float) -> Tensor:
    """``S[b, j] = N[b, j] / (N[b, rows[b]] + eps)``: N ``[B, P]``, rows ``[B]`` (probe index of
    each updated row) -> ``[B, P]``."""
    diagonal = numerator.gather(1, rows[:, None])
    return numerator / (diagonal + eps)

"""The S_rel measures of SPEC §3, computed from output changes.

Every measure is a ratio ``S[i, j] = N[i, j] / (N[i, i] + eps)`` of a numerator ``N`` that a
:class:`Measure` computes from the :class:`Changes` of a block of updated probes ``i``: the base
outputs ``f(x_j; w)`` ``[P, C]`` and the output changes ``delta`` ``[B, P, C]``, the finite change
``D[i, j] = f(x_j; w + U_i) - f(x_j; w)``, or for ``linear`` the Jacobian-vector product
``J_j . U_i``. One measure, ``seed_orig``, divides by another function of the self change:
``S[i, j] = N[i, j] / (N'[i, i] + eps)`` (:attr:`Measure.own`).

Probability-space numerators are written in terms of ``delta`` instead of as differences of two
softmaxes, so that a tiny change keeps its relative precision. With ``p = softmax(base)``,
``q = softmax(base + delta)`` and the centred change ``e = delta - sum_c p_c delta_c``
(``sum_c p_c e_c = 0``):

- ``KL(p || q) = K = log(sum_c p_c exp(e_c)) = log1p(sum_c p_c phi(e_c))``, ``phi(e) = exp(e) - 1 - e
  >= 0``: a sum of non-negative terms, with ``phi`` from its Taylor series for small ``e``, so ``K``
  (second order in ``delta``) keeps full relative precision however small the change;
- ``log q - log p = e - K``, ``q - p = p * expm1(e - K)``;
- ``KL(q || p) = sum_c q_c (e_c - K) = exp(-K) sum_c p_c e_c expm1(e_c) - K``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from recorder.rundir.errors import ReplayError


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
    def centred(self) -> Tensor:
        """``e = delta - sum_c p_c delta_c`` ``[B, P, C]``."""
        return self.delta - (self.p * self.delta).sum(-1, keepdim=True)

    @cached_property
    def kl(self) -> Tensor:
        """``K = KL(p || q) = log1p(sum_c p_c phi(e_c))`` ``[B, P]``."""
        return torch.log1p((self.p * _phi(self.centred)).sum(-1))

    @cached_property
    def log_ratio(self) -> Tensor:
        """``log q - log p = e - K`` ``[B, P, C]``."""
        return self.centred - self.kl[..., None]

    @cached_property
    def q(self) -> Tensor:
        """``q = softmax(base + delta) = p * exp(e - K)`` ``[B, P, C]``."""
        return self.p * torch.exp(self.log_ratio)

    @cached_property
    def prob_change(self) -> Tensor:
        """``q - p = p * expm1(e - K)`` ``[B, P, C]`` (no cancellation)."""
        return self.p * torch.expm1(self.log_ratio)


def _phi(e: Tensor) -> Tensor:
    """``exp(e) - 1 - e`` to full relative precision: its Taylor series up to ``e^6`` where
    ``|e| < 0.01`` (truncation below 1e-13 relative), ``expm1(e) - e`` elsewhere."""
    series = e * e * (1 / 2 + e * (1 / 6 + e * (1 / 24 + e * (1 / 120 + e / 720))))
    return torch.where(e.abs() < 0.01, series, torch.expm1(e) - e)


@dataclass(frozen=True)
class Measure:
    """A named numerator ``N`` ``[B, P]`` of the :class:`Changes` of a block; ``own`` ``[B, P]``,
    where set, is what the ratio takes at each row's own probe instead of ``N``."""

    name: str
    numerator: Callable[[Changes], Tensor]
    tasks: tuple[str, ...]
    linear: bool = False  # delta is the Jacobian-vector product, not the finite change
    own: Callable[[Changes], Tensor] | None = None


def _l2(t: Tensor) -> Tensor:
    return t.square().sum(-1).sqrt()


def _l1(t: Tensor) -> Tensor:
    return t.abs().sum(-1)


def _norm(norm: Callable[[Tensor], Tensor]) -> Callable[[Changes], Tensor]:
    """``||delta||`` over outputs (logits or raw outputs)."""
    return lambda c: norm(c.delta)


def _probs_norm(norm: Callable[[Tensor], Tensor]) -> Callable[[Changes], Tensor]:
    """``||softmax(base + delta) - softmax(base)||``, as ``p * expm1(delta - L)``."""
    return lambda c: norm(c.prob_change)


def _mean_abs_prob_change(c: Changes) -> Tensor:
    """``mean_c |q_c - p_c|``: the seed's ``sqrt(mse_loss(q, p, reduction="none")).mean(-1)``."""
    return c.prob_change.abs().mean(-1)


def _rms_prob_change(c: Changes) -> Tensor:
    """``sqrt(mean_c (q_c - p_c)^2)``: the seed's ``sqrt(mse_loss(q, p))`` (mean reduction)."""
    return c.prob_change.square().mean(-1).sqrt()


def _kl(c: Changes) -> Tensor:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` (see the module docstring)."""
    return c.kl


def _kl_reverse(c: Changes) -> Tensor:
    """``KL(q || p) = exp(-K) sum_c p_c e_c expm1(e_c) - K``."""
    return torch.exp(-c.kl) * (c.p * c.centred * torch.expm1(c.centred)).sum(-1) - c.kl


def _seed_kl(c: Changes) -> Tensor:
    """The paper's code, ``kl_div(softmax(new), softmax(old))`` per pair:
    ``mean_c p_c (log p_c - q_c)`` (probabilities ``q`` used as if they were log-probabilities)."""
    return (torch.xlogy(c.p, c.p) - c.p * c.q).mean(-1)


EPS_SHARE = 0.01  # eps beyond this share of a self change N'[i, i] dominates that row of S (eps_dominated)

_CLS, _REG, _ALL = ("classification",), ("regression",), ("classification", "regression")

MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("orig_logits_l2", _norm(_l2), _CLS),
        Measure("orig_logits_l1", _norm(_l1), _CLS),
        Measure("orig_probs_l2", _probs_norm(_l2), _CLS),
        Measure("orig_probs_l1", _probs_norm(_l1), _CLS),
        Measure("seed_orig", _mean_abs_prob_change, _CLS, own=_rms_prob_change),
        Measure("kl", _kl, _CLS),
        Measure("kl_reverse", _kl_reverse, _CLS),
        Measure("seed_kl", _seed_kl, _CLS),
        Measure("orig_outputs_l2", _norm(_l2), _REG),
        Measure("orig_outputs_l1", _norm(_l1), _REG),
        Measure("linear", _norm(_l2), _ALL, linear=True),
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


def ratio(numerator: Tensor, rows: Tensor, eps: float, own: Tensor | None = None) -> Tensor:
    """``S[b, j] = N[b, j] / (N'[b, rows[b]] + eps)``: N ``[B, P]``, rows ``[B]`` (probe index of
    each updated row), ``N'`` = ``own`` ``[B, P]`` (None: ``N``) -> ``[B, P]``."""
    return numerator / (self_change(numerator, rows, own)[:, None] + eps)


def self_change(numerator: Tensor, rows: Tensor, own: Tensor | None = None) -> Tensor:
    """``N'[b, rows[b]]`` ``[B]`` (arguments as :func:`ratio`): the self change that row ``b`` of
    ``S`` divides by, before ``eps``."""
    return (numerator if own is None else own).gather(1, rows[:, None])[:, 0]


def eps_dominated(self_change: Tensor, eps: float) -> Tensor:
    """Where ``eps`` exceeds :data:`EPS_SHARE` of a (finite, nonzero) self change ``[...]``: there
    ``S = N / (N' + eps)`` is mostly ``eps`` (a zero self change is a probe whose update is zero,
    whose row is zero whatever ``eps``) -> bool ``[...]``."""
    size = self_change.abs()
    return size.isfinite() & (size > 0) & (eps > EPS_SHARE * size)


def needs(measures: tuple[Measure, ...]) -> tuple[bool, bool]:
    """Whether ``measures`` need the finite change and the Jacobian-vector product."""
    return any(not m.linear for m in measures), any(m.linear for m in measures)


def evaluate(
    measures: tuple[Measure, ...], base: Tensor, changed: dict[str, Tensor], rows: Tensor, eps: float
) -> dict[str, Tensor]:
    """name -> ``S`` ``[B, J]`` of each of ``measures`` from base outputs ``[J, C]`` and the changes
    ``changed`` (``"finite"`` and / or ``"linear"``, ``[B, J, C]``); ``rows`` ``[B]``: the column of
    each row's own probe; ``eps`` as in :func:`ratio`."""
    return evaluate_with_self(measures, base, changed, rows, eps)[0]


def evaluate_with_self(
    measures: tuple[Measure, ...], base: Tensor, changed: dict[str, Tensor], rows: Tensor, eps: float
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """:func:`evaluate`, and name -> ``[B]`` the :func:`self_change` of each row (with it and ``S``,
    ``S`` under another ``eps`` follows: ``S * (self + eps) / (self + eps')``)."""
    changes = {  # by linear: those in ``changed``, as the measures need them (:func:`needs`)
        linear: Changes(base, changed[key])
        for linear, key in ((False, "finite"), (True, "linear"))
        if key in changed
    }
    ratios, selfs = {}, {}
    for m in measures:
        numerator = m.numerator(changes[m.linear])
        own = None if m.own is None else m.own(changes[m.linear])
        ratios[m.name] = ratio(numerator, rows, eps, own)
        selfs[m.name] = self_change(numerator, rows, own)
    return ratios, selfs

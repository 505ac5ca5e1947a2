"""The error estimate of a replayed snapshot: a bound on the real error of its measures.

The real error is :func:`relative_error` of the measures against the same measures computed in
float64 throughout (gradients, updates and changes, the changes propagated, so without
cancellation): the largest, over measures and updated probes ``i``, of ``||S[i] - S64[i]|| /
||S64[i]||``. The estimate has two parts, of every row:

- a rounding model, :func:`sensitivity`: by how much each row's measures move when the changes move
  by what the arithmetic rounds (the outputs of a difference, the float32 updates, the changes
  themselves; measures computed in float32, their own rounding). It costs the measures once more
  a block, covers every row and ranks them; in float64, with nothing to check against, it is all
  there is.
- a check of the :func:`check_rows` rows (``CHECK_ROWS``, fewer below ``CHECK_ROWS * CHECK_SHARE``
  probes, at least one) the model ranks worst (:class:`Kept` collects them block by block): they
  are recomputed as float64 computes them, their per-sample gradients and updates in float64 (what
  the float32 gradients and updates of a pass get wrong dominates the error of ``mixed``), their
  changes on their own probes and the ``CHECK_COLUMNS`` probes where the model moved each most
  (after a propagation, on every probe when that is most of them: the check then shares the pass's
  float64 evaluation of the model) propagated by :mod:`replay.difference` from float64 base values
  (from float32 ones its own error reached 3e-5 for ResNet-18 at tiny steps): in float32 for the
  arithmetics that difference (its own error, :data:`PROPAGATION_ERROR`, is a floor), in float64
  for ``mixed``; for a model ``torch.fx`` cannot trace, as a float64 difference.

The estimate is :func:`bound` of the larger of the checked error and the largest of the model:
:data:`SAFETY` times it, infinite from 1 up (``python -m replay.calibration`` measures real error /
estimate over models, update rules and precisions; README "Precision" has the numbers).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from recorder.losses import per_sample_loss
from recorder.rundir.probes import Inputs, num_probes, take
from recorder.rundir.snapshot import Snapshot
from replay.batching import Batching
from replay.changes import Difference, OutputChanges, Propagation
from replay.difference import BaseState, ChangePropagator
from replay.measures import Measure, evaluate, needs
from replay.plan import ARITHMETIC, Arithmetic
from replay.state import cast, snapshot_state

if TYPE_CHECKING:
    from replay.engine import SnapshotResult

CHECK_ROWS = 4  # rows recomputed to estimate the error of the other arithmetics (at most)
CHECK_COLUMNS = 4  # probes they are recomputed on, besides their own
CHECK_SHARE = 16  # rows per checked row (costing about two, and its gradient in float64)
# relative error of changes propagated by replay.difference (float32: measured at most 8e-7 on the
# built-in models, tests/test_precision.py), the floor of an error estimate checked against them
PROPAGATION_ERROR = {torch.float32: 1e-6, torch.float64: torch.finfo(torch.float64).eps}
EXACT = ARITHMETIC["float64"]
# the estimate is SAFETY times the error found: without it, python -m replay.calibration measured
# real errors up to 2.7 times that (float64, whose estimate is the model alone; the checked
# arithmetics up to 1.9; README "Precision"), so 5 leaves a margin of about two
SAFETY = 5.0


def check_rows(num_probes: int) -> int:
    """How many rows the error estimate recomputes: ``CHECK_ROWS``, fewer for few probes (one row
    per ``CHECK_SHARE`` probes, at least one, the row with the most rounding error), so that the
    check (two products a layer, on ``R`` rows and about ``R + CHECK_COLUMNS`` probes) stays a
    fraction of the ``P x P`` pass it checks instead of doubling it at small ``P``."""
    return max(1, min(CHECK_ROWS, num_probes // CHECK_SHARE))


def amplification(base: Tensor, finite: Tensor, chunk: Tensor, moved: Tensor) -> Tensor:
    """``max|f(x_i)| / max|D[i, i]|`` ``[B]`` of the rows ``chunk`` ``[B]`` from the base outputs
    ``[P, C]`` and their finite changes ``[B, P, C]``: by how much the rounding error of the outputs
    is magnified in the output change (NaN where the row's update is zero, ``moved`` ``[B]``
    False: no rounding there)."""
    self_change = finite[torch.arange(len(chunk)), chunk].abs().amax(-1)
    ratio = base[chunk].abs().amax(-1) / self_change
    return torch.where(moved, ratio, math.nan)


def output_gradient(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``dL/df`` ``[B, C]`` of each probe's loss ``loss`` at its outputs ``[B, C]`` (targets ``[B]``
    / ``[B, C]``), in the dtype of ``outputs``."""
    with torch.enable_grad():
        outputs = outputs.detach().requires_grad_()
        (slope,) = torch.autograd.grad(per_sample_loss(loss, outputs, targets).sum(), outputs)
    return slope


def gradient_rounding(loss: str, rounded: Tensor, exact: Tensor, targets: Tensor) -> Tensor:
    """``[B]``: the relative error of ``dL/df`` (:func:`output_gradient`) at the outputs ``rounded``
    ``[B, C]`` of a float32 forward pass against the float64 outputs ``exact``: by how much the
    rounding of that pass moves each per-sample gradient, and so each update. For a probe that
    training fits, ``dL/df`` is a small difference of probabilities, off by far more than ``eps``
    (3e-5 for a fitted ResNet-18)."""
    slope = output_gradient(loss, exact.double(), targets)
    return (output_gradient(loss, rounded.double(), targets) - slope).norm(dim=-1) / slope.norm(dim=-1)


def bound(error: float) -> float:
    """The error estimate from the largest relative ``error`` found: :data:`SAFETY` times it, or
    infinite once that reaches 1. Beyond, the rounding is no perturbation any more (``kl``, a
    square of the change, then grows as the square of the rounding) and no sample of rows bounds
    the rest: the measures are not resolved at all."""
    estimate = SAFETY * error
    return estimate if estimate < 1 else math.inf


def row_errors(approx: dict[str, Tensor], reference: dict[str, Tensor]) -> Tensor:
    """``[R]``: largest over measures of ``||approx[r] - reference[r]|| / ||reference[r]||``
    (measures ``[R, J]``; over the finite reference entries; NaN where ``approx`` is not finite)."""
    errors = []
    for name, ref in reference.items():
        finite = torch.isfinite(ref)
        diff = torch.where(finite, approx[name].to(ref) - ref, 0).norm(dim=1)
        scale = torch.where(finite, ref, 0).norm(dim=1)
        errors.append(torch.where(scale > 0, diff / scale, diff))
    return torch.stack(errors).amax(0)


def relative_error(approx: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """Largest over rows of :func:`row_errors`: the relative error of ``approx`` against
    ``reference`` (name -> ``[R, J]``) that the error estimate bounds."""
    return row_errors(approx, reference).max().item()


def sensitivity(
    measures: tuple[Measure, ...],
    base: Tensor,
    changed: dict[str, Tensor],
    rows: Tensor,
    ratio_eps: float,
    measured: dict[str, Tensor],
    arithmetic: Arithmetic,
    norms: Tensor,
    gradients: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``[B]``: the :func:`row_errors` the ``measured`` rows ``[B, P]`` (from base outputs
    ``[P, C]``, ``changed`` ``[B, P, C]`` and each row's own column ``rows`` ``[B]``, as
    :func:`~replay.measures.evaluate` takes them) show when their changes ``D[i, j]`` move by a
    model of the rounding of ``arithmetic``, ``eps`` times a fixed draw of a standard normal times

    - ``|D[i, j]|``: the rounding of the change itself (relative, as a propagation rounds);
    - ``max|f(x_j)|`` for a difference: the rounding of the outputs;
    - ``||U_i|| * max_k |D[k, j]| / ||U_k||`` (``k`` over the block, update norms ``norms``
      ``[B]``): the rounding of the update ``U_i``, which moves probe ``j`` by about the largest
      gain ``|D| / ||U||`` seen there, not in proportion to ``D[i, j]``: large against a change
      that ``U_i`` barely makes. Where the relative error of each row's gradient is known
      (``gradients`` ``[B]``, :func:`gradient_rounding`), that instead of ``eps``, if larger.

    Measures computed in float32 (the arithmetic ``float32``) add their own rounding, their
    distance from the same measures in float64, and that of their base outputs (``eps *
    |f(x_j)|`` each). So it predicts which rows the arithmetic computes worst (changes small
    against the outputs or against what their update could move; measures that cancel, as the
    centred change of a probe whose softmax saturates or a tiny self change that divides the row),
    and the check recomputes those. NaN where a row's update is zero (``norms`` 0): nothing to
    check there. Also ``[B, K]``: the ``K`` (at most ``CHECK_COLUMNS``) probes where each row's
    measures moved most."""
    eps = torch.finfo(arithmetic.fast).eps
    draw = torch.Generator().manual_seed(0)

    def noise(like: Tensor) -> Tensor:  # drawn in float32: five times as fast as in float64
        return torch.randn(like.shape, generator=draw).to(like)

    moved, norms = norms > 0, norms.to(torch.float64)
    rounding = norms.new_full(norms.shape, eps)  # of each row's update
    if gradients is not None:
        rounding = rounding.maximum(gradients.to(rounding).nan_to_num(0))
    shifted_base, rounded = base, None
    if base.dtype != torch.float64:  # float32 measures: their own rounding, and the outputs'
        base, changed = base.double(), {k: v.double() for k, v in changed.items()}
        float32, measured = measured, evaluate(measures, base, changed, rows, ratio_eps)
        rounded = {k: (v.double() - measured[k]).abs() for k, v in float32.items()}
        shifted_base = base + eps * base.abs() * noise(base)
    perturbed = {}
    for key, delta in changed.items():
        gain = (delta.abs().amax(-1) / norms.where(moved, math.inf)[:, None]).amax(0)  # [P]
        scale = eps * delta.abs() + (rounding[:, None] * norms[:, None] * gain)[..., None]
        if key == "finite" and not arithmetic.changes.propagates:
            scale = scale + eps * base.abs().amax(-1)[None, :, None]
        perturbed[key] = delta + scale * noise(delta)
    moved_by = _moved_by(measured, evaluate(measures, shifted_base, perturbed, rows, ratio_eps), rounded)
    score = moved_by.square().sum(-1).sqrt().amax(0).nan_to_num(math.inf)  # [B], the row_errors
    columns = moved_by.amax(0).nan_to_num(math.inf).topk(min(CHECK_COLUMNS, base.shape[0])).indices
    return torch.where(moved, score, math.nan), columns


def _moved_by(
    reference: dict[str, Tensor], shifted: dict[str, Tensor], rounded: dict[str, Tensor] | None = None
) -> Tensor:
    """``[M, B, P]``: per measure, ``|shifted - reference|`` (plus ``rounded``) over the norm of its
    row of ``reference``, over the finite entries of ``reference`` (name -> ``[B, P]`` each)."""
    return torch.stack(
        [
            torch.where(
                ref.isfinite(), (shifted[k] - ref).abs() + (0 if rounded is None else rounded[k]), 0
            ).nan_to_num(math.inf)
            / torch.where(ref.isfinite(), ref, 0).norm(dim=1, keepdim=True)
            for k, ref in reference.items()
        ]
    )


@dataclass
class Kept:
    """The ``R`` rows with the largest :func:`sensitivity` so far: their indices ``[R]``,
    scores ``[R]`` and the probes ``[R, K]`` where each moved most; ``worst``: the largest score of
    any row so far."""

    rows: Tensor
    score: Tensor
    columns: Tensor
    worst: float = 0.0
    # every node's float64 value on all P probes (:meth:`ChangePropagator.base`), when the check
    # runs on all probes and can share it instead of evaluating the model again
    base: BaseState | None = None

    @classmethod
    def empty(cls, dtype: torch.dtype, base: BaseState | None) -> Kept:
        """No rows yet, scores in ``dtype``."""
        none = torch.zeros(0, dtype=torch.long)
        return cls(rows=none, score=torch.zeros(0, dtype=dtype), columns=none[:, None], base=base)

    def merge(self, rows: Tensor, score: Tensor, columns: Tensor, keep: int) -> Kept:
        """The ``keep`` rows with the largest score of these and the new ``rows`` ``[B]`` (their
        sensitivities ``score`` ``[B]`` and probes ``columns`` ``[B, K]``, :func:`sensitivity`)."""
        # a row whose update is zero (NaN) changes nothing and has nothing to check: kept last
        score = score.nan_to_num(-math.inf).cpu()
        top = torch.cat([self.score, score]).argsort(descending=True, stable=True)[:keep]
        old, new = top[top < len(self.rows)], top[top >= len(self.rows)] - len(self.rows)

        def pick(kept: Tensor, added: Tensor) -> Tensor:
            return torch.cat([kept[old], added[new]]) if len(old) else added[new]

        return Kept(
            rows=pick(self.rows, rows),
            score=pick(self.score, score),
            columns=pick(self.columns, columns.cpu()),
            worst=max(self.worst, score.max().item()),
            base=self.base,
        )


class ErrorCheck:
    """The error estimate (module docstring) of the results of one engine: ``model`` on ``device``
    (traced by ``propagator``, None where ``torch.fx`` cannot trace it), probe inputs ``inputs``
    ``[P, ...]`` (or named tensors), rows evaluated by ``batching``, ``measures`` with ``ratio_eps``,
    the parameters ``frozen`` held fixed (:func:`~replay.state.frozen_names`)."""

    def __init__(
        self,
        model: nn.Module,
        propagator: ChangePropagator | None,
        inputs: Inputs,
        device: torch.device,
        batching: Batching,
        measures: tuple[Measure, ...],
        ratio_eps: float,
        frozen: frozenset[str] = frozenset(),
    ):
        self.model, self.propagator, self.inputs, self.device = model, propagator, inputs, device
        self.batching, self.measures, self.ratio_eps = batching, measures, ratio_eps
        self.frozen = frozen
        self.num_probes = num_probes(inputs)

    def rows(self, arithmetic: Arithmetic) -> int:
        """How many rows a pass in ``arithmetic`` keeps for the check (none in float64)."""
        return 0 if arithmetic == EXACT else check_rows(self.num_probes)

    def everything(self, keep: int) -> bool:
        """Whether the check of ``keep`` rows runs on every probe: with few probes its own columns
        and ``CHECK_COLUMNS`` others would be most of them, and then it shares a propagating pass's
        evaluation of the model (needs :mod:`replay.difference`)."""
        return self.propagator is not None and 2 * (keep + CHECK_COLUMNS) >= self.num_probes

    def estimate(
        self,
        snapshot: Snapshot,
        result: SnapshotResult,
        kept: Kept,
        exact_updates: Callable[[Tensor], dict[str, Tensor]],
    ) -> float:
        """The error estimate of ``result``, computed in ``result.arithmetic``, from its ``kept``
        rows; ``exact_updates(rows)``: the updates of the probes ``rows`` ``[R]`` computed in
        float64 throughout (name -> ``[R, *shape]``)."""
        arithmetic = ARITHMETIC[result.arithmetic]
        if arithmetic == EXACT:
            return bound(kept.worst)
        if kept.base is not None:  # the check covers every probe: share the pass's base values
            columns = torch.arange(self.num_probes)
        else:
            columns = torch.cat([kept.rows, kept.columns.flatten()]).unique()  # sorted
        # by propagation the reference has no cancellation: float32 checks a float32 difference
        # well, float64 checks the propagation itself; without it, a float64 difference
        propagates = arithmetic.changes.propagates
        dtype = torch.float64 if propagates or self.propagator is None else torch.float32
        exact = exact_updates(kept.rows)
        reference = self.reference(snapshot, kept.rows, exact, columns, dtype, kept.base)
        approx = {k: v[kept.rows][:, columns] for k, v in result.measures.items()}
        checked = row_errors(approx, reference)  # [R]
        # the model, scaled by how much it underestimated the kept rows, for the rows not checked
        scored = kept.score > 0
        under = (checked[scored] / kept.score[scored]).nan_to_num(0)
        model = kept.worst * max(1.0, under.max().item() if len(under) else 1.0)
        if self.propagator is None:  # a float64 difference: its own rounding, by the same model
            own = model * torch.finfo(torch.float64).eps / torch.finfo(arithmetic.fast).eps
        else:
            own = PROPAGATION_ERROR[dtype]
        return bound(max(checked.max().item(), own, model))

    def reference(
        self,
        snapshot: Snapshot,
        rows: Tensor,
        updates: dict[str, Tensor],
        columns: Tensor,
        dtype: torch.dtype,
        shared: BaseState | None = None,
    ) -> dict[str, Tensor]:
        """The measures of the probes ``rows`` ``[R]`` on the probes ``columns`` ``[J]`` (sorted,
        holding ``rows``) under their float64 ``updates`` (name -> ``[R, *shape]``), the changes
        propagated in ``dtype`` by :mod:`replay.difference` from the ``shared`` base values of a
        pass (every probe) or the columns' own (for a model it cannot trace: a float64
        difference), the rest in float64: name -> ``[R, J]``."""
        outputs = self._changes(snapshot, shared, columns, dtype)
        changed = outputs.rows(self.batching, {k: v.to(dtype) for k, v in updates.items()})
        own = torch.searchsorted(columns, rows)  # the column of each row's own probe
        changed = {k: v.to(torch.float64) for k, v in changed.items()}
        base = outputs.base  # [J, C]
        measured = evaluate(self.measures, base, changed, own.to(self.device), self.ratio_eps)
        return {k: v.cpu() for k, v in measured.items()}

    def _changes(
        self, snapshot: Snapshot, shared: BaseState | None, columns: Tensor, dtype: torch.dtype
    ) -> OutputChanges:
        """The reference changes on the probes ``columns``: propagated in ``dtype`` from the pass's
        ``shared`` base values or the columns' own, or a float64 difference."""
        finite, linear = needs(self.measures)
        if shared is not None:
            assert self.propagator is not None, "shared base values come from a propagating pass"
            return Propagation(self.propagator, shared, dtype, finite, linear)
        params, buffers = snapshot_state(self.model, snapshot, self.device, torch.float64, self.frozen)
        x = cast(take(self.inputs, columns), self.device, torch.float64)
        if self.propagator is None:
            return Difference(self.model, params, buffers, x, None, finite, linear)
        return Propagation(
            self.propagator, self.propagator.base(params, buffers, x, dtype), dtype, finite, linear
        )

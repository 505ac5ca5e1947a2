"""The error estimate of a replayed snapshot.

Of ``float64``: the rounding model ``eps64 * median_i(max|f(x_i)| / max|D[i, i]|)`` (the median
:func:`amplification`). Of every other arithmetic: the :func:`check_rows` rows (``CHECK_ROWS``,
fewer below ``CHECK_ROWS * CHECK_SHARE`` probes, at least one) with the largest amplification
``max|f(x_i)| / max|D[i, i]|`` (the rows with the most rounding error; :class:`Kept` collects
their updates block by block) are recomputed from the same updates, on those rows' own probes
and ``CHECK_COLUMNS`` others (after a propagation, on every probe when that is most of them: the
check then shares the pass's float64 evaluation of the model), with the changes propagated by
:mod:`replay.difference` (no cancellation), from float64 base values (from float32 ones its own
error reached 3e-5 for ResNet-18 at tiny steps): in float32 for the arithmetics that difference
(its own error, :data:`PROPAGATION_ERROR`, is the floor of the estimate), in float64 for
``mixed``; for a model ``torch.fx`` cannot trace, as a float64 difference. The estimate is the
largest relative row error of any measure there. It covers the output changes and the measures,
not the float32 rounding of the per-sample gradients and updates (measured against float64: 1e-7
in the measures of the MLPs, 3e-6 in those of ResNet-18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

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
CHECK_SHARE = 16  # rows per checked row (costing about two): the check is about an eighth of the pass
# relative error of changes propagated by replay.difference (float32: measured at most 8e-7 on the
# built-in models, tests/test_precision.py), the floor of an error estimate checked against them
PROPAGATION_ERROR = {torch.float32: 1e-6, torch.float64: torch.finfo(torch.float64).eps}
EXACT = ARITHMETIC["float64"]


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


def relative_error(approx: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """Largest over measures and rows of ``||approx[r] - reference[r]|| / ||reference[r]||``
    (measures ``[R, J]``; over the finite reference entries; NaN where ``approx`` is not finite)."""
    errors = []
    for name, ref in reference.items():
        finite = torch.isfinite(ref)
        diff = torch.where(finite, approx[name].to(ref) - ref, 0).norm(dim=1)
        scale = torch.where(finite, ref, 0).norm(dim=1)
        errors.append(torch.where(scale > 0, diff / scale, diff).max().item())
    return max(errors)


@dataclass
class Kept:
    """The updates (name -> ``[R, *shape]``, fast dtype) of the ``R`` rows with the largest
    amplification so far, and those rows' indices ``[R]`` and amplifications ``[R]``."""

    rows: Tensor
    amplification: Tensor
    updates: dict[str, Tensor]
    # every node's float64 value on all P probes (:meth:`ChangePropagator.base`), when the check
    # runs on all probes and can share it instead of evaluating the model again
    base: BaseState | None = None

    @classmethod
    def empty(cls, like: dict[str, Tensor], dtype: torch.dtype, base: BaseState | None) -> Kept:
        """No rows yet, for updates shaped and typed like ``like`` (name -> ``[*shape]``) and
        amplifications in ``dtype``."""
        return cls(
            rows=torch.zeros(0, dtype=torch.long),
            amplification=torch.zeros(0, dtype=dtype),
            updates={k: v.new_zeros((0, *v.shape)) for k, v in like.items()},
            base=base,
        )

    def merge(self, rows: Tensor, amplification: Tensor, updates: dict[str, Tensor], keep: int) -> Kept:
        """The ``keep`` rows with the largest amplification of these and the new ``rows`` (whose
        updates are ``updates``, name -> ``[B, *shape]``)."""
        amplification = torch.cat([self.amplification, amplification.nan_to_num(math.inf)])
        top = amplification.argsort(descending=True, stable=True)[:keep]
        old, new = top[top < len(self.rows)], top[top >= len(self.rows)] - len(self.rows)
        if not len(old):  # the first block, or nothing kept survives: one copy, not two
            return Kept(
                rows=rows[new],
                amplification=amplification[len(self.rows) + new],
                updates={k: u[new.to(u.device)] for k, u in updates.items()},
                base=self.base,
            )
        return Kept(
            rows=torch.cat([self.rows[old], rows[new]]),
            amplification=torch.cat([amplification[old], amplification[len(self.rows) + new]]),
            updates={
                k: torch.cat([v[old.to(v.device)], updates[k][new.to(v.device)]])
                for k, v in self.updates.items()
            },
            base=self.base,
        )


class ErrorCheck:
    """The error estimate (module docstring) of the results of one engine: ``model`` on ``device``
    (traced by ``propagator``, None where ``torch.fx`` cannot trace it), probe inputs ``inputs``
    ``[P, ...]``, rows evaluated by ``batching``, ``measures`` with ``ratio_eps``, the parameters
    ``frozen`` held fixed (:func:`~replay.state.frozen_names`)."""

    def __init__(
        self,
        model: nn.Module,
        propagator: ChangePropagator | None,
        inputs: Tensor,
        device: torch.device,
        batching: Batching,
        measures: tuple[Measure, ...],
        ratio_eps: float,
        frozen: frozenset[str] = frozenset(),
    ):
        self.model, self.propagator, self.inputs, self.device = model, propagator, inputs, device
        self.batching, self.measures, self.ratio_eps = batching, measures, ratio_eps
        self.frozen = frozen
        self.num_probes = len(inputs)

    def rows(self, arithmetic: Arithmetic) -> int:
        """How many rows a pass in ``arithmetic`` keeps for the check (none in float64)."""
        return 0 if arithmetic == EXACT else check_rows(self.num_probes)

    def everything(self, keep: int) -> bool:
        """Whether the check of ``keep`` rows runs on every probe: with few probes its own columns
        and ``CHECK_COLUMNS`` others would be most of them, and then it shares a propagating pass's
        evaluation of the model (needs :mod:`replay.difference`)."""
        return self.propagator is not None and 2 * (keep + CHECK_COLUMNS) >= self.num_probes

    def estimate(self, snapshot: Snapshot, result: SnapshotResult, kept: Kept) -> float:
        """The error estimate of ``result``, computed in ``result.arithmetic``, with the updates of
        its ``kept`` rows."""
        rounding = torch.finfo(torch.float64).eps * result.amplification.nanmedian().item()
        arithmetic = ARITHMETIC[result.arithmetic]
        if arithmetic == EXACT:
            return rounding
        if kept.base is not None:  # the check covers every probe: share the pass's base values
            columns = torch.arange(self.num_probes)
        else:
            columns = torch.linspace(0, self.num_probes - 1, CHECK_COLUMNS).round().long()
            columns = torch.cat([kept.rows, columns]).unique()  # sorted
        # by propagation the reference has no cancellation: float32 checks a float32 difference
        # well, float64 checks the propagation itself; without it, a float64 difference
        propagates = arithmetic.changes.propagates
        dtype = torch.float64 if propagates or self.propagator is None else torch.float32
        reference = self._reference(snapshot, kept, columns, dtype)
        approx = {k: v[kept.rows][:, columns] for k, v in result.measures.items()}
        own = rounding if self.propagator is None else PROPAGATION_ERROR[dtype]
        return max(relative_error(approx, reference), own)

    def _reference(
        self, snapshot: Snapshot, kept: Kept, columns: Tensor, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """The measures of the kept rows on the probes ``columns`` ``[J]`` from the kept updates, the
        changes propagated in ``dtype`` by :mod:`replay.difference` (for a model it cannot trace: a
        difference), the rest in float64: name -> ``[R, J]``."""
        outputs = self._changes(snapshot, kept.base, columns, dtype)
        changed = outputs.rows(self.batching, {k: v.to(dtype) for k, v in kept.updates.items()})
        own = torch.searchsorted(columns, kept.rows)  # the column of each row's own probe
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
        x = cast(self.inputs[columns], self.device, torch.float64)
        if self.propagator is None:
            return Difference(self.model, params, buffers, x, None, finite, linear)
        return Propagation(
            self.propagator, self.propagator.base(params, buffers, x, dtype), dtype, finite, linear
        )

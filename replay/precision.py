"""The precision policy: which arithmetic computes a snapshot, and when it gives way to the next.

``D`` is a small difference of nearly equal outputs (SPEC §3). Formed as the difference of two
forward passes it carries the rounding of the outputs, ``eps * |f| / |D|`` relative: in float32
1e-6 to 1e-2 under ``adam-fresh`` and more than 100% under ``sgd`` at lr 1e-4. The arithmetics of
:mod:`replay.plan`:

- ``float64``: everything in float64, ``D`` as a difference. Its error estimate is the rounding
  model of :mod:`replay.check` (no row is recomputed).
- ``float32``: everything in float32 (but the loss, see :mod:`replay.grads`), ``D`` as a difference.
- ``difference32``: ``D`` and ``J . U`` as in float32, the loss gradients and measures in float64.
- ``mixed``: ``difference32`` with ``D`` and ``J . U`` from one float32 pass of
  :mod:`replay.difference`, which propagates the change itself through the layers and never
  subtracts two outputs: about 1e-7 relative error whatever the step, at up to twice the
  arithmetic of a float32 difference; its base outputs ``f(x; w)`` are those of the float64
  evaluation the propagation starts from.
- ``auto`` (the precision, not an arithmetic): ``difference32`` while its error estimate (a bound,
  :mod:`replay.check`) stays below :data:`AUTO_TARGET` (a tenth of the 1e-3 bar), else ``mixed``
  while its own stays below it, else ``float64`` (straight after ``difference32`` for models
  ``torch.fx`` cannot trace), for that snapshot. Once the first block's updates are known, and
  before any change is computed, ``auto`` predicts the float32 difference's estimate from the
  rounding model (:func:`predicted_error`) and, where it exceeds the target, computes the snapshot
  in ``mixed`` straight away; otherwise the checked estimate of the difference decides. So a step
  that float32 resolves costs a float32 difference, one it plainly does not (``sgd`` at small lr)
  a propagation, and only a step the prediction misjudges both.

:class:`Precision` runs this as one loop over its :class:`Rung` ladder: evaluate (predicting on
the first block whether to move on at once), check (:mod:`replay.check`), and on to the next
arithmetic while the estimate misses the rung's target. An arithmetic other than float64 is
refused when its estimate exceeds the tolerance; TF32 stays off (:func:`no_tf32`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from recorder.rundir.errors import ReplayError, ReplayWarning
from replay.check import SAFETY, output_gradient
from replay.plan import ARITHMETIC, Arithmetic, choose_arithmetic

if TYPE_CHECKING:
    from replay.check import Kept
    from replay.engine import SnapshotResult

AUTO_TARGET = 1e-4  # largest estimated error at which 'auto' keeps the float32 difference
PREDICT_ROWS = 4  # rows of a block whose gradients and updates predict the float32 difference's error
EXACT = ARITHMETIC["float64"]


# torch 2.9 on: per-operation ``fp32_precision`` settings (once a process sets one, reading the
# old ``allow_tf32`` flags may raise, and they no longer cover every operation)
FP32_PRECISION = hasattr(torch.backends.cudnn, "conv")


@contextmanager
def _settings(*changes: tuple[Any, str, Any]) -> Iterator[None]:
    """Each ``(owner, name, value)`` of ``changes`` set as ``owner.name = value``; every value
    read before is restored after, in reverse order."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in changes]
    try:
        for owner, name, value in changes:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def ieee_float32() -> AbstractContextManager[None]:
    """IEEE float32 arithmetic, no TF32, in CUDA matmuls and cuDNN convolutions and RNNs (cuDNN
    defaults to TF32), the process's own settings restored exactly after: the ``fp32_precision``
    of each where torch has them (:data:`FP32_PRECISION`), else the ``allow_tf32`` flags."""
    if FP32_PRECISION:
        cudnn = torch.backends.cudnn
        precisions = (torch.backends.cuda.matmul, cudnn.conv, cudnn.rnn)  # type: ignore[attr-defined]
        return _settings(*((owner, "fp32_precision", "ieee") for owner in precisions))
    owners = (torch.backends.cuda.matmul, torch.backends.cudnn)
    return _settings(*((owner, "allow_tf32", False) for owner in owners))


def deterministic_cudnn() -> AbstractContextManager[None]:
    """cuDNN's deterministic algorithms and no benchmarking (which picks each convolution's
    algorithm by timing, so possibly differently in each process), restored after."""
    cudnn = torch.backends.cudnn
    return _settings((cudnn, "deterministic", True), (cudnn, "benchmark", False))


def no_tf32(device: torch.device) -> AbstractContextManager[None]:
    """Full float32 matmuls and convolutions on a GPU (:func:`ieee_float32`); nothing elsewhere."""
    return ieee_float32() if device.type == "cuda" else nullcontext()


def predicted_error(
    loss: str,
    scale: float | None,
    base: Tensor,
    y: Tensor,
    chunk: Tensor,
    grads: dict[str, Tensor] | None,
    updates: dict[str, Tensor],
    norms: Tensor,
) -> float:
    """The error a difference of two forward passes in the fast dtype would have on the rows
    ``chunk`` ``[B]`` (base outputs ``[P, C]``, targets ``y`` ``[P]`` / ``[P, C]``, under ``loss``),
    predicted from their gradients and updates (name -> ``[B, *shape]``; ``grads`` None: the updates
    are ``c g`` with ``c`` ``scale``) and update norms ``[B]`` before any change is computed: the
    rounding model ``eps * max_i max|f(x_i)| / max|D[i, i]|``, with the own change estimated to
    first order, ``|D[i, i]| ~ |g_i . U_i| / ||dL_i/df||`` (the change of the probe's own loss,
    ``g_i . U_i = dL_i/df . J_i U_i``, over its output gradient; ``||U_i||^2 / c`` for updates
    ``c g``), times the factor :data:`~replay.check.SAFETY` of the estimate. It comes out below the
    amplification the difference shows, and the estimate above it, so a prediction above the target
    is a miss, not a guess (below, the checked estimate still decides). It looks at
    :data:`PREDICT_ROWS` or so rows spread over the block (the step's scale, not a row's, decides;
    a row missed is caught by the check)."""
    fast = next(iter(updates.values())).dtype
    rows = range(0, len(chunk), max(1, len(chunk) // PREDICT_ROWS))
    if grads is None:
        assert scale is not None  # no gradients: the updates are c g
        own = norms[list(rows)] ** 2 / scale
    else:  # torch.dot of each row's own tensors: no copies of the weights
        own = torch.stack(
            [
                # a model's parameters: never empty, so a tensor, not sum's start 0 (typeshed cannot say)
                sum(torch.dot(g[r].flatten(), updates[k][r].flatten()).double() for k, g in grads.items())  # type: ignore[misc]
                for r in rows
            ]
        )
    chunk = chunk[list(rows)]
    slope = output_gradient(loss, base[chunk], y[chunk])
    amplification = base[chunk].abs().amax(-1) * slope.norm(dim=-1) / own.abs()
    amplification = amplification[amplification.isfinite()]  # a row that moves no loss: no estimate
    if not len(amplification):
        return 0.0
    return SAFETY * torch.finfo(fast).eps * amplification.max().item()


@dataclass(frozen=True)
class Rung:
    """One arithmetic of the ladder and the largest error estimate at which its result is kept
    (on the last rung the result of smallest estimate of the ladder is kept, whatever it is, and
    judged by :meth:`Precision.judge` against the tolerance)."""

    arithmetic: Arithmetic
    target: float


def predictable(arithmetic: Arithmetic, fallback: Arithmetic) -> bool:
    """Whether the first block can decide between ``arithmetic`` and ``fallback``: the fallback
    computes the same gradients and updates (same dtypes) and propagates the changes that
    ``arithmetic`` differences, so that the rounding model predicts the difference's error."""
    same = (fallback.exact, fallback.fast) == (arithmetic.exact, arithmetic.fast)
    return same and fallback.changes.propagates and not arithmetic.changes.propagates


class Precision:
    """The ladder of a configured ``precision`` (``auto``: ``difference32``, then its fallback, each
    kept where its estimate is within :data:`AUTO_TARGET`, then ``float64``, judged by the
    ``tolerance``; any other: its own arithmetic alone) and the loop that climbs it for one
    snapshot."""

    def __init__(self, precision: str, traceable: bool, tolerance: float):
        self.tolerance = tolerance
        self.first, self.fallback = choose_arithmetic(precision, traceable)
        if self.fallback is None:
            rungs = [Rung(self.first, tolerance)]
        elif self.fallback == EXACT:
            rungs = [Rung(self.first, AUTO_TARGET), Rung(EXACT, tolerance)]
        else:
            rungs = [Rung(self.first, AUTO_TARGET), Rung(self.fallback, AUTO_TARGET), Rung(EXACT, tolerance)]
        self.rungs = tuple(rungs)
        self._nonfinite_warned = False

    def settle(
        self,
        evaluate: Callable[[Arithmetic, Arithmetic | None], tuple[SnapshotResult, Kept] | None],
        check: Callable[[SnapshotResult, Kept], float],
    ) -> SnapshotResult:
        """The result of the first rung but the last whose checked estimate meets its target, else
        the one of smallest estimate of all computed (float64 differences outputs too: at steps
        tiny against the outputs, of probes that training fits, a propagation can be the more
        exact).

        ``evaluate(arithmetic, fallback)`` computes every row in ``arithmetic`` (or in ``fallback``,
        when given, where the first block predicts that ``arithmetic`` misses its target; None when
        it must start afresh there); ``check(result, kept)`` gives its error estimate."""
        step, computed = 0, []
        while True:
            evaluated = evaluate(self.rungs[step].arithmetic, self._decidable(step))
            if evaluated is None:  # predicted to miss, and the fallback runs other blocks
                step += 1
                continue
            result, kept = evaluated
            step = [r.arithmetic.name for r in self.rungs].index(result.arithmetic)
            result.error_estimate = check(result, kept)
            computed.append(result)
            if step + 1 == len(self.rungs):  # the first of the smallest estimate (NaN: none)
                return min(computed, key=lambda r: (not r.error_estimate <= math.inf, r.error_estimate))
            if result.error_estimate <= self.rungs[step].target:
                return result
            step += 1

    def _decidable(self, step: int) -> Arithmetic | None:
        """The arithmetic of the rung after ``step`` where the first block can decide on it
        (:func:`predictable`), else None."""
        if step + 1 == len(self.rungs):
            return None
        arithmetic, fallback = self.rungs[step].arithmetic, self.rungs[step + 1].arithmetic
        return fallback if predictable(arithmetic, fallback) else None

    def judge(self, where: str, result: SnapshotResult) -> None:
        """Refuse a result that an arithmetic other than float64 cannot resolve within the
        tolerance, where the ladder holds no float64 (:class:`ReplayError`); warn of a result of
        the ladder's best that misses it, and of non-finite measures (:meth:`_warn_nonfinite`)."""
        self._warn_nonfinite(where, result)
        estimate, tolerance = result.error_estimate, self.tolerance
        exact_tried = any(r.arithmetic == EXACT for r in self.rungs)
        if not exact_tried and not estimate <= tolerance:
            change = 1 / result.amplification.nanmedian().item()
            raise ReplayError(
                f"{where}: {result.arithmetic} cannot resolve the output changes (they are about "
                f"{change:.1g} of the outputs; estimated relative error {estimate:.2g} > "
                f"tolerance {tolerance:g}); replay with --precision float64 (under another --name: a store "
                "holds one configuration)"
            )
        if not estimate <= tolerance:
            warnings.warn(
                f"{where}: estimated relative error {estimate:.2g} exceeds {tolerance:g} even in the "
                f"best arithmetic tried, {result.arithmetic} (the updates barely change the outputs)",
                ReplayWarning,
                stacklevel=3,
            )

    def _warn_nonfinite(self, where: str, result: SnapshotResult) -> None:
        """Warn (one line, at the first such snapshot of the replay only) where a snapshot's
        measures ``[P, P]`` hold NaN or infinite entries although its weights are finite (the
        engine gives snapshots with non-finite weights NaN without computing them): the updates
        or the output changes overflowed. Rows whose self change is zero (``0 / 0`` under a
        ``ratio_eps`` of 0) do not count."""
        if self._nonfinite_warned:
            return
        bad = {}  # measure -> its non-finite entries outside rows of zero self change
        for name, S in result.measures.items():
            own = result.self_change.get(name)
            rows = S if own is None or len(own) == 0 else S[own != 0]
            count = int((~rows.isfinite()).sum())
            if count:
                bad[name] = count
        if not bad:
            return
        self._nonfinite_warned = True
        name, count = next(iter(bad.items()))
        warnings.warn(
            f"{where}: the weights are finite but the measures are not ({len(bad)} of "
            f"{len(result.measures)} measures; {name}: {count} of {result.measures[name].numel()} "
            f"entries NaN or infinite; largest update norm {result.update_norm.max().item():.3g}): "
            "most likely a learning rate too large for the update to stay finite; replay with a "
            "smaller --lr (later snapshots go unreported here)",
            ReplayWarning,
            stacklevel=3,
        )

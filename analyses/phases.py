"""The elastic-to-inelastic transition of a regression run (SPEC §5): where the S_rel trajectory
stops changing fast.

A trajectory ``y`` ``[S]`` over the training steps ``t`` ``[S]`` (e.g. the median S_rel over probe
pairs at each snapshot) is fit by one straight line, and by two lines with a break between two
snapshots; the break is the one of least squared error (``ruptures``' exact dynamic programming
with its least-squares linear cost on the covariates ``[1, t]``, so uneven snapshot spacing is
handled), each phase at least ``min_size`` snapshots long. There is a transition when the two
phases are better than one line by the Bayesian information criterion (Gaussian errors: 2 free
numbers for one line, 5 for two lines and their break) and when the break explains at least
``min_explained`` of the one line's squared error. Otherwise the answer is "no transition".

Each phase's rate of change is the slope of its line (S_rel per training step). The transition
is elastic-to-inelastic when the rate falls (``|rate after| < |rate before|``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from recorder.rundir.files import finite_or_none

MIN_SIZE = 4
MIN_EXPLAINED = 0.5


@dataclass
class Phases:
    """The answer for one trajectory.

    Attributes:
        found: whether there is a transition.
        reason: why not, when not found ("" otherwise).
        step: the first training step of the second phase (None without a transition).
        index: its snapshot index.
        rates: ``(before, after)`` slopes of the two lines (with a transition), or ``(slope,)`` of
            the one line; empty with too few snapshots.
        fit: ``[S]`` fitted values (two lines with a transition, one line otherwise; NaN with too
            few snapshots or where ``y`` is not finite).
        explained: ``1 - RSS(two lines) / RSS(one line)`` at the best break (NaN if not computed).
        bic_gain: ``BIC(one line) - BIC(two lines)`` (positive: two phases preferred).
    """

    found: bool
    reason: str
    step: int | None
    index: int | None
    rates: tuple[float, ...]
    fit: np.ndarray
    explained: float
    bic_gain: float

    @property
    def settles(self) -> bool:
        """An elastic-to-inelastic transition: the rate of change falls."""
        return self.found and abs(self.rates[1]) < abs(self.rates[0])

    def to_json(self) -> dict[str, Any]:
        """The numbers as JSON (non-finite ones as null), without the fitted values."""

        return {
            "found": self.found,
            "reason": self.reason,
            "step": self.step,
            "rates": [finite_or_none(float(r)) for r in self.rates],
            "settles": self.settles,
            "explained": finite_or_none(float(self.explained)),
            "bic_gain": finite_or_none(float(self.bic_gain)),
        }


def detect_transition(
    steps: np.ndarray, values: np.ndarray, min_size: int = MIN_SIZE, min_explained: float = MIN_EXPLAINED
) -> Phases:
    """Locate the transition of ``values`` ``[S]`` over ``steps`` ``[S]`` (NaN values left out)."""
    steps = np.asarray(steps, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = np.flatnonzero(np.isfinite(values))
    t, y = steps[ok], values[ok]
    fit = np.full(len(values), np.nan)
    if len(y) < 2 * min_size:
        return Phases(
            False, f"too few snapshots ({len(y)} < {2 * min_size})", None, None, (), fit, np.nan, np.nan
        )
    one, rss_one = _line(t, y)
    fit[ok] = one[0] + one[1] * t
    scale = np.sum((y - y.mean()) ** 2) + np.finfo(float).tiny
    if rss_one <= 1e-12 * scale:
        return Phases(False, "a straight line fits exactly", None, None, (one[1],), fit, 0.0, -np.inf)
    import ruptures  # here: it takes seconds to import (scipy.stats), and classification never needs it

    covariates = np.column_stack([np.ones_like(t), (t - t[0]) / (t[-1] - t[0])])
    search = ruptures.Dynp(custom_cost=ruptures.costs.CostLinear(), min_size=min_size, jump=1)
    (b, _) = search.fit(np.column_stack([y, covariates])).predict(n_bkps=1)
    before, rss_before = _line(t[:b], y[:b])
    after, rss_after = _line(t[b:], y[b:])
    rss_two = rss_before + rss_after
    n = len(y)
    floor = 1e-12 * rss_one  # two exact lines: log(0) avoided, the gain stays finite and large
    bic_gain = n * np.log(rss_one / max(rss_two, floor)) - 3 * np.log(n)
    explained = 1 - rss_two / rss_one
    if bic_gain <= 0 or explained < min_explained:
        reason = (
            f"one line is as good (BIC gain {bic_gain:.3g} <= 0)"
            if bic_gain <= 0
            else f"the break explains {explained:.0%} < {min_explained:.0%} of the one-line error"
        )
        return Phases(False, reason, None, None, (one[1],), fit, explained, bic_gain)
    fit[ok[:b]] = before[0] + before[1] * t[:b]
    fit[ok[b:]] = after[0] + after[1] * t[b:]
    return Phases(True, "", int(t[b]), int(ok[b]), (before[1], after[1]), fit, explained, bic_gain)


def _line(t: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float], float]:
    """Least-squares ``y = a + b t``: ``((a, b), residual sum of squares)``."""
    X = np.column_stack([np.ones_like(t), t - t[0]])
    (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
    a -= b * t[0]
    return (float(a), float(b)), float(np.sum((y - a - b * t) ** 2))

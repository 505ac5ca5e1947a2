"""Training curves from a run's ``metrics.jsonl`` (:meth:`recorder.rundir.run.RunDir.metrics`).

The recorder writes one JSON object a line: ``{"kind": "step", "step", "epoch", <metric>: ..}``
from ``rec.step(loss=..)`` and ``{"kind": "epoch", "step", "epoch", <metric>: ..}`` from
``rec.log_epoch(epoch, test_acc=..)``, ``step`` being the optimizer steps taken so far. Rows
without ``kind`` count as per-step rows; rows without ``step`` are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("step", "epoch")
INDEX_KEYS = ("kind", "step", "epoch")


@dataclass
class Series:
    """One metric over training: ``steps`` ``[N]``, ``values`` ``[N]`` (finite values only)."""

    name: str
    kind: str  # "step" or "epoch"
    steps: np.ndarray
    values: np.ndarray


def training_series(rows: list[dict[str, Any]]) -> dict[str, dict[str, Series]]:
    """Every numeric metric of ``rows``: kind (``step``, ``epoch``) -> metric name -> series.

    A kind without metrics maps to an empty dict; names are sorted.
    """
    points: dict[str, dict[str, list[tuple[int, float]]]] = {kind: {} for kind in KINDS}
    for row in rows:
        kind = "epoch" if row.get("kind") == "epoch" else "step"
        step = row.get("step")
        if not isinstance(step, int):
            continue
        for key, value in row.items():
            if key in INDEX_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if np.isfinite(value):
                points[kind].setdefault(key, []).append((step, float(value)))
    return {
        kind: {
            name: Series(
                name, kind, np.array([s for s, _ in pts], dtype=np.int64), np.array([v for _, v in pts])
            )
            for name, pts in sorted(by_name.items())
        }
        for kind, by_name in points.items()
    }

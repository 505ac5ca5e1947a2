"""The S_rel curves of an analysis as TensorBoard events, to set them beside training curves.

One TensorBoard run per store (``DIR/<store>``); per measure ``m``, at each training step of the
analyzed snapshots (the means over the runs of a group): ``separation_auc/<m>`` and
``same_cross_ratio/<m>`` (the class mean; classification) and ``median_S_rel/<m>`` (the median
over pairs ``i != j``). A rerun replaces what an earlier one wrote into ``DIR/<store>`` (the
viewer hides the older events).

Needs the optional ``tensorboard`` package (``pip install 'local-elasticity[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from analyses.curves import MeasureCurves, nan_mean


def write_events(curves: dict[str, dict[str, MeasureCurves]], out: Path) -> list[Path]:
    """Write ``curves`` (store -> measure -> its curves) into ``out``; returns the run folders."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the optional tensorboard package
        raise ImportError(
            "--tensorboard needs tensorboard: pip install 'local-elasticity[tensorboard]'"
        ) from e

    folders = []
    for store, by_measure in curves.items():
        folder = out / store
        with SummaryWriter(str(folder), purge_step=0) as writer:
            for m, c in by_measure.items():
                series = {f"median_S_rel/{m}": c.quantiles[:, 1]}
                if c.classpairs is not None and c.auc is not None:
                    series[f"separation_auc/{m}"] = c.auc
                    series[f"same_cross_ratio/{m}"] = nan_mean(c.same_cross("mean"), axis=1)
                for tag, values in series.items():
                    for step, value in zip(c.steps, values, strict=True):
                        if np.isfinite(value):
                            writer.add_scalar(tag, float(value), int(step))
        folders.append(folder)
    return folders

"""``analyze --tensorboard DIR``: the S_rel curves as TensorBoard events, read back with
TensorBoard's own reader and set against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from cli import main
from tests.helpers import make_run_dir, write_store

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_events_hold_the_curves(tmp_path, runner):
    run = make_run_dir(tmp_path / "run")
    labels = np.array([0, 0, 1, 1])
    S = np.ones((3, 4, 4))
    S[:, [0, 2], [1, 3]] = [[5.0], [10.0], [0.5]]  # a same-class pair of each class; cross pairs stay 1
    S[:, [1, 3], [0, 2]] = [[5.0], [10.0], [0.5]]
    write_store(run / "s.zarr", {"kl": S}, labels, [True] * 3, [0, 5, 15])
    events = tmp_path / "tb"
    for _ in range(2):  # a rerun replaces the first run's events
        result = runner.invoke(main, ["analyze", str(run), "--no-figures", "--tensorboard", str(events)])
        assert result.exit_code == 0, result.output
    assert f"TensorBoard events in {events}" in result.output
    reader = event_accumulator.EventAccumulator(str(events / "s"))
    reader.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in reader.Scalars(tag)]

    # same pairs all above (5, 10) or all below (0.5) the cross pairs (1); ratio: same / cross mean
    assert scalars("separation_auc/kl") == [(0, 1.0), (5, 1.0), (15, 0.0)]
    assert scalars("same_cross_ratio/kl") == [(0, 5.0), (5, 10.0), (15, 0.5)]
    assert scalars("median_S_rel/kl") == [(0, 1.0), (5, 1.0), (15, 1.0)]

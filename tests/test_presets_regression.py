"""The regression presets end to end at tiny sizes: a run group of SGD runs on raw regression targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recorder.presets import PRESETS
from recorder.rundir.run import RunDir


@pytest.mark.parametrize(
    ("preset", "settings", "dim", "groups"),
    [
        ("regression-teacher", {"n_per_class": 20, "dim": 5}, 5, [0, 0, 0, 1, 1, 1]),
        ("regression-diabetes", {}, 10, [0] * 6),
    ],
)
def test_regression_preset_records_a_run_group(tmp_path, preset, settings, dim, groups):
    spec = PRESETS[preset]
    config = spec.config_cls(
        **settings, epochs=2, batch_size=16, probes=6, snapshot_every=3, runs=2, progress=False
    )
    spec.record(tmp_path / "run", config)
    assert [r["seed"] for r in json.loads((tmp_path / "run" / "group.json").read_text())["runs"]] == [0, 1]
    probes, weights = [], []
    for k in range(2):
        run = RunDir(tmp_path / "run" / f"run-{k:02d}")
        assert (run.spec.task, run.spec.loss, run.spec.optimizer, run.spec.num_outputs) == (
            "regression",
            "mse",
            "SGD",
            1,
        )
        assert run.spec.model.kwargs == {"in_features": dim, "num_outputs": 1, "hidden": [64]}
        assert run.spec.extra["probe_classes"] == groups
        inputs, targets = run.probes()
        assert inputs.shape == (6, dim) and targets.shape == (6, 1) and targets.dtype == torch.float32
        steps = [e.step for e in run.manifest]
        assert steps[0] == 0 and steps[1] == 3 and len(steps) >= 3
        assert len([m for m in run.metrics() if m.get("kind") == "epoch"]) == 2
        probes.append(inputs.numpy())
        weights.append(run.load_snapshot(run.manifest[0]).params["1.weight"].numpy())
    assert not np.array_equal(probes[0], probes[1]) and not np.array_equal(weights[0], weights[1])


def test_teacher_data_are_standardized_and_the_same_in_every_run():
    from recorder.presets.regression import TeacherConfig, regression_data

    a, b = (
        regression_data(TeacherConfig(n_per_class=50, seed=0)),
        regression_data(TeacherConfig(n_per_class=50, seed=3)),
    )
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert a.x_train.shape == (80, 10) and a.y_train.shape == (80, 1)
    np.testing.assert_allclose(a.y_train.mean(), 0, atol=1e-6)
    np.testing.assert_allclose(a.y_train.std(unbiased=False), 1, atol=1e-5)
    assert a.y_train.std() > 0 and sorted(np.bincount(a.groups)) == [40, 40]

"""End-to-end replays of small run directories into zarr stores: layout, resume, refusals."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import zarr

import replay.store as replay_store
from recorder.rundir.errors import RunDirError
from recorder.rundir.run import RunDir, RunWriter
from replay import ReplayConfig, ReplayError, ReplayWarning, UpdateConfig, replay
from replay.classpairs import aggregate
from replay.engine import Engine
from replay.store import open_store
from tests.helpers import make_model, make_probes, make_run, run_spec, snapshot

MEASURES = ("orig_logits_l2", "orig_probs_l2", "kl", "seed_kl", "linear")
CONFIG = ReplayConfig(UpdateConfig("recorded"), measures=MEASURES, precision="float64")


def read_arrays(path):
    group = zarr.open_group(path, mode="r")
    return {
        name: np.asarray(a[...]) for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)
    }


def assert_same_arrays(a, b):
    a, b = read_arrays(a), read_arrays(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "run", steps=(0, 2, 4), optimizer_cls=torch.optim.AdamW)


@pytest.fixture(scope="module")
def reference(run):
    """One uninterrupted replay of ``run``, the oracle of the resume tests."""
    return replay(run, CONFIG, progress=False)


def test_store_follows_the_readme_layout(run, reference):
    assert reference == run / "recorded.zarr"
    group = zarr.open_group(reference, mode="r")
    S, P, C, K = 3, 9, 3, 3
    expected = {
        "step": ((S,), ("snapshot",)),
        "epoch": ((S,), ("snapshot",)),
        "done": ((S,), ("snapshot",)),
        "probe_targets": ((P,), ("probe",)),
        "base_outputs": ((S, P, C), ("snapshot", "probe", "output")),
        "probe_loss": ((S, P), ("snapshot", "probe")),
        "update_norm": ((S, P), ("snapshot", "probe")),
        "error_estimate": ((S,), ("snapshot",)),
        "fallback": ((S,), ("snapshot",)),
        "arithmetic": ((S,), ("snapshot",)),
        "recorded_lr": ((S,), ("snapshot",)),  # NaN here: this manifest lists no lr
        "linearisation_gap": ((S, P), ("snapshot", "updated")),
    }
    for m in MEASURES:
        expected[f"measures/{m}"] = ((S, P, P), ("snapshot", "updated", "observed"))
        expected[f"self_change/{m}"] = ((S, P), ("snapshot", "updated"))
        for stat in ("mean", "median"):
            expected[f"classpairs/{m}/{stat}"] = ((S, K, K), ("snapshot", "observed_class", "updated_class"))
    arrays = {n: a for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}
    assert set(arrays) == set(expected)
    for name, (shape, dims) in expected.items():
        assert arrays[name].shape == shape, name
        assert tuple(arrays[name].metadata.dimension_names) == dims, name
        if dims[0] == "snapshot":
            assert arrays[name].chunks == (1, *shape[1:]), name
    attrs = dict(group.attrs)
    assert ReplayConfig.from_json(attrs["config"]) == CONFIG
    assert attrs["run_spec"] == json.loads((run / "spec.json").read_text())
    assert (attrs["dtype"], attrs["measures"], attrs["classes"], attrs["include_self"]) == (
        "float64",
        list(MEASURES),
        [0, 1, 2],
        False,
    )
    manifest = RunDir(run).manifest
    np.testing.assert_array_equal(group["step"][:], [e.step for e in manifest])
    np.testing.assert_array_equal(group["epoch"][:], [e.epoch for e in manifest])
    assert group["done"][:].all()
    labels = RunDir(run).probes()[1].numpy()
    np.testing.assert_array_equal(group["probe_targets"][:], labels)
    assert (group["error_estimate"][:] < 1e-9).all()
    for m in MEASURES:
        S_all = group[f"measures/{m}"][:]
        for stat in ("mean", "median"):
            expected = aggregate(S_all, labels, K, False, stat)
            np.testing.assert_allclose(group[f"classpairs/{m}/{stat}"][:], expected, rtol=1e-13, err_msg=m)


def test_stored_snapshot_equals_the_engine_on_the_loaded_snapshot(run, reference):
    rd = RunDir(run)
    engine = Engine(rd.spec, *rd.probes(), CONFIG)
    result = engine.replay_snapshot(rd.load_snapshot(rd.manifest[1]))
    group = zarr.open_group(reference, mode="r")
    for m in MEASURES:
        np.testing.assert_array_equal(group[f"measures/{m}"][1], result.measures[m].numpy())
    np.testing.assert_array_equal(group["update_norm"][1], result.update_norm.numpy())


def test_resume_after_a_failure_between_snapshots_equals_an_uninterrupted_replay(run, reference, monkeypatch):
    config = ReplayConfig(CONFIG.update, measures=MEASURES, precision="float64", name="killed-between")
    original = Engine.replay_snapshot
    calls = []

    def dies_after_one(self, snap):
        calls.append(snap.step)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as if killed
        return original(self, snap)

    monkeypatch.setattr(Engine, "replay_snapshot", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        replay(run, config, progress=False)
    path = run / "killed-between.zarr"
    assert open_store(path).done.tolist() == [True, False, False]
    monkeypatch.setattr(Engine, "replay_snapshot", original)
    replay(run, config, progress=False)
    assert_same_arrays(path, reference)


def test_resume_after_a_failure_inside_a_snapshot_equals_an_uninterrupted_replay(run, reference, monkeypatch):
    config = ReplayConfig(CONFIG.update, measures=MEASURES, precision="float64", name="killed-inside")
    calls = []

    def dies_on_second_snapshot(*args, **kwargs):  # measures of snapshot 1 are written by then
        calls.append(1)
        if len(calls) > 2:  # one call per statistic and snapshot
            raise KeyboardInterrupt
        return aggregate(*args, **kwargs)

    monkeypatch.setattr(replay_store, "aggregate", dies_on_second_snapshot)
    with pytest.raises(KeyboardInterrupt):
        replay(run, config, progress=False)
    store = open_store(run / "killed-inside.zarr")
    assert store.done.tolist() == [True, False, False]
    assert not np.isnan(store.measures[MEASURES[0]].read([1])).any()  # partly written, not done
    monkeypatch.setattr(replay_store, "aggregate", aggregate)
    replay(run, config, progress=False)
    assert_same_arrays(run / "killed-inside.zarr", reference)


def test_rerun_skips_done_snapshots(run, reference, monkeypatch, capsys):
    def must_not_run(self, snap):
        raise AssertionError("a done snapshot was replayed again")

    monkeypatch.setattr(Engine, "replay_snapshot", must_not_run)
    again = ReplayConfig(
        CONFIG.update, measures=MEASURES, precision="float64", device="cpu", memory_budget=12345
    )
    assert replay(run, again) == reference
    assert "replayed 0 snapshots (3 already done)" in capsys.readouterr().out


def test_a_store_written_before_the_fallback_array_reads_and_resumes(run, reference, tmp_path):
    """Stores from before ``fallback`` existed: analyses read them, and a resume adds the array."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
    store = old / reference.name
    shutil.rmtree(store / "fallback")
    assert open_store(store).done.all()
    replay(old, CONFIG, progress=False)
    assert zarr.open_group(store, mode="r")["fallback"][:].tolist() == [0, 0, 0]
    assert open_store(store).done.all()


def test_a_store_with_another_configuration_is_refused(run, reference):
    other = ReplayConfig(UpdateConfig("recorded"), measures=MEASURES, include_self=True, name="recorded")
    with pytest.raises(ReplayError, match="different configuration.*include_self.*--name"):
        replay(run, other, progress=False)


def test_side_by_side_stores_and_a_grown_manifest(tmp_path):
    path = make_run(tmp_path / "run", steps=(0, 1, 3), optimizer_cls=torch.optim.SGD, lr=0.1, momentum=0.9)
    config = ReplayConfig(measures=("kl", "linear"))
    full = replay(path, ReplayConfig(measures=("kl", "linear"), name="full"), progress=False)
    manifest = json.loads((path / "manifest.json").read_text())
    grown = dict(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest | {"snapshots": manifest["snapshots"][:2]}))
    partial = replay(path, config, progress=False)
    assert open_store(partial).done.shape == (2,)
    (path / "manifest.json").write_text(json.dumps(grown))
    assert replay(path, config, progress=False) == partial == path / "adam-fresh.zarr"
    assert_same_arrays(partial, full)
    assert sorted(p.name for p in path.glob("*.zarr")) == ["adam-fresh.zarr", "full.zarr"]


def test_recorded_rule_on_a_run_without_optimizer_state_is_refused_before_any_store(tmp_path):
    path = make_run(tmp_path / "run", steps=(0, 1), with_state=False)
    with pytest.raises(ReplayError, match="without optimizer state.*adam-fresh.*sgd"):
        replay(path, ReplayConfig(UpdateConfig("recorded")), progress=False)
    assert not list(path.glob("*.zarr"))


def test_recorded_rule_with_an_unsupported_optimizer_is_refused(tmp_path):
    path = make_run(tmp_path / "run", steps=(0, 1), optimizer_cls=torch.optim.RMSprop, lr=0.01)
    with pytest.raises(ReplayError, match="'RMSprop' is not supported.*SGD, Adam, AdamW.*adam-fresh.*sgd"):
        replay(path, ReplayConfig(UpdateConfig("recorded")), progress=False)
    assert not list(path.glob("*.zarr"))


def test_non_finite_snapshot_is_stored_as_nan_and_the_replay_goes_on(tmp_path):
    model = make_model("mlp")
    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "run", run_spec("mlp"), x, y)
    writer.add_snapshot(snapshot(model, 0))
    with torch.no_grad():
        model.get_parameter("3.bias")[1] = math.inf
    writer.add_snapshot(snapshot(model, 1))
    with pytest.warns(ReplayWarning, match="step 1"):
        path = replay(tmp_path / "run", ReplayConfig(measures=("kl",)), progress=False)
    store = open_store(path)
    assert store.done.all()
    kl = store.measures["kl"].read([0, 1])
    assert np.isfinite(kl[0]).all() and np.isnan(kl[1]).all()
    assert np.isnan(store.classpairs["kl"]["mean"].read([1])).all() and np.isnan(store.error_estimate[1])


def test_regression_store_has_no_class_pairs(tmp_path):
    model = make_model("mlp")
    x, _ = make_probes("mlp", per_class=1)
    targets = torch.randn(len(x), 3, dtype=torch.float64)
    writer = RunWriter(tmp_path / "run", run_spec("mlp", "regression", "half_sse"), x, targets)
    writer.add_snapshot(snapshot(model, 0))
    path = replay(tmp_path / "run", ReplayConfig(UpdateConfig("sgd", lr=0.01)), progress=False)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["measures"] == ["orig_outputs_l2", "orig_outputs_l1", "linear"]
    assert group.attrs["classes"] is None and "classpairs" not in group
    assert group["probe_targets"].shape == (3, 3)
    assert tuple(group["probe_targets"].metadata.dimension_names) == ("probe", "output")


def test_empty_or_missing_run_directory_is_a_run_dir_error(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        replay(tmp_path / "nothing", ReplayConfig(), progress=False)
    RunWriter(tmp_path / "empty", run_spec("mlp"), *make_probes("mlp", per_class=1))
    with pytest.raises(RunDirError, match="no snapshots"):
        replay(tmp_path / "empty", ReplayConfig(), progress=False)

"""Run groups, the SPEC §5 table beside the published numbers, the bootstrap interval of the
separation AUC and the elastic-to-inelastic transition, on synthetic stores and trajectories with
known values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from analyses import bootstrap
from analyses.bootstrap import auc_with_ci, resample_counts, weighted_auc
from analyses.classpairs import separation_auc
from analyses.groups import band, member_results, run_curves
from analyses.phases import detect_transition
from analyses.published import PUBLISHED
from analyses.report import analyze, format_table
from recorder.rundir.errors import RunDirError
from recorder.rundir.files import atomic_write_json
from recorder.rundir.group import read_group, record_group
from recorder.rundir.spec import ModelSpec, RunSpec
from tests.helpers import B0, B1, LABELS6, block_matrix, write_store

SQRT2 = np.sqrt(2)

# ----------------------------------------------------------------------------- phases

# Tolerance: with noise of a tenth of the change of level over the first phase, the break is
# found within 3 snapshots of the planted one; on uneven (log-spaced) snapshots with smaller
# noise, at the first snapshot after the planted break or its neighbour.
EVEN_TOLERANCE = 3
UNEVEN_TOLERANCE = 1


def hinge(t, at, rate_before, rate_after, start=1.0):
    return np.where(t < at, start + rate_before * t, start + rate_before * at + rate_after * (t - at))


@pytest.mark.parametrize("seed", range(10))
def test_planted_transition_is_found_within_tolerance(seed):
    rng = np.random.default_rng(seed)
    t = np.arange(0, 800, 10.0)
    y = hinge(t, 300, 0.01, 0.0005) + 0.1 * rng.standard_normal(len(t))
    p = detect_transition(t, y)
    assert p.found and p.settles and p.reason == ""
    assert abs(p.step - 300) <= EVEN_TOLERANCE * 10
    assert p.rates[0] == pytest.approx(0.01, rel=0.15) and p.rates[1] == pytest.approx(0.0005, abs=3e-4)
    assert p.explained > 0.5 and p.bic_gain > 0 and np.isfinite(p.fit).all()


@pytest.mark.parametrize("seed", range(5))
def test_planted_transition_on_log_spaced_snapshots(seed):
    rng = np.random.default_rng(seed)
    t = np.unique(np.round(np.geomspace(1, 5000, 60)))
    y = hinge(t, 1000, -0.002, -0.00005, start=2.0) + 0.02 * rng.standard_normal(len(t))
    p = detect_transition(t, y)
    first_after = int(np.searchsorted(t, 1000))
    assert p.found and p.settles and abs(p.index - first_after) <= UNEVEN_TOLERANCE


def test_saturating_trajectory_is_elastic_then_inelastic():
    t = np.arange(0, 1000, 10.0)
    y = 1 - np.exp(-t / 100) + 0.02 * np.random.default_rng(0).standard_normal(len(t))
    p = detect_transition(t, y)
    assert p.found and p.settles and 100 <= p.step <= 400 and p.rates[0] > 20 * abs(p.rates[1])


@pytest.mark.parametrize("seed", range(20))
def test_no_transition_in_a_constant_or_a_straight_noisy_trajectory(seed):
    rng = np.random.default_rng(seed)
    t = np.arange(0, 1000, 10.0)
    for y in (2 + 0.2 * rng.standard_normal(len(t)), 2 + 0.003 * t + 0.2 * rng.standard_normal(len(t))):
        p = detect_transition(t, y)
        assert not p.found and p.step is None and p.reason
        assert len(p.rates) == 1 and np.isfinite(p.fit).all()


def test_no_transition_edge_cases():
    t = np.arange(20.0)
    exact = detect_transition(t, 3 - 0.5 * t)
    assert not exact.found and exact.reason == "a straight line fits exactly"
    assert exact.rates == (pytest.approx(-0.5),)
    short = detect_transition(t[:7], hinge(t[:7], 3, 1, 0))
    assert not short.found and "too few snapshots (7 < 8)" in short.reason and short.rates == ()
    y = hinge(t, 10, 1.0, 0.0)
    y[[2, 5]] = np.nan  # left out
    p = detect_transition(t, y)
    assert p.found and p.step in (10, 11) and np.isnan(p.fit[[2, 5]]).all()  # the kink is on both lines
    assert p.to_json() == {
        "found": True,
        "reason": "",
        "step": p.step,
        "rates": [pytest.approx(1.0), pytest.approx(0.0, abs=1e-9)],
        "settles": True,
        "explained": pytest.approx(1.0),
        "bic_gain": pytest.approx(p.bic_gain),
    }


# ----------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize("block", ["whole", "one snapshot, float64"])
def test_weighted_auc_is_the_auc_of_the_resampled_probes(block, monkeypatch):
    if block != "whole":  # snapshots one at a time, sums in float64
        monkeypatch.setattr(bootstrap, "_BLOCK_ENTRIES", 1)
        monkeypatch.setattr(bootstrap, "_EXACT_FLOAT32", 1)
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 5)
    S = rng.lognormal(size=(4, 15, 15))
    S[:, labels[:, None] == labels[None, :]] *= 1.5
    S[1] = np.round(S[1])  # ties
    S[2, 3, 4] = np.nan
    np.testing.assert_allclose(weighted_auc(S, labels, np.ones((1, 15)))[0], separation_auc(S, labels))
    counts = resample_counts(labels, 3, rng)
    for c in counts:
        assert [c[labels == k].sum() for k in range(3)] == [5, 5, 5]  # stratified
        idx = np.repeat(np.arange(15), c.astype(int))  # the resampled probes, duplicates kept
        expanded = S[:, idx][:, :, idx]
        expanded[:, idx[:, None] == idx[None, :]] = np.nan  # a probe paired with its own copy: no pair
        np.testing.assert_allclose(weighted_auc(S, labels, c[None])[0], separation_auc(expanded, labels[idx]))


def test_many_pairs_take_a_fixed_subset_whose_auc_is_close_to_every_pairs(monkeypatch):
    monkeypatch.setattr(bootstrap, "MAX_PAIRS", 400)
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 30)  # 3,540 pairs
    S = rng.normal(size=(3, 60, 60)) + 0.8 * (labels[:, None] == labels[None, :])
    full = separation_auc(S, labels)
    ones = np.ones((2, 60))
    subset = weighted_auc(S, labels, ones)  # [2, T]: the same subset in both replicates
    np.testing.assert_array_equal(subset[0], subset[1])
    assert not np.allclose(subset[0], full)  # a subset, not every pair
    np.testing.assert_allclose(subset[0], full, atol=4 * 0.5 / 400**0.5)


def test_auc_interval_brackets_the_mean_over_runs():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 6)
    same = labels[:, None] == labels[None, :]
    perfect = np.where(same, 2.0, 1.0)[None].repeat(3, axis=0)  # every same pair above every cross pair
    noisy = rng.uniform(size=(3, 12, 12)) + 0.3 * same
    e = auc_with_ci([perfect, noisy], [labels, labels], replicates=200)
    np.testing.assert_allclose(e.point, (1 + separation_auc(noisy, labels)) / 2)
    assert np.all(e.low <= e.point) and np.all(e.point <= e.high)
    assert e.average_low <= e.average <= e.average_high and e.final_low <= e.point[-1] <= e.final_high
    alone = auc_with_ci([perfect], [labels], replicates=50)
    assert (alone.average, alone.average_low, alone.average_high) == (1.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- run groups

CLASS_NAMES = ["airplane", "automobile", "ship"]
B2 = np.ones((3, 3)) + 2 * np.eye(3)  # A[b, b] = 3, A[a != b, b] = 1
B3 = np.ones((3, 3)) + 4 * np.eye(3)  # A[b, b] = 5


def write_run(path, preset, stores, test_acc, task="classification"):
    """A run directory of ``preset``: ``spec.json``, one epoch row of ``metrics.jsonl`` and the
    replay ``stores`` (name -> write_store keyword arguments)."""
    path.mkdir(parents=True)
    loss = "cross_entropy" if task == "classification" else "mse"
    extra = {"classes": [0, 1, 8], "class_names": CLASS_NAMES} if task == "classification" else {}
    spec = RunSpec(
        ModelSpec("mlp", {"in_features": 4, "num_outputs": 3}), task, loss, 3, preset=preset, extra=extra
    )
    atomic_write_json(path / "spec.json", spec.to_json())
    row = {"kind": "epoch", "step": 18, "epoch": 0, "test_acc": test_acc}
    (path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    for name, kw in stores.items():
        write_store(path / f"{name}.zarr", **kw)


def write_group(path, preset, runs):
    """A run group: ``group.json`` and one run per entry of ``runs`` (write_run arguments)."""
    path.mkdir()
    members = [{"dir": f"run-{k:02d}", "seed": k} for k in range(len(runs))]
    atomic_write_json(
        path / "group.json", {"format": 1, "preset": preset, "config": {"runs": len(runs)}, "runs": members}
    )
    for m, kw in zip(members, runs, strict=True):
        write_run(path / m["dir"], preset, **kw)
    return path


def paper_group(path):
    """Two runs of cifar10-resnet18; run-00 has three done snapshots (the last one is not done in
    run-01, so it is left out), with S[i, j] = B[class(j), class(i)] off the diagonal and 1 on it."""
    huge = np.full((3, 3), 100.0)

    def store(blocks, done):
        S = np.stack([block_matrix(B, LABELS6) for B in blocks])
        measures = {"seed_kl": S, "kl": S.copy()}
        return {
            "adam-fresh": {
                "measures": measures,
                "targets": LABELS6,
                "done": done,
                "steps": [0, 9, 18],
            }
        }

    return write_group(
        path,
        "cifar10-resnet18",
        [
            {"stores": store([B0, B1, huge], [True, True, True]), "test_acc": 0.7},
            {"stores": store([B2, B3, huge], [True, True, False]), "test_acc": 0.8},
        ],
    )


# The paper's table by hand (self pairs included): the same-class cell of class b holds two self
# pairs (1) and two others (B[b, b]): (1 + B[b, b]) / 2, over the mean of B[a != b, b].
# run-00: B0 -> [3/2 / 1, 5/2 / 1, 4/2 / 1.5] = [1.5, 2.5, 4/3]; B1 -> [2 / 1.5, 3 / 2, 3.5 / 1]
RUN0_SELF = [(1.5 + 4 / 3) / 2, (2.5 + 1.5) / 2, (4 / 3 + 3.5) / 2]  # [17/12, 2, 29/12]
RUN1_SELF = [(2 + 3) / 2] * 3  # B2 -> 2, B3 -> 3 in every class
PAPER_MEAN = [47 / 24, 2.25, 59 / 24]
PAPER_STD = [(2.5 - 17 / 12) / SQRT2, 0.5 / SQRT2, (2.5 - 29 / 12) / SQRT2]
# Self pairs excluded: B0 -> [2, 4, 2], B1 -> [2, 2.5, 6]; B2 -> 3, B3 -> 5 everywhere.
RATIO_MEAN = [(2 + 4) / 2, (3.25 + 4) / 2, (4 + 4) / 2]
RATIO_STD = [2 / SQRT2, 0.75 / SQRT2, 0.0]


def test_spec5_table_of_a_group_equals_the_hand_computed_one(tmp_path):
    group = paper_group(tmp_path / "group")
    np.testing.assert_allclose(np.mean([RUN0_SELF, RUN1_SELF], axis=0), PAPER_MEAN)
    summary = analyze(group)
    paper = summary["paper"]
    assert (
        paper["data"] == "CIFAR-10" and paper["classes"] == [0, 1, 8] and paper["class_names"] == CLASS_NAMES
    )
    table = paper["stores"]["adam-fresh"]
    assert set(table) == {"seed_kl", "kl"}  # orig_probs_l2 is not stored
    for m in ("seed_kl", "kl"):
        np.testing.assert_allclose(table[m]["ours"], PAPER_MEAN)
        np.testing.assert_allclose(table[m]["std"], PAPER_STD)
    assert table["seed_kl"]["published"] == list(PUBLISHED["cifar10-resnet18"].same_cross["seed_kl"])
    assert table["kl"]["published"] is None
    assert paper["test_acc"] == {
        "ours": pytest.approx(0.75),
        "std": pytest.approx(0.1 / SQRT2),
        "published": 0.771,
        "metric": "test_acc",
    }

    store = summary["stores"]["adam-fresh"]
    assert summary["runs"] == ["run-00", "run-01"] and store["runs"] == ["run-00", "run-01"]
    assert store["snapshots"] == {  # step 18 is not done in run-01: the group's analysis stops at 9
        "done": 2,
        "stored": 3,
        "listed": 3,
        "first_step": 0,
        "last_step": 9,
        "last_listed_step": 18,
        "partial": True,
    }
    kl = store["measures"]["kl"]
    np.testing.assert_allclose(kl["same_cross_ratio"]["mean"], RATIO_MEAN)
    np.testing.assert_allclose(kl["same_cross_ratio_std"]["mean"], RATIO_STD, atol=1e-12)
    ci = kl["separation_auc"]["ci"]
    assert ci["time_average"][0] <= kl["separation_auc"]["time_average"] <= ci["time_average"][1]

    html = (tmp_path / "group" / "analysis" / "report.html").read_text()
    assert "The paper&#x27;s table: CIFAR-10" in html
    assert "of 2 runs (run-00, run-01)" in html and html.count("data:image/png;base64,") == len(
        summary["figures"]
    )
    text = format_table(summary)
    assert "The paper's table, CIFAR-10" in text and "1.17" in text and "published 0.771" in text


def test_run_group_bands_equal_hand_computed_mean_and_std(tmp_path):
    group = paper_group(tmp_path / "group")
    results = {run: stores[0] for run, stores in member_results(group).items()}
    curves, positions = run_curves(results, "kl")
    np.testing.assert_array_equal(curves.steps, [0, 9])
    assert {run: p.tolist() for run, p in positions.items()} == {"run-00": [0, 1], "run-01": [0, 1]}
    b = band(curves.stack("classpairs"))  # [S, K, K], self pairs excluded: A = B
    np.testing.assert_allclose(b.mean, [(B0 + B2) / 2, (B1 + B3) / 2])
    np.testing.assert_allclose(b.std, [np.abs(B0 - B2) / SQRT2, np.abs(B1 - B3) / SQRT2])
    np.testing.assert_allclose(curves.mean_curves().classpairs["mean"], b.mean)
    single = band(np.array([[1.0, 2.0]]))
    assert single.mean.tolist() == [1.0, 2.0] and np.isnan(single.std).all()

    summary = analyze(group, include_self=True)
    files = {f["file"] for f in summary["figures"]}
    assert files == {  # the class-pair grid of the headline measure (kl) only
        "adam-fresh_classpairs_kl.png",
        "adam-fresh_separation_auc.png",
        "training.png",
    }


def regression_run(trajectory, steps):
    """A regression store whose off-diagonal S equals ``trajectory[s]`` at snapshot ``s``."""
    S = np.ones((len(steps), 4, 4)) * np.asarray(trajectory)[:, None, None]
    S[:, np.arange(4), np.arange(4)] = 1.0
    store = {
        "measures": {"orig_outputs_l2": S},
        "targets": np.zeros((4, 1)),
        "done": [True] * len(steps),
        "steps": steps,
    }
    return {"stores": {"sgd": store}, "test_acc": 0.0, "task": "regression"}


@pytest.mark.slow
def test_regression_group_reports_its_transition_and_a_flat_one_reports_none(tmp_path):
    steps = np.arange(0, 800, 20)
    rng = np.random.default_rng(0)
    runs = [
        regression_run(hinge(steps, 300, 0.01, 0.0005) + 0.05 * rng.standard_normal(len(steps)), steps)
        for _ in range(2)
    ]
    summary = analyze(write_group(tmp_path / "elastic", "regression-teacher", runs))
    phases = summary["stores"]["sgd"]["measures"]["orig_outputs_l2"]["phases"]
    for p in [phases["mean"], *phases["runs"].values()]:
        assert p["found"] and p["settles"] and abs(p["step"] - 300) <= EVEN_TOLERANCE * 20
    assert set(phases["runs"]) == {"run-00", "run-01"}
    assert "sgd_phases.png" in {f["file"] for f in summary["figures"]} and summary["paper"] is None
    assert "Elastic-to-inelastic transition" in format_table(summary)

    flat = [regression_run(2 + 0.05 * rng.standard_normal(len(steps)), steps)]
    summary = analyze(write_group(tmp_path / "flat", "regression-teacher", flat))
    p = summary["stores"]["sgd"]["measures"]["orig_outputs_l2"]["phases"]["mean"]
    assert not p["found"] and p["step"] is None and p["reason"]
    assert "none: " in format_table(summary)


def test_record_group_layout_and_errors(tmp_path):
    seen = []
    group = record_group(tmp_path / "g", "digits", {"x": 1}, 3, 7, lambda d, s: seen.append((d.name, s)))
    assert seen == [("run-00", 7), ("run-01", 8), ("run-02", 9)]
    assert group.members == [tmp_path / "g" / f"run-0{k}" for k in range(3)] and group.seeds == [7, 8, 9]
    assert read_group(tmp_path / "g").config == {"x": 1}
    with pytest.raises(RunDirError, match="already holds"):
        record_group(tmp_path / "g", "digits", {}, 1, 0, lambda d, s: None)
    with pytest.raises(RunDirError, match="not a run group"):
        read_group(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "group.json").write_text(json.dumps({"runs": [{"dir": "../escape"}]}))
    with pytest.raises(RunDirError, match="inside the group"):
        read_group(tmp_path / "bad")

"""Analyses on synthetic replay stores, written through the replay store's writer, with known values."""

from __future__ import annotations

import json
from html import escape

import numpy as np
import pytest
import zarr

from analyses.curves import measure_curves
from analyses.report import analyze, format_table
from analyses.results import load_results
from cli import main
from recorder.rundir.errors import ResultsError
from replay.classpairs import STATS
from tests.helpers import B0, B1, LABELS6, block_matrix, make_run_dir, write_store


def block_store(path, **kw):
    """Snapshots at steps 0, 9, 18; step 9 is not done (its huge values are never stored)."""
    kl = np.stack([block_matrix(B0, LABELS6), np.full((6, 6), 1000.0), block_matrix(B1, LABELS6)])
    write_store(path, {"kl": kl}, LABELS6, done=[True, False, True], steps=[0, 9, 18], **kw)


# Time-averaged A[b, b] / mean_{a != b} A[a, b] over the done snapshots, by hand.
# Self pairs excluded: A = B.
TABLE_NO_SELF = [(2 / 1 + 3 / 1.5) / 2, (4 / 1 + 5 / 2) / 2, (3 / 1.5 + 6 / 1) / 2]
# Self pairs included: a same-class cell holds two self pairs (1) and two others (B[b, b]).
TABLE_SELF = [
    ((2 + 1) / 2 / 1 + (3 + 1) / 2 / 1.5) / 2,
    ((4 + 1) / 2 / 1 + (5 + 1) / 2 / 2) / 2,
    ((3 + 1) / 2 / 1.5 + (6 + 1) / 2 / 1) / 2,
]


# ----------------------------------------------------------------------------- tests


def test_spec5_table_equals_hand_computed(tmp_path):
    block_store(tmp_path / "adam-fresh.zarr", include_self=False)
    (result,) = load_results(tmp_path)
    assert result.steps.tolist() == [0, 18]  # the undone snapshot is not seen
    assert result.measures["kl"].shape == (2, 6, 6)
    for stat in STATS:
        np.testing.assert_allclose(measure_curves(result, "kl").ratio_table(stat), TABLE_NO_SELF)
        # the store holds include_self=False: the paper's protocol is recomputed from measures/kl
        np.testing.assert_allclose(
            measure_curves(result, "kl", include_self=True).ratio_table(stat), TABLE_SELF
        )


def test_stored_aggregates_used_when_protocol_matches(tmp_path):
    A = np.stack([np.full((3, 3), 1.0) + np.eye(3) * k for k in (1, 50, 3)])  # [S, K, K], A[b, b] = 1 + k
    block_store(tmp_path / "x.zarr", include_self=True, classpairs={"kl": {"mean": A, "median": A}})
    (result,) = load_results(tmp_path)
    # ratio (1 + k) / 1 at the done snapshots k = 1, 3 (50 is not done): time average 3
    np.testing.assert_allclose(measure_curves(result, "kl", include_self=True).ratio_table(), [3.0, 3.0, 3.0])
    np.testing.assert_allclose(measure_curves(result, "kl", include_self=False).ratio_table(), TABLE_NO_SELF)


def test_separation_auc_curve_equals_hand_computed(tmp_path):
    labels = np.array([0, 0, 1, 1])
    same = [(0, 1), (1, 0), (2, 3), (3, 2)]
    cross = [(0, 2), (0, 3), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)]

    def snapshot(same_value, cross_values):
        S = np.eye(4)
        for i, j in same:
            S[i, j] = same_value
        for (i, j), v in zip(cross, cross_values, strict=True):
            S[i, j] = v
        return S

    kl = np.stack(
        [
            snapshot(5, [1, 2, 3, 4, 6, 7, 8, 9]),  # 5 beats 4 of 8 cross pairs: 0.5
            snapshot(10, [1, 2, 3, 4, 6, 7, 8, 9]),  # beats all: 1.0
            snapshot(0, [1, 2, 3, 4, 6, 7, 8, 9]),  # not done (would be 0.0)
            snapshot(5, [5, 5, 1, 1, 1, 1, 1, 1]),  # beats 6, ties 2: (6 + 2 / 2) / 8
        ]
    )
    write_store(tmp_path / "s.zarr", {"kl": kl}, labels, [True, True, False, True], [0, 5, 10, 15])
    (result,) = load_results(tmp_path)
    curves = measure_curves(result, "kl")
    np.testing.assert_array_equal(curves.steps, [0, 5, 15])
    np.testing.assert_allclose(curves.auc, [0.5, 1.0, 0.875])


def test_analyze_writes_figures_summary_report_and_comparison(tmp_path):
    metrics = [{"kind": "step", "step": s, "epoch": s // 10, "loss": 2.0 / (1 + s)} for s in range(1, 30)]
    metrics += [
        {"kind": "epoch", "step": 10 * e + 9, "epoch": e, "loss": 1.0 / (e + 1), "test_acc": 0.5 + 0.1 * e}
        for e in range(3)
    ]
    run = make_run_dir(tmp_path / "run", metrics=metrics)
    rng = np.random.default_rng(0)
    labels = np.array([0, 0, 1, 1, 2, 2])
    for name in ("adam-fresh", "recorded"):
        measures = {m: rng.uniform(0.1, 2.0, size=(3, 6, 6)) for m in ("kl", "orig_probs_l2")}
        write_store(run / f"{name}.zarr", measures, labels, [True] * 3, [0, 10, 20])
    write_store(run / "partial.zarr", {"kl": np.ones((2, 6, 6))}, labels, [False, False], [0, 10])

    summary = analyze(run)
    out = run / "analysis"
    files = {f["file"] for f in summary["figures"]}
    assert files == {  # the class-pair grid of the headline measure (kl) only: the others on request
        "adam-fresh_classpairs_kl.png",
        "adam-fresh_separation_auc.png",
        "recorded_classpairs_kl.png",
        "recorded_separation_auc.png",
        "comparison.png",
        "training.png",
    }
    for f in files:
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text()) == summary

    assert summary["skipped"] == {"partial": "no completed snapshot"}
    assert summary["comparison"]["stores"] == ["adam-fresh", "recorded"]
    assert set(summary["comparison"]["measures"]) == {"kl", "orig_probs_l2"}
    assert set(summary["comparison"]["measures"]["kl"]) == {"adam-fresh", "recorded"}
    kl = summary["stores"]["recorded"]["measures"]["kl"]
    assert 0 <= kl["separation_auc"]["final"] <= 1 and len(kl["same_cross_ratio"]["mean"]) == 3
    assert summary["training"]["epoch"] == {
        "loss": {"final": pytest.approx(1 / 3), "step": 29},
        "test_acc": {"final": pytest.approx(0.7), "step": 29},
    }
    assert summary["training"]["step"] == {"loss": {"final": pytest.approx(2 / 30), "step": 29}}

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(files)
    assert "Configurations compared" in html and "recorded" in html and "adam-fresh" in html
    table = format_table(summary)
    assert "adam-fresh" in table and "recorded" in table and "orig_probs_l2" in table


def test_analyze_paper_protocol_table(tmp_path):
    run = make_run_dir(tmp_path / "run")
    block_store(run / "adam-fresh.zarr", include_self=False)
    summary = analyze(run, out_dir=tmp_path / "out", include_self=True, measures=["kl"])
    ratio = summary["stores"]["adam-fresh"]["measures"]["kl"]["same_cross_ratio"]
    np.testing.assert_allclose(ratio["mean"], TABLE_SELF)
    assert (tmp_path / "out" / "report.html").exists()
    with pytest.raises(ResultsError, match="seed_kl"):
        analyze(run, out_dir=tmp_path / "out", measures=["seed_kl"])


def test_regression_store_gives_trajectory_summary(tmp_path):
    run = make_run_dir(tmp_path / "run", task="regression")
    off = ~np.eye(4, dtype=bool)
    S = np.ones((2, 4, 4))
    S[0][off] = np.arange(1, 13)  # median 6.5
    S[1][off] = np.arange(1, 13) * 10.0  # median 65
    write_store(run / "sgd.zarr", {"orig_outputs_l2": S}, np.zeros((4, 1)), [True, True], [0, 10])
    summary = analyze(run)
    m = summary["stores"]["sgd"]["measures"]["orig_outputs_l2"]
    assert m["median_S"] == {"first": 6.5, "final": 65.0, "time_average": 35.75}
    assert "separation_auc" not in m and summary["stores"]["sgd"]["classes"] is None
    assert [f["file"] for f in summary["figures"]] == ["sgd_trajectory.png"]
    assert "sgd" in format_table(summary)


def test_clear_errors(tmp_path):
    run = make_run_dir(tmp_path / "run")
    with pytest.raises(ResultsError, match="no replay stores"):
        analyze(run)
    (run / "bad.zarr").mkdir()
    (run / "bad.zarr" / "zarr.json").write_text("not json")
    with pytest.raises(ResultsError, match="bad.zarr"):
        load_results(run)
    (run / "bad.zarr" / "zarr.json").unlink()
    (run / "bad.zarr").rmdir()
    block_store(run / "nodone.zarr")
    zarr.open_group(run / "nodone.zarr", mode="a").attrs["measures"] = ["kl", "linear"]
    with pytest.raises(ResultsError, match="nodone.zarr.*measures/linear"):
        load_results(run)


# ----------------------------------------------------------------------------- partial stores, options


def test_partial_store_is_marked_in_table_summary_and_report(tmp_path, runner):
    run = make_run_dir(tmp_path / "run")
    kl = np.stack([block_matrix(B0, LABELS6)] * 5)
    write_store(run / "part.zarr", {"kl": kl}, LABELS6, [True, True, False, False, False], [0, 9, 18, 27, 36])
    write_store(run / "empty.zarr", {"kl": kl[:2]}, LABELS6, [False, False], [0, 9])
    result = runner.invoke(main, ["analyze", str(run), "--no-figures"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert summary["stores"]["part"]["snapshots"] == {
        "done": 2,
        "stored": 5,
        "listed": 5,
        "first_step": 0,
        "last_step": 9,
        "last_listed_step": 36,
        "partial": True,
    }
    partial = (
        "Partial: part has 2 of 5 snapshots replayed (steps 0 to 9 of 36); its final values are those of "
        "step 9; rerun its replay to do the rest."
    )
    assert summary["status"] == [partial, "Skipped: empty (no completed snapshot)."]
    assert "part (2/5 snapshots)  kl" in result.output and partial in result.output
    assert "Skipped: empty (no completed snapshot)." in result.output
    html = (run / "analysis" / "report.html").read_text()
    assert html.index(escape(partial)) < html.index("<nav>")  # among the first lines


def test_stores_measures_and_no_figures_options(tmp_path, runner):
    run = make_run_dir(tmp_path / "run")
    rng = np.random.default_rng(1)
    measures = {m: rng.uniform(0.1, 2.0, size=(2, 6, 6)) for m in ("kl", "linear", "orig_probs_l2")}
    for name in ("a", "b"):
        write_store(run / f"{name}.zarr", measures, LABELS6, [True, True], [0, 10])
    result = runner.invoke(
        main, ["analyze", str(run), "--stores", "b", "--measures", "linear", "--no-figures"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert list(summary["stores"]) == ["b"] and list(summary["stores"]["b"]["measures"]) == ["linear"]
    assert summary["figures"] == [] and not list((run / "analysis").glob("*.png"))
    assert result.output.rstrip().endswith(f"summary.json and report.html in {run / 'analysis'}")
    result = runner.invoke(main, ["analyze", str(run), "--stores", "c"])
    assert result.exit_code == 1 and result.output == "Error: store(s) c not found; stored: a, b\n"

    # default: every measure in the numbers, the class-pair grid of the headline measure (kl) only
    summary = analyze(run, stores=["a"])
    grids = [f["file"] for f in summary["figures"] if f["section"] == "classpairs"]
    assert grids == ["a_classpairs_kl.png"]
    assert set(summary["stores"]["a"]["measures"]) == {"kl", "linear", "orig_probs_l2"}
    summary = analyze(run, stores=["a"], measures=["linear", "kl"])  # named measures: each drawn
    grids = sorted(f["file"] for f in summary["figures"] if f["section"] == "classpairs")
    assert grids == ["a_classpairs_kl.png", "a_classpairs_linear.png"]


# ----------------------------------------------------------------------------- headline and report


@pytest.mark.parametrize(
    "same, cross, verdict",
    [
        (3.0, 1.0, "an update on one example moves examples of its own class more than others"),
        (1.0, 3.0, "an update on one example moves examples of other classes more than its own"),
        (1.0, 1.0, "same-class and cross-class pairs are not told apart"),
    ],
)
def test_headline_says_whether_same_class_pairs_move_more(tmp_path, same, cross, verdict):
    run = make_run_dir(tmp_path / "run")
    B = np.full((3, 3), cross) + np.eye(3) * (same - cross)  # S[i, j] by class, self pairs excluded
    kl = np.stack([block_matrix(B * (1 + k), LABELS6) for k in range(3)])
    write_store(run / "s.zarr", {"kl": kl}, LABELS6, [True] * 3, [0, 10, 20])
    summary = analyze(run, figures=False)
    auc = [1.0, 0.0, 0.5][[3.0, 1.0].index(same) if same != cross else 2]  # exact: no overlap, or all ties
    ratio = same / cross
    assert summary["headline"][0] == (
        f"s, kl: {verdict}: separation AUC {auc:.3g} averaged over training (95% interval {auc:.3g} to "
        f"{auc:.3g}; 0.5 means no separation), same-class S_rel {ratio:.3g} times the cross-class mean."
    )
    assert (
        summary["headline"][1]
        == f"Over training its AUC stays from {auc:.3g} at step 0 to {auc:.3g} at step 20."
    )


@pytest.mark.slow
def test_report_leads_with_headline_and_key_figures_the_rest_folded(tmp_path):
    """Ten classes of five probes, two stores: the demo's shape, with fewer snapshots."""
    run = make_run_dir(tmp_path / "run")
    labels = np.repeat(np.arange(10), 5)
    rng = np.random.default_rng(2)
    for name in ("adam-fresh", "recorded"):
        S = rng.lognormal(size=(8, 50, 50)) * (1 + (labels[:, None] == labels[None, :]))
        write_store(run / f"{name}.zarr", {"kl": S, "linear": S * 2}, labels, [True] * 8, range(0, 80, 10))
    summary = analyze(run)
    html = (run / "analysis" / "report.html").read_text()
    order = [
        '<ul class="headline">',
        "<nav>",
        '<h2 id="key-figures">',
        "adam-fresh_separation_auc.png",
        "comparison.png",
        '<h2 id="summary">',
        '<details id="classpairs">',
        "adam-fresh_classpairs_kl.png",
        '<details id="configuration">',
    ]
    positions = [html.index(marker) for marker in order]
    assert positions == sorted(positions)
    for anchor in ("key-figures", "summary", "classpairs", "ratios", "comparison", "configuration"):
        assert f'href="#{anchor}"' in html
    assert html.count("data:image/png;base64,") == len(summary["figures"]) == 5
    sizes = {p.name: p.stat().st_size for p in (run / "analysis").glob("*.png")}
    assert max(sizes.values()) < 150_000, sizes  # a ten-panel grid included
    assert len(html) < 1_000_000

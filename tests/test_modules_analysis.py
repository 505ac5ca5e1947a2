"""Where elasticity lives (``analyses/modules.py``) and its part of ``analyze``, against oracles:
module shares built from random Jacobians and updates in float64 and averaged over pairs by plain
loops, and the ``linear`` measure computed from the same Jacobians."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from analyses.modules import ModuleShares, describe, module_shares, same_cross_shares
from analyses.report import analyze
from analyses.results import load_result
from recorder.rundir.errors import ResultsError
from recorder.rundir.snapshot import SnapshotEntry
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.config import ReplayConfig
from replay.engine import SnapshotResult
from replay.store import ReplayStore
from tests.helpers import make_run_dir, write_store

EPS = 1e-8
MODULES = ("0", "2", "4")


def pair_shares(rng: np.random.Generator, labels: np.ndarray, widths=(5, 3, 4), C=3):
    """One snapshot's module shares ``share[m, i, j]`` ``[M, P, P]`` and ``linear`` ``S[i, j]``
    ``[P, P]`` from random Jacobians ``J_j`` ``[C, W]`` and updates ``U_i`` ``[W]``, ``W`` split into
    the modules' ``widths``: the definitions, one pair at a time."""
    P, W = len(labels), sum(widths)
    J, U = rng.normal(size=(P, C, W)), rng.normal(size=(P, W)) * rng.uniform(0.1, 10, (P, 1))
    bounds = np.cumsum((0, *widths))
    share = np.zeros((len(widths), P, P))
    S = np.zeros((P, P))
    for i in range(P):
        own = np.linalg.norm(J[i] @ U[i])
        for j in range(P):
            whole = J[j] @ U[i]
            S[i, j] = np.linalg.norm(whole) / (own + EPS)
            for m in range(len(widths)):
                part = J[j][:, bounds[m] : bounds[m + 1]] @ U[i][bounds[m] : bounds[m + 1]]
                share[m, i, j] = part @ whole / np.linalg.norm(whole) / (own + EPS)
    return share, S


def class_means(X: np.ndarray, labels: np.ndarray, include_self: bool = False) -> np.ndarray:
    """``A[a, b]`` ``[K, K]``: the mean of ``X[i, j]`` ``[P, P]`` over the pairs with ``class(j) = a``,
    ``class(i) = b`` (``i != j`` unless ``include_self``), by a loop over the pairs."""
    K = labels.max() + 1
    total, count = np.zeros((K, K)), np.zeros((K, K))
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i != j or include_self:
                total[labels[j], labels[i]] += X[i, j]
                count[labels[j], labels[i]] += 1
    with np.errstate(invalid="ignore"):
        return total / count


def cell_means(A: np.ndarray) -> tuple[float, float]:
    """The mean of the diagonal cells and of the others of ``A`` ``[K, K]``, NaN cells left out."""
    same = [A[a, a] for a in range(len(A)) if np.isfinite(A[a, a])]
    cross = [A[a, b] for a in range(len(A)) for b in range(len(A)) if a != b and np.isfinite(A[a, b])]
    return float(np.mean(same)), float(np.mean(cross))


LABELS = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])


def shares_and_linear(seed: int, snapshots: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``module_share`` ``[S, M, K, K]`` and the class-pair means of ``linear`` ``[S, K, K]``."""
    rng = np.random.default_rng(seed)
    stored, linear = [], []
    for _ in range(snapshots):
        share, S = pair_shares(rng, LABELS)
        stored.append(np.stack([class_means(x, LABELS) for x in share]))
        linear.append(class_means(S, LABELS))
    return np.stack(stored), np.stack(linear)


def test_same_and_cross_shares_and_their_total_against_loops():
    module_share, linear = shares_and_linear(0)
    module_share[1, 2, 0, 1] = np.nan  # a cell without pairs: left out
    same, cross = same_cross_shares(module_share)
    for s in range(2):
        for m in range(len(MODULES)):
            assert (same[s, m], cross[s, m]) == pytest.approx(cell_means(module_share[s, m]), rel=1e-12)
    shares = ModuleShares("st", MODULES, np.array([0, 5]), *same_cross_shares(module_share[:1]), False, 1)
    # the modules' shares add up to the linear measure: the definitions agree
    expected = cell_means(linear[0])
    assert (shares.total("same")[0], shares.total("cross")[0]) == pytest.approx(expected, rel=1e-10)
    for kind in ("same", "cross"):
        np.testing.assert_allclose(shares.fraction(kind).sum(axis=1), 1.0, rtol=1e-12)
        np.testing.assert_allclose(
            shares.fraction(kind) * shares.total(kind)[:, None], shares.share(kind), rtol=1e-12
        )


def test_a_module_against_the_change_has_a_negative_part_and_a_zero_total_none():
    same = np.array([[2.0, -0.5, 0.5], [1.0, -1.0, 0.0]])  # [S, M]: the second total is 0
    shares = ModuleShares("st", MODULES, np.array([0, 5]), same, same.copy(), True, 1)
    np.testing.assert_allclose(shares.fraction("same")[0], [1.0, -0.25, 0.25])
    assert np.isnan(shares.fraction("same")[1]).all()
    summary = json.loads(
        json.dumps(ModuleShares("st", MODULES, np.array([0]), same[:1], same[:1], True, 1).summary())
    )
    assert summary["same_class_fraction"] == [1.0, -0.25, 0.25] and summary["total"]["same_class"] == 2.0
    assert describe(summary) == (
        "At step 0, module 0 carries the largest part of the first-order change: 100% of it for "
        "same-class pairs, 100% of it for cross-class pairs."
    )
    summary["cross_class_fraction"] = [0.2, 0.7, 0.1]
    assert describe(summary) == (
        "At step 0, the largest part of the first-order change comes from module 0 for same-class pairs "
        "(100%); module 2 for cross-class pairs (70%)."
    )
    last = ModuleShares("st", MODULES, np.array([0, 5]), same, same.copy(), True, 1).summary()
    assert last["same_class_fraction"] == [None] * 3 and last["step"] == 5
    assert describe(last) == "At step 5 the first-order change is zero or unknown."


def write_module_store(path, module_share, linear_S, done, steps, modules=MODULES, include_self=False):
    """A store with ``module_share`` ``[S, M, K, K]`` and the measure ``linear`` ``[S, P, P]``,
    written through :class:`ReplayStore` as a replay with ``module_split`` does."""
    targets = torch.as_tensor(LABELS)
    spec = RunSpec(
        ModelSpec("mlp", {"in_features": 4, "num_outputs": 3}), "classification", "cross_entropy", 3
    )
    config = ReplayConfig(
        measures=("linear",), precision="float64", include_self=include_self, module_split=True
    )
    entries = [SnapshotEntry(int(t), int(t) // 10, f"snapshots/step_{t}.safetensors", "", 0) for t in steps]
    store = ReplayStore.prepare(path, config, spec, entries, targets, ("linear",), tuple(modules))
    P = len(LABELS)
    for s in np.flatnonzero(done):
        store.write(
            int(s),
            SnapshotResult(
                base_outputs=torch.zeros(P, 3, dtype=torch.float64),
                probe_loss=torch.ones(P, dtype=torch.float64),
                update_norm=torch.ones(P, dtype=torch.float64),
                measures={"linear": torch.as_tensor(linear_S[s])},
                amplification=torch.ones(P, dtype=torch.float64),
                error_estimate=1e-6,
                module_share=torch.as_tensor(module_share[s]),
            ),
        )


def stored_shares(seed: int, S: int):
    """``module_share`` ``[S, M, K, K]`` and ``linear`` ``[S, P, P]`` of ``S`` random snapshots."""
    rng = np.random.default_rng(seed)
    pairs = [pair_shares(rng, LABELS) for _ in range(S)]
    module_share = np.stack([np.stack([class_means(x, LABELS) for x in share]) for share, _ in pairs])
    return module_share, np.stack([S_ for _, S_ in pairs])


def test_module_shares_of_a_group_on_the_common_done_steps(tmp_path):
    share_a, linear_a = stored_shares(1, 3)
    share_b, linear_b = stored_shares(2, 3)
    write_module_store(tmp_path / "a.zarr", share_a, linear_a, [1, 1, 1], [0, 5, 10])
    write_module_store(tmp_path / "b.zarr", share_b, linear_b, [1, 0, 1], [0, 5, 10])  # step 5 not done
    a, b = load_result(tmp_path / "a.zarr"), load_result(tmp_path / "b.zarr")
    assert a.modules == MODULES and a.module_share is not None and a.module_share.shape == (3, 3, 3, 3)
    shares = module_shares({"run-a": a, "run-b": b})
    assert shares is not None and shares.runs == 2 and shares.modules == MODULES
    np.testing.assert_array_equal(shares.steps, [0, 10])
    for k, s in enumerate((0, 2)):
        for m in range(len(MODULES)):
            oracle = [cell_means(x[s, m]) for x in (share_a, share_b)]
            assert shares.same[k, m] == pytest.approx(np.mean([o[0] for o in oracle]), rel=1e-12)
            assert shares.cross[k, m] == pytest.approx(np.mean([o[1] for o in oracle]), rel=1e-12)
    # the total is the class-pair mean of linear the store aggregated
    A = a.classpairs["linear"]["mean"].read()
    assert module_shares({"a": a}).total("same") == pytest.approx([cell_means(x)[0] for x in A], rel=1e-10)

    write_module_store(tmp_path / "c.zarr", share_a, linear_a, [1, 1, 1], [0, 5, 10], modules=("x", "y", "z"))
    with pytest.raises(ResultsError, match="the runs of a group split the same model"):
        module_shares({"a": a, "c": load_result(tmp_path / "c.zarr")})
    write_store(tmp_path / "d.zarr", {"linear": linear_a}, LABELS, [1, 1, 1], [0, 5, 10])
    assert module_shares({"a": a, "d": load_result(tmp_path / "d.zarr")}) is None


def test_analyze_shows_where_elasticity_lives_only_with_module_shares(tmp_path):
    run = make_run_dir(tmp_path / "run")
    share, linear = stored_shares(3, 3)
    write_module_store(run / "split.zarr", share, linear, [1, 1, 0], [0, 5, 10])
    write_store(run / "plain.zarr", {"linear": linear}, LABELS, [1, 1, 1], [0, 5, 10])
    summary = analyze(run, replicates=10)
    assert "modules" not in summary["stores"]["plain"]
    m = summary["stores"]["split"]["modules"]
    assert m["modules"] == list(MODULES) and m["step"] == 5 and m["snapshots"] == 2  # the done ones
    same, cross = zip(*(cell_means(share[1, k]) for k in range(len(MODULES))), strict=True)
    assert m["same_class"] == pytest.approx(same, rel=1e-12) and m["cross_class"] == pytest.approx(
        cross, rel=1e-12
    )
    assert sum(m["same_class_fraction"]) == pytest.approx(1.0)
    files = [f["file"] for f in summary["figures"] if f["section"] == "modules"]
    assert files == ["split_modules.png"] and (run / "analysis" / files[0]).stat().st_size > 0
    page = (run / "analysis" / "report.html").read_text()
    assert page.count("Where elasticity lives") == 2 and "all modules (= linear)" in page  # contents, section
    saved = json.loads((run / "analysis" / "summary.json").read_text())
    assert saved["stores"]["split"]["modules"]["modules"] == list(MODULES)

    plain = analyze(run, out_dir=tmp_path / "plain", stores=["plain"], figures=False, replicates=10)
    assert "Where elasticity lives" not in (tmp_path / "plain" / "report.html").read_text()
    assert all(f["section"] != "modules" for f in plain["figures"])

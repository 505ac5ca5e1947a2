"""He & Su's clustering on S_rel (``analyses/clustering.py``, ``cli.py cluster``), the linearisation
gap (``analyses/linearisation.py``) and the ``digits-pairs`` preset, against independent oracles:
permutations enumerated, partitions enumerated, scikit-learn's K-means, and a plain float64 loop
of real ``torch.optim.SGD`` steps with ``torch.func.jvp``."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from torch.func import functional_call, jvp

from analyses.clustering import (
    KERNEL,
    N_INIT,
    cluster_store,
    clustering_accuracy,
    kernel_features,
    kernel_kmeans,
    normalised_kernel,
    spectral,
)
from analyses.linearisation import linearisation_gap, numerators, stored_self_changes
from analyses.results import load_result
from cli import main
from recorder.rundir.errors import ResultsError
from recorder.rundir.run import RunDir
from tests.helpers import make_model, make_run, write_store


def permutation_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The oracle: the best accuracy over every assignment of class labels to clusters."""
    classes, clusters = np.unique(truth), np.unique(predicted)
    best = 0.0
    for labels in itertools.permutations(classes, len(clusters)):
        mapped = np.array([labels[list(clusters).index(p)] for p in predicted])
        best = max(best, float(np.mean(mapped == truth)))
    return best


def test_accuracy_known_cases_and_any_labelling():
    truth = np.array([0, 0, 1, 1])
    assert clustering_accuracy(truth, np.array([1, 1, 0, 0])) == 1.0
    assert clustering_accuracy(truth, np.array([0, 1, 0, 1])) == 0.5
    assert clustering_accuracy(truth, np.array([5, 5, 5, 9])) == 0.75
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = rng.integers(0, 3, 30)
        predicted = rng.integers(0, 3, 30)
        expected = permutation_accuracy(truth, predicted)
        assert clustering_accuracy(truth, predicted) == pytest.approx(expected)
        relabelled = np.array([7, 42, -1])[predicted]  # the same clustering under other names
        assert clustering_accuracy(truth, relabelled) == pytest.approx(expected)


def block_kernel(labels: np.ndarray, within: float = 1.0, across: float = 0.01) -> np.ndarray:
    return np.where(labels[:, None] == labels[None, :], within, across)


def test_block_diagonal_similarity_is_clustered_exactly():
    truth = np.repeat([0, 1, 2], [5, 7, 4])
    order = np.random.default_rng(1).permutation(len(truth))
    truth = truth[order]
    K = block_kernel(truth)
    assert clustering_accuracy(truth, kernel_kmeans(K, 3, seed=0)) == 1.0
    assert clustering_accuracy(truth, spectral(K, 3, seed=0)) == 1.0
    pure = block_kernel(truth, across=0.0)  # disconnected blocks: spectral still separates them
    assert clustering_accuracy(truth, spectral(pure, 3, seed=0)) == 1.0


def kernel_kmeans_objective(K: np.ndarray, labels: np.ndarray) -> float:
    """Within-cluster sum of squared feature-space distances, from the kernel alone."""
    total = 0.0
    for c in np.unique(labels):
        members = labels == c
        total += np.trace(K[members][:, members]) - K[members][:, members].sum() / members.sum()
    return float(total)


def test_kernel_kmeans_finds_the_best_partition():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0, 1, (6, 3)), rng.normal(1.5, 1, (6, 3))])
    K = x @ x.T  # positive semi-definite: nothing clipped
    best = min(
        kernel_kmeans_objective(K, np.array((0, *bits)))
        for bits in itertools.product((0, 1), repeat=len(x) - 1)
        if any(bits)
    )
    assert kernel_kmeans_objective(K, kernel_kmeans(K, 2, seed=0)) == pytest.approx(best, rel=1e-9)


def test_kernel_features_are_the_nearest_positive_semidefinite_kernel():
    rng = np.random.default_rng(3)
    B = rng.normal(size=(8, 8))
    A = (B + B.T) / 2  # indefinite
    values, vectors = np.linalg.eigh(A)
    assert values.min() < 0 < values.max()
    phi = kernel_features(A)
    np.testing.assert_allclose(phi @ phi.T, (vectors * np.maximum(values, 0)) @ vectors.T, atol=1e-12)


def synthetic_store(path, labels: np.ndarray) -> tuple:
    """A classification store of 4 snapshots: S in blocks of the classes, S in blocks of another
    partition, NaN, and a snapshot not done."""
    other = (np.arange(len(labels)) >= 3).astype(int)  # probes 0-2 against the rest
    S = np.stack(
        [block_kernel(labels), block_kernel(other), np.full((len(labels),) * 2, np.nan), np.eye(len(labels))]
    )
    write_store(path, {"orig_logits_l2": S}, labels, done=[1, 1, 1, 0], steps=[0, 5, 10, 15])
    return load_result(path), other


def test_cluster_store_on_a_synthetic_store(tmp_path):
    labels = np.repeat([0, 1, 2], 4)
    result, other = synthetic_store(tmp_path / "s.zarr", labels)
    rng = np.random.default_rng(4)
    inputs = rng.normal(size=(len(labels), 5)) + 3 * labels[:, None]

    c = cluster_store(result, inputs, classes=[0, 2])
    chosen = np.isin(labels, [0, 2])
    assert c.classes == [0, 2] and c.num_probes == 8
    np.testing.assert_array_equal(c.steps, [0, 5, 10])
    expected_other = permutation_accuracy(labels[chosen], other[chosen])  # 6 of 8
    for method in ("kernel_kmeans", "spectral"):
        acc = c.accuracy["orig_logits_l2"][method]
        assert acc[0] == 1.0 and acc[1] == pytest.approx(expected_other) and np.isnan(acc[2])
    x = inputs[chosen]
    sklearn_labels = KMeans(2, n_init=N_INIT, random_state=0).fit_predict(x)
    assert c.baselines["kmeans_raw"] == pytest.approx(permutation_accuracy(labels[chosen], sklearn_labels))

    every = cluster_store(result, inputs)  # every class: three clusters
    assert every.classes == [0, 1, 2] and every.accuracy["orig_logits_l2"]["kernel_kmeans"][0] == 1.0
    with pytest.raises(ResultsError, match="at least two of the probe classes"):
        cluster_store(result, inputs, classes=[0, 7])
    with pytest.raises(ResultsError, match="no measure"):
        cluster_store(result, inputs, measures=["kl"])


def directional_features(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Features ``[N, 6]`` of one direction a class (plus a little noise), of norms from 0.01 to 100:
    apart by angle, not by size (as the gradients of probes)."""
    directions = np.eye(6)[: truth.max() + 1] + 0.1
    x = directions[truth] + 0.05 * rng.normal(size=(len(truth), 6))
    return x * np.logspace(-2, 2, len(truth))[rng.permutation(len(truth))][:, None]


def test_normalised_kernel_is_the_kernel_of_unit_features():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 9, 4)) * rng.uniform(0.01, 100, (2, 9, 1))
    K = x @ x.transpose(0, 2, 1)
    unit = x / np.linalg.norm(x, axis=-1, keepdims=True)  # the oracle: cosines of the features
    np.testing.assert_allclose(normalised_kernel(K), unit @ unit.transpose(0, 2, 1), atol=1e-12)
    x[1, 3] = 0.0  # a probe without gradient: no cosine
    A = normalised_kernel(x @ x.transpose(0, 2, 1))
    assert (
        np.isfinite(A[0]).all()
        and not np.isfinite(A[1, 3]).any()
        and np.isfinite(np.delete(A[1], 3, 0)[:, :3]).all()
    )


def test_a_kernel_of_separated_features_clusters_perfectly_and_a_permuted_one_does_not():
    rng = np.random.default_rng(8)
    truth = np.repeat([0, 1, 2], 12)[rng.permutation(36)]
    x = directional_features(truth, rng)
    A = normalised_kernel(x @ x.T)
    for method in (kernel_kmeans, spectral):
        assert clustering_accuracy(truth, method(A, 3, seed=0)) == 1.0
        shuffled = rng.permutation(len(truth))  # the kernel of other probes than the labels say
        assert clustering_accuracy(truth, method(A[shuffled][:, shuffled], 3, seed=0)) < 0.7
    # the raw kernel splits the probes by the size of their features: why it is normalised
    assert clustering_accuracy(truth, kernel_kmeans(x @ x.T, 3, seed=0)) < 0.7


class StoredKernel:
    """A stored ``ntk`` ``[S, P, P]`` as :class:`analyses.results.SnapshotArray` reads it."""

    def __init__(self, K: np.ndarray):
        self.K = K

    def read(self) -> np.ndarray:
        return self.K


def test_cluster_store_on_the_kernel(tmp_path):
    rng = np.random.default_rng(9)
    labels = np.repeat([0, 1, 2], 8)
    x = directional_features(labels, rng)
    other = (np.arange(len(labels)) % 2)[:, None] * np.eye(6)[4] + 0.01  # another partition
    K = np.stack([x @ x.T, other @ other.T + 1e-3 * np.eye(len(labels))])
    write_store(tmp_path / "s.zarr", {"linear": np.ones((2, 24, 24))}, labels, [1, 1], [0, 5])
    without = load_result(tmp_path / "s.zarr")
    with pytest.raises(ResultsError, match=r"no measure \['ntk'\]; it holds linear \(a replay with --ntk"):
        cluster_store(without, x, measures=[KERNEL])
    assert list(cluster_store(without, x, classes=[0, 1]).accuracy) == ["linear"]

    result = dataclasses.replace(without, ntk=StoredKernel(K))
    c = cluster_store(result, x, classes=[0, 2])
    assert list(c.accuracy) == ["linear", KERNEL]  # every similarity by default
    chosen = np.isin(labels, [0, 2])
    expected = permutation_accuracy(labels[chosen], np.arange(len(labels))[chosen] % 2)
    for method in ("kernel_kmeans", "spectral"):
        acc = c.accuracy[KERNEL][method]
        assert acc[0] == 1.0 and acc[1] == pytest.approx(expected)
    assert list(cluster_store(result, x, measures=[KERNEL]).accuracy) == [KERNEL]


def test_a_regression_store_without_probe_classes_is_refused(tmp_path):
    P = 6
    write_store(tmp_path / "r.zarr", {"linear": np.ones((1, P, P))}, np.zeros((P, 1)), [1], [0])
    with pytest.raises(ResultsError, match="no classes"):
        cluster_store(load_result(tmp_path / "r.zarr"), np.zeros((P, 2)))


def test_numerators_are_recovered_from_the_ratios():
    rng = np.random.default_rng(5)
    eps = 1e-8
    N = rng.uniform(0.1, 1, (2, 5, 5)) * np.logspace(-6, 0, 5)[:, None]  # rows of different scales
    N[1, 2] = 0.0  # a probe whose update is zero
    S = N / (np.diagonal(N, axis1=1, axis2=2)[..., None] + eps)
    # the rounding of 1 - S[i, i] is a relative error of about 1.1e-16 N[i, i] / eps: 1e-8 at N = 1
    np.testing.assert_allclose(numerators(S, eps), N, rtol=1e-7, atol=0)
    N[0, 3] *= 1e12  # a self change far above eps: 1 - S[i, i] is not resolved
    own = np.diagonal(N, axis1=1, axis2=2).copy()
    S = N / (own[..., None] + eps)
    recovered = numerators(S, eps)
    assert np.isnan(recovered[0, 3]).all() and np.isfinite(np.delete(recovered[0], 3, axis=0)).all()
    assert np.isnan(numerators(S, eps, from_diagonal=False)).all()  # a float32 store: nothing recovered
    own[1, 4] = np.nan  # a stored self change missing: that row from the diagonal
    np.testing.assert_allclose(numerators(S, eps, own), N, rtol=1e-7, atol=0)
    full = np.diagonal(N, axis1=1, axis2=2)  # eps 0 (a store of tiny steps): from the self changes only
    with np.errstate(invalid="ignore"):
        S0 = N / full[..., None]  # the zero row: NaN, as the replay's 0 / 0
    np.testing.assert_allclose(numerators(S0, 0.0, full, from_diagonal=False)[0], N[0], rtol=1e-12)


def test_linearisation_gap_of_a_store_without_self_changes(tmp_path):
    rng = np.random.default_rng(6)
    eps, P = 1e-8, 6
    F = rng.uniform(1e-3, 1e-2, (2, P, P))  # exact change sizes
    L = F * rng.uniform(0.9, 1.1, (2, P, P))  # first-order ones
    ratio = {m: N / (np.diagonal(N, axis1=1, axis2=2)[..., None] + eps) for m, N in (("f", F), ("l", L))}
    measures = {"orig_logits_l2": ratio["f"], "linear": ratio["l"]}
    write_store(tmp_path / "s.zarr", measures, np.repeat([0, 1, 2], 2), [1, 1], [0, 5])
    gap = linearisation_gap(load_result(tmp_path / "s.zarr"))
    assert gap is not None and gap.finite == "orig_logits_l2" and (gap.resolved == 1).all()
    for s in range(2):
        assert gap.change_gap[s] == pytest.approx(
            np.linalg.norm(F[s] - L[s]) / np.linalg.norm(F[s]), rel=1e-7
        )
        off = ~np.eye(P, dtype=bool)
        expected = np.linalg.norm((ratio["f"][s] - ratio["l"][s])[off]) / np.linalg.norm(ratio["f"][s][off])
        assert gap.measure_gap[s] == pytest.approx(expected, rel=1e-12)
    write_store(tmp_path / "k.zarr", {"kl": ratio["f"]}, np.repeat([0, 1, 2], 2), [1, 1], [0, 5])
    assert linearisation_gap(load_result(tmp_path / "k.zarr")) is None  # no pair to compare


def plain_change_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float):
    """``||D[i, j]||`` and ``||J_j U_i||`` ``[P, P]`` by a deep copy and one real SGD step per probe,
    float64; the tangent is the step the optimizer took."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(x)
    exact, first_order = [], []
    for i in range(len(x)):
        moved = copy.deepcopy(model)
        optimizer = torch.optim.SGD(moved.parameters(), lr=lr)
        torch.nn.functional.cross_entropy(moved(x[i : i + 1]), y[i : i + 1]).backward()
        optimizer.step()
        step = {n: (p.detach() - params[n]) for n, p in moved.named_parameters()}
        with torch.no_grad():
            exact.append((moved(x) - base).norm(dim=-1))
        _, change = jvp(lambda p: functional_call(model, p, (x,)), (params,), (step,))
        first_order.append(change.norm(dim=-1))
    return torch.stack(exact).numpy(), torch.stack(first_order).numpy()


def test_cluster_command_and_linearisation_gap_end_to_end(tmp_path, runner, one_thread):
    run = make_run(tmp_path / "run", steps=(0, 3, 6), optimizer_cls=torch.optim.SGD, lr=0.1)
    lr, eps = 0.5, 1e-8
    replay = ["replay", str(run), "--no-progress", "--update", "sgd", "--lr", str(lr)]
    replay += ["--precision", "float64", "--measures", "orig_logits_l2,linear"]
    result = runner.invoke(main, replay)
    assert result.exit_code == 0, result.output

    result = runner.invoke(main, ["cluster", str(run), "--classes", "0,2", "--pca", "2"])
    assert result.exit_code == 0, result.output
    assert "linearisation gap of sgd" in result.output
    out = run / "analysis"
    summary = json.loads((out / "clustering.json").read_text())
    assert summary["classes"] == [0, 2] and summary["steps"] == [0, 3, 6] and summary["pca_components"] == 2
    for by_method in summary["accuracy"].values():
        assert all(0.5 <= a <= 1 for acc in by_method.values() for a in acc)
    inputs, targets = RunDir(run).probes()
    chosen = np.isin(targets.numpy(), [0, 2])
    x, truth = inputs.numpy()[chosen], targets.numpy()[chosen]
    oracle = permutation_accuracy(truth, KMeans(2, n_init=N_INIT, random_state=0).fit_predict(x))
    assert summary["baselines"]["kmeans_raw"] == pytest.approx(oracle)
    assert (out / "clustering.png").stat().st_size > 0 and (out / "sgd_linearisation.png").stat().st_size > 0

    stored_result = load_result(run / "sgd.zarr")
    gap = linearisation_gap(stored_result)
    assert gap is not None
    own = stored_self_changes(stored_result)  # this replay stored its self changes: used as they are
    S_f = stored_result.measures["orig_logits_l2"].read()
    assert np.isfinite(own["orig_logits_l2"]).all()
    np.testing.assert_allclose(numerators(S_f, eps), numerators(S_f, eps, own["orig_logits_l2"]), rtol=1e-7)
    saved = json.loads((out / "sgd_linearisation.json").read_text())
    np.testing.assert_allclose(saved["change_gap"], gap.change_gap)
    model = make_model("mlp")
    x_all, y_all = inputs.to(torch.float64), targets
    stored = RunDir(run)
    for s, entry in enumerate(stored.manifest):
        snap = stored.load_snapshot(entry)
        model.load_state_dict(snap.params | snap.buffers)
        F, L = plain_change_norms(model, x_all, y_all, lr)
        assert np.linalg.norm(F - L) / np.linalg.norm(F) == pytest.approx(gap.change_gap[s], rel=1e-6)
        S_f = F / (np.diag(F)[:, None] + eps)
        S_l = L / (np.diag(L)[:, None] + eps)
        off = ~np.eye(len(F), dtype=bool)
        expected = np.linalg.norm(S_f[off] - S_l[off]) / np.linalg.norm(S_f[off])
        assert gap.measure_gap[s] == pytest.approx(expected, rel=1e-6)
    assert (gap.change_gap > 1e-3).all() and (gap.resolved == 1).all()  # a step large enough to show


def test_cluster_command_on_the_stored_kernel(tmp_path, runner, one_thread):
    run = make_run(tmp_path / "run", steps=(0, 6), optimizer_cls=torch.optim.SGD, lr=0.1)
    replay = ["replay", str(run), "--no-progress", "--update", "sgd", "--precision", "float64"]
    result = runner.invoke(main, [*replay, "--measures", "linear", "--name", "plain"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["cluster", str(run), "--store", "plain", "--measure", "ntk"])
    assert result.exit_code == 1 and "no measure ['ntk']; it holds linear" in result.output, result.output
    result = runner.invoke(main, [*replay, "--measures", "linear", "--ntk", "--name", "kernel"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["cluster", str(run), "--store", "kernel", "--measure", "ntk"])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "clustering.json").read_text())
    assert list(summary["accuracy"]) == ["ntk"]

    inputs, targets = RunDir(run).probes()
    truth = targets.numpy()
    model, stored = make_model("mlp"), RunDir(run)
    for s, entry in enumerate(stored.manifest):
        snap = stored.load_snapshot(entry)
        model.load_state_dict(snap.params | snap.buffers)
        rows = []  # the oracle: each probe's Jacobian of its outputs, one output at a time
        for x in inputs.to(torch.float64):
            out = model(x[None])[0]
            grads = [
                torch.autograd.grad(out[c], list(model.parameters()), retain_graph=True)
                for c in range(len(out))
            ]
            rows.append(torch.cat([g.flatten() for gs in grads for g in gs]).numpy())
        J = np.stack(rows)
        unit = J / np.linalg.norm(J, axis=1, keepdims=True)
        cosines = unit @ unit.T
        np.testing.assert_allclose(
            normalised_kernel(load_result(run / "kernel.zarr").ntk.read()[s]), cosines, atol=1e-10
        )
        for method, fn in (("kernel_kmeans", kernel_kmeans), ("spectral", spectral)):
            assert summary["accuracy"]["ntk"][method][s] == clustering_accuracy(truth, fn(cosines, 3, seed=0))


def test_cluster_command_bad_input(tmp_path, runner):
    run = make_run(tmp_path / "run", steps=(0,))
    for args, message in [
        ([str(tmp_path / "missing")], "no such run directory"),
        ([str(run)], "replay stores: none"),
        ([str(run), "--store", "nope"], "no replay store 'nope'"),
    ]:
        result = runner.invoke(main, ["cluster", *args])
        assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(main, ["cluster", str(run), "--classes", "a,b"])
    assert result.exit_code == 2 and "class labels" in result.output


def test_digits_pairs_refuses_a_pair_without_background(tmp_path, runner):
    result = runner.invoke(main, ["record", "digits-pairs", str(tmp_path / "r"), "--set", "classes=[1,2]"])
    assert result.exit_code == 1 and "background" in result.output, result.output
    result = runner.invoke(main, ["record", "digits-pairs", str(tmp_path / "r"), "--set", "classes=[3,3]"])
    assert result.exit_code == 1 and "distinct" in result.output, result.output


@pytest.mark.slow
def test_digits_pairs_records_replays_and_clusters(tmp_path, runner):
    run = tmp_path / "pairs"
    settings = ["classes=[4,9]", "hidden=16", "epochs=1", "snapshot_every=10", "progress=false"]
    result = runner.invoke(
        main, ["record", "digits-pairs", str(run), *[a for s in settings for a in ("--set", s)]]
    )
    assert result.exit_code == 0, result.output
    spec = RunDir(run).spec
    assert spec.task == "regression" and spec.extra["background"] == [5, 7]
    _, targets = RunDir(run).probes()
    probe_classes = np.array(spec.extra["probe_classes"])
    assert sorted(set(probe_classes)) == [4, 9] and len(probe_classes) > 300 and (targets == 1).all()
    replay = ["replay", str(run), "--no-progress", "--update", "sgd", "--lr", "0.01"]
    result = runner.invoke(main, [*replay, "--measures", "orig_outputs_l2,linear"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["cluster", str(run)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "clustering.json").read_text())
    assert summary["classes"] == [4, 9] and summary["num_probes"] == len(probe_classes)
    assert summary["baselines"]["kmeans_raw"] > 0.8  # 4 and 9 are far apart in pixels
    assert (run / "analysis" / "sgd_linearisation.json").exists()

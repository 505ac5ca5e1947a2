"""He & Su's local-elasticity clustering (ICLR 2020): the probes of two or more classes clustered
on a stored similarity, at every snapshot, beside K-means on the probes' inputs.

For a store's measure ``S`` ``[P, P]`` (row ``i`` updated on, column ``j`` observed) restricted to
the probes of the chosen classes, the affinity is He & Su's symmetrised ``A = (S + S^T) / 2``:

- **kernel K-means** needs a positive semi-definite kernel, which ``A`` (a ratio of norms, not an
  inner product) is not in general: it is replaced by its nearest one in the Frobenius norm,
  ``A+ = V max(L, 0) V^T`` from the eigendecomposition ``A = V L V^T`` (negative eigenvalues
  clipped to 0). With ``Phi = V max(L, 0)^(1/2)``, ``Phi Phi^T = A+``: the distance of a point to a
  cluster mean in the kernel's feature space is the distance of its row of ``Phi`` to the mean of
  the cluster's rows, so kernel K-means on ``A+`` is K-means on the rows of ``Phi``
  (scikit-learn's ``KMeans``, k-means++ with :data:`N_INIT` starts, the lowest objective kept);
- **spectral clustering**: scikit-learn's ``SpectralClustering(affinity="precomputed")`` on ``A``
  with negative entries set to 0 (an affinity is non-negative; of the stored measures only
  ``seed_kl`` can be negative).

A store replayed with ``--ntk`` also offers the similarity :data:`KERNEL` (``ntk``): the empirical
neural tangent kernel ``K`` ``[P, P]``, ``K[i, j] = sum_c <df_c(x_i)/dw, df_c(x_j)/dw>``, an inner
product of the probes' gradients, positive semi-definite already. Its raw values grow with the
gradients' norms, which differ by orders of magnitude between probes and would split them by
size; both methods therefore take its cosine-normalised form ``K[i, j] / sqrt(K[i, i] K[j, j])``
(the cosine of the two probes' gradients, :func:`normalised_kernel`), still positive
semi-definite: kernel K-means uses it as it is (only rounding makes an eigenvalue negative),
spectral clustering with its negative entries set to 0. A probe whose gradient is zero has no
cosine: that snapshot's accuracy is NaN.

Baselines, from the run's probe inputs (flattened): K-means on the inputs, and on their first
``pca_components`` principal components (He & Su: 100 of MNIST's 784 pixels).

Accuracy: the share of probes in the cluster matched to their class, under the matching of
clusters to classes that maximises it (:func:`clustering_accuracy`).

The classes of the probes are ``spec.json`` ``extra`` ``probe_classes`` where the run stores them
(``digits-pairs``: the digit of each probe, whose training target is 1 for the whole pair), else
the stored probe targets of a classification run.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, SpectralClustering
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from analyses.plots import OverlayRow, plot_overlay_grid
from analyses.results import ReplayResult, load_result
from recorder.rundir.errors import ResultsError
from recorder.rundir.files import atomic_write_json, make_folder, to_json
from recorder.rundir.group import is_group
from recorder.rundir.run import RunDir
from replay.store import store_paths

METHODS = {"kernel_kmeans": "kernel K-means", "spectral": "spectral"}  # on the similarity
KERNEL = "ntk"  # the stored kernel as a similarity, beside the measures
BASELINES = {"kmeans_raw": "K-means, raw inputs", "kmeans_pca": "K-means, PCA of the inputs"}
N_INIT = 10  # starts of every K-means
PCA_COMPONENTS = 10


def clustering_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """The share of points whose cluster is matched to their class, under the one-to-one matching
    of clusters to classes that maximises it (Hungarian algorithm on the contingency table):
    ``truth``, ``predicted`` ``[N]`` labels of any values."""
    classes, t = np.unique(truth, return_inverse=True)
    clusters, p = np.unique(predicted, return_inverse=True)
    table = np.zeros((len(clusters), len(classes)))
    np.add.at(table, (p, t), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(truth))


def kernel_features(kernel: np.ndarray) -> np.ndarray:
    """``Phi`` ``[N, r]`` with ``Phi Phi^T`` the nearest positive semi-definite matrix to the
    symmetric ``kernel`` ``[N, N]`` (its ``r`` positive eigenvalues kept)."""
    values, vectors = np.linalg.eigh(kernel)
    keep = values > 0
    return vectors[:, keep] * np.sqrt(values[keep])


def kernel_kmeans(kernel: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Kernel K-means of the symmetric ``kernel`` ``[N, N]`` (made positive semi-definite, see the
    module docstring) into ``k`` clusters: labels ``[N]``."""
    return KMeans(k, n_init=N_INIT, random_state=seed).fit_predict(kernel_features(kernel))


def spectral(affinity: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Spectral clustering of the symmetric ``affinity`` ``[N, N]`` (negative entries as 0) into
    ``k`` clusters: labels ``[N]``."""
    with warnings.catch_warnings():  # a disconnected graph still clusters (its parts apart)
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        model = SpectralClustering(k, affinity="precomputed", n_init=N_INIT, random_state=seed)
        return model.fit_predict(np.clip(affinity, 0, None))


def normalised_kernel(kernel: np.ndarray) -> np.ndarray:
    """The cosine-normalised ``K[i, j] / sqrt(K[i, i] K[j, j])`` ``[..., N, N]`` of the positive
    semi-definite ``kernel`` ``[..., N, N]`` (symmetrised against rounding); not finite in the rows
    and columns of a zero diagonal entry."""
    K = (kernel + np.swapaxes(kernel, -1, -2)) / 2
    norms = np.sqrt(np.diagonal(K, axis1=-2, axis2=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return K / (norms[..., :, None] * norms[..., None, :])


def similarities(result: ReplayResult, name: str, index: np.ndarray) -> np.ndarray:
    """``[S, N, N]`` the similarity ``name`` of the store ``result`` between its probes ``index``
    ``[N]`` at every done snapshot: the symmetrised measure, or the normalised kernel
    (:data:`KERNEL`; see the module docstring)."""
    if name == KERNEL:
        assert result.ntk is not None  # offered only when stored
        return normalised_kernel(result.ntk.read()[:, index[:, None], index])
    S = result.measures[name].read()[:, index[:, None], index]
    return (S + S.transpose(0, 2, 1)) / 2


def kmeans_inputs(inputs: np.ndarray, k: int, seed: int, components: int | None = None) -> np.ndarray:
    """K-means of ``inputs`` ``[N, d]`` into ``k`` clusters, on their first ``components`` principal
    components where given: labels ``[N]``."""
    if components is not None:
        inputs = PCA(min(components, *inputs.shape), random_state=seed).fit_transform(inputs)
    return KMeans(k, n_init=N_INIT, random_state=seed).fit_predict(inputs)


@dataclass
class Clustering:
    """Clustering accuracies of one store's probes of ``classes``.

    Attributes:
        store: the store's name; update: its update rule.
        classes: the class labels clustered; num_probes: how many probes they have.
        steps: ``[S]`` training step of each done snapshot.
        accuracy: similarity (a measure or :data:`KERNEL`) -> method (:data:`METHODS`) -> ``[S]``
            (NaN where the similarity is not finite).
        baselines: name (:data:`BASELINES`) -> accuracy; pca_components: the PCA's components.
    """

    store: str
    update: str
    classes: list[int]
    num_probes: int
    steps: np.ndarray
    accuracy: dict[str, dict[str, np.ndarray]]
    baselines: dict[str, float]
    pca_components: int

    def to_json(self) -> dict[str, Any]:
        return to_json(
            {
                "store": self.store,
                "update": self.update,
                "classes": self.classes,
                "num_probes": self.num_probes,
                "steps": self.steps,
                "accuracy": self.accuracy,
                "baselines": self.baselines,
                "pca_components": self.pca_components,
            }
        )


def probe_classes(result: ReplayResult) -> np.ndarray:
    """``[P]`` the class of every probe of the store ``result`` (see the module docstring)."""
    stored = result.run_spec.get("extra", {}).get("probe_classes")
    if stored is not None:
        classes = np.asarray(stored)
        if classes.shape != (len(result.targets),) or not np.issubdtype(classes.dtype, np.integer):
            raise ResultsError(f"{result.path}: the run's probe_classes are not one integer a probe")
        return classes
    if result.classes is None:
        raise ResultsError(
            f"{result.path}: the probes have no classes (a regression run without probe_classes)"
        )
    return result.targets.astype(np.int64)


def cluster_store(
    result: ReplayResult,
    inputs: np.ndarray,
    classes: Sequence[int] | None = None,
    measures: Sequence[str] | None = None,
    pca_components: int = PCA_COMPONENTS,
    seed: int = 0,
) -> Clustering:
    """Cluster the probes of ``classes`` (default: every class) of the store ``result`` on each of
    ``measures`` (stored measures, or :data:`KERNEL` for the stored kernel; default: every one the
    store holds) at every done snapshot, and their ``inputs`` ``[P, d]``."""
    truth = probe_classes(result)
    available = sorted(int(c) for c in np.unique(truth))
    chosen = list(available if classes is None else dict.fromkeys(classes))
    if len(chosen) < 2 or not set(chosen) <= set(available):
        raise ResultsError(
            f"{result.path}: choose at least two of the probe classes {available}, not {chosen}"
        )
    stored = [*result.measure_names, *([KERNEL] if result.ntk is not None else [])]
    unknown = [m for m in measures or () if m not in stored]
    if unknown:
        hint = f" (a replay with --ntk stores {KERNEL})" if KERNEL in unknown else ""
        raise ResultsError(f"{result.path}: no measure {unknown}; it holds {', '.join(stored)}{hint}")
    if len(inputs) != len(truth):
        raise ResultsError(f"{result.path}: {len(truth)} probes in the store, {len(inputs)} in the run")
    index = np.flatnonzero(np.isin(truth, chosen))
    truth, x, k = truth[index], inputs[index], len(chosen)
    accuracy = {}
    # matrices of a few hundred rows: BLAS and OpenMP threads cost more than they gain, most of
    # all on a busy machine
    with threadpool_limits(1):
        for m in measures or stored:
            A = similarities(result, m, index)
            accuracy[m] = {
                method: np.array(
                    [
                        clustering_accuracy(truth, fn(a, k, seed)) if np.isfinite(a).all() else np.nan
                        for a in A
                    ]
                )
                for method, fn in (("kernel_kmeans", kernel_kmeans), ("spectral", spectral))
            }
        baselines = {
            "kmeans_raw": clustering_accuracy(truth, kmeans_inputs(x, k, seed)),
            "kmeans_pca": clustering_accuracy(truth, kmeans_inputs(x, k, seed, pca_components)),
        }
    return Clustering(
        store=result.name,
        update=str(result.config.get("update", {}).get("rule")),
        classes=chosen,
        num_probes=len(index),
        steps=result.steps,
        accuracy=accuracy,
        baselines=baselines,
        pca_components=min(pca_components, *x.shape),
    )


def choose_store(run_dir: Path, store: str | None) -> ReplayResult:
    """The replay store ``store`` of ``run_dir`` (default: its only one)."""
    if not run_dir.is_dir():
        raise ResultsError(f"{run_dir}: no such run directory")
    if is_group(run_dir):
        raise ResultsError(f"{run_dir}: a run group; cluster one of its runs (e.g. {run_dir / 'run-00'})")
    names = [p.name.removesuffix(".zarr") for p in store_paths(run_dir)]
    if store is None and len(names) != 1:
        found = f"several ({', '.join(names)}): choose one with --store" if names else "none"
        raise ResultsError(f"{run_dir}: replay stores: {found}")
    name = store or names[0]
    if name not in names:
        raise ResultsError(f"{run_dir}: no replay store {name!r} (it has: {', '.join(names) or 'none'})")
    return load_result(run_dir / f"{name}.zarr")


def cluster_run(
    run_dir: str | Path,
    store: str | None = None,
    measures: Sequence[str] | None = None,
    classes: Sequence[int] | None = None,
    out_dir: str | Path | None = None,
    pca_components: int = PCA_COMPONENTS,
) -> tuple[Clustering, ReplayResult]:
    """:func:`cluster_store` on the store ``store`` of the run directory ``run_dir`` with the run's
    probe inputs; writes ``clustering.json`` and ``clustering.png`` into ``out_dir`` (default
    ``run_dir/analysis``). Returns the clustering and the store."""
    run_dir = Path(run_dir)
    result = choose_store(run_dir, store)
    inputs, _ = RunDir(run_dir).probes()
    if not isinstance(inputs, torch.Tensor):
        raise ResultsError(f"{run_dir}: named probe inputs (tokens): no K-means baseline on them")
    flat = inputs.reshape(len(inputs), -1).double().numpy()
    clustering = cluster_store(result, flat, classes, measures, pca_components)
    out = make_folder(run_dir / "analysis" if out_dir is None else out_dir)
    atomic_write_json(out / "clustering.json", clustering.to_json())
    plot_clustering(clustering, out / "clustering.png")
    return clustering, result


def plot_clustering(clustering: Clustering, path: Path) -> Path:
    """Accuracy over training, one panel per measure: each method on the similarity, and the
    baselines as flat lines."""
    c = clustering
    chance = 1 / len(c.classes)
    flat = {BASELINES[b]: (c.steps, np.full(len(c.steps), v)) for b, v in c.baselines.items()}
    row = OverlayRow(
        "clustering accuracy",
        {
            m: {METHODS[method]: (c.steps, acc) for method, acc in by_method.items()} | flat
            for m, by_method in c.accuracy.items()
        },
        reference=chance,
        ylim=(min(chance, 0.5) - 0.02, 1.02),
    )
    classes = " vs ".join(map(str, c.classes))
    title = f"{c.store}: clustering classes {classes} ({c.num_probes} probes) on each similarity"
    return plot_overlay_grid([row], path, title)


def format_table(clustering: Clustering) -> str:
    """The accuracies at the first, middle and last snapshot, and the baselines, as text."""
    c = clustering
    picks = sorted({0, len(c.steps) // 2, len(c.steps) - 1}) if len(c.steps) else []
    heads = [f"step {c.steps[s]}" for s in picks]
    lines = [
        f"store {c.store} ({c.update}), classes {', '.join(map(str, c.classes))}: {c.num_probes} probes, "
        f"{len(c.steps)} snapshots; clustering accuracy",
        f"{'measure':<18}{'method':<16}" + "".join(f"{h:>12}" for h in heads),
    ]
    for m, by_method in c.accuracy.items():
        for method, acc in by_method.items():
            lines.append(f"{m:<18}{METHODS[method]:<16}" + "".join(f"{acc[s]:>12.3f}" for s in picks))
    lines.append(
        f"K-means on the raw inputs {c.baselines['kmeans_raw']:.3f}, on {c.pca_components} principal "
        f"components {c.baselines['kmeans_pca']:.3f}"
    )
    return "\n".join(lines)

"""Closed-form S_rel along gradient flow, with a recorded run's replayed values laid over it.

Along the flow ``w(t)`` of a family's training objective (:meth:`TheoryModel.flow`) the one-step
S_rel of every probe pair is evaluated in closed form, exact (:meth:`TheoryModel.exact_change`)
and first order (:meth:`TheoryModel.linear_change`), and averaged the way the paper does over
sampled pairs: the class-pair means ``A[a, b]`` of :func:`analyses.classpairs.aggregate` (self
pairs excluded), then ``same`` = the mean of ``A[a, a]`` and ``cross`` = the mean of
``A[a, b], a != b`` (classes: the mixture components of the probes). Time is gradient-flow time:
``k`` gradient-descent steps of size ``lr`` sit at ``t = k lr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analyses.plots import _figure, _scale_y
from analyses.theory.base import EPS, TheoryModel, s_rel
from analyses.theory.families import FAMILIES
from analyses.theory.runs import TheoryRun, load_theory_run, sgd_store
from recorder.datasets import theory_model_spec, theory_setup
from recorder.rundir.errors import RunDirError
from recorder.rundir.files import make_folder
from replay.classpairs import aggregate

NUM_CLASSES = 2  # the mixture of SPEC §6.1
MARKERS = {"orig_outputs_l2": "o", "linear": "x"}  # replayed measures laid over the closed form


@dataclass
class FlowCurves:
    """Closed-form curves along the flow, ``T`` times.

    Attributes:
        times: ``[T]`` flow times.
        loss: ``[T]`` the training objective ``R(w(t))``.
        exact, linear: ``[T, 2]`` S_rel averaged over same-class (column 0) and cross-class
            (column 1) probe pairs; ``exact`` the one-step S_rel at the virtual step ``lr``,
            ``linear`` its first-order form.
    """

    times: np.ndarray
    loss: np.ndarray
    exact: np.ndarray
    linear: np.ndarray


def same_cross(S: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``[..., P, P] -> [..., 2]``: S averaged over same-class and over cross-class pairs ``i != j``
    (the mean of the class-pair means ``A[a, b]``)."""
    A = aggregate(S, classes, NUM_CLASSES)
    diagonal = np.eye(NUM_CLASSES, dtype=bool)
    return np.stack([A[..., diagonal].mean(-1), A[..., ~diagonal].mean(-1)], axis=-1)


def flow_curves(
    model: TheoryModel,
    w0: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    weight_decay: float,
    times: np.ndarray,
    probe_x: np.ndarray,
    probe_y: np.ndarray,
    probe_classes: np.ndarray,
    lr: float,
    virtual_weight_decay: float,
    eps: float = EPS,
) -> FlowCurves:
    """Flow ``w(t)`` from ``w0`` on the training set ``x [N, n]``, ``y [N, C]`` (objective with
    ``weight_decay``) at ``times [T]``, and the closed-form S_rel of the probes ``probe_x [P, n]``,
    ``probe_y [P, C]`` (classes ``[P]``) for the virtual ``sgd`` step (``lr``,
    ``virtual_weight_decay``) at every time."""
    path = model.flow(w0, x, y, times, weight_decay)
    exact, linear = [], []
    for w in path:
        exact.append(s_rel(model.exact_change(w, probe_x, probe_y, lr, virtual_weight_decay), eps))
        linear.append(s_rel(model.linear_change(w, probe_x, probe_y, lr, virtual_weight_decay), eps))
    return FlowCurves(
        times=np.asarray(times, dtype=np.float64),
        loss=np.array([model.loss(w, x, y, weight_decay) for w in path]),
        exact=same_cross(np.stack(exact), probe_classes),
        linear=same_cross(np.stack(linear), probe_classes),
    )


def plot_family(
    family: str,
    out_dir: str | Path,
    run_dir: str | Path | None = None,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    store: str = "sgd",
    num_times: int = 200,
) -> list[Path]:
    """Draw the closed-form S_rel (same- and cross-class pairs) and the loss along gradient flow.

    Without ``run_dir``: one figure per preset of ``settings`` (preset of the family -> its settings,
    as a run of it stores them in ``spec.json`` ``extra.config``), from the initial weights, data and
    probes of those settings, with the virtual step equal to their gradient-descent step (``lr``,
    ``weight_decay``). With ``run_dir`` (a run recorded by a preset of
    this family): the flow starts from the recorded step-0 weights, the virtual step is that of the
    replay store ``RUN_DIR/<store>.zarr`` (an ``sgd`` replay), and the replayed ``orig_outputs_l2``
    and ``linear`` of every snapshot, and the objective at the recorded weights, are laid over the
    curves at ``t = step * lr``.

    Writes ``theory_<family>_<preset or run directory name>.png`` into ``out_dir`` (created) and
    returns their paths. Raises ``ValueError`` for an unknown family or, without ``run_dir``, missing
    ``settings`` or settings of a preset not of the family, and
    :class:`~recorder.rundir.errors.RunDirError` for a run (or store) that does not fit.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    fam = FAMILIES[family]
    out_dir = Path(out_dir)
    make_folder(out_dir)
    if run_dir is None:
        foreign = [p for p in settings or {} if p not in fam.presets]
        if not settings or foreign:
            raise ValueError(
                f"without a run, pass the settings of presets of the {family!r} family "
                f"({', '.join(fam.presets)}); got {', '.join(settings or {}) or 'none'}"
            )
        return [
            _plot_preset(family, preset, config, out_dir, num_times) for preset, config in settings.items()
        ]
    run = load_theory_run(run_dir)
    if run.family is not fam:
        raise RunDirError(f"{run.run.path}: a run of the {run.family.name!r} family, not {family!r}")
    return [_plot_run(run, store, out_dir / f"theory_{family}_run_{run.run.path.name}.png", num_times)]


def _times(lr: float, steps: int, num: int) -> np.ndarray:
    """``[num]``: 0, then geometrically from one step (``lr``) to ``steps`` steps."""
    return np.concatenate([[0.0], np.geomspace(lr, steps * lr, num - 1)])


def _plot_preset(family: str, preset: str, config: Mapping[str, Any], out_dir: Path, num_times: int) -> Path:
    """The figure of ``preset``'s settings ``config`` (as ``spec.json`` ``extra.config`` stores them)."""
    theory = FAMILIES[family].model
    s = theory_setup(config, theory_model_spec(theory.factory, config))
    model = theory.from_model(s.model)
    x, y = s.x.numpy(), s.y.numpy()
    index = s.probe_index.numpy()
    curves = flow_curves(
        model,
        model.weights(s.model),
        x,
        y,
        config["weight_decay"],
        _times(config["lr"], config["steps"], num_times),
        x[index],
        y[index],
        s.classes.numpy()[index],
        config["lr"],
        config["weight_decay"],
    )
    title = f"{preset}: closed-form S_rel along gradient flow (virtual sgd step lr {config['lr']:g})"
    return _draw(out_dir / f"theory_{family}_{preset}.png", title, curves, replayed=None)


def _plot_run(run: TheoryRun, store: str, path: Path, num_times: int) -> Path:
    result = sgd_store(run, store)
    update = result.config["update"]
    lr, virtual_wd = update["lr"], update.get("weight_decay", 0.0)
    eps = result.config.get("ratio_eps", EPS)
    s = theory_setup(run.config, run.run.spec.model)
    x, y = s.x.numpy(), s.y.numpy()
    curves = flow_curves(
        run.model,
        run.weights(run.run.manifest[0].step),
        x,
        y,
        run.config["weight_decay"],
        _times(run.config["lr"], run.run.manifest[-1].step, num_times),
        run.probe_x,
        run.probe_y,
        run.probe_classes,
        lr,
        virtual_wd,
        eps,
    )
    replayed = {
        m: same_cross(result.measures[m].read(), run.probe_classes) for m in MARKERS if m in result.measures
    }
    loss = np.array(
        [run.model.loss(run.weights(int(k)), x, y, run.config["weight_decay"]) for k in result.steps]
    )
    title = f"{run.run.path.name}: closed-form flow vs replay store {store!r} (sgd, lr {lr:g})"
    return _draw(path, title, curves, replayed=(run.times(result.steps), replayed, loss))


def _draw(
    path: Path,
    title: str,
    curves: FlowCurves,
    replayed: tuple[np.ndarray, dict[str, np.ndarray], np.ndarray] | None,
) -> Path:
    """Two panels: S_rel (same/cross; exact solid, first order dashed, replay markers) and the loss.
    ``replayed``: flow times ``[S]`` of the snapshots, measure name -> ``[S, 2]`` same/cross, and the
    objective ``[S]`` at the recorded weights."""
    colors = {0: "tab:blue", 1: "tab:orange"}
    pair_names = {0: "same class", 1: "cross class"}
    linthresh = 10 ** np.ceil(np.log10(curves.times[1]))  # a power of ten: no tick labels collide at 0
    with _figure(path, title, 2, max_cols=2, layout="constrained") as (_, (ax_s, ax_loss)):
        for k in (0, 1):
            ax_s.plot(curves.times, curves.exact[:, k], color=colors[k], label=f"{pair_names[k]}: exact")
            ax_s.plot(
                curves.times,
                curves.linear[:, k],
                color=colors[k],
                linestyle="--",
                label=f"{pair_names[k]}: first order",
            )
        ax_loss.plot(curves.times, curves.loss, color="black", label="gradient flow")
        if replayed is not None:
            t, measures, loss = replayed
            for name, values in measures.items():
                for k in (0, 1):
                    ax_s.plot(
                        t,
                        values[:, k],
                        label=f"{pair_names[k]}: replayed {name}",
                        marker=MARKERS[name],
                        linestyle="none",
                        color=colors[k],
                        mfc="none",
                    )
            ax_loss.plot(
                t, loss, marker="o", linestyle="none", mfc="none", color="black", label="recorded steps"
            )
        for ax in (ax_s, ax_loss):
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlabel("gradient-flow time t (= step x lr)")
        ax_s.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: the curves stay visible
        ax_loss.legend(loc="best")
        ax_s.set_title("S_rel, mean over probe pairs i != j")
        ax_s.set_ylabel("S_rel (raw outputs, l2)")
        _scale_y(ax_s, np.concatenate([curves.exact.ravel(), curves.linear.ravel()]))
        ax_loss.set_title("training objective R(w)")
        ax_loss.set_ylabel("R(w)")
        _scale_y(ax_loss, curves.loss)
    return path

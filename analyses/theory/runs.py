"""The closed forms on a recorded run: the theory's side of its cross-check with the replay engine.

A run recorded by a theory preset carries its preset settings in ``spec.json`` (``extra.config``),
from which :func:`recorder.datasets.theory_setup` rebuilds the training data, and the mixture
component of each probe (``extra.probe_classes``). Replayed with the ``sgd`` rule (float64), its
stored ``orig_outputs_l2`` / ``orig_outputs_l1`` must equal the exact one-step S_rel of the family
at the recorded weights, and ``linear`` the first-order form (:func:`closed_form_measures`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analyses.results import ReplayResult, load_result
from analyses.theory.base import EPS, TheoryModel, s_rel
from analyses.theory.families import FAMILIES, Family
from recorder.models import build_model
from recorder.rundir.errors import ResultsError, RunDirError
from recorder.rundir.run import RunDir

# measure name -> (change, norm order): the closed form of each measure replay stores for regression
CLOSED_FORMS = {"orig_outputs_l2": ("exact", 2), "orig_outputs_l1": ("exact", 1), "linear": ("linear", 2)}
# the settings of extra.config the closed forms use: the training step and theory_setup's data
SETTINGS = ("lr", "weight_decay", "n_per_class", "dim", "probes_per_class", "seed")


@dataclass
class TheoryRun:
    """A recorded run of a theory preset.

    Attributes:
        run: the run directory.
        family: its family; model: the family's closed forms with the run's fixed parts.
        config: the preset's settings, ``spec.json`` ``extra.config`` (rebuild the training set
            with :func:`recorder.datasets.theory_setup`).
        probe_x: ``[P, n]`` probe inputs; probe_y: ``[P, C]`` probe targets (float64).
        probe_classes: ``[P]`` mixture component of each probe.
    """

    run: RunDir
    family: Family
    model: TheoryModel
    config: dict[str, Any]
    probe_x: np.ndarray
    probe_y: np.ndarray
    probe_classes: np.ndarray

    def weights(self, step: int) -> np.ndarray:
        """The recorded weights ``w`` at training step ``step`` (float64)."""
        entry = next((e for e in self.run.manifest if e.step == step), None)
        if entry is None:
            raise RunDirError(f"{self.run.path}: no snapshot at step {step}")
        return self.run.load_snapshot(entry).params[self.model.param].to(torch.float64).numpy()

    def times(self, steps: np.ndarray) -> np.ndarray:
        """Gradient-flow time ``t = step * lr`` of training steps ``[S]``."""
        return np.asarray(steps, dtype=np.float64) * self.config["lr"]


def load_theory_run(run_dir: str | Path) -> TheoryRun:
    """Open a run recorded by a theory preset; anything else raises :class:`RunDirError`."""
    run = RunDir(run_dir)
    preset = run.spec.preset
    family = next((f for f in FAMILIES.values() if preset in f.presets), None)
    if family is None:
        presets = ", ".join(p for f in FAMILIES.values() for p in f.presets)
        raise RunDirError(f"{run.path}: recorded by preset {preset!r}, not by a theory preset ({presets})")
    if not run.manifest:
        raise RunDirError(f"{run.path}: no snapshots recorded yet")
    try:
        config = dict(run.spec.extra["config"])
        missing = [k for k in SETTINGS if k not in config]
        if missing:
            raise KeyError(", ".join(missing))
        probe_classes = np.asarray(run.spec.extra["probe_classes"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{run.path / 'spec.json'}: malformed theory settings in 'extra' ({e})") from None
    first = run.load_snapshot(run.manifest[0])
    module = build_model(run.spec.model).to(torch.float64)
    try:
        module.load_state_dict(first.params | first.buffers)
    except RuntimeError as e:
        raise RunDirError(f"{run.path / run.manifest[0].file}: weights do not fit the model ({e})") from None
    inputs, targets = run.probes()
    if not isinstance(inputs, torch.Tensor):
        raise RunDirError(f"{run.path / 'probes.safetensors'}: a theory run's probe inputs are one tensor")
    return TheoryRun(
        run=run,
        family=family,
        model=family.model.from_model(module),
        config=config,
        probe_x=inputs.to(torch.float64).numpy(),
        probe_y=targets.to(torch.float64).numpy(),
        probe_classes=probe_classes,
    )


def sgd_store(run: TheoryRun, store: str) -> ReplayResult:
    """The replay store ``RUN_DIR/<store>.zarr``, which must hold an ``sgd`` replay."""
    path = run.run.path / f"{store}.zarr"
    if not path.is_dir():
        name = "" if store == "sgd" else f" --name {store}"
        raise ResultsError(
            f"{path}: no such replay store; make one with `python cli.py replay {run.run.path} --update sgd "
            f"--weight-decay {run.config['weight_decay']:g}{name}`"
        )
    result = load_result(path)
    rule = result.config.get("update", {}).get("rule")
    if rule != "sgd":
        raise ResultsError(f"{path}: the closed forms are for the sgd update; this store used {rule!r}")
    return result


def closed_form_measures(run: TheoryRun, result: ReplayResult) -> dict[str, np.ndarray]:
    """The closed form of every measure of ``result`` (an ``sgd`` store) that has one, at the
    recorded weights of its done snapshots, with the store's ``lr``, ``weight_decay`` and
    ``ratio_eps``: measure name -> ``[S, P, P]``."""
    update = result.config["update"]
    lr, wd = update["lr"], update.get("weight_decay", 0.0)
    eps = result.config.get("ratio_eps", EPS)
    names = [m for m in result.measure_names if m in CLOSED_FORMS]
    out: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for step in result.steps:
        w = run.weights(int(step))
        changes = {
            "exact": run.model.exact_change(w, run.probe_x, run.probe_y, lr, wd),
            "linear": run.model.linear_change(w, run.probe_x, run.probe_y, lr, wd),
        }
        for m in names:
            change, ord = CLOSED_FORMS[m]
            out[m].append(s_rel(changes[change], eps, ord))
    return {m: np.stack(v) for m, v in out.items()}

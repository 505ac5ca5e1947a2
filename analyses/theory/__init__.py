"""Closed-form S_rel of SPEC §6, and its cross-check with the replay engine.

One module per family, each a :class:`~analyses.theory.base.TheoryModel` with the exact one-step
S_rel (:meth:`exact_change`, for any ``lr``), its first-order form (:meth:`linear_change`), the
training objective and its gradient flow (:meth:`flow`); derivations in the module docstrings:

- ``ridge`` (:mod:`analyses.theory.ridge`): linear model on fixed random ReLU features, ridge;
  closed-form flow (``expm``).
- ``relu-gate`` (:mod:`analyses.theory.relu_gate`): ``relu(w . x)``; piecewise-exact step.
- ``homogeneous`` (:mod:`analyses.theory.homogeneous`): ``<w^d, x>``; the step is a polynomial in ``lr``.

:data:`FAMILIES` maps each name to its model class and the names of the ``theory-*`` presets
that train it. :func:`plot_family` draws S_rel along the flow
(``python cli.py theory FAMILY [--run RUN_DIR] [--out DIR]``); :mod:`analyses.theory.runs`
evaluates the closed forms at the snapshots of a recorded run, for comparison with its replay.
"""

from analyses.theory.base import EPS, TheoryModel, s_rel
from analyses.theory.families import FAMILIES, Family
from analyses.theory.homogeneous import Homogeneous
from analyses.theory.plot import FlowCurves, flow_curves, plot_family, same_cross
from analyses.theory.relu_gate import ReluGate
from analyses.theory.ridge import RidgeFeatures
from analyses.theory.runs import TheoryRun, closed_form_measures, load_theory_run, sgd_store

__all__ = [
    "EPS",
    "FAMILIES",
    "Family",
    "FlowCurves",
    "Homogeneous",
    "ReluGate",
    "RidgeFeatures",
    "TheoryModel",
    "TheoryRun",
    "closed_form_measures",
    "flow_curves",
    "load_theory_run",
    "plot_family",
    "same_cross",
    "s_rel",
    "sgd_store",
]

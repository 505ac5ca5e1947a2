"""The precision bar of issue 6: in the default mode (``auto``) the ``orig`` and ``kl`` matrices lie
within 1e-3 (relative Frobenius norm) of a float64 replay, for ``adam-fresh`` and for ``sgd`` at
lr 1e-4, on the digits MLP, a small CNN and ResNet-18, and the stored error estimate bounds the
error (the whole matrix of models, rules and precisions: tests/test_error_bound.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import replay.engine
from recorder.rundir.errors import UnsupportedModel
from replay.bench import make_case
from replay.config import ReplayConfig, UpdateConfig
from replay.difference import ChangePropagator
from replay.engine import Engine
from tests.helpers import make_model, make_probes, run_spec, snapshot, train_steps

BAR = 1e-3
COMPARED = ("orig_logits_l2", "orig_probs_l2", "kl", "linear")
RULES = {"adam-fresh": UpdateConfig("adam-fresh", lr=1e-4), "sgd": UpdateConfig("sgd", lr=1e-4)}


def frobenius_error(approx, exact):
    return max(((approx[m].double() - exact[m]).norm() / exact[m].norm()).item() for m in COMPARED)


PROBES = {"digits": 20, "small_cnn": 10, "resnet18": 3}
# ResNet-18 cases are heavy: in the slow set only
NAMES = ["digits", "small_cnn", pytest.param("resnet18", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def cases():
    """The digits MLP (P = 20), small_cnn on digits (P = 10) and ResNet-18 on 32x32 images (P = 3),
    each after a little training, as the benchmark builds them (each built on first use)."""

    class Cases(dict):
        def __missing__(self, name):
            self[name] = make_case(name, PROBES[name])
            return self[name]

    return Cases()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("name", NAMES)
def test_default_mode_is_within_the_bar_of_float64_and_says_so(cases, name, rule):
    case = cases[name]
    config = ReplayConfig(RULES[rule], measures=COMPARED, precision="auto")
    engine = Engine(case.spec, case.inputs, case.targets, config)
    result = engine.replay_snapshot(case.snapshot)
    exact = Engine(case.spec, case.inputs, case.targets, ReplayConfig(RULES[rule], measures=COMPARED))
    reference = exact.replay_snapshot(case.snapshot)
    true_error = frobenius_error(result.measures, reference.measures)
    assert true_error < BAR
    assert result.error_estimate < BAR
    assert true_error <= result.error_estimate  # the estimate bounds
    assert result.measures["kl"].dtype == torch.float64
    torch.testing.assert_close(result.base_outputs, reference.base_outputs, rtol=1e-12, atol=1e-12)


def test_plain_float32_misses_the_bar_where_the_default_mode_meets_it():
    """A trained MLP under sgd at lr 1e-4: the changes are ~1e-6 of the outputs (SPEC §3)."""
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    train_steps(model, torch.optim.Adam(model.parameters(), lr=0.1), "cross_entropy", x, y, 60)
    snap = snapshot(model, 1)

    def replayed(precision):
        config = ReplayConfig(RULES["sgd"], measures=COMPARED, precision=precision, tolerance=math.inf)
        return Engine(run_spec("mlp"), x, y, config).replay_snapshot(snap)

    exact = replayed("float64").measures
    assert frobenius_error(replayed("float32").measures, exact) > BAR
    assert frobenius_error(replayed("difference32").measures, exact) > BAR
    assert frobenius_error(replayed("mixed").measures, exact) < 1e-5
    config = ReplayConfig(RULES["sgd"], measures=COMPARED, precision="auto")
    engine = Engine(run_spec("mlp"), x, y, config)
    result = engine.replay_snapshot(snap)
    assert frobenius_error(result.measures, exact) < 1e-5
    assert result.arithmetic == "mixed"
    # The choice is the snapshot's own: the engine starts the next snapshot afresh.
    assert (engine.arithmetic.name, engine.fallback.name) == ("difference32", "mixed")


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_layers_without_a_rule_are_differenced_in_float64(activation):
    """Activations other than relu take the float64 fallback of :mod:`replay.difference`."""
    from recorder.models import build_model
    from recorder.rundir.spec import ModelSpec

    torch.manual_seed(0)
    model = build_model(
        ModelSpec("mlp", {"in_features": 6, "num_outputs": 3, "hidden": [8, 8], "activation": activation})
    )
    x = torch.randn(5, 6, dtype=torch.float64)
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    update = {k: 1e-7 * torch.randn_like(v) for k, v in params.items()}
    exact = torch.func.functional_call(model, {k: params[k] + update[k] for k in params}, (x,))
    exact = exact - torch.func.functional_call(model, params, (x,))
    propagator = ChangePropagator(model)
    changes = propagator.change(propagator.base(params, {}, x), {k: u.float() for k, u in update.items()})
    assert ((changes["finite"].double() - exact).norm() / exact.norm()).item() < 1e-6


class _Branchy(nn.Module):
    """Control flow on the data: ``torch.fx`` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_a_model_fx_cannot_trace_is_reported():
    with pytest.raises(UnsupportedModel, match="_Branchy"):
        ChangePropagator(_Branchy())


def test_a_probe_whose_update_is_zero_moves_nothing_in_every_precision():
    """A ReLU gate leaves its inactive probes untouched (SPEC §6.2): their update is exactly zero,
    so are their rows of S; ``auto`` agrees with float64 instead of dividing rounding noise by eps."""
    from recorder.models import build_model
    from recorder.rundir.spec import ModelSpec, RunSpec

    torch.manual_seed(3)
    spec = RunSpec(ModelSpec("relu_gate", {"in_features": 5}), "regression", "half_sse", num_outputs=1)
    model = build_model(spec.model).double()
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    inactive = (model(x) <= 0).flatten()
    assert 0 < inactive.sum() < len(x)
    update = UpdateConfig("sgd", lr=1e-2)

    def replayed(precision):
        config = ReplayConfig(update, measures=("orig_outputs_l2",), precision=precision)
        return Engine(spec, x, y, config).replay_snapshot(snapshot(model, 1))

    exact, auto = replayed("float64"), replayed("auto")
    assert (exact.update_norm[inactive] == 0).all()
    for result in (exact, auto):
        assert (result.measures["orig_outputs_l2"][inactive] == 0).all()
    S, S_exact = auto.measures["orig_outputs_l2"], exact.measures["orig_outputs_l2"]
    assert ((S - S_exact).norm() / S_exact.norm()).item() < 1e-4 and auto.error_estimate < 1e-4


def _spied(engine):
    """``engine`` recording the arithmetic of each evaluation and whether each set of changes it
    made was propagated (True) or differenced (False); the check's are not recorded."""
    evaluations, changes = [], []
    evaluate, difference, propagation = engine._evaluate, engine._difference, engine._propagation
    inside = []

    def spy_evaluate(snapshot, arithmetic, *args, **kwargs):
        evaluations.append(arithmetic.name)
        inside.append(True)
        try:
            return evaluate(snapshot, arithmetic, *args, **kwargs)
        finally:
            inside.pop()

    def spy(made, propagated):
        def call(*args, **kwargs):
            if inside:
                changes.append(propagated)
            return made(*args, **kwargs)

        return call

    engine._evaluate = spy_evaluate
    engine._difference, engine._propagation = spy(difference, False), spy(propagation, True)
    return evaluations, changes


@pytest.mark.parametrize("name", ["digits", "small_cnn"])
def test_auto_goes_straight_to_mixed_where_the_float32_difference_would_miss(cases, name):
    """Under sgd at lr 1e-4 the rounding model predicts, from the updates alone, that a float32
    difference misses the target: ``auto`` never computes it, and gives what ``mixed`` gives."""
    case = cases[name]

    def engine(precision):
        config = ReplayConfig(RULES["sgd"], measures=COMPARED, precision=precision)
        return Engine(case.spec, case.inputs, case.targets, config)

    auto = engine("auto")
    evaluations, changes = _spied(auto)
    result = auto.replay_snapshot(case.snapshot)
    assert result.arithmetic == "mixed"
    assert len(evaluations) == 1 and changes == [True]  # one pass, no float32 difference
    exact = engine("float64").replay_snapshot(case.snapshot)
    assert frobenius_error(result.measures, exact.measures) < BAR
    assert 0 < result.error_estimate < BAR  # checked against float64 propagation
    mixed = engine("mixed").replay_snapshot(case.snapshot)
    for k, v in mixed.measures.items():
        assert torch.equal(result.measures[k], v)
    assert result.error_estimate == mixed.error_estimate


def test_auto_keeps_the_float32_difference_where_it_is_predicted_to_resolve_the_step(cases):
    """``adam-fresh`` at lr 1e-2: changes large enough for float32 to resolve them within the
    target, bound and all (at lr 1e-3 the bound, five times what the check finds, is above it)."""
    case = cases["digits"]
    update = UpdateConfig("adam-fresh", lr=1e-2)
    auto = Engine(case.spec, case.inputs, case.targets, ReplayConfig(update, measures=COMPARED))
    evaluations, changes = _spied(auto)
    result = auto.replay_snapshot(case.snapshot)
    assert result.arithmetic == "difference32"
    assert evaluations == ["difference32"] and changes == [False]


def test_auto_still_falls_back_when_the_prediction_is_wrong(cases, monkeypatch):
    """A prediction that misses a step float32 cannot resolve: the checked estimate catches it."""
    monkeypatch.setattr(replay.engine, "predicted_error", lambda *args: 0.0)
    case = cases["digits"]
    config = ReplayConfig(RULES["sgd"], measures=COMPARED, precision="auto")
    auto = Engine(case.spec, case.inputs, case.targets, config)
    evaluations, changes = _spied(auto)
    result = auto.replay_snapshot(case.snapshot)
    assert result.arithmetic == "mixed"
    assert evaluations == ["difference32", "mixed"] and changes == [False, True]
    exact = Engine(case.spec, case.inputs, case.targets, ReplayConfig(RULES["sgd"], measures=COMPARED))
    assert frobenius_error(result.measures, exact.replay_snapshot(case.snapshot).measures) < BAR

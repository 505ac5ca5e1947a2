"""The closed forms of SPEC §6 (analyses.theory) against torch and against the replay engine."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch.func import functional_call, jvp

from analyses.theory import (
    FAMILIES,
    Homogeneous,
    ReluGate,
    RidgeFeatures,
    closed_form_measures,
    load_theory_run,
    plot_family,
    sgd_store,
)
from recorder.datasets import theory_setup, two_gaussians
from recorder.losses import batch_loss
from recorder.models import build_model
from recorder.presets.theory import HomogeneousConfig, ReluGateConfig, RidgeConfig, RidgeP100Config, record
from recorder.rundir.errors import ResultsError, RunDirError
from recorder.rundir.spec import ModelSpec
from replay.config import ReplayConfig, UpdateConfig
from replay.run import replay

ROUNDING = np.finfo(np.float64).eps
REPLAY_LR = 1e-2  # large enough that the gate switches and the homogeneous step is far from linear
SMALL = {"n_per_class": 100, "probes_per_class": 5, "steps": 200, "snapshots": 8, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- closed forms vs torch

# case -> (family, model, weight decay)
CASES = {
    "ridge": (
        "ridge",
        ModelSpec("random_features", {"in_features": 6, "num_features": 8, "num_outputs": 2}),
        0.5,
    ),
    "relu-gate": ("relu-gate", ModelSpec("relu_gate", {"in_features": 6}), 0.2),
    "homogeneous-d2": ("homogeneous", ModelSpec("diagonal_homogeneous", {"in_features": 6, "d": 2}), 0.1),
    "homogeneous-d3": ("homogeneous", ModelSpec("diagonal_homogeneous", {"in_features": 6, "d": 3}), 0.0),
}


def torch_changes(model, x, y, lr, wd):
    """One real torch.optim.SGD step on each sample alone (deep copies): the finite output changes
    ``[P, P, C]`` and the Jacobian-vector products of the actual weight steps ``[P, P, C]``."""
    base = model(x).detach()
    params = dict(model.named_parameters())
    finite, linear = [], []
    for i in range(len(x)):
        clone = copy.deepcopy(model)
        optimizer = torch.optim.SGD(clone.parameters(), lr=lr, weight_decay=wd)
        batch_loss("half_sse", clone(x[i : i + 1]), y[i : i + 1]).backward()
        optimizer.step()
        finite.append(clone(x).detach() - base)
        step = {k: (v - params[k]).detach() for k, v in clone.named_parameters()}
        primals = {k: v.detach() for k, v in params.items()}
        linear.append(jvp(lambda p: functional_call(model, p, (x,)), (primals,), (step,))[1].detach())
    return torch.stack(finite).numpy(), torch.stack(linear).numpy(), base.numpy()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(CASES))
def test_closed_forms_equal_a_real_sgd_step(case):
    family, spec, wd = CASES[case]
    torch.manual_seed(1)
    model = build_model(spec).to(torch.float64)
    theory = FAMILIES[family].model.from_model(model)
    x_np, _ = two_gaussians(4, spec.kwargs["in_features"], seed=2)
    x_np = (x_np - 5.0) / 4.0  # centred: the gate sees both sides, the powers stay moderate
    x = torch.from_numpy(x_np)
    with torch.no_grad():
        y = model(x).detach() + torch.from_numpy(np.random.default_rng(3).normal(size=(len(x), 1)))
    lr = 0.3
    finite, linear, base = torch_changes(model, x, y, lr, wd)
    w = theory.weights(model)
    exact = theory.exact_change(w, x_np, y.numpy(), lr, wd)
    first = theory.linear_change(w, x_np, y.numpy(), lr, wd)
    floor = 1e-13 * np.abs(base).max()  # rounding of the torch difference f(w + U) - f(w)
    np.testing.assert_allclose(exact, finite, rtol=1e-9, atol=floor)
    np.testing.assert_allclose(first, linear, rtol=1e-9, atol=1e-14)
    if not isinstance(theory, RidgeFeatures):  # the step is far from linear: the check above can tell
        assert np.abs(exact - first).max() > 1e-3 * np.abs(first).max()
    if isinstance(theory, ReluGate):  # every branch of the piecewise form is exercised
        a = x_np @ w
        after = a[None, :] + first[:, :, 0]  # a_j + delta_ij wherever a_j > 0
        assert (a > 0).any() and (a <= 0).any()
        assert ((a[None, :] > 0) & (after <= 0)).any()
        assert ((a[None, :] <= 0) & (exact[:, :, 0] > 0)).any()


@pytest.mark.parametrize("case", list(CASES))
def test_objective_and_gradient_are_torchs(case):
    """``loss`` and ``grad`` (the gradient flow's right-hand side) against autograd of the batch mean
    of half_sse plus 0.5 wd ||w||^2."""
    family, spec, wd = CASES[case]
    torch.manual_seed(4)
    model = build_model(spec).to(torch.float64)
    theory = FAMILIES[family].model.from_model(model)
    x_np, _ = two_gaussians(5, spec.kwargs["in_features"], seed=5)
    x = torch.from_numpy(x_np)
    y = torch.from_numpy(np.random.default_rng(6).normal(size=(len(x), model(x[:1]).shape[1])))
    param = model.get_parameter(theory.param)
    objective = batch_loss("half_sse", model(x), y) + 0.5 * wd * param.square().sum()
    objective.backward()
    w = theory.weights(model)
    np.testing.assert_allclose(theory.loss(w, x_np, y.numpy(), wd), objective.item(), rtol=1e-12)
    np.testing.assert_allclose(
        theory.grad(w, x_np, y.numpy(), wd), param.grad.numpy(), rtol=1e-10, atol=1e-12
    )


def test_ridge_s_rel_is_the_spec_formula_for_every_lr():
    """SPEC §6.1: S = ||r (h . h') + lam W^T h'|| / ||r (h . h) + lam W^T h||, whatever lr."""
    rng = np.random.default_rng(0)
    V, W = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    theory, lam = RidgeFeatures(V), 0.7
    h = np.maximum(x @ V.T, 0)
    r = h @ W - y
    num = np.linalg.norm(r[:, None, :] * (h @ h.T)[:, :, None] + lam * (h @ W)[None], axis=-1)
    expected = num / np.diagonal(num)[:, None]
    for lr in (1e-6, 1e-2, 10.0):
        S = np.linalg.norm(theory.exact_change(W, x, y, lr, lam), axis=-1)
        np.testing.assert_allclose(S / np.diagonal(S)[:, None], expected, rtol=1e-12)


def test_homogeneous_first_order_is_the_weighted_inner_product():
    """SPEC §6.3: to first order S(x, x') = |<w^(2d-2) x, x'>| / <w^(2d-2) x, x> (no weight decay)."""
    rng = np.random.default_rng(1)
    w, x, y = rng.normal(size=4), rng.normal(size=(5, 4)), rng.normal(size=(5, 1))
    L = Homogeneous(3).linear_change(w, x, y, 1e-3)[:, :, 0]
    gram = (w**4 * x) @ x.T
    np.testing.assert_allclose(
        np.abs(L) / np.abs(np.diagonal(L))[:, None], np.abs(gram) / np.diagonal(gram)[:, None]
    )


# ----------------------------------------------------------------------------- recorded runs

RUN_CONFIGS = {
    "theory-ridge-p10": RidgeConfig(**SMALL),
    "theory-ridge-p100": RidgeP100Config(**SMALL),
    "theory-relu-gate": ReluGateConfig(**SMALL),
    "theory-homogeneous": HomogeneousConfig(**SMALL),
}


@pytest.fixture(scope="module")
def replayed_runs(tmp_path_factory):
    """Each theory preset, small, recorded and replayed with the sgd rule of its own objective."""
    runs = {}
    for preset, config in RUN_CONFIGS.items():
        run_dir = tmp_path_factory.mktemp("theory") / preset
        record(run_dir, config, preset=preset)
        update = UpdateConfig(rule="sgd", lr=REPLAY_LR, weight_decay=config.weight_decay)
        replay(run_dir, ReplayConfig(update=update, precision="float64"), progress=False)
        runs[preset] = run_dir
    return runs


def difference_floor(run, step, lr, wd, eps, S, ord):
    """``[P, P]`` rounding floor of S computed from ``D = f(w + U) - f(w)`` in float64:
    ``4 u (m_j + S_ij m_i) / (||D_ii|| + eps)``, ``m`` the size of the terms summed in the forward
    (the forward with every weight and input replaced by its absolute value)."""
    w = run.weights(step)
    magnitude_model = copy.copy(run.model)
    if isinstance(magnitude_model, RidgeFeatures):
        magnitude_model.V = np.abs(magnitude_model.V)
    m = np.linalg.norm(magnitude_model.forward(np.abs(w), np.abs(run.probe_x)), ord=ord, axis=-1)
    D = np.linalg.norm(run.model.exact_change(w, run.probe_x, run.probe_y, lr, wd), ord=ord, axis=-1)
    return 4 * ROUNDING * (m[None, :] + S * m[:, None]) / (np.diagonal(D)[:, None] + eps)


@pytest.mark.parametrize("preset", list(RUN_CONFIGS))
def test_replay_equals_the_closed_forms(replayed_runs, preset):
    run = load_theory_run(replayed_runs[preset])
    result = sgd_store(run, "sgd")
    assert len(result.steps) == len(run.run.manifest) >= 9
    closed = closed_form_measures(run, result)
    assert set(closed) == {"orig_outputs_l2", "orig_outputs_l1", "linear"}
    for name, S in closed.items():
        replayed = result.measures[name].read()
        if name == "linear":  # a Jacobian-vector product: no cancellation
            np.testing.assert_allclose(replayed, S, rtol=1e-9, atol=0)
            continue
        ord = 1 if name.endswith("l1") else 2
        floor = np.stack(
            [
                difference_floor(run, int(k), REPLAY_LR, run.config["weight_decay"], 1e-8, S[s], ord)
                for s, k in enumerate(result.steps)
            ]
        )
        assert np.all(np.abs(replayed - S) <= 1e-9 * np.abs(S) + floor), name
    if preset in ("theory-relu-gate", "theory-homogeneous"):  # orig is not its first-order form here
        assert np.abs(closed["orig_outputs_l2"] - closed["linear"]).max() > 1e-3


def test_recorded_gradient_descent_approaches_the_flow_linearly_in_the_step(tmp_path):
    """Gradient descent with step lr tracks the closed-form flow with error O(lr): halving the step
    halves the error (at the same flow times)."""
    errors = []
    for lr, steps in ((2e-2, 50), (1e-2, 100)):
        config = RidgeConfig(
            n_per_class=100, probes_per_class=2, lr=lr, steps=steps, snapshots=6, progress=False
        )
        record(tmp_path / str(steps), config, preset="theory-ridge-p10")
        run = load_theory_run(tmp_path / str(steps))
        s = theory_setup(asdict(config), config.model_spec())
        steps_recorded = np.array([e.step for e in run.run.manifest])
        recorded = np.stack([run.weights(int(k)) for k in steps_recorded])
        flow = run.model.flow(
            recorded[0], s.x.numpy(), s.y.numpy(), run.times(steps_recorded), config.weight_decay
        )
        deviation = np.linalg.norm(recorded - flow, axis=(1, 2)) / np.linalg.norm(flow, axis=(1, 2))
        errors.append((deviation.max(), deviation[-1]))
    (max_coarse, end_coarse), (max_fine, end_fine) = errors
    assert max_coarse < 1e-2
    assert 1.8 < max_coarse / max_fine < 2.2
    assert 1.8 < end_coarse / end_fine < 2.2


def test_numerical_flow_matches_the_closed_form_flow():
    """The generic flow integrator (used for the gate and the homogeneous family) on the ridge
    objective reproduces the expm closed form."""
    config = RidgeConfig(n_per_class=50, probes_per_class=1)
    s = theory_setup(asdict(config), config.model_spec())
    theory = RidgeFeatures.from_model(s.model)
    w0, x, y = theory.weights(s.model), s.x.numpy(), s.y.numpy()
    times = np.array([0.0, 0.01, 0.1, 1.0])
    closed = theory.flow(w0, x, y, times, config.weight_decay)
    numeric = super(RidgeFeatures, theory).flow(w0, x, y, times, config.weight_decay)
    np.testing.assert_allclose(numeric, closed, rtol=1e-7, atol=1e-9)
    # theta only rescales time: W(t; theta) = W(theta^2 t; 1)
    np.testing.assert_allclose(
        theory.flow(w0, x, y, times / 4, config.weight_decay, theta=2.0), closed, rtol=1e-12
    )


# ----------------------------------------------------------------------------- plots and errors


def test_plot_family_with_a_run_and_without(replayed_runs, tmp_path):
    [with_run] = plot_family("relu-gate", tmp_path, run_dir=replayed_runs["theory-relu-gate"], num_times=20)
    assert with_run == tmp_path / "theory_relu-gate_run_theory-relu-gate.png"
    settings = {"theory-homogeneous": asdict(HomogeneousConfig())}
    [alone] = plot_family("homogeneous", tmp_path / "alone", settings=settings, num_times=10)
    assert alone == tmp_path / "alone" / "theory_homogeneous_theory-homogeneous.png"
    for path in (with_run, alone):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_family_refuses_what_does_not_fit(replayed_runs, tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        plot_family("nope", tmp_path)
    with pytest.raises(ValueError, match="without a run, pass the settings"):
        plot_family("ridge", tmp_path)
    with pytest.raises(ValueError, match="got theory-homogeneous"):
        plot_family("ridge", tmp_path, settings={"theory-homogeneous": asdict(HomogeneousConfig())})
    with pytest.raises(RunDirError, match="'ridge' family, not 'homogeneous'"):
        plot_family("homogeneous", tmp_path, run_dir=replayed_runs["theory-ridge-p10"])
    with pytest.raises(ResultsError, match="--update sgd"):
        plot_family("ridge", tmp_path, run_dir=replayed_runs["theory-ridge-p10"], store="missing")

"""Replayed measures against plain loops: one real optimizer step per probe on a deep copy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from recorder.rundir.errors import ReplayError, ReplayWarning
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine
from replay.grads import per_sample_grads
from replay.reference import plain_changes, plain_measures
from replay.updates import update_rule
from tests.helpers import autograd_jacobians, make_model, make_probes, run_spec, snapshot, train_steps

EPS = 1e-8


def plain_ratio(N):
    return N / (N.diagonal()[:, None] + EPS)


def replayed(model, factory, x, y, config, optimizer=None, task="classification", loss="cross_entropy"):
    engine = Engine(run_spec(factory, task, loss), x, y, config)
    return engine.replay_snapshot(snapshot(model, 5, optimizer))


def trained(factory, steps=3):
    model = make_model(factory)
    x, y = make_probes(factory, per_class=2)
    train_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2), "cross_entropy", x, y, steps)
    return model, x, y


RULES = {
    "sgd": (UpdateConfig("sgd", lr=0.05), lambda m: torch.optim.SGD(m.parameters(), lr=0.05)),
    "adam-fresh": (UpdateConfig("adam-fresh", lr=1e-3), lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)),
}


@pytest.mark.parametrize("factory", ["mlp", "small_cnn"])
@pytest.mark.parametrize("rule", list(RULES))
def test_measures_equal_a_plain_loop_of_real_optimizer_steps(factory, rule):
    model, x, y = trained(factory)
    config, make_optimizer = RULES[rule]
    result = replayed(model, factory, x, y, ReplayConfig(config, precision="float64"))
    expected = plain_measures(*plain_changes(model, make_optimizer, "cross_entropy", x, y))
    assert set(expected) < set(result.measures)
    for name, S in expected.items():
        torch.testing.assert_close(result.measures[name], S, rtol=1e-5, atol=0, msg=name)
    torch.testing.assert_close(result.base_outputs, model(x).detach(), rtol=1e-12, atol=1e-12)
    loss = F.cross_entropy(model(x), y, reduction="none").detach()
    torch.testing.assert_close(result.probe_loss, loss, rtol=1e-12, atol=1e-12)


def test_recorded_rule_measures_equal_the_training_optimizers_own_step():
    model, x, y = trained("mlp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    train_steps(model, optimizer, "cross_entropy", x, y, 3)

    def resume(clone):
        opt = torch.optim.AdamW(clone.parameters())
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        return opt

    result = replayed(
        model, "mlp", x, y, ReplayConfig(UpdateConfig("recorded"), precision="float64"), optimizer
    )
    expected = plain_measures(*plain_changes(model, resume, "cross_entropy", x, y))
    for name in ("orig_probs_l2", "kl"):
        torch.testing.assert_close(result.measures[name], expected[name], rtol=1e-5, atol=0, msg=name)


def test_regression_measures_equal_a_plain_loop():
    model = make_model("mlp")
    x, _ = make_probes("mlp", per_class=2)
    y = torch.randn(len(x), 3, dtype=torch.float64)
    result = replayed(
        model, "mlp", x, y, ReplayConfig(UpdateConfig("sgd", lr=0.05)), task="regression", loss="mse"
    )
    assert set(result.measures) == {"orig_outputs_l2", "orig_outputs_l1", "linear"}
    base, new = plain_changes(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.05), "mse", x, y)
    torch.testing.assert_close(
        result.measures["orig_outputs_l2"], plain_ratio((new - base).norm(dim=-1)), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        result.measures["orig_outputs_l1"], plain_ratio((new - base).abs().sum(-1)), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("factory", ["mlp", "small_cnn"])
def test_linear_equals_jacobian_times_update_from_plain_autograd(factory):
    model, x, y = trained(factory)
    config = UpdateConfig("adam-fresh", lr=1e-3)
    result = replayed(model, factory, x, y, ReplayConfig(config, measures=("linear",), precision="float64"))
    params = {n: p.detach() for n, p in model.named_parameters()}
    updates = update_rule(config)(params, per_sample_grads(model, "cross_entropy", params, {}, x, y), None)
    U = torch.cat([u.flatten(1) for u in updates.values()], dim=1)  # [P, N]
    D = torch.einsum("jcn,in->ijc", autograd_jacobians(model, x), U)  # J row by row with torch.autograd
    torch.testing.assert_close(result.measures["linear"], plain_ratio(D.norm(dim=-1)), rtol=1e-7, atol=0)


def test_blocks_of_updated_and_observed_probes_do_not_change_the_result():
    model, x, y = trained("small_cnn")
    whole = replayed(model, "small_cnn", x, y, ReplayConfig(memory_budget=1 << 40, precision="float64"))
    engine = Engine(run_spec("small_cnn"), x, y, ReplayConfig(memory_budget=1, precision="float64"))
    assert engine.rows_per_chunk("float64") == 1 and engine.columns_per_block("float64") == 1
    chunked = engine.replay_snapshot(snapshot(model, 5))
    for name in whole.measures:
        torch.testing.assert_close(chunked.measures[name], whole.measures[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.update_norm, whole.update_norm, rtol=1e-12, atol=0)


@pytest.mark.parametrize("precision", ["float64", "auto"])
def test_sgd_updates_as_gradients_of_the_scaled_loss_equal_the_rules_own(precision):
    """sgd without weight decay takes the gradients of -lr times each loss as the updates; with
    the rule's -lr * g instead, the norms and measures agree to rounding."""
    model, x, y = trained("small_cnn")
    config = ReplayConfig(UpdateConfig("sgd", lr=1e-3), precision=precision)
    engine = Engine(run_spec("small_cnn"), x, y, config)
    assert engine.gradient_scale == -1e-3
    scaled = engine.replay_snapshot(snapshot(model, 5))
    engine.gradient_scale = None  # the rule's own updates
    ruled = engine.replay_snapshot(snapshot(model, 5))
    tolerance = 1e-12 if precision == "float64" else 1e-5
    torch.testing.assert_close(scaled.update_norm, ruled.update_norm, rtol=tolerance, atol=0)
    for name, S in ruled.measures.items():
        torch.testing.assert_close(scaled.measures[name], S, rtol=tolerance, atol=1e-9, msg=name)
    assert scaled.arithmetic == ruled.arithmetic


def test_float32_refuses_an_sgd_step_it_cannot_resolve():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    train_steps(model, torch.optim.Adam(model.parameters(), lr=0.1), "cross_entropy", x, y, 60)  # loss ~1e-3
    config = UpdateConfig("sgd", lr=1e-4)
    # carried through the layers, never subtracting outputs, the change is resolved
    resolved = replayed(model, "mlp", x, y, ReplayConfig(config, precision="mixed"))
    assert resolved.error_estimate < 1e-4
    with pytest.raises(ReplayError, match="float32 cannot resolve.*--precision float64"):
        replayed(model, "mlp", x, y, ReplayConfig(config, precision="float32"))


def test_float32_adam_fresh_is_accepted_and_its_error_estimate_is_honest():
    model, x, y = trained("small_cnn")
    config = UpdateConfig("adam-fresh", lr=1e-3)
    single = replayed(model, "small_cnn", x, y, ReplayConfig(config, precision="float32"))
    exact = replayed(model, "small_cnn", x, y, ReplayConfig(config, precision="float64"))
    assert single.measures["kl"].dtype == torch.float32
    assert 0 < single.error_estimate < 1e-2
    true_error = max(
        ((single.measures[m].double() - S).norm(dim=1) / S.norm(dim=1)).max().item()
        for m, S in exact.measures.items()
    )
    assert single.error_estimate / 10 < true_error < single.error_estimate * 10


def test_non_finite_weights_give_nan_measures_and_a_warning():
    model, x, y = trained("mlp")
    with torch.no_grad():
        model.get_parameter("1.weight")[0, 0] = math.nan
    snap = snapshot(model, 7)
    snap.nonfinite = ["1.weight"]  # as RunDir.load_snapshot reports it
    engine = Engine(run_spec("mlp"), x, y, ReplayConfig())
    with pytest.warns(ReplayWarning, match="step 7.*1.weight"):
        result = engine.replay_snapshot(snap)
    assert all(S.isnan().all() for S in result.measures.values())
    assert math.isnan(result.error_estimate)


def test_measures_must_apply_to_the_task():
    x, y = make_probes("mlp", per_class=1)
    with pytest.raises(ReplayError, match="'kl'.*regression"):
        Engine(run_spec("mlp", "regression", "mse"), x, y, ReplayConfig(measures=("kl",)))
    with pytest.raises(ReplayError, match="unknown measures"):
        Engine(run_spec("mlp"), x, y, ReplayConfig(measures=("nope",)))

"""Per-sample gradients and virtual updates against real autograd and real torch.optim steps."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from recorder.losses import batch_loss
from recorder.rundir.errors import ReplayError, RunDirError
from recorder.rundir.snapshot import OptimizerRecord
from replay.config import UpdateConfig
from replay.grads import per_sample_grads
from replay.reference import stepped_copies
from replay.updates import recorded_update, update_rule
from tests.helpers import make_model, make_probes, optimizer_record, train_steps


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def real_step_updates(model, optimizer, loss, x, y):
    """Oracle: U[i] = w' - w after deep copies of the model and of the optimizer (its state
    loaded with load_state_dict) take one real step on probe i alone. name -> [P, *shape]."""
    names = {id(p): n for n, p in model.named_parameters()}

    def resume(clone):
        params = dict(clone.named_parameters())
        groups = [{"params": [params[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
        opt = type(optimizer)(groups)
        opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # loads tensors by reference
        return opt

    rows = [
        {n: p.detach() - model.get_parameter(n).detach() for n, p in clone.named_parameters()}
        for clone in stepped_copies(model, resume, loss, x, y)
    ]
    return {n: torch.stack([r[n] for r in rows]) for n in rows[0]}


def assert_updates_equal(mine, oracle, model):
    """Equal to float64 rounding: within a few units of roundoff of |w| + |U| elementwise (the
    oracle's w' - w carries the rounding of w' = w + U, and the gradients differ in summation order)."""
    eps = torch.finfo(torch.float64).eps
    for n, w in model.named_parameters():
        bound = 16 * eps * (w.detach().abs() + oracle[n].abs())
        excess = ((mine[n] - oracle[n]).abs() - bound).max().item()
        assert excess <= 0, f"{n}: update differs beyond float64 rounding by {excess:.3g}"


def replayed_updates(model, optimizer, loss, x, y, rule=recorded_update):
    params = weights(model)
    grads = per_sample_grads(model, loss, params, dict(model.named_buffers()), x, y)
    return rule(params, grads, optimizer_record(model, optimizer) if optimizer is not None else None)


@pytest.mark.parametrize("factory", ["mlp", "small_cnn"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse", "half_sse"])
def test_per_sample_grads_equal_autograd_one_example_at_a_time(factory, loss):
    model = make_model(factory)
    x, labels = make_probes(factory, per_class=2)
    y = labels if loss == "cross_entropy" else torch.randn(len(x), 3, dtype=torch.float64)
    grads = per_sample_grads(model, loss, weights(model), {}, x, y)
    for i in range(len(x)):
        model.zero_grad()
        batch_loss(loss, model(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n][i], p.grad, rtol=1e-12, atol=1e-14)


OPTIMIZERS = {
    "sgd-plain": (torch.optim.SGD, {"lr": 0.1}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd-dampening": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.3}),
    "sgd-nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "sgd-wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0.05}),
    "sgd-maximize": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.05, "maximize": True}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adam-amsgrad": (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    "adam-wd": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}),
    "adam-amsgrad-wd-maximize": (
        torch.optim.Adam,
        {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
    ),
    "adam-decoupled": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1, "decoupled_weight_decay": True}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    "adamw-amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True}),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_recorded_update_equals_a_real_optimizer_step_at_several_steps(name):
    cls, kwargs = OPTIMIZERS[name]
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    optimizer = cls(model.parameters(), **kwargs)
    done = 0
    for step in (0, 1, 4):  # 0: no state yet (first step); then with momenta / moments
        train_steps(model, optimizer, "cross_entropy", x, y, step - done, seed=step)
        done = step
        mine = replayed_updates(model, optimizer, "cross_entropy", x, y)
        assert_updates_equal(mine, real_step_updates(model, optimizer, "cross_entropy", x, y), model)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_recorded_update_uses_each_parameter_groups_hyperparameters(cls):
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    first, second = list(model.parameters())[:2], list(model.parameters())[2:]
    extra = {"momentum": 0.5, "nesterov": True} if cls is torch.optim.SGD else {"betas": (0.5, 0.9)}
    optimizer = cls([{"params": first, "lr": 0.05}, {"params": second, "lr": 0.01, **extra}], lr=0.2)
    train_steps(model, optimizer, "cross_entropy", x, y, 3)
    mine = replayed_updates(model, optimizer, "cross_entropy", x, y)
    assert_updates_equal(mine, real_step_updates(model, optimizer, "cross_entropy", x, y), model)


def test_parameter_outside_every_group_is_not_updated():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    optimizer = torch.optim.Adam(list(model.parameters())[:2], lr=1e-2)
    mine = replayed_updates(model, optimizer, "cross_entropy", x, y)
    assert_updates_equal(mine, real_step_updates(model, optimizer, "cross_entropy", x, y), model)
    assert all(mine[n].abs().max() == 0 for n in list(mine)[2:])


@pytest.mark.parametrize(
    "config, real",
    [
        (
            UpdateConfig("sgd", lr=0.1, weight_decay=0.05),
            lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.05),
        ),
        (UpdateConfig("adam-fresh", lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        (
            UpdateConfig("adam-fresh", lr=1e-2, eps=1e-3, betas=(0.5, 0.9)),
            lambda p: torch.optim.Adam(p, lr=1e-2, eps=1e-3, betas=(0.5, 0.9)),
        ),
    ],
)
def test_sgd_and_adam_fresh_rules_equal_a_fresh_optimizer_step(config, real):
    model = make_model("small_cnn")
    x, y = make_probes("small_cnn", per_class=2)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", x, y, 2)
    mine = replayed_updates(model, None, "cross_entropy", x, y, rule=update_rule(config))
    oracle = real_step_updates(model, real(model.parameters()), "cross_entropy", x, y)
    assert_updates_equal(mine, oracle, model)


def test_adam_fresh_is_the_sign_like_step_of_the_spec():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=1)
    params = weights(model)
    grads = per_sample_grads(model, "cross_entropy", params, {}, x, y)
    mine = update_rule(UpdateConfig("adam-fresh", lr=1e-3))(params, grads, None)
    for n, g in grads.items():
        torch.testing.assert_close(mine[n], -1e-3 * g / (g.abs() + 1e-8), rtol=1e-9, atol=1e-15)


def test_recorded_rule_without_optimizer_state_names_the_alternatives():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=1)
    with pytest.raises(ReplayError, match="without optimizer state.*SGD, Adam, AdamW.*adam-fresh.*sgd"):
        replayed_updates(model, None, "cross_entropy", x, y)


def test_recorded_rule_with_unsupported_optimizer_names_the_supported_ones():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=1)
    params = weights(model)
    grads = per_sample_grads(model, "cross_entropy", params, {}, x, y)
    record = OptimizerRecord("RMSprop", [{"params": list(params), "lr": 0.01}], {})
    with pytest.raises(ReplayError, match="'RMSprop' is not supported.*SGD, Adam, AdamW.*adam-fresh.*sgd"):
        recorded_update(params, grads, record)


def test_recorded_rule_rejects_incomplete_records():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    train_steps(model, optimizer, "cross_entropy", x, y, 1)
    params = weights(model)
    grads = per_sample_grads(model, "cross_entropy", params, {}, x, y)
    record = optimizer_record(model, optimizer)
    del record.state["1.weight"]["max_exp_avg_sq"]
    with pytest.raises(ReplayError, match="'1.weight'.*max_exp_avg_sq"):
        recorded_update(params, grads, record)
    del record.groups[0]["betas"]
    with pytest.raises(ReplayError, match="lacks hyperparameters \\['betas'\\]"):
        recorded_update(params, grads, record)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_denominator_skips_the_root_of_zeros_without_changing_a_value(dtype):
    """Zeros and subnormals of ``exp_avg_sq`` are raised to ``tiny`` before the (slow on zeros)
    CPU square root only where the result is ``eps`` either way: bit for bit the plain formula."""
    from replay.updates import _denominator

    tiny = torch.finfo(dtype).tiny
    values = torch.cat(
        [
            torch.tensor([0.0, -0.0, tiny, tiny / 3, float("inf"), float("nan")], dtype=dtype),
            torch.logspace(math.log10(tiny) - 5, 30, 2000, dtype=dtype),
        ]
    )
    for eps in (1e-8, 1e-12, 1e-30, 0.0):
        for correction in (1.0, 0.0316):
            plain = values.clone().sqrt_().div_(correction).add_(eps)
            fast = _denominator(values.clone(), correction, eps)
            assert torch.equal(plain.isnan(), fast.isnan())
            assert torch.equal(plain.nan_to_num(), fast.nan_to_num()) and torch.equal(
                plain.signbit(), fast.signbit()
            )


def test_per_sample_grads_can_return_the_outputs_of_their_pass():
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    params = weights(model)
    for strategy in ("vmap", "loop"):
        grads, outputs = per_sample_grads(
            model, "cross_entropy", params, {}, x, y, strategy=strategy, with_outputs=True
        )
        torch.testing.assert_close(outputs, model(x).detach(), rtol=0, atol=1e-6)
        plain = per_sample_grads(model, "cross_entropy", params, {}, x, y, strategy=strategy)
        assert all(torch.equal(grads[k], plain[k]) for k in plain)


def _trained_adamw_record(model, x, y):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=True)
    train_steps(model, optimizer, "cross_entropy", x, y, 3)
    return optimizer_record(model, optimizer)


@pytest.mark.parametrize(
    "config",
    [
        UpdateConfig("sgd", lr=0.1, weight_decay=0.05),
        UpdateConfig("adam-fresh", lr=1e-2, eps=1e-3, betas=(0.5, 0.9)),
        UpdateConfig("recorded"),
    ],
    ids=lambda c: c.rule,
)
def test_every_registered_rule_equals_one_step_of_its_torch_optim_reference(config):
    from replay.updates import RULES

    assert config.rule in RULES
    rule = RULES[config.rule]
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    record = _trained_adamw_record(model, x, y) if rule.needs_state else None
    params = weights(model)
    mine = rule.build(config)(params, per_sample_grads(model, "cross_entropy", params, {}, x, y), record)
    rows = [
        {n: p.detach() - params[n] for n, p in clone.named_parameters()}
        for clone in stepped_copies(model, rule.reference(config, record), "cross_entropy", x, y)
    ]
    assert_updates_equal(mine, {n: torch.stack([r[n] for r in rows]) for n in rows[0]}, model)


def test_the_recorded_rules_check_is_the_one_the_replay_runs_on_each_snapshot():
    from replay.updates import RULES

    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=1)
    record = _trained_adamw_record(model, x, y)
    params = weights(model)
    check = RULES["recorded"].check
    check(record, params, "here")  # a complete record passes
    assert RULES["sgd"].check is None and RULES["adam-fresh"].check is None
    assert [name for name, rule in RULES.items() if rule.needs_state] == ["recorded"]
    record.state["1.weight"]["exp_avg"] = torch.zeros(3)
    with pytest.raises(RunDirError, match="here: optimizer state 'exp_avg' of '1.weight' has shape \\(3,\\)"):
        check(record, params, "here")
    with pytest.raises(ReplayError, match="without optimizer state"):
        check(None, params, "here")


def test_gradient_scale_is_the_rules_capability():
    from replay.updates import gradient_scale

    assert gradient_scale(UpdateConfig("sgd", lr=0.1)) == -0.1
    assert gradient_scale(UpdateConfig("sgd", lr=0.1, weight_decay=0.01)) is None
    assert (
        gradient_scale(UpdateConfig("adam-fresh")) is None
        and gradient_scale(UpdateConfig("recorded")) is None
    )

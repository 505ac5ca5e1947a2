"""The tangent kernel and the first-order change split by module (replay.firstorder), and the
virtual step that moves one module alone, against Jacobians from plain autograd and plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from analyses.linearisation import linearisation_gap
from analyses.results import load_result
from recorder.rundir.errors import ReplayError
from replay.classpairs import aggregate
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine
from replay.firstorder import TangentKernel, module_shares, output_gradients
from replay.grads import per_sample_grads
from replay.reference import plain_changes, plain_measures
from replay.run import replay
from replay.store import open_store
from replay.updates import update_rule
from tests.helpers import (
    autograd_jacobians,
    make_model,
    make_probes,
    make_run,
    run_spec,
    snapshot,
    train_steps,
)


class _Block(nn.Module):
    """A transformer encoder block between two linear maps: tokens ``[N, T, 4]`` -> ``[N, 3]``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


class _Tied(nn.Module):
    """One linear layer applied twice and its weight used again outside it: no gram form for it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.out(h + x @ self.shared.weight)


MODELS = {
    "mlp": (
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
        (6,),
    ),
    "cnn": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 2, 3, stride=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(8, 3),
        ),
        (1, 6, 6),
    ),
    "transformer_block": (_Block, (5, 4)),
    "tied": (_Tied, (5,)),
}


def module_columns(model):
    """Module name -> the columns of its parameters in :func:`autograd_jacobians`' ``N`` axis."""
    columns, start = {}, 0
    for name, p in model.named_parameters():
        columns.setdefault(name.rpartition(".")[0], []).extend(range(start, start + p.numel()))
        start += p.numel()
    return columns


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("form", ["gram", "auto"])
def test_kernel_and_parts_equal_products_of_autograd_jacobians(name, form):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(7, *shape, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    J = autograd_jacobians(model, x)  # [P, C, N]
    params = {k: v.detach() for k, v in model.named_parameters()}
    kernel = TangentKernel(model, params, {}, x, "loop", form)
    if name != "tied":
        assert "gram" in kernel.forms.values()
    else:
        assert kernel.forms["shared"] == "jacobian"  # the check caught the weight used elsewhere
    rows = torch.tensor([4, 0, 6])
    torch.testing.assert_close(
        kernel.ntk(rows), torch.einsum("icn,jcn->ij", J[rows], J), rtol=1e-10, atol=1e-12
    )

    grads = -0.1 * output_gradients("cross_entropy", model(x), y)  # [P, C]: the step -0.1 g
    updates = {k: torch.randn(len(rows), *v.shape, dtype=torch.float64) for k, v in params.items()}
    U = torch.cat([u.flatten(1) for u in updates.values()], dim=1)  # [B, N]
    G = torch.einsum("ic,icn->in", grads[rows], J[rows])  # [B, N]
    columns = module_columns(model)
    assert tuple(columns) == kernel.modules
    for parts, V in (
        (kernel.parts(rows, output_grads=grads[rows]), G),
        (kernel.parts(rows, updates=updates), U),
    ):
        expected = torch.stack([torch.einsum("in,jcn->ijc", V[:, c], J[:, :, c]) for c in columns.values()])
        torch.testing.assert_close(parts, expected, rtol=1e-10, atol=1e-13)
    summed = kernel.parts(rows, output_grads=grads[rows], by_module=False)
    torch.testing.assert_close(summed, torch.einsum("in,jcn->ijc", G, J)[None], rtol=1e-10, atol=1e-13)


def test_module_shares_sum_to_the_linear_ratio():
    parts = torch.randn(4, 3, 5, 2, dtype=torch.float64)
    rows = torch.tensor([0, 2, 4])
    whole = parts.sum(0).norm(dim=-1)
    expected = whole / (whole[torch.arange(3), rows][:, None] + 1e-8)
    torch.testing.assert_close(module_shares(parts, rows, 1e-8).sum(0), expected, rtol=1e-12, atol=0)


def _trained(steps=3):
    model = make_model("mlp")
    x, y = make_probes("mlp", per_class=2)
    train_steps(model, torch.optim.Adam(model.parameters(), lr=1e-2), "cross_entropy", x, y, steps)
    return model, x, y


@pytest.mark.parametrize("rule", ["sgd", "adam-fresh"])
def test_engine_ntk_linear_and_module_shares_equal_plain_autograd(rule):
    model, x, y = _trained()
    update = UpdateConfig(rule, lr=0.05)
    config = ReplayConfig(
        update, measures=("linear", "orig_logits_l2"), precision="float64", ntk=True, module_split=True
    )
    engine = Engine(run_spec("mlp"), x, y, config)
    result = engine.replay_snapshot(snapshot(model, 5))
    J = autograd_jacobians(model, x)
    torch.testing.assert_close(result.ntk, torch.einsum("icn,jcn->ij", J, J), rtol=1e-10, atol=1e-12)

    params = {n: p.detach() for n, p in model.named_parameters()}
    updates = update_rule(update)(params, per_sample_grads(model, "cross_entropy", params, {}, x, y), None)
    U = torch.cat([u.flatten(1) for u in updates.values()], dim=1)  # [P, N]
    D = torch.einsum("jcn,in->ijc", J, U)
    size = D.norm(dim=-1)
    torch.testing.assert_close(
        result.measures["linear"], size / (size.diagonal()[:, None] + 1e-8), rtol=1e-9, atol=0
    )

    optimizers = {"sgd": torch.optim.SGD, "adam-fresh": torch.optim.Adam}
    base, new = plain_changes(
        model, lambda m: optimizers[rule](m.parameters(), lr=0.05), "cross_entropy", x, y
    )
    exact = (new - base).flatten(1)  # [P, P * C]: the plain loop's change vectors
    gap = (exact - D.flatten(1)).norm(dim=1) / exact.norm(dim=1)
    torch.testing.assert_close(result.linearisation_gap, gap, rtol=1e-6, atol=0)
    assert (gap > 1e-4).all()  # a gap the comparison resolves

    columns = module_columns(model)
    assert engine.modules == tuple(columns)
    shares = []
    for c in columns.values():
        part = torch.einsum("jcn,in->ijc", J[:, :, c], U[:, c])
        shares.append((part * D).sum(-1) / size / (size.diagonal()[:, None] + 1e-8))
    labels = y.numpy()
    expected = aggregate(torch.stack(shares).numpy(), labels, 3)  # [M, K, K]
    np.testing.assert_allclose(result.module_share.numpy(), expected, rtol=1e-9)
    np.testing.assert_allclose(
        result.module_share.sum(0).numpy(), aggregate(result.measures["linear"].numpy(), labels, 3), rtol=1e-9
    )


@pytest.mark.parametrize("rule", ["sgd", "adam-fresh"])
def test_one_module_step_equals_a_plain_loop_stepping_that_module_alone(rule):
    model, x, y = _trained()
    optimizers = {"sgd": torch.optim.SGD, "adam-fresh": torch.optim.Adam}
    config = ReplayConfig(UpdateConfig(rule, lr=0.05), precision="float64", only_module="1")
    assert config.store_name == f"{rule}.1"
    result = Engine(run_spec("mlp"), x, y, config).replay_snapshot(snapshot(model, 5))
    assert dict(model.named_modules())["1"] is not None

    def only_first(m):
        return optimizers[rule](m.get_submodule("1").parameters(), lr=0.05)

    expected = plain_measures(*plain_changes(model, only_first, "cross_entropy", x, y))
    for name in ("orig_logits_l2", "kl", "orig_probs_l1"):
        torch.testing.assert_close(result.measures[name], expected[name], rtol=1e-6, atol=0, msg=name)


def test_unknown_module_and_an_oversized_kernel_are_refused_in_one_line():
    model, x, y = _trained()
    with pytest.raises(ReplayError, match="module .nope. has no trainable parameters.*.1., .3."):
        Engine(run_spec("mlp"), x, y, ReplayConfig(only_module="nope"))
    with pytest.raises(ReplayError, match="tangent kernel of 6 probes.*above the memory budget"):
        Engine(run_spec("mlp"), x, y, ReplayConfig(ntk=True, memory_budget=1000))


def test_replay_stores_the_kernel_and_module_shares(tmp_path):
    run = make_run(tmp_path / "run")
    config = ReplayConfig(
        UpdateConfig("sgd", lr=0.05), measures=("linear", "orig_logits_l2"), ntk=True, module_split=True
    )
    replay(run, config, progress=False)
    store = open_store(run / "sgd.zarr")
    assert store.modules == ("1", "3")
    assert store.ntk is not None and store.module_share is not None
    every = np.arange(len(store.steps))
    ntk, share = store.ntk.read(every), store.module_share.read(every)
    assert ntk.shape == (3, 9, 9) and share.shape == (3, 2, 3, 3)
    np.testing.assert_allclose(ntk, ntk.transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(share.sum(1), store.classpairs["linear"]["mean"].read(every), rtol=1e-9)
    gaps = store.linearisation_gap.read(every)  # [S, P]
    assert gaps.shape == (3, 9) and np.isfinite(gaps).all()
    drawn = linearisation_gap(load_result(run / "sgd.zarr"))
    np.testing.assert_allclose(drawn.vector_gap, np.median(gaps, axis=1), rtol=1e-12)
    np.testing.assert_allclose(drawn.vector_gap_max, gaps.max(axis=1), rtol=1e-12)

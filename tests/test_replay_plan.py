"""The engine's plan: arithmetic, strategy and chunk size as pure functions of the model's facts
(decision logic only: which plan is fastest is measured by ``cli.py bench``, not here)."""

from __future__ import annotations

import pytest
import torch

from recorder.models import build_model
from recorder.rundir.errors import ReplayError
from recorder.rundir.spec import ModelSpec
from replay.config import ReplayConfig
from replay.engine import Engine
from replay.plan import (
    ARITHMETIC,
    LOOP_ACTIVATIONS,
    ModelFacts,
    activations_per_sample,
    available_memory,
    choose_arithmetic,
    choose_strategy,
    columns_per_block,
    default_memory_budget,
    rows_per_chunk,
)
from tests.helpers import make_model, make_probes, run_spec, snapshot

SMALL = ModelFacts(num_params=1000, activations=10, traceable=True)


def test_auto_starts_with_the_float32_difference_and_gives_way_to_an_exact_arithmetic():
    assert choose_arithmetic("auto", traceable=True) == (ARITHMETIC["difference32"], ARITHMETIC["mixed"])
    assert choose_arithmetic("auto", traceable=False) == (ARITHMETIC["difference32"], ARITHMETIC["float64"])
    for name in ("float64", "float32", "mixed"):
        assert choose_arithmetic(name, traceable=True) == (ARITHMETIC[name], None)
    with pytest.raises(ReplayError, match="torch.fx"):
        choose_arithmetic("mixed", traceable=False)


def test_strategy_is_vmap_for_small_work_and_loop_once_one_probe_fills_the_device():
    cpu = LOOP_ACTIVATIONS["cpu"]
    facts = ModelFacts(num_params=10**6, activations=1000, traceable=True)
    enough = -(-cpu // 1000)  # probes whose activations reach the CPU threshold
    assert choose_strategy("auto", "cpu", facts, enough - 1) == "vmap"
    assert choose_strategy("auto", "cpu", facts, enough) == "loop"
    assert choose_strategy("auto", "cuda", facts, enough) == "vmap"  # a GPU needs more work to fill
    assert choose_strategy("loop", "cuda", SMALL, 2) == "loop"  # a configured strategy is kept
    assert choose_strategy("vmap", "cpu", facts, 10**6) == "vmap"


def test_rows_per_chunk_follows_the_memory_model():
    # vmap, float64: per row 8 * 1000 * 8 parameter bytes + 3 * (9 + 1) * 10 * 8 activation bytes
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["float64"], "vmap", 3 * 66_400) == 3
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["float64"], "vmap", 3 * 66_400 - 1) == 2
    # loop: the activations of one probe are shared by the block
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["float64"], "loop", 3 * 64_000 + 2_400) == 3
    # mixed: float32 copies, plus the float64 and float32 base values of every node (9 * 10 * 12 bytes)
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["mixed"], "vmap", 5 * 33_200 + 1_080) == 5
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["mixed"], "vmap", 1) == 1  # never below one row
    assert rows_per_chunk(SMALL, 9, ARITHMETIC["mixed"], "vmap", 1 << 40) == 9  # never above P


def test_the_cpu_budget_counts_reclaimable_page_cache_as_available(tmp_path, monkeypatch):
    """``MemAvailable`` (free memory plus the cache the kernel can drop), not ``MemFree``: a run
    that has just written gigabytes of files keeps the budget it had before."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       25000000 kB\nMemFree:         8000000 kB\nMemAvailable:   24000000 kB\n"
    )
    assert available_memory(str(meminfo)) == 24000000 * 1024
    free_pages = tmp_path / "no_available"
    free_pages.write_text("MemTotal:       25000000 kB\nMemFree:         8000000 kB\n")
    fallback = available_memory(str(free_pages))  # the free pages, as torch-free code can see them
    assert fallback == available_memory(str(tmp_path / "missing")) > 0
    monkeypatch.setattr("replay.plan.available_memory", lambda: 20 << 30)
    assert default_memory_budget(torch.device("cpu")) == 5 << 30


@pytest.mark.parametrize("arithmetic", ["mixed", "float64"])
def test_resnet18_at_240_probes_fits_the_default_budget_of_a_24_gib_machine(arithmetic):
    """The default budget is a quarter of the free memory: on a 24 GiB machine with 20 GiB free,
    5 GiB. The model's estimate of a block must fit it (and so the machine, with room to spare)."""
    model = build_model(ModelSpec("resnet18_nonorm", {"num_outputs": 3}))
    facts = ModelFacts(
        num_params=sum(p.numel() for p in model.parameters()),
        activations=activations_per_sample(model, torch.zeros(1, 3, 32, 32)),
        traceable=True,
    )
    budget, num_probes = (20 << 30) // 4, 240
    for strategy in ("vmap", "loop"):
        rows = rows_per_chunk(facts, num_probes, ARITHMETIC[arithmetic], strategy, budget)
        one_less = rows_per_chunk(facts, num_probes, ARITHMETIC[arithmetic], strategy, budget // 2)
        assert 1 <= one_less <= rows < num_probes  # the budget, not P, limits the block
        assert rows_per_chunk(facts, num_probes, ARITHMETIC[arithmetic], strategy, 1 << 20) == 1


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_observed_probes_go_in_blocks_only_where_one_updated_probe_exceeds_the_budget(strategy):
    """Per updated probe, ``ACTIVATION_COPIES`` activation copies of the observed probes (plus one):
    the blocks of observed probes are the most whose row fits; a propagation holds every probe."""
    facts = ModelFacts(num_params=1000, activations=100_000, traceable=True)
    num_probes, difference = 5000, ARITHMETIC["difference32"]
    assert columns_per_block(facts, num_probes, difference, strategy, 1 << 40) == num_probes
    budget = 3 * 4 * 100_000 * 1001 + 8 * 4 * 1000  # one row with 1,000 observed probes, exactly
    assert columns_per_block(facts, num_probes, difference, strategy, budget) == 1000
    assert columns_per_block(facts, num_probes, difference, strategy, budget - 1) == 999
    assert rows_per_chunk(facts, num_probes, difference, strategy, budget, 1000) == 1
    assert columns_per_block(facts, num_probes, difference, strategy, 1) == 1
    assert columns_per_block(facts, num_probes, ARITHMETIC["mixed"], strategy, budget) == num_probes


def test_engine_reports_its_plan_and_honours_a_configured_strategy():
    x, y = make_probes("mlp", per_class=2)
    engine = Engine(run_spec("mlp"), x, y, ReplayConfig(precision="auto", strategy="loop", memory_budget=1))
    plan = engine.arithmetic.name, engine.fallback.name, engine.strategy, engine.rows_per_chunk("mixed")
    assert plan == ("difference32", "mixed", "loop", 1)
    assert engine.facts.traceable and engine.facts.num_params == 6 * 8 + 8 + 8 * 3 + 3


def test_the_error_check_stays_a_fraction_of_the_pass_at_small_p():
    """One checked row per CHECK_SHARE probes (at least one, at most CHECK_ROWS); with few probes the
    check covers every probe (sharing the pass's float64 evaluation) and stays honest."""
    from replay.check import CHECK_ROWS, CHECK_SHARE, check_rows

    assert [check_rows(p) for p in (1, 3, 8, 16, 31, 32, 48)] == [1, 1, 1, 1, 1, 2, 3]
    assert check_rows(CHECK_ROWS * CHECK_SHARE) == check_rows(1000) == CHECK_ROWS
    x, y = make_probes("mlp", per_class=2)
    engine = Engine(run_spec("mlp"), x, y, ReplayConfig(precision="auto"))
    assert engine._check_everything(check_rows(len(x)))
    snap = snapshot(make_model("mlp"), 1)
    result = engine.replay_snapshot(snap)
    exact = Engine(run_spec("mlp"), x, y, ReplayConfig(precision="float64")).replay_snapshot(snap)
    error = max(
        ((result.measures[m] - exact.measures[m]).norm() / exact.measures[m].norm()).item()
        for m in result.measures
    )
    assert 0 < result.error_estimate < 1e-3 and error <= 10 * result.error_estimate

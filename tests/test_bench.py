"""The benchmark behind ``cli.py bench``: what it measures and reports, on tiny cases (no timing
claims here: the numbers themselves are in the README)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from click.testing import CliRunner

from cli import main
from recorder.bench import recorder_overhead
from replay.bench import PeakMemory, bench_case, case_model, floor, make_case
from replay.config import UpdateConfig
from replay.plan import ARITHMETIC, STRATEGIES

CPU = torch.device("cpu")


@pytest.mark.slow
def test_bench_case_times_the_loop_the_floor_and_every_plan_and_checks_the_choice():
    row = bench_case(make_case("digits", 10), UpdateConfig("adam-fresh"), CPU, repeats=1, memory_budget=None)
    assert set(row["candidates"]) == {"auto"} | {f"{a}/{s}" for a in ARITHMETIC for s in STRATEGIES}
    assert row["chosen"] in row["candidates"] and row["fastest_strategy"] in STRATEGIES
    assert row["meets_bar"]
    assert row["candidates"]["float64/vmap"]["error"] == 0  # the reference
    assert row["candidates"]["mixed/vmap"]["error"] < 1e-5 and row["engine_error"] < 1e-3
    assert row["loop_error"] > 0  # float32, the paper's procedure
    for key in ("engine_seconds", "loop_seconds", "floor_seconds", "speedup", "over_floor"):
        assert row[key] > 0, key
    assert isinstance(row["chosen_is_fastest"], bool)


def test_floor_evaluates_every_pair_in_blocks_within_the_budget():
    case = make_case("digits", 10)
    model = case_model(case, CPU)
    outputs = floor(case, model, CPU, budget=1)  # one copy of the probe set at a time
    model.load_state_dict(case.snapshot.params | case.snapshot.buffers)
    with torch.no_grad():
        expected = model(case.inputs)  # [P, C] at the snapshot's weights
    assert outputs.shape == (100, 10)
    torch.testing.assert_close(outputs.view(10, 10, 10), expected.expand(10, 10, 10))


def test_peak_memory_sees_an_allocation_on_the_cpu():
    with PeakMemory(CPU) as memory:
        block = torch.ones(16, 1 << 20)  # 64 MiB
        time.sleep(0.05)  # held for 50 samples: the sampler may catch a shorter hold half written
        del block
    assert memory.peak >= 60 << 20


def test_recorder_overhead_compares_step_times_with_and_without_snapshots():
    result = recorder_overhead(CPU, steps=18, rounds=2)
    assert result["model"] == "mlp" and result["step_seconds"] > 0 and result["step_seconds_recorded"] > 0
    assert 0 < result["inside_step"] < 1 and -1 < result["overhead"]


@pytest.mark.slow
def test_cli_bench_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = [
        "bench",
        "--case",
        "digits",
        "--probes",
        "10",
        "--repeats",
        "1",
        "--no-overhead",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "loop/eng" in result.output and "digits" in result.output
    report = json.loads(out.read_text())
    assert report["cases"][0]["probes"] == 10 and report["threads"] >= 1

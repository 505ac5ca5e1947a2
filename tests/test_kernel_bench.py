"""The benchmark of the first-order path at scale (``python -m replay.kernel_bench``), on 60 probes:
what it reports, and that the Gram path, the materialised Jacobians, the engine and the plain
loop agree (no timing claims here: the numbers are in the README)."""

from __future__ import annotations

import json

import pytest
import torch

from replay.kernel_bench import AGREEMENT_BAR, main

pytestmark = pytest.mark.usefixtures("one_thread")


def _main(*args: str) -> int:
    """The exit status of ``main`` on ``args`` (the test process's thread count kept)."""
    with pytest.raises(SystemExit) as exit:
        main([*args, "--threads", str(torch.get_num_threads())])
    return exit.value.code


def test_the_benchmark_times_every_path_and_the_gram_path_equals_the_materialised_one(tmp_path, capsys):
    out = tmp_path / "kernel.json"
    assert _main("--probes", "60", "--json", str(out)) == 0
    printed = capsys.readouterr().out
    assert "materialised per-sample Jacobians" in printed and "scaled by 60 / 50" in printed
    report = json.loads(out.read_text())
    assert report["probes"] == 60 and report["params"] == 64 * 128 + 128 + 128 * 10 + 10
    assert report["update"]["rule"] == "sgd" and report["update"]["lr"] == 1e-3
    assert set(report["forms"].values()) == {"gram"}
    assert report["loop_rows"] == 50 and report["loop_scale"] == pytest.approx(60 / 50)
    assert set(report["paths"]) == {"gram", "jacobian", "engine", "loop"}
    for name, path in report["paths"].items():
        assert path["seconds"] > 0 and path["peak_bytes"] >= 0 and path["within_budget"], name
    assert report["paths"]["gram"]["over_gram"] == 1
    loop = report["paths"]["loop"]
    assert loop["seconds"] == pytest.approx(loop["measured_seconds"] * 60 / 50)
    agreement = report["agreement"]
    assert agreement["jacobian_ntk"] <= AGREEMENT_BAR and agreement["jacobian_linear"] <= AGREEMENT_BAR
    assert agreement["engine_ntk"] <= AGREEMENT_BAR and agreement["engine_linear"] <= AGREEMENT_BAR
    assert agreement["engine_orig_against_loop"] <= 1e-3 and report["agrees"]


def test_more_probes_than_images_is_a_one_line_error(capsys):
    assert _main("--probes", "1798") == 1
    assert capsys.readouterr().err.strip() == "error: the digits have 1797 images; asked for 1798 probes"
    assert _main("--probes", "0") == 2  # a usage error

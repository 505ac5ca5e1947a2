"""The README's code runs as printed: its recorder example records a run that replays and analyzes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from recorder import RunDir

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_block(after_heading: str) -> str:
    """The first ```python block of README.md after the heading ``after_heading``."""
    text = README.read_text()
    section = text[text.index(after_heading) :]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.slow
def test_the_recorder_example_records_a_run_that_replays_and_analyzes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_block("## The recorder in your own training loop"), "README.md", "exec"), namespace)

    run = RunDir(tmp_path / "runs" / "mine")
    steps = 3 * len(namespace["loader"])  # the example's three epochs of optimizer steps
    assert [e.step for e in run.manifest] == [*range(0, steps, 9), steps]
    last = run.load_snapshot(run.manifest[-1])
    for name, weight in namespace["model"].named_parameters():
        assert torch.equal(last.params[name], weight.detach()), name
    rows = run.metrics()
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [0, 1, 2]
    assert sum(r["kind"] == "step" for r in rows) == steps

    runner = CliRunner()
    result = runner.invoke(main, ["replay", str(run.path), "--no-progress", "--measures", "kl"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["analyze", str(run.path)])
    assert result.exit_code == 0, result.output
    assert (run.path / "analysis" / "report.html").exists()

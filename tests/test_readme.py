"""The README's code runs as printed: its recorder example and its trainer examples (PyTorch
Lightning, Hugging Face ``Trainer``) record runs that replay and analyze."""

from __future__ import annotations

import math
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from recorder import RunDir
from recorder.models import _REGISTRY

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

    _replays_and_analyzes(run)


def _replays_and_analyzes(run: RunDir, *replay_options: str) -> None:
    """``replay`` (the ``kl`` measure) and ``analyze`` succeed on ``run``."""
    runner = CliRunner()
    result = runner.invoke(
        main, ["replay", str(run.path), "--no-progress", "--measures", "kl", *replay_options]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["analyze", str(run.path)])
    assert result.exit_code == 0, result.output
    assert (run.path / "analysis" / "report.html").exists()


@pytest.mark.slow
def test_the_lightning_example_records_a_run_that_replays_and_analyzes(tmp_path, monkeypatch):
    """The example saved as ``lit_digits.py`` and run as a script; replay imports ``LitDigits``
    from it with ``--allow-factory``, from the current folder."""
    monkeypatch.setattr("recorder.models._REGISTRY", dict(_REGISTRY))  # registrations end with the test
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lit_digits.py").write_text(_python_block("### PyTorch Lightning"))
    try:
        namespace = runpy.run_path("lit_digits.py", run_name="__main__")
        trainer = namespace["trainer"]
        run = RunDir(tmp_path / "runs" / "lightning")
        per_epoch = len(namespace["loader"])
        steps = 3 * per_epoch
        assert trainer.global_step == steps
        assert run.complete and [e.step for e in run.manifest] == [*range(0, steps, 9), steps]
        # StepLR halves the learning rate after each epoch: a snapshot holds the next step's
        assert [e.lr for e in run.manifest] == pytest.approx(
            [1e-3 * 0.5 ** (e.step // per_epoch) for e in run.manifest]
        )
        last = run.load_snapshot(run.manifest[-1])
        for name, weight in trainer.lightning_module.named_parameters():
            assert torch.equal(last.params[name], weight.detach()), name
        rows = run.metrics()
        assert sum(r["kind"] == "step" for r in rows) == steps
        assert [(r["epoch"], "train_loss" in r) for r in rows if r["kind"] == "epoch"] == [
            (e, True) for e in range(3)
        ]
        _replays_and_analyzes(run, "--allow-factory", "lit_digits:LitDigits")
    finally:
        sys.modules.pop("lit_digits", None)


@pytest.mark.slow
def test_the_trainer_example_records_a_run_that_replays_and_analyzes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_python_block("### Hugging Face Trainer"), "README.md", "exec"), namespace)

    run = RunDir(tmp_path / "runs" / "gpt2")
    steps = 3 * math.ceil(600 / 32)
    assert run.complete and [e.step for e in run.manifest] == [*range(0, steps, 10), steps]
    # the linear schedule: a snapshot holds the learning rate of the next step
    assert [e.lr for e in run.manifest] == pytest.approx(
        [1e-3 * (steps - e.step) / steps for e in run.manifest]
    )
    last = run.load_snapshot(run.manifest[-1])
    for name, weight in namespace["model"].named_parameters():
        assert torch.equal(last.params[name], weight.detach()), name
    assert [r["step"] for r in run.metrics() if "loss" in r] == list(range(1, steps + 1))
    _replays_and_analyzes(run)

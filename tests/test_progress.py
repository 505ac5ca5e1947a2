"""What long commands print: ``replay`` ends with one summary line, progress bar or not (and a
resumed replay prints no ``nan``); training progress in a log file is a line now and then, not a
redraw at every step."""

from __future__ import annotations

import io

import torch

from cli import main
from recorder.training import progress_bar, train
from tests.helpers import make_model, make_probes, make_run


def test_replay_without_progress_prints_one_summary_line_and_no_nan(tmp_path, runner):
    run = make_run(tmp_path / "run")  # three snapshots
    args = ["replay", str(run), "--no-progress", "--measures", "kl", "--ratio-eps", "0"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("replayed 3 snapshots (0 already done) in ")
    assert ", precision auto" in line and ", largest estimated error " in line
    assert line.endswith(f", 3/3 done -> {run / 'adam-fresh.zarr'}")

    result = runner.invoke(main, args)  # resumed: nothing left to do
    (line,) = result.output.strip().splitlines()
    assert line.startswith("replayed 0 snapshots (3 already done)") and "no error estimate" in line
    assert "nan" not in line


def test_progress_in_a_log_file_is_a_line_now_and_then():
    log = io.StringIO()  # not a terminal
    with progress_bar(10_000, stream=log) as bar:
        for _ in range(10_000):
            bar.update()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # the start and the end: no redraw between
    assert lines[-1].startswith("100%")


def test_training_loop_writes_no_redraw_per_step(capsys):
    model = make_model("mlp")
    inputs, targets = make_probes("mlp", per_class=8)
    batches = [(inputs[k : k + 4], targets[k : k + 4]) for k in range(0, len(inputs), 4)]
    train(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "cross_entropy", batches, batches, 3, None, "cpu"
    )
    captured = capsys.readouterr()
    assert captured.out.count("epoch ") == 3  # a line per epoch
    assert "\r" not in captured.err and len(captured.err.splitlines()) == 2  # 18 steps: start and end only

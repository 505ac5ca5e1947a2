"""The command line: help everywhere, usage errors exit 2, bad run directories give one line."""

from __future__ import annotations

import json

import pytest

from cli import main

COMMANDS = ["presets", "record", "replay", "analyze", "demo", "theory"]




@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_help_everywhere(runner, command):
    result = runner.invoke(main, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["replay"],  # missing RUN_DIR
        ["replay", "x", "--update", "rmsprop"],
        ["replay", "x", "--memory-budget", "lots"],
        ["record", "no-such-preset", "x"],
        ["record", "digits", "x", "--set", "epochs=abc"],
        ["record", "digits", "x", "--set", "nonsense=1"],
        ["theory", "no-such-family"],
    ],
)
def test_usage_errors_exit_2(runner, args, tmp_path):
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["replay", "analyze"])
def test_missing_or_empty_run_dir_is_one_line(runner, tmp_path, command):
    for target in (tmp_path / "missing", tmp_path):
        result = runner.invoke(main, [command, str(target)])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: ")
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.slow
def test_record_replay_analyze_end_to_end(runner, tmp_path):
    run = tmp_path / "digits"
    result = runner.invoke(
        main, ["record", "digits", str(run), "--set", "epochs=1", "--set", "progress=false"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["replay", str(run), "--no-progress", "--measures", "orig_probs_l2,kl"])
    assert result.exit_code == 0, result.output
    assert (run / "adam-fresh.zarr").is_dir()
    # A second replay of the same configuration has nothing left to do and changes nothing.
    result = runner.invoke(main, ["replay", str(run), "--no-progress", "--measures", "orig_probs_l2,kl"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["analyze", str(run)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "analysis" / "summary.json").read_text())
    assert "adam-fresh" in json.dumps(summary)
    assert (run / "analysis" / "report.html").exists()
    # Recording into a directory that already holds a run is refused, nothing is touched.
    before = (run / "manifest.json").read_bytes()
    result = runner.invoke(main, ["record", "digits", str(run), "--set", "epochs=1"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert (run / "manifest.json").read_bytes() == before


def test_replay_options_come_from_the_config_dataclasses(runner):
    from cli import config_from
    from replay.config import ReplayConfig, UpdateConfig

    command = main.commands["replay"]
    defaults = command.make_context("replay", ["run"]).params
    assert config_from(ReplayConfig, defaults) == ReplayConfig()
    args = ["run", "--update", "sgd", "--lr", "0.5", "--weight-decay", "0.1", "--measures", "kl, seed_kl"]
    args += ["--memory-budget", "512MiB", "--strategy", "loop", "--include-self", "--name", "x"]
    config = config_from(ReplayConfig, command.make_context("replay", args).params)
    assert config == ReplayConfig(
        UpdateConfig("sgd", lr=0.5, weight_decay=0.1),
        measures=("kl", "seed_kl"),
        memory_budget=512 << 20,
        strategy="loop",
        include_self=True,
        name="x",
    )
    betas = command.make_context("replay", ["run", "--betas", "0.5", "0.9"]).params["betas"]
    assert betas == (0.5, 0.9)
    result = runner.invoke(main, ["replay", "--help"])
    assert "SPEC" not in result.output and "--update [sgd|adam-fresh|recorded]" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["replay", "x", "--update", "recorded", "--lr", "0.1"], "the recorded rule does not read it"),
        (["replay", "x", "--update", "sgd", "--eps", "1e-6"], "its settings: --lr, --weight-decay"),
        (["replay", "x", "--lr", "0"], "lr must be positive"),
        (["bench", "--update", "recorded"], "'recorded' is not one of 'sgd', 'adam-fresh'"),
    ],
)
def test_settings_a_rule_cannot_take_are_usage_errors(runner, args, message):
    result = runner.invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output

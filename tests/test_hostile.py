"""Hostile run directories (issue #16): links planted where the project writes, files that never
end or never answer where it reads, sizes that would exhaust memory. Each case must give a
one-line ``Error:`` naming the file and leave everything outside the run directory untouched.

Everything lives under ``tmp_path``; ``tmp_path / "important"`` stands for a user's file that a
planted link points at.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from cli import main
from recorder import Recorder, Schedule
from recorder.models import build_model
from recorder.presets import PRESETS, check_settings
from recorder.rundir.errors import ReplayWarning, RunDirError, UnfinishedRunWarning
from recorder.rundir.group import read_group
from recorder.rundir.overwrite import prepare_run_dir
from recorder.rundir.run import RunDir, RunWriter
from recorder.rundir.spec import ModelSpec, RunSpec
from recorder.rundir.trajectory import TrajectoryWriter
from recorder.training import train
from replay.updates import check_record
from tests.helpers import MODEL_SPECS, make_model, make_probes, make_run, run_spec, snapshot, train_steps

ARGS = ["--measures", "kl,orig_probs_l2", "--no-progress"]
PRECIOUS = b"precious, not to be overwritten\n"


def cli(*args: str | Path):
    return CliRunner().invoke(main, list(map(str, args)))


def replay(run: Path, *extra: str):
    return cli("replay", run, *ARGS, *extra)


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit status 1, a single ``Error: ...`` line holding every fragment, no traceback."""
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def important(tmp_path) -> Path:
    """The user's file a planted link points at."""
    path = tmp_path / "important"
    path.write_bytes(PRECIOUS)
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path / "run", steps=(0, 2))


@pytest.fixture
def umask():
    """Set the umask to 0o027 for the test (files then get mode 0o640, folders 0o750)."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ----------------------------------------------------------------------------- A: writes


def test_a_link_or_fifo_at_the_lock_is_refused(run, important):
    lock = run / "adam-fresh.zarr.lock"
    lock.symlink_to(important)
    assert_one_line_error(replay(run), str(lock), "symbolic link")
    assert important.read_bytes() == PRECIOUS and not (run / "adam-fresh.zarr").exists()
    lock.unlink()
    os.mkfifo(lock)
    assert_one_line_error(replay(run), str(lock), "not a regular file (a FIFO)")


def test_a_store_that_is_a_link_is_not_written_through(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "adam-fresh.zarr").symlink_to(elsewhere, target_is_directory=True)
    assert_one_line_error(replay(run), str(run / "adam-fresh.zarr"), "symbolic link")
    assert not list(elsewhere.iterdir())


@pytest.fixture
def replayed(run) -> Path:
    """``run`` with metrics rows and a replay store, ready to analyze."""
    rows = [{"kind": "step", "step": s, "epoch": 0, "loss": 1.0 / (s + 1)} for s in range(3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert replay(run).exit_code == 0
    return run


def test_links_in_the_analysis_folder_are_replaced_not_followed(replayed, important):
    analysis = replayed / "analysis"
    analysis.mkdir()
    for name in ("training.png", "summary.json", "report.html"):
        (analysis / name).symlink_to(important)
    result = cli("analyze", replayed)
    assert result.exit_code == 0, result.output
    assert important.read_bytes() == PRECIOUS
    for name in ("training.png", "summary.json", "report.html"):
        assert not (analysis / name).is_symlink() and (analysis / name).stat().st_size > 0
    assert (analysis / "training.png").read_bytes().startswith(b"\x89PNG")


def test_an_analysis_folder_that_is_a_link_is_refused(replayed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (replayed / "analysis").symlink_to(elsewhere, target_is_directory=True)
    assert_one_line_error(cli("analyze", replayed), str(replayed / "analysis"), "symbolic link")
    assert not list(elsewhere.iterdir())


def test_metrics_are_not_appended_through_a_link(tmp_path, important):
    x, y = make_probes("mlp")
    RunWriter(tmp_path / "run", run_spec("mlp"), x, y)
    (tmp_path / "run" / "metrics.jsonl").symlink_to(important)
    with pytest.raises(RunDirError, match="metrics.jsonl: is a symbolic link"):
        TrajectoryWriter(tmp_path / "run").log_metrics({"step": 0, "loss": 1.0})
    assert important.read_bytes() == PRECIOUS


def test_written_files_respect_the_umask(replayed, umask):
    x, y = make_probes("mlp")
    writer = RunWriter(replayed.parent / "fresh", run_spec("mlp"), x, y)
    writer.add_snapshot(snapshot(make_model("mlp"), 0))
    writer.log_metrics({"step": 0, "loss": 1.0})
    fresh = replayed.parent / "fresh"
    for name in (
        "spec.json",
        "probes.safetensors",
        "manifest.json",
        "metrics.jsonl",
        "snapshots/step_00000000.safetensors",
    ):
        assert mode(fresh / name) == 0o666 & ~umask, name
    assert replay(fresh).exit_code == 0
    assert mode(fresh / "adam-fresh.zarr") == 0o777 & ~umask
    assert cli("analyze", replayed).exit_code == 0
    for name in ("summary.json", "report.html", "training.png"):
        assert mode(replayed / "analysis" / name) == 0o666 & ~umask, name


# ----------------------------------------------------------------------------- B: reads


def entry_file(run: Path, index: int = 0) -> Path:
    return run / json.loads((run / "manifest.json").read_text())["snapshots"][index]["file"]


@pytest.mark.parametrize("name", ["spec.json", "manifest.json", "probes.safetensors", "snapshot"])
def test_a_link_to_an_endless_device_is_refused(run, name):
    path = entry_file(run) if name == "snapshot" else run / name
    path.unlink()
    path.symlink_to("/dev/zero")
    assert_one_line_error(replay(run), str(path), "symbolic link")


@pytest.mark.parametrize("name", ["spec.json", "manifest.json", "probes.safetensors", "snapshot"])
def test_a_fifo_is_refused_without_waiting(run, name):
    path = entry_file(run) if name == "snapshot" else run / name
    path.unlink()
    os.mkfifo(path)
    assert_one_line_error(replay(run), str(path), "not a regular file (a FIFO)")


def test_metrics_that_never_end_are_refused(run):
    metrics = run / "metrics.jsonl"
    metrics.symlink_to("/dev/zero")
    with pytest.raises(RunDirError, match="metrics.jsonl: is a symbolic link"):
        RunDir(run).metrics()
    metrics.unlink()
    os.mkfifo(metrics)
    with pytest.raises(RunDirError, match=r"metrics.jsonl: not a regular file \(a FIFO\)"):
        RunDir(run).metrics()
    metrics.unlink()
    metrics.touch()
    os.truncate(metrics, 100 << 30)  # sparse: takes no disk
    with pytest.raises(RunDirError, match="metrics.jsonl: 107374182400 bytes, more than"):
        RunDir(run).metrics()


def test_a_sparse_huge_snapshot_is_refused_before_reading(run):
    path = entry_file(run)
    os.truncate(path, 100 << 30)  # sparse: takes no disk; reading it would take 100 GiB
    assert_one_line_error(replay(run), str(path), "107374182400 bytes, more than the", "the manifest lists")


@pytest.mark.parametrize("name", ["spec.json", "manifest.json", "probes.safetensors"])
def test_huge_run_files_are_refused_before_reading(run, name):
    os.truncate(run / name, 100 << 30)
    assert_one_line_error(replay(run), str(run / name), "107374182400 bytes, more than the")


def test_deeply_nested_spec_is_one_line(run):
    spec = json.loads((run / "spec.json").read_text())
    deep: object = "x"
    for _ in range(500):
        deep = [deep]
    (run / "spec.json").write_text(json.dumps(spec | {"extra": {"deep": deep}}))
    assert_one_line_error(replay(run), str(run / "spec.json"), "nested more than")
    assert_one_line_error(cli("analyze", run), str(run / "spec.json"), "nested more than")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"format": 1, "runs": [{"dir": "run-00", "seed": ' + "1" * 5000 + "}]}",
            "runs[0].seed is an integer of 5000 digits, more than the 4300",
        ),
        (
            '{"format": 1, "runs": ' + "[" * 5000 + "]" * 5000 + "}",
            "JSON nested more than 100 levels deep, at runs[0][0][0][0][0][0][0]...",
        ),
        (
            '{"format": 1, "runs": [{"dir": "run-00", "seed": 0, "x": ' + "[" * 500 + "]" * 500 + "}]}",
            "JSON nested more than 100 levels deep, at runs[0].x[0][0][0][0][0]...",
        ),
        ('{"format": 1, "runs": [}', "not valid JSON (Expecting value at line 1 column 24)"),
    ],
    ids=["5000-digit integer", "5000 levels", "500 levels", "syntax"],
)
def test_malformed_group_json_is_one_line_naming_the_key(tmp_path, text, expected):
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "group.json").write_text(text)
    with pytest.raises(RunDirError) as raised:
        read_group(tmp_path / "group")
    assert str(raised.value).startswith(f"{tmp_path / 'group' / 'group.json'}: {expected}")
    assert "\n" not in str(raised.value)
    for command in ("replay", "analyze"):
        assert_one_line_error(cli(command, tmp_path / "group"), f"group.json: {expected}")


# ----------------------------------------------------------------------------- C: the model's size


def test_a_huge_model_in_the_spec_is_refused_before_it_is_built(run, monkeypatch):
    spec = json.loads((run / "spec.json").read_text())
    spec["model"]["kwargs"]["hidden"] = [20000, 20000]
    (run / "spec.json").write_text(json.dumps(spec))
    real_empty = torch.empty

    def no_big_allocation(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        assert tensor.device.type == "meta" or tensor.numel() < 10**7, "a huge model was built"
        return tensor

    monkeypatch.setattr(torch, "empty", no_big_allocation)
    assert_one_line_error(
        replay(run), str(entry_file(run)), "(step 0)", "weights do not fit the model spec", "20000"
    )


# ----------------------------------------------------------------------------- D: the whole plan


def test_the_memory_budget_bounds_the_whole_plan(tmp_path):
    """The issue's case was 100,000 probes in 1 GiB (8.8 GB resident); 4,000 probes in 128 MiB
    (two measures [P, P] in float64, twice: 512 MB) is refused the same way, and replays in seconds
    where the check is missing."""
    g = torch.Generator().manual_seed(0)
    probes = 4000
    inputs = torch.randn(probes, 2, generator=g, dtype=torch.float64)
    targets = torch.arange(probes) % 2
    model = ModelSpec("mlp", {"in_features": 2, "num_outputs": 2, "hidden": [4]})
    spec = RunSpec(model, "classification", "cross_entropy", 2)
    writer = RunWriter(tmp_path / "run", spec, inputs, targets)
    torch.manual_seed(0)
    writer.add_snapshot(snapshot(build_model(spec.model).double(), 0))
    line = assert_one_line_error(
        replay(tmp_path / "run", "--memory-budget", "128MiB"),
        "4000 probes need about",
        "memory budget of 0.125 GiB",
        "at most 2047 probes fit",
    )
    assert "--memory-budget" in line
    assert not (tmp_path / "run" / "adam-fresh.zarr").exists()  # refused before anything is written


# ----------------------------------------------------------------------------- E: recorded optimizer values


def _adam_run(path: Path, mutate) -> Path:
    """A run of snapshots 0 (fresh Adam) and 2 (two Adam steps), ``mutate(record)`` applied to
    the optimizer record of snapshot 2."""
    x, y = make_probes("mlp")
    model = make_model("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    writer = RunWriter(path, run_spec("mlp", optimizer="Adam"), x, y)
    writer.add_snapshot(snapshot(model, 0, optimizer))
    train_steps(model, optimizer, "cross_entropy", x, y, 2)
    later = snapshot(model, 2, optimizer)
    mutate(later.optimizer)
    writer.add_snapshot(later)
    return path


def _set_group(key: str, value):
    return lambda record: record.groups[0].__setitem__(key, value)


BAD_RECORDS = {
    "betas of 1": (_set_group("betas", [1.0, 1.0]), "'betas' is [1.0, 1.0], must be two numbers in [0, 1)"),
    "NaN lr": (_set_group("lr", math.nan), "'lr' is nan, must be a finite number of at least 0"),
    "lr -1e300": (_set_group("lr", -1e300), "'lr' is -1e+300, must be a finite number of at least 0"),
    "infinite eps": (_set_group("eps", math.inf), "'eps' is inf, must be a finite number of at least 0"),
    "NaN weight decay": (_set_group("weight_decay", math.nan), "'weight_decay' is nan"),
    "NaN beta": (_set_group("betas", [0.9, math.nan]), "'betas' is [0.9, nan]"),
    "a 500-digit lr": (_set_group("lr", 10**500), "'lr' is 1000"),
    "step of two values": (
        lambda record: record.state["1.weight"].__setitem__("step", torch.ones(2)),
        "optimizer state 'step' of '1.weight' is [1.0, 1.0] (shape (2,)), must be one finite count",
    ),
    "negative step": (
        lambda record: record.state["1.bias"].__setitem__("step", torch.tensor(-3.0)),
        "optimizer state 'step' of '1.bias' is [-3.0]",
    ),
}


def _valid_for_torch(group: dict) -> bool:
    """The oracle: whether ``torch.optim.Adam`` takes the hyperparameters of ``group`` and they are
    all finite."""
    hyper = {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")}
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], **hyper)
        return all(
            math.isfinite(v) for v in (hyper["lr"], hyper["eps"], hyper["weight_decay"], *hyper["betas"])
        )
    except (ValueError, OverflowError):
        return False


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_recorded_optimizer_values_out_of_range_are_refused(case):
    """Each value that torch.optim's own constructor refuses, or that is not finite, is named; the
    state cases keep hyperparameters torch takes."""
    model, (x, y) = make_model("mlp"), make_probes("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    train_steps(model, optimizer, "cross_entropy", x, y, 2)
    record = snapshot(model, 2, optimizer).optimizer
    check_record(record, dict(model.named_parameters()), "snapshot step 2")  # as recorded: fine
    mutate, expected = BAD_RECORDS[case]
    mutate(record)
    assert _valid_for_torch(record.groups[0]) == ("step" in case)
    with pytest.raises(RunDirError) as raised:
        check_record(record, dict(model.named_parameters()), "snapshot step 2")
    assert str(raised.value).startswith("snapshot step 2: ") and expected in str(raised.value)


@pytest.mark.parametrize("case", ["betas of 1", "NaN lr", "step of two values"])
def test_replay_refuses_them_in_one_line_keeping_what_is_done(tmp_path, case):
    """Before, betas of 1 divided by zero, a step of two values raised, and a NaN lr gave a
    snapshot of NaN marked done with an estimated error of 1e-6."""
    mutate, expected = BAD_RECORDS[case]
    run = _adam_run(tmp_path / "run", mutate)
    line = assert_one_line_error(
        replay(run, "--update", "recorded"), "step_00000002.safetensors (step 2)", expected
    )
    assert "step 0" not in line
    done = zarr.open_group(run / "recorded.zarr", mode="r")["done"][:]
    assert done.tolist() == [True, False]  # nothing of snapshot 2 marked done, nothing else lost


def test_a_learning_rate_too_large_for_finite_measures_is_warned_once(run):
    """Before, lr=1e300 gave snapshots of NaN measures (from finite weights) marked done without a
    word."""
    from replay import ReplayConfig, UpdateConfig
    from replay.run import replay as run_replay

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = run_replay(run, ReplayConfig(UpdateConfig("sgd", lr=1e300), measures=("kl",)))
    said = [str(w.message) for w in caught if issubclass(w.category, ReplayWarning)]
    assert len(said) == 1 and "\n" not in said[0], said  # once per replay, of its first snapshot
    assert said[0].startswith("snapshot step 0: the weights are finite but the measures are not")
    assert "learning rate too large" in said[0]
    assert not np.isfinite(zarr.open_group(store, mode="r")["measures/kl"][:]).any()


# ----------------------------------------------------------------------------- F: record settings


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("optimizer=sgdd", "optimizer='sgdd': must be one of adam, adamw, sgd"),
        ("batch_size=0", "batch_size=0: must be at least 1"),
        ("epochs=-1", "epochs=-1: must be at least 1"),
        ("hidden=[128,0]", "hidden=[128, 0]: each must be at least 1"),
        ("lr=NaN", "lr=nan: must be a finite number above 0"),
        ("seed=-1", "seed=-1: must be at least 0"),
        ("test_fraction=1", "test_fraction=1.0: must be a number between 0 and 1"),
        ("device=gpu", "device='gpu': not a torch device"),
        (f"device=cuda:{torch.cuda.device_count()}", "device='cuda:"),  # one more GPU than there are
    ],
)
def test_record_settings_out_of_range_are_usage_errors(tmp_path, setting, expected):
    result = cli("record", "digits", tmp_path / "run", "--set", setting)
    assert result.exit_code == 2, result.output
    assert "Invalid value for --set" in result.output and expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_more_probes_than_a_class_has_is_one_line(tmp_path):
    result = cli("record", "digits", tmp_path / "run", "--set", "probes_per_class=1000")
    assert result.exit_code == 1, result.output
    assert "1000 examples of class 0 asked for, but it has only" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_every_preset_default_passes_the_settings_check():
    for preset in PRESETS.values():
        check_settings(preset.config_cls())


# ----------------------------------------------------------------------------- G: damaged replay stores


def test_a_done_snapshot_with_a_missing_or_damaged_chunk_is_recomputed(tmp_path):
    """A measure chunk deleted (zarr would read NaN), one truncated and a class-pair chunk
    truncated (both undecodable), all of snapshots marked done: the replay names their steps and
    recomputes them, to the arrays of the undamaged store."""
    run = make_run(tmp_path / "run", steps=(0, 1, 2, 3))
    assert replay(run).exit_code == 0
    store = run / "adam-fresh.zarr"
    undamaged = arrays(store)
    (store / "measures" / "kl" / "c" / "1" / "0" / "0").unlink()
    for chunk in ("measures/orig_probs_l2/c/2/0/0", "classpairs/kl/mean/c/3/0/0"):
        (store / chunk).write_bytes((store / chunk).read_bytes()[:-5])
    with pytest.warns(ReplayWarning, match=r"snapshot steps \[1, 2, 3\] were done but their chunks of "
                      r"classpairs/kl/mean, measures/kl, measures/orig_probs_l2 are missing or damaged"):  # fmt: skip
        assert replay(run).exit_code == 0
    repaired = arrays(store)
    assert repaired.keys() == undamaged.keys()
    for name, values in repaired.items():
        np.testing.assert_array_equal(values, undamaged[name], err_msg=name)


def arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of a replay store."""
    group = zarr.open_group(store, mode="r")
    return {name: a[...] for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def test_every_chunk_of_a_done_snapshot_is_written_even_of_fill_values(tmp_path):
    """So that a missing chunk means damage: here a snapshot with NaN weights (its measures are
    NaN, the fill value) keeps its chunks, and a second replay recomputes nothing."""
    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "run", run_spec("mlp"), x, y)
    model = make_model("mlp")
    with torch.no_grad():
        next(model.parameters())[0, 0] = math.nan
    writer.add_snapshot(snapshot(model, 0))
    with pytest.warns(ReplayWarning, match="non-finite weights"):
        assert replay(tmp_path / "run").exit_code == 0
    assert (tmp_path / "run" / "adam-fresh.zarr" / "measures" / "kl" / "c" / "0" / "0" / "0").is_file()
    result = replay(tmp_path / "run")
    assert result.exit_code == 0 and "were done but" not in result.output


# ----------------------------------------------------------------------------- H: a full disk while recording


FILE_LIMIT = 64 << 10  # the digits preset's snapshot of step 0 is 39152 bytes, the later ones 117040
WRITER_FAULTS = {
    # the kernel's own refusal: writes past RLIMIT_FSIZE fail with EFBIG (SIGXFSZ ignored)
    "file size limit": (
        "import resource, signal\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_LIMIT}, {FILE_LIMIT}))\n",
        "file size limit reached",
    ),
    # a full disk, from the snapshot of step 3 on (the writer's atomic writes fail as the OS would)
    "disk full": (
        "import errno, re\n"
        "import recorder.rundir.files as files\n"
        "write = files.atomic_write_bytes\n"
        "def full(path, *chunks, **kwargs):\n"
        "    step = re.search(r'step_(\\d+)', str(path))\n"
        "    if step and int(step[1]) >= 3:\n"
        "        raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "    return write(path, *chunks, **kwargs)\n"
        "files.atomic_write_bytes = full\n",
        "disk full",
    ),
}


@pytest.mark.parametrize("fault", WRITER_FAULTS)
def test_a_full_disk_stops_recording_with_one_line_and_every_complete_snapshot_listed(
    tmp_path, monkeypatch, fault
):
    """Before: a traceback, and the snapshots written before the failure were never listed (the
    writer stopped committing). The fault is injected into the recorder's writer process only,
    by a ``sitecustomize`` module on its PYTHONPATH."""
    code, words = WRITER_FAULTS[fault]
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(code)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "inject"))
    run = tmp_path / "run"
    result = cli(
        "record", "digits", run, "--set", "epochs=1", "--set", "snapshot_every=3", "--set", "progress=false"
    )
    expected = f"Error: {words} while writing snapshot step 3 into {run}: 1 snapshot is complete and listed"
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1] == expected + "; the run replays", result.output
    assert "Traceback" not in result.output
    listed = RunDir(run)
    assert [e.step for e in listed.manifest] == [0] and not listed.complete
    assert [p.name for p in (run / "snapshots").iterdir()] == ["step_00000000.safetensors"]  # nothing else
    monkeypatch.delenv("PYTHONPATH")
    with pytest.warns(UnfinishedRunWarning, match="did not finish"):
        assert replay(run).exit_code == 0


# ----------------------------------------------------------------------------- I: an interrupted recording


DIGITS = ("--set", "epochs=2", "--set", "snapshot_every=20", "--set", "progress=false")


def test_an_interrupted_record_is_marked_unfinished_and_overwrite_starts_over(
    tmp_path, monkeypatch, important
):
    """Ctrl-C in the first epoch's evaluation: one line, the run keeps its listed snapshots and
    says it did not finish; recording into it again says so and offers --overwrite, which
    removes only the run's files (a planted link is removed, not followed) and records afresh."""
    import recorder.training

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        patched.setattr(recorder.training, "evaluate", interrupt)
        result = cli("record", "digits", run, *DIGITS)
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(
        f"Error: interrupted: {run} keeps the snapshots written so far"
    ), result.output
    interrupted = RunDir(run)
    assert not interrupted.complete and [e.step for e in interrupted.manifest] == [0, 20, 40]
    assert json.loads((run / "manifest.json").read_text())["complete"] is False

    assert_one_line_error(cli("record", "digits", run, *DIGITS), "did not finish", "--overwrite")
    with pytest.warns(UnfinishedRunWarning, match=r"did not finish .*using the 3 snapshots it lists"):
        assert replay(run).exit_code == 0
    assert_one_line_error(
        cli("record", "digits", run, *DIGITS, "--overwrite"), "adam-fresh.zarr", "delete them"
    )

    shutil.rmtree(run / "adam-fresh.zarr")
    (run / "snapshots" / "step_00000099.safetensors").symlink_to(important)
    (run / "notes.txt").write_text("mine")
    result = cli("record", "digits", run, *DIGITS, "--overwrite")
    assert result.exit_code == 0, result.output
    assert important.read_bytes() == PRECIOUS and (run / "notes.txt").read_text() == "mine"
    fresh = RunDir(run)
    assert fresh.complete and [e.step for e in fresh.manifest] == [0, 20, 40, 60, 80, 90]
    names = sorted(p.name for p in (run / "snapshots").iterdir())
    assert names == [f"step_{e.step:08d}.safetensors" for e in fresh.manifest]  # the link is gone
    assert_one_line_error(cli("record", "digits", run, *DIGITS, "--overwrite"), "that finished")


def test_analyze_says_when_a_run_did_not_finish(replayed):
    manifest = json.loads((replayed / "manifest.json").read_text())
    (replayed / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    with pytest.warns(UnfinishedRunWarning, match=f"{replayed}: the recording did not finish"):
        assert cli("analyze", replayed).exit_code == 0


def test_runs_without_the_complete_field_count_as_complete(tmp_path):
    """Runs written before the field existed (and by RunWriter) replay without a warning."""
    run = make_run(tmp_path / "run", steps=(0, 1))
    assert "complete" not in json.loads((run / "manifest.json").read_text()) and RunDir(run).complete
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnfinishedRunWarning)
        assert replay(run).exit_code == 0


# ----------------------------------------------------------------------------- J: epochs without epoch=


def _labels(run_dir: Path, loop) -> tuple[list[tuple[int, int]], list[tuple[str, int, int]]]:
    """Record a tiny model through ``loop(rec, model, optimizer, batches)`` (3 epochs of 4 batches,
    a snapshot every 3 steps); the manifest's (step, epoch) and the metrics rows' (kind, step, epoch)."""
    model, (x, y) = make_model("mlp"), make_probes("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(x[k::4], y[k::4]) for k in range(4)]
    with Recorder(run_dir, model, optimizer, probes=(x, y), model_spec=MODEL_SPECS["mlp"], task="classification",
                  loss="cross_entropy", schedule=Schedule.every(3)) as rec:  # fmt: skip
        loop(rec, model, optimizer, batches)
    run = RunDir(run_dir)
    rows = [(r["kind"], r["step"], r["epoch"]) for r in run.metrics()]
    return [(e.step, e.epoch) for e in run.manifest], rows


def test_steps_without_epoch_follow_log_epoch_as_the_presets_label_them(tmp_path):
    """The README's loop (``rec.step(loss=...)``, ``rec.log_epoch(epoch)`` at the end of each
    epoch) labels a snapshot with the epoch of the step it follows: before, every epoch after the
    first was labelled one too early."""

    def readme_loop(rec, model, optimizer, batches):
        for epoch in range(3):
            for x, y in batches:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()
                rec.step(loss=loss.item())
            rec.log_epoch(epoch, train_loss=loss.item())

    def preset_loop(rec, model, optimizer, batches):  # the presets' recipe, epoch= given
        train(model, optimizer, "cross_entropy", batches, batches, 3, rec, "cpu", progress=False)

    snapshots, rows = _labels(tmp_path / "readme", readme_loop)
    assert snapshots == [(0, 0), (3, 0), (6, 1), (9, 2), (12, 2)]  # step t >= 1 is of epoch (t - 1) // 4
    assert [r for r in rows if r[0] == "step"] == [("step", t, (t - 1) // 4) for t in range(1, 13)]
    assert [r for r in rows if r[0] == "epoch"] == [("epoch", 4, 0), ("epoch", 8, 1), ("epoch", 12, 2)]
    assert _labels(tmp_path / "preset", preset_loop)[0] == snapshots
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "rec.step(loss=loss.item())" in readme and "rec.log_epoch(epoch" in readme  # the loop tested here


def test_overwrite_of_an_unfinished_group_removes_only_the_format_files(tmp_path, important):
    """A run group whose second run did not finish: refused without --overwrite; with it, only
    the files the run-directory format writes go (a link among them is removed, not followed;
    a member that is a link is refused before anything is removed)."""
    group = tmp_path / "group"
    make_run(group / "run-00", steps=(0, 1))
    unfinished = make_run(group / "run-01", steps=(0,))
    manifest = json.loads((unfinished / "manifest.json").read_text())
    (unfinished / "manifest.json").write_text(json.dumps(manifest | {"complete": False}))
    runs = [{"dir": "run-00", "seed": 0}, {"dir": "run-01", "seed": 1}, {"dir": "run-02", "seed": 2}]
    (group / "group.json").write_text(json.dumps({"format": 1, "preset": "p", "config": {}, "runs": runs}))
    (group / "run-00" / "metrics.jsonl").symlink_to(important)
    (group / "run-00" / ".spec.json.0123456789abcdef.tmp").write_text("a killed write")
    (group / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="run group of preset 'p' that did not finish .*--overwrite"):
        prepare_run_dir(group)
    (group / "run-02").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(RunDirError, match="run-02: is a symbolic link"):
        prepare_run_dir(group, overwrite=True)
    assert (group / "group.json").exists() and (group / "run-00" / "spec.json").exists()
    (group / "run-02").unlink()
    prepare_run_dir(group, overwrite=True)
    assert sorted(p.name for p in group.iterdir()) == ["notes.txt"] and important.read_bytes() == PRECIOUS
    prepare_run_dir(group)  # nothing left to refuse

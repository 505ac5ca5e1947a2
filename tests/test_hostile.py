"""Hostile run directories (issue #16): links planted where the project writes, files that never
end or never answer where it reads, sizes that would exhaust memory. Each case must give a
one-line ``Error:`` naming the file and leave everything outside the run directory untouched.

Everything lives under ``tmp_path``; ``tmp_path / "important"`` stands for a user's file that a
planted link points at.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import main
from recorder.models import build_model
from recorder.rundir.errors import RunDirError
from recorder.rundir.group import read_group
from recorder.rundir.run import RunDir, RunWriter
from recorder.rundir.spec import ModelSpec, RunSpec
from recorder.rundir.trajectory import TrajectoryWriter
from tests.helpers import make_model, make_probes, make_run, run_spec, snapshot

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


@pytest.mark.parametrize(
    "text",
    [
        '{"format": 1, "runs": [{"dir": "run-00", "seed": ' + "1" * 5000 + "}]}",
        '{"format": 1, "runs": ' + "[" * 5000 + "]" * 5000 + "}",
        '{"format": 1, "runs": [{"dir": "run-00", "seed": 0, "x": ' + "[" * 500 + "]" * 500 + "}]}",
    ],
    ids=["5000-digit integer", "5000 levels", "500 levels"],
)
def test_malformed_group_json_is_one_line(tmp_path, text):
    (tmp_path / "group").mkdir()
    (tmp_path / "group" / "group.json").write_text(text)
    with pytest.raises(RunDirError, match="group.json: .*(not valid JSON|nested more than)") as raised:
        read_group(tmp_path / "group")
    assert "\n" not in str(raised.value)
    assert_one_line_error(replay(tmp_path / "group"), str(tmp_path / "group" / "group.json"))


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

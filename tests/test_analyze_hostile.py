"""``analyze`` on hostile ground: a folder it cannot write, a full disk, a damaged chunk, a single
probe. Each gives one line (an error, or a store skipped with its reason) and loses nothing
written before."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

import recorder.rundir.files
from analyses.report import analyze
from analyses.results import load_results
from cli import main
from recorder.rundir.errors import ReplayWarning, ResultsError
from replay.config import ReplayConfig
from replay.run import replay
from tests.helpers import LABELS6, make_run, make_run_dir, write_store


def small_run(path: Path) -> Path:
    """A run directory with one store ``adam-fresh`` of three done snapshots (random values)."""
    run = make_run_dir(path)
    kl = np.random.default_rng(0).uniform(0.1, 2.0, size=(3, 6, 6))
    write_store(run / "adam-fresh.zarr", {"kl": kl}, LABELS6, [True] * 3, [0, 10, 20])
    return run


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def read_only(monkeypatch, folder: Path, error: int = errno.EROFS) -> None:
    """Make ``folder`` refuse writes with ``error`` (default: as on a read-only file system; root
    ignores permission bits, so this stands in for them too)."""
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path) -> None:
        if Path(path).resolve().is_relative_to(folder.resolve()):
            raise OSError(error, os.strerror(error), str(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


def test_read_only_run_directory_says_where_and_offers_out(tmp_path, monkeypatch, runner):
    run = small_run(tmp_path / "run")
    read_only(monkeypatch, run)
    with pytest.raises(ResultsError, match=r"analysis: cannot write the analysis there .*--out DIR"):
        analyze(run, figures=False)
    output = one_line_error(runner.invoke(main, ["analyze", str(run), "--no-figures"]))
    assert f"{run / 'analysis'}: cannot write" in output and "Read-only file system" in output
    elsewhere = tmp_path / "elsewhere"
    result = runner.invoke(main, ["analyze", str(run), "--no-figures", "--out", str(elsewhere)])
    assert result.exit_code == 0, result.output
    assert (elsewhere / "summary.json").is_file() and not (run / "analysis").exists()


def test_run_directory_without_write_permission(tmp_path, monkeypatch, runner):
    run = small_run(tmp_path / "run")
    if os.geteuid() == 0:  # root writes through permission bits: refused as they would refuse
        read_only(monkeypatch, run, errno.EACCES)
    run.chmod(0o555)
    try:
        output = one_line_error(runner.invoke(main, ["analyze", str(run), "--no-figures"]))
    finally:
        run.chmod(0o755)
    assert "cannot write the analysis there" in output and "--out DIR" in output


class FullDisk:
    """A file opened by :func:`os.fdopen` on a disk with no space left: every write fails."""

    def __init__(self, file):
        self._file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        pass

    def fileno(self):
        return self._file.fileno()


def test_full_disk_is_one_line_and_keeps_the_analysis_written_before(tmp_path, monkeypatch, runner):
    run = small_run(tmp_path / "run")
    analyze(run, figures=False)
    out = run / "analysis"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        file = real_fdopen(fd, mode, *args, **kwargs)
        return FullDisk(file) if "w" in mode else file

    monkeypatch.setattr(recorder.rundir.files.os, "fdopen", fdopen)
    output = one_line_error(runner.invoke(main, ["analyze", str(run)]))
    assert f"{out}: no space left on the device" in output and "--out DIR" in output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # complete, and no temporary file left


def test_damaged_measure_chunk_is_named_and_replay_recomputes_it(tmp_path):
    run = make_run(tmp_path / "run")  # snapshots at steps 0, 2, 4
    config = ReplayConfig(measures=("kl",), ratio_eps=0.0)
    replay(run, config, progress=False)
    intact = load_results(run)[0].measures["kl"].read()
    chunk = run / "adam-fresh.zarr" / "measures" / "kl" / "c" / "1" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # cut, as by a copy that died
    with pytest.raises(ResultsError) as error:
        analyze(run, figures=False)
    message = str(error.value)
    assert "adam-fresh.zarr: measures/kl of snapshot 1 (step 2) is damaged" in message and "\n" not in message
    assert message.endswith("rerun the replay that wrote this store: it recomputes that snapshot")
    with pytest.warns(ReplayWarning, match=r"snapshot steps \[2\] were done but their chunks of measures/kl"):
        replay(run, config, progress=False)  # what the message says to do
    np.testing.assert_array_equal(load_results(run)[0].measures["kl"].read(), intact)
    assert analyze(run, figures=False)["stores"]["adam-fresh"]["snapshots"]["done"] == 3


def test_single_probe_store_is_skipped_with_its_reason(tmp_path, runner):
    run = make_run_dir(tmp_path / "run")
    write_store(run / "one.zarr", {"kl": np.ones((2, 1, 1))}, np.array([0]), [True, True], [0, 10])
    output = one_line_error(runner.invoke(main, ["analyze", str(run), "--no-figures"]))
    assert "one: a single probe" in output
    write_store(run / "six.zarr", {"kl": np.ones((2, 6, 6))}, LABELS6, [True, True], [0, 10])
    result = runner.invoke(main, ["analyze", str(run), "--no-figures"])
    assert result.exit_code == 0, result.output
    assert "Skipped: one (a single probe: S_rel is measured between pairs of probes)." in result.output

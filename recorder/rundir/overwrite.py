"""Recording into a directory that already holds a recording: refused, unless the recording there
did not finish and the caller asks to start over (``cli.py record --overwrite``).

A recording did not finish when its manifest says ``"complete": false`` (the recorder was
interrupted, killed or failed), when a run directory has no manifest yet, or, for a run group,
when one of its runs did not finish or never started. Starting over removes only the files the
run-directory format writes (``spec.json``, ``probes.safetensors``, ``manifest.json``,
``metrics.jsonl``, ``snapshots/step_*.safetensors``, ``group.json`` and their temporary files),
never through a symbolic link (a link is removed, not followed); anything else stays. A
recording that holds replay stores (``NAME.zarr``) is not removed: a store would be resumed as if
it had been computed from the new recording.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path

from recorder.rundir.errors import RunDirError
from recorder.rundir.group import GROUP_FILE, is_group, read_group
from recorder.rundir.run import RunDir

_RUN_FILES = ("spec.json", "probes.safetensors", "manifest.json", "metrics.jsonl")
_SNAPSHOT = re.compile(r"step_\d+\.safetensors")
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{16}\.tmp")  # recorder.rundir.files.temp_sibling's names


def prepare_run_dir(path: str | os.PathLike, overwrite: bool = False) -> None:
    """Make ``path`` ready to record into. Raises :class:`RunDirError` when it holds a run or a run
    group, unless ``overwrite`` and that recording did not finish: then its files are removed."""
    path = Path(path)
    found = _recording(path)
    if found is None:
        return
    what, finished = found
    if finished:
        raise RunDirError(
            f"{path}: already holds {what} that finished; choose a new run directory "
            "(--overwrite replaces only a recording that did not finish)"
        )
    if not overwrite:
        raise RunDirError(
            f"{path}: holds {what} that did not finish (interrupted or failed); add --overwrite to "
            "delete its files and record it again from the start, or choose a new run directory"
        )
    runs = read_group(path).members if is_group(path) else [path]
    for run in runs:
        _check_removable(run)
    for run in runs:
        _remove_run_files(run)
    if is_group(path):
        _remove_files(path, {GROUP_FILE})


def _recording(path: Path) -> tuple[str, bool] | None:
    """What recording ``path`` holds (in words) and whether it finished; None for none."""
    if is_group(path):
        group = read_group(path)
        finished = all(_finished(run) for run in group.members)
        return f"a run group of preset {group.preset!r}", finished
    if not ((path / "spec.json").exists() or (path / "manifest.json").exists()):
        return None
    preset = RunDir(path).spec.preset
    return ("a run" + (f" of preset {preset!r}" if preset else "")), _finished(path)


def _finished(run: Path) -> bool:
    """Whether the run directory ``run`` holds a recording that finished."""
    return (run / "manifest.json").exists() and RunDir(run).complete


def _check_removable(run: Path) -> None:
    """Raise unless the files of the run directory ``run`` can be removed (see the module
    docstring): not a symbolic link, no replay store."""
    if run.is_symlink():
        raise RunDirError(f"{run}: is a symbolic link; refusing to follow it")
    stores = sorted(p.name for p in run.glob("*.zarr")) if run.is_dir() else []
    if stores:
        raise RunDirError(
            f"{run}: holds replay stores of the unfinished recording ({', '.join(stores)}); delete "
            "them first (they would be resumed as if computed from the new recording)"
        )


def _remove_run_files(run: Path) -> None:
    """Remove the run-directory files of ``run`` (``snapshots/`` too, once empty)."""
    if not run.is_dir():
        return
    _remove_files(run, _RUN_FILES)
    snapshots = run / "snapshots"
    if snapshots.is_symlink():
        snapshots.unlink()
    elif snapshots.is_dir():
        _remove_files(snapshots, pattern=_SNAPSHOT)
        _remove_empty(snapshots)
    _remove_empty(run)


def _remove_files(folder: Path, names: Collection[str] = (), pattern: re.Pattern[str] | None = None) -> None:
    """Unlink the entries of ``folder`` named in ``names`` or matching ``pattern``, and their
    temporary files; symbolic links are removed, not followed; a folder of such a name stays."""

    def ours(name: str) -> bool:
        return name in names or (pattern is not None and pattern.fullmatch(name) is not None)

    with os.scandir(folder) as entries:
        for entry in entries:
            temporary = _TEMPORARY.fullmatch(entry.name)
            if (ours(entry.name) or (temporary and ours(temporary["name"]))) and not entry.is_dir(
                follow_symlinks=False
            ):
                os.unlink(entry.path)


def _remove_empty(folder: Path) -> None:
    """Remove ``folder`` if it is empty."""
    try:
        folder.rmdir()
    except OSError:
        pass

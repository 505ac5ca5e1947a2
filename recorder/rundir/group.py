"""Run groups: independent runs of one preset (one seed each) under one directory.

    GROUP_DIR/
      group.json     {"format": 1, "preset": name, "config": {...}, "runs": [{"dir": "run-00", "seed": 0}, ...]}
      run-00/        a run directory (README.md, "Run directory"), seed ``config.seed``
      run-01/        seed ``config.seed + 1``, ...

``group.json`` is written before the first run starts, so an interrupted group still says what it
was meant to hold; a member without snapshots is simply incomplete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recorder.rundir.errors import RunDirError
from recorder.rundir.files import MAX_JSON_BYTES, atomic_write_json, make_folder, parse_json, read_file

GROUP_FILE = "group.json"
GROUP_FORMAT = 1


@dataclass
class RunGroup:
    """A run group read from disk: ``members`` ``[R]`` run directories and their ``seeds`` ``[R]``."""

    path: Path
    preset: str | None
    config: dict[str, Any]
    members: list[Path]
    seeds: list[int]


def member_name(index: int) -> str:
    return f"run-{index:02d}"


def is_group(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run group (holds ``group.json``); False where it cannot be read."""
    try:
        return (Path(path) / GROUP_FILE).is_file()
    except OSError:
        return False


def record_group(
    group_dir: str | os.PathLike,
    preset: str,
    config: dict[str, Any],
    runs: int,
    seed: int,
    record_run: Callable[[Path, int], None],
) -> RunGroup:
    """Record ``runs`` runs into ``group_dir``: ``record_run(member_dir, seed + k)`` for run ``k``.

    ``config`` (JSON-safe) is the preset's configuration, kept in ``group.json``. Raises
    :class:`RunDirError` when ``group_dir`` already holds a run or a group.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    path = Path(group_dir)
    if is_group(path) or (path / "spec.json").exists():
        raise RunDirError(f"{path}: already holds a run or a run group; choose a new directory")
    make_folder(path)
    members: list[dict[str, Any]] = [{"dir": member_name(k), "seed": seed + k} for k in range(runs)]
    atomic_write_json(
        path / GROUP_FILE, {"format": GROUP_FORMAT, "preset": preset, "config": config, "runs": members}
    )
    for m in members:
        record_run(path / m["dir"], m["seed"])
    return read_group(path)


def read_group(group_dir: str | os.PathLike) -> RunGroup:
    """Read ``group.json``; raise :class:`RunDirError` when it is missing or malformed."""
    path = Path(group_dir)
    where = path / GROUP_FILE
    data = read_file(
        where, MAX_JSON_BYTES, missing=f"not a run group (no {GROUP_FILE})", allowed="a JSON file may hold"
    )
    obj = parse_json(data, str(where))
    runs = obj.get("runs") if isinstance(obj, dict) else None
    if not isinstance(runs, list) or not runs:
        raise RunDirError(f"{where}: expected an object with a non-empty 'runs' list")
    members, seeds = [], []
    for k, run in enumerate(runs):
        name = run.get("dir") if isinstance(run, dict) else None
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise RunDirError(f"{where}: run {k} needs a 'dir' inside the group")
        members.append(path / name)
        seeds.append(run.get("seed"))
    return RunGroup(path, obj.get("preset"), obj.get("config") or {}, members, seeds)

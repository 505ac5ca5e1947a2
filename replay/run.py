"""Replay a recorded run into its zarr store: the entry point behind ``cli.py replay``.

One process, or every rank of a torchrun job (:mod:`replay.distributed`). The work goes in
steps that all ranks finish (and agree on: one rank's failure stops all) before the next:

1. every rank reads the run and checks that it fits its model: probes, output count, the first
   snapshot's weights (and optimizer state for ``--update recorded``); nothing is written yet;
2. rank 0 takes the store's lock (:func:`~replay.store.exclusive_writer`), then creates,
   resumes or extends the store; the other ranks then open it, and all read which snapshots
   are done;
3. each rank replays its share of the snapshots not done, writing whole chunks of its own
   snapshots only, each snapshot's ``done`` flag last;
4. rank 0 prints the one-line summary, with a progress bar or without.

A result depends only on its snapshot and on the blocks of the memory budget, which every rank
takes from the smallest of the ranks' budgets, and cuDNN runs deterministic algorithms during the
replay (:func:`~replay.precision.deterministic_cudnn`): any number of ranks gives the same store,
bit for bit, as one process with that budget on the same kind of device.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from recorder.models import check_fits_before_building, check_state_matches, probe_outputs, rebuild_model
from recorder.rundir.errors import CorruptSnapshotError, ReplayWarning, RunDirError
from recorder.rundir.probes import Inputs, input_tensors, num_probes
from recorder.rundir.run import RunDir
from recorder.rundir.snapshot import Snapshot, SnapshotEntry
from replay.config import ReplayConfig
from replay.distributed import Ranks, join
from replay.engine import Engine
from replay.plan import ARITHMETIC, check_plan_fits
from replay.precision import deterministic_cudnn
from replay.store import ReplayStore, exclusive_writer
from replay.updates import RULES

T = TypeVar("T")


def replay(
    run_dir: str | os.PathLike, config: ReplayConfig, progress: bool = True, skip_corrupt: bool = False
) -> Path:
    """Replay every snapshot of ``run_dir`` not yet done into ``RUN_DIR/<config.store_name>.zarr``.

    Snapshots are read one at a time. A store written before with the same configuration is
    resumed (done snapshots are skipped, new manifest entries appended). Under torchrun the
    ranks share the snapshots. Rank 0 prints a progress bar (with ``progress``) and a one-line
    summary. A snapshot file that is missing, truncated or corrupted stops the
    replay, or with ``skip_corrupt`` is skipped with a warning (its ``done`` flag stays false).
    Returns the store's path.

    Raises :class:`~recorder.rundir.errors.RunDirError` for an unreadable run directory or one that
    does not fit its model, and :class:`~replay.config.ReplayError` for anything the replay
    cannot do (another replay holding the store included).
    """
    with join(config.device) as ranks, deterministic_cudnn():
        return _replay(
            Path(run_dir),
            dataclasses.replace(config, device=ranks.place(config.device)),
            ranks,
            progress,
            skip_corrupt,
        )


def _replay(run_dir: Path, config: ReplayConfig, ranks: Ranks, progress: bool, skip_corrupt: bool) -> Path:
    start = time.perf_counter()
    run, inputs, targets, model = _agreed(ranks, lambda: _check_run(RunDir(run_dir), config, skip_corrupt))
    if ranks.main:
        run.warn_if_unfinished()
    engine = _agreed(ranks, lambda: _engine(run, inputs, targets, config))
    # A recorder may still be appending to the manifest: every rank takes the same prefix. Every
    # rank plans the same blocks, those of the smallest memory budget (a default one follows each
    # GPU's free memory), so that a snapshot's result does not depend on the rank computing it.
    listed, budget = ranks.reduce([len(run.manifest), engine.budget], "min")
    entries, engine.budget = run.manifest[: int(listed)], int(budget)
    path = run.path / f"{config.store_name}.zarr"
    store_args = (path, config, run.spec, entries, targets, engine.measure_names, engine.modules)
    with ExitStack() as held:

        def prepare() -> ReplayStore:
            held.enter_context(exclusive_writer(path))  # until the end of the replay
            return ReplayStore.prepare(*store_args)

        prepared = _agreed(ranks, prepare if ranks.main else lambda: None)
        store = _agreed(ranks, lambda: prepared or ReplayStore.attach(*store_args))
        # Every rank has read ``done`` by now, before any rank writes.
        todo = [s for s in range(len(entries)) if not store.done[s]]
        label = f"replay {config.store_name}" + (
            f" (rank 0 of {ranks.world_size})" if ranks.world_size > 1 else ""
        )
        errors, arithmetics, skipped_here = _agreed(
            ranks,
            lambda: _replay_share(
                run,
                entries,
                ranks.shard(todo),
                model,
                engine,
                config,
                store,
                skip_corrupt,
                label if progress and ranks.main else None,
            ),
        )
        worst = max((e for e in errors if not math.isnan(e)), default=-math.inf)
        replayed, skipped = ranks.reduce([len(errors), skipped_here], "sum")
        (worst,) = ranks.reduce([worst], "max")
        used = ranks.reduce([arithmetics.count(a) for a in ARITHMETIC], "sum")
        if ranks.main:
            done = store.read_done()
            counts = {a: int(n) for a, n in zip(ARITHMETIC, used, strict=True) if n}
            print(
                f"replayed {int(replayed)} snapshots ({len(entries) - len(todo)} already done"
                f"{f', {int(skipped)} skipped as corrupt' if skipped else ''}) in {time.perf_counter() - start:.1f}s"
                f"{f' on {ranks.world_size} ranks' if ranks.world_size > 1 else ''}, "
                f"{_arithmetic_used(config.precision, counts, worst)}, {int(np.sum(done))}/{len(done)} done -> {path}"
            )
    return path


def _arithmetic_used(precision: str, counts: dict[str, int], worst: float) -> str:
    """The summary's words on the arithmetic: the precision, the arithmetic of the snapshots
    replayed (``counts``: arithmetic -> snapshots) where it is not the precision's own, and their
    largest error estimate ``worst`` (``-inf``: none replayed; float64 has none)."""
    words = f"precision {precision}"
    if set(counts) - {precision}:
        words += " (" + ", ".join(f"{arithmetic} for {n}" for arithmetic, n in counts.items()) + ")"
    estimate = f"largest estimated error {worst:.1g}" if worst > -math.inf else "no error estimate"
    return f"{words}, {estimate}"


def _engine(run: RunDir, inputs: Inputs, targets: torch.Tensor, config: ReplayConfig) -> Engine:
    """The replay's engine, once the whole plan is known to fit its memory budget
    (:func:`~replay.plan.check_plan_fits`)."""
    engine = Engine(run.spec, inputs, targets, config)
    values_per_probe = sum(t[:1].numel() for t in (*input_tensors(inputs), targets))
    results = len(engine.measure_names) + config.ntk  # [P, P] each: the measures, and the kernel
    check_plan_fits(num_probes(inputs), results, values_per_probe, engine.facts.num_params, engine.budget)
    return engine


def _agreed(ranks: Ranks, fn: Callable[[], T]) -> T:
    """``fn()`` on this rank, then :meth:`~replay.distributed.Ranks.agree`: raises on every rank
    when ``fn`` failed on any."""
    error: Exception | None = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised
        error = e
    ranks.agree(error)  # raises when there is an error, so ``result`` is set
    return result


def _replay_share(
    run: RunDir,
    entries: list[SnapshotEntry],
    share: list[int],
    model: nn.Module,
    engine: Engine,
    config: ReplayConfig,
    store: ReplayStore,
    skip_corrupt: bool,
    label: str | None,
) -> tuple[list[float], list[str], int]:
    """Replay and store the snapshots ``share`` (indices into ``entries``) with a progress bar
    ``label`` (None: none). Returns their error estimates and arithmetics, and how many were
    skipped as corrupt."""
    errors, arithmetics, skipped = [], [], 0
    for s in tqdm(share, desc=label, unit="snapshot", disable=label is None):
        try:
            snapshot = _load(run, entries[s], model, config)
        except CorruptSnapshotError as e:
            if not skip_corrupt:
                raise CorruptSnapshotError(f"{e}; rerun with --skip-corrupt to replay the others") from None
            warnings.warn(f"{e}; skipped, not done", ReplayWarning, stacklevel=2)
            skipped += 1
            continue
        result = engine.replay_snapshot(snapshot)
        store.write(s, result)
        errors.append(result.error_estimate)
        arithmetics.append(result.arithmetic)
    return errors, arithmetics, skipped


def _check_run(
    run: RunDir, config: ReplayConfig, skip_corrupt: bool
) -> tuple[RunDir, Inputs, torch.Tensor, nn.Module]:
    """``run``, its probe inputs and targets, and its model (on the CPU, for checking snapshots),
    after checking that they fit each other and the first readable snapshot. Reads, never writes."""
    if not run.manifest:
        raise RunDirError(f"{run.path}: no snapshots recorded yet")
    inputs, targets = run.probes()
    spec = run.spec
    if spec.task == "classification" and len(classes := targets.unique()) < 2:
        warnings.warn(
            f"{run.path / 'probes.safetensors'}: every probe is of class {int(classes[0])}, so the class-pair "
            "analyses (same- against cross-class pairs) are undefined",
            ReplayWarning,
            stacklevel=2,
        )
    first = _first_readable(run, skip_corrupt, lambda entry: (entry, run.weight_skeleton(entry)))
    if first is not None:  # the model is checked against the header before it is built
        check_fits_before_building(spec.model, first[1], _where(run, first[0]))
    try:
        model = rebuild_model(spec.model)
    except RunDirError as e:
        raise RunDirError(f"{run.path / 'spec.json'}: {e}") from None
    if not list(model.parameters()):
        raise RunDirError(
            f"{run.path / 'spec.json'}: model {spec.model.factory!r} has no parameters to update"
        )
    try:
        outputs = probe_outputs(model, inputs, spec.model.factory)
    except ValueError as e:
        raise RunDirError(f"{run.path / 'probes.safetensors'}: {e}") from None
    if tuple(outputs.shape) != (1, spec.num_outputs):
        raise RunDirError(
            f"{run.path / 'spec.json'}: num_outputs is {spec.num_outputs}, but the model maps a probe "
            f"to outputs of shape {tuple(outputs.shape[1:])}"
        )
    _first_readable(run, skip_corrupt, lambda entry: _load(run, entry, model, config))
    return run, inputs, targets, model


def _first_readable(run: RunDir, skip_corrupt: bool, read: Callable[[SnapshotEntry], T]) -> T | None:
    """``read(entry)`` for the first listed snapshot that is not corrupt (None if there is none);
    a corrupt one raises :class:`CorruptSnapshotError` unless ``skip_corrupt``."""
    for entry in run.manifest:
        try:
            return read(entry)
        except CorruptSnapshotError:
            if not skip_corrupt:
                raise
    return None


def _where(run: RunDir, entry: SnapshotEntry) -> str:
    """The snapshot file of ``entry`` and its step, as messages name it."""
    return f"{run.path / entry.file} (step {entry.step})"


def _load(run: RunDir, entry: SnapshotEntry, model: nn.Module, config: ReplayConfig) -> Snapshot:
    """Read the snapshot of ``entry`` and check that it fits ``model`` (names and shapes of the
    weights), and for a rule that reads the optimizer record (``recorded``) that the record is
    one the rule can use (:attr:`replay.updates.Rule.check`)."""
    snapshot = run.load_snapshot(entry)
    where = _where(run, entry)
    check_state_matches(model, snapshot.params, where)
    check = RULES[config.update.rule].check
    if check is not None:
        check(snapshot.optimizer, snapshot.params, where)
    return snapshot

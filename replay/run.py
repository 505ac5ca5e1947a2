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
4. rank 0 prints the summary.

A result depends only on its snapshot, so any number of ranks gives the same store, bit for
bit, as one process on the same kind of device.
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

from recorder.models import build_model, check_state_matches
from recorder.rundir.errors import CorruptSnapshotError, ReplayWarning, RunDirError
from recorder.rundir.files import is_number
from recorder.rundir.run import RunDir
from recorder.rundir.snapshot import Snapshot, SnapshotEntry
from replay.config import ReplayConfig
from replay.distributed import Ranks, join
from replay.engine import Engine
from replay.store import ReplayStore, exclusive_writer
from replay.updates import check_optimizer

T = TypeVar("T")
# What the ``recorded`` rule reads from a snapshot's optimizer record (SGD, Adam, AdamW):
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")  # shaped like the parameter
_NUMBERS = ("lr", "eps", "weight_decay", "momentum", "dampening")  # group hyperparameters
_FLAGS = ("amsgrad", "nesterov", "maximize", "decoupled_weight_decay")


def replay(
    run_dir: str | os.PathLike, config: ReplayConfig, progress: bool = True, skip_corrupt: bool = False
) -> Path:
    """Replay every snapshot of ``run_dir`` not yet done into ``RUN_DIR/<config.store_name>.zarr``.

    Snapshots are read one at a time. A store written before with the same configuration is
    resumed (done snapshots are skipped, new manifest entries appended). Under torchrun the
    ranks share the snapshots. With ``progress``, a progress bar and a one-line summary are
    printed (by rank 0). A snapshot file that is missing, truncated or corrupted stops the
    replay, or with ``skip_corrupt`` is skipped with a warning (its ``done`` flag stays false).
    Returns the store's path.

    Raises :class:`~recorder.runfiles.RunDirError` for an unreadable run directory or one that
    does not fit its model, and :class:`~replay.config.ReplayError` for anything the replay
    cannot do (another replay holding the store included).
    """
    with join(config.device) as ranks:
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
    engine = _agreed(ranks, lambda: Engine(run.spec, inputs, targets, config))
    # A recorder may still be appending to the manifest: every rank takes the same prefix.
    entries = run.manifest[: int(ranks.reduce([len(run.manifest)], "min")[0])]
    path = run.path / f"{config.store_name}.zarr"
    store_args = (path, config, run.spec, entries, targets, engine.measure_names)
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
        errors, skipped = _agreed(
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
        replayed, skipped = ranks.reduce([len(errors), skipped], "sum")
        (worst,) = ranks.reduce([worst], "max")
        if progress and ranks.main:
            done = store.read_done()
            print(
                f"replayed {int(replayed)} snapshots ({len(entries) - len(todo)} already done"
                f"{f', {int(skipped)} skipped as corrupt' if skipped else ''}) in {time.perf_counter() - start:.1f}s"
                f"{f' on {ranks.world_size} ranks' if ranks.world_size > 1 else ''}, {config.precision}, largest "
                f"estimated error {worst if worst > -math.inf else math.nan:.1g}, {int(np.sum(done))}/{len(done)} "
                f"done -> {path}"
            )
    return path


def _agreed(ranks: Ranks, fn: Callable[[], T]) -> T:
    """``fn()`` on this rank, then :meth:`~replay.distributed.Ranks.agree`: raises on every rank
    when ``fn`` failed on any."""
    error = result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - shared with the other ranks, then raised
        error = e
    ranks.agree(error)
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
) -> tuple[list[float], int]:
    """Replay and store the snapshots ``share`` (indices into ``entries``) with a progress bar
    ``label`` (None: none). Returns their error estimates and how many were skipped as corrupt."""
    errors, skipped = [], 0
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
    return errors, skipped


def _check_run(
    run: RunDir, config: ReplayConfig, skip_corrupt: bool
) -> tuple[RunDir, torch.Tensor, torch.Tensor, nn.Module]:
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
    with torch.random.fork_rng(devices=[]):  # building a model draws from the global generator
        try:
            model = build_model(spec.model).eval()
        except RunDirError:
            raise
        except Exception as e:  # noqa: BLE001 - the factory ran on the run's kwargs
            raise RunDirError(
                f"{run.path / 'spec.json'}: model {spec.model.factory!r} cannot be built "
                f"from {spec.model.kwargs} ({type(e).__name__}: {e})"
            ) from None
    weights = list(model.parameters())
    if not weights:
        raise RunDirError(
            f"{run.path / 'spec.json'}: model {spec.model.factory!r} has no parameters to update"
        )
    x = inputs[:1].to(weights[0].dtype) if inputs.is_floating_point() else inputs[:1]
    try:
        with torch.no_grad():
            outputs = model(x)
    except Exception as e:  # noqa: BLE001 - whatever the model raises on inputs it cannot take
        raise RunDirError(
            f"{run.path / 'probes.safetensors'}: probe inputs of shape {tuple(inputs.shape)} and dtype "
            f"{inputs.dtype} do not fit the model {spec.model.factory!r} ({type(e).__name__})"
        ) from None
    if tuple(outputs.shape) != (1, spec.num_outputs):
        raise RunDirError(
            f"{run.path / 'spec.json'}: num_outputs is {spec.num_outputs}, but the model maps a probe "
            f"to outputs of shape {tuple(outputs.shape[1:])}"
        )
    for entry in run.manifest:
        try:
            _load(run, entry, model, config)
            break
        except CorruptSnapshotError:
            if not skip_corrupt:
                raise
    return run, inputs, targets, model


def _load(run: RunDir, entry: SnapshotEntry, model: nn.Module, config: ReplayConfig) -> Snapshot:
    """Read the snapshot of ``entry`` and check that it fits ``model`` (names and shapes of the
    weights), and for the ``recorded`` rule that its optimizer record is one the rule can use
    (state shaped like the parameters, hyperparameters of the right types)."""
    snapshot = run.load_snapshot(entry)
    where = f"{run.path / entry.file} (step {entry.step})"
    check_state_matches(model, snapshot.params, where)
    if config.update.rule == "recorded":
        check_optimizer(snapshot.optimizer, where)
        for group in snapshot.optimizer.groups:
            betas = group.get("betas", (0.0, 0.0))
            if not (
                all(is_number(group[k]) for k in _NUMBERS if k in group)
                and all(isinstance(group[k], bool) for k in _FLAGS if k in group)
                and isinstance(betas, list | tuple)
                and len(betas) == 2
                and all(is_number(b) for b in betas)
            ):
                raise RunDirError(
                    f"{where}: malformed optimizer hyperparameters { ({k: group[k] for k in group if k != 'params'}) }"
                )
        for name, state in snapshot.optimizer.state.items():
            for key in _STATE_KEYS:
                if (
                    key in state
                    and name in snapshot.params
                    and state[key].shape != snapshot.params[name].shape
                ):
                    raise RunDirError(
                        f"{where}: optimizer state {key!r} of {name!r} has shape {tuple(state[key].shape)}, "
                        f"the parameter {tuple(snapshot.params[name].shape)}"
                    )
    return snapshot

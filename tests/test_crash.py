"""Crash safety: the recorder and the replay killed with SIGKILL at random moments, then restarted.

Killed processes are forks of the test process (a fresh interpreter would spend seconds importing
torch), with one thread, and so is every replay here, so that all results are comparable bit for
bit. After every kill, what was written must be intact (listed snapshots identical to an
uninterrupted run's, done snapshots of a store equal to an uninterrupted replay's), and after the
restart the final arrays must equal an uninterrupted run's.
"""

from __future__ import annotations

import multiprocessing
import os
import pathlib
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from recorder import ModelSpec, Recorder, RunDir, RunDirError, Schedule
from recorder.models import build_model
from replay import ReplayConfig, UpdateConfig, replay
from tests.helpers import make_run, wait_for_writers

CONFIG = ReplayConfig(UpdateConfig("recorded"), measures=("orig_probs_l2", "kl", "linear"))
FORK = multiprocessing.get_context("fork")
TRIALS = 6


pytestmark = pytest.mark.usefixtures("one_thread")


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {n: np.asarray(a[...]) for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def assert_done_snapshots_match(path: Path, reference: dict[str, np.ndarray]) -> int:
    """Every snapshot marked done in ``path`` equals ``reference`` in every array; returns how
    many are done (0 when the store does not exist yet)."""
    if not path.exists():
        return 0
    arrays = read_arrays(path)  # readable as a whole: no torn chunk anywhere
    assert arrays.keys() == reference.keys()
    done = np.flatnonzero(arrays["done"])
    for name, values in arrays.items():
        if name == "probe_targets":
            np.testing.assert_array_equal(values, reference[name])
        else:
            np.testing.assert_array_equal(values[done], reference[name][done], err_msg=name)
    return len(done)


def run_forked(target, *args, until=None, delay: float = 0.0) -> int:
    """Run ``target(*args)`` in a fork. With ``until`` (a predicate), SIGKILL it ``delay`` seconds
    after ``until()`` first holds, unless it ended before. Returns its exit code (``-SIGKILL``
    when killed)."""
    proc = FORK.Process(target=target, args=args)
    proc.start()
    if until is not None:
        deadline = time.monotonic() + 120
        while proc.is_alive() and not until() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(timeout=120)
    return proc.exitcode


def done_count(store: Path) -> int:
    """Snapshots marked done in ``store`` now (0 before it exists)."""
    return int(np.sum(zarr.open_group(store, mode="r")["done"][:])) if store.exists() else 0


# ----------------------------------------------------------------------------- replay


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(
        tmp_path_factory.mktemp("crash") / "run", steps=(0, 1, 2, 3, 4, 5), optimizer_cls=torch.optim.AdamW
    )


@pytest.fixture(scope="module")
def reference(run) -> dict[str, np.ndarray]:
    """An uninterrupted replay (which also warms up torch in this process before any fork)."""
    return read_arrays(replay(run, CONFIG, progress=False))


def _replay(run: Path, name: str) -> None:
    replay(run, ReplayConfig(CONFIG.update, measures=CONFIG.measures, name=name), progress=False)


def _replay_killed_at_write(run: Path, name: str, k: int) -> None:
    """Replay, and die by SIGKILL in the ``k``-th file write of zarr: after the temporary file is
    complete, before it is renamed over the chunk (zarr's LocalStore writes ``*.partial`` files
    and renames them with ``Path.replace``)."""
    rename, calls = pathlib.Path.replace, []

    def replace(self, target):
        calls.append(target)
        if len(calls) == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(self, target)

    pathlib.Path.replace = replace
    _replay(run, name)
    os._exit(3)  # the replay ended before its k-th write


@pytest.mark.slow
def test_replay_killed_at_random_moments_resumes_to_the_uninterrupted_result(run, reference):
    name, store = "random-kills", run / "random-kills.zarr"
    rng, num = random.Random(7), len(reference["done"])
    for _ in range(TRIALS):
        done_before = assert_done_snapshots_match(store, reference)
        target = min(num - 1, done_before + rng.randrange(2))  # kill during the next snapshot or two
        code = run_forked(
            _replay, run, name, until=lambda t=target: done_count(store) >= t, delay=rng.uniform(0, 0.05)
        )
        assert code in (0, -signal.SIGKILL)
        assert assert_done_snapshots_match(store, reference) >= done_before  # nothing done was lost
    _replay(run, name)  # the restart
    assert read_arrays(store).keys() == reference.keys()
    for key, values in read_arrays(store).items():
        np.testing.assert_array_equal(values, reference[key], err_msg=key)


@pytest.mark.slow
def test_replay_killed_inside_a_chunk_write_leaves_nothing_half_written(run, reference):
    writes = []
    rename = pathlib.Path.replace
    pathlib.Path.replace = lambda self, target: writes.append(target) or rename(self, target)
    try:
        _replay(run, "count-writes")
    finally:
        pathlib.Path.replace = rename
    assert len(writes) > 40  # zarr still writes through Path.replace (else this test tests nothing)
    rng = random.Random(11)
    for k in sorted(rng.sample(range(1, len(writes) + 1), TRIALS)):
        name = f"kill-at-{k}"
        store = run / f"{name}.zarr"
        assert run_forked(_replay_killed_at_write, run, name, k) == -signal.SIGKILL
        assert assert_done_snapshots_match(store, reference) < len(reference["done"])
        _replay(run, name)  # the restart removes the orphaned temporary files and finishes
        assert not list(store.rglob("*.partial")) and not list(run.glob(f".{name}.zarr.*"))
        for key, values in read_arrays(store).items():
            np.testing.assert_array_equal(values, reference[key], err_msg=f"{key} (killed at write {k})")


def test_a_damaged_done_or_data_chunk_is_recomputed(run, reference):
    """Damage from outside (bytes that no codec decodes) in ``done`` or in an undone snapshot's
    chunk does not make the store unreadable for replay: that snapshot is recomputed."""
    name = "damaged"
    _replay(run, name)
    store = run / f"{name}.zarr"
    (store / "done" / "c" / "2").write_bytes(b"\x28\xb5\x2f\xfd garbage")  # snapshot 2: done unreadable
    (store / "measures" / "kl" / "c" / "2" / "0" / "0").write_bytes(b"")  # and a torn data chunk
    _replay(run, name)
    for key, values in read_arrays(store).items():
        np.testing.assert_array_equal(values, reference[key], err_msg=key)


# ----------------------------------------------------------------------------- recorder


RECORD_STEPS = 20
SPEC = ModelSpec("mlp", {"in_features": 6, "num_outputs": 3, "hidden": [32]})


def _record(run_dir: Path, progress=None) -> None:
    """A deterministic training of RECORD_STEPS Adam steps, a snapshot at every step; the number
    of steps taken goes to ``progress`` (a shared value), if given."""
    torch.manual_seed(0)
    model = build_model(SPEC).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    with Recorder(run_dir, model, optimizer, probes=(x[:9], y[:9]), model_spec=SPEC, task="classification",
                  loss="cross_entropy", schedule=Schedule.every(1)) as rec:  # fmt: skip
        for step in range(1, RECORD_STEPS + 1):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            rec.step(epoch=step // 10, loss=loss.item())
            if progress is not None:
                progress.value = step


def _flat(value) -> list[torch.Tensor]:
    """A tensor, or the tensors of a state dict, as a list."""
    return [value] if isinstance(value, torch.Tensor) else [value[k] for k in sorted(value)]


@pytest.mark.slow
def test_recorder_killed_at_random_moments_keeps_every_listed_snapshot(tmp_path):
    assert run_forked(_record, tmp_path / "reference") == 0
    full = RunDir(tmp_path / "reference")
    assert full.complete
    full_store = read_arrays(replay(full.path, CONFIG, progress=False))
    rng, listed = random.Random(3), []
    for trial in range(TRIALS):
        run_dir = tmp_path / f"killed{trial}"
        steps, target = FORK.Value("i", 0), rng.randrange(RECORD_STEPS - 5)
        code = run_forked(
            _record, run_dir, steps, until=lambda v=steps, t=target: v.value >= t, delay=rng.uniform(0, 0.02)
        )
        assert code in (-signal.SIGKILL, 0)  # 0: it finished before the kill was sent
        wait_for_writers(run_dir)
        if not (run_dir / "manifest.json").exists():
            continue  # killed before the recorder wrote anything
        run = RunDir(run_dir)
        n = len(run.manifest)
        # The manifest says the recording did not finish, unless it finished before the kill
        # landed (a target near the end, a long delay): then it lists every snapshot.
        assert not run.complete or run.manifest == full.manifest
        # The listed snapshots are the uninterrupted run's, byte for byte (equal checksums),
        # intact (checksums verified on load) and equal to its snapshots.
        assert run.manifest == full.manifest[:n]
        for entry, full_entry in zip(run.manifest, full.manifest, strict=False):
            snap, expected = run.load_snapshot(entry), full.load_snapshot(full_entry)
            for a, b in ((snap.params, expected.params), (snap.optimizer.state, expected.optimizer.state)):
                assert a.keys() == b.keys()
                for k in a:
                    assert all(torch.equal(x, y) for x, y in zip(*(_flat(t[k]) for t in (a, b)), strict=True))
            assert snap.optimizer.groups == expected.optimizer.groups
        assert run.metrics() == full.metrics()[: len(run.metrics())]
        # A restart into the same directory is refused and changes nothing.
        before = (run_dir / "manifest.json").read_bytes()
        with pytest.raises(RunDirError, match="already holds a run"):
            _record(run_dir)
        assert (run_dir / "manifest.json").read_bytes() == before
        listed.append(n)
        if n:  # its replay equals the uninterrupted run's on the listed snapshots
            arrays = read_arrays(replay(run_dir, CONFIG, progress=False))
            for key, values in arrays.items():
                expected = full_store[key] if key == "probe_targets" else full_store[key][:n]
                np.testing.assert_array_equal(values, expected, err_msg=key)
    assert max(listed, default=0) > 3  # the kills landed during training

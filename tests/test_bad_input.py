"""Bad input to ``cli.py replay``: each gives a clear one-line error (or, for non-finite weights
and skipped snapshots, a warning), and nothing else is damaged. Untrusted run directories
execute nothing; two replays of one store at once are refused."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from torch import nn

from cli import main
from recorder.models import _REGISTRY
from recorder.rundir.files import sha256
from recorder.rundir.run import RunWriter
from recorder.rundir.spec import ModelSpec, RunSpec
from replay import ReplayWarning
from replay.store import exclusive_writer
from tests.helpers import make_model, make_probes, make_run, run_spec, snapshot

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--measures", "kl,orig_probs_l2", "--no-progress"]


def cli(*args: str):
    return CliRunner().invoke(main, ["replay", *map(str, args), *ARGS])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit status 1, a single ``Error: ...`` line holding every fragment, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def files(run: Path) -> dict[str, bytes]:
    """Every file of a run directory except replay stores and their locks."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in run.rglob("*")
        if p.is_file()
        and not any(part.endswith((".zarr", ".zarr.lock")) for part in p.relative_to(run).parts)
    }


def done_flags(store: Path) -> list[bool]:
    return [bool(d) for d in zarr.open_group(store, mode="r")["done"][:]]


def rewrite_manifest_entry(run: Path, index: int, data: bytes) -> None:
    """Replace a snapshot file and make its manifest entry agree (size and checksum)."""
    manifest = json.loads((run / "manifest.json").read_text())
    entry = manifest["snapshots"][index]
    (run / entry["file"]).write_bytes(data)
    entry.update(bytes=len(data), sha256=sha256(data))
    (run / "manifest.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- damaged snapshots


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:-9]),
    "corrupted": lambda p: p.write_bytes(p.read_bytes()[:-9] + bytes(9)),  # same size, other bytes
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_snapshot_is_named_and_skipped_on_request(tmp_path, damage):
    run = make_run(tmp_path / "run", steps=(0, 1, 2, 3))
    assert cli(run, "--name", "reference").exit_code == 0
    reference = zarr.open_group(run / "reference.zarr", mode="r")
    DAMAGE[damage](run / "snapshots" / "step_00000002.safetensors")
    before = files(run)
    message = (
        "listed in the manifest (step 2) but missing" if damage == "missing" else "checksum mismatch (step 2)"
    )
    assert_one_line_error(cli(run), "step_00000002.safetensors", message, "--skip-corrupt")
    store = run / "adam-fresh.zarr"
    assert done_flags(store) == [True, True, False, False]
    with pytest.warns(ReplayWarning, match=rf"step_00000002\.safetensors: .*{re.escape(message)}.*skipped"):
        result = cli(run, "--skip-corrupt")
    assert result.exit_code == 0, result.output
    assert done_flags(store) == [True, True, False, True]
    group = zarr.open_group(store, mode="r")
    for name in ("measures/kl", "base_outputs", "classpairs/kl/mean"):
        np.testing.assert_array_equal(group[name][[0, 1, 3]], reference[name][[0, 1, 3]])
        assert np.isnan(group[name][2]).all()
    assert files(run) == before  # the run directory itself is untouched


def test_weights_that_do_not_fit_the_spec(tmp_path):
    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "shapes", run_spec("mlp"), x, y)
    wider = nn.Sequential(nn.Flatten(), nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3)).double()
    writer.add_snapshot(snapshot(wider, 0))
    assert_one_line_error(
        cli(tmp_path / "shapes"),
        "step_00000000",
        "weights do not fit the model spec",
        "shape of '1.bias' is (9,)",
    )
    assert not list((tmp_path / "shapes").glob("*.zarr"))  # refused before any store exists

    writer = RunWriter(tmp_path / "names", run_spec("mlp"), x, y)
    model = make_model("mlp")
    writer.add_snapshot(snapshot(model, 0))
    renamed = snapshot(model, 1)
    renamed.params["hidden.weight"] = renamed.params.pop("1.weight")
    writer.add_snapshot(renamed)
    assert_one_line_error(
        cli(tmp_path / "names"), "(step 1)", "missing ['1.weight']", "unexpected ['hidden.weight']"
    )
    assert done_flags(tmp_path / "names" / "adam-fresh.zarr") == [True, False]


def test_optimizer_records_that_the_recorded_rule_cannot_use(tmp_path):
    x, y = make_probes("mlp")
    model = make_model("mlp")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(x).sum().backward()
    optimizer.step()
    for case in ("state", "hyperparameters"):
        writer = RunWriter(tmp_path / case, run_spec("mlp", optimizer="Adam"), x, y)
        snap = snapshot(model, 0, optimizer)
        if case == "state":
            snap.optimizer.state["1.weight"]["exp_avg"] = torch.zeros(3)
        else:
            snap.optimizer.groups[0]["lr"] = "0.01; import os"
        writer.add_snapshot(snap)
        expected = (
            "optimizer state 'exp_avg' of '1.weight' has shape (3,)" if case == "state" else "'lr': '0.01"
        )
        assert_one_line_error(cli(tmp_path / case, "--update", "recorded"), "(step 0)", expected)
        assert not list((tmp_path / case).glob("*.zarr"))


def test_probes_or_outputs_that_do_not_fit_the_model(tmp_path):
    model = make_model("mlp")
    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "inputs", run_spec("mlp"), x[:, :5], y)
    writer.add_snapshot(snapshot(model, 0))
    assert_one_line_error(
        cli(tmp_path / "inputs"), "probes.safetensors", "[9, 5]", "do not fit the model 'mlp'"
    )

    spec = RunSpec(ModelSpec("mlp", {"in_features": 6, "num_outputs": 3, "hidden": [8]}), "classification",
                   "cross_entropy", num_outputs=4)  # fmt: skip
    writer = RunWriter(tmp_path / "outputs", spec, x, y)
    writer.add_snapshot(snapshot(model, 0))
    assert_one_line_error(cli(tmp_path / "outputs"), "num_outputs is 4", "shape (3,)")


def test_non_finite_weights_give_nan_measures_and_a_warning(tmp_path):
    model = make_model("mlp")
    writer = RunWriter(tmp_path / "run", run_spec("mlp"), *make_probes("mlp"))
    writer.add_snapshot(snapshot(model, 0))
    for step, value in ((1, float("nan")), (2, float("inf"))):
        broken = snapshot(model, step)
        broken.params["3.bias"][0] = value
        writer.add_snapshot(broken)
    writer.add_snapshot(snapshot(model, 3))
    with pytest.warns(ReplayWarning, match="step [12]: non-finite weights in .*3.bias"):
        result = cli(tmp_path / "run")
    assert result.exit_code == 0, result.output
    group = zarr.open_group(tmp_path / "run" / "adam-fresh.zarr", mode="r")
    assert group["done"][:].all()
    kl = group["measures/kl"][:]
    assert np.isnan(kl[1:3]).all() and np.isfinite(kl[[0, 3]]).all()


def test_empty_probe_set_and_single_class(tmp_path):
    model = make_model("mlp")
    writer = RunWriter(
        tmp_path / "empty",
        run_spec("mlp"),
        torch.zeros(0, 6, dtype=torch.float64),
        torch.zeros(0, dtype=torch.int64),
    )
    writer.add_snapshot(snapshot(model, 0))
    assert_one_line_error(cli(tmp_path / "empty"), "probes.safetensors: the probe set is empty")

    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "one", run_spec("mlp"), x, torch.ones_like(y))
    writer.add_snapshot(snapshot(model, 0))
    with pytest.warns(ReplayWarning, match="every probe is of class 1.*class-pair analyses.*undefined"):
        assert cli(tmp_path / "one").exit_code == 0


def test_analyze_says_so_for_a_single_class(tmp_path):
    x, y = make_probes("mlp")
    writer = RunWriter(tmp_path / "one", run_spec("mlp"), x, torch.ones_like(y))
    writer.add_snapshot(snapshot(make_model("mlp"), 0))
    with pytest.warns(ReplayWarning):
        cli(tmp_path / "one")
    result = CliRunner().invoke(main, ["analyze", str(tmp_path / "one")])
    assert "single class" in result.output or "one class" in result.output


# ----------------------------------------------------------------------------- run directories


def test_missing_or_not_a_directory(tmp_path):
    assert_one_line_error(cli(tmp_path / "nothing"), "no such run directory")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(cli(tmp_path / "file"), "not a directory")


def _drop_permission_override() -> None:
    """In the child, before it executes: take CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) out
    of the capability bounding set (PR_CAPBSET_DROP, 24), as ``setpriv --bounding-set`` does, so
    root's program runs without them and file permissions apply to it (Linux)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for capability in (1, 2):
        if prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def replay_without_override(*paths: Path) -> list[str]:
    """The output of ``cli.py replay PATH`` for each path, in a process that cannot override file
    permissions (root can: it runs without CAP_DAC_OVERRIDE), so that chmod applies."""
    script = (
        "import json, sys; from click.testing import CliRunner; from cli import main\n"
        "print(json.dumps([CliRunner().invoke(main, ['replay', p, '--no-progress']).output for p in sys.argv[1:]]))"
    )
    command = [sys.executable, "-c", script, *map(str, paths)]
    drop = _drop_permission_override if os.geteuid() == 0 else None
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, preexec_fn=drop)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_read_only_run_directory_or_unreadable_spec(tmp_path):
    read_only, unreadable = (
        make_run(tmp_path / "read_only", steps=(0,)),
        make_run(tmp_path / "spec", steps=(0,)),
    )
    before = files(read_only)
    read_only.chmod(0o555)
    (unreadable / "spec.json").chmod(0o000)
    try:
        outputs = replay_without_override(read_only, unreadable)
    finally:
        read_only.chmod(0o755)
        (unreadable / "spec.json").chmod(0o644)
    assert outputs[0].startswith(f"Error: {read_only}: cannot write the replay store adam-fresh.zarr there")
    assert "writable" in outputs[0] and outputs[0].count("\n") == 1
    assert files(read_only) == before and not list(read_only.glob("*.zarr*"))
    assert (
        outputs[1].startswith(f"Error: {unreadable / 'spec.json'}: unreadable")
        and outputs[1].count("\n") == 1
    )


@pytest.mark.slow
def test_unreadable_run_directory(tmp_path):
    run = make_run(tmp_path / "run", steps=(0,))
    run.chmod(0o000)
    try:
        (output,) = replay_without_override(run)
    finally:
        run.chmod(0o755)
    assert output == f"Error: {run}: run directory is not readable\n"


# ----------------------------------------------------------------------------- the lock


def _hold_lock(store: Path, locked) -> None:
    with exclusive_writer(store):
        locked.set()
        signal.pause()


def test_a_second_replay_of_a_store_is_refused_until_the_first_ends(tmp_path):
    run = make_run(tmp_path / "run", steps=(0, 1))
    store = run / "adam-fresh.zarr"
    with exclusive_writer(store):  # as a replay running now would
        line = assert_one_line_error(cli(run), f"{store}: another replay (pid {os.getpid()} on ", "--name")
    assert "is writing this store now" in line and not store.exists()
    assert cli(run, "--name", "other").exit_code == 0  # other stores of the run are free

    fork = multiprocessing.get_context("fork")  # a replay process killed while it holds the lock
    locked = fork.Event()
    holder = fork.Process(target=_hold_lock, args=(store, locked))
    holder.start()
    assert locked.wait(30)
    assert_one_line_error(cli(run), f"(pid {holder.pid} on ")
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert cli(run).exit_code == 0  # the kernel released the lock of the dead process
    assert done_flags(store) == [True, True]


# ----------------------------------------------------------------------------- untrusted input


class _Payload:
    """Unpickling this creates the marker file: code planted in a run directory."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PLANTED-CODE-RAN"
    yield path
    assert not path.exists(), "code planted in a run directory was executed"


def test_code_planted_in_the_spec_does_not_run(tmp_path, marker):
    x, y = make_probes("mlp")
    plants = {
        "os:system": {"command": f"touch {marker}"},
        "subprocess:run": {"args": ["touch", str(marker)]},
        "mlp": {
            "in_features": 6,
            "num_outputs": 3,
            "activation": f"__import__('os').system('touch {marker}')",
        },
    }
    for k, (factory, kwargs) in enumerate(plants.items()):
        run = tmp_path / f"run{k}"
        writer = RunWriter(
            run, RunSpec(ModelSpec(factory, kwargs), "classification", "cross_entropy", 3), x, y
        )
        writer.add_snapshot(snapshot(make_model("mlp"), 0))
        expected = "rejected its arguments" if factory == "mlp" else f"{factory!r} is not registered"
        assert_one_line_error(cli(run), expected)


def test_pickles_planted_in_the_run_directory_are_not_loaded(tmp_path, marker):
    payload = pickle.dumps({"inputs": _Payload(marker)})
    run = make_run(tmp_path / "snapshot", steps=(0, 1))
    rewrite_manifest_entry(run, 1, payload)  # checksum right, content a pickle
    assert_one_line_error(cli(run), "step_00000001.safetensors: not a readable safetensors file")

    run = make_run(tmp_path / "probes", steps=(0,))
    (run / "probes.safetensors").write_bytes(payload)
    assert_one_line_error(cli(run), "probes.safetensors: not a readable safetensors file")

    run = make_run(tmp_path / "store", steps=(0,))
    store = run / "adam-fresh.zarr"  # a zarr v2 store whose chunk is a pickle (numcodecs' pickle codec)
    (store / "done").mkdir(parents=True)
    (store / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (store / ".zattrs").write_text(json.dumps({"config": {}}))
    (store / "done" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [1], "chunks": [1], "dtype": "|O", "compressor": None, "fill_value": None,
        "filters": [{"id": "pickle", "protocol": 2}], "order": "C",
    }))  # fmt: skip
    (store / "done" / "0").write_bytes(pickle.dumps(np.array([_Payload(marker)], dtype=object)))
    assert_one_line_error(cli(run), f"{store}: exists but is not a replay store")


def test_no_code_path_unpickles_or_evaluates():
    """The packages that read run directories and stores hold no pickle, torch.load, eval or exec;
    the only import by name is :func:`recorder.models.load_external_factory` (``--allow-factory``)."""
    sources = [p for package in ("recorder", "replay", "analyses") for p in (ROOT / package).rglob("*.py")]
    sources = [p for p in sources if p.name != "fake_vision.py"]  # writes CIFAR's pickled format for tests
    banned = re.compile(
        r"^\s*(import|from)\s+(pickle|cloudpickle|dill|marshal|shelve)\b"  # the modules
        r"|\b(torch|np|numpy)\.load\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
        r"|_object(_list)?\("  # torch.distributed's pickling collectives
        r"|(?<![.\w])(eval|exec|__import__)\(",
        re.MULTILINE,
    )
    for path in sources:
        text = path.read_text()
        found = banned.search(text)
        assert found is None, f"{path.relative_to(ROOT)}: {found.group()}"
        if "import_module" in text:
            assert path == ROOT / "recorder" / "models.py", path


def custom_tiny_mlp(in_features: int, num_outputs: int) -> nn.Module:
    """A factory outside the registry, importable as ``tests.test_bad_input:custom_tiny_mlp``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 8), nn.ReLU(), nn.Linear(8, num_outputs))


def test_a_factory_outside_the_registry_needs_allow_factory(tmp_path, monkeypatch):
    monkeypatch.setattr("recorder.models._REGISTRY", dict(_REGISTRY))  # registrations end with the test
    x, y = make_probes("mlp")
    spec = RunSpec(
        ModelSpec("custom_tiny_mlp", {"in_features": 6, "num_outputs": 3}),
        "classification",
        "cross_entropy",
        3,
    )
    writer = RunWriter(tmp_path / "run", spec, x, y)
    writer.add_snapshot(snapshot(make_model("mlp"), 0))  # same layout as mlp with hidden [8]
    assert_one_line_error(cli(tmp_path / "run"), "'custom_tiny_mlp' is not registered", "--allow-factory")
    result = cli(tmp_path / "run", "--allow-factory", "tests.test_bad_input:custom_tiny_mlp")
    assert result.exit_code == 0, result.output
    result = cli(tmp_path / "run", "--allow-factory", "no_such_module_xyz:f")
    assert result.exit_code == 2 and "--allow-factory" in result.output

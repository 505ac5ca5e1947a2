"""The run-directory format: a written run reads back exactly; damaged runs give RunDirError."""

from __future__ import annotations

import json

import pytest
import torch

from recorder.runfiles import (
    ModelSpec,
    OptimizerRecord,
    RunDir,
    RunDirError,
    RunSpec,
    RunWriter,
    Snapshot,
)

SPEC = RunSpec(
    model=ModelSpec("mlp", {"in_features": 4, "num_outputs": 3, "hidden": [5]}),
    task="classification",
    loss="cross_entropy",
    num_outputs=3,
    optimizer="AdamW",
    seed=3,
    versions={"torch": torch.__version__},
    extra={"note": "round trip"},
)


def _snapshot(step: int) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    return Snapshot(
        step=step,
        params={
            "1.weight": torch.randn(5, 4, generator=g),
            "1.bias": torch.randn(5, generator=g, dtype=torch.float64),
        },
        buffers={"counter": torch.tensor(step, dtype=torch.int64)},
        optimizer=OptimizerRecord(
            type="AdamW",
            groups=[{"lr": 0.01, "betas": [0.9, 0.999], "amsgrad": True, "params": ["1.weight", "1.bias"]}],
            state={
                "1.weight": {"exp_avg": torch.randn(5, 4, generator=g), "step": torch.tensor(float(step))}
            },
        ),
    )


@pytest.fixture
def run_path(tmp_path):
    path = tmp_path / "run"
    writer = RunWriter(path, SPEC, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    for step in (0, 3):
        writer.add_snapshot(
            _snapshot(step), epoch=step // 2, lr=0.01 * (step + 1), metrics={"loss": 1.0 / (step + 1)}
        )
    writer.log_metrics({"step": 1, "loss": 0.5}, {"step": 2, "loss": float("inf")})
    return path


def test_round_trip(run_path):
    run = RunDir(run_path)
    assert run.spec == SPEC
    assert [(e.step, e.epoch, e.lr, e.metrics) for e in run.manifest] == [
        (0, 0, 0.01, {"loss": 1.0}),
        (3, 1, 0.04, {"loss": 0.25}),
    ]
    for entry in run.manifest:
        snap, kept = run.load_snapshot(entry), _snapshot(entry.step)
        for stored, original in ((snap.params, kept.params), (snap.buffers, kept.buffers)):
            assert stored.keys() == original.keys()
            assert all(
                stored[k].dtype == original[k].dtype and torch.equal(stored[k], original[k]) for k in original
            )
        assert snap.optimizer.type == "AdamW" and snap.optimizer.groups == kept.optimizer.groups
        for key, value in kept.optimizer.state["1.weight"].items():
            assert torch.equal(snap.optimizer.state["1.weight"][key], value)
        assert snap.nonfinite == []
    inputs, targets = run.probes()
    assert inputs.shape == (6, 4) and targets.tolist() == [0, 1, 2, 0, 1, 2]
    assert run.metrics() == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}]


def test_a_torn_metrics_line_is_skipped(run_path):
    with open(run_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in RunDir(run_path).metrics()] == [1, 2]


def test_writer_refuses_an_existing_run(run_path):
    with pytest.raises(RunDirError, match="already holds a run"):
        RunWriter(run_path, SPEC, torch.randn(6, 4), torch.zeros(6, dtype=torch.int64))


def test_missing_directory(tmp_path):
    with pytest.raises(RunDirError, match="no such run directory"):
        RunDir(tmp_path / "nope")


def test_directory_without_spec(tmp_path):
    with pytest.raises(RunDirError, match=r"no spec\.json"):
        RunDir(tmp_path)


@pytest.mark.parametrize("name", ["spec.json", "manifest.json"])
def test_malformed_json(run_path, name):
    (run_path / name).write_text('{"task": "classification",')
    with pytest.raises(RunDirError, match=rf"{name}: not valid JSON"):
        RunDir(run_path)


def test_spec_with_a_bad_field(run_path):
    spec = json.loads((run_path / "spec.json").read_text())
    (run_path / "spec.json").write_text(json.dumps({**spec, "loss": "hinge"}))
    with pytest.raises(RunDirError, match="loss 'hinge'"):
        RunDir(run_path)
    del spec["task"]
    (run_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(RunDirError, match="missing field 'task'"):
        RunDir(run_path)


def test_truncated_snapshot(run_path):
    run = RunDir(run_path)
    path = run_path / run.manifest[1].file
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(RunDirError, match="checksum mismatch"):
        run.load_snapshot(run.manifest[1])
    with pytest.raises(RunDirError, match="not a readable safetensors file"):
        run.load_snapshot(run.manifest[1], verify=False)
    assert run.load_snapshot(run.manifest[0]).step == 0  # the others still read


def test_manifest_entry_without_file(run_path):
    run = RunDir(run_path)
    (run_path / run.manifest[0].file).unlink()
    with pytest.raises(RunDirError, match=r"listed in the manifest \(step 0\) but missing"):
        run.load_snapshot(run.manifest[0])


def test_manifest_entry_outside_the_run(run_path):
    manifest = json.loads((run_path / "manifest.json").read_text())
    manifest["snapshots"][0]["file"] = "../elsewhere.safetensors"
    (run_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="points outside the run directory"):
        RunDir(run_path)

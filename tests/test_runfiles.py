"""The run-directory format: a written run reads back exactly; damaged runs give RunDirError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from recorder.rundir.errors import RunDirError
from recorder.rundir.run import RunDir, RunWriter
from recorder.rundir.snapshot import (
    OptimizerRecord,
    Snapshot,
    SnapshotLayout,
    decode_snapshot,
    encode_snapshot,
)
from recorder.rundir.spec import ModelSpec, RunSpec
from recorder.rundir.trajectory import TrajectoryWriter

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


# ----------------------------------------------------------------------------- the encoder


def test_every_dtype_and_shape_encodes_as_the_safetensors_library_reads_it(tmp_path):
    """Our encoder (tensors laid out by hand so the recorder can stage into the file's bytes)
    against the reference implementation: the library's decoder reads back every tensor exactly,
    and the library's own encoder stores the same tensors."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "params.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "params.f32_scalar": torch.tensor(1.5),
        "params.bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "params.f16_t": torch.randn(3, 5, generator=g).to(torch.float16).t(),  # not contiguous
        "params.empty": torch.zeros(0, 4),
        "buffers.i64": torch.tensor([-(2**62), 7]),
        "buffers.i32": torch.arange(3, dtype=torch.int32),
        "buffers.i16": torch.arange(5, dtype=torch.int16),
        "buffers.i8": torch.tensor([-3], dtype=torch.int8),
        "buffers.u8": torch.arange(7, dtype=torch.uint8),
        "buffers.flag": torch.tensor([True, False, True]),
    }
    snap = Snapshot(
        step=11,
        params={k[7:]: v for k, v in tensors.items() if k.startswith("params.")},
        buffers={k[8:]: v for k, v in tensors.items() if k.startswith("buffers.")},
        optimizer=None,
    )
    data = encode_snapshot(snap)
    ours, theirs = st_load(data), st_load(st_save({k: v.contiguous() for k, v in tensors.items()}))
    assert ours.keys() == theirs.keys() == tensors.keys()
    for name, t in tensors.items():
        assert ours[name].dtype == t.dtype and ours[name].shape == t.shape
        assert torch.equal(ours[name], t) and torch.equal(theirs[name], t)
    path = tmp_path / "snap.safetensors"
    path.write_bytes(data)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"step": "11", "format": "1"}
    header = int.from_bytes(data[:8], "little")
    assert header % 8 == 0
    assert len(data) - 8 - header == sum(t.numel() * t.element_size() for t in tensors.values())
    assert decode_snapshot(data, "x").step == 11


def test_layout_offsets_keep_every_view_aligned():
    tensors = {"a": torch.zeros(3, dtype=torch.uint8), "b": torch.zeros(1, dtype=torch.float64),
               "c": torch.zeros(3, dtype=torch.int16), "d": torch.zeros(2, dtype=torch.float32)}  # fmt: skip
    layout = SnapshotLayout.of(tensors)
    assert [n for n, _ in sorted(layout.tensors.items(), key=lambda kv: kv[1][2])] == ["b", "d", "c", "a"]
    assert layout.nbytes == 8 + 8 + 6 + 3
    payload = torch.zeros(layout.nbytes, dtype=torch.uint8)
    views = layout.views(payload)
    views["d"].copy_(torch.tensor([1.0, 2.0]))
    assert torch.equal(payload[8:16].view(torch.float32), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="cannot store"):
        SnapshotLayout.of({"z": torch.zeros(2, dtype=torch.complex64)})


def test_snapshots_are_listed_only_once_committed(tmp_path):
    RunWriter(tmp_path / "run", SPEC, torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
    trajectory = TrajectoryWriter(tmp_path / "run")
    trajectory.add_snapshot(0, [encode_snapshot(_snapshot(0))])
    trajectory.log_metrics({"step": 0, "loss": 1.0})
    assert RunDir(tmp_path / "run").manifest == []  # written, not yet durable: not listed
    assert (tmp_path / "run" / "snapshots" / "step_00000000.safetensors").exists()
    trajectory.commit()
    trajectory.add_snapshot(4, [encode_snapshot(_snapshot(4))])
    trajectory.commit(trajectory.take_uncommitted())
    run = RunDir(tmp_path / "run")
    assert [e.step for e in run.manifest] == [0, 4]
    assert run.load_snapshot(run.manifest[1]).step == 4
    assert run.metrics() == [{"step": 0, "loss": 1.0}]
    with pytest.raises(ValueError, match="not after"):
        trajectory.add_snapshot(4, [b""])

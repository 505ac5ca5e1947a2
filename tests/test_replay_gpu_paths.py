"""The GPU paths of replay and of the recorder's benchmark, checked on the CPU: the TF32 guard and
cuDNN's determinism (process settings that need no GPU), each rank's GPU and the memory budget the
ranks agree on (``torch.cuda.device_count`` and the torchrun environment faked), the recorded
optimizer state moved to the replay device once a pass, and the overhead benchmark's disk use."""

from __future__ import annotations

import math
import shutil
import socket
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr

import recorder.bench
import replay.engine
import replay.precision
import replay.run
import replay.updates
from recorder.recorder import Recorder
from recorder.rundir.errors import ReplayError, ReplayWarning
from recorder.rundir.run import RunDir
from recorder.rundir.snapshot import OptimizerRecord
from replay import ReplayConfig, UpdateConfig
from replay.distributed import Ranks, join
from replay.engine import Engine
from replay.precision import deterministic_cudnn, ieee_float32, no_tf32
from tests.helpers import make_run

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing here runs on it
BACKENDS = torch.backends

# ----------------------------------------------------------------------------- TF32 and cuDNN

# Every fp32_precision setting, parents before children, so that writing them back restores all.
PRECISION_OWNERS = (
    BACKENDS,
    BACKENDS.cudnn,
    BACKENDS.cuda.matmul,
    BACKENDS.cudnn.conv,
    BACKENDS.cudnn.rnn,
    BACKENDS.mkldnn,
    BACKENDS.mkldnn.matmul,
    BACKENDS.mkldnn.conv,
    BACKENDS.mkldnn.rnn,
)
READINGS = {
    "fp32_precision": lambda: BACKENDS.fp32_precision,
    "cuda": lambda: BACKENDS.cudnn.fp32_precision,
    "matmul": lambda: BACKENDS.cuda.matmul.fp32_precision,
    "conv": lambda: BACKENDS.cudnn.conv.fp32_precision,
    "rnn": lambda: BACKENDS.cudnn.rnn.fp32_precision,
    "mkldnn": lambda: BACKENDS.mkldnn.fp32_precision,
    "mkldnn.matmul": lambda: BACKENDS.mkldnn.matmul.fp32_precision,
    "mkldnn.conv": lambda: BACKENDS.mkldnn.conv.fp32_precision,
    "float32_matmul_precision": torch.get_float32_matmul_precision,
    "matmul.allow_tf32": lambda: BACKENDS.cuda.matmul.allow_tf32,
    "cudnn.allow_tf32": lambda: BACKENDS.cudnn.allow_tf32,
}
# A user's settings before a replay (torch 2.9 on: the new ones make reading the old flags raise).
STARTING_STATES = {
    "defaults": lambda: None,
    "matmul ieee, conv tf32": lambda: (
        setattr(BACKENDS.cuda.matmul, "fp32_precision", "ieee"),
        setattr(BACKENDS.cudnn.conv, "fp32_precision", "tf32"),
    ),
    "cudnn tf32, matmul ieee": lambda: (
        setattr(BACKENDS.cudnn, "fp32_precision", "tf32"),
        setattr(BACKENDS.cuda.matmul, "fp32_precision", "ieee"),
    ),
    "set_float32_matmul_precision medium": lambda: torch.set_float32_matmul_precision("medium"),
    "everything tf32": lambda: setattr(BACKENDS, "fp32_precision", "tf32"),
    "old flags on": lambda: (
        setattr(BACKENDS.cuda.matmul, "allow_tf32", True),
        setattr(BACKENDS.cudnn, "allow_tf32", True),
    ),
}


def settings() -> dict[str, object]:
    """Every reading of the float32 settings ("raises" where reading raises)."""
    readings: dict[str, object] = {}
    for name, read in READINGS.items():
        try:
            readings[name] = read()
        except RuntimeError:
            readings[name] = "raises"
    return readings


@pytest.fixture
def restored_settings():
    """The process's float32 and cuDNN settings as they were before the test, after it."""
    saved = [owner.fp32_precision for owner in PRECISION_OWNERS]
    cudnn = BACKENDS.cudnn.deterministic, BACKENDS.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision("highest")  # the legacy setting, then every new one
    for owner, value in zip(PRECISION_OWNERS, saved, strict=True):
        owner.fp32_precision = value
    BACKENDS.cudnn.deterministic, BACKENDS.cudnn.benchmark = cudnn


@pytest.mark.parametrize("state", STARTING_STATES)
def test_no_tf32_makes_every_cuda_operation_ieee_and_restores_the_users_settings(state, restored_settings):
    STARTING_STATES[state]()
    before = settings()
    with no_tf32(CUDA):
        inside = settings()
    assert settings() == before
    assert {inside[k] for k in ("matmul", "conv", "rnn")} == {"ieee"}
    if before["float32_matmul_precision"] != "raises":
        assert torch.get_float32_matmul_precision() == before["float32_matmul_precision"]


def test_no_tf32_uses_the_old_flags_on_a_torch_without_fp32_precision(restored_settings, monkeypatch):
    monkeypatch.setattr(replay.precision, "FP32_PRECISION", False)
    BACKENDS.cudnn.allow_tf32 = True
    with ieee_float32():
        assert not BACKENDS.cuda.matmul.allow_tf32 and not BACKENDS.cudnn.allow_tf32
    assert BACKENDS.cudnn.allow_tf32 and not BACKENDS.cuda.matmul.allow_tf32


def test_no_tf32_leaves_a_cpu_replay_alone(restored_settings):
    STARTING_STATES["cudnn tf32, matmul ieee"]()
    before = settings()
    with no_tf32(CPU):
        assert settings() == before


def test_replay_runs_cudnn_deterministic_and_restores_it(tmp_path, restored_settings, monkeypatch):
    seen = []

    def spy(run_dir, config, ranks, progress, skip_corrupt):
        seen.append((BACKENDS.cudnn.deterministic, BACKENDS.cudnn.benchmark))
        return run_dir

    monkeypatch.setattr(replay.run, "_replay", spy)
    BACKENDS.cudnn.deterministic, BACKENDS.cudnn.benchmark = False, True
    replay.run.replay(tmp_path, ReplayConfig(), progress=False)
    assert seen == [(True, False)]
    assert (BACKENDS.cudnn.deterministic, BACKENDS.cudnn.benchmark) == (False, True)
    with deterministic_cudnn():
        assert BACKENDS.cudnn.deterministic and not BACKENDS.cudnn.benchmark


# ----------------------------------------------------------------------------- ranks and GPUs


@pytest.mark.parametrize(
    ("visible", "local_rank", "device", "placed"),
    [
        (1, 3, "cuda", "cuda:0"),  # one GPU a process (SLURM's per-task CUDA_VISIBLE_DEVICES)
        (4, 3, "cuda", "cuda:3"),  # every process sees the node's GPUs
        (2, 3, "cuda", "cuda:1"),  # more ranks than GPUs: dealt round
        (4, 3, "cuda:1", "cuda:1"),  # an explicit ordinal is kept
        (4, 3, "cpu", "cpu"),
    ],
)
def test_a_plain_cuda_maps_each_rank_to_a_gpu_it_sees(monkeypatch, visible, local_rank, device, placed):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert Ranks(local_rank=local_rank, device=CPU).place(device) == placed
    assert Ranks(local_rank=local_rank).place(device) == device  # one process: as given


def torchrun_environment(monkeypatch, local_rank: int, local_world_size: int) -> None:
    """The variables torchrun sets for one of ``local_world_size`` ranks on a node."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": str(local_rank),
        "WORLD_SIZE": str(local_world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def no_gpu(device: torch.device) -> None:
    raise RuntimeError("no GPU here")


def test_an_explicit_ordinal_shared_by_the_ranks_of_a_node_is_named(monkeypatch):
    torchrun_environment(monkeypatch, local_rank=1, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    with (
        pytest.warns(ReplayWarning, match=r"each of the 2 ranks on this node replays on cuda:0 .* share one"),
        pytest.raises(ReplayError, match="cannot join the torchrun job on cuda:0"),
        join("cuda:0"),
    ):
        pass


@pytest.mark.filterwarnings("error::recorder.rundir.errors.ReplayWarning")
@pytest.mark.parametrize(("visible", "device", "target"), [(2, "cuda", "cuda:1"), (1, "cuda:0", "cuda:0")])
def test_a_plain_cuda_or_one_gpu_a_process_gives_no_warning(monkeypatch, visible, device, target):
    torchrun_environment(monkeypatch, local_rank=1, local_world_size=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    with pytest.raises(ReplayError, match=f"cannot join the torchrun job on {target}"), join(device):
        pass


@dataclass(frozen=True)
class PeerWithLessMemory(Ranks):
    """One rank beside a peer whose every number in a "min" reduction is ``peer`` (a smaller
    memory budget; a longer manifest), keeping the reductions."""

    peer: int = 0
    reductions: list = field(default_factory=list)

    def reduce(self, values, op):
        self.reductions.append((list(values), op))
        return [min(v, self.peer) for v in values] if op == "min" else list(values)


def read_store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return {n: np.asarray(a[...]) for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def test_the_ranks_plan_the_blocks_of_the_smallest_memory_budget(tmp_path, monkeypatch, one_thread):
    run = make_run(tmp_path / "run", steps=(0, 2), per_class=4)
    config = ReplayConfig(measures=("kl", "orig_logits_l2"), precision="float64", name="ranks")
    peer = 30_000  # bytes: a few of the 12 probes a block
    engines, own = [], []

    class Spy(Engine):
        def __init__(self, *args):
            super().__init__(*args)
            engines.append(self)
            own.append(self.budget)  # this rank's default budget: its free memory

    monkeypatch.setattr(replay.run, "Engine", Spy)
    ranks = PeerWithLessMemory(peer=peer)
    replay.run._replay(run, config, ranks, progress=False, skip_corrupt=False)
    (engine,) = engines
    assert own[0] > peer and engine.budget == peer and 1 < engine.rows_per_chunk("float64") < 12
    assert [op for values, op in ranks.reductions if own[0] in values] == ["min"]  # reduced once

    single = replay.run.replay(
        run, ReplayConfig(measures=config.measures, precision="float64", memory_budget=peer), progress=False
    )
    expected, arrays = read_store(single), read_store(run / "ranks.zarr")
    assert arrays.keys() == expected.keys()
    for name, values in arrays.items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


# ----------------------------------------------------------------------------- recorded optimizer state


def param_shaped_state(record: OptimizerRecord) -> list[torch.Tensor]:
    return [t for state in record.state.values() for k, t in state.items() if k != "step"]


def test_recorded_state_moves_to_the_device_once_a_snapshot_not_once_a_block(
    tmp_path, monkeypatch, one_thread
):
    run = RunDir(make_run(tmp_path / "run", steps=(0, 3), optimizer_cls=torch.optim.AdamW, per_class=4))
    config = ReplayConfig(
        UpdateConfig("recorded"), measures=("kl",), precision="float64", memory_budget=30_000
    )
    engine = Engine(run.spec, *run.probes(), config)
    assert engine.rows_per_chunk("float64") < 6  # several blocks of the 12 probes
    snapshot = run.load_snapshot(run.manifest[-1])
    state = {id(t): t for t in param_shaped_state(snapshot.optimizer)}
    copies = []
    to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        result = to(self, *args, **kwargs)
        if id(self) in state and result is not self:
            copies.append(result.data_ptr())
            state[id(result)] = result  # a copy of a state tensor is one too
        return result

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    result = engine.replay_snapshot(snapshot)
    assert len(copies) == len(param_shaped_state(snapshot.optimizer))

    # Bit for bit what each block's own fresh copies gave.
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(replay.engine, "record_on_device", lambda config, snapshot, device, dtype: snapshot)
    monkeypatch.setattr(
        replay.updates,
        "_state",
        lambda s, key, w: s[key].to(w, copy=True) if key in s else torch.zeros_like(w),
    )
    per_block = engine.replay_snapshot(snapshot)
    for name in ("base_outputs", "probe_loss", "update_norm", "amplification"):
        assert torch.equal(getattr(result, name), getattr(per_block, name)), name
    assert all(torch.equal(result.measures[k], per_block.measures[k]) for k in result.measures)


def test_record_on_device_leaves_rules_without_state_alone(tmp_path):
    run = RunDir(make_run(tmp_path / "run", steps=(0, 1)))
    snapshot = run.load_snapshot(run.manifest[-1])
    same = replay.updates.record_on_device(UpdateConfig("adam-fresh"), snapshot, CPU, torch.float32)
    assert same is snapshot
    moved = replay.updates.record_on_device(UpdateConfig("recorded"), snapshot, CPU, torch.float32)
    for name, state in moved.optimizer.state.items():
        assert state["step"] is snapshot.optimizer.state[name]["step"]
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].dtype == torch.float32
            assert state[key].data_ptr() != snapshot.optimizer.state[name][key].data_ptr()


# ----------------------------------------------------------------------------- the recorder's overhead


def test_recorder_overhead_deletes_each_blocks_snapshots_and_separates_staging_from_the_rest(
    tmp_path, monkeypatch
):
    snapshots = tmp_path / "run" / "snapshots"
    on_disk = []
    step = Recorder.step

    def counting_step(self, *args, **kwargs):
        on_disk.append(len(list(snapshots.glob("*.safetensors"))))
        step(self, *args, **kwargs)

    monkeypatch.setattr(Recorder, "step", counting_step)
    monkeypatch.setattr(tempfile, "TemporaryDirectory", lambda: nullcontext(str(tmp_path)))
    result = recorder.bench.recorder_overhead(CPU, steps=18, rounds=2)
    listed = RunDir(tmp_path / "run").manifest
    assert [e.step for e in listed] == list(range(0, 3 * 18 + 1, 9))  # 3 recorded blocks of 2
    assert max(on_disk) <= 2 and not list(snapshots.glob("*"))  # never more than one block's
    assert result["steps"] == 18 and result["rounds"] == 2 and result["snapshot_bytes"] > 0
    assert 0 < result["inside_step"] < 1 and math.isfinite(result["outside_step"])
    assert result["write_seconds"] >= 0 and -1 < result["overhead"]


def test_recorder_overhead_blocks_fit_half_the_free_disk(monkeypatch):
    snapshot = 100 << 20
    assert recorder.bench.steps_that_fit(90, snapshot, 1 << 40) == 90
    assert recorder.bench.steps_that_fit(90, snapshot, 8 * snapshot) == 27  # 3 snapshots, and the one before
    with pytest.raises(OSError, match="too little"):
        recorder.bench.steps_that_fit(90, snapshot, 3 * snapshot)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1 << 10))
    with pytest.raises(OSError, match="free disk, too little"):
        recorder.bench.recorder_overhead(CPU, steps=18, rounds=1)

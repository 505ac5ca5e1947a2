"""Distributed replay: torchrun with 2 CPU ranks (gloo) gives the single-process store bit for
bit; a failing rank stops every rank with its message; the rank helpers in one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from replay import ReplayConfig, ReplayError, UpdateConfig, replay
from replay.distributed import Ranks, join
from tests.helpers import make_run

ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("orig_logits_l2", "orig_probs_l2", "kl", "seed_kl", "linear")


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node RANKS cli.py replay ARGS`` (one thread a rank)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [*command, str(ROOT / "cli.py"), "replay", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


def read_store(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    group = zarr.open_group(path, mode="r")
    arrays = {n: np.asarray(a[...]) for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}
    return arrays, dict(group.attrs)




@pytest.mark.slow
def test_two_cpu_ranks_give_the_single_process_store_bit_for_bit(tmp_path, one_thread):
    run = make_run(tmp_path / "run", steps=(0, 1, 2, 3, 4), optimizer_cls=torch.optim.AdamW)
    config = ReplayConfig(UpdateConfig("recorded"), measures=MEASURES, name="single")
    expected, expected_attrs = read_store(replay(run, config, progress=False))

    result = torchrun(str(run), "--update", "recorded", "--measures", ",".join(MEASURES), "--name", "ranks")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replayed 5 snapshots (0 already done)" in result.stdout and "on 2 ranks" in result.stdout
    assert result.stdout.count("replayed") == 1  # the summary comes from rank 0 only
    arrays, attrs = read_store(run / "ranks.zarr")
    assert arrays.keys() == expected.keys() and arrays["done"].all()
    for name, values in arrays.items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
        assert values.dtype == expected[name].dtype, name
    assert attrs == expected_attrs | {"config": expected_attrs["config"] | {"name": "ranks"}}


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_message(tmp_path):
    run = make_run(tmp_path / "run", steps=(0, 1, 2, 3))
    bad = run / "snapshots" / "step_00000003.safetensors"  # index 3: rank 1's share
    bad.write_bytes(bad.read_bytes()[:-7])
    result = torchrun(str(run), "--measures", "kl", "--no-progress")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert any("step_00000003.safetensors: checksum mismatch" in e and "--skip-corrupt" in e for e in errors)
    assert any(e.startswith("Error: stopped: rank 1 failed: ") for e in errors), result.stderr[-3000:]
    done = zarr.open_group(run / "adam-fresh.zarr", mode="r")["done"][:]
    assert list(done) == [True, True, True, False]  # what the ranks finished is kept


def test_a_store_not_chunked_one_snapshot_per_chunk_is_refused(tmp_path):
    """Ranks write different snapshots at once, which is safe only if no chunk holds two."""
    run = make_run(tmp_path / "run", steps=(0, 1))
    config = ReplayConfig(measures=("kl",))
    group = zarr.open_group(replay(run, config, progress=False), mode="r+")
    done = group["done"][:]
    del group["done"]
    group.create_array(
        "done", shape=done.shape, chunks=(2,), dtype=bool, fill_value=False, dimension_names=("snapshot",)
    )
    group["done"][:] = done
    with pytest.raises(ReplayError, match="'done' is not chunked one snapshot per chunk"):
        replay(run, config, progress=False)


def test_ranks_in_one_process(monkeypatch):
    single = Ranks()
    assert single.main and single.shard(list(range(5))) == [0, 1, 2, 3, 4]
    assert single.reduce([2.0, 3.0], "sum") == [2.0, 3.0] and single.place("cuda") == "cuda"
    single.agree(None)
    with pytest.raises(ReplayError, match="boom"):
        single.agree(ReplayError("boom"))
    assert Ranks(rank=1, world_size=3, device=torch.device("cpu")).shard(list(range(8))) == [1, 4, 7]
    assert Ranks(local_rank=2, device=torch.device("cpu")).place("cuda") == "cuda:2"
    assert Ranks(local_rank=2, device=torch.device("cpu")).place("cuda:0") == "cuda:0"

    # A one-rank gloo job, as torchrun --nproc-per-node 1 would set it up.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with join("cpu") as ranks:
        assert (ranks.rank, ranks.world_size, ranks.device) == (0, 1, torch.device("cpu"))
        assert torch.distributed.is_initialized()
        assert ranks.reduce([1.0, -2.0], "max") == [1.0, -2.0]
        ranks.agree(None)
        with pytest.raises(ReplayError, match="own failure"):
            ranks.agree(ReplayError("own failure"))
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ReplayError, match="torchrun environment"), join("cpu"):
        pass

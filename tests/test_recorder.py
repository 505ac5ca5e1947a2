"""The recorder: bitwise snapshots, optimizer state, schedules, crash safety, errors; the training
loop, the losses and the digits preset."""

from __future__ import annotations

import copy
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recorder import ModelSpec, Recorder, RunDir, Schedule
from recorder.losses import batch_loss, per_sample_loss
from recorder.models import build_model, register_model
from recorder.presets import PRESETS, apply_overrides
from recorder.training import train
from recorder.writer import MAX_SLOTS, MIN_SLOTS, ROWS_PER_MESSAGE, SLOT_MEMORY, WriterProcess
from tests.helpers import wait_for_writers


@register_model("test_bn_mlp")
def bn_mlp(in_features: int = 6, num_outputs: int = 3) -> nn.Module:
    """Linear -> BatchNorm (buffers, int64 counter included) -> ReLU -> Linear: [N, 6] -> [N, 3]."""
    return nn.Sequential(nn.Linear(in_features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, num_outputs))


BN_SPEC = ModelSpec("test_bn_mlp", {"in_features": 6, "num_outputs": 3})


def _probes(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 6, generator=g, dtype=dtype), torch.tensor([0, 1, 2, 0, 1, 2])


def _recorder(path, model, optimizer, schedule=None, spec=BN_SPEC, **kw):
    return Recorder(
        path,
        model,
        optimizer,
        probes=_probes(next(model.parameters()).dtype),
        model_spec=spec,
        task="classification",
        loss="cross_entropy",
        schedule=schedule or Schedule.every(1),
        **kw,
    )


# ----------------------------------------------------------------------------- exact snapshots


def _adam_steplr(model):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-3)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _sgd_nesterov(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), None


def _adamw_amsgrad_two_groups(model):
    first, *rest = list(model.parameters())
    groups = [{"params": [first], "lr": 3e-3}, {"params": rest, "weight_decay": 0.05}]
    return torch.optim.AdamW(groups, lr=1e-2, amsgrad=True), None


def _no_optimizer_state(model):
    return None, None


@pytest.mark.parametrize(
    "make_optimizer, dtype",
    [
        (_adam_steplr, torch.float32),
        (_sgd_nesterov, torch.float64),
        (_adamw_amsgrad_two_groups, torch.float32),
        (_no_optimizer_state, torch.float32),
    ],
)
def test_snapshots_hold_exactly_the_training_state(tmp_path, make_optimizer, dtype):
    torch.manual_seed(0)
    model = build_model(BN_SPEC).to(dtype)
    optimizer, scheduler = make_optimizer(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)  # trains the model when nothing is recorded
    names = {id(p): n for n, p in model.named_parameters()}
    x, y = torch.randn(40, 6, dtype=dtype), torch.randint(0, 3, (40,))
    expected = {}

    def keep(step):
        state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]] if optimizer else []
        expected[step] = (
            {n: p.detach().clone() for n, p in model.named_parameters()},
            {n: b.detach().clone() for n, b in model.named_buffers()},
            state,
            order,
        )

    keep(0)
    with _recorder(tmp_path / "run", model, optimizer, Schedule.every(4)) as rec:
        for step in range(1, 12):
            batch = slice(4 * (step % 10), 4 * (step % 10) + 4)
            (optimizer or sgd).zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            (optimizer or sgd).step()
            if scheduler is not None:
                scheduler.step()
            rec.step(epoch=step // 5, loss=float(step))
            keep(step)

    run = RunDir(tmp_path / "run")
    assert [e.step for e in run.manifest] == [0, 4, 8, 11]
    assert run.spec.optimizer == (type(optimizer).__name__ if optimizer else None)
    for entry in run.manifest:
        snap = run.load_snapshot(entry)
        params, buffers, state, order = expected[entry.step]
        assert entry.epoch == entry.step // 5
        assert entry.metrics == ({"loss": float(entry.step)} if entry.step else {})
        for stored, kept in ((snap.params, params), (snap.buffers, buffers)):
            assert stored.keys() == kept.keys()
            for k in kept:
                assert stored[k].dtype == kept[k].dtype and torch.equal(stored[k], kept[k]), (entry.step, k)
        assert "1.num_batches_tracked" in snap.buffers
        if optimizer is None:
            assert snap.optimizer is None and entry.lr is None
            continue
        assert snap.optimizer.type == type(optimizer).__name__
        assert snap.optimizer.state.keys() == {order[i] for i in state["state"]}
        for index, kept_state in state["state"].items():
            stored_state = snap.optimizer.state[order[index]]
            assert stored_state.keys() == kept_state.keys()
            for key, value in kept_state.items():
                value = torch.as_tensor(value)
                assert stored_state[key].dtype == value.dtype and torch.equal(stored_state[key], value)
        assert len(snap.optimizer.groups) == len(state["param_groups"])
        position = 0
        for stored_group, kept_group in zip(snap.optimizer.groups, state["param_groups"], strict=True):
            assert stored_group["params"] == order[position : position + len(kept_group["params"])]
            position += len(kept_group["params"])
            for key, value in kept_group.items():
                if key != "params":
                    assert stored_group[key] == (list(value) if isinstance(value, tuple) else value), key
        assert entry.lr == state["param_groups"][0]["lr"]


def test_recorder_logs_metrics_and_leaves_the_random_stream_alone(tmp_path):
    torch.manual_seed(0)
    model = build_model(BN_SPEC)
    before = torch.get_rng_state()
    with _recorder(tmp_path / "run", model, None, Schedule.every(100), seed=7, extra={"note": "x"}) as rec:
        assert torch.equal(torch.get_rng_state(), before)
        for step in range(1, 4):
            rec.step(epoch=0, loss=0.5 * step)
        rec.log_epoch(0, test_acc=0.75)
        rec.step(epoch=1, loss=float("nan"))
    run = RunDir(tmp_path / "run")
    assert run.spec.seed == 7 and run.spec.num_outputs == 3
    assert run.spec.extra == {"note": "x", "schedule": {"every_n": 100, "steps": []}}
    assert set(run.spec.versions) == {"torch", "python", "numpy", "safetensors"}
    assert run.metrics() == [
        {"kind": "step", "step": 1, "epoch": 0, "loss": 0.5},
        {"kind": "step", "step": 2, "epoch": 0, "loss": 1.0},
        {"kind": "step", "step": 3, "epoch": 0, "loss": 1.5},
        {"kind": "epoch", "step": 3, "epoch": 0, "test_acc": 0.75},
        {"kind": "step", "step": 4, "epoch": 1, "loss": None},
    ]
    inputs, targets = run.probes()
    assert torch.equal(inputs, _probes()[0]) and torch.equal(targets, _probes()[1])


# ----------------------------------------------------------------------------- schedules


def test_frozen_parameters_are_listed_for_replay_and_a_fully_trained_model_lists_none(tmp_path):
    """Replay holds frozen weights fixed (``replay.state.frozen_names``): the recorder names them."""
    model = build_model(BN_SPEC)
    first = next(iter(model.parameters()))
    first.requires_grad_(False)
    with _recorder(tmp_path / "frozen", model, None):
        pass
    name = next(iter(dict(model.named_parameters())))
    assert RunDir(tmp_path / "frozen").spec.extra["frozen"] == [name]
    with _recorder(tmp_path / "all", build_model(BN_SPEC), None):
        pass
    assert "frozen" not in RunDir(tmp_path / "all").spec.extra


def test_schedule_every_and_at():
    every = Schedule.every(5)
    assert [s for s in range(21) if every.due(s)] == [0, 5, 10, 15, 20]
    at = Schedule.at([3, 7, 7])
    assert [s for s in range(21) if at.due(s)] == [3, 7]
    for bad in (lambda: Schedule.every(0), lambda: Schedule.every(2.5), lambda: Schedule.at([-1])):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("total, num", [(1000, 10), (100, 30), (5, 10), (7, 7), (1, 1), (50000, 64)])
def test_schedule_log_spaced(total, num):
    steps = sorted(Schedule.log_spaced(total, num).steps)
    assert len(steps) == min(num, total)
    assert steps[0] == 1 and steps[-1] == total
    assert all(a < b for a, b in zip(steps, steps[1:], strict=False))
    if total == 1000:  # geometric: equal ratios to rounding
        ratios = [b / a for a, b in zip(steps, steps[1:], strict=False)]
        assert max(ratios) / min(ratios) < 1.5


@pytest.mark.parametrize(
    "schedule, steps, recorded",
    [
        (Schedule.at([4]), 7, [0, 4, 7]),
        (Schedule.every(3), 6, [0, 3, 6]),  # the last step is due anyway: recorded once
        (Schedule.log_spaced(8, 3), 8, [0, 1, 3, 8]),
        (Schedule.every(3), 0, [0]),
    ],
)
def test_first_and_last_steps_are_always_recorded(tmp_path, schedule, steps, recorded):
    model = build_model(BN_SPEC)
    with _recorder(tmp_path / "run", model, None, schedule) as rec:
        for _ in range(steps):
            rec.step()
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == recorded


# ----------------------------------------------------------------------------- crash safety


def _train_until_killed(run_dir: Path, ready) -> None:
    """A training process: Adam on a 1.2 MB MLP, a snapshot every step, until it is killed."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 64, "num_outputs": 10, "hidden": [512, 512]})
    model = build_model(spec)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with Recorder(run_dir, model, opt, probes=(x[:10], y[:10]), model_spec=spec, task="classification",
                  loss="cross_entropy", schedule=Schedule.every(1)) as rec:  # fmt: skip
        for step in range(1, 100000):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rec.step(loss=float(step))
            if step == 2:
                ready.set()


@pytest.mark.slow
def test_sigkill_mid_run_leaves_only_complete_listed_snapshots(tmp_path):
    ctx = multiprocessing.get_context("fork")  # a fresh interpreter would spend seconds importing torch
    rng = random.Random(1234)
    listed = []
    for trial in range(5):
        run_dir = tmp_path / f"run{trial}"
        ready = ctx.Event()
        proc = ctx.Process(target=_train_until_killed, args=(run_dir, ready))
        proc.start()
        assert ready.wait(timeout=60)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        wait_for_writers(run_dir)  # it writes what it was sent, then exits

        run = RunDir(run_dir)
        steps = [e.step for e in run.manifest]
        assert steps == list(range(len(steps))) and len(steps) >= 1
        for entry in run.manifest:  # size and checksum verified
            assert run.load_snapshot(entry).step == entry.step
        on_disk = {p.name for p in (run_dir / "snapshots").glob("*.safetensors")}
        # at most one finished file not yet listed (the kill fell between its rename and the manifest)
        assert len(on_disk - {Path(e.file).name for e in run.manifest}) <= 1
        metric_steps = [row["step"] for row in run.metrics()]
        assert metric_steps == list(range(1, len(metric_steps) + 1))
        listed.append(len(steps))
    assert max(listed) > 3  # the kills landed during training, not before it


# ----------------------------------------------------------------------------- errors


def test_model_spec_mismatch_is_refused_before_anything_is_written(tmp_path):
    spec = ModelSpec("mlp", {"in_features": 6, "num_outputs": 3, "hidden": [16]})
    model = build_model(ModelSpec("mlp", {"in_features": 6, "num_outputs": 3, "hidden": [12]}))
    with pytest.raises(
        ValueError, match=r"does not match its model_spec.*'1.bias' is \(16,\), the model has \(12,\)"
    ):
        _recorder(tmp_path / "run", model, None, spec=spec)
    assert not (tmp_path / "run").exists()

    model = build_model(BN_SPEC)
    model.register_buffer("extra", torch.zeros(2))
    with pytest.raises(ValueError, match="buffers"):
        _recorder(tmp_path / "run", model, None)
    foreign = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match="not parameters of the model"):
        _recorder(tmp_path / "run", build_model(BN_SPEC), foreign)
    with pytest.raises(ValueError, match="int64 classes"):
        Recorder(tmp_path / "run", build_model(BN_SPEC), None, probes=(torch.randn(4, 6), torch.rand(4)),
                 model_spec=BN_SPEC, task="classification", loss="cross_entropy")  # fmt: skip
    with pytest.raises(ValueError, match="do not fit the model"):
        Recorder(tmp_path / "run", build_model(BN_SPEC), None, probes=(torch.randn(4, 5), torch.zeros(4).long()),
                 model_spec=BN_SPEC, task="classification", loss="cross_entropy")  # fmt: skip
    assert not (tmp_path / "run").exists()


def _step_until_it_raises(rec: Recorder, error: type[BaseException], match: str) -> None:
    """Step ``rec`` (a snapshot a step) until the writer's failure reaches the training thread:
    within 10 seconds, once the staged snapshots went out and their answers came back."""
    deadline = time.monotonic() + 10
    with pytest.raises(error, match=match):
        while time.monotonic() < deadline:
            rec.step()
            time.sleep(0.01)


def test_writer_errors_surface_on_the_training_thread(tmp_path):
    rec = _recorder(tmp_path / "run", build_model(BN_SPEC), None, Schedule.every(1))
    deadline = time.monotonic() + 10
    while not RunDir(tmp_path / "run").manifest and time.monotonic() < deadline:
        time.sleep(0.01)
    shutil.rmtree(tmp_path / "run" / "snapshots")
    (tmp_path / "run" / "snapshots").write_text("not a directory")  # every later write fails
    _step_until_it_raises(rec, OSError, "writing the snapshot of step 1: NotADirectoryError")
    with pytest.raises(OSError, match="step 1"):
        rec.close()
    assert rec._writer.process.returncode == 0
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0]


def test_a_killed_writer_process_is_reported(tmp_path):
    rec = _recorder(tmp_path / "run", build_model(BN_SPEC), None, Schedule.every(1))
    os.kill(rec.writer_pid, signal.SIGKILL)
    rec._writer.process.wait()
    _step_until_it_raises(rec, RuntimeError, "writer process exited unexpectedly")
    with pytest.raises(RuntimeError, match="writer process exited unexpectedly"):
        rec.close()


def test_the_writer_process_finishes_what_it_was_sent_when_training_stops(tmp_path):
    """Closing only the pipe (what the training process's death does): every sent snapshot lands."""
    model = build_model(BN_SPEC)
    rec = _recorder(tmp_path / "run", model, None, Schedule.every(1), max_in_flight=4)
    for _ in range(3):
        rec.step()
    rec._send_staged(wait=True)
    rec._writer.process.stdin.close()
    assert rec._writer.process.wait(timeout=30) == 0
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0, 1, 2, 3]


def test_closing_does_not_wait_for_processes_forked_from_training(tmp_path):
    """A process forked after the writer started (a DataLoader worker, say) holds the writer's
    stdin open: closing still ends the writer at once, every snapshot written."""
    rec = _recorder(tmp_path / "run", build_model(BN_SPEC), None, Schedule.every(1))
    worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    worker.start()
    try:
        for _ in range(3):
            rec.step()
        start = time.monotonic()
        rec.close()
        assert time.monotonic() - start < 20
        assert rec._writer.process.returncode == 0
    finally:
        worker.kill()
        worker.join()
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0, 1, 2, 3]


def test_slots_follow_the_snapshot_size_and_rows_go_out_in_batches(tmp_path):
    writer = WriterProcess(tmp_path, None)
    try:
        assert writer.usable(100_000) == MAX_SLOTS and writer.usable(SLOT_MEMORY // 3) == 3
        assert writer.usable(SLOT_MEMORY) == MIN_SLOTS
    finally:
        writer.close()
    fixed = WriterProcess(tmp_path, 3)
    fixed.close()
    assert fixed.usable(1) == fixed.usable(SLOT_MEMORY) == 3

    rec = _recorder(tmp_path / "run", build_model(BN_SPEC), None, Schedule.every(10**6))
    for step in range(ROWS_PER_MESSAGE + 5):
        rec.step(loss=float(step))
    deadline = time.monotonic() + 10  # a full batch is sent before any snapshot or close()
    while len(RunDir(tmp_path / "run").metrics()) < ROWS_PER_MESSAGE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(RunDir(tmp_path / "run").metrics()) == ROWS_PER_MESSAGE
    rec.close()
    assert [r["loss"] for r in RunDir(tmp_path / "run").metrics()] == list(range(ROWS_PER_MESSAGE + 5))


def test_an_exception_in_the_loop_adds_no_final_snapshot(tmp_path):
    with pytest.raises(KeyError):
        with _recorder(tmp_path / "run", build_model(BN_SPEC), None, Schedule.every(10)) as rec:
            rec.step()
            rec.step()
            raise KeyError("boom")
    assert rec._writer.process.returncode == 0
    assert [e.step for e in RunDir(tmp_path / "run").manifest] == [0]
    with pytest.raises(RuntimeError, match="closed"):
        rec.step()


# ----------------------------------------------------------------------------- losses, training, presets


def test_losses_match_their_definitions_and_vmap():
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    classes = torch.tensor([0, 2, 1, 1, 0])
    manual = {
        "cross_entropy": -out.log_softmax(1)[torch.arange(5), classes],
        "mse": ((out - target) ** 2).mean(1),
        "half_sse": 0.5 * ((out - target) ** 2).sum(1),
    }
    for name, expected in manual.items():
        t = classes if name == "cross_entropy" else target
        assert torch.allclose(per_sample_loss(name, out, t), expected)
        assert torch.allclose(batch_loss(name, out, t), expected.mean())
        one = torch.func.vmap(lambda o, y, name=name: per_sample_loss(name, o[None], y[None])[0])(out, t)
        assert torch.allclose(one, expected)
    assert torch.allclose(batch_loss("mse", out, target), F.mse_loss(out, target))
    with pytest.raises(ValueError, match="shaped like the outputs"):
        per_sample_loss("mse", out, target[:, 0])
    with pytest.raises(ValueError, match="unknown loss"):
        per_sample_loss("hinge", out, target)


def test_train_regression_with_recorder(tmp_path):
    torch.manual_seed(0)
    spec = ModelSpec("mlp", {"in_features": 4, "num_outputs": 2, "hidden": [16]})
    model = build_model(spec)
    x = torch.randn(64, 4)
    y = torch.stack([x[:, 0] - x[:, 1], x[:, 2] * 0.5], dim=1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    with Recorder(tmp_path / "run", model, optimizer, probes=(x[:8], y[:8]), model_spec=spec,
                  task="regression", loss="half_sse", schedule=Schedule.every(5)) as rec:  # fmt: skip
        history = train(model, optimizer, "half_sse", loader, loader, 3, rec, "cpu", progress=False,
                        scheduler=scheduler)  # fmt: skip
    assert [set(h) for h in history] == [{"epoch", "train_loss", "test_loss"}] * 3
    assert history[-1]["test_loss"] < history[0]["train_loss"]
    run = RunDir(tmp_path / "run")
    assert [e.step for e in run.manifest] == [0, 5, 10, 12]
    assert run.manifest[-1].lr == pytest.approx(0.05 / 13)
    assert run.probes()[1].shape == (8, 2)
    assert [r["epoch"] for r in run.metrics() if r["kind"] == "epoch"] == [0, 1, 2]


def test_apply_overrides():
    config = PRESETS["digits"].config_cls()
    new = apply_overrides(config, ["epochs=3", "hidden=[256, 64]", "lr=1", "progress=false", "device=cuda:0"])
    assert (new.epochs, new.hidden, new.lr, new.progress, new.device) == (3, [256, 64], 1.0, False, "cuda:0")
    assert config.epochs == 10
    for bad in ("epochs=abc", "epochs=1.5", "epochs=true", "nope=1", "epochs"):
        with pytest.raises(ValueError):
            apply_overrides(config, [bad])


def test_digits_preset_records_a_sensible_run(tmp_path):
    preset = PRESETS["digits"]
    preset.record(tmp_path / "digits", preset.config_cls(epochs=5, progress=False))  # 10 by default
    run = RunDir(tmp_path / "digits")
    final = [r for r in run.metrics() if r["kind"] == "epoch"][-1]
    assert final["epoch"] == 4 and final["test_acc"] > 0.9, final
    steps = [e.step for e in run.manifest]
    assert steps[:3] == [0, 9, 18] and steps[-1] == final["step"]
    assert run.spec.preset == "digits" and run.spec.optimizer == "Adam" and run.spec.num_outputs == 10
    assert run.spec.extra["config"]["epochs"] == 5
    inputs, targets = run.probes()
    assert inputs.shape == (50, 64) and torch.equal(torch.bincount(targets), torch.full((10,), 5))

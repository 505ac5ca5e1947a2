"""Trainer integrations (:mod:`recorder.integrations`) with the real packages: a PyTorch Lightning
callback and a Hugging Face ``TrainerCallback``.

Oracles: for Lightning, a plain loop (the same initial weights, batches, loss scaling under
gradient accumulation, ``torch.optim`` step and scheduler) gives the weights after every
optimizer step, the learning rate each step used and each step's loss; the module itself reads
the learning rate every optimizer step used (``on_before_optimizer_step``). For the ``Trainer``,
whose batches are shuffled, callbacks of the test read the weights after every optimizer step
and the learning rate each step used, and the linear schedule gives it in closed form.

Lightning and transformers take seconds to import: these tests are in the slow set, except the
ones that import neither.
"""

from __future__ import annotations

import copy
import functools
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch.utils.data import DataLoader, TensorDataset

from cli import main
from recorder.models import _REGISTRY, mlp
from recorder.rundir.run import RunDir
from recorder.schedule import Schedule
from replay.config import ReplayConfig, UpdateConfig
from replay.run import replay
from replay.store import open_store
from tests.test_conformance import _masked_tokens, _transformers

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES, IN_FEATURES = 3, 6
BATCHES = 7  # a Lightning epoch: 6 batches of 4 examples and one of 2
BATCH = 4
EPOCHS = 2
PLATEAU = 1.0  # the metric a ReduceLROnPlateau scheduler monitors


@pytest.fixture
def registry(monkeypatch):
    """Model registrations made by the test end with it."""
    monkeypatch.setattr("recorder.models._REGISTRY", dict(_REGISTRY))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[26, 6]`` shifted by their class, classes ``[26]``."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(26) % NUM_CLASSES
    return torch.randn(26, IN_FEATURES, generator=g) + y[:, None], y


def _lambda(step: int) -> float:
    """The learning-rate factor after ``step`` scheduler steps: it changes at every one."""
    return 1.0 / (1.0 + 0.5 * step)


def _scheduler(optimizer: torch.optim.Optimizer, kind: str) -> torch.optim.lr_scheduler.LRScheduler:
    """``lambda``: :func:`_lambda`; ``plateau``: halve the learning rate whenever the monitored
    metric (a constant) does not improve, which is at every step of the scheduler but the first."""
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda)


def _step(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(PLATEAU)
    else:
        scheduler.step()


@functools.cache
def _lit_mlp() -> type:
    """``LitMLP``: an MLP as a LightningModule trained by Adam with a scheduler (:func:`_scheduler`)
    stepped every step or every epoch; it keeps the learning rate of each optimizer step (``lrs_used``)."""
    import lightning.pytorch as pl

    class LitMLP(pl.LightningModule):
        def __init__(
            self, hidden: int = 8, lr: float = 0.05, interval: str = "step", scheduler: str = "lambda"
        ):
            super().__init__()
            self.save_hyperparameters()
            self.net = mlp(IN_FEATURES, NUM_CLASSES, [hidden])
            self.lrs_used: list[float] = []

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss, on_step=False, on_epoch=True)
            by_step = self.hparams.interval == "step"
            self.log("plateau", PLATEAU, on_step=by_step, on_epoch=not by_step)
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.lrs_used.append(optimizer.param_groups[0]["lr"])

        def configure_optimizers(self):
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            scheduler = _scheduler(optimizer, self.hparams.scheduler)
            schedule = {"scheduler": scheduler, "interval": self.hparams.interval, "monitor": "plateau"}
            return {"optimizer": optimizer, "lr_scheduler": schedule}

    return LitMLP


def _plain_loop(net: torch.nn.Module, accumulate: int, interval: str, kind: str, lr: float):
    """The oracle: train a deep copy of ``net`` as Lightning does (each batch loss divided by
    ``accumulate``, a step after every ``accumulate`` batches and after an epoch's last batch).
    Returns the weights after each step ``[steps + 1]`` (step 0 first), the learning rate of the
    step that follows each ``[steps + 1]``, each step's mean batch loss ``[steps]``, its epoch and
    the epochs' mean losses weighted by batch size."""
    net = copy.deepcopy(net)
    x, y = _data()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    scheduler = _scheduler(optimizer, kind)
    weights = [{k: v.clone() for k, v in net.state_dict().items()}]
    lrs, losses, epochs, epoch_losses = [optimizer.param_groups[0]["lr"]], [], [], []
    for epoch in range(EPOCHS):
        batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
        weighted = 0.0
        for start in range(0, len(batches), accumulate):
            optimizer.zero_grad()
            step_losses = []
            for xb, yb in batches[start : start + accumulate]:
                loss = F.cross_entropy(net(xb), yb)
                (loss / accumulate).backward()
                step_losses.append(loss.item())
                weighted += loss.item() * len(xb)
            optimizer.step()
            if interval == "step":
                _step(scheduler)
            weights.append({k: v.clone() for k, v in net.state_dict().items()})
            lrs.append(optimizer.param_groups[0]["lr"])
            losses.append(sum(step_losses) / len(step_losses))
            epochs.append(epoch)
        if interval == "epoch":
            _step(scheduler)
            lrs[-1] = optimizer.param_groups[0]["lr"]
        epoch_losses.append(weighted / len(x))
    return weights, lrs, losses, epochs, epoch_losses


def _trainer(**kwargs):
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("accumulate", "interval", "kind"),
    [
        (1, "step", "lambda"),
        (2, "step", "lambda"),
        (2, "epoch", "lambda"),
        (1, "step", "plateau"),
        (2, "epoch", "plateau"),
    ],
)
def test_lightning_records_every_optimizer_step_with_the_next_steps_learning_rate(
    tmp_path, registry, accumulate, interval, kind
):
    from recorder.integrations.lightning import ElasticityCallback
    from recorder.models import register_model

    lit = register_model("LitMLP")(_lit_mlp())
    torch.manual_seed(0)
    module = lit(interval=interval, scheduler=kind)
    weights, lrs, losses, epochs, epoch_losses = _plain_loop(module.net, accumulate, interval, kind, lr=0.05)
    x, y = _data()
    callback = ElasticityCallback(tmp_path / "run", probes=(x[:9], y[:9]))
    trainer = _trainer(callbacks=[callback], accumulate_grad_batches=accumulate)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH))

    steps = EPOCHS * math.ceil(BATCHES / accumulate)
    assert trainer.global_step == steps == len(losses)
    run = RunDir(tmp_path / "run")
    assert run.complete and run.spec.model.factory == "LitMLP"
    assert run.spec.model.kwargs == {"hidden": 8, "lr": 0.05, "interval": interval, "scheduler": kind}
    assert [e.step for e in run.manifest] == list(range(steps + 1))
    assert [e.epoch for e in run.manifest] == [0, *epochs]
    for entry in run.manifest:
        snapshot = run.load_snapshot(entry)
        for name, value in weights[entry.step].items():
            torch.testing.assert_close(snapshot.params[f"net.{name}"], value, rtol=1e-6, atol=1e-7)
        assert entry.lr == pytest.approx(lrs[entry.step], rel=1e-12)
    # the learning rate of snapshot s is the one step s + 1 used
    assert [e.lr for e in run.manifest[:-1]] == pytest.approx(module.lrs_used, rel=1e-12)
    rows = run.metrics()
    step_rows = [r for r in rows if r["kind"] == "step"]
    assert [r["step"] for r in step_rows] == list(range(1, steps + 1))
    assert [r["epoch"] for r in step_rows] == epochs
    assert [r["loss"] for r in step_rows] == pytest.approx(losses, rel=1e-5)
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epoch_rows] == list(range(EPOCHS))
    assert [r["train_loss"] for r in epoch_rows] == pytest.approx(epoch_losses, rel=1e-5)


@pytest.mark.slow
def test_lightning_keeps_what_was_recorded_when_the_fit_fails(tmp_path, registry):
    from recorder.integrations.lightning import ElasticityCallback
    from recorder.models import register_model

    lit = register_model("LitMLP")(_lit_mlp())
    module = lit()
    failing_batch = 4

    def training_step(batch, batch_idx):
        if batch_idx == failing_batch:
            raise RuntimeError("the data went bad")
        return type(module).training_step(module, batch, batch_idx)

    module.training_step = training_step
    x, y = _data()
    callback = ElasticityCallback(tmp_path / "run", probes=(x[:9], y[:9]))
    with pytest.raises(RuntimeError, match="the data went bad"):
        _trainer(callbacks=[callback]).fit(module, DataLoader(TensorDataset(x, y), batch_size=BATCH))
    run = RunDir(tmp_path / "run")
    assert not run.complete
    # the steps before the failing batch, each recorded once its scheduler had stepped
    assert [e.step for e in run.manifest] == list(range(failing_batch + 1))
    assert [e.lr for e in run.manifest] == pytest.approx(
        [0.05 * _lambda(s) for s in range(failing_batch + 1)]
    )
    with pytest.raises(ProcessLookupError):  # the writer process has ended
        os.kill(callback.recorder.writer_pid, 0)


@pytest.mark.slow
def test_lightning_spec_needs_a_registered_class_with_json_hyperparameters(registry):
    from recorder.integrations.lightning import lightning_spec
    from recorder.models import register_model

    lit = _lit_mlp()
    with pytest.raises(ValueError, match='@register_model\\("LitMLP"\\)'):
        lightning_spec(lit())
    register_model("LitMLP")(lit)
    assert lightning_spec(lit(hidden=5)).kwargs == {
        "hidden": 5,
        "lr": 0.05,
        "interval": "step",
        "scheduler": "lambda",
    }
    with pytest.raises(ValueError, match="not JSON"):
        lightning_spec(lit(lr=torch.tensor(0.1)))


_DDP_SCRIPT = """
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from recorder import Schedule
from recorder.integrations.lightning import ElasticityCallback
from recorder.models import mlp, register_model


@register_model("DDPNet")
class DDPNet(pl.LightningModule):
    def __init__(self, hidden: int = 8):
        super().__init__()
        self.save_hyperparameters()
        self.net = mlp(6, 3, [hidden])

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    torch.manual_seed(0)
    y = torch.arange(32) % 3
    x = torch.randn(32, 6) + y[:, None]
    module = DDPNet()
    callback = ElasticityCallback("run", probes=(x[:9], y[:9]), schedule=Schedule.every(3))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=4))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, "final.safetensors")
"""


@pytest.mark.slow
def test_lightning_under_ddp_records_on_rank_0_only(tmp_path):
    """Two CPU ranks (``ddp_spawn``, gloo), each with half of the 8 batches of an epoch: one run
    directory, each optimizer step recorded once, the last snapshot the weights DDP kept in step."""
    from safetensors.torch import load_file

    (tmp_path / "ddp_fit.py").write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "ddp_fit.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    steps = 2 * 4  # two epochs of 16 examples a rank in batches of 4
    assert run.complete and [e.step for e in run.manifest] == [0, 3, 6, 8]
    rows = [r for r in run.metrics() if r["kind"] == "step"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    last = run.load_snapshot(run.manifest[-1])
    for name, value in load_file(tmp_path / "final.safetensors").items():
        assert torch.equal(last.params[name], value), name


@pytest.mark.slow
def test_the_integrations_import_their_trainer_only_when_asked(tmp_path):
    """``import recorder`` (and the CLI, replay) import neither trainer package; an integration
    without its package says which extra to install."""
    code = textwrap.dedent(
        """
        import importlib, sys
        import cli, recorder, recorder.recorder, recorder.integrations, replay.run
        assert not {"lightning", "transformers"} & set(sys.modules)
        for name in ("lightning", "lightning.pytorch", "transformers"):
            sys.modules[name] = None  # as if not installed
        for name in ("lightning", "transformers"):
            try:
                importlib.import_module("recorder.integrations." + name)
            except ImportError as e:
                print(e)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "recorder.integrations.lightning needs PyTorch Lightning: pip install 'local-elasticity[lightning]'",
        "recorder.integrations.transformers needs Hugging Face transformers: "
        "pip install 'local-elasticity[transformers]'",
    ]


# ----------------------------------------------------------------------------- Hugging Face Trainer

HF_CONFIGS = {
    "bert": _transformers(
        "bert",
        vocab_size=12,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
    ),
    "gpt2": _transformers("gpt2", vocab_size=12, n_embd=8, n_layer=1, n_head=2, n_positions=8),
}
HF_EXAMPLES, HF_BATCH, HF_ACCUMULATE, HF_LR = 40, 8, 2, 1e-2


def _token_task() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Named inputs ``input_ids``, ``attention_mask`` ``[40, 5]`` whose first token is the class, classes ``[40]``."""
    labels = torch.arange(HF_EXAMPLES) % NUM_CLASSES
    return _masked_tokens(12, 5)(torch.Generator().manual_seed(0), labels), labels


@functools.cache
def _watcher() -> type:
    """A TrainerCallback that keeps the learning rate of each optimizer step (read just before it)
    and the weights before training and after each optimizer step."""
    from transformers import TrainerCallback

    class Watcher(TrainerCallback):
        def __init__(self):
            self.lrs_used: list[float] = []
            self.weights: list[dict[str, torch.Tensor]] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            self.lrs_used.append(optimizer.param_groups[0]["lr"])

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.weights.append({k: v.detach().clone() for k, v in model.named_parameters()})

    return Watcher


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "every"), [("bert", 3), ("gpt2", 1)])
def test_trainer_records_a_run_that_replays_and_analyzes(tmp_path, model_type, every):
    """Two epochs of 5 batches, gradient accumulation over 2 (an epoch ends on a step of one
    batch), a linear schedule. BERT is replayed one probe at a time (its attention mask cannot
    run under vmap), so it is recorded every 3 steps."""
    import transformers

    from recorder.integrations.transformers import ElasticityCallback

    inputs, labels = _token_task()
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**HF_CONFIGS[model_type]["config"])
    model = transformers.AutoModelForSequenceClassification.from_config(config)
    examples = [
        {"input_ids": i, "attention_mask": m, "labels": c}
        for i, m, c in zip(inputs["input_ids"], inputs["attention_mask"], labels, strict=True)
    ]
    probes = ({k: v[:12] for k, v in inputs.items()}, labels[:12])
    recording = ElasticityCallback(tmp_path / "run", probes, schedule=Schedule.every(every))
    watcher = _watcher()()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=HF_BATCH,
        gradient_accumulation_steps=HF_ACCUMULATE,
        learning_rate=HF_LR,
        lr_scheduler_type="linear",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples, callbacks=[recording, watcher]
    )
    trainer.train()

    batches = math.ceil(HF_EXAMPLES / HF_BATCH)
    steps = EPOCHS * math.ceil(batches / HF_ACCUMULATE)
    assert trainer.state.global_step == steps == len(watcher.lrs_used)
    run = RunDir(tmp_path / "run")
    assert run.complete and run.spec.model.factory == "transformers" and run.spec.optimizer == "AdamW"
    assert [e.step for e in run.manifest] == sorted({*range(0, steps, every), steps})
    per_epoch = steps // EPOCHS
    assert [e.epoch for e in run.manifest] == [max(e.step - 1, 0) // per_epoch for e in run.manifest]
    for entry in run.manifest:
        snapshot = run.load_snapshot(entry)
        for name, value in watcher.weights[entry.step].items():
            assert torch.equal(snapshot.params[name], value), (entry.step, name)
        # the linear schedule, and the learning rate step s + 1 used
        assert entry.lr == pytest.approx(HF_LR * (steps - entry.step) / steps, rel=1e-9, abs=1e-15)
        if entry.step < steps:
            assert entry.lr == watcher.lrs_used[entry.step]
    rows = [r for r in run.metrics() if r["kind"] == "step"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert [r["epoch"] for r in rows] == [s // per_epoch for s in range(steps)]
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert [r["loss"] for r in rows] == pytest.approx(logged)

    start = time.perf_counter()
    store = replay(run.path, ReplayConfig(update=UpdateConfig("recorded")), progress=False)
    print(f"{model_type}: {len(run.manifest)} snapshots replayed in {time.perf_counter() - start:.1f} s")
    assert open_store(store).done.all()
    result = CliRunner().invoke(main, ["analyze", str(run.path)])
    assert result.exit_code == 0, result.output
    assert (run.path / "analysis" / "report.html").exists()


# ----------------------------------------------------------------------------- --allow-factory, the command

_FACTORY_MODULE = """
from torch import nn


def tiny_mlp(in_features, num_outputs):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 8), nn.ReLU(), nn.Linear(8, num_outputs))
"""


@pytest.fixture
def factory_module(tmp_path, monkeypatch, registry):
    """``my_factories.py`` (``tiny_mlp``, the layout of the tests' ``mlp``) in the current folder
    ``tmp_path``, not on ``sys.path``; imported modules of that name are forgotten afterwards."""
    (tmp_path / "my_factories.py").write_text(_FACTORY_MODULE)
    (tmp_path / "broken_factories.py").write_text("raise RuntimeError('no such data file')\n")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for name in ("my_factories", "broken_factories"):
        sys.modules.pop(name, None)


def test_allow_factory_finds_a_module_in_the_current_folder(factory_module):
    from recorder.models import build_model, load_external_factory
    from recorder.rundir.spec import ModelSpec

    path = list(sys.path)
    assert str(factory_module) not in path
    assert load_external_factory("my_factories:tiny_mlp") == "tiny_mlp"
    assert sys.path == path  # the current folder was on the path for that import only
    model = build_model(ModelSpec("tiny_mlp", {"in_features": 6, "num_outputs": 3}))
    assert [tuple(p.shape) for p in model.parameters()] == [(8, 6), (8,), (3, 8), (3,)]
    with pytest.raises(
        ImportError, match="importing 'broken_factories' raised RuntimeError: no such data file"
    ):
        load_external_factory("broken_factories:f")
    assert sys.path == path


def test_replay_allow_factory_from_the_current_folder(factory_module):
    from recorder.rundir.run import RunWriter
    from recorder.rundir.spec import ModelSpec, RunSpec
    from tests.helpers import make_model, make_probes, snapshot

    x, y = make_probes("mlp")
    spec = RunSpec(
        ModelSpec("tiny_mlp", {"in_features": 6, "num_outputs": 3}), "classification", "cross_entropy", 3
    )
    writer = RunWriter(factory_module / "run", spec, x, y)
    writer.add_snapshot(snapshot(make_model("mlp"), 0))
    runner = CliRunner()
    result = runner.invoke(
        main, ["replay", "run", "--no-progress", "--allow-factory", "my_factories:tiny_mlp"]
    )
    assert result.exit_code == 0, result.output
    assert open_store(factory_module / "run" / "adam-fresh.zarr").done.all()
    result = runner.invoke(
        main, ["replay", "run", "--name", "again", "--allow-factory", "broken_factories:f"]
    )
    assert result.exit_code == 2
    assert "importing 'broken_factories' raised RuntimeError: no such data file" in result.output


def test_the_console_command_is_installed():
    """``pip install -e .`` installs ``local-elasticity``, the CLI's click group."""
    command = Path(sys.executable).with_name("local-elasticity")
    assert command.exists(), "the console script is missing: pip install -e . (again)"
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: local-elasticity")
    for name in ("record", "replay", "analyze"):
        assert f"  {name} " in result.stdout

"""The ``digits`` preset: an MLP on scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from recorder.datasets import digits, stratified_sample
from recorder.presets import Preset, check_settings, register_preset
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import record_supervised

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class DigitsConfig:
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    optimizer: str = field(
        default="adam", metadata={"help": f"one of {', '.join(OPTIMIZERS)}", "choices": OPTIMIZERS}
    )
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    momentum: float = field(default=0.9, metadata={"help": "momentum (sgd only)"})
    hidden: list[int] = field(default_factory=lambda: [128], metadata={"help": "hidden layer widths"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of the images held out (stratified)"})
    probes_per_class: int = field(default=5, metadata={"help": "training images per class in the probe set"})
    snapshot_every: int = field(default=9, metadata={"help": "snapshot every this many optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed of the split, the probes, the init and the batches"})
    device: str = field(default="cpu", metadata={"help": "torch device to train on"})
    threads: int = field(
        default=1, metadata={"help": "CPU threads while training (this small MLP is slower with more)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def record(run_dir: Path, config: DigitsConfig) -> None:
    """Train the MLP with the recorder attached, writing the run to ``run_dir``."""
    check_settings(config)
    x_train, y_train, x_test, y_test = digits(config.test_fraction, config.seed)
    probes = stratified_sample(y_train.numpy(), config.probes_per_class, config.seed)
    optimizer: Callable[..., torch.optim.Optimizer]
    if config.optimizer == "sgd":
        optimizer = functools.partial(
            torch.optim.SGD, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        optimizer = functools.partial(cls, lr=config.lr, weight_decay=config.weight_decay)
    record_supervised(
        run_dir,
        ModelSpec("mlp", {"in_features": 64, "num_outputs": 10, "hidden": list(config.hidden)}),
        optimizer,
        DataLoader(
            TensorDataset(x_train, y_train),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        ),
        DataLoader(TensorDataset(x_test, y_test), batch_size=512),
        (x_train[probes], y_train[probes]),
        Schedule.every(config.snapshot_every),
        task="classification",
        loss="cross_entropy",
        epochs=config.epochs,
        seed=config.seed,
        preset="digits",
        extra={"config": asdict(config)},
        device=config.device,
        threads=config.threads,
        progress=config.progress,
    )


register_preset(
    Preset(
        name="digits",
        help="MLP (64 -> 128 -> 10) on scikit-learn's handwritten digits, Adam; about 10 s on 2 cores",
        config_cls=DigitsConfig,
        record=record,
    )
)

"""The ``digits`` preset: an MLP on scikit-learn's bundled 8x8 handwritten digits (no download)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

from recorder.models import build_model
from recorder.presets import Preset, register_preset
from recorder.recorder import Recorder
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import train

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass
class DigitsConfig:
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    optimizer: str = field(default="adam", metadata={"help": f"one of {', '.join(OPTIMIZERS)}"})
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


def load_data(config: DigitsConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardized (on the training split) features: x_train [N, 64] float32, y_train [N] int64,
    x_test [M, 64], y_test [M]."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=config.test_fraction, stratify=y, random_state=config.seed
    )
    scaler = StandardScaler().fit(x_train)

    def tensors(a: np.ndarray, b: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(scaler.transform(a), dtype=torch.float32), torch.tensor(b, dtype=torch.int64)

    return *tensors(x_train, y_train), *tensors(x_test, y_test)


def probe_set(
    x: torch.Tensor, y: torch.Tensor, per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` random training images of each class, grouped by class: [P, 64], [P]."""
    rng = np.random.default_rng(seed)
    labels = y.numpy()
    index = np.concatenate(
        [
            np.sort(rng.choice(np.flatnonzero(labels == c), per_class, replace=False))
            for c in np.unique(labels)
        ]
    )
    return x[index], y[index]


def record(run_dir: Path, config: DigitsConfig) -> None:
    """Train the MLP with the recorder attached, writing the run to ``run_dir``."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}")
    x_train, y_train, x_test, y_test = load_data(config)
    probes = probe_set(x_train, y_train, config.probes_per_class, config.seed)
    torch.manual_seed(config.seed)
    spec = ModelSpec("mlp", {"in_features": 64, "num_outputs": 10, "hidden": list(config.hidden)})
    model = build_model(spec).to(config.device)
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        optimizer = cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(
        TensorDataset(x_train, y_train), batch_size=config.batch_size, shuffle=True, generator=generator
    )
    test_loader = DataLoader(TensorDataset(x_test, y_test), batch_size=512)
    with Recorder(
        run_dir,
        model,
        optimizer,
        probes=probes,
        model_spec=spec,
        task="classification",
        loss="cross_entropy",
        schedule=Schedule.every(config.snapshot_every),
        seed=config.seed,
        preset="digits",
        extra={"config": asdict(config)},
    ) as recorder:
        threads = torch.get_num_threads()
        torch.set_num_threads(config.threads)
        try:
            train(
                model,
                optimizer,
                "cross_entropy",
                train_loader,
                test_loader,
                config.epochs,
                recorder,
                config.device,
                progress=config.progress,
            )
        finally:
            torch.set_num_threads(threads)


register_preset(
    Preset(
        name="digits",
        help="MLP (64 -> 128 -> 10) on scikit-learn's handwritten digits, Adam; about 10 s on 2 cores",
        config_cls=DigitsConfig,
        record=record,
    )
)

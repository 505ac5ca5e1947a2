"""The ``digits-pairs`` preset: He & Su's local-elasticity clustering protocol (ICLR 2020) on
scikit-learn's bundled 8x8 digits (no download).

He & Su cluster two digit classes (MNIST 5 vs 8, 4 vs 9, 7 vs 9, 3 vs 5, ...) without ever
showing the network which image belongs to which of the two: a two-layer ReLU network with one
output is trained by SGD on the squared error to tell the pair (target 1, both classes alike)
from one or two *background* classes (target 0); the similarity of two images of the pair is
then how much an SGD step on one moves the output at the other, and the pair is clustered on it
(``cli.py cluster``). Here:

- data: every image of the digits ``classes`` (target 1) and ``background`` (target 0), pixels
  scaled from ``0 .. 16`` to ``[-1, 1]`` (He & Su's ``Normalize((0.5,), (0.5,))``); every image
  of ``classes`` is also a probe (about 180 a class), grouped by class, its digit in
  ``spec.json`` ``extra`` ``probe_classes``;
- model: ``mlp`` with one hidden ReLU layer of ``hidden`` units and one output (He & Su: 40960
  units on 784 pixels; 256 on 64 pixels keeps a replay of 360 probes to seconds a snapshot);
- training: plain SGD (no momentum, no weight decay) on the batch mean of the squared error
  (``mse``, He & Su's ``nn.MSELoss``), a snapshot every ``snapshot_every`` steps (He & Su
  measure once, at the trained weights; here every snapshot is measured);
- test loss: the squared output on the images of the digits in neither list, target 0 (digits
  the network never saw should not look like the pair).

Replay with ``--update sgd`` (He & Su's virtual step) and the measures ``orig_outputs_l2`` (their
relative similarity ``|f(x_j; w+) - f(x_j; w)| / |f(x_i; w+) - f(x_i; w)|``) and ``linear`` (its
first-order form, ``|K(x_j, x_i)| / K(x_i, x_i)`` with the network's tangent kernel ``K``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from recorder.datasets import stratified_sample
from recorder.presets import Preset, check_settings, register_preset
from recorder.rundir.errors import DataError
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import record_supervised

# He & Su's background ("neg") classes of their MNIST pairs (scripts/run_elastic_effect_clustering_MNIST.sh)
HE_SU_BACKGROUND: dict[tuple[int, ...], list[int]] = {
    (3, 5): [8, 9],
    (4, 9): [5, 7],
    (7, 9): [5, 4],
    (5, 8): [9, 3],
    (5, 9): [8, 4],
    (3, 8): [5],
}
PIXEL_MAX = 16.0  # load_digits' pixel values run from 0 to 16


@dataclass
class DigitsPairsConfig:
    classes: list[int] = field(
        default_factory=lambda: [3, 5],
        metadata={"help": "digits to cluster (target 1): every image of them is a probe and trained on"},
    )
    background: list[int] = field(
        default_factory=list,
        metadata={
            "help": "digits trained on with target 0 (empty: He & Su's for their pairs: 3,5: 8,9; "
            "4,9: 5,7; 7,9: 5,4; 5,8: 9,3; 5,9: 8,4; 3,8: 5)"
        },
    )
    hidden: int = field(default=256, metadata={"help": "width of the hidden ReLU layer"})
    lr: float = field(default=0.01, metadata={"help": "SGD learning rate (no momentum, no weight decay)"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    epochs: int = field(default=10, metadata={"help": "training epochs"})
    snapshot_every: int = field(default=20, metadata={"help": "snapshot every this many optimizer steps"})
    seed: int = field(default=0, metadata={"help": "seed of the initial weights and the batches"})
    threads: int = field(
        default=1, metadata={"help": "CPU threads while training (this small net is slower with more)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


def background_classes(config: DigitsPairsConfig) -> list[int]:
    """The background digits of ``config``: its own, or He & Su's for their pairs; raises
    :class:`DataError` for digits out of range, repeated or in both lists."""
    digits = [*config.classes, *config.background]
    if len(config.classes) < 2 or len(set(digits)) != len(digits) or not all(0 <= d <= 9 for d in digits):
        raise DataError(
            f"classes={config.classes}, background={config.background}: classes must be at least two "
            "distinct digits 0 .. 9, background digits neither repeated nor among them"
        )
    background = config.background or HE_SU_BACKGROUND.get(tuple(sorted(config.classes)))
    if not background:
        raise DataError(
            f"classes={config.classes} is none of He & Su's pairs ({', '.join(map(str, HE_SU_BACKGROUND))}); "
            "set its background digits, e.g. --set background=[8,9]"
        )
    if len(config.classes) + len(background) == 10:
        raise DataError("classes and background cover every digit: leave one out for the test loss")
    return list(background)


def record(run_dir: Path, config: DigitsPairsConfig) -> None:
    """Train the network on ``classes`` against ``background`` with the recorder attached."""
    check_settings(config)
    background = background_classes(config)
    x, y = load_digits(return_X_y=True)
    inputs = torch.tensor(2 * x / PIXEL_MAX - 1, dtype=torch.float32)  # [N, 64] in [-1, 1]
    pair = np.isin(y, config.classes)
    targets = torch.tensor(pair, dtype=torch.float32)[:, None]  # [N, 1]: 1 for the pair, 0 else
    train = pair | np.isin(y, background)
    probes = stratified_sample(y, None, config.seed, config.classes)  # the pair's images, by class
    record_supervised(
        run_dir,
        ModelSpec("mlp", {"in_features": inputs.shape[1], "num_outputs": 1, "hidden": [config.hidden]}),
        functools.partial(torch.optim.SGD, lr=config.lr),
        DataLoader(
            TensorDataset(inputs[train], targets[train]),
            batch_size=config.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(config.seed),
        ),
        DataLoader(TensorDataset(inputs[~train], targets[~train]), batch_size=1024),
        (inputs[probes], targets[probes]),
        Schedule.every(config.snapshot_every),
        task="regression",
        loss="mse",
        epochs=config.epochs,
        seed=config.seed,
        preset="digits-pairs",
        extra={"config": asdict(config), "background": background, "probe_classes": y[probes].tolist()},
        threads=config.threads,
        progress=config.progress,
    )


register_preset(
    Preset(
        name="digits-pairs",
        help="He & Su's clustering protocol on the digits: a pair (target 1) against background digits "
        "(target 0), ReLU net with one output, SGD; every image of the pair a probe",
        config_cls=DigitsPairsConfig,
        record=record,
    )
)

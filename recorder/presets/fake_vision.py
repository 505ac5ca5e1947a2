"""Generated stand-ins for CIFAR-10, CIFAR-100 and SVHN in the on-disk formats torchvision reads.

For smoke tests on machines without the real data: the files have the real names, layout and
encodings (CIFAR python pickle batches, SVHN MATLAB ``.mat``), with random images whose colour
depends on the class (so that a network can learn them). Their md5 sums are not torchvision's:
read them with the vision presets' ``verify_md5=false``.

Command line: ``python -m recorder.presets.fake_vision {cifar10,cifar100,svhn} ROOT
[--train-per-class N] [--test-per-class M] [--seed S]``.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np
import scipy.io

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_BATCHES = 5
CIFAR100_COARSE = 20


def fake_images(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 images ``[N, 32, 32, 3]`` (HWC): a class colour plus uniform noise."""
    colours = np.random.default_rng(num_classes).uniform(40, 215, size=(num_classes, 3))
    noise = rng.uniform(-40, 40, size=(len(labels), 32, 32, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def balanced_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``[num_classes * per_class]`` int64 labels, each class ``per_class`` times, shuffled."""
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


def write_cifar10(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py``: ``data_batch_1..5``, ``test_batch``, ``batches.meta``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = balanced_labels(10, train_per_class, rng)
    for k, part in enumerate(np.array_split(train, CIFAR10_TRAIN_BATCHES), start=1):
        _pickle(folder / f"data_batch_{k}", _cifar_batch(part, 10, rng, f"training batch {k} of 5", "labels"))
    test = balanced_labels(10, test_per_class, rng)
    _pickle(folder / "test_batch", _cifar_batch(test, 10, rng, "testing batch 1 of 1", "labels"))
    _pickle(
        folder / "batches.meta",
        {"label_names": CIFAR10_NAMES, "num_cases_per_batch": len(train) // 5, "num_vis": 3072},
    )
    return folder


def write_cifar100(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """``root/cifar-100-python``: ``train``, ``test``, ``meta`` (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = balanced_labels(100, per_class, rng)
        batch = _cifar_batch(labels, 100, rng, name, "fine_labels")
        batch["coarse_labels"] = [int(c) % CIFAR100_COARSE for c in labels]
        _pickle(folder / name, batch)
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"class_{k:03d}" for k in range(100)],
            "coarse_label_names": [f"superclass_{k:02d}" for k in range(CIFAR100_COARSE)],
        },
    )
    return folder


def write_svhn(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """``root/train_32x32.mat`` and ``root/test_32x32.mat``: ``X`` uint8 ``[32, 32, 3, N]``,
    ``y`` uint8 ``[N, 1]`` with label 10 for the digit 0 (SVHN's convention)."""
    rng = np.random.default_rng(seed)
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        digits = balanced_labels(10, per_class, rng)
        images = fake_images(digits, 10, rng)  # [N, 32, 32, 3]
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y})
    return folder


WRITERS = {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}


def _cifar_batch(
    labels: np.ndarray, num_classes: int, rng: np.random.Generator, batch_label: str, label_key: str
) -> dict:
    """A CIFAR python batch: ``data`` uint8 ``[N, 3072]`` (channel-major rows), labels as a list."""
    images = fake_images(labels, num_classes, rng)  # [N, 32, 32, 3]
    return {
        "batch_label": batch_label,
        label_key: [int(c) for c in labels],
        "data": images.transpose(0, 3, 1, 2).reshape(len(labels), 3072),
        "filenames": [f"fake_{k:06d}.png" for k in range(len(labels))],
    }


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(WRITERS))
    parser.add_argument("root", type=Path, help="the data_root the vision presets will read")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    where = WRITERS[args.dataset](args.root, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote a generated {args.dataset} into {where}")


if __name__ == "__main__":
    main()

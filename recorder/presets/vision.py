"""The paper's classification experiments (SPEC §5): ResNet-18 without normalization layers on
three classes of CIFAR-10, SVHN or CIFAR-100, Adam, snapshots every 9 batches.

Presets ``cifar10-resnet18``, ``svhn-resnet18`` and ``cifar100-resnet18`` record a run group
(:mod:`recorder.rundir.group`): ``runs`` independent runs, run ``k`` with seed ``seed + k``. The seed of
a run draws its training images (``train_per_class`` of each kept class), its probe set
(``probes_per_class`` of those training images, grouped by class, without augmentation), its
test images (when ``test_per_class`` is set), the initial weights, the batch order and the
augmentation. Output ``k`` of the model is the ``k``-th kept class; ``spec.json`` ``extra`` holds
``config``, ``classes`` (the dataset labels kept) and ``class_names``.

``protocol=seed`` follows the paper's notebooks where they differ from that description: every
training image carries one random crop and flip drawn once by the run's seed and then frozen
(:class:`FixedAugmentation`), so the probes are training images as trained on, the same at every
snapshot; the last incomplete batch of an epoch is dropped; snapshots follow ``batch_idx %
snapshot_every == 0`` with the batch index restarting every epoch
(:meth:`~recorder.schedule.Schedule.every_in_epoch`); and every epoch also logs
``train_sample_acc`` (and ``train_sample_loss``), the accuracy on ``train_sample_per_class``
training images of each class drawn from the whole training split, each with its own frozen
augmentation: the kind of accuracy the paper published as its test accuracy.

The data are read by torchvision's dataset classes from ``data_root`` (CIFAR: the folders
``cifar-10-batches-py`` / ``cifar-100-python``; SVHN: ``train_32x32.mat`` and ``test_32x32.mat``),
downloaded there only with ``download=true``.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from recorder.datasets import stratified_sample
from recorder.presets import Preset, register_preset
from recorder.rundir.errors import DataError
from recorder.rundir.group import record_group
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from recorder.training import record_supervised

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
SIZE, PADDING = 32, 4  # the augmentation's crop: SIZE x SIZE of the image padded by PADDING zeros
PROTOCOLS = ("default", "seed")
EVAL_TRANSFORM = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
TRAIN_TRANSFORM = transforms.Compose(
    [
        transforms.RandomCrop(SIZE, padding=PADDING),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ]
)

_VisionSet = TypeVar("_VisionSet", datasets.CIFAR10, datasets.SVHN)


class _LoaderOptions(TypedDict):
    """The DataLoader options both loaders share."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool


@dataclass
class VisionConfig:
    """The settings of a vision preset; the defaults are SPEC §5's CIFAR-10 experiment."""

    classes: list[int] = field(
        default_factory=lambda: [0, 1, 8], metadata={"help": "dataset labels kept; output k is the k-th"}
    )
    train_per_class: int = field(default=5000, metadata={"help": "training images of each kept class"})
    test_per_class: int | None = field(
        default=None, metadata={"help": "test images of each kept class for the test accuracy (null: all)"}
    )
    probes_per_class: int = field(
        default=20,
        metadata={
            "help": "training images of each class in the probe set (not augmented but under protocol=seed)"
        },
    )
    batch_size: int = field(default=256, metadata={"help": "training batch size"})
    epochs: int = field(default=7, metadata={"help": "training epochs"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=1e-4, metadata={"help": "Adam weight decay"})
    snapshot_every: int = field(default=9, metadata={"help": "snapshot every this many batches"})
    protocol: str = field(
        default="default",
        metadata={
            "help": "default, or seed: the paper's notebooks (augmentation drawn once and frozen, probes "
            "included; snapshots at batch_idx % snapshot_every == 0 within each epoch; last incomplete "
            "batch dropped; an accuracy on training images, train_sample_acc)",
            "choices": PROTOCOLS,
        },
    )
    train_sample_per_class: int = field(
        default=1000,
        metadata={"help": "protocol=seed: training images of each class in train_sample_acc"},
    )
    runs: int = field(
        default=3, metadata={"help": "independent runs (seeds seed, seed+1, ...): RUN_DIR/run-00, ..."}
    )
    seed: int = field(default=0, metadata={"help": "seed of the first run"})
    data_root: str = field(default="data", metadata={"help": "folder of the torchvision data set"})
    download: bool = field(
        default=False, metadata={"help": "download the data set into data_root if missing"}
    )
    verify_md5: bool = field(
        default=True,
        metadata={"help": "check torchvision's md5 sums of the files (false for generated data)"},
    )
    device: str = field(default="auto", metadata={"help": "torch device; auto: cuda if available, else cpu"})
    workers: int = field(default=2, metadata={"help": "data-loading worker processes"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class SvhnConfig(VisionConfig):
    classes: list[int] = field(
        default_factory=lambda: [0, 2, 4], metadata={"help": "dataset labels kept; output k is the k-th"}
    )
    train_per_class: int = field(default=4000, metadata={"help": "training images of each kept class"})
    train_sample_per_class: int = field(
        default=800,
        metadata={"help": "protocol=seed: training images of each class in train_sample_acc"},
    )


@dataclass
class Cifar100Config(VisionConfig):
    classes: list[int] = field(
        default_factory=lambda: [48, 53, 94], metadata={"help": "dataset labels kept; output k is the k-th"}
    )
    train_per_class: int = field(default=500, metadata={"help": "training images of each kept class"})
    batch_size: int = field(default=25, metadata={"help": "training batch size"})
    train_sample_per_class: int = field(
        default=100,
        metadata={"help": "protocol=seed: training images of each class in train_sample_acc"},
    )


@dataclass(frozen=True)
class VisionData:
    """How torchvision reads one data set: its class, split argument and label attribute."""

    title: str
    cls: type[datasets.CIFAR10] | type[datasets.SVHN]  # CIFAR100 is a CIFAR10
    num_classes: int

    def files(self, root: Path) -> list[Path]:
        """The files torchvision checks (train, test, meta)."""
        if issubclass(self.cls, datasets.CIFAR10):
            names = [f for f, _ in self.cls.train_list + self.cls.test_list] + [self.cls.meta["filename"]]
            return [root / self.cls.base_folder / f for f in names]
        return [root / self.cls.split_list[s][1] for s in ("train", "test")]

    def load(self, config: VisionConfig, train: bool) -> datasets.VisionDataset:
        """The torchvision data set (no transform) of one split; :class:`DataError` if missing."""
        cls = self.cls if config.verify_md5 else _without_md5(self.cls)
        split = (
            {"train": train} if issubclass(cls, datasets.CIFAR10) else {"split": "train" if train else "test"}
        )
        root = Path(config.data_root).expanduser()
        try:
            return cls(str(root), download=config.download, **split)
        except RuntimeError as e:
            missing = [str(p) for p in self.files(root) if not p.is_file()]
            if missing:
                problem = f"not found in {root} (missing {', '.join(missing)})"
            else:
                problem = f"in {root} does not match torchvision's md5 sums ({e}); for generated data set verify_md5=false"
            raise DataError(
                f"{self.title} {problem}: pass --set download=true to download it, "
                "or --set data_root=DIR to point at a copy"
            ) from None

    def labels(self, dataset: datasets.VisionDataset) -> np.ndarray:
        """``[N]`` int64 labels of every image of ``dataset``."""
        return np.asarray(dataset.targets if hasattr(dataset, "targets") else dataset.labels, dtype=np.int64)

    def class_names(self, dataset: datasets.VisionDataset) -> list[str]:
        return list(getattr(dataset, "classes", [str(c) for c in range(self.num_classes)]))


DATA = {
    "cifar10-resnet18": VisionData("CIFAR-10", datasets.CIFAR10, 10),
    "svhn-resnet18": VisionData("SVHN", datasets.SVHN, 10),
    "cifar100-resnet18": VisionData("CIFAR-100", datasets.CIFAR100, 100),
}
CONFIGS = {"cifar10-resnet18": VisionConfig, "svhn-resnet18": SvhnConfig, "cifar100-resnet18": Cifar100Config}


def _without_md5(cls: type[_VisionSet]) -> type[_VisionSet]:
    """A subclass of a torchvision data set that checks that its files exist, not their md5 sums."""
    if issubclass(cls, datasets.CIFAR10):
        attrs: dict[str, Any] = {
            "train_list": [[f, None] for f, _ in cls.train_list],
            "test_list": [[f, None] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": None},
        }
    else:
        attrs = {"split_list": {s: [url, f, None] for s, (url, f, _) in cls.split_list.items()}}
    return cast(type[_VisionSet], type(cls.__name__, (cls,), attrs))  # a subclass of cls


@dataclass(frozen=True)
class FixedAugmentation:
    """The training augmentation (a ``SIZE`` x ``SIZE`` crop of the image padded by ``PADDING``
    zero pixels, a horizontal flip with probability 1/2) drawn once per image and then frozen:
    image ``k`` is always cropped at ``offsets[k]`` (top, left; ``[N, 2]`` in ``0 .. 2 * PADDING``)
    and flipped where ``flips[k]`` (``[N]`` bool)."""

    offsets: np.ndarray
    flips: np.ndarray

    @classmethod
    def draw(cls, n: int, rng: np.random.Generator) -> FixedAugmentation:
        """The augmentations of ``n`` images, drawn from ``rng``."""
        return cls(rng.integers(0, 2 * PADDING + 1, size=(n, 2)), rng.random(n) < 0.5)

    def __call__(self, image: Any, k: int) -> Any:
        """Image ``k`` (a PIL image) augmented."""
        top, left = (int(v) for v in self.offsets[k])
        image = transforms.functional.crop(transforms.functional.pad(image, PADDING), top, left, SIZE, SIZE)
        return transforms.functional.hflip(image) if self.flips[k] else image


class Selected(Dataset):
    """Images ``index`` of ``base`` through ``augmentation`` (if any, by position in ``index``)
    and ``transform``, labels mapped to ``0 .. K-1``: items (``[3, 32, 32]`` float32, int)."""

    def __init__(
        self,
        base: Dataset,
        index: np.ndarray,
        labels: np.ndarray,
        transform: Any,
        augmentation: FixedAugmentation | None = None,
    ):
        self.base, self.index, self.labels, self.transform = base, index, labels, transform
        self.augmentation = augmentation

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        image, _ = self.base[int(self.index[k])]
        if self.augmentation is not None:
            image = self.augmentation(image, k)
        return self.transform(image), int(self.labels[k])


def model_spec(num_outputs: int) -> ModelSpec:
    """The paper's model: ResNet-18 in torchvision's layout without normalization layers."""
    return ModelSpec("resnet18_nonorm", {"num_outputs": num_outputs})


def select(
    labels: np.ndarray, classes: list[int], per_class: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` random images (all with None) of each class, grouped by class: indices ``[M]``
    into ``labels`` and their new labels ``[M]`` (position of the class in ``classes``)."""
    index = stratified_sample(labels, per_class, rng, classes)
    return index, (labels[index][:, None] == np.asarray(classes)).argmax(axis=1).astype(np.int64)


def check_counts(labels: np.ndarray, classes: list[int], per_class: int | None, what: str, knob: str) -> None:
    """Raise :class:`DataError` unless every class has ``per_class`` images in ``labels`` ``[N]``."""
    for c in classes:
        have = int(np.sum(labels == c))
        if per_class is not None and have < per_class:
            raise DataError(f"{what}: class {c} has {have} images, {per_class} were asked for (lower {knob})")


def record(run_dir: Path, config: VisionConfig, preset: str) -> None:
    """Record the run group ``run_dir``: ``config.runs`` runs of ``preset``."""
    data = DATA[preset]
    bad = [c for c in config.classes if not 0 <= c < data.num_classes]
    if len(config.classes) < 2 or len(set(config.classes)) != len(config.classes) or bad:
        raise DataError(
            f"classes must be at least two distinct labels in [0, {data.num_classes}), got {config.classes}"
        )
    if config.probes_per_class > config.train_per_class:
        raise DataError("probes_per_class cannot exceed train_per_class: probes are training images")
    seed_protocol = config.protocol == "seed"
    if seed_protocol and config.train_per_class * len(config.classes) < config.batch_size:
        raise DataError(
            "protocol=seed drops the last incomplete batch: train_per_class times the number of classes "
            "must be at least batch_size"
        )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    train_set, test_set = data.load(config, train=True), data.load(config, train=False)
    check_counts(
        data.labels(train_set),
        config.classes,
        config.train_per_class,
        f"{data.title} training set",
        "train_per_class",
    )
    check_counts(
        data.labels(test_set),
        config.classes,
        config.test_per_class,
        f"{data.title} test set",
        "test_per_class",
    )
    if seed_protocol:
        check_counts(
            data.labels(train_set),
            config.classes,
            config.train_sample_per_class,
            f"{data.title} training set",
            "train_sample_per_class",
        )
    settings = {**asdict(config), "device": device}
    record_group(
        run_dir,
        preset,
        settings,
        config.runs,
        config.seed,
        functools.partial(
            _record_run, config=config, preset=preset, device=device, sets=(train_set, test_set)
        ),
    )


def _record_run(
    run_dir: Path,
    seed: int,
    config: VisionConfig,
    preset: str,
    device: str,
    sets: tuple[datasets.VisionDataset, datasets.VisionDataset],
) -> None:
    """One run of the group with seed ``seed``."""
    data = DATA[preset]
    train_set, test_set = sets
    rng = np.random.default_rng(seed)
    train_index, train_labels = select(data.labels(train_set), config.classes, config.train_per_class, rng)
    test_index, test_labels = select(data.labels(test_set), config.classes, config.test_per_class, rng)
    probe_pos = stratified_sample(train_labels, config.probes_per_class, rng)
    seed_protocol = config.protocol == "seed"
    augmentation = FixedAugmentation.draw(len(train_index), rng) if seed_protocol else None
    # the training images as the seed protocol trains on them (otherwise not augmented)
    fixed = Selected(train_set, train_index, train_labels, EVAL_TRANSFORM, augmentation)
    probe_inputs = torch.stack([fixed[int(k)][0] for k in probe_pos])  # [P, 3, 32, 32]
    probe_targets = torch.from_numpy(train_labels[probe_pos])  # [P]
    train_data = fixed if seed_protocol else Selected(train_set, train_index, train_labels, TRAIN_TRANSFORM)

    loader_options: _LoaderOptions = {
        "num_workers": config.workers,
        "pin_memory": device.startswith("cuda"),
        "persistent_workers": config.workers > 0,
    }
    train_loader = DataLoader(
        train_data,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=seed_protocol,
        generator=torch.Generator().manual_seed(seed),
        **loader_options,
    )
    eval_loaders: dict[str, DataLoader] = {}
    images = {"train": len(train_index), "test": len(test_index)}
    if seed_protocol:  # the notebooks' "test" accuracy: training images, each augmented once
        sample_index, sample_labels = select(
            data.labels(train_set), config.classes, config.train_sample_per_class, rng
        )
        sample_augmentation = FixedAugmentation.draw(len(sample_index), rng)
        sample = Selected(train_set, sample_index, sample_labels, EVAL_TRANSFORM, sample_augmentation)
        eval_loaders["train_sample"] = DataLoader(sample, batch_size=512, **loader_options)
        images["train_sample"] = len(sample_index)
    schedule = (
        Schedule.every_in_epoch(config.snapshot_every, len(train_loader))
        if seed_protocol
        else Schedule.every(config.snapshot_every)
    )
    names = data.class_names(train_set)
    record_supervised(
        run_dir,
        model_spec(len(config.classes)),
        functools.partial(torch.optim.Adam, lr=config.lr, weight_decay=config.weight_decay),
        train_loader,
        DataLoader(
            Selected(test_set, test_index, test_labels, EVAL_TRANSFORM), batch_size=512, **loader_options
        ),
        (probe_inputs, probe_targets),
        schedule,
        task="classification",
        loss="cross_entropy",
        epochs=config.epochs,
        seed=seed,
        preset=preset,
        extra={
            "config": {**asdict(config), "seed": seed, "device": device},
            "classes": list(config.classes),
            "class_names": [names[c] for c in config.classes],
            "images": images,
        },
        device=device,
        progress=config.progress,
        eval_loaders=eval_loaders,
    )


_HELP = {
    "cifar10-resnet18": "SPEC §5: ResNet-18 (no norm) on CIFAR-10 planes, cars, ships; Adam; 3 runs",
    "svhn-resnet18": "SPEC §5: ResNet-18 (no norm) on SVHN digits 0, 2, 4; Adam; 3 runs",
    "cifar100-resnet18": "SPEC §5: ResNet-18 (no norm) on CIFAR-100 motorcycle, orange, wardrobe; Adam; 3 runs",
}
for _name, _cls in CONFIGS.items():
    register_preset(
        Preset(name=_name, help=_HELP[_name], config_cls=_cls, record=functools.partial(record, preset=_name))
    )

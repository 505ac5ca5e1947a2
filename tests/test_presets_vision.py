"""The vision presets (SPEC §5) end to end at tiny sizes on the CPU, on files written in the real
on-disk formats (CIFAR python pickle batches, SVHN .mat) and read through torchvision's loaders.

torchvision compares each file with the md5 sum of the real data set, which generated files
cannot match: the tests put the md5 sums of the files they wrote into the dataset classes (so
torchvision's own integrity check runs and passes), except where they test the ``verify_md5``
switch and the errors.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from torchvision import datasets
from torchvision.datasets.utils import calculate_md5

from recorder.presets import PRESETS
from recorder.presets.fake_vision import WRITERS
from recorder.presets.vision import DATA, MEAN, STD
from recorder.rundir.errors import DataError
from recorder.rundir.run import RunDir

DATASET = {"cifar10-resnet18": "cifar10", "svhn-resnet18": "svhn", "cifar100-resnet18": "cifar100"}
TRAIN_FILES, TEST_FILES = 6, 3  # images of every class in the written files
TINY = {
    "train_per_class": 4,
    "test_per_class": 2,
    "probes_per_class": 2,
    "batch_size": 6,
    "epochs": 1,
    "workers": 0,
    "device": "cpu",
    "progress": False,
}


def trust_written_files(monkeypatch, cls, root):
    """Give the torchvision class ``cls`` the md5 sums of the files written under ``root``."""
    if issubclass(cls, datasets.CIFAR10):
        folder = root / cls.base_folder

        def listed(entries):
            return [[name, calculate_md5(folder / name)] for name, _ in entries]

        monkeypatch.setattr(cls, "train_list", listed(cls.train_list))
        monkeypatch.setattr(cls, "test_list", listed(cls.test_list))
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": calculate_md5(folder / cls.meta["filename"])})
    else:
        split_list = {
            s: [url, f, calculate_md5(root / f)] for s, (url, f, _) in cls.split_list.items() if s != "extra"
        }
        monkeypatch.setattr(cls, "split_list", split_list)


def raw_train_images(preset, root):
    """The written training images ``[N, 32, 32, 3]`` uint8 and labels ``[N]``, read without torchvision."""
    if preset == "svhn-resnet18":
        mat = scipy.io.loadmat(root / "train_32x32.mat")
        labels = mat["y"][:, 0].astype(np.int64)
        return mat["X"].transpose(3, 0, 1, 2), np.where(labels == 10, 0, labels)
    cls = DATA[preset].cls
    batches = []
    for name, _ in cls.train_list:
        with open(root / cls.base_folder / name, "rb") as f:
            batches.append(pickle.load(f, encoding="latin1"))
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    key = "labels" if "labels" in batches[0] else "fine_labels"
    return data, np.concatenate([b[key] for b in batches])


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(DATASET))
def test_vision_preset_records_a_run_group_from_torchvision_files(tmp_path, monkeypatch, preset):
    root = tmp_path / "data"
    WRITERS[DATASET[preset]](root, TRAIN_FILES, TEST_FILES, seed=1)
    trust_written_files(monkeypatch, DATA[preset].cls, root)
    runs = 2 if preset == "cifar10-resnet18" else 1
    spec = PRESETS[preset]
    # cifar10 with the preset's default data-loading workers (2): processes forked while the
    # recorder's writer runs, alive until each run is closed
    workers = spec.config_cls().workers if preset == "cifar10-resnet18" else 0
    config = spec.config_cls(**(TINY | {"workers": workers}), data_root=str(root), runs=runs, seed=5)
    spec.record(tmp_path / "run", config)

    group = json.loads((tmp_path / "run" / "group.json").read_text())
    assert group["preset"] == preset
    assert group["runs"] == [{"dir": f"run-{k:02d}", "seed": 5 + k} for k in range(runs)]
    images, labels = raw_train_images(preset, root)
    probe_sets = []
    for k in range(runs):
        run = RunDir(tmp_path / "run" / f"run-{k:02d}")
        assert run.spec.preset == preset and run.spec.seed == 5 + k
        assert run.spec.model.factory == "resnet18_nonorm" and run.spec.num_outputs == 3
        assert run.spec.extra["classes"] == list(config.classes)
        assert run.spec.extra["images"] == {"train": 12, "test": 6}
        # 12 training images in batches of 6: steps 0 (always) and 2 (the last)
        assert [e.step for e in run.manifest] == [0, 2]
        epochs = [m for m in run.metrics() if m.get("kind") == "epoch"]
        assert len(epochs) == 1 and 0 <= epochs[0]["test_acc"] <= 1

        inputs, targets = run.probes()
        assert inputs.shape == (6, 3, 32, 32) and inputs.dtype == torch.float32
        assert targets.tolist() == [0, 0, 1, 1, 2, 2]  # grouped by class, in the order of `classes`
        # Each probe is a written training image of its class, normalized and not augmented.
        pixels = inputs * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
        pixels = (pixels.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # [P, 32, 32, 3]
        for image, target in zip(pixels, targets.tolist(), strict=True):
            matches = np.flatnonzero((images == image).all(axis=(1, 2, 3)))
            assert len(matches) == 1 and labels[matches[0]] == config.classes[target]
        probe_sets.append(pixels)
    if runs > 1:
        assert not np.array_equal(probe_sets[0], probe_sets[1])  # independent seeds


def test_missing_or_foreign_files_give_a_clear_error(tmp_path):
    config = PRESETS["cifar10-resnet18"].config_cls(data_root=str(tmp_path), verify_md5=True)
    with pytest.raises(DataError, match=r"CIFAR-10 not found .*download=true.*data_root"):
        DATA["cifar10-resnet18"].load(config, train=True)
    with pytest.raises(DataError, match="does not match torchvision's md5"):
        WRITERS["cifar10"](tmp_path, 1, 1)
        DATA["cifar10-resnet18"].load(config, train=True)
    svhn = PRESETS["svhn-resnet18"].config_cls(data_root=str(tmp_path / "svhn"))
    with pytest.raises(DataError, match=r"SVHN not found .*train_32x32.mat"):
        PRESETS["svhn-resnet18"].record(tmp_path / "run", svhn)
    for bad in ([1, 1, 2], [0, 10], [3]):
        with pytest.raises(DataError, match=r"at least two distinct labels in \[0, 10\)"):
            PRESETS["svhn-resnet18"].record(
                tmp_path / "run", PRESETS["svhn-resnet18"].config_cls(classes=bad)
            )
    assert not (tmp_path / "run").exists()  # nothing recorded


def test_verify_md5_false_reads_generated_files_through_torchvision(tmp_path):
    WRITERS["svhn"](tmp_path, 2, 1)
    config = PRESETS["svhn-resnet18"].config_cls(data_root=str(tmp_path), verify_md5=False)
    train = DATA["svhn-resnet18"].load(config, train=True)
    assert isinstance(train, datasets.SVHN) and len(train) == 20
    assert sorted(DATA["svhn-resnet18"].labels(train).tolist()) == sorted(list(range(10)) * 2)  # 10 -> 0


def test_asking_for_more_images_than_a_class_has_is_refused(tmp_path, monkeypatch):
    WRITERS["cifar100"](tmp_path, 2, 1)
    trust_written_files(monkeypatch, datasets.CIFAR100, tmp_path)
    config = PRESETS["cifar100-resnet18"].config_cls(**{**TINY, "train_per_class": 3, "probes_per_class": 1})
    config.data_root = str(tmp_path)
    with pytest.raises(DataError, match="class 48 has 2 images, 3 were asked for .lower train_per_class"):
        PRESETS["cifar100-resnet18"].record(tmp_path / "run", config)
    assert not (tmp_path / "run").exists()  # refused before anything is written

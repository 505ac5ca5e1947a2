"""The original notebooks' conventions: their ``orig`` ratio (``seed_orig``) against a literal
transcription of their code, and the vision presets' ``protocol=seed`` (snapshots by batch index
within each epoch, one-time fixed augmentation, an accuracy on training images) on generated
CIFAR files in the real on-disk format."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import zarr
from torchvision import datasets

from analyses.published import PUBLISHED
from analyses.report import analyze, format_table
from analyses.tables import paper_rows
from recorder.models import build_model
from recorder.presets import PRESETS, vision
from recorder.presets.fake_vision import WRITERS
from recorder.presets.vision import MEAN, STD
from recorder.recorder import Recorder
from recorder.rundir.run import RunDir
from recorder.rundir.spec import ModelSpec
from recorder.schedule import Schedule
from replay.config import ReplayConfig, UpdateConfig
from replay.run import replay
from replay.store import open_store
from tests.helpers import MODEL_SPECS, make_probes, make_run
from tests.test_presets_vision import raw_train_images, trust_written_files

EPSILON = 1e-8


def notebook_srel(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
    """``S[i, j]`` ``[P, P]`` as the notebooks' ``get_srel_denom`` and training loop compute it: a
    copy with a fresh ``optim.Adam(lr)`` takes one step on probe ``i`` (train mode), then
    ``sqrt(mse_loss(softmax(new), softmax(old), reduction='none')).mean(-1)`` at every probe over
    ``sqrt(mse_loss(softmax(copy(x_i)), softmax(y_pred))) + epsilon``."""
    criterion = nn.CrossEntropyLoss()
    rows = []
    for i in range(len(x)):
        model.eval()
        with torch.no_grad():
            y1 = model(x)  # g(x', w)
        model_copy = copy.deepcopy(model)
        optim_clone = torch.optim.Adam(model_copy.parameters(), lr=lr)
        model_copy.train()
        y_pred = model_copy(x[i].unsqueeze(0))
        loss = criterion(y_pred, y[i].unsqueeze(0))
        loss.backward()
        optim_clone.step()
        with torch.no_grad():
            model_copy.eval()
            denominator = (
                torch.sqrt(
                    F.mse_loss(F.softmax(model_copy(x[i].unsqueeze(0)), dim=-1), F.softmax(y_pred, dim=-1))
                )
                + EPSILON
            )
            ypred = model_copy(x)  # g(x', w+)
            numerators = torch.sqrt(
                F.mse_loss(F.softmax(ypred, dim=-1), F.softmax(y1, dim=-1), reduction="none")
            ).mean(-1)
            rows.append(numerators / denominator)
    return torch.stack(rows)


def test_seed_orig_equals_the_notebooks_code_on_a_replayed_run(tmp_path):
    run = make_run(tmp_path / "run", "small_cnn", steps=(0, 3))
    lr = 1e-3
    store = open_store(replay(run, ReplayConfig(UpdateConfig("adam-fresh", lr=lr)), progress=False))
    assert "seed_orig" in store.measure_names  # in the default set
    rundir = RunDir(run)
    x, y = rundir.probes()
    for s, entry in enumerate(rundir.manifest):
        snapshot = rundir.load_snapshot(entry)
        model = build_model(rundir.spec.model).double()
        model.load_state_dict(snapshot.params | snapshot.buffers)
        expected = notebook_srel(model, x.double(), y, lr)
        stored = torch.as_tensor(store.measures["seed_orig"].read(np.array([s]))[0])
        torch.testing.assert_close(stored, expected, rtol=1e-4, atol=0)
        # neither the l2 nor the l1 ratio, and below 1 on the diagonal (mean |d| <= rms d)
        for other in ("orig_probs_l2", "orig_probs_l1"):
            S = torch.as_tensor(store.measures[other].read(np.array([s]))[0])
            assert not torch.allclose(S, expected, rtol=1e-3)
        assert (expected.diagonal() <= 1).all() and (expected.diagonal() > 0.5).all()


# ----------------------------------------------------------------------------- protocol=seed


def test_schedule_every_in_epoch_counts_batches_from_zero_in_each_epoch():
    schedule = Schedule.every_in_epoch(3, 7)  # epochs of 7 batches: batches 0, 3, 6 of each
    assert [s for s in range(30) if schedule.due(s)] == [1, 4, 7, 8, 11, 14, 15, 18, 21, 22, 25, 28, 29]
    assert schedule.to_json() == {"every_n": 0, "steps": [], "epoch_every": 3, "epoch_length": 7}
    assert Schedule.every(9).to_json() == {"every_n": 9, "steps": []}
    for bad in ((0, 7), (3, 0), (True, 7), (3, 2.5)):
        with pytest.raises(ValueError, match="positive integer"):
            Schedule.every_in_epoch(*bad)


def crops_and_flips(image: np.ndarray) -> np.ndarray:
    """Every 32 x 32 crop of ``image`` ``[32, 32, 3]`` padded by 4 zero pixels, flipped or not:
    ``[162, 32, 32, 3]``."""
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    crops = np.stack([padded[t : t + 32, s : s + 32] for t in range(9) for s in range(9)])
    return np.concatenate([crops, crops[:, :, ::-1]])


def pixels(inputs: torch.Tensor) -> np.ndarray:
    """Normalized inputs ``[N, 3, 32, 32]`` back to uint8 images ``[N, 32, 32, 3]``."""
    x = inputs * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]
    return (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


SEED_CONFIG = {
    "train_per_class": 6,  # 18 images in batches of 4: 4 batches an epoch, the last 2 images dropped
    "test_per_class": 2,
    "probes_per_class": 2,
    "batch_size": 4,
    "epochs": 2,
    "snapshot_every": 3,
    "protocol": "seed",
    "train_sample_per_class": 5,
    "runs": 1,
    "seed": 5,
    "workers": 0,
    "device": "cpu",
    "progress": False,
}


@pytest.fixture
def seed_preset(tmp_path, monkeypatch):
    """``cifar10-resnet18`` with a tiny CNN in place of ResNet-18 (the protocol is under test) on
    generated CIFAR-10 files, and its ``protocol=seed`` configuration."""
    monkeypatch.setattr(
        vision,
        "model_spec",
        lambda n: ModelSpec("small_cnn", {"in_channels": 3, "num_outputs": n, "width": 2, "image_size": 32}),
    )
    root = tmp_path / "data"
    WRITERS["cifar10"](root, 8, 3, seed=1)
    trust_written_files(monkeypatch, datasets.CIFAR10, root)
    preset = PRESETS["cifar10-resnet18"]
    return preset, preset.config_cls(**SEED_CONFIG, data_root=str(root))


def test_seed_protocol_snapshots_by_batch_within_epochs_and_freezes_augmented_probes(tmp_path, seed_preset):
    preset, config = seed_preset
    preset.record(tmp_path / "group", config)
    run = RunDir(tmp_path / "group" / "run-00")

    # batch_idx % 3 == 0 within each epoch of 4 batches (steps e * 4 + b + 1), step 0 and the last;
    # every 3 global steps would have been 0, 3, 6, 8
    assert [e.step for e in run.manifest] == [0, 1, 4, 5, 8]
    assert [e.epoch for e in run.manifest] == [0, 0, 0, 1, 1]
    assert run.spec.extra["schedule"] == {"every_n": 0, "steps": [], "epoch_every": 3, "epoch_length": 4}
    assert run.spec.extra["images"] == {"train": 18, "test": 6, "train_sample": 15}
    epochs = [m for m in run.metrics() if m.get("kind") == "epoch"]
    assert len(epochs) == 2 and all(0 <= m["train_sample_acc"] <= 1 and "test_acc" in m for m in epochs)

    # Each probe is a written training image of its class under one crop and flip, not all the
    # identity (crop at 4, 4 without a flip); the stored probes are what every snapshot replays.
    images, labels = raw_train_images("cifar10-resnet18", Path(config.data_root))
    inputs, targets = run.probes()
    identity = 0
    for image, target in zip(pixels(inputs), targets.tolist(), strict=True):
        variants = np.stack([crops_and_flips(c) for c in images[labels == config.classes[target]]])
        found = np.argwhere((variants == image).all((2, 3, 4)))  # [(image, variant)]
        assert len(found), "a probe is not a crop and flip of a training image of its class"
        identity += bool((found[:, 1] == 4 * 9 + 4).any())
    assert identity < len(targets)

    # Frozen by the run's seed: the same seed gives the same augmented probes.
    preset.record(tmp_path / "again", dataclasses.replace(config, epochs=1))
    assert torch.equal(RunDir(tmp_path / "again" / "run-00").probes()[0], inputs)


@pytest.mark.slow
def test_seed_protocol_table_compares_seed_orig_and_training_image_accuracy(tmp_path, seed_preset):
    preset, config = seed_preset
    preset.record(tmp_path / "group", config)
    run = RunDir(tmp_path / "group" / "run-00")
    replay(run.path, ReplayConfig(measures=("seed_orig", "orig_probs_l2", "seed_kl")), progress=False)
    summary = analyze(tmp_path / "group")
    paper = summary["paper"]
    table = paper["stores"]["adam-fresh"]
    assert table["seed_orig"]["published"] == list(PUBLISHED["cifar10-resnet18"].same_cross["seed_orig"])
    assert table["orig_probs_l2"]["published"] is None
    last = [m for m in run.metrics() if m.get("kind") == "epoch"][-1]
    assert paper["test_acc"]["metric"] == "train_sample_acc"
    assert paper["test_acc"]["ours"] == pytest.approx(last["train_sample_acc"])
    text = format_table(summary)
    assert "published orig" in text and "training-image accuracy" in text


def test_paper_table_names_the_published_columns_and_the_accuracy_compared():
    paper = {
        "classes": [0, 1, 8],
        "class_names": None,
        "test_acc": {"ours": 0.8, "std": None, "published": 0.771, "metric": "test_acc"},
        "stores": {
            "adam-fresh": {"seed_orig": {"ours": [1, 2, 3], "std": [0, 0, 0], "published": [4, 5, 6]}}
        },
    }
    rows = paper_rows(paper)
    assert rows[1][:3] == ["adam-fresh", "seed_orig", "published orig"]
    assert rows[-1][1:3] == [
        "test accuracy",
        "ours 0.8, published 0.771 (ours on test images, published on training images)",
    ]
    paper["test_acc"]["metric"] = "train_sample_acc"
    assert paper_rows(paper)[-1][1:3] == [
        "training-image accuracy",
        "ours 0.8, published 0.771 (both on a sample of training images)",
    ]


# ----------------------------------------------------------------------------- faithful configuration


def test_recorded_store_shows_the_recorded_optimizer_and_learning_rates_not_unused_settings(tmp_path):
    spec = MODEL_SPECS["mlp"]
    torch.manual_seed(0)
    model = build_model(spec)
    x, y = make_probes("mlp")
    x = x.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5**s)
    recorder = Recorder(
        tmp_path / "run", model, optimizer, (x, y), spec, "classification", "cross_entropy", Schedule.every(2)
    )
    with recorder as rec:
        for _ in range(4):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            scheduler.step()
            rec.step()
    recorded = zarr.open_group(
        replay(tmp_path / "run", ReplayConfig(UpdateConfig("recorded"), measures=("kl",)), progress=False)
    )
    assert recorded.attrs["config"]["update"] == {"rule": "recorded"}  # no lr, betas, eps of its own
    assert recorded.attrs["recorded_optimizer"] == "Adam"
    # the learning rate the training had at steps 0, 2, 4
    np.testing.assert_array_equal(recorded["recorded_lr"][:], [0.01 * 0.5**s for s in (0, 2, 4)])
    fresh = zarr.open_group(replay(tmp_path / "run", ReplayConfig(measures=("kl",)), progress=False))
    assert fresh.attrs["config"]["update"] == {
        "rule": "adam-fresh",
        "lr": 1e-4,
        "eps": 1e-8,
        "betas": [0.9, 0.999],
    }
    assert "recorded_optimizer" not in fresh.attrs and "recorded_lr" not in fresh

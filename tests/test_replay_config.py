"""The replay configuration: JSON round trip, identity and validation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from recorder.rundir.errors import ReplayError
from replay.config import ReplayConfig, UpdateConfig


def test_json_round_trip_through_text():
    config = ReplayConfig(
        UpdateConfig("adam-fresh", lr=1e-3, eps=1e-6, betas=(0.5, 0.9)),
        measures=("kl", "seed_kl"),
        precision="float32",
        include_self=True,
        memory_budget=1 << 20,
        name="paper",
    )
    again = ReplayConfig.from_json(json.loads(json.dumps(config.to_json())))
    assert again == config and again.update.betas == (0.5, 0.9) and again.measures == ("kl", "seed_kl")
    assert ReplayConfig.from_json(ReplayConfig().to_json()) == ReplayConfig()


def test_identity_ignores_resources_and_fields_the_rule_does_not_use():
    base = ReplayConfig(UpdateConfig("recorded"))
    same = ReplayConfig(UpdateConfig("recorded", lr=0.5), device="cuda", memory_budget=10, name="x")
    assert base.identity() == same.identity()
    assert base.store_name == "recorded" and same.store_name == "x"
    assert ReplayConfig().identity() != ReplayConfig(UpdateConfig(lr=1e-3)).identity()
    assert ReplayConfig().identity() != ReplayConfig(ratio_eps=0.0).identity()


def test_every_field_has_help():
    for cls in (ReplayConfig, UpdateConfig):
        assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: UpdateConfig("momentum"), "not one of sgd, adam-fresh, recorded"),
        (lambda: UpdateConfig(lr=0), "lr must be positive"),
        (lambda: UpdateConfig(betas=(0.9, 1.0)), "betas"),
        (lambda: UpdateConfig("adam-fresh", weight_decay=0.1), "weight_decay applies to the 'sgd' rule only"),
        (lambda: ReplayConfig(precision="float16"), "precision"),
        (lambda: ReplayConfig(measures=()), "at least one measure"),
        (lambda: ReplayConfig(name="../x"), "store name"),
        (lambda: ReplayConfig.from_json({"bogus": 1}), "malformed replay configuration"),
    ],
)
def test_invalid_configurations_raise_replay_error(make, message):
    with pytest.raises(ReplayError, match=message):
        make()


def test_rule_choices_settings_and_checks_come_from_the_registry(monkeypatch):
    import torch

    from replay import rules, updates
    from replay.updates import sgd_step

    assert ReplayConfig(UpdateConfig("sgd", lr=0.1)).identity()["update"] == {
        "rule": "sgd",
        "lr": 0.1,
        "weight_decay": 0.0,
    }
    assert UpdateConfig("recorded").effective() == {"rule": "recorded"}
    half = rules.Declaration("half-sgd", "half an sgd step", settings=("lr", "weight_decay"))
    monkeypatch.setitem(rules.RULES, "half-sgd", half)  # what the configuration reads
    bound = updates.Rule(
        half,
        build=lambda c: (
            lambda params, grads, record: {
                k: sgd_step(w, grads[k], {}, lr=c.lr / 2, weight_decay=c.weight_decay)
                for k, w in params.items()
            }
        ),
        reference=lambda c, record: lambda m: torch.optim.SGD(m.parameters(), lr=c.lr / 2),
    )
    monkeypatch.setitem(updates.RULES, "half-sgd", bound)  # what the engine runs
    config = UpdateConfig("half-sgd", lr=0.2, weight_decay=0.1)  # weight_decay: it reads it
    assert config.effective() == {"rule": "half-sgd", "lr": 0.2, "weight_decay": 0.1}
    with pytest.raises(ReplayError, match="weight_decay applies to the 'sgd' and 'half-sgd' rules only"):
        UpdateConfig("adam-fresh", weight_decay=0.1)
    with pytest.raises(ReplayError, match="not one of sgd, adam-fresh, recorded, half-sgd"):
        UpdateConfig("momentum")

"""Probe sets of one tensor or of named tensors (``probes.safetensors``), and models that take
named inputs or return their outputs as ``logits``: written, read back, refused when malformed,
recorded by the Recorder and replayed against the plain float64 loop."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from recorder import Recorder, RunDir, RunDirError, Schedule
from recorder.models import build_model, model_outputs
from recorder.rundir.probes import decode_probes, encode_probes, num_probes, probe_problem, take
from recorder.rundir.run import RunWriter
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.check import relative_error
from replay.config import ReplayConfig, UpdateConfig
from replay.reference import plain_changes, plain_measures
from replay.run import replay
from replay.store import open_store
from replay.updates import RULES

SPEC = ModelSpec("keyword_tokens", {"vocab": 9, "num_outputs": 3})


def named_probes(count: int = 6, length: int = 4, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[count, length]`` (later tokens of some probes
    masked) and classes ``[count]``, the class in the first token."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 3
    ids = torch.randint(1, 9, (count, length), generator=g)
    ids[:, 0] = 1 + labels
    mask = torch.ones(count, length, dtype=torch.int64)
    mask[::2, length // 2 :] = 0
    return {"input_ids": ids, "attention_mask": mask}, labels


def test_named_probes_round_trip_through_the_run_directory(tmp_path):
    inputs, labels = named_probes()
    RunWriter(tmp_path / "run", RunSpec(SPEC, "classification", "cross_entropy", 3), inputs, labels)
    read, targets = RunDir(tmp_path / "run").probes()
    assert isinstance(read, dict) and sorted(read) == ["attention_mask", "input_ids"]
    for name, tensor in inputs.items():
        assert torch.equal(read[name], tensor) and read[name].dtype == tensor.dtype
    assert torch.equal(targets, labels)
    assert num_probes(read) == 6 and torch.equal(take(read, slice(1, 3))["input_ids"], inputs["input_ids"][1:3])


def test_one_tensor_probes_are_stored_as_before(tmp_path):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    tensors = decode_probes(encode_probes(x, y), "probes")
    assert torch.equal(tensors[0], x) and torch.equal(tensors[1], y)
    # the layout of the format's first version: "inputs" and "targets"
    assert torch.equal(decode_probes(st_save({"inputs": x, "targets": y}), "p")[0], x)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"inputs": torch.zeros(2, 1), "inputs.a": torch.zeros(2, 1), "targets": torch.zeros(2)}, "either"),
        ({"targets": torch.zeros(2)}, "either"),
        ({"inputs": torch.zeros(2, 1), "targets": torch.zeros(2), "extra": torch.zeros(1)}, "found"),
        ({"inputs.a": torch.zeros(2, 1)}, "targets"),
    ],
)
def test_malformed_probe_files_are_refused_in_one_line(tensors, message):
    with pytest.raises(RunDirError, match=message) as e:
        decode_probes(st_save(tensors), "RUN/probes.safetensors")
    assert "RUN/probes.safetensors" in str(e.value) and "\n" not in str(e.value)


def test_named_probes_are_checked():
    labels = torch.tensor([0, 1])
    assert "differ in their number" in probe_problem(
        "classification", 3, {"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, labels
    )
    assert "keyword argument name" in probe_problem("classification", 3, {"1x": torch.zeros(2, 3)}, labels)
    assert "no tensor" in probe_problem("classification", 3, {}, labels)
    assert "NaN" in probe_problem("classification", 3, {"a": torch.tensor([[0.0], [float("nan")]])}, labels)
    assert probe_problem("classification", 3, {"a": torch.zeros(2, 3)}, labels) is None


def test_outputs_are_a_tensor_or_the_logits_of_what_a_model_returns():
    logits = torch.randn(2, 3)
    assert model_outputs(logits) is logits
    assert model_outputs({"logits": logits, "loss": torch.tensor(1.0)}) is logits
    assert model_outputs(SimpleNamespace(logits=logits)) is logits
    with pytest.raises(TypeError, match="'logits'"):
        model_outputs((logits,))


@pytest.mark.parametrize("rule", ["adam-fresh", "recorded"])
def test_a_recorded_model_of_named_inputs_replays_as_the_plain_loop(tmp_path, rule):
    torch.manual_seed(0)
    inputs, labels = named_probes()
    model = build_model(SPEC)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Recorder(
        tmp_path / "run", model, optimizer, (inputs, labels), SPEC, "classification", "cross_entropy",
        schedule=Schedule.every(2),
    ) as rec:
        for _ in range(2):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(**inputs)["logits"], labels)
            loss.backward()
            optimizer.step()
            rec.step()
    update = UpdateConfig(rule, lr=1e-3)
    store = open_store(replay(tmp_path / "run", ReplayConfig(update, measures=("kl",)), progress=False))

    run = RunDir(tmp_path / "run")
    last = run.load_snapshot(run.manifest[-1])
    reference = build_model(SPEC).double().eval()
    reference.load_state_dict(last.params)
    record = last.optimizer
    if record is not None:  # its state in float64, as the copy's weights
        record.state = {n: {k: v.double() if v.is_floating_point() else v for k, v in s.items()} for n, s in record.state.items()}
    make_optimizer = RULES[rule].reference(update, record)
    expected = plain_measures(*plain_changes(reference, make_optimizer, "cross_entropy", inputs, labels))
    replayed = torch.as_tensor(np.asarray(store.measures["kl"].read(np.array([len(run.manifest) - 1]))[0]))
    assert relative_error({"kl": replayed}, {"kl": expected["kl"]}) < 1e-4

"""The conformance matrix: model features (:mod:`recorder.models`), each recorded after a few real
training steps and replayed with every update rule in the default precision (``auto``), against
the plain float64 loop of :mod:`replay.reference` (a deep copy, the real ``torch.optim`` step,
every probe evaluated) in eval mode, the replay's stated semantics.

``python -m tests.test_conformance`` prints the table of errors and times against the loop.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch import Tensor

from recorder.losses import batch_loss
from recorder.models import PAD_TOKEN, build_model, forward
from recorder.rundir.probes import Inputs, map_inputs, take
from recorder.rundir.run import RunDir, RunWriter
from recorder.rundir.snapshot import Snapshot
from recorder.rundir.spec import ModelSpec, RunSpec
from replay.check import relative_error
from replay.config import ReplayConfig, UpdateConfig
from replay.engine import Engine
from replay.precision import AUTO_TARGET
from replay.reference import plain_changes, plain_measures
from replay.run import replay
from replay.state import uncompiled
from replay.store import open_store
from replay.updates import RULES
from tests.helpers import snapshot

NUM_CLASSES, PER_CLASS, STEPS = 3, 3, 3
SLOW = (pytest.mark.slow,)  # the rows that take seconds a replay
RULE_CONFIGS = {
    "adam-fresh": UpdateConfig("adam-fresh", lr=1e-3),
    "sgd": UpdateConfig("sgd", lr=1e-3),
    "recorded": UpdateConfig("recorded"),
}


def _features(*shape: int) -> Callable[[torch.Generator, Tensor], Tensor]:
    """Float probe inputs ``[P, *shape]``, shifted by their class ``[P]``."""

    def make(g: torch.Generator, labels: Tensor) -> Tensor:
        x = torch.randn((len(labels), *shape), generator=g)
        return x + labels.view(-1, *[1] * len(shape))

    return make


def _tokens(vocab: int, length: int) -> Callable[[torch.Generator, Tensor], Tensor]:
    """int64 token ids ``[P, length]`` in ``1 .. vocab - 1``, the tail of some padded with :data:`PAD_TOKEN`."""

    def make(g: torch.Generator, labels: Tensor) -> Tensor:
        ids = torch.randint(1, vocab, (len(labels), length), generator=g)
        ids[:, 0] = 1 + labels  # the class is in the first token
        lengths = torch.randint(2, length + 1, (len(labels),), generator=g)
        return ids.masked_fill(torch.arange(length) >= lengths[:, None], PAD_TOKEN)

    return make


def _masked_tokens(vocab: int, length: int) -> Callable[[torch.Generator, Tensor], Inputs]:
    """Named inputs of a transformers model: ``input_ids`` as :func:`_tokens` makes them and their
    ``attention_mask`` (1 for a token, 0 for padding), each ``[P, length]``."""
    tokens = _tokens(vocab, length)

    def make(g: torch.Generator, labels: Tensor) -> Inputs:
        ids = tokens(g, labels)
        return {"input_ids": ids, "attention_mask": (ids != PAD_TOKEN).long()}

    return make


def _pixels(g: torch.Generator, labels: Tensor) -> Inputs:
    """Named inputs of a transformers image classifier: ``pixel_values`` ``[P, 3, 8, 8]``."""
    return {"pixel_values": _features(3, 8, 8)(g, labels)}


def _transformers(model_type: str, auto_class: str = "AutoModelForSequenceClassification", **config: object) -> dict:
    """The kwargs of the ``transformers`` factory for a tiny randomly initialised classifier of
    ``model_type`` (built by ``auto_class``) with ``NUM_CLASSES`` labels."""
    config = {"model_type": model_type, "num_labels": NUM_CLASSES, "pad_token_id": PAD_TOKEN} | config
    return {"auto_class": auto_class, "config": config}


@dataclass(frozen=True)
class Row:
    """One model feature: its model, probes, and how it was trained and recorded."""

    name: str
    factory: str
    kwargs: dict
    inputs: Callable[[torch.Generator, Tensor], Inputs]
    num_outputs: int = NUM_CLASSES
    autocast: bool = False  # trained under bfloat16 autocast (weights stay float32)
    groups: bool = False  # two parameter groups with their own lr and weight decay
    compiled: bool = False  # recorded through torch.compile: names carry ``_orig_mod.``
    marks: tuple = field(default=())


ROWS = (
    Row("batchnorm", "bn_cnn", {}, _features(1, 6, 6)),
    Row("dropout", "dropout_mlp", {"in_features": 6}, _features(6)),
    Row("float64 buffer, int buffer", "mixed_dtypes", {"in_features": 6}, _features(6)),
    Row("layernorm, gelu, attention", "tiny_attention", {"in_features": 4}, _features(3, 4), marks=SLOW),
    Row("embedding, padding mask", "token_bag", {"vocab": 12}, _tokens(12, 5)),
    Row("gru", "gru", {"in_features": 3}, _features(4, 3), marks=SLOW),
    Row("tied weights", "tied_tokens", {"vocab": 6}, _tokens(6, 4), num_outputs=6),
    Row("named inputs, dict outputs", "keyword_tokens", {"vocab": 12}, _masked_tokens(12, 5)),
    Row("frozen parameters", "adapter", {"in_features": 6}, _features(6)),
    Row("parameter groups", "mlp", {"in_features": 6, "hidden": [8]}, _features(6), groups=True),
    Row("autocast bfloat16", "mlp", {"in_features": 6, "hidden": [8]}, _features(6), autocast=True),
    Row(
        "torch.compile names",
        "mlp",
        {"in_features": 6, "hidden": [8]},
        _features(6),
        compiled=True,
        marks=SLOW,
    ),
    Row(
        "transformers BERT, attention mask",
        "transformers",
        _transformers(
            "bert",
            vocab_size=12,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=8,
        ),
        _masked_tokens(12, 5),
        marks=SLOW,
    ),
    Row(
        "transformers GPT-2",
        "transformers",
        _transformers(
            "gpt2", vocab_size=12, n_embd=8, n_layer=1, n_head=2, n_positions=8, bos_token_id=1, eos_token_id=1
        ),
        _masked_tokens(12, 5),
        marks=SLOW,
    ),
    Row(
        "transformers ViT, pixel_values",
        "transformers",
        _transformers(
            "vit",
            "AutoModelForImageClassification",
            image_size=8,
            patch_size=4,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
        ),
        _pixels,
        marks=SLOW,
    ),
)


def _optimizer(model: torch.nn.Module, row: Row) -> torch.optim.Optimizer:
    """The training optimizer: Adam over the trainable weights (two groups for ``row.groups``)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not row.groups:
        return torch.optim.Adam(trainable, lr=1e-2)
    first, rest = trainable[:2], trainable[2:]
    return torch.optim.Adam(
        [{"params": first, "lr": 2e-2, "weight_decay": 0.1}, {"params": rest, "lr": 5e-3}], lr=1e-2
    )


def record(row: Row, path: Path) -> tuple[Snapshot, Inputs, Tensor]:
    """Train ``row``'s model a few steps (train mode) and record one snapshot into ``path``: the
    snapshot, probe inputs ``[P, ...]`` (or named tensors) and classes ``[P]``."""
    torch.manual_seed(0)
    spec = _spec(row)
    model = build_model(spec).train()
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    inputs = row.inputs(g, labels)
    optimizer = _optimizer(model, row)
    for _ in range(STEPS):
        batch = torch.randint(len(labels), (4,), generator=g)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=row.autocast):
            loss = batch_loss("cross_entropy", forward(model, take(inputs, batch)).float(), labels[batch])
        loss.backward()
        optimizer.step()
    model.eval()
    recorded = snapshot(torch.compile(model) if row.compiled else model, STEPS, optimizer)
    writer = RunWriter(
        path,
        RunSpec(
            spec, task="classification", loss="cross_entropy", num_outputs=row.num_outputs, optimizer="Adam"
        ),
        inputs,
        labels,
    )
    writer.add_snapshot(recorded, epoch=0)
    return recorded, inputs, labels


def loop(
    row: Row, recorded: Snapshot, inputs: Inputs, labels: Tensor, update: UpdateConfig
) -> dict[str, Tensor]:
    """The plain float64 loop in eval mode with the rule's real optimizer: name -> ``[P, P]``."""
    recorded = uncompiled(recorded, dict(build_model(_spec(row)).named_parameters()))
    model = build_model(_spec(row)).double().eval()
    model.load_state_dict(recorded.params | recorded.buffers, strict=False)
    record = recorded.optimizer
    if record is not None:  # the optimizer state of the float64 copy is float64 too
        state = {
            n: {k: v.double() if v.is_floating_point() else v for k, v in st.items()}
            for n, st in record.state.items()
        }
        record = dataclasses.replace(record, state=state)
    make_optimizer = RULES[update.rule].reference(update, record)
    x = map_inputs(lambda t: t.double() if t.is_floating_point() else t, inputs)
    return plain_measures(*plain_changes(model, make_optimizer, "cross_entropy", x, labels))


def _spec(row: Row) -> ModelSpec:
    """The row's model: the transformers factory takes its number of outputs in its config."""
    outputs = {} if row.factory == "transformers" else {"num_outputs": row.num_outputs}
    return ModelSpec(row.factory, row.kwargs | outputs)


@dataclass
class Outcome:
    """One cell of the matrix: the error against the loop, the replay's own estimate, the times."""

    error: float
    estimate: float
    fallback: str
    replay_s: float
    loop_s: float


def conform(row: Row, rule: str, path: Path) -> Outcome:
    """Record ``row``, replay it with ``rule`` at precision ``auto`` and compare with the loop."""
    recorded, inputs, labels = record(row, path)
    config = ReplayConfig(RULE_CONFIGS[rule], precision="auto")
    start = time.perf_counter()
    store = open_store(replay(path, config, progress=False))
    replay_s = time.perf_counter() - start
    start = time.perf_counter()
    expected = loop(row, recorded, inputs, labels, RULE_CONFIGS[rule])
    loop_s = time.perf_counter() - start
    replayed = {m: torch.as_tensor(np.asarray(store.measures[m].read(np.array([0]))[0])) for m in expected}
    group = zarr.open_group(store.path, mode="r")
    notes = list(group.attrs["fallback_notes"])
    code = int(np.asarray(group["fallback"][0]))
    return Outcome(
        error=relative_error(replayed, expected),
        estimate=float(store.error_estimate[0]),
        fallback=notes[code - 1] if code else "",
        replay_s=replay_s,
        loop_s=loop_s,
    )


# The quick loop (-m "not slow") replays each fast row under one rule, in turn; CI runs all three.
CASES = [
    pytest.param(row, rule, marks=row.marks if k == r % len(RULE_CONFIGS) else SLOW, id=f"{row.name}-{rule}")
    for r, row in enumerate(ROWS)
    for k, rule in enumerate(RULE_CONFIGS)
]


@pytest.mark.parametrize(("row", "rule"), CASES)
def test_replay_conforms_to_the_plain_float64_loop(row, rule, tmp_path):
    outcome = conform(row, rule, tmp_path / "run")
    # auto's stated precision: estimated below its target, which the loop confirms
    assert outcome.error <= min(AUTO_TARGET, ReplayConfig().tolerance), outcome
    assert outcome.estimate <= AUTO_TARGET, outcome
    (store,) = (tmp_path / "run").glob("*.zarr")
    assert zarr.open_group(store, mode="r").attrs["evaluation_mode"] == "eval"


def engine_seconds(path: Path, rule: str, repeats: int = 3) -> float:
    """The fastest of ``repeats`` replays of the run ``path``'s snapshot by an engine built once
    (as the loop's model is), in seconds."""
    run = RunDir(path)
    engine = Engine(run.spec, *run.probes(), ReplayConfig(RULE_CONFIGS[rule], precision="auto"))
    snap = run.load_snapshot(run.manifest[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.replay_snapshot(snap)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    """Print the matrix: per row and rule, the error against the loop, the estimate, the times of
    one snapshot (engine built once) and of the loop."""
    import tempfile
    import warnings

    warnings.simplefilter("ignore")
    print(f"{'row':28} {'rule':10} {'error':>8} {'estimate':>8} {'engine s':>8} {'loop s':>7}  fallback")
    for row in ROWS:
        for rule in RULE_CONFIGS:
            with tempfile.TemporaryDirectory() as tmp:
                o = conform(row, rule, Path(tmp) / "run")
                seconds = engine_seconds(Path(tmp) / "run", rule)
            print(
                f"{row.name:28} {rule:10} {o.error:8.1e} {o.estimate:8.1e} {seconds:8.3f} {o.loop_s:7.3f}  "
                f"{'float64 difference, loop' if o.fallback else ''}"
            )


if __name__ == "__main__":
    main()

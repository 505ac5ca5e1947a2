"""Property-based fuzzing of every reader of run-directory files: malformed ``spec.json``,
``manifest.json``, ``probes.safetensors``, snapshot files (safetensors headers and metadata),
``metrics.jsonl`` and a replay store's metadata always give the library's clear one-line error
(:class:`RunDirError` / :class:`ReplayError`), never another exception."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from recorder.rundir.errors import RunDirError
from recorder.rundir.files import sha256
from recorder.rundir.run import RunDir
from recorder.rundir.snapshot import SnapshotEntry, decode_snapshot
from recorder.rundir.spec import RunSpec
from replay import ReplayConfig, ReplayError, replay
from replay.store import ReplayStore
from tests.helpers import make_run

FUZZ = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)  # no example database: nothing written into the source tree

# Values that broke readers before: NUL bytes and lone surrogates in names, paths out of the run
# directory, integers beyond int64 or with more digits than Python parses, non-finite floats.
TRICKY = st.sampled_from(
    ["", ".", "./", "../x", "/etc/passwd", "a\x00b", "a\nb", "\ud800", "snapshots/step_00000001.safetensors",
     "params.1.weight", "Adam", "classification", "mlp", -1, 2**63, 2**70, 1e309, float("nan"), True]
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | TRICKY,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | TRICKY.map(str), children, max_size=4)
    ),
    max_leaves=12,
)
# Texts no JSON value encodes to: nesting deeper than the parser's recursion, huge integers,
# lone surrogates, bytes that are not UTF-8.
NASTY_JSON = st.sampled_from(
    [b"[" * 100_000 + b"]" * 100_000, b'{"step": ' + b"9" * 5000 + b"}", b'"\\ud800"', b"\xff\xfe{", b"NaN", b""]
)  # fmt: skip
NO_METADATA = st.none()
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}  # fmt: skip


def _slots(obj):
    """Every (container, key) of a JSON value, nested ones included."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield obj, key
        yield from _slots(value)


@st.composite
def mutated(draw, obj):
    """``obj`` with one to three of its values replaced by arbitrary JSON, or deleted."""
    obj = copy.deepcopy(obj)
    for _ in range(draw(st.integers(1, 3))):
        slots = list(_slots(obj))
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(json_values)
    return obj


@st.composite
def damaged_bytes(draw, data: bytes):
    """``data`` truncated, with bytes overwritten, or with bytes inserted."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind, at = (
            draw(st.sampled_from(["cut", "set", "insert"])),
            draw(st.integers(0, max(len(data) - 1, 0))),
        )
        if kind == "cut":
            del data[at:]
        elif kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@st.composite
def crafted_safetensors(draw, names: st.SearchStrategy, metadata: st.SearchStrategy = NO_METADATA):
    """A safetensors file of arbitrary tensors (any dtype, small shapes), laid out consistently so
    that it decodes, or, one time in four, with a shape, offset or size that is off."""
    header, offset = {}, 0
    for name in draw(st.lists(names, max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = DTYPE_SIZES[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    meta = draw(metadata)
    if meta is not None:
        header["__metadata__"] = meta
    if header and draw(st.integers(0, 3)) == 0:  # make it inconsistent
        entry = header[
            draw(st.sampled_from(sorted(k for k in header if k != "__metadata__") or ["__metadata__"]))
        ]
        if isinstance(entry, dict) and "shape" in entry:
            entry["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=3))
        offset += draw(st.integers(-3, 3))
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return (
        struct.pack("<Q", len(text))
        + text
        + draw(st.binary(min_size=max(offset, 0), max_size=max(offset, 0)))
    )


def assert_clear(fn, errors: tuple[type[Exception], ...] = (RunDirError,)) -> None:
    """``fn()`` succeeds or raises one of ``errors`` with a non-empty one-line message."""
    try:
        fn()
    except errors as e:
        assert str(e) and "\n" not in str(e), repr(str(e))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fuzz") / "run", steps=(0, 1), optimizer_cls=torch.optim.AdamW)


@pytest.fixture
def scratch(run, tmp_path_factory):
    """A fresh copy of ``run`` for one test, whose files the examples overwrite."""
    path = tmp_path_factory.mktemp("scratch") / "run"
    shutil.copytree(run, path)
    return path


def _open_and_read(path: Path) -> None:
    """Everything replay reads from a run directory, in order."""
    rundir = RunDir(path)
    rundir.probes()
    for entry in rundir.manifest:
        rundir.load_snapshot(entry)
    rundir.metrics()


# ----------------------------------------------------------------------------- spec.json


@FUZZ
@given(obj=json_values)
def test_spec_from_arbitrary_json(obj):
    assert_clear(lambda: RunSpec.from_json(obj))


def test_spec_mutations_and_bytes(scratch):
    valid = json.loads((scratch / "spec.json").read_text())

    @FUZZ
    @given(spec=mutated(valid) | json_values, raw=st.none() | st.binary(max_size=200) | NASTY_JSON)
    def check(spec, raw):
        (scratch / "spec.json").write_bytes(raw if raw is not None else json.dumps(spec).encode())
        assert_clear(lambda: _open_and_read(scratch))

    check()


# ----------------------------------------------------------------------------- manifest.json


def test_manifest_mutations_and_bytes(scratch):
    text = (scratch / "manifest.json").read_text()
    valid = json.loads(text)

    @FUZZ
    @given(manifest=mutated(valid) | json_values, raw=st.none() | damaged_bytes(text.encode()) | NASTY_JSON)
    def check(manifest, raw):
        (scratch / "manifest.json").write_bytes(raw if raw is not None else json.dumps(manifest).encode())
        assert_clear(lambda: _open_and_read(scratch))

    check()


@FUZZ
@given(entry=json_values | mutated({"step": 1, "epoch": 0, "file": "snapshots/x", "sha256": "0", "bytes": 3}))
def test_manifest_entry(entry):
    assert_clear(lambda: SnapshotEntry.from_json(entry, "manifest.json entry 0"))


# ----------------------------------------------------------------------------- probes.safetensors


def test_probe_set(scratch):
    valid = (scratch / "probes.safetensors").read_bytes()
    names = st.sampled_from(["inputs", "targets"]) | st.text(max_size=8)

    @FUZZ
    @given(data=damaged_bytes(valid) | crafted_safetensors(names) | st.binary(max_size=100))
    def check(data):
        (scratch / "probes.safetensors").write_bytes(data)
        assert_clear(lambda: RunDir(scratch).probes())

    check()


# ----------------------------------------------------------------------------- snapshot files


def test_snapshot_files(scratch):
    rundir = RunDir(scratch)
    entry = rundir.manifest[1]
    valid = (scratch / entry.file).read_bytes()
    names = st.sampled_from(["params.1.weight", "buffers.x", "optim.1.weight.exp_avg", "other"]) | st.text(
        max_size=8
    )
    metadata = st.none() | st.dictionaries(
        st.sampled_from(["step", "optimizer", "format", "x"]),
        st.sampled_from(
            ["1", "-1", "1e3", "9" * 30, "", '{"type": "Adam", "groups": [{"params": ["a"], "lr": "x"}]}']
        )
        | st.text(max_size=12)
        | json_values.map(json.dumps)
        | json_values,
        max_size=3,
    )

    @FUZZ
    @given(data=damaged_bytes(valid) | crafted_safetensors(names, metadata) | st.binary(max_size=100))
    def check(data):
        assert_clear(lambda: decode_snapshot(data, "snapshot"))
        (scratch / entry.file).write_bytes(data)
        assert_clear(lambda: rundir.load_snapshot(entry, verify=False))
        listed = SnapshotEntry(entry.step, entry.epoch, entry.file, sha256(data), len(data))
        assert_clear(lambda: rundir.load_snapshot(listed))

    check()


@FUZZ
@given(
    optimizer=mutated(
        {"type": "AdamW", "groups": [{"params": ["1.weight"], "lr": 0.1, "betas": [0.9, 0.99]}]}
    )
)
def test_snapshot_optimizer_metadata(run, optimizer):
    data = (run / RunDir(run).manifest[0].file).read_bytes()
    snap = decode_snapshot(data, "snapshot")
    tensors = {f"params.{k}": v for k, v in snap.params.items()}
    encoded = save(tensors, metadata={"step": "0", "optimizer": json.dumps(optimizer)})
    assert_clear(lambda: decode_snapshot(encoded, "snapshot"))


# ----------------------------------------------------------------------------- metrics.jsonl


def test_metrics_never_fail(scratch):
    lines = json_values.map(json.dumps).map(str.encode) | NASTY_JSON

    @FUZZ
    @given(data=st.binary(max_size=200) | st.lists(lines, max_size=4).map(b"\n".join))
    def check(data):
        (scratch / "metrics.jsonl").write_bytes(data)
        assert isinstance(RunDir(scratch).metrics(), list)

    check()


# ----------------------------------------------------------------------------- a replay store's metadata


def test_store_metadata(scratch):
    config = ReplayConfig(measures=("kl",))
    store = replay(scratch, config, progress=False)
    rundir = RunDir(scratch)
    inputs, targets = rundir.probes()
    group_meta = (store / "zarr.json").read_text()
    valid_attrs = json.loads(group_meta)["attributes"]

    @FUZZ
    @given(attrs=mutated(valid_attrs), raw=st.none() | damaged_bytes(group_meta.encode()))
    def check(attrs, raw):
        meta = json.loads(group_meta) | {"attributes": attrs}
        (store / "zarr.json").write_bytes(raw if raw is not None else json.dumps(meta).encode())
        assert_clear(
            lambda: ReplayStore.attach(store, config, rundir.spec, rundir.manifest, targets, ("kl",)),
            (RunDirError, ReplayError),
        )

    check()

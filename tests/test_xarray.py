"""Replay stores as xarray Datasets (:mod:`analyses.xarray`), on a store written with known values."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from recorder.rundir.errors import ResultsError
from tests.helpers import B0, B1, LABELS6, block_matrix, make_run_dir, write_store

xr = pytest.importorskip("xarray")
from analyses.xarray import open_dataset  # noqa: E402 - after the skip


@pytest.fixture
def store(tmp_path):
    """Snapshots at steps 0, 9, 18 (epochs 0, 0, 1); step 9 not done."""
    run = make_run_dir(tmp_path / "run")
    kl = np.stack([block_matrix(B0, LABELS6), np.full((6, 6), 1000.0), block_matrix(B1, LABELS6)])
    path = run / "adam-fresh.zarr"
    write_store(path, {"kl": kl, "linear": 2 * kl}, LABELS6, [True, False, True], [0, 9, 18])
    return path, kl


def test_one_measure_with_steps_probe_classes_and_class_pairs(store):
    path, kl = store
    ds = open_dataset(path, measure="kl")
    assert ds.S_rel.dims == ("step", "updated", "observed")
    assert ds.step.values.tolist() == [0, 18] and ds.epoch.values.tolist() == [0, 1]  # the done ones
    np.testing.assert_array_equal(ds.S_rel.sel(step=18).values, kl[2])
    np.testing.assert_array_equal(ds.class_of_updated.values, LABELS6)
    np.testing.assert_array_equal(ds.class_of_observed.values, LABELS6)
    # self pairs excluded, so the class pairs are B: observed class a, updated class b
    for step, B in ((0, B0), (18, B1)):
        for stat in ("mean", "median"):
            np.testing.assert_array_equal(ds.classpairs.sel(stat=stat, step=step).values, B)
    assert ds.classpairs.sel(updated_class=2, observed_class=1, step=18, stat="mean").item() == B1[1, 2]
    same = (ds.class_of_updated == ds.class_of_observed) & (ds.updated != ds.observed)
    np.testing.assert_allclose(ds.S_rel.where(same).mean(["updated", "observed"]).values, [3.0, 14 / 3])
    assert ds.attrs["name"] == "adam-fresh" and ds.attrs["update"] == "adam-fresh"
    assert ds.error_estimate.values.tolist() == [1e-6, 1e-6]


def test_every_measure_and_class_names(store):
    path, kl = store
    attrs = zarr.open_group(path, mode="a").attrs
    attrs["run_spec"] = {**attrs["run_spec"], "extra": {"class_names": ["cat", "dog", "fox"]}}
    ds = open_dataset(path)
    assert set(ds.data_vars) == {"kl", "linear", "error_estimate"}
    np.testing.assert_array_equal(ds.linear.values, 2 * kl[[0, 2]])
    assert "classpairs" not in ds and "observed_class" not in ds.coords
    names = open_dataset(path, measure="kl").updated_class_name.values.tolist()
    assert names == ["cat", "dog", "fox"]


def test_unknown_measure(store):
    path, _ = store
    with pytest.raises(ResultsError, match="no measure 'seed_kl'; stored: kl, linear"):
        open_dataset(path, measure="seed_kl")

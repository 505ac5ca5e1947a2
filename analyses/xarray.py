"""Replay stores as xarray Datasets, with training steps and probe classes as coordinates.

``xarray.open_zarr(store)`` sees only a store's root arrays: the S_rel measures live in its
subgroups (``measures/<m>``, ``classpairs/<m>/<stat>``) and its snapshots are indexed by
position, done or not. :func:`open_dataset` gives the done snapshots of one store, lazily (an
array is read when its values are used):

>>> from analyses.xarray import open_dataset                          # doctest: +SKIP
>>> ds = open_dataset("runs/digits/adam-fresh.zarr", measure="kl")     # doctest: +SKIP
>>> ds.S_rel.sel(step=450)                      # [updated, observed] at training step 450
>>> same = (ds.class_of_updated == ds.class_of_observed) & (ds.updated != ds.observed)
>>> ds.S_rel.where(same).mean(["updated", "observed"])    # same-class pairs i != j, over training
>>> ds.classpairs.sel(stat="mean", updated_class=3)       # [step, observed_class]

Needs the optional ``xarray`` package (``pip install 'local-elasticity[xarray]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from recorder.rundir.errors import ResultsError
from replay.classpairs import STATS
from replay.store import StoredReplay, open_store

try:
    import xarray as xr
except ImportError as e:  # an optional extra
    raise ImportError("analyses.xarray needs xarray: pip install 'local-elasticity[xarray]'") from e


def open_dataset(store_path: str | Path, measure: str | None = None) -> xr.Dataset:
    """The done snapshots of the replay store ``store_path`` as a Dataset.

    Dimensions: ``step`` (the done snapshots, by training step), ``updated`` and ``observed``
    (probe indices ``0 .. P-1``), and for classification ``observed_class`` and ``updated_class``
    (the ``K`` class labels) and ``stat`` (``mean``, ``median``).

    Variables: with ``measure``, ``S_rel`` ``[step, updated, observed]`` (row ``i`` updated on,
    column ``j`` observed) and, for classification, ``classpairs`` ``[stat, step, observed_class,
    updated_class]``; without, one variable ``[step, updated, observed]`` per stored measure, named
    after it. Both have ``error_estimate`` ``[step]``.

    Coordinates: ``step``, ``epoch`` ``[step]``; for classification ``class_of_updated``,
    ``class_of_observed`` (each probe's class label) and, where the run's ``spec.json`` names the
    classes, ``updated_class_name``, ``observed_class_name``. Attributes: the store's ``name``,
    ``dtype``, ``include_self`` (of the class pairs) and ``update`` (the update rule).

    Raises :class:`ResultsError` for a store that does not follow the layout, or a ``measure``
    it does not hold.
    """
    store = open_store(store_path)
    if measure is not None and measure not in store.measure_names:
        raise ResultsError(f"{store.path}: no measure {measure!r}; stored: {', '.join(store.measure_names)}")
    done = np.flatnonzero(store.done)
    measures = _group(store.path, "measures")
    if measure is None:
        ds = measures[list(store.measure_names)]
    else:
        ds = measures[[measure]].rename({measure: "S_rel"})
        if store.classes is not None:
            pairs = _group(store.path, f"classpairs/{measure}")
            ds["classpairs"] = xr.concat([pairs[stat] for stat in STATS], dim="stat")
    ds["error_estimate"] = ("snapshot", store.error_estimate)
    coords = _coords(store, done, with_classpairs="classpairs" in ds)
    ds = ds.isel(snapshot=done).rename({"snapshot": "step"}).assign_coords(coords)
    ds.attrs = {
        "name": store.name,
        "dtype": store.dtype,
        "include_self": int(store.include_self),
        "update": str(store.config.get("update", {}).get("rule", "")),
    }
    return ds


def _group(path: Path, group: str) -> xr.Dataset:
    """The arrays of ``path``'s subgroup ``group``, read lazily, dimensions named as stored."""
    return xr.open_zarr(path, group=group, consolidated=False, zarr_format=3)


def _coords(store: StoredReplay, done: np.ndarray, with_classpairs: bool) -> dict[str, Any]:
    """The coordinates of :func:`open_dataset` for the done snapshots ``done`` ``[S]`` (and the
    class-pair axes ``with_classpairs``)."""
    num_probes = len(store.targets)
    coords: dict[str, Any] = {
        "step": store.steps[done],
        "epoch": ("step", store.epochs[done]),
        "updated": np.arange(num_probes),
        "observed": np.arange(num_probes),
    }
    if store.classes is None:
        return coords
    coords |= {
        "class_of_updated": ("updated", store.targets),
        "class_of_observed": ("observed", store.targets),
    }
    if not with_classpairs:
        return coords
    coords |= {"observed_class": store.classes, "updated_class": store.classes, "stat": list(STATS)}
    names = store.run_spec.get("extra", {}).get("class_names")
    if isinstance(names, list) and len(names) == len(store.classes):
        coords |= {
            "observed_class_name": ("observed_class", names),
            "updated_class_name": ("updated_class", names),
        }
    return coords

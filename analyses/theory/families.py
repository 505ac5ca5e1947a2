"""The registry of closed-form families (SPEC §6): name -> :class:`Family`."""

from __future__ import annotations

from dataclasses import dataclass

from analyses.theory.base import TheoryModel
from analyses.theory.homogeneous import Homogeneous
from analyses.theory.relu_gate import ReluGate
from analyses.theory.ridge import RidgeFeatures


@dataclass(frozen=True)
class Family:
    """A family: its closed forms (``model``, built from a torch module by ``model.from_model``) and
    the names of the ``theory-*`` presets that train it."""

    name: str
    model: type[TheoryModel]
    presets: tuple[str, ...]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("ridge", RidgeFeatures, ("theory-ridge-p10", "theory-ridge-p100")),
        Family("relu-gate", ReluGate, ("theory-relu-gate",)),
        Family("homogeneous", Homogeneous, ("theory-homogeneous",)),
    )
}

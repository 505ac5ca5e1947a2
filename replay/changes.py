"""The ways of computing the output changes of the ``P`` probes under one update.

Under an update ``u`` (name -> ``[*shape]``) an :class:`OutputChanges` gives what the measures
need (:func:`replay.measures.needs`): ``"finite"``, ``D = f(x; w + u) - f(x; w)`` ``[P, C]``, and
``"linear"``, the Jacobian-vector product ``J . u`` ``[P, C]``, in its working dtype; and ``base``,
the outputs ``f(x; w)`` ``[P, C]`` it starts from. Each arithmetic of :mod:`replay.plan` names
one; they register themselves in :data:`CHANGES` and declare whether they propagate.

- :class:`Difference`: two forward passes subtracted (``torch.func.jvp`` for ``J . u``); its
  rounding is that of the outputs, ``eps * |f| / |D|`` relative to ``D``.
- :class:`Propagation`: the change carried through the layers by :mod:`replay.difference` from a
  float64 evaluation of every node, never subtracting two outputs (needs ``torch.fx``).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import jvp

from recorder.models import forward
from recorder.rundir.probes import Inputs, num_probes, take
from replay.batching import Batching
from replay.difference import BaseState, ChangePropagator

CHANGES: dict[str, type[OutputChanges]] = {}


class OutputChanges(ABC):
    """The output changes under one update (module docstring), ``"finite"`` if ``finite`` and
    ``"linear"`` if ``linear``."""

    name: ClassVar[str]
    # whether the changes are carried through the layers from the base values of every node
    # (float64 for all P probes, kept for the whole snapshot) rather than subtracted
    propagates: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        CHANGES[cls.name] = cls

    def __init__(self, finite: bool, linear: bool):
        self.finite, self.linear = finite, linear

    @property
    @abstractmethod
    def base(self) -> Tensor:
        """The outputs ``f(x; w)`` ``[P, C]`` the changes start from."""

    @abstractmethod
    def __call__(self, update: dict[str, Tensor]) -> Mapping[str, Tensor | None]:
        """``"finite"`` and / or ``"linear"`` (``[P, C]`` each) under ``update`` (name -> ``[*shape]``);
        None where the outputs do not depend on ``update`` (:meth:`ChangePropagator.change`)."""

    def rows(self, batching: Batching, updates: dict[str, Tensor]) -> dict[str, Tensor]:
        """The changes under every row of ``updates`` (name -> ``[B, *shape]``): name -> ``[B, P, C]``."""
        with warnings.catch_warnings():  # torch's forward-mode AD loads jit-scripted decompositions
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            return batching.map(self, (), (updates,))


class Difference(OutputChanges):
    """The difference of two forward passes of ``model`` and ``torch.func.jvp``, in the dtype of
    ``params``, ``buffers``, ``x`` ``[P, ...]`` (or named tensors) and ``base`` (``f(x; w)`` ``[P, C]``; None:
    evaluated here); the probes ``x`` in blocks of ``columns`` (None: all at once)."""

    name = "difference"
    propagates = False

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Inputs,
        base: Tensor | None,
        finite: bool,
        linear: bool,
        columns: int | None = None,
    ):
        super().__init__(finite, linear)
        self.model, self.params, self.buffers, self.x = model, params, buffers, x
        size = columns or num_probes(x)
        self._blocks = [slice(start, start + size) for start in range(0, num_probes(x), size)]
        self._base = self._forward(params) if base is None else base

    @property
    def base(self) -> Tensor:
        return self._base

    def _forward(self, p: dict[str, Tensor]) -> Tensor:
        """``f(x; p)`` ``[P, C]``, block by block."""
        if len(self._blocks) == 1:
            return forward(self.model, self.x, (p, self.buffers))
        return torch.cat([forward(self.model, take(self.x, b), (p, self.buffers)) for b in self._blocks])

    def __call__(self, update: dict[str, Tensor]) -> dict[str, Tensor]:
        moved = {k: self.params[k] + update[k] for k in self.params}
        out = {"finite": self._forward(moved) - self._base} if self.finite else {}
        return out | ({"linear": jvp(self._forward, (self.params,), (update,))[1]} if self.linear else {})


class Propagation(OutputChanges):
    """The changes propagated by ``propagator`` from its base values ``nodes`` (float64), working
    in ``dtype``."""

    name = "propagation"
    propagates = True

    def __init__(
        self, propagator: ChangePropagator, nodes: BaseState, dtype: torch.dtype, finite: bool, linear: bool
    ):
        super().__init__(finite, linear)
        self.propagator = propagator
        self.nodes = nodes if nodes.dtype == dtype else propagator.retype(nodes, dtype)

    @property
    def base(self) -> Tensor:
        return self.propagator.outputs(self.nodes)

    def __call__(self, update: dict[str, Tensor]) -> dict[str, Tensor | None]:
        return self.propagator.change(self.nodes, update, self.finite, self.linear)

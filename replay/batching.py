"""How the engine maps a function of one row over a block of ``B`` rows: the strategies of
:mod:`replay.plan`.

Every :class:`Batching` takes a function of one row (one probe's input and target, or one update,
name -> ``[*shape]``) and gives its outputs for every row of a block, stacked along a new leading
axis ``[B, ...]``. The rows' arguments are pytrees of tensors with a leading axis ``B``; shared
arguments are passed to every call as they are. The strategies register themselves in
:data:`BATCHINGS` and declare what the memory model of :func:`replay.plan.rows_per_chunk` needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch.func import vmap
from torch.utils import _pytree as pytree

BATCHINGS: dict[str, Batching] = {}


class Batching(ABC):
    """One way of evaluating a function on every row of a block."""

    name: ClassVar[str]
    # whether every row of the block holds its activations at once (else one row's at a time)
    activations_per_row: ClassVar[bool]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        BATCHINGS[cls.name] = cls()

    @abstractmethod
    def map(self, fn: Callable[..., Any], shared: tuple[Any, ...], rows: tuple[Any, ...]) -> Any:
        """``fn(*shared, *row)`` for every row of ``rows`` (pytrees of ``[B, ...]`` tensors), the
        outputs (a pytree of ``[...]`` tensors) stacked: the same pytree of ``[B, ...]`` tensors."""


class Vmap(Batching):
    """One vmapped call over the block."""

    name = "vmap"
    activations_per_row = True

    def map(self, fn: Callable[..., Any], shared: tuple[Any, ...], rows: tuple[Any, ...]) -> Any:
        return vmap(fn, in_dims=(None,) * len(shared) + (0,) * len(rows))(*shared, *rows)


class Loop(Batching):
    """One plain call per row, the outputs stacked."""

    name = "loop"
    activations_per_row = False

    def map(self, fn: Callable[..., Any], shared: tuple[Any, ...], rows: tuple[Any, ...]) -> Any:
        size = len(pytree.tree_leaves(rows)[0])
        outputs = [fn(*shared, *pytree.tree_map(lambda t, b=b: t[b], rows)) for b in range(size)]
        return pytree.tree_map(lambda *row: torch.stack(row), *outputs)

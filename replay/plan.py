"""How the engine runs one snapshot: its arithmetic, its strategy and its chunk size.

- **Arithmetic** (from the configured precision, :data:`ARITHMETIC`): ``float64`` (everything in
  float64, the reference), ``float32`` (everything in float32: the plain difference of two
  forward passes, whose error the engine checks), ``mixed`` (gradients, updates, base outputs and
  measures in float64; the output changes by the float32 change propagation of
  :mod:`replay.difference`, and the ``linear`` measure's Jacobian-vector products in float32).
  ``auto`` (:func:`choose_arithmetic`) takes ``float64`` on a CPU, where float64 costs about 1.7
  times float32 and needs half the operations of ``mixed``, and ``mixed`` on a GPU, where float64
  is slow; both resolve any step to far better than 1e-3.
- **Strategy** (:func:`choose_strategy`): ``vmap`` evaluates a block of ``B`` updated probes at
  once, vmapped over stacked weight copies (one batched call per layer: wins when one probe's
  work is small and per-call overhead dominates); ``loop`` makes one plain functional call per
  updated probe (wins when one probe's forward over all ``P`` probes already fills the device:
  no stacked weights, plain rather than grouped convolutions).
- **Chunk size** (:func:`rows_per_chunk`): how many updated probes are processed at once within
  the memory budget.

The choices are pure functions of a few facts about the model (:class:`ModelFacts`), so that
they can be tested without timing; ``cli.py bench`` times every candidate and reports whether
the chosen one was the fastest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from replay.config import ReplayError


@dataclass(frozen=True)
class Arithmetic:
    """The dtypes of one arithmetic: ``exact`` for gradients, updates, base outputs and measures;
    ``change`` for the output changes and tangents; ``propagate``: changes by
    :mod:`replay.difference` instead of the difference of two forward passes."""

    name: str
    exact: torch.dtype
    change: torch.dtype
    propagate: bool


ARITHMETIC = {
    "float64": Arithmetic("float64", torch.float64, torch.float64, False),
    "float32": Arithmetic("float32", torch.float32, torch.float32, False),
    "mixed": Arithmetic("mixed", torch.float64, torch.float32, True),
}
STRATEGIES = ("vmap", "loop")

# Memory model of one updated probe, in values of the arithmetic's dtypes: copies of the
# parameters (gradient, update, moved weights, Adam moments and denominator) and of the
# activations of all probes (forward, tangent, temporaries).
PARAM_COPIES = 8
ACTIVATION_COPIES = 3
# ``loop`` when one updated probe's forward pass over all probes has at least this many
# activation values (it then fills the device by itself), ``vmap`` below.
LOOP_ACTIVATIONS = {"cpu": 1 << 23, "cuda": 1 << 27}


@dataclass(frozen=True)
class ModelFacts:
    """What the choices depend on: ``num_params`` weights, ``activations`` values output by the
    model's leaf modules for one input, and whether :mod:`replay.difference` can trace it."""

    num_params: int
    activations: int
    traceable: bool


def choose_arithmetic(precision: str, device_type: str, traceable: bool) -> Arithmetic:
    """The arithmetic of a configured ``precision`` (``auto``: see the module docstring)."""
    if precision == "auto":
        precision = "mixed" if device_type == "cuda" and traceable else "float64"
    if precision == "mixed" and not traceable:
        raise ReplayError(
            "precision 'mixed' needs a model that torch.fx can trace; use --precision float64"
        )
    return ARITHMETIC[precision]


def choose_strategy(strategy: str, device_type: str, facts: ModelFacts, num_probes: int) -> str:
    """``vmap`` or ``loop`` (a configured ``strategy`` other than ``auto`` is taken as it is)."""
    if strategy != "auto":
        return strategy
    threshold = LOOP_ACTIVATIONS.get(device_type, LOOP_ACTIVATIONS["cuda"])
    return "loop" if num_probes * facts.activations >= threshold else "vmap"


def rows_per_chunk(
    facts: ModelFacts, num_probes: int, arithmetic: Arithmetic, strategy: str, budget: int
) -> int:
    """How many updated probes fit the memory ``budget`` (bytes) at once (at least one).

    Per updated probe: ``PARAM_COPIES`` parameter copies in the exact dtype, and, with ``vmap``,
    ``ACTIVATION_COPIES`` activation copies of all ``P + 1`` probes in the change dtype. Shared by
    the block: with ``loop``, one probe's activations; with ``propagate``, the base values of
    every node (float64 and float32).
    """
    exact, change = arithmetic.exact.itemsize, arithmetic.change.itemsize
    activations = ACTIVATION_COPIES * (num_probes + 1) * facts.activations * change
    per_row = PARAM_COPIES * facts.num_params * exact + (activations if strategy == "vmap" else 0)
    shared = (activations if strategy == "loop" else 0) + (
        num_probes * facts.activations * (exact + change) if arithmetic.propagate else 0
    )
    return max(1, min(num_probes, (budget - shared) // per_row))


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's free memory, in bytes."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 4 << 30
    return free // 4

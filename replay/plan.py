"""How the engine runs one snapshot: its arithmetic, its strategy and its chunk size.

- **Arithmetic** (:data:`ARITHMETIC`; what each computes in which dtype is in
  :mod:`replay.precision`): ``float64``, ``float32``, ``difference32`` and ``mixed``. A configured
  precision names one of them, except ``auto`` (:func:`choose_arithmetic`), which starts with
  ``difference32`` (as cheap as float32) and gives way to ``mixed`` (or ``float64`` for models
  ``torch.fx`` cannot trace) once a snapshot's estimated error is too large.
- **Strategy** (:func:`choose_strategy`, one of :data:`replay.batching.BATCHINGS`): ``vmap``
  evaluates a block of ``B`` updated probes at once, vmapped over stacked weight copies (one
  batched call per layer: wins when one probe's work is small and per-call overhead dominates);
  ``loop`` makes one plain functional call per updated probe (wins when one probe's forward over
  all ``P`` probes already fills the device: no stacked weights, plain rather than grouped
  convolutions).
- **Chunk size** (:func:`rows_per_chunk`): how many updated probes are processed at once within
  the memory budget; and (:func:`columns_per_block`) on how many observed probes at once: all of
  them unless one updated probe with all of them exceeds the budget (a difference then evaluates
  the observed probes in blocks; a propagation, which holds every probe's base values, cannot).
- **The whole plan** (:func:`check_plan_fits`): what a replay holds besides that block (one
  snapshot's results, the probe set, the model) must fit the memory budget too, or the replay
  is refused before it starts.

The choices are pure functions of a few facts about the model (:class:`ModelFacts`), so that
they can be tested without timing; ``cli.py bench`` times every candidate and reports whether
the chosen one was the fastest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from recorder.models import forward
from recorder.rundir.errors import ReplayError
from recorder.rundir.probes import Inputs
from replay.batching import BATCHINGS
from replay.changes import Difference, OutputChanges, Propagation


@dataclass(frozen=True)
class Arithmetic:
    """The dtypes of one arithmetic: ``exact`` for the probe losses, per-sample gradients and
    measures (and the base outputs of a propagation; a difference takes them from the network,
    see :mod:`replay.engine`); ``fast`` for the updates, output changes and tangents; ``changes``:
    how the output changes are computed (:mod:`replay.changes`)."""

    name: str
    exact: torch.dtype
    fast: torch.dtype
    changes: type[OutputChanges]


ARITHMETIC = {
    "float64": Arithmetic("float64", torch.float64, torch.float64, Difference),
    "float32": Arithmetic("float32", torch.float32, torch.float32, Difference),
    "difference32": Arithmetic("difference32", torch.float64, torch.float32, Difference),
    "mixed": Arithmetic("mixed", torch.float64, torch.float32, Propagation),
}
STRATEGIES = tuple(BATCHINGS)

# Memory model of one updated probe, in values of the arithmetic's dtypes: copies of the
# parameters (gradient, update, moved weights, Adam moments and denominator) and of the
# activations of all probes (forward, tangent, temporaries).
PARAM_COPIES = 8
ACTIVATION_COPIES = 3
# ``loop`` when one updated probe's forward pass over all probes has at least this many
# activation values (it then fills the device by itself), ``vmap`` below. Measured on 2 CPU
# cores (cli.py bench), vmap was the faster for every built-in model up to ResNet-18 at P = 16
# (2.4e6 values); the CPU threshold (8.4e6: ResNet-18 from P = 55) extrapolates that, the GPU's
# is a guess for cli.py bench --device cuda to confirm.
LOOP_ACTIVATIONS = {"cpu": 1 << 23, "cuda": 1 << 27}
# Memory model of the whole plan besides the block, in float64 values: one snapshot's results,
# every measure [P, P] twice (as computed, and stacked for the class pairs), and the probe set
# and the model's weights twice each (as read, and on the device).
RESULT_COPIES = 2
INPUT_COPIES = 2


@dataclass(frozen=True)
class ModelFacts:
    """What the choices depend on: ``num_params`` weights, ``activations`` values output by the
    model's leaf modules for one input, and whether :mod:`replay.difference` can trace it."""

    num_params: int
    activations: int
    traceable: bool


def choose_arithmetic(precision: str, traceable: bool) -> tuple[Arithmetic, Arithmetic | None]:
    """The arithmetic a configured ``precision`` starts with, and the one it gives way to when its
    estimated error is too large (``auto`` only: ``difference32``, then ``mixed``, or ``float64``
    for a model that ``torch.fx`` cannot trace)."""
    if precision == "auto":
        return ARITHMETIC["difference32"], ARITHMETIC["mixed" if traceable else "float64"]
    if precision == "mixed" and not traceable:
        raise ReplayError("precision 'mixed' needs a model that torch.fx can trace; use --precision float64")
    return ARITHMETIC[precision], None


def choose_strategy(strategy: str, device_type: str, facts: ModelFacts, num_probes: int) -> str:
    """``vmap`` or ``loop`` (a configured ``strategy`` other than ``auto`` is taken as it is)."""
    if strategy != "auto":
        return strategy
    threshold = LOOP_ACTIVATIONS.get(device_type, LOOP_ACTIVATIONS["cuda"])
    return "loop" if num_probes * facts.activations >= threshold else "vmap"


def rows_per_chunk(
    facts: ModelFacts,
    num_probes: int,
    arithmetic: Arithmetic,
    strategy: str,
    budget: int,
    columns: int | None = None,
) -> int:
    """How many updated probes fit the memory ``budget`` (bytes) at once (at least one), each
    evaluated on ``columns`` observed probes at once (default: all ``P``).

    Per updated probe: ``PARAM_COPIES`` parameter copies and, with ``vmap``, ``ACTIVATION_COPIES``
    activation copies of ``columns + 1`` probes, in the fast dtype. Shared by the block: with
    ``loop``, one probe's activation copies; for changes that propagate, the base values of every
    node (exact and fast dtype).
    """
    per_row, shared = _row_bytes(facts, num_probes, arithmetic, strategy, columns or num_probes)
    return max(1, min(num_probes, (budget - shared) // per_row))


def columns_per_block(
    facts: ModelFacts, num_probes: int, arithmetic: Arithmetic, strategy: str, budget: int
) -> int:
    """On how many observed probes one updated probe is evaluated at once: all ``P`` where one
    updated probe fits the ``budget`` with them (:func:`rows_per_chunk`) or where the changes
    propagate (their base values hold every probe), else the most that fit (at least one)."""

    def fits(columns: int) -> bool:
        per_row, shared = _row_bytes(facts, num_probes, arithmetic, strategy, columns)
        return per_row + shared <= budget

    if arithmetic.changes.propagates or fits(num_probes):
        return num_probes
    low, high = 1, num_probes  # the most that fit lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def _row_bytes(
    facts: ModelFacts, num_probes: int, arithmetic: Arithmetic, strategy: str, columns: int
) -> tuple[int, int]:
    """Bytes of one updated probe and bytes shared by a block (:func:`rows_per_chunk`)."""
    exact, fast = arithmetic.exact.itemsize, arithmetic.fast.itemsize
    activations = ACTIVATION_COPIES * (columns + 1) * facts.activations * fast
    per_row_activations = BATCHINGS[strategy].activations_per_row
    per_row = PARAM_COPIES * facts.num_params * fast + (activations if per_row_activations else 0)
    shared = (0 if per_row_activations else activations) + (
        num_probes * facts.activations * (exact + fast) if arithmetic.changes.propagates else 0
    )
    return per_row, shared


def plan_bytes(num_probes: int, num_measures: int, values_per_probe: int, num_params: int) -> int:
    """Bytes a replay holds besides the block of updated probes (see ``RESULT_COPIES``): one
    snapshot's ``num_measures`` results ``[P, P]``, ``num_probes`` probes of ``values_per_probe``
    values (input and target) and ``num_params`` weights."""
    results = RESULT_COPIES * num_measures * num_probes**2
    return 8 * (results + INPUT_COPIES * (num_probes * values_per_probe + num_params))


def check_plan_fits(
    num_probes: int, num_measures: int, values_per_probe: int, num_params: int, budget: int
) -> None:
    """Raise :class:`ReplayError` unless :func:`plan_bytes` fits the memory ``budget`` (bytes),
    saying how many probes would fit."""
    need = plan_bytes(num_probes, num_measures, values_per_probe, num_params)
    if need <= budget:
        return
    low, high = 0, num_probes  # the largest probe count that fits lies in [low, high)
    while high - low > 1:
        mid = (low + high) // 2
        if plan_bytes(mid, num_measures, values_per_probe, num_params) <= budget:
            low = mid
        else:
            high = mid
    fits = f"at most {low} probes fit" if low else "not even one probe fits"
    raise ReplayError(
        f"{num_probes} probes need about {need / 2**30:.3g} GiB for one snapshot ({num_measures} "
        f"measures [P, P] in float64, the probes and the model), more than the memory budget of "
        f"{budget / 2**30:.3g} GiB: {fits}; raise --memory-budget, replay fewer --measures or record fewer probes"
    )


def default_memory_budget(device: torch.device) -> int:
    """A quarter of the device's free memory, in bytes (on a CPU: :func:`available_memory`)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_memory()
    return free // 4


def available_memory(meminfo: str = "/proc/meminfo") -> int:
    """Bytes of host memory available to a new allocation: Linux's ``MemAvailable``, which counts
    the page cache the kernel can reclaim (after reading or writing a few GiB of files, the plain
    free memory is a fraction of it, and a budget from it would shrink run after run); elsewhere
    the free pages, or 4 GiB if even those are unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def activations_per_sample(model: nn.Module, x: Inputs) -> int:
    """Values output by the leaf modules of ``model`` for one input ``x`` ``[1, ...]`` (or named
    tensors ``[1, ...]``)."""
    total = 0

    def count(module: nn.Module, args: object, out: object) -> None:
        nonlocal total
        total += out.numel() if isinstance(out, Tensor) else 0

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(m.children())]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return total

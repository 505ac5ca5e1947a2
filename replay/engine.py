"""Recompute S_rel for one snapshot with ``torch.func``.

For a snapshot with weights ``w`` and ``P`` probes ``(x_i, y_i)`` (``C`` outputs):

1. per-sample gradients ``g_i`` (``grad`` of each probe's loss through ``functional_call``, model
   in eval mode; :mod:`replay.grads`);
2. virtual updates ``U_i = U(g_i)`` (:mod:`replay.updates`; where ``U = c g``, ``sgd`` without
   weight decay, step 1 differentiates ``c`` times each loss and its gradients are the updates);
3. output changes of every probe ``j`` under every update ``i``, ``D[i, j] = f(x_j; w + U_i) -
   f(x_j; w)`` ``[B, P, C]``, and for ``linear`` the Jacobian-vector products ``J_j . U_i``
   (:mod:`replay.changes`);
4. the measures ``S[i, j]`` (:mod:`replay.measures`).

With ``ntk`` or ``module_split`` configured, each snapshot also computes its tangent kernel in
float64 (:mod:`replay.firstorder`): the NTK rows and each module's part of ``J_j . U_i`` of every
block, whose sum is then the ``linear`` change (so that the parts add up to it exactly).

Steps 1-4 run over blocks of ``B`` updated probes within the memory budget, by the plan of
:mod:`replay.plan`: each block mapped by one of the strategies of :mod:`replay.batching`, in the
arithmetic that the precision policy of :mod:`replay.precision` settles on for the snapshot, its
error estimated by :mod:`replay.check`.

Base outputs ``f(x; w)``: a propagation takes them from its float64 evaluation of every node. A
difference takes them from the network (the float32 difference needs them there; in the measures
their float32 rounding, 1e-7 relative, meets no cancellation, and a float64 forward pass would
cost as much as the float32 pass it serves): from the per-sample pass when one block holds every
probe, else from one forward pass.

Semantics: the model is evaluated in eval mode (normalization layers with the running statistics
of the snapshot, no dropout), for the gradients as for the changes; the virtual step moves the
trainable weights only (:mod:`replay.state`). Where the snapshot's arithmetic fails on a part of
the model (an operation without a float32 kernel, forward-mode derivative or batching rule),
the snapshot is computed as a float64 difference instead, exact for any model, and the result
says so (:data:`FALLBACK_NOTES`, stored by :mod:`replay.store`).

On a CPU the engine has glibc keep freed memory (:func:`_retain_freed_memory`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from recorder.losses import per_sample_loss
from recorder.models import build_model, check_state_matches, forward
from recorder.rundir.errors import ReplayError, ReplayWarning, UnsupportedModel
from recorder.rundir.probes import Inputs, num_probes, take
from recorder.rundir.snapshot import Snapshot
from recorder.rundir.spec import RunSpec
from replay.batching import BATCHINGS, Loop, Vmap
from replay.changes import Difference, OutputChanges, Propagation
from replay.check import EXACT, ErrorCheck, Kept, amplification, gradient_rounding, sensitivity
from replay.classpairs import class_labels, pair_sums
from replay.config import ReplayConfig
from replay.difference import BaseState, ChangePropagator
from replay.firstorder import TangentKernel, module_shares, modules_of, output_gradients
from replay.grads import block_updates, network_dtype, per_sample_grads, update_norms
from replay.measures import EPS_SHARE, eps_dominated, evaluate_with_self, needs, resolve_measures
from replay.plan import (
    ARITHMETIC,
    Arithmetic,
    ModelFacts,
    activations_per_sample,
    choose_strategy,
    columns_per_block,
    default_memory_budget,
    rows_per_chunk,
)
from replay.precision import AUTO_TARGET, Precision, no_tf32, predicted_error
from replay.state import cast, frozen_names, retype, retyped, snapshot_state, uncompiled
from replay.updates import gradient_scale, record_on_device, update_rule

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
EVALUATION_MODE = "eval"  # how replay evaluates the model (module docstring), as a store records it
# Why a snapshot was computed otherwise than its precision says (SnapshotResult.fallback: 1 + the
# index here; 0: it was not); the store keeps the codes and these notes.
FALLBACK_NOTES = (
    "the arithmetic of the precision failed on this model; computed as a float64 difference (exact)",
)


@dataclass
class SnapshotResult:
    """What replay stores for one snapshot (``P`` probes, ``C`` outputs), on the CPU.

    ``update_norm`` and the measures cover the computed rows ``R`` (all ``P`` in a stored result).
    ``amplification`` ``[R]``: ``max|f(x_i; w)| / max|D[i, i]|``, by how much the rounding error of
    the outputs is magnified in the output change. ``self_change``: name -> ``[R]``, what each row
    of that measure divides by before ``eps`` (:func:`~replay.measures.self_change`; empty where
    not computed). ``error_estimate``: a bound on the relative error of the measures
    (:mod:`replay.check`).
    """

    base_outputs: Tensor  # [P, C]
    probe_loss: Tensor  # [P]
    update_norm: Tensor  # [R]
    measures: dict[str, Tensor]  # name -> [R, P]
    amplification: Tensor  # [R]
    error_estimate: float = math.nan
    arithmetic: str = ""  # the arithmetic that computed it (``auto``: the one it settled on)
    fallback: int = 0  # 1 + the index of its note in FALLBACK_NOTES where it fell back, else 0
    self_change: dict[str, Tensor] = field(default_factory=dict)  # name -> [R]
    ntk: Tensor | None = None  # [P, P] the empirical NTK (``ntk`` configured)
    linearisation_gap: Tensor | None = None  # [R] ||D[i] - J U_i|| / ||D[i]|| (finite and linear measured)
    module_share: Tensor | None = None  # [M, K, K] class-pair means of the module shares (``module_split``)


@functools.cache
def _retain_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of unmapping it (process-wide, once).

    A CPU replay allocates and frees blocks of hundreds of MiB in every operation (stacked weight
    copies, per-probe updates, activations of all probes); mapped afresh each time, their page
    faults would dominate the time of a large replay. The memory budget still bounds the peak; the
    process keeps it until it ends. Elsewhere than glibc, nothing happens.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


@contextlib.contextmanager
def _composable_attention() -> Iterator[None]:
    """Within: ``nn.MultiheadAttention`` and the transformer layers compute attention by their
    plain operations rather than a fused kernel that has no forward-mode derivative (the same
    values, the fused kernel being an optimization of inference)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@dataclass
class _Pass:
    """One evaluation of a snapshot in ``arithmetic``, block by block: its state (``exact`` dtype:
    ``params``, ``buffers``, probes ``x`` ``[P, ...]`` and ``y`` ``[P]`` / ``[P, C]``; ``fast``:
    ``update_params``; the network's dtype: ``grad_*``), its ``chunks`` of rows, what it has
    computed so far and the updates ``kept`` of the ``keep`` rows the check recomputes."""

    arithmetic: Arithmetic
    params: dict[str, Tensor]
    buffers: dict[str, Tensor]
    x: Inputs
    y: Tensor
    network: torch.dtype
    update_params: dict[str, Tensor]
    grad_params: dict[str, Tensor]
    grad_buffers: dict[str, Tensor]
    grad_x: Inputs
    chunks: tuple[Tensor, ...]
    keep: int
    kept: Kept
    nodes: BaseState | None = None  # every node's float64 value, where the changes propagate
    network_base: Tensor | None = None  # f(x; w) [P, C] in the network's dtype (a difference)
    block_outputs: Tensor | None = None  # f(x; w) [B, C] of the block's rows, by its per-sample pass
    base: Tensor | None = None  # f(x; w) [P, C] in the exact dtype
    changes: OutputChanges | None = None
    norms: list[Tensor] = field(default_factory=list)  # [B] a block
    amplification: list[Tensor] = field(default_factory=list)  # [B] a block
    measures: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> [B, P] a block
    self_change: dict[str, list[Tensor]] = field(default_factory=dict)  # name -> [B] a block
    kernel: TangentKernel | None = None  # the snapshot's tangent kernel, where it is used
    kernel_parts: Tensor | None = None  # [M, B, P, C] the block's module parts of J_j . U_i, by the kernel
    ntk: list[Tensor] = field(default_factory=list)  # [B, P] a block
    gap: list[Tensor] = field(default_factory=list)  # [B] a block: the linearisation gap of its rows
    share_sums: Tensor | None = None  # [M, K, K] sums of the module shares over the blocks so far
    share_counts: Tensor | None = None  # [M, K, K] how many pairs they sum

    def outputs(self) -> Tensor:
        """``base``, which :meth:`Engine._start` or the first block (:meth:`Engine._block`) gives."""
        assert self.base is not None, "the base outputs come with the pass or its first block"
        return self.base


class Engine:
    """Computes :class:`SnapshotResult` for the snapshots of one run under one configuration.

    ``inputs`` ``[P, ...]`` (or named tensors, :mod:`recorder.rundir.probes`) and ``targets``
    ``[P]`` / ``[P, C]``: the run's probe set. The plan
    (:mod:`replay.plan`) is chosen here: ``arithmetic`` (the one every snapshot starts with;
    ``auto`` moves a snapshot on to ``fallback`` when the first cannot resolve it: ``precision``),
    ``strategy`` and :meth:`rows_per_chunk`.
    """

    def __init__(self, spec: RunSpec, inputs: Inputs, targets: Tensor, config: ReplayConfig):
        self.config = config
        self.loss = spec.loss
        self.num_outputs = spec.num_outputs
        self.measures = resolve_measures(config.measures, spec.task)
        self.update = update_rule(config.update)
        self.gradient_scale = gradient_scale(config.update)  # U = c g: the gradients of c L are the updates
        try:
            self.device = torch.device(config.device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ReplayError(f"device {config.device!r} is not usable here ({e})") from None
        if self.device.type == "cpu":
            _retain_freed_memory()
        self.model = build_model(spec.model).eval().to(self.device)
        self.frozen = frozen_names(self.model, spec.extra)
        if config.only_module is not None:
            self.frozen |= _outside(self.model, self.frozen, config.only_module)
        self.inputs, self.targets = inputs, targets
        self.num_probes = num_probes(inputs)
        self.budget = config.memory_budget or default_memory_budget(self.device)
        try:
            self.propagator: ChangePropagator | None = ChangePropagator(self.model)
        except UnsupportedModel:
            self.propagator = None
        model_dtype = next(self.model.parameters()).dtype
        first = cast(take(inputs, slice(0, 1)), self.device, model_dtype)
        self.facts = ModelFacts(
            num_params=sum(p.numel() for p in self.model.parameters()),
            activations=activations_per_sample(self.model, first),
            traceable=self.propagator is not None,
        )
        self.precision = Precision(config.precision, self.facts.traceable, config.tolerance)
        self._eps_warned = False  # whether a snapshot's self changes were found dominated by eps
        self.arithmetic, self.fallback = self.precision.first, self.precision.fallback
        self.strategy = choose_strategy(config.strategy, self.device.type, self.facts, self.num_probes)
        self.kernel_linear = False  # until decided below: the vmap trial covers the jvp too
        if config.strategy == "auto" and self.strategy == Vmap.name and (problem := self._vmap_problem()):
            warnings.warn(
                f"the model cannot run under vmap ({problem}); probes are processed one at a time",
                ReplayWarning,
                stacklevel=2,
            )
            self.strategy = Loop.name
        self.batching = BATCHINGS[self.strategy]
        self.labels = (
            torch.from_numpy(class_labels(targets.numpy())[0]).to(self.device)
            if spec.task == "classification"
            else None
        )  # [P] class index of each probe
        self.kernel = self._uses_kernel()
        self.kernel_linear = self.kernel and any(m.linear for m in self.measures)
        self.modules = modules_of(self._trainable()) if config.module_split else ()
        self.check = ErrorCheck(
            self.model,
            self.propagator,
            inputs,
            self.device,
            self.batching,
            self.measures,
            config.ratio_eps,
            self.frozen,
        )

    def _vmap_problem(self) -> str | None:
        """Why the model cannot be evaluated under ``vmap`` (as data-dependent control flow, such
        as a check of an attention mask's values, forbids), found on two probes at the model's
        initial weights: their gradients and the output changes under them; None where it can."""
        count = min(2, self.num_probes)
        dtype = next(self.model.parameters()).dtype
        x = cast(take(self.inputs, slice(0, count)), self.device, dtype)
        y = cast(self.targets[:count], self.device, dtype)
        params = {k: v.detach() for k, v in self.model.named_parameters()}
        buffers = dict(self.model.named_buffers())
        try:
            with no_tf32(self.device), _composable_attention():
                grads = per_sample_grads(self.model, self.loss, params, buffers, x, y, strategy=Vmap.name)
                assert isinstance(grads, dict), "without outputs, the gradients alone"
                self._difference(params, buffers, x, None).rows(BATCHINGS[Vmap.name], grads)
        except Exception as e:  # noqa: BLE001 - whatever the model's operations raise under vmap
            first = str(e).splitlines()[0] if str(e) else ""
            return f"{type(e).__name__}: {first[:100]}{'...' if len(first) > 100 else ''}"
        return None

    def _trainable(self) -> list[str]:
        return [k for k, _ in self.model.named_parameters() if k not in self.frozen]

    def _uses_kernel(self) -> bool:
        """Whether snapshots compute a tangent kernel (:mod:`replay.firstorder`): for ``ntk`` and
        ``module_split``, which then also gives ``linear`` (so that the module parts add up to it
        exactly; elsewhere the passes' Jacobian-vector product, computed with the exact change,
        costs less). Checks the kernel against the memory budget, from the kernel of the first
        probes at the model's initial weights: :class:`ReplayError` where it cannot fit or apply."""
        config = self.config
        if config.module_split and self.labels is None:
            raise ReplayError("module_split needs a classification run: its shares are class-pair means")
        if not (config.ntk or config.module_split):
            return False
        count = min(2, self.num_probes)
        trainable = set(self._trainable())
        params = {k: cast(v.detach(), self.device, torch.float64) for k, v in self.model.named_parameters()}
        buffers = {k: cast(v, self.device, torch.float64) for k, v in self.model.named_buffers()}
        buffers |= {k: params.pop(k) for k in list(params) if k not in trainable}
        x = cast(take(self.inputs, slice(0, count)), self.device, torch.float64)
        plan = TangentKernel(self.model, params, buffers, x, self.strategy, materialise=False)
        needed = plan.bytes_for(self.num_probes)
        if needed <= self.budget:
            return True
        raise ReplayError(
            f"the tangent kernel of {self.num_probes} probes (for ntk or module_split) needs about "
            f"{needed / 2**30:.2f} GiB, above the memory budget of {self.budget / 2**30:.2f} GiB; "
            "raise --memory-budget or use fewer probes"
        )

    @property
    def measure_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.measures)

    def rows_per_chunk(self, arithmetic: str) -> int:
        """How many updated probes are processed at once within the memory budget, in ``arithmetic``."""
        columns = self.columns_per_block(arithmetic)
        return rows_per_chunk(
            self.facts, self.num_probes, ARITHMETIC[arithmetic], self.strategy, self.budget, columns
        )

    def columns_per_block(self, arithmetic: str) -> int:
        """On how many observed probes an updated probe is evaluated at once, in ``arithmetic``."""
        return columns_per_block(
            self.facts, self.num_probes, ARITHMETIC[arithmetic], self.strategy, self.budget
        )

    def replay_snapshot(self, snapshot: Snapshot) -> SnapshotResult:
        """All stored quantities of one snapshot (NaN, with a warning, for non-finite weights).

        Raises :class:`ReplayError` when an arithmetic other than float64 (and not ``auto``'s
        float32 difference, which gives way to its fallback) cannot resolve the output changes
        within the tolerance.
        """
        where = f"snapshot step {snapshot.step}"
        snapshot = uncompiled(snapshot, dict(self.model.named_parameters()))
        check_state_matches(self.model, snapshot.params, where)
        if snapshot.nonfinite:
            return self._nan(where, snapshot.nonfinite)
        # ``auto`` decides per snapshot, from that snapshot alone, so that a resumed or distributed
        # replay gives the same arrays as one uninterrupted process.
        with no_tf32(self.device), _composable_attention():
            kernel = self._tangent_kernel(snapshot) if self.kernel else None
            try:
                result = self.precision.settle(
                    lambda arithmetic, fallback: self._evaluate(snapshot, arithmetic, fallback, kernel),
                    lambda result, kept: self._estimate(snapshot, result, kept),
                )
            except ReplayError:
                raise
            except Exception as e:  # noqa: BLE001 - whatever the model's operations raise there
                if self.arithmetic == EXACT:
                    raise
                result = self._exact(where, snapshot, e, kernel)
        self.precision.judge(where, result)
        self._warn_eps(where, result)
        return result

    def _warn_eps(self, where: str, result: SnapshotResult) -> None:
        """Warn (one line, at the first snapshot only) where ``eps`` dominates the self change of a
        probe in some measure (:func:`~replay.measures.eps_dominated`): those rows of ``S`` are
        more ``eps`` than change."""
        eps = self.config.ratio_eps
        flagged = {k: v[eps_dominated(v, eps)] for k, v in result.self_change.items()}
        flagged = {k: v for k, v in flagged.items() if len(v)}
        if not flagged or self._eps_warned:
            return
        self._eps_warned = True
        smallest = min(v.abs().min().item() for v in flagged.values())
        count = max(len(v) for v in flagged.values())
        warnings.warn(
            f"{where}: ratio eps {eps:g} exceeds {EPS_SHARE:.0%} of the self change N[i, i] of up to "
            f"{count} of {self.num_probes} probes in {', '.join(flagged)} (smallest {smallest:.2g}): "
            "their rows of S are mostly eps; a smaller --ratio-eps (0 suits tiny steps) avoids it "
            "(later snapshots go unreported here: the store's self_change arrays hold every self change)",
            ReplayWarning,
            stacklevel=3,
        )

    def reference(self, snapshot: Snapshot) -> dict[str, Tensor]:
        """Every measure ``[P, P]`` of ``snapshot`` in float64 throughout, gradients, updates and
        changes, the changes propagated rather than differenced (no cancellation whatever the step;
        for a model ``torch.fx`` cannot trace, a float64 difference): what the error estimate
        bounds the error against (:mod:`replay.calibration`)."""
        snapshot = uncompiled(snapshot, dict(self.model.named_parameters()))
        every = torch.arange(self.num_probes)
        with no_tf32(self.device), _composable_attention():
            updates = self._exact_updates(snapshot, every)
            return self.check.reference(snapshot, every, updates, every, torch.float64)

    def _tangent_kernel(self, snapshot: Snapshot) -> TangentKernel:
        """The tangent kernel of ``snapshot`` over every probe, in float64 (:mod:`replay.firstorder`)."""
        params, buffers = snapshot_state(self.model, snapshot, self.device, torch.float64, self.frozen)
        x = cast(self.inputs, self.device, torch.float64)
        return TangentKernel(self.model, params, buffers, x, self.strategy, budget=self.budget)

    def _exact(
        self, where: str, snapshot: Snapshot, error: Exception, kernel: TangentKernel | None
    ) -> SnapshotResult:
        """``snapshot`` as a float64 difference, where its own arithmetic raised ``error``, with a
        warning and the note :data:`FALLBACK_NOTES` ``[0]``."""
        warnings.warn(
            f"{where}: {FALLBACK_NOTES[0]} ({type(error).__name__}: {str(error).splitlines()[0][:200]})",
            ReplayWarning,
            stacklevel=3,
        )
        with self._looping():
            evaluated = self._evaluate(snapshot, EXACT, None, kernel)
            assert evaluated is not None, "without a fallback, a pass runs to its end"
            result, kept = evaluated
            result.error_estimate = self._estimate(snapshot, result, kept)
        result.fallback = 1
        return result

    @contextlib.contextmanager
    def _looping(self) -> Iterator[None]:
        """Within: the ``loop`` strategy, one plain call per row (no batching rule needed)."""
        planned = self.strategy, self.batching
        self.strategy, self.batching = Loop.name, BATCHINGS[Loop.name]
        self.check.batching = self.batching
        try:
            yield
        finally:
            self.strategy, self.batching = planned
            self.check.batching = self.batching

    def _nan(self, where: str, nonfinite: list[str]) -> SnapshotResult:
        """The result of a snapshot with non-finite weights ``nonfinite``: NaN, with a warning."""
        warnings.warn(
            f"{where}: non-finite weights in {nonfinite[:3]}; its measures are NaN",
            ReplayWarning,
            stacklevel=3,
        )

        def nan(*shape: int) -> Tensor:
            return torch.full(shape, math.nan, dtype=self.arithmetic.exact)

        return SnapshotResult(
            base_outputs=nan(self.num_probes, self.num_outputs),
            probe_loss=nan(self.num_probes),
            update_norm=nan(self.num_probes),
            measures={m.name: nan(self.num_probes, self.num_probes) for m in self.measures},
            amplification=nan(self.num_probes),
            self_change={m.name: nan(self.num_probes) for m in self.measures},
            ntk=nan(self.num_probes, self.num_probes) if self.config.ntk else None,
            linearisation_gap=nan(self.num_probes) if all(needs(self.measures)) else None,
            module_share=nan(len(self.modules), *(2 * [self._num_classes()])) if self.modules else None,
        )

    def _num_classes(self) -> int:
        assert self.labels is not None, "classification"
        return int(self.labels.max()) + 1

    def _evaluate(
        self,
        snapshot: Snapshot,
        arithmetic: Arithmetic,
        fallback: Arithmetic | None = None,
        kernel: TangentKernel | None = None,
    ) -> tuple[SnapshotResult, Kept] | None:
        """Every row of ``snapshot`` in ``arithmetic``, and the updates of the check's rows with the
        largest amplification (none in float64). With a ``fallback`` (one the first block can decide
        on, :func:`replay.precision.predictable`), the first block's updates decide: where
        :func:`~replay.precision.predicted_error` exceeds :data:`AUTO_TARGET`, every row is computed in ``fallback``
        instead, continuing with the gradients and updates already computed where ``fallback`` runs
        the same blocks (the result is the one ``fallback`` alone gives); else None: start afresh.
        ``kernel``: the snapshot's tangent kernel, where the engine uses one (:meth:`_uses_kernel`)."""
        run = self._start(snapshot, arithmetic)
        run.kernel = kernel
        snapshot = record_on_device(self.config.update, snapshot, self.device, arithmetic.fast)
        predict = fallback is not None and needs(self.measures)[0]
        for chunk in run.chunks:
            grads, updates, norms = self._block(snapshot, run, chunk)
            if (
                predict
                and fallback is not None  # predict: there is one
                and predicted_error(
                    self.loss, self.gradient_scale, run.outputs(), run.y, chunk, grads, updates, norms
                )
                > AUTO_TARGET
            ):
                if self.rows_per_chunk(fallback.name) != self.rows_per_chunk(arithmetic.name):
                    return None
                run.arithmetic = fallback
                self._propagate(run)
            predict = False
            del grads
            if run.changes is None:
                run.changes = self._changes(run)
            self._first_order(snapshot, run, chunk)
            self._measure(run, run.changes, chunk, updates, norms)
        return self._result(run), run.kept

    def _start(self, snapshot: Snapshot, arithmetic: Arithmetic) -> _Pass:
        """A pass of ``snapshot`` in ``arithmetic``: its state, blocks and, but where one block of a
        difference holds every probe (its per-sample pass gives them), its base outputs."""
        exact, fast = arithmetic.exact, arithmetic.fast
        params, buffers = snapshot_state(self.model, snapshot, self.device, exact, self.frozen)
        x, y = cast(self.inputs, self.device, exact), cast(self.targets, self.device, exact)
        network = network_dtype(self.loss, arithmetic)
        update_params = {k: v.to(fast) for k, v in params.items()}
        grad_params = update_params if network == fast else params
        # blocks of equal size (within one row): 16 rows at 11 a block run as 8 + 8, not 11 + 5
        chunks = torch.arange(self.num_probes).tensor_split(
            -(-self.num_probes // self.rows_per_chunk(arithmetic.name))
        )
        keep = self.check.rows(arithmetic)
        run = _Pass(
            arithmetic=arithmetic,
            params=params,
            buffers=buffers,
            x=x,
            y=y,
            network=network,
            update_params=update_params,
            grad_params=grad_params,
            grad_buffers=retyped(buffers, network),
            grad_x=retype(x, network),
            chunks=chunks,
            keep=keep,
            kept=Kept.empty(exact, None),
            measures={m.name: [] for m in self.measures},
            self_change={m.name: [] for m in self.measures},
        )
        if arithmetic.changes.propagates:
            self._propagate(run)
        elif len(chunks) > 1:
            run.network_base = forward(self.model, run.grad_x, (grad_params, run.grad_buffers))
            run.base = run.network_base.to(exact)
        return run

    def _propagate(self, run: _Pass) -> None:
        """Evaluate every node of ``run``'s model in float64 (the base outputs are the last), for its
        changes to propagate from and, when the check covers every probe, for the check too."""
        propagator = self._propagator()
        run.nodes = propagator.base(run.params, run.buffers, run.x, run.arithmetic.fast)
        run.base = propagator.outputs(run.nodes)
        run.kept.base = run.nodes if run.keep and self._check_everything(run.keep) else None

    def _block(
        self, snapshot: Snapshot, run: _Pass, chunk: Tensor
    ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor], Tensor]:
        """The per-sample gradients (None where they are the updates), the updates (name ->
        ``[B, *shape]``, fast dtype) and the update norms ``[B]`` (exact dtype) of the rows ``chunk``
        ``[B]``; the base outputs too, where no other pass gives them, and the block's outputs as
        that pass computed them (``run.block_outputs``)."""
        fast, exact = run.arithmetic.fast, run.arithmetic.exact
        computed = per_sample_grads(
            self.model,
            self.loss,
            run.grad_params,
            run.grad_buffers,
            take(run.grad_x, chunk),
            run.y[chunk],
            torch.float64,
            self.strategy,
            with_outputs=True,
            scale=self.gradient_scale or 1.0,
        )
        assert isinstance(computed, tuple), "with outputs"
        computed, run.block_outputs = computed
        if run.base is None:  # one block holds every probe
            run.network_base = run.block_outputs
            run.base = run.network_base.to(exact)
        fast_grads = {k: g.to(fast) for k, g in computed.items()}
        del computed  # the gradients in float64: freed before the updates
        updates, grads = block_updates(
            self.update, self.gradient_scale, run.update_params, fast_grads, snapshot
        )
        return grads, updates, update_norms(updates, exact)

    def _estimate(self, snapshot: Snapshot, result: SnapshotResult, kept: Kept) -> float:
        """The error estimate of ``result`` (:meth:`ErrorCheck.estimate`) from its ``kept`` rows."""
        return self.check.estimate(snapshot, result, kept, functools.partial(self._exact_updates, snapshot))

    def _exact_updates(self, snapshot: Snapshot, rows: Tensor) -> dict[str, Tensor]:
        """The updates (name -> ``[R, *shape]``) of the probes ``rows`` ``[R]`` in float64 throughout,
        gradients and update rule: what the error check holds a pass's updates against."""
        params, buffers = snapshot_state(self.model, snapshot, self.device, torch.float64, self.frozen)
        grads = per_sample_grads(
            self.model,
            self.loss,
            params,
            buffers,
            cast(take(self.inputs, rows), self.device, torch.float64),
            cast(self.targets[rows], self.device, torch.float64),
            torch.float64,
            self.strategy,
            scale=self.gradient_scale or 1.0,
        )
        assert isinstance(grads, dict), "without outputs, the gradients alone"
        record = record_on_device(self.config.update, snapshot, self.device, torch.float64)
        return block_updates(self.update, self.gradient_scale, params, grads, record)[0]

    def _changes(self, run: _Pass) -> OutputChanges:
        """The output changes of ``run``'s arithmetic (:mod:`replay.changes`): propagated from the
        pass's float64 evaluation of every node, or a difference in the fast dtype (from the
        network's base outputs where the network runs in that dtype)."""
        fast = run.arithmetic.fast
        if run.arithmetic.changes.propagates:
            assert run.nodes is not None, "a propagating pass starts with _propagate"
            return self._propagation(run.nodes, fast)
        base = run.network_base if run.network == fast else None
        buffers = retyped(run.buffers, fast)
        columns = self.columns_per_block(run.arithmetic.name)
        return self._difference(run.update_params, buffers, retype(run.x, fast), base, columns)

    def _difference(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Inputs,
        base: Tensor | None,
        columns: int | None = None,
    ) -> Difference:
        """A :class:`~replay.changes.Difference` of the model with what the measures need, the
        observed probes in blocks of ``columns`` (None: all at once)."""
        return Difference(self.model, params, buffers, x, base, *self._needs(), columns)

    def _propagation(self, nodes: BaseState, dtype: torch.dtype) -> Propagation:
        """A :class:`~replay.changes.Propagation` of the model with what the measures need."""
        return Propagation(self._propagator(), nodes, dtype, *self._needs())

    def _needs(self) -> tuple[bool, bool]:
        """Whether the passes compute the finite change and the Jacobian-vector product (not where
        the tangent kernel gives it)."""
        finite, linear = needs(self.measures)
        return finite, linear and not self.kernel_linear

    def _first_order(self, snapshot: Snapshot, run: _Pass, chunk: Tensor) -> None:
        """The tangent kernel's part of the rows ``chunk`` ``[B]``: ``ntk`` rows, the module parts of
        the first-order change (``run.kernel_parts`` ``[M, B, P, C]``, the linear change where the
        kernel gives it) and their class-pair sums."""
        run.kernel_parts = None
        if run.kernel is None:
            return
        kernel, rows = run.kernel, chunk.to(self.device)
        if self.config.ntk:
            run.ntk.append(torch.cat([kernel.ntk(r) for r in rows.split(kernel.rows_per_block())]))
        if not (self.kernel_linear or self.modules):
            return
        if self.gradient_scale is not None:
            grads = self.gradient_scale * output_gradients(
                self.loss, kernel.outputs, cast(self.targets, self.device, torch.float64)
            )
            parts = torch.cat(
                [
                    kernel.parts(r, output_grads=grads[r], by_module=bool(self.modules))
                    for r in rows.split(kernel.rows_per_block())
                ],
                dim=1,
            )
        else:
            updates = self._exact_updates(snapshot, chunk)
            parts = torch.cat(
                [
                    kernel.parts(
                        rows[b], updates={k: u[b] for k, u in updates.items()}, by_module=bool(self.modules)
                    )
                    for b in torch.arange(len(rows), device=self.device).split(kernel.rows_per_block())
                ],
                dim=1,
            )
        run.kernel_parts = parts if self.kernel_linear else None
        if self.modules:
            assert self.labels is not None, "module_split: classification"
            shares = module_shares(parts, rows, self.config.ratio_eps)  # [M, B, P]
            sums, counts = pair_sums(shares, rows, self.labels, self._num_classes(), self.config.include_self)
            run.share_sums = sums if run.share_sums is None else run.share_sums + sums
            run.share_counts = counts if run.share_counts is None else run.share_counts + counts

    def _propagator(self) -> ChangePropagator:
        """The model's :class:`ChangePropagator`: only arithmetics that propagate ask for it, and
        :class:`~replay.precision.Precision` gives those to traceable models only."""
        assert self.propagator is not None, "propagation of a model torch.fx cannot trace"
        return self.propagator

    def _measure(
        self, run: _Pass, changes: OutputChanges, chunk: Tensor, updates: dict[str, Tensor], norms: Tensor
    ) -> None:
        """Add the measures ``[B, P]``, self changes, amplifications and update ``norms`` ``[B]`` of
        the rows ``chunk`` ``[B]`` under their ``updates`` (output changes by ``changes``, the
        pass's) to ``run``, and keep the check's rows (:func:`~replay.check.sensitivity`)."""
        exact = run.arithmetic.exact
        # A probe whose update is exactly zero leaves every output exactly where it was: its
        # row of changes is zero, not the rounding noise of two forward passes.
        moved = norms > 0  # [B]
        computed = changes.rows(self.batching, updates) if any(self._needs()) else {}
        if run.kernel_parts is not None:
            computed["linear"] = run.kernel_parts.sum(0)
        changed = {k: v.to(exact) * moved[:, None, None] for k, v in computed.items()}  # [B, P, C]
        if len(changed) == 2:
            exact_change = changed["finite"].flatten(1)  # [B, P * C]
            run.gap.append(
                (exact_change - changed["linear"].flatten(1)).norm(dim=1) / exact_change.norm(dim=1)
            )
        base, rows, eps = run.outputs(), chunk.to(self.device), self.config.ratio_eps
        measured, selfs = evaluate_with_self(self.measures, base, changed, rows, eps)
        for name, S in measured.items():
            run.measures[name].append(S)
            run.self_change[name].append(selfs[name])
        if needs(self.measures)[0]:
            run.amplification.append(amplification(base, changed["finite"], chunk, moved))
        else:
            run.amplification.append(torch.ones(len(chunk), dtype=exact, device=self.device))
        run.norms.append(norms)
        gradients = None  # their rounding: where the base outputs are float64, beside the network's own
        if run.arithmetic.changes.propagates and run.block_outputs is not None:
            gradients = gradient_rounding(self.loss, run.block_outputs, base[chunk], run.y[chunk])
        score, columns = sensitivity(
            self.measures, base, changed, rows, eps, measured, run.arithmetic, norms, gradients
        )
        run.kept = run.kept.merge(chunk, score, columns, run.keep)

    def _result(self, run: _Pass) -> SnapshotResult:
        """What ``run`` computed, on the CPU."""
        base = run.outputs()
        return SnapshotResult(
            base_outputs=base.cpu(),
            probe_loss=per_sample_loss(self.loss, base, run.y).cpu(),
            update_norm=torch.cat(run.norms).cpu(),
            measures={k: torch.cat(v).cpu() for k, v in run.measures.items()},
            amplification=torch.cat(run.amplification).cpu(),
            arithmetic=run.arithmetic.name,
            self_change={k: torch.cat(v).cpu() for k, v in run.self_change.items()},
            ntk=torch.cat(run.ntk).to(run.arithmetic.exact).cpu() if run.ntk else None,
            linearisation_gap=torch.cat(run.gap).cpu() if run.gap else None,
            module_share=(
                (run.share_sums / run.share_counts).to(run.arithmetic.exact).cpu()
                if run.share_sums is not None and run.share_counts is not None
                else None
            ),
        )

    def _check_everything(self, keep: int) -> bool:
        """Whether the check of ``keep`` rows covers every probe (:meth:`ErrorCheck.everything`)."""
        return self.check.everything(keep)


def _outside(model: nn.Module, frozen: frozenset[str], module: str) -> frozenset[str]:
    """The trainable parameters of ``model`` outside ``module`` (held fixed where the virtual step
    moves that module alone); :class:`ReplayError` where ``module`` has no trainable parameter."""
    trainable = [k for k, _ in model.named_parameters() if k not in frozen]
    inside = {k for k in trainable if k.startswith(f"{module}.")}
    if not inside:
        raise ReplayError(
            f"module {module!r} has no trainable parameters; the model's modules with some: "
            f"{', '.join(repr(m) for m in modules_of(trainable))}"
        )
    return frozenset(trainable) - inside

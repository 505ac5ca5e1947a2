"""Recompute S_rel for one snapshot with ``torch.func``.

For a snapshot with weights ``w`` and ``P`` probes ``(x_i, y_i)`` (``C`` outputs):

1. per-sample gradients ``g_i`` (``grad`` of each probe's loss through ``functional_call``, model
   in eval mode);
2. virtual updates ``U_i = U(g_i)`` (:mod:`replay.updates`; where ``U = c g``, ``sgd`` without
   weight decay, step 1 differentiates ``c`` times each loss and its gradients are the updates);
3. output changes of every probe ``j`` under every update ``i``, ``D[i, j] = f(x_j; w + U_i) -
   f(x_j; w)`` ``[B, P, C]``, and for ``linear`` the Jacobian-vector products ``J_j . U_i``;
4. the measures ``S[i, j]`` (:mod:`replay.measures`).

Steps 1-4 run over blocks of ``B`` updated probes within the memory budget, by the plan of
:mod:`replay.plan`: the block vmapped over stacked weight copies, or looped probe by probe.

Precision. ``D`` is a small difference of nearly equal outputs (SPEC §3). Formed as the
difference of two forward passes it carries the rounding of the outputs, ``eps * |f| / |D|``
relative: in float32 1e-6 to 1e-2 under ``adam-fresh`` and more than 100% under ``sgd`` at lr
1e-4. The arithmetics of :mod:`replay.plan`:

- ``float64``: everything in float64, ``D`` as a difference: the reference. Its error estimate is
  the rounding model ``eps64 * median_i(max|f(x_i)| / max|D[i, i]|)``.
- ``float32``: everything in float32 (but the loss, see below), ``D`` as a difference.
- ``difference32``: ``D`` and ``J . U`` as in float32, the loss gradients and measures in float64.
- ``mixed``: ``difference32`` with ``D`` and ``J . U`` from one float32 pass of
  :mod:`replay.difference`, which propagates the change itself through the layers and never
  subtracts two outputs: about 1e-7 relative error whatever the step, at up to twice the
  arithmetic of a float32 difference (measured: 1.0 to 1.9 times its time); its base outputs
  ``f(x; w)`` are those of the float64 evaluation the propagation starts from.
- ``auto`` (the precision, not an arithmetic): ``difference32`` while its estimated error stays
  below :data:`AUTO_TARGET` (a tenth of the 1e-3 bar), else ``mixed`` (``float64`` for models
  ``torch.fx`` cannot trace) for that snapshot. Once the first block's updates are known, and
  before any change is computed, ``auto`` predicts the float32 difference's error from the
  rounding model (:meth:`Engine._predicted_error`) and, where it exceeds the target, computes
  the snapshot in ``mixed`` straight away; otherwise the checked estimate of the difference
  decides. So a step that float32 resolves costs a float32 difference, one it plainly does not
  (``sgd`` at small lr) a propagation, and only a step the prediction misjudges both.

Per-sample gradients: the loss is evaluated in float64 on the outputs in every arithmetic (the
loss gradient ``softmax - one-hot`` of a well fitted probe cancels, in float32 by up to a half).
For ``cross_entropy`` the network runs in the fast dtype (the logits' own rounding does not
matter there); for squared losses, whose residual ``f - y`` cancels in the forward pass itself,
in the exact dtype. A difference takes its base outputs ``f(x; w)`` from the network too (the
float32 difference needs them there; in the measures their float32 rounding, 1e-7 relative, meets
no cancellation, and a float64 forward pass cost ResNet-18 as much as the float32 pass it serves):
from that same pass when one block holds every probe, else from one forward pass.

Error estimate of every arithmetic but float64: the :func:`check_rows` rows (``CHECK_ROWS``,
fewer below ``CHECK_ROWS * CHECK_SHARE`` probes, at least one) with the largest amplification
``max|f(x_i)| / max|D[i, i]|`` (the rows with the most rounding error) are recomputed from the
same updates, on those rows' own probes and ``CHECK_COLUMNS`` others (after a propagation, on
every probe when that is most of them: the check then shares the pass's float64 evaluation of
the model), with the changes propagated by :mod:`replay.difference` (no cancellation), from
float64 base values (from float32 ones its own error reached 3e-5 for ResNet-18 at tiny steps):
in float32 for the arithmetics that difference (its own error, at most 1e-6, is the floor of the
estimate), in float64 for ``mixed``; for a model ``torch.fx`` cannot trace, as a float64
difference. The estimate is the largest relative row error of any measure there. It covers the
output changes and the measures, not the float32 rounding of the per-sample gradients and updates
(measured against float64: 1e-7 in the measures of the MLPs, 3e-6 in those of ResNet-18). An
arithmetic other than float64 is refused when its estimate exceeds the tolerance; TF32 stays off.

On a CPU the engine has glibc keep freed memory (:func:`_retain_freed_memory`).
"""

from __future__ import annotations

import ctypes
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from recorder.losses import per_sample_loss
from recorder.models import build_model, check_state_matches
from recorder.rundir.errors import ReplayError, ReplayWarning, RunDirError, UnsupportedModel
from recorder.rundir.snapshot import Snapshot
from recorder.rundir.spec import RunSpec
from replay.config import ReplayConfig
from replay.difference import BaseState, ChangePropagator
from replay.measures import Changes, ratio, resolve_measures
from replay.plan import (
    ARITHMETIC,
    Arithmetic,
    ModelFacts,
    activations_per_sample,
    choose_arithmetic,
    choose_strategy,
    default_memory_budget,
    rows_per_chunk,
)
from replay.updates import gradient_scale, update_rule

CHECK_ROWS = 4  # rows recomputed to estimate the error of the other arithmetics (at most)
CHECK_COLUMNS = 4  # probes they are recomputed on, besides their own
CHECK_SHARE = 16  # rows per checked row (costing about two): the check is about an eighth of the pass
AUTO_TARGET = 1e-4  # largest estimated error at which 'auto' keeps the float32 difference
PREDICT_ROWS = 4  # rows of a block whose gradients and updates predict the float32 difference's error
# relative error of changes propagated by replay.difference (float32: measured at most 8e-7 on the
# built-in models, tests/test_precision.py), the floor of an error estimate checked against them
PROPAGATION_ERROR = {torch.float32: 1e-6, torch.float64: torch.finfo(torch.float64).eps}
EXACT = ARITHMETIC["float64"]
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def check_rows(num_probes: int) -> int:
    """How many rows the error estimate recomputes: ``CHECK_ROWS``, fewer for few probes (one row
    per ``CHECK_SHARE`` probes, at least one, the row with the most rounding error), so that the
    check (two products a layer, on ``R`` rows and about ``R + CHECK_COLUMNS`` probes) stays a
    fraction of the ``P x P`` pass it checks instead of doubling it at small ``P``."""
    return max(1, min(CHECK_ROWS, num_probes // CHECK_SHARE))


@dataclass
class SnapshotResult:
    """What replay stores for one snapshot (``P`` probes, ``C`` outputs), on the CPU.

    ``update_norm`` and the measures cover the computed rows ``R`` (all ``P`` in a stored result).
    ``amplification`` ``[R]``: ``max|f(x_i; w)| / max|D[i, i]|``, by how much the rounding error of
    the outputs is magnified in the output change.
    """

    base_outputs: Tensor  # [P, C]
    probe_loss: Tensor  # [P]
    update_norm: Tensor  # [R]
    measures: dict[str, Tensor]  # name -> [R, P]
    amplification: Tensor  # [R]
    error_estimate: float = math.nan
    arithmetic: str = ""  # the arithmetic that computed it (``auto``: the one it settled on)


def per_sample_grads(
    model: nn.Module,
    loss: str,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_dtype: torch.dtype | None = None,
    strategy: str = "vmap",
    with_outputs: bool = False,
    scale: float = 1.0,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor]:
    """Gradient of each sample's loss alone: x ``[B, ...]``, y ``[B]`` or ``[B, C]`` -> name ->
    ``[B, *shape]`` (in the dtype of ``params``). ``loss_dtype``: the dtype the outputs are cast
    to before the loss (default: theirs); ``strategy``: ``vmap`` over the samples or a ``loop``;
    ``with_outputs``: also return the model's outputs ``[B, C]`` (in the dtype of ``params``),
    which the pass computes anyway; ``scale``: the gradient of ``scale`` times the loss."""

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        outputs = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        cast = outputs if loss_dtype is None else outputs.to(loss_dtype)
        yi = yi.to(cast.dtype) if yi.is_floating_point() else yi
        return scale * per_sample_loss(loss, cast, yi.unsqueeze(0))[0], outputs[0].detach()

    if strategy == "vmap":
        grads, outputs = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
    else:
        rows = [grad(sample_loss, has_aux=True)(params, x[b], y[b]) for b in range(len(x))]
        grads = {k: torch.stack([r[0][k] for r in rows]) for k in params}
        outputs = torch.stack([r[1] for r in rows])
    return (grads, outputs) if with_outputs else grads


@functools.cache
def _retain_freed_memory() -> None:
    """Have glibc keep freed memory for reuse instead of unmapping it (process-wide, once).

    A CPU replay allocates and frees blocks of hundreds of MiB in every operation (stacked weight
    copies, per-probe updates, activations of all probes); mapped afresh each time, their page
    faults doubled the time of a ResNet-18 replay (measured). The memory budget still bounds the
    peak; the process keeps it until it ends. Elsewhere than glibc, nothing happens.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


@contextmanager
def no_tf32(device: torch.device) -> Iterator[None]:
    """Full float32 matmuls and convolutions on a GPU (cuDNN defaults to TF32)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _relative_error(approx: dict[str, Tensor], reference: dict[str, Tensor]) -> float:
    """Largest over measures and rows of ``||approx[r] - reference[r]|| / ||reference[r]||``
    (measures ``[R, J]``; over the finite reference entries; NaN where ``approx`` is not finite)."""
    errors = []
    for name, ref in reference.items():
        finite = torch.isfinite(ref)
        diff = torch.where(finite, approx[name].to(ref) - ref, 0).norm(dim=1)
        scale = torch.where(finite, ref, 0).norm(dim=1)
        errors.append(torch.where(scale > 0, diff / scale, diff).max().item())
    return max(errors)


@dataclass
class _Kept:
    """The updates (name -> ``[R, *shape]``, fast dtype) of the ``R`` rows with the largest
    amplification so far, and those rows' indices ``[R]`` and amplifications ``[R]``."""

    rows: Tensor
    amplification: Tensor
    updates: dict[str, Tensor]
    # every node's float64 value on all P probes (:meth:`ChangePropagator.base`), when the check
    # runs on all probes and can share it instead of evaluating the model again
    base: BaseState | None = None

    def merge(self, rows: Tensor, amplification: Tensor, updates: dict[str, Tensor], keep: int) -> _Kept:
        """The ``keep`` rows with the largest amplification of these and the new ``rows`` (whose
        updates are ``updates``, name -> ``[B, *shape]``)."""
        amplification = torch.cat([self.amplification, amplification.nan_to_num(math.inf)])
        top = amplification.argsort(descending=True, stable=True)[:keep]
        old, new = top[top < len(self.rows)], top[top >= len(self.rows)] - len(self.rows)
        if not len(old):  # the first block, or nothing kept survives: one copy, not two
            return _Kept(
                rows=rows[new],
                amplification=amplification[len(self.rows) + new],
                updates={k: u[new.to(u.device)] for k, u in updates.items()},
                base=self.base,
            )
        return _Kept(
            rows=torch.cat([self.rows[old], rows[new]]),
            amplification=torch.cat([amplification[old], amplification[len(self.rows) + new]]),
            updates={
                k: torch.cat([v[old.to(v.device)], updates[k][new.to(v.device)]])
                for k, v in self.updates.items()
            },
            base=self.base,
        )


class Engine:
    """Computes :class:`SnapshotResult` for the snapshots of one run under one configuration.

    ``inputs`` ``[P, ...]`` and ``targets`` ``[P]`` / ``[P, C]``: the run's probe set. The plan
    (:mod:`replay.plan`) is chosen here: ``arithmetic`` (the one every snapshot starts with;
    ``auto`` moves a snapshot on to ``fallback`` when the first cannot resolve it), ``strategy`` and :meth:`rows_per_chunk`.
    """

    def __init__(self, spec: RunSpec, inputs: Tensor, targets: Tensor, config: ReplayConfig):
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
        self.inputs, self.targets = inputs, targets
        self.budget = config.memory_budget or default_memory_budget(self.device)
        try:
            self.propagator: ChangePropagator | None = ChangePropagator(self.model)
        except UnsupportedModel:
            self.propagator = None
        model_dtype = next(self.model.parameters()).dtype
        self.facts = ModelFacts(
            num_params=sum(p.numel() for p in self.model.parameters()),
            activations=activations_per_sample(self.model, self._cast(inputs[:1], model_dtype)),
            traceable=self.propagator is not None,
        )
        self.arithmetic, self.fallback = choose_arithmetic(config.precision, self.facts.traceable)
        self.strategy = choose_strategy(config.strategy, self.device.type, self.facts, len(inputs))

    @property
    def measure_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.measures)

    def rows_per_chunk(self, arithmetic: str) -> int:
        """How many updated probes are processed at once within the memory budget, in ``arithmetic``."""
        return rows_per_chunk(
            self.facts, len(self.inputs), ARITHMETIC[arithmetic], self.strategy, self.budget
        )

    def replay_snapshot(self, snapshot: Snapshot) -> SnapshotResult:
        """All stored quantities of one snapshot (NaN, with a warning, for non-finite weights).

        Raises :class:`ReplayError` when an arithmetic other than float64 (and not ``auto``'s
        float32 difference, which gives way to its fallback) cannot resolve the output changes
        within the tolerance.
        """
        where = f"snapshot step {snapshot.step}"
        check_state_matches(self.model, snapshot.params, where)
        num_probes = len(self.inputs)
        if snapshot.nonfinite:
            warnings.warn(
                f"{where}: non-finite weights in {snapshot.nonfinite[:3]}; its measures are NaN",
                ReplayWarning,
                stacklevel=2,
            )

            def nan(*shape: int) -> Tensor:
                return torch.full(shape, math.nan, dtype=self.arithmetic.exact)

            return SnapshotResult(
                base_outputs=nan(num_probes, self.num_outputs),
                probe_loss=nan(num_probes),
                update_norm=nan(num_probes),
                measures={m.name: nan(num_probes, num_probes) for m in self.measures},
                amplification=nan(num_probes),
            )
        # ``auto`` decides per snapshot, from that snapshot alone, so that a resumed or distributed
        # replay gives the same arrays as one uninterrupted process.
        # ``auto`` never refuses: where its fallback cannot resolve a snapshot either (rows whose
        # update barely moves any output, say), that snapshot is computed in float64.
        # ``auto`` predicts, once the first block's updates are known, whether the float32
        # difference will miss its target, and then computes the snapshot in ``mixed`` directly
        # (:meth:`_predicted_error`); a wrong prediction is caught by the checked estimate.
        tolerance = self.config.tolerance
        with no_tf32(self.device):
            result = self._replay(snapshot, self.arithmetic, self.fallback)
            arithmetic = ARITHMETIC[result.arithmetic]
            if arithmetic != self.fallback and self.fallback is not None:
                if not result.error_estimate <= AUTO_TARGET:
                    arithmetic = self.fallback
                    result = self._replay(snapshot, arithmetic)
            if arithmetic == self.fallback != EXACT and not result.error_estimate <= tolerance:
                arithmetic = EXACT
                result = self._replay(snapshot, arithmetic)
        if arithmetic != EXACT and not result.error_estimate <= tolerance:
            change = 1 / result.amplification.nanmedian().item()
            raise ReplayError(
                f"{where}: {arithmetic.name} cannot resolve the output changes (they are about "
                f"{change:.1g} of the outputs; estimated relative error {result.error_estimate:.2g} > "
                f"tolerance {tolerance:g}); replay with --precision float64 (under another --name: a store "
                "holds one configuration)"
            )
        if not result.error_estimate <= tolerance:
            warnings.warn(
                f"{where}: estimated relative error {result.error_estimate:.2g} exceeds {tolerance:g} even in "
                "float64 (the updates barely change the outputs)",
                ReplayWarning,
                stacklevel=2,
            )
        result.arithmetic = arithmetic.name
        return result

    def _replay(
        self, snapshot: Snapshot, arithmetic: Arithmetic, fallback: Arithmetic | None = None
    ) -> SnapshotResult:
        """Every row of ``snapshot`` in ``arithmetic``, with its error estimate (module docstring);
        in ``fallback`` instead where :meth:`_evaluate` predicts that ``arithmetic`` would miss
        :data:`AUTO_TARGET` (``result.arithmetic``: the one that computed it)."""
        result, kept = self._evaluate(snapshot, arithmetic, fallback)
        arithmetic = ARITHMETIC[result.arithmetic]
        rounding = torch.finfo(torch.float64).eps * result.amplification.nanmedian().item()
        if arithmetic == EXACT:
            result.error_estimate = rounding
            return result
        if kept.base is not None:  # the check covers every probe: share the pass's base values
            columns = torch.arange(len(self.inputs))
        else:
            columns = torch.linspace(0, len(self.inputs) - 1, CHECK_COLUMNS).round().long()
            columns = torch.cat([kept.rows, columns]).unique()  # sorted
        # by propagation the reference has no cancellation: float32 checks a float32 difference
        # well, float64 checks the propagation itself; without it, a float64 difference
        dtype = torch.float64 if arithmetic.propagate or self.propagator is None else torch.float32
        reference = self._reference(snapshot, kept, columns, dtype)
        approx = {k: v[kept.rows][:, columns] for k, v in result.measures.items()}
        own = rounding if self.propagator is None else PROPAGATION_ERROR[dtype]
        result.error_estimate = max(_relative_error(approx, reference), own)
        return result

    def _cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """A fresh copy of ``t`` on the replay device, floating point values in ``dtype``.

        Always a copy: tensors read from a file may sit at any address, and CPU kernels round
        differently with the alignment of their data, which would make replays irreproducible.
        """
        return t.to(self.device, dtype if t.is_floating_point() else t.dtype, copy=True)

    def _state(self, snapshot: Snapshot, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The snapshot's parameters and the model's buffers (overridden by the snapshot's) in ``dtype``."""
        params = {k: self._cast(snapshot.params[k], dtype) for k, _ in self.model.named_parameters()}
        own = dict(self.model.named_buffers())
        extra = sorted(set(snapshot.buffers) - set(own))
        if extra:
            raise RunDirError(f"snapshot step {snapshot.step}: buffers {extra[:3]} are not in the model")
        return params, {k: self._cast(snapshot.buffers.get(k, v), dtype) for k, v in own.items()}

    def _rows(
        self, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], updates: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """``fn`` of each row of ``updates`` (name -> ``[B, *shape]``), its outputs (name -> ``[...]``)
        stacked (name -> ``[B, ...]``), by the strategy: one vmapped call or a loop of calls."""
        with warnings.catch_warnings():  # torch's forward-mode AD loads jit-scripted decompositions
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            if self.strategy == "vmap":
                return vmap(fn)(updates)
            rows = [
                fn({k: u[b] for k, u in updates.items()}) for b in range(len(next(iter(updates.values()))))
            ]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _difference(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, base: Tensor | None = None
    ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """The function of one update ``u`` (name -> ``[*shape]``) that gives what the measures need
        of ``"finite"``, ``f(x; w + u) - f(x; w)``, and ``"linear"``, ``J . u`` (``[P, C]`` each), as
        a difference of two forward passes and ``torch.func.jvp``, in the dtype of ``params``,
        ``buffers``, ``x`` ``[P, ...]`` and ``base`` (``f(x; w)`` ``[P, C]``; None: evaluated here)."""
        finite, linear = self._needs()

        def forward(p: dict[str, Tensor]) -> Tensor:  # f(x; p) [P, C]
            return functional_call(self.model, (p, buffers), (x,))

        if base is None:
            base = forward(params)

        def outputs(u: dict[str, Tensor]) -> dict[str, Tensor]:
            moved = {k: params[k] + u[k] for k in params}
            out = {"finite": forward(moved) - base} if finite else {}
            return out | ({"linear": jvp(forward, (params,), (u,))[1]} if linear else {})

        return outputs

    def _propagation(
        self, propagated: BaseState, dtype: torch.dtype
    ) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
        """What :meth:`_difference` gives, propagated by :mod:`replay.difference` from its base
        values, working in ``dtype``."""
        finite, linear = self._needs()
        if propagated.dtype != dtype:
            propagated = self.propagator.retype(propagated, dtype)
        return lambda u: self.propagator.change(propagated, u, finite, linear)

    def _check_everything(self, keep: int) -> bool:
        """Whether the check of ``keep`` rows runs on every probe: with few probes its own columns
        and ``CHECK_COLUMNS`` others would be most of them, and then it shares a propagating pass's
        evaluation of the model (needs :mod:`replay.difference`)."""
        return self.propagator is not None and 2 * (keep + CHECK_COLUMNS) >= len(self.inputs)

    def _needs(self) -> tuple[bool, bool]:
        """Whether the measures need the finite change and the Jacobian-vector product."""
        return any(not m.linear for m in self.measures), any(m.linear for m in self.measures)

    def _measures(self, base: Tensor, changed: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
        """name -> ``S`` ``[B, J]`` from base outputs ``[J, C]`` and changes ``[B, J, C]`` (exact dtype);
        ``rows`` ``[B]``: the column of each row's own probe."""
        changes = {False: Changes(base, changed.get("finite")), True: Changes(base, changed.get("linear"))}
        return {
            m.name: ratio(m.numerator(changes[m.linear]), rows, self.config.ratio_eps) for m in self.measures
        }

    def _evaluate(
        self, snapshot: Snapshot, arithmetic: Arithmetic, fallback: Arithmetic | None = None
    ) -> tuple[SnapshotResult, _Kept]:
        """Every row of ``snapshot`` in ``arithmetic``, and the updates of the :func:`check_rows`
        rows with the largest amplification (none in float64). With a ``fallback`` that propagates
        the changes in the same dtypes (``auto``'s ``mixed``), the first block's updates decide:
        where :meth:`_predicted_error` exceeds :data:`AUTO_TARGET`, every row is computed in
        ``fallback`` instead, the gradients and updates already computed kept (the result is the
        one ``fallback`` alone gives)."""
        predict = (
            fallback is not None
            and fallback.propagate
            and not arithmetic.propagate
            and (fallback.exact, fallback.fast) == (arithmetic.exact, arithmetic.fast)
            and self.propagator is not None
            and self._needs()[0]
        )
        exact, fast = arithmetic.exact, arithmetic.fast
        params, buffers = self._state(snapshot, exact)
        x, y = self._cast(self.inputs, exact), self._cast(self.targets, exact)
        keep = 0 if arithmetic == EXACT else check_rows(len(x))
        # One float64 evaluation of every node serves the propagation and, when the check covers
        # every probe, the check too; the base outputs are its last node. (A difference does not
        # evaluate the model in float64: its check evaluates its own few probes.)
        share = keep and arithmetic.propagate and self._check_everything(keep)
        # cross-entropy: network in the fast dtype, loss in float64; squared losses: all exact
        network = fast if self.loss == "cross_entropy" else exact
        update_params = {k: v.to(fast) for k, v in params.items()}
        grad_params = update_params if network == fast else params
        grad_buffers, grad_x = {k: v.to(network) for k, v in buffers.items()}, x.to(network)
        # blocks of equal size (within one row): 16 rows at 11 a block run as 8 + 8, not 11 + 5
        chunks = torch.arange(len(x)).tensor_split(-(-len(x) // self.rows_per_chunk(arithmetic.name)))
        # The base outputs f(x; w) [P, C]: from the float64 evaluation of every node where the
        # changes are propagated; for a difference, where the network runs (one pass serves the
        # difference and the measures): from the per-sample pass when one block holds every probe,
        # else from one forward pass.
        propagated = network_base = None
        if self.propagator is not None and (arithmetic.propagate or share):
            propagated = self.propagator.base(params, buffers, x, fast)
            base = self.propagator.outputs(propagated)
        elif len(chunks) > 1:
            network_base = functional_call(self.model, (grad_params, grad_buffers), (grad_x,))
            base = network_base.to(exact)
        from_grads = propagated is None and network_base is None
        need_finite = self._needs()[0]
        outputs = None
        kept = _Kept(
            rows=torch.zeros(0, dtype=torch.long),
            amplification=torch.zeros(0, dtype=exact),
            updates={k: v.new_zeros((0, *v.shape)) for k, v in update_params.items()},
            base=propagated if share else None,
        )
        norms, amplification, measures = [], [], {m.name: [] for m in self.measures}
        for chunk in chunks:
            grads = per_sample_grads(
                self.model,
                self.loss,
                grad_params,
                grad_buffers,
                grad_x[chunk],
                y[chunk],
                torch.float64,
                self.strategy,
                with_outputs=from_grads,
                scale=self.gradient_scale or 1.0,
            )
            if from_grads:
                grads, network_base = grads
                base = network_base.to(exact)
            grads = {k: g.to(fast) for k, g in grads.items()}
            if self.gradient_scale is not None:  # the gradients of c L are the updates c g
                updates, grads = grads, None
            else:
                try:
                    updates = self.update(update_params, grads, snapshot.optimizer)
                except ReplayError as e:
                    raise ReplayError(f"snapshot step {snapshot.step}: {e}") from None
            norms.append(
                torch.stack([u.flatten(1).norm(dim=1) for u in updates.values()]).to(exact).norm(dim=0)
            )
            if predict and self._predicted_error(base, y, chunk, grads, updates, norms[-1]) > AUTO_TARGET:
                if self.rows_per_chunk(fallback.name) != self.rows_per_chunk(arithmetic.name):
                    return self._evaluate(snapshot, fallback)  # other blocks: start afresh
                arithmetic = fallback
                propagated = self.propagator.base(params, buffers, x, fast)
                base = self.propagator.outputs(propagated)
                kept.base = propagated if self._check_everything(keep) else None  # as ``fallback``'s own
            predict = False
            del grads
            if outputs is None:
                if arithmetic.propagate:
                    outputs = self._propagation(propagated, fast)
                else:
                    fast_base = network_base if network == fast else None
                    fast_buffers = {k: v.to(fast) for k, v in buffers.items()}
                    outputs = self._difference(update_params, fast_buffers, x.to(fast), fast_base)
            # A probe whose update is exactly zero leaves every output exactly where it was: its
            # row of changes is zero, not the rounding noise of two forward passes.
            moved = norms[-1] > 0  # [B]
            changed = {
                k: v.to(exact) * moved[:, None, None] for k, v in self._rows(outputs, updates).items()
            }  # [B, P, C]
            for name, S in self._measures(base, changed, chunk.to(self.device)).items():
                measures[name].append(S)
            if need_finite:
                self_change = changed["finite"][torch.arange(len(chunk)), chunk].abs().amax(-1)
                ratio = base[chunk].abs().amax(-1) / self_change
                amplification.append(torch.where(moved, ratio, math.nan))  # no rounding where unmoved
            else:
                amplification.append(torch.ones(len(chunk), dtype=exact, device=self.device))
            if keep:
                kept = kept.merge(chunk, amplification[-1].cpu(), updates, keep)
        result = SnapshotResult(
            base_outputs=base.cpu(),
            probe_loss=per_sample_loss(self.loss, base, y).cpu(),
            update_norm=torch.cat(norms).cpu(),
            measures={k: torch.cat(v).cpu() for k, v in measures.items()},
            amplification=torch.cat(amplification).cpu(),
            arithmetic=arithmetic.name,
        )
        return result, kept

    def _predicted_error(
        self,
        base: Tensor,
        y: Tensor,
        chunk: Tensor,
        grads: dict[str, Tensor] | None,
        updates: dict[str, Tensor],
        norms: Tensor,
    ) -> float:
        """The error a difference of two forward passes in the fast dtype would have on the rows
        ``chunk``, predicted from their gradients and updates (name -> ``[B, *shape]``; ``grads``
        None: the updates are ``c g`` with ``c`` :attr:`gradient_scale`) and update norms ``[B]``
        before any change is computed: the rounding model ``eps * max_i max|f(x_i)| / max|D[i, i]|``,
        with the own change estimated to first order, ``|D[i, i]| ~ |g_i . U_i| / ||dL_i/df||`` (the
        change of the probe's own loss, ``g_i . U_i = dL_i/df . J_i U_i``, over its output
        gradient; ``||U_i||^2 / c`` for updates ``c g``). On the built-in models it came out at 0.6
        to 1 times the measured amplification, and the checked estimate at 1 to 15 times that
        rounding model, so a prediction above the target is a miss, not a guess (below, the checked
        estimate still decides). It looks at :data:`PREDICT_ROWS` or so rows spread over the block
        (the step's scale, not a row's, decides; a row missed is caught by the check), which costs
        little even for 11 M weights a row."""
        fast = next(iter(updates.values())).dtype
        rows = range(0, len(chunk), max(1, len(chunk) // PREDICT_ROWS))
        if grads is None:
            own = norms[list(rows)] ** 2 / self.gradient_scale
        else:  # torch.dot of each row's own tensors: no copies of the weights (torch.linalg.vecdot
            # over the rows took ten times as long on a CPU)
            own = torch.stack(
                [
                    sum(torch.dot(g[r].flatten(), updates[k][r].flatten()).double() for k, g in grads.items())
                    for r in rows
                ]
            )
        chunk = chunk[list(rows)]
        with torch.enable_grad():
            outputs = base[chunk].detach().requires_grad_()
            (slope,) = torch.autograd.grad(per_sample_loss(self.loss, outputs, y[chunk]).sum(), outputs)
        amplification = base[chunk].abs().amax(-1) * slope.norm(dim=-1) / own.abs()
        amplification = amplification[amplification.isfinite()]  # a row that moves no loss: no estimate
        if not len(amplification):
            return 0.0
        return torch.finfo(fast).eps * amplification.max().item()

    def _reference(
        self, snapshot: Snapshot, kept: _Kept, columns: Tensor, dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """The measures of the kept rows on the probes ``columns`` ``[J]`` from the kept updates, the
        changes propagated in ``dtype`` by :mod:`replay.difference` (for a model it cannot trace: a
        difference), the rest in float64: name -> ``[R, J]``."""
        propagated = kept.base  # every probe, evaluated by the pass itself (or None)
        if propagated is None:
            params, buffers = self._state(snapshot, torch.float64)
            x = self._cast(self.inputs[columns], torch.float64)
            if self.propagator is None:  # a float64 difference
                base = functional_call(self.model, (params, buffers), (x,))  # [J, C]
                outputs = self._difference(params, buffers, x, base)
            else:
                propagated = self.propagator.base(params, buffers, x, dtype)
        if propagated is not None:
            base = self.propagator.outputs(propagated)  # [J, C]
            outputs = self._propagation(propagated, dtype)
        changed = self._rows(outputs, {k: v.to(dtype) for k, v in kept.updates.items()})
        own = torch.searchsorted(columns, kept.rows)  # the column of each row's own probe
        changed = {k: v.to(torch.float64) for k, v in changed.items()}
        return {k: v.cpu() for k, v in self._measures(base, changed, own.to(self.device)).items()}

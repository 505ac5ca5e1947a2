"""Recompute S_rel for one snapshot with ``torch.func``.

For a snapshot with weights ``w`` and ``P`` probes ``(x_i, y_i)`` (``C`` outputs):

1. per-sample gradients ``g_i`` (``vmap(grad(loss of functional_call))``, model in eval mode);
2. virtual updates ``U_i = U(g_i)`` (:mod:`replay.updates`);
3. output changes of every probe ``j`` under every update ``i``: ``D[i, j] = f(x_j; w + U_i) -
   f(x_j; w)`` with ``vmap`` over stacked weight copies, and for ``linear`` the JVP ``J_j . U_i``;
4. the measures ``S[i, j]`` (:mod:`replay.measures`).

Steps 1-4 run over blocks of updated probes ``i`` small enough that their stacked weight copies,
gradients and activations fit the memory budget. Precision is part of the result: in float64
the error estimate is the rounding model ``eps64 * |f| / |D|``; in float32 a few rows are
recomputed in float64 and the replay refuses when they disagree beyond the tolerance.
"""

from __future__ import annotations

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
from recorder.runfiles import RunDirError, RunSpec, Snapshot
from replay.config import ReplayConfig, ReplayError, ReplayWarning
from replay.difference import ChangePropagator, UnsupportedModel
from replay.measures import Changes, ratio, resolve_measures
from replay.plan import (
    ARITHMETIC,
    Arithmetic,
    ModelFacts,
    choose_arithmetic,
    choose_strategy,
    default_memory_budget,
    rows_per_chunk,
)
from replay.updates import update_rule

CHECK_ROWS = 4  # rows recomputed in float64 to estimate the error of the other arithmetics


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


def per_sample_grads(
    model: nn.Module,
    loss: str,
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
) -> dict[str, Tensor]:
    """Gradient of each sample's loss alone: x ``[B, ...]``, y ``[B]`` or ``[B, C]`` -> name ->
    ``[B, *shape]``."""

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        outputs = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return per_sample_loss(loss, outputs, yi.unsqueeze(0))[0]

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)


def _activations_per_sample(model: nn.Module, x: Tensor) -> int:
    """Values output by the leaf modules of ``model`` for one input ``x`` ``[1, ...]``."""
    total = 0

    def count(module: nn.Module, args: object, out: object) -> None:
        nonlocal total
        total += out.numel() if isinstance(out, Tensor) else 0

    handles = [m.register_forward_hook(count) for m in model.modules() if not any(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@contextmanager
def _no_tf32(device: torch.device) -> Iterator[None]:
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
    (measures ``[R, P]``; over the finite reference entries; NaN where ``approx`` is not finite)."""
    errors = []
    for name, ref in reference.items():
        finite = torch.isfinite(ref)
        diff = torch.where(finite, approx[name].to(ref) - ref, 0).norm(dim=1)
        scale = torch.where(finite, ref, 0).norm(dim=1)
        errors.append(torch.where(scale > 0, diff / scale, diff).max().item())
    return max(errors)


class Engine:
    """Computes :class:`SnapshotResult` for the snapshots of one run under one configuration.

    ``inputs`` ``[P, ...]`` and ``targets`` ``[P]`` / ``[P, C]``: the run's probe set. The
    arithmetic, strategy and chunk size are chosen once, here (:mod:`replay.plan`): ``arithmetic``,
    ``strategy`` and :meth:`rows_per_chunk` say which.
    """

    def __init__(self, spec: RunSpec, inputs: Tensor, targets: Tensor, config: ReplayConfig):
        self.config = config
        self.loss = spec.loss
        self.num_outputs = spec.num_outputs
        self.measures = resolve_measures(config.measures, spec.task)
        self.update = update_rule(config.update)
        try:
            self.device = torch.device(config.device)
            torch.empty(0, device=self.device)
        except (RuntimeError, AssertionError) as e:
            raise ReplayError(f"device {config.device!r} is not usable here ({e})") from None
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
            activations=_activations_per_sample(self.model, self._cast(inputs[:1], model_dtype)),
            traceable=self.propagator is not None,
        )
        self.arithmetic = choose_arithmetic(config.precision, self.device.type, self.facts.traceable)
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

        Raises :class:`ReplayError` when an arithmetic other than float64 cannot resolve the
        output changes within the tolerance.
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
        exact = ARITHMETIC["float64"]
        with _no_tf32(self.device):
            result = self._evaluate(snapshot, self.arithmetic, torch.arange(num_probes))
            if self.arithmetic == exact:
                result.error_estimate = (
                    torch.finfo(torch.float64).eps * result.amplification.nanmedian().item()
                )
            else:
                rows = torch.linspace(0, num_probes - 1, min(num_probes, CHECK_ROWS)).round().long().unique()
                reference = self._evaluate(snapshot, exact, rows)
                rounding = torch.finfo(torch.float64).eps * reference.amplification.nanmedian().item()
                discrepancy = _relative_error(
                    {k: v[rows] for k, v in result.measures.items()}, reference.measures
                )
                result.error_estimate = max(discrepancy, rounding)
        tolerance = self.config.tolerance
        if self.arithmetic != exact and not result.error_estimate <= tolerance:
            change = 1 / reference.amplification.nanmedian().item()
            raise ReplayError(
                f"{where}: {self.arithmetic.name} cannot resolve the output changes (they are "
                f"about {change:.1g} of the outputs; estimated relative error {result.error_estimate:.2g} > "
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
        return result

    def _cast(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """A fresh copy of ``t`` on the replay device, floating point values in ``dtype``.

        Always a copy: tensors read from a file may sit at any address, and CPU kernels round
        differently with the alignment of their data, which would make replays irreproducible.
        """
        return t.to(self.device, dtype if t.is_floating_point() else t.dtype, copy=True)

    def _buffers(self, snapshot: Snapshot, dtype: torch.dtype) -> dict[str, Tensor]:
        """The model's buffers, overridden by the snapshot's."""
        own = dict(self.model.named_buffers())
        extra = sorted(set(snapshot.buffers) - set(own))
        if extra:
            raise RunDirError(f"snapshot step {snapshot.step}: buffers {extra[:3]} are not in the model")
        return {k: self._cast(snapshot.buffers.get(k, v), dtype) for k, v in own.items()}

    def _rows(self, fn: Callable[[dict[str, Tensor]], Tensor], updates: dict[str, Tensor]) -> Tensor:
        """``fn`` of each row of ``updates`` (name -> ``[B, *shape]``) -> ``[B, ...]``, by the strategy."""
        if self.strategy == "vmap":
            return vmap(fn)(updates)
        return torch.stack(
            [fn({k: u[b] for k, u in updates.items()}) for b in range(len(next(iter(updates.values()))))]
        )

    def _evaluate(self, snapshot: Snapshot, arithmetic: Arithmetic, rows: Tensor) -> SnapshotResult:
        """Measures of the updated probes ``rows`` ``[R]`` against all probes, in ``arithmetic``."""
        exact, fast = arithmetic.exact, arithmetic.change
        params = {k: self._cast(snapshot.params[k], exact) for k, _ in self.model.named_parameters()}
        buffers = self._buffers(snapshot, exact)
        x, y = self._cast(self.inputs, exact), self._cast(self.targets, exact)
        params_fast = {k: v.to(fast) for k, v in params.items()}
        buffers_fast, x_fast = {k: v.to(fast) for k, v in buffers.items()}, x.to(fast)

        def forward(p: dict[str, Tensor]) -> Tensor:  # f(x; p) [P, C] in the change dtype
            return functional_call(self.model, (p, buffers_fast), (x_fast,))

        def moved(u: dict[str, Tensor]) -> Tensor:  # f(x; w + u) [P, C]
            return forward({k: params_fast[k] + u[k] for k in params_fast})

        def tangent(u: dict[str, Tensor]) -> Tensor:  # J . u [P, C]
            return jvp(forward, (params_fast,), (u,))[1]

        need_finite = any(not m.linear for m in self.measures)
        need_linear = any(m.linear for m in self.measures)
        base = functional_call(self.model, (params, buffers), (x,))  # [P, C] exact
        if need_finite and arithmetic.propagate:
            propagated = self.propagator.base(params, buffers, x)

            def change(u: dict[str, Tensor]) -> Tensor:
                return self.propagator.change(propagated, u)
        elif need_finite:
            base_fast = forward(params_fast)

            def change(u: dict[str, Tensor]) -> Tensor:
                return moved(u) - base_fast

        norms, amplification, measures = [], [], {m.name: [] for m in self.measures}
        for chunk in rows.to(self.device).split(self.rows_per_chunk(arithmetic.name)):
            grads = per_sample_grads(self.model, self.loss, params, buffers, x[chunk], y[chunk])
            try:
                updates = self.update(params, grads, snapshot.optimizer)  # name -> [B, *shape]
            except ReplayError as e:
                raise ReplayError(f"snapshot step {snapshot.step}: {e}") from None
            del grads
            norms.append(sum(u.flatten(1).square().sum(1) for u in updates.values()).sqrt())
            updates = {k: u.to(fast) for k, u in updates.items()}
            finite = self._rows(change, updates).to(exact) if need_finite else None  # [B, P, C]
            with warnings.catch_warnings():  # torch's forward-mode AD loads jit-scripted decompositions
                warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
                linear = self._rows(tangent, updates).to(exact) if need_linear else None  # [B, P, C]
            changes = {False: Changes(base, finite), True: Changes(base, linear)}
            for m in self.measures:
                numerator = m.numerator(changes[m.linear])  # [B, P]
                measures[m.name].append(ratio(numerator, chunk, self.config.ratio_eps))
            if finite is not None:
                self_change = finite[torch.arange(len(chunk), device=self.device), chunk].abs().amax(-1)
                amplification.append(base[chunk].abs().amax(-1) / self_change)
            else:
                amplification.append(torch.ones(len(chunk), dtype=exact, device=self.device))
        return SnapshotResult(
            base_outputs=base.cpu(),
            probe_loss=per_sample_loss(self.loss, base, y).cpu(),
            update_norm=torch.cat(norms).cpu(),
            measures={k: torch.cat(v).cpu() for k, v in measures.items()},
            amplification=torch.cat(amplification).cpu(),
        )

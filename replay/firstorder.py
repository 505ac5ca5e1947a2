"""First-order quantities of a snapshot from per-layer Gram products: the empirical neural
tangent kernel and the first-order output changes ``J_j . U_i``, split by module.

``P`` probes, ``C`` outputs, ``M`` modules (the owners of the trainable parameters, by name:
``layers.0.weight`` belongs to ``layers.0``; a parameter of the model itself to ``""``). For
probes ``i``, ``j``, outputs ``c``, ``c'`` and module ``m`` with parameters ``w_m``:
``Theta_m[i, j, c, c'] = <df_c(x_i)/dw_m, df_c'(x_j)/dw_m>``.

- ``ntk[i, j] = sum_m sum_c Theta_m[i, j, c, c]`` ``[P, P]``;
- ``part_m[i, j, c] = <df_c(x_j)/dw_m, U_i[m]>`` ``[M, B, P, C]``, whose sum over ``m`` is the
  Jacobian-vector product ``J_j . U_i``. Where the update is the gradient of a scaled loss,
  ``U_i = s g_i`` with ``g_i = sum_c' l[i, c'] df_c'(x_i)/dw`` (``l[i] = dL_i/df(x_i)`` ``[C]``),
  ``part_m[i, j, c] = sum_c' Theta_m[j, i, c, c'] s l[i, c']``: no per-sample gradient is formed.

How a module's terms are computed, its *form*:

- ``gram``: an ``nn.Linear`` (inputs ``[N, *, d_in]``, positions ``t`` over the middle axes) or an
  ``nn.Conv2d`` (one group, zero padding; inputs unfolded by ``F.unfold``), whose output at
  position ``t`` is ``y_t = W a_t + b``. With ``delta[i, c, t] = df_c(x_i)/dy_t`` ``[d_out]``,
  ``df_c(x_i)/dW = sum_t delta[i, c, t] a[i, t]^T``, so
  ``<df_c(x_i)/dW, df_c'(x_j)/dW> = sum_{t, u} (a[i, t] . a[j, u]) (delta[i, c, t] . delta[j, c', u])``
  (the bias: an activation 1 appended to ``a``): a product of two small Gram matrices, about
  ``T^2 (d_in + C d_out)`` operations a pair. An update ``U`` that is not a gradient contracts as
  ``<df_c(x_j)/dW, U> = sum_t delta[j, c, t] . (U a[j, t])``.
- ``jacobian``: the per-sample Jacobian ``df_c(x_i)/dw_m`` ``[P, C, n_m]`` materialised: from the
  same factors for a layer where that is cheaper (``T^2 (d_in + C d_out) > C d_in d_out``, as for a
  convolution over many positions); for every other parameter (normalization layers, embeddings,
  attention projections applied functionally, recurrent cells) by ``torch.func.jacrev`` per probe,
  batched by the replay's strategy (:mod:`replay.batching`).

The factors ``a`` and ``delta`` are caught by forward hooks in one float64 forward pass per block of
probes and ``C`` backward passes, one per output (the model in eval mode: every probe's outputs
depend on its own inputs only). A layer is taken in the gram form only while a check holds on
every block: the gradient its factors give for a random combination of the outputs equals
autograd's gradient of its parameters; a weight shared with another layer, used outside its
module's ``forward`` or batched along another axis fails it, and its module is materialised by
``torch.func`` instead. Everything is float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jacrev

from recorder.losses import per_sample_loss
from recorder.models import forward
from recorder.rundir.errors import ReplayError
from recorder.rundir.probes import Inputs, map_inputs, num_probes, take
from replay.batching import BATCHINGS

FORMS = ("auto", "gram", "jacobian")  # auto: per layer, the cheaper of the two
_CHECK_TOLERANCE = 1e-9  # relative, float64: a layer's factors reproduce autograd's gradient


def module_of(param: str) -> str:
    """The module that owns the parameter named ``param``: ``"layers.0"`` for ``"layers.0.weight"``."""
    return param.rpartition(".")[0]


def modules_of(params: Iterable[str]) -> tuple[str, ...]:
    """The owners of the parameters named ``params`` (:func:`module_of`), in the order of their
    first parameter."""
    return tuple(dict.fromkeys(module_of(k) for k in params))


def output_gradients(loss: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """``l[i] = dL(f(x_i), y_i)/df(x_i)`` ``[P, C]`` of each probe's own loss, outputs ``[P, C]``."""
    outputs = outputs.detach().requires_grad_()
    with torch.enable_grad():
        total = per_sample_loss(loss, outputs, targets).sum()
        (grads,) = torch.autograd.grad(total, outputs)
    return grads


def _gram_layer(module: nn.Module) -> bool:
    """Whether ``module``'s per-sample gradient is an outer product the gram form covers."""
    if isinstance(module, nn.Linear):
        return True
    return (
        isinstance(module, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


@dataclass
class _Layer:
    """A module in the gram form: its weight and (trainable) bias, and per probe the activations
    ``a`` ``[P, T, d]`` (``d = d_in``, plus 1 with a bias) and output gradients ``delta``
    ``[P, C, T, d_out]``, one block of probes at a time while they are caught."""

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    dims: int  # of the weight
    a: list[Tensor] = field(default_factory=list)
    delta: list[Tensor] = field(default_factory=list)
    calls: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (input, output) of one forward

    def activations(self, inputs: Tensor) -> Tensor:
        """``a`` ``[N, T, d]`` of one call on ``inputs``."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            assert not isinstance(m.padding, str), "_gram_layer: numeric padding"
            a = F.unfold(inputs, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        else:
            a = inputs.reshape(len(inputs), -1, inputs.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a

    @staticmethod
    def positions(output: Tensor) -> Tensor:
        """An output (or its gradient) ``[N, T, d_out]`` of one call."""
        if output.dim() == 4:  # a convolution's [N, d_out, H, W]
            return output.flatten(2).transpose(1, 2)
        return output.reshape(len(output), -1, output.shape[-1])

    def flat(self, tensors: dict[str, Tensor]) -> Tensor:
        """The layer's ``[..., d_out, d]`` from its weight (and bias) in ``tensors`` (name ->
        ``[..., *shape]``), in the order of the activations."""
        w = tensors[self.weight]
        lead = w.dim() - self.dims
        w = w.flatten(lead + 1)
        if self.bias is None:
            return w
        return torch.cat([w, tensors[self.bias][..., None]], dim=-1)


@dataclass
class _Module:
    """One module's factors over every probe: ``gram`` ``(a [P, T, d], delta [P, C, T, d_out])``
    or ``jacobian`` ``[P, C, n]`` (its parameters ``params``, flattened in order), ``per_probe``
    values a probe (``row`` more for one updated probe's products against each probe)."""

    name: str
    params: tuple[str, ...]
    layer: _Layer | None = None
    form: str = "jacobian"
    per_probe: int = 0
    row: int = 0
    gram: tuple[Tensor, Tensor] | None = None
    jacobian: Tensor | None = None


class TangentKernel:
    """The factors of one snapshot's tangent kernel over every probe, and its blocks.

    ``params`` (trainable, name -> ``[*shape]``) and ``buffers`` in float64 on one device; ``x``:
    the probes ``[P, ...]`` (or named tensors), floating values in float64. ``strategy``: how the
    ``jacobian`` form maps probes (:data:`~replay.batching.BATCHINGS`); ``form``: one of
    :data:`FORMS` for every gram-capable layer; ``budget``: bytes the factors and one block's
    products may use (a :class:`ReplayError` says what they would need, before any work beyond a
    first probe). Without ``materialise``, only the plan: the forms and :meth:`bytes_for`.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Inputs,
        strategy: str,
        form: str = "auto",
        budget: int | None = None,
        materialise: bool = True,
    ):
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}")
        self.model, self.params, self.buffers, self.x = model, params, buffers, x
        self.strategy, self.form, self.budget = strategy, form, budget
        self.num_probes = num_probes(x)
        self.modules: tuple[str, ...] = modules_of(params)
        self.outputs = torch.empty(0)  # f(x; w) [P, C], from the pass that catches the factors
        layers = self._layers() if form != "jacobian" else {}
        while True:
            failed = self._catch(layers)
            if not failed:
                break
            for name in failed:
                del layers[name]
        self._factors = self._assemble(layers, materialise)

    # -- factors ------------------------------------------------------------------------------

    def _layers(self) -> dict[str, _Layer]:
        """The gram-capable layers whose weight is trainable, by module name."""
        found = {}
        for name, module in self.model.named_modules():
            weight = f"{name}.weight" if name else "weight"
            if _gram_layer(module) and weight in self.params:
                bias = f"{name}.bias" if name else "bias"
                found[name] = _Layer(
                    name, module, weight, bias if bias in self.params else None, self.params[weight].dim()
                )
        # a module owning other trainable parameters than its weight and bias is materialised whole
        return {
            k: v
            for k, v in found.items()
            if {p for p in self.params if module_of(p) == k} == {v.weight} | ({v.bias} if v.bias else set())
        }

    @contextlib.contextmanager
    def _hooks(self, layers: dict[str, _Layer]) -> Iterator[None]:
        """Within: every call of each layer of ``layers`` adds its (input, output) to its ``calls``."""

        def hook(layer: _Layer) -> Any:
            return lambda module, inputs, output: layer.calls.append((inputs[0], output))

        handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for layer in layers.values():
                layer.calls.clear()

    def _catch(self, layers: dict[str, _Layer]) -> list[str]:
        """Catch the factors of ``layers`` over every probe, in blocks; the names of the layers
        whose factors fail the check (module docstring) on some block (their factors are void)."""
        for layer in layers.values():
            layer.a, layer.delta = [], []
        failed: set[str] = set()
        computed: list[Tensor] = []
        size = max(1, min(self.num_probes, 256))
        generator = torch.Generator().manual_seed(0)
        for start in range(0, self.num_probes, size):
            block = take(self.x, slice(start, start + size))
            n = num_probes(block)
            params = {k: v.detach().requires_grad_() for k, v in self.params.items()}
            with torch.enable_grad(), self._hooks(layers):
                outputs = forward(self.model, block, (params, self.buffers))  # [N, C]
                computed.append(outputs.detach())
                usable = {
                    k: v
                    for k, v in layers.items()
                    if v.calls and all(i.shape[0] == n and o.shape[0] == n for i, o in v.calls)
                }
                failed |= set(layers) - set(usable)
                if not usable:
                    continue
                ys = [o for v in usable.values() for _, o in v.calls]
                per_output = [
                    torch.autograd.grad(outputs[:, c].sum(), ys, retain_graph=True, allow_unused=True)
                    for c in range(outputs.shape[1])
                ]
                weights = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
                own = [p for v in usable.values() for p in (v.weight, v.bias) if p]
                combined = (outputs * weights.to(outputs.device)).sum()
                reference = dict(
                    zip(own, torch.autograd.grad(combined, [params[p] for p in own]), strict=True)
                )
                position = 0
                for name, layer in usable.items():
                    a = torch.cat([layer.activations(i.detach()) for i, _ in layer.calls], dim=1)
                    deltas = []
                    for grads in per_output:
                        parts = grads[position : position + len(layer.calls)]
                        deltas.append(
                            torch.cat(
                                [
                                    layer.positions(g if g is not None else torch.zeros_like(o))
                                    for g, (_, o) in zip(parts, layer.calls, strict=True)
                                ],
                                dim=1,
                            )
                        )
                    position += len(layer.calls)
                    delta = torch.stack(deltas, dim=1)  # [N, C, T, d_out]
                    implied = torch.einsum("nc,nctk,ntl->kl", weights.to(a.device), delta, a)
                    expected = layer.flat(reference)
                    scale = expected.abs().max().item()
                    if (implied - expected).abs().max().item() > _CHECK_TOLERANCE * max(scale, 1e-300):
                        failed.add(name)
                    layer.a.append(a)
                    layer.delta.append(delta)
        self.outputs = torch.cat(computed)
        return sorted(failed)

    def _assemble(self, layers: dict[str, _Layer], materialise: bool) -> dict[str, _Module]:
        """Every module's factors (module docstring), each in its form, within the budget (with
        ``materialise``; else their plan only)."""
        grouped: dict[str, list[str]] = {}
        for k in self.params:
            grouped.setdefault(module_of(k), []).append(k)
        factors: dict[str, _Module] = {}
        outputs = self.outputs.shape[1]
        for name, names in grouped.items():
            layer = layers.get(name)
            module = _Module(name, tuple(names), layer=layer)
            module.per_probe = outputs * sum(self.params[p].numel() for p in names)
            module.row = outputs
            if layer is not None:
                positions, d_in = layer.a[0].shape[1:]
                d_out = layer.delta[0].shape[3]
                if self._prefers_gram(positions, d_in, outputs, d_out):
                    module.form = "gram"
                    module.per_probe = positions * (d_in + outputs * d_out)
                    module.row = positions**2 * (1 + 2 * outputs) + outputs
                if materialise:
                    a, delta = torch.cat(layer.a), torch.cat(layer.delta)
                    if module.form == "gram":
                        module.gram = (a, delta)
                    else:  # [P, C, d_out * d]
                        module.jacobian = torch.einsum("nctk,ntl->nckl", delta, a).flatten(2)
                layer.a, layer.delta = [], []
            factors[name] = module
        self._check_budget(factors)
        rest = [m for m in factors.values() if m.gram is None and m.jacobian is None]
        if rest and materialise:
            jac = self._jacobians(tuple(p for m in rest for p in m.params))
            for m in rest:  # each module's Jacobians freed as they are joined
                m.jacobian = torch.cat([jac.pop(p).flatten(2) for p in m.params], dim=2)
        return factors

    def _prefers_gram(self, positions: int, d_in: int, outputs: int, d_out: int) -> bool:
        """Whether the gram form is cheaper than the materialised one for a layer of ``positions``
        positions, ``d_in`` activations (with the bias) and ``d_out`` outputs, ``outputs`` outputs."""
        if self.form != "auto":
            return self.form == "gram"
        return positions**2 * (d_in + outputs * d_out) <= outputs * d_in * d_out

    def _check_budget(self, factors: dict[str, _Module]) -> None:
        """Refuse (:class:`ReplayError`) where the factors and one row's products exceed the budget."""
        if self.budget is None:
            return
        needed = self._needed(factors)
        if needed > self.budget:
            raise ReplayError(
                f"the tangent kernel of {self.num_probes} probes needs {needed / 2**30:.2f} GiB "
                f"(per-layer factors and one row of products), above the memory budget of "
                f"{self.budget / 2**30:.2f} GiB; raise --memory-budget or use fewer probes"
            )

    def _needed(self, factors: dict[str, _Module]) -> int:
        """Bytes at the peak: the factors, one row's products and, while the Jacobians are joined,
        one module's twice."""
        joining = max((m.per_probe for m in factors.values() if m.form == "jacobian"), default=0)
        return self._factor_bytes(factors) + self.row_bytes(factors) + 8 * self.num_probes * joining

    def _factor_bytes(self, factors: dict[str, _Module]) -> int:
        """Bytes of every module's factors over every probe (float64)."""
        return 8 * self.num_probes * sum(m.per_probe for m in factors.values())

    def row_bytes(self, factors: dict[str, _Module] | None = None) -> int:
        """Bytes one updated probe's products take against every probe: the largest module's
        intermediates and every module's part (float64)."""
        factors = self._factors if factors is None else factors
        largest = max(m.row for m in factors.values())
        return 8 * self.num_probes * (largest + 2 * self.outputs.shape[1] * len(factors))

    def bytes_for(self, probes: int) -> int:
        """Bytes the factors and one row's products would take for ``probes`` probes like these
        (both grow with the number of probes)."""
        return self._needed(self._factors) * probes // self.num_probes

    def _jacobians(self, names: tuple[str, ...]) -> dict[str, Tensor]:
        """``df(x_i)/dw`` of the parameters ``names`` per probe: name -> ``[P, C, *shape]``."""
        fixed = {k: v for k, v in self.params.items() if k not in names}

        def outputs(free: dict[str, Tensor], xi: Inputs) -> Tensor:
            one = map_inputs(lambda t: t.unsqueeze(0), xi)
            return forward(self.model, one, ({**fixed, **free}, self.buffers))[0]

        free = {k: self.params[k].detach() for k in names}
        return BATCHINGS[self.strategy].map(jacrev(outputs), (free,), (self.x,))

    # -- products -----------------------------------------------------------------------------

    @property
    def forms(self) -> dict[str, str]:
        """Module name -> the form its terms are computed in."""
        return {k: m.form for k, m in self._factors.items()}

    def ntk(self, rows: Tensor) -> Tensor:
        """``ntk[i, j]`` ``[B, P]`` of the probes ``rows`` ``[B]`` against every probe."""
        total = torch.zeros(len(rows), self.num_probes, dtype=torch.float64, device=rows.device)
        for m in self._factors.values():
            if m.gram is not None:
                a, delta = m.gram
                A = _pair_gram(a[rows], a)  # [B, T, P, T]
                D = delta.transpose(1, 2).flatten(2)  # [P, T, C * d_out]
                total += (A * _pair_gram(D[rows], D)).sum((1, 3))
            else:
                assert m.jacobian is not None
                J = m.jacobian.flatten(1)  # [P, C * n]
                total += J[rows] @ J.T
        return total

    def parts(
        self,
        rows: Tensor,
        output_grads: Tensor | None = None,
        updates: dict[str, Tensor] | None = None,
        by_module: bool = True,
    ) -> Tensor:
        """``part_m[i, j, c]`` ``[M, B, P, C]`` of the probes ``rows`` ``[B]`` (module docstring),
        modules in :attr:`modules` order (without ``by_module``, their sum ``[1, B, P, C]``): for
        updates that are gradients ``U_i = sum_c' o[i, c'] df_c'(x_i)/dw`` from ``output_grads``
        ``o`` ``[B, C]`` (the loss gradients times the step's scale), else from ``updates`` (name ->
        ``[B, *shape]``, every trainable parameter)."""
        if (output_grads is None) == (updates is None):
            raise ValueError("give either output_grads or updates")
        parts: list[Tensor] = []
        for m in self._factors.values():
            part = self._part(m, rows, output_grads, updates)  # [B, P, C]
            if by_module or not parts:
                parts.append(part)
            else:
                parts[0] += part
        return torch.stack(parts)

    @staticmethod
    def _part(
        m: _Module, rows: Tensor, output_grads: Tensor | None, updates: dict[str, Tensor] | None
    ) -> Tensor:
        """Module ``m``'s ``part[i, j, c]`` ``[B, P, C]`` (arguments as :meth:`parts`)."""
        if m.gram is not None:
            a, delta = m.gram  # [P, T, d], [P, C, T, d_out]
            P, C, T, d_out = delta.shape
            if output_grads is not None:
                e = torch.einsum("ic,ictk->itk", output_grads, delta[rows])  # [B, T, d_out]
                H = _pair_gram(e, delta.reshape(P * C, T, d_out)).unflatten(2, (P, C))  # [B, T, P, C, T]
                return (_pair_gram(a[rows], a)[:, :, :, None] * H).sum((1, 4))
            assert updates is not None and m.layer is not None
            U = m.layer.flat(updates)  # [B, d_out, d]
            Ua = torch.einsum("ikl,jul->ijuk", U, a).flatten(2)  # [B, P, T * d_out]
            return torch.einsum("ijn,jcn->ijc", Ua, delta.flatten(2))
        J = m.jacobian
        assert J is not None
        if output_grads is not None:
            g = torch.einsum("ic,icn->in", output_grads, J[rows])
        else:
            assert updates is not None
            g = (
                m.layer.flat(updates).flatten(1)  # materialised from the factors: their order
                if m.layer is not None
                else torch.cat([updates[p].flatten(1) for p in m.params], dim=1)
            )
        return (g @ J.flatten(0, 1).T).unflatten(1, J.shape[:2])

    def rows_per_block(self) -> int:
        """How many updated probes one call of :meth:`ntk` or :meth:`parts` may take within the
        budget (left after the factors)."""
        if self.budget is None:
            return self.num_probes
        left = self.budget - self._factor_bytes(self._factors)
        return max(1, min(self.num_probes, left // max(1, self.row_bytes())))


def _pair_gram(x: Tensor, y: Tensor) -> Tensor:
    """``G[i, t, j, u] = x[i, t] . y[j, u]`` ``[B, T, P, U]`` of ``x`` ``[B, T, d]`` and ``y`` ``[P, U, d]``:
    one matrix product."""
    return (x.flatten(0, 1) @ y.flatten(0, 1).T).view(x.shape[0], x.shape[1], y.shape[0], y.shape[1])


def module_shares(parts: Tensor, rows: Tensor, eps: float) -> Tensor:
    """``share_m[i, j] = <part_m[i, j], L[i, j]> / ||L[i, j]|| / (||L[i, i]|| + eps)`` ``[M, B, P]``
    from ``parts`` ``[M, B, P, C]`` of the probes ``rows`` ``[B]``, ``L = sum_m part_m`` (0 where
    ``L[i, j] = 0``): the shares sum over modules to ``S_linear[i, j] = ||L[i, j]|| / (||L[i, i]||
    + eps)``."""
    whole = parts.sum(0)  # [B, P, C]
    size = whole.norm(dim=-1)  # [B, P]
    own = size.gather(1, rows[:, None])  # [B, 1]
    projected = (parts * whole).sum(-1) / torch.where(size > 0, size, math.inf)
    return projected / (own + eps)

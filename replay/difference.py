"""Output changes without subtracting outputs: a float32 forward pass that carries the change itself.

The plain way to get ``D = f(x; w + U) - f(x; w)`` subtracts two forward passes, and its
rounding error is that of the outputs, ``eps * |f|``: relative to ``D`` that is ``eps * |f| / |D|``,
which in float32 is 1e-3 for an ``adam-fresh`` step and worse than 100% for ``sgd`` at lr 1e-4
(SPEC §3). :class:`ChangePropagator` instead propagates, for every node of the model's
``torch.fx`` graph, the base value ``v`` (at ``w``, for all ``P`` probes) beside its change ``d``,
by rules that never form a difference of two nearly equal numbers:

- a layer that is linear in its input and in its weights (``Linear``, ``Conv1d/2d/3d``):
  ``(W + U)(v + d) - W v = (W + U) d + U v`` (bias: ``+ u_b``);
- a layer or function linear in its input alone (``Identity``, ``Flatten``, average pooling, views,
  sums): the layer applied to ``d``;
- ``relu``: ``d`` where ``v`` and ``v + d`` are both positive, else ``relu(v + d) - relu(v)``
  (that difference is exact or as small as ``d``);
- anything else (max pooling, other activations, layers of unknown type): the difference of the node
  evaluated in float64 at ``v + d`` (and ``w + U``) and at ``v`` (and ``w``), rounded to float32.
  ``v + d`` of two float32 numbers is exact in float64, so this costs float64 arithmetic on that node
  only and carries float64 rounding ``eps64 * |v| / |d|``.

So ``D`` comes out with a float32 *relative* error (about 1e-6 on the built-in models) whatever the
size of the step, at about twice the arithmetic of a plain float32 forward pass (two products per
linear layer). Models that ``torch.fx.symbolic_trace`` cannot trace raise
:class:`UnsupportedModel` at construction.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call

# Modules whose output is a linear function of their input alone (no parameters).
_LINEAR_MODULES = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_WEIGHTED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Functions and tensor methods linear in their (first) tensor argument, other arguments fixed.
_LINEAR_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    F.avg_pool2d,
}
_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_SHAPE_METHODS = {"size", "dim"}  # results that do not depend on the values
_SUMS = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
_RELUS = {torch.relu, F.relu}


class UnsupportedModel(Exception):
    """The model cannot be traced by ``torch.fx``: use the plain difference in float64."""


@dataclass
class BaseState:
    """One snapshot as :meth:`ChangePropagator.change` needs it.

    ``values``: node name -> the node's value at ``w`` for the ``P`` probes (float64), and under
    ``name + "/32"`` its float32 copy; ``state``: the weights and buffers (float64, qualified
    names); ``weights32``: the weights of the linear and convolution layers in float32.
    """

    values: dict[str, Any]
    state: dict[str, Tensor]
    weights32: dict[str, Tensor]


class ChangePropagator:
    """The change ``D = f(x; w + U) - f(x; w)`` of a traced model, one update ``U`` at a time.

    :meth:`base` evaluates every node at ``w`` once per snapshot; :meth:`change` then maps one
    update (name -> ``[*shape]`` float32) to ``D`` ``[P, C]`` float32; it works under ``vmap`` over
    a leading axis of the update.
    """

    def __init__(self, model: nn.Module):
        model = copy.deepcopy(model)
        for m in model.modules():  # in-place activations would overwrite the recorded base values
            if getattr(m, "inplace", False):
                m.inplace = False
        try:
            self.graph_module = fx.symbolic_trace(model)
        except Exception as e:  # fx raises many kinds of errors on code it cannot trace
            raise UnsupportedModel(f"torch.fx cannot trace {type(model).__name__}: {e}") from None
        self.nodes = list(self.graph_module.graph.nodes)
        self.modules = dict(self.graph_module.named_modules())

    def base(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> BaseState:
        """Every node's value at ``params`` and ``buffers`` (float64) for inputs ``x`` ``[P, ...]``."""
        state = params | buffers
        values: dict[str, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                values[node.name] = x
            elif node.op != "output":
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n.name])
                values[node.name] = self._call(node, args, kwargs, state)
        values |= {f"{k}/32": v.float() for k, v in list(values.items()) if isinstance(v, Tensor)}
        weighted = [
            f"{n.target}.weight"
            for n in self.nodes
            if n.op == "call_module" and isinstance(self.modules[n.target], _WEIGHTED_MODULES)
        ]
        return BaseState(values, state, {k: state[k].float() for k in weighted if k in state})

    def change(self, base: BaseState, update: dict[str, Tensor]) -> Tensor:
        """``D`` ``[P, C]`` float32 for one ``update`` (name -> ``[*shape]`` float32)."""
        changes: dict[str, Tensor | None] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                changes[node.name] = None
            elif node.op == "get_attr":
                changes[node.name] = update.get(node.target)
            elif node.op == "output":
                return changes[node.args[0].name]
            else:
                changes[node.name] = self._change(node, base, changes, update)
        raise UnsupportedModel("the traced graph has no output")

    # ------------------------------------------------------------------------- node rules

    def _call(self, node: fx.Node, args: tuple, kwargs: dict, state: dict[str, Tensor]) -> Any:
        """Evaluate ``node`` on ``args`` with the weights and buffers ``state`` (qualified names)."""
        if node.op == "call_module":
            own = _own(state, node.target)
            return functional_call(self.modules[node.target], own, args, kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            return (
                state[node.target] if node.target in state else self.graph_module.get_parameter(node.target)
            )
        raise UnsupportedModel(f"node {node.name}: unknown op {node.op}")

    def _change(
        self, node: fx.Node, base: BaseState, changes: dict[str, Tensor | None], update: dict[str, Tensor]
    ) -> Tensor | None:
        """The change of ``node`` from the changes of its inputs (None: unchanged)."""
        module = self.modules[node.target] if node.op == "call_module" else None
        own_update = _own(update, node.target) if module is not None else {}
        if all(changes[n.name] is None for n in node.all_input_nodes) and not own_update:
            return None
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return None
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        single = first is not None and len(node.all_input_nodes) == 1
        v, d = (base.values[f"{first.name}/32"], changes[first.name]) if single else (None, None)
        if single and isinstance(module, _WEIGHTED_MODULES) and len(node.args) == 1 and not node.kwargs:
            return _weighted(module, v, d, own_update, base.weights32[f"{node.target}.weight"])
        if d is not None:
            if isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in _RELUS):
                return _relu(v, d)
            if (
                isinstance(module, _LINEAR_MODULES)
                or (node.op == "call_function" and node.target in _LINEAR_FUNCTIONS)
                or (node.op == "call_method" and node.target in _LINEAR_METHODS)
            ):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: d)
                return self._call(node, args, kwargs, {})
        if node.op == "call_function" and node.target in _SUMS and not node.kwargs:
            return _sum(node, base, changes)
        return self._float64_difference(node, base, changes, update)

    def _float64_difference(
        self, node: fx.Node, base: BaseState, changes: dict[str, Tensor | None], update: dict[str, Tensor]
    ) -> Tensor:
        """``node(v + d; w + U) - node(v; w)`` in float64, rounded to float32."""

        def moved(n: fx.Node) -> Any:
            d = changes[n.name]
            return base.values[n.name] if d is None else base.values[n.name] + d.double()

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), moved)
        state = base.state
        if node.op == "call_module":
            prefix = f"{node.target}."
            state = {
                k: v + update[k].double() if k in update else v
                for k, v in state.items()
                if k.startswith(prefix)
            }
        new = self._call(node, args, kwargs, state)
        return (new - base.values[node.name]).float()


def _own(tensors: dict[str, Tensor], module_name: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` that belong to module ``module_name``, the prefix removed."""
    prefix = f"{module_name}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _weighted(
    module: nn.Module, v: Tensor, d: Tensor | None, own_update: dict[str, Tensor], weight: Tensor
) -> Tensor:
    """``(W + U) d + U v + u_b`` for a linear or convolution layer (float32 ``weight`` ``W``; ``d``
    None: the input does not change)."""
    u_weight = own_update.get("weight", torch.zeros_like(weight))
    call = F.linear if isinstance(module, nn.Linear) else module._conv_forward
    out = call(v, u_weight, own_update.get("bias"))
    return out if d is None else out + call(d, weight + u_weight, None)


def _relu(v: Tensor, d: Tensor) -> Tensor:
    """``relu(v + d) - relu(v)``: ``d`` itself where both sides are positive (no rounding at all)."""
    moved = v + d
    return torch.where((v > 0) & (moved > 0), d, torch.relu(moved) - torch.relu(v))


def _sum(node: fx.Node, base: BaseState, changes: dict[str, Tensor | None]) -> Tensor:
    """The change of ``a + b`` / ``a - b``: the sum of the changes, broadcast like the result."""
    sign = _SUMS[node.target]
    a, b = (changes[x.name] if isinstance(x, fx.Node) else None for x in node.args[:2])
    if b is not None and sign < 0:
        b = -b
    total = b if a is None else a if b is None else a + b
    return total.expand_as(base.values[f"{node.name}/32"])

"""Output changes without subtracting outputs: a float32 forward pass that carries the change itself.

The plain way to get ``D = f(x; w + U) - f(x; w)`` subtracts two forward passes, and its
rounding error is that of the outputs, ``eps * |f|``: relative to ``D`` that is ``eps * |f| / |D|``,
which in float32 is 1e-3 for an ``adam-fresh`` step and worse than 100% for ``sgd`` at lr 1e-4
(SPEC §3). :class:`ChangePropagator` instead propagates, for every node of the model's
``torch.fx`` graph, the base value ``v`` (at ``w``, for all ``P`` probes) beside its change ``d``,
by rules that never form a difference of two nearly equal numbers:

- a layer that is linear in its input and in its weights (``Linear``, ``Conv1d/2d/3d``):
  ``(W + U)(v + d) - W v = W d + U (v + d)`` (bias: ``+ u_b``);
- a layer or function linear in its input alone (``Identity``, ``Flatten``, average pooling, views,
  sums): the layer applied to ``d``;
- ``relu``: ``max(d + min(v, 0), -relu(v))``, which is ``max(d, -v)`` (exact) where ``v > 0`` and
  ``relu(v + d)`` (rounded below ``eps * |d|``) elsewhere;
- anything else (max pooling, other activations, layers of unknown type): the difference of the node
  evaluated in float64 at ``v + d`` (and ``w + U``) and at ``v`` (and ``w``), rounded to float32.
  ``v + d`` of two float32 numbers is exact in float64, so this costs float64 arithmetic on that node
  only and carries float64 rounding ``eps64 * |v| / |d|``.

So ``D`` comes out with a float32 *relative* error (about 1e-7 on the built-in models) whatever the
size of the step, at about twice the arithmetic of a plain float32 forward pass (two products per
linear layer). The same pass gives the Jacobian-vector product ``J . U`` of the ``linear`` measure
(tangent rules: ``W t + U v`` for the layers above, ``t * (v > 0)`` for relu, ``torch.func.jvp``
in float32 for the rest), sharing the products ``U v`` with ``D``. Models that
``torch.fx.symbolic_trace`` cannot trace raise :class:`UnsupportedModel` at construction.

Buffers are traced as the model's state (the snapshot's values, in the working dtype), not as
constants of the trace; weights that several modules share (tied weights) move together; a node
whose value is not floating point (shapes, dtypes, masks of token ids) has no change; a node that
returns a tuple (attention, recurrent layers) carries a tuple of changes, which indexing picks.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, jvp
from torch.utils import _pytree as pytree

from recorder.rundir.errors import UnsupportedModel
from recorder.rundir.probes import Inputs
from replay.state import retype as retype_floating

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
    operator.getitem,  # an index or a slice: fx nodes among its arguments make it a second input
}
_LINEAR_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"}
_SUMS: dict[fx.node.Target, int] = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
_RELUS = {torch.relu, F.relu}


@dataclass
class BaseState:
    """One snapshot as :meth:`ChangePropagator.change` needs it.

    ``values``: node name -> the node's value at ``w`` for the ``P`` probes (float64), and under
    ``name + "/work"`` its copy in the working dtype ``dtype``; ``state``: the weights and buffers
    (float64, qualified names); ``weights``: the weights of the linear and convolution layers in
    the working dtype.
    """

    values: dict[str, Any]
    state: dict[str, Tensor]
    weights: dict[str, Tensor]
    dtype: torch.dtype


class ChangePropagator:
    """The change ``D = f(x; w + U) - f(x; w)`` of a traced model, one update ``U`` at a time.

    :meth:`base` evaluates every node at ``w`` once per snapshot; :meth:`change` then maps one
    update (name -> ``[*shape]``) to ``D`` ``[P, C]`` in the working dtype (float32; in float64 it
    is a reference with float64 relative error); it works under ``vmap`` over a leading axis of
    the update.
    """

    def __init__(self, model: nn.Module):
        model = copy.deepcopy(model)
        for m in model.modules():  # in-place activations would overwrite the recorded base values
            if getattr(m, "inplace", False):
                m.inplace = False  # type: ignore[assignment]  # torch types Module attributes as Tensor | Module
        tracer = fx.Tracer()
        tracer.proxy_buffer_attributes = True  # buffers come from the snapshot, not the trace
        try:
            self.graph_module = fx.GraphModule(model, tracer.trace(model))
        except Exception as e:  # fx raises many kinds of errors on code it cannot trace
            raise UnsupportedModel(f"torch.fx cannot trace {type(model).__name__}: {e}") from None
        self.nodes = list(self.graph_module.graph.nodes)
        self.output = _output_node(self.nodes[-1])
        self.modules = dict(self.graph_module.named_modules())
        self.aliases = _aliases(model)

    def _tied(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` (name -> tensor) with every other name of a shared weight or buffer added."""
        return tensors | {a: tensors[k] for a, k in self.aliases.items() if k in tensors}

    def base(
        self,
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        x: Inputs,
        dtype: torch.dtype = torch.float32,
    ) -> BaseState:
        """Every node's value at ``params`` and ``buffers`` (float64) for inputs ``x`` ``[P, ...]``
        (the model's first argument; named tensors: its arguments of those names, the others at
        their defaults); :meth:`change` then works in ``dtype`` (float32; float64 for a reference)."""
        state = self._tied(params | buffers)
        first = next(n.target for n in self.nodes if n.op == "placeholder")
        arguments = {first: x} if isinstance(x, Tensor) else x
        values: dict[str, Any] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                values[node.name] = _argument(node, arguments)
            elif node.op != "output":
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n.name])
                values[node.name] = self._call(node, args, kwargs, state)
        return self.retype(BaseState(values, state, {}, torch.float64), dtype)

    def retype(self, base: BaseState, dtype: torch.dtype) -> BaseState:
        """``base`` with :meth:`change` working in ``dtype`` (the float64 values are shared, not
        recomputed: one evaluation serves a float32 pass and a float64 reference)."""
        values = {k: v for k, v in base.values.items() if not k.endswith("/work")}
        values |= {
            f"{k}/work": pytree.tree_map_only(Tensor, lambda t: retype_floating(t, dtype), v)
            for k, v in list(values.items())
            if _floating(v)
        }
        weighted = [
            f"{n.target}.weight"
            for n in self.nodes
            if n.op == "call_module" and isinstance(self.modules[n.target], _WEIGHTED_MODULES)
        ]
        state = base.state
        return BaseState(values, state, {k: state[k].to(dtype) for k in weighted if k in state}, dtype)

    def outputs(self, base: BaseState) -> Tensor:
        """The model's outputs at the weights of ``base`` (float64): ``f(x; w)`` ``[P, C]``."""
        out = base.values[self.output.name]
        if not isinstance(out, Tensor):
            raise UnsupportedModel(f"the traced model returns a {type(out).__name__}, not a tensor")
        return out

    def change(
        self, base: BaseState, update: dict[str, Tensor], finite: bool = True, linear: bool = False
    ) -> dict[str, Tensor | None]:
        """For one ``update`` (name -> ``[*shape]`` in the working dtype of ``base``): ``"finite"``,
        the change ``D`` ``[P, C]`` (if ``finite``), and ``"linear"``, the Jacobian-vector product
        ``J . U`` ``[P, C]`` (if ``linear``), in that dtype. The two share the products ``U v`` of
        every layer. None where the outputs do not depend on anything ``update`` moves."""
        update = self._tied(update)
        changes: dict[str, Tensor | None] = {}
        tangents: dict[str, Tensor | None] = {}
        for node in self.nodes:
            if node.op == "placeholder":
                changes[node.name] = tangents[node.name] = None
            elif node.op == "get_attr":
                changes[node.name] = tangents[node.name] = update.get(node.target)
            elif node.op == "output":
                out = self.output.name
                return ({"finite": changes[out]} if finite else {}) | (
                    {"linear": tangents[out]} if linear else {}
                )
            else:
                changes[node.name], tangents[node.name] = self._change(
                    node, base, changes if finite else None, tangents if linear else None, update
                )
        raise UnsupportedModel("the traced graph has no output")

    # ------------------------------------------------------------------------- node rules

    def _call(self, node: fx.Node, args: tuple, kwargs: dict, state: dict[str, Tensor]) -> Any:
        """Evaluate ``node`` on ``args`` with the weights and buffers ``state`` (qualified names)."""
        if node.op == "call_module":
            own = _own(state, _name(node))
            return functional_call(self.modules[_name(node)], own, args, kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]  # fx: a call_function target is a callable
        if node.op == "call_method":
            return getattr(args[0], _name(node))(*args[1:], **kwargs)
        if node.op == "get_attr":  # a weight or buffer, or a constant of the model
            return state[_name(node)] if node.target in state else _attribute(self.graph_module, _name(node))
        raise UnsupportedModel(f"node {node.name}: unknown op {node.op}")

    def _change(
        self,
        node: fx.Node,
        base: BaseState,
        changes: dict[str, Tensor | None] | None,
        tangents: dict[str, Tensor | None] | None,
        update: dict[str, Tensor],
    ) -> tuple[Tensor | None, Tensor | None]:
        """The change and the tangent of ``node`` from those of its inputs (None: zero; ``changes``
        or ``tangents`` None: not wanted)."""
        module = self.modules[node.target] if node.op == "call_module" else None
        own_update = _own(update, _name(node)) if module is not None else {}
        inputs = node.all_input_nodes
        moving = any(
            seen is not None and seen[n.name] is not None for seen in (changes, tangents) for n in inputs
        )
        if not (moving or own_update) or not _floating(base.values[node.name]):
            return None, None
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if first is not None and len(inputs) == 1 and _floating(base.values[first.name]):
            v = base.values[f"{first.name}/work"]
            d = changes[first.name] if changes is not None else None
            t = tangents[first.name] if tangents is not None else None
            if isinstance(module, _WEIGHTED_MODULES) and len(node.args) == 1 and not node.kwargs:
                weight = base.weights[f"{node.target}.weight"]
                return _weighted(
                    module, v, d, t, own_update, weight, changes is not None, tangents is not None
                )
            if isinstance(module, nn.ReLU) or (node.op == "call_function" and node.target in _RELUS):
                return (None if d is None else _relu(v, d)), (None if t is None else t * (v > 0))
            if (
                isinstance(module, _LINEAR_MODULES)
                or (node.op == "call_function" and node.target in _LINEAR_FUNCTIONS)
                or (node.op == "call_method" and node.target in _LINEAR_METHODS)
            ):
                return self._apply(node, d), self._apply(node, t)
        if node.op == "call_function" and node.target in _SUMS and not node.kwargs:
            return (
                None if changes is None else _sum(node, base, changes),
                None if tangents is None else _sum(node, base, tangents),
            )
        return (
            None if changes is None else self._float64_difference(node, base, changes, update),
            None if tangents is None else self._tangent(node, base, tangents, update),
        )

    def _apply(self, node: fx.Node, d: Tensor | None) -> Tensor | None:
        """A node linear in its only tensor input, applied to ``d`` (None: zero)."""
        if d is None:
            return None
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: d)
        return self._call(node, args, kwargs, {})

    def _float64_difference(
        self, node: fx.Node, base: BaseState, changes: dict[str, Tensor | None], update: dict[str, Tensor]
    ) -> Tensor:
        """``node(v + d; w + U) - node(v; w)`` in float64, rounded to the working dtype."""

        def moved(n: fx.Node) -> Any:
            d = changes[n.name]
            return base.values[n.name] if d is None else _tree(torch.add, base.values[n.name], d)

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), moved)
        state = base.state
        if node.op == "call_module":
            state = {
                k: v + update[k].double() if k in update else v
                for k, v in _prefixed(state, _name(node)).items()
            }
        new = self._call(node, args, kwargs, state)
        return _tree(lambda a, b: retype_floating(a - b, base.dtype), new, base.values[node.name])

    def _tangent(
        self, node: fx.Node, base: BaseState, tangents: dict[str, Tensor | None], update: dict[str, Tensor]
    ) -> Tensor:
        """The Jacobian-vector product of ``node`` at ``v`` (and ``w``) along the input tangents and
        ``U``, in the working dtype (``torch.func.jvp``; the inputs that are not floating point and
        the buffers are constants, not primals)."""
        inputs = [n for n in node.all_input_nodes if _floating(base.values[n.name])]
        primals = [base.values[f"{n.name}/work"] for n in inputs]
        directions = [
            tangents[n.name]
            if tangents[n.name] is not None
            else _tree(lambda p, _: torch.zeros_like(p), p, p)
            for n, p in zip(inputs, primals, strict=True)
        ]
        own = (
            {k: retype_floating(v, base.dtype) for k, v in _prefixed(base.state, _name(node)).items()}
            if node.op == "call_module"
            else {}
        )
        moving = {k: v for k, v in own.items() if k in update}
        position = {n.name: k for k, n in enumerate(inputs)}

        def evaluate(values: list[Tensor], moved: dict[str, Tensor]) -> tuple[Tensor, ...]:
            def value(n: fx.Node) -> Any:
                return values[position[n.name]] if n.name in position else base.values[n.name]

            args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
            leaves, spec = pytree.tree_flatten(self._call(node, args, kwargs, own | moved))
            structure[:] = [spec, leaves]
            # jvp takes tensors only, not the Nones of a tuple that a module returns
            return tuple(t for t in leaves if isinstance(t, Tensor))

        structure: list[Any] = []
        tangent = iter(jvp(evaluate, (primals, moving), (directions, {k: update[k] for k in moving}))[1])
        spec, leaves = structure
        return pytree.tree_unflatten([next(tangent) if isinstance(t, Tensor) else t for t in leaves], spec)


def _output_node(node: fx.Node) -> fx.Node:
    """The node of the outputs ``[P, C]`` that the graph's ``output`` ``node`` returns: the value
    returned, or its ``"logits"`` where it returns a dict. Raises :class:`UnsupportedModel`."""
    out = node.args[0] if node.op == "output" else None
    if isinstance(out, dict):
        out = out.get("logits")
    if not isinstance(out, fx.Node):
        raise UnsupportedModel("the traced graph does not return one tensor, or a dict of its 'logits'")
    return out


def _argument(node: fx.Node, arguments: dict[str, Any]) -> Any:
    """The value of the placeholder ``node``: the probe input of its name, else its default."""
    if node.target in arguments:
        return arguments[_name(node)]
    if node.args:
        return node.args[0]
    raise UnsupportedModel(f"the model's argument {node.target!r} is not among the probe inputs")


def _floating(value: Any) -> bool:
    """Whether a node's ``value`` is, or holds, a floating point tensor (else it has no change)."""
    return any(isinstance(t, Tensor) and t.is_floating_point() for t in pytree.tree_leaves(value))


def _tree(fn: Any, a: Any, b: Any) -> Any:
    """``fn(x, y)`` for the tensors ``x``, ``y`` at the same places of ``a`` and ``b``: two tensors,
    or tuples of them, alike (the value of a node and its change)."""
    if not isinstance(a, tuple):
        return fn(a, b)
    return pytree.tree_map(lambda x, y: fn(x, y) if isinstance(x, Tensor) else x, a, b)


def _aliases(model: nn.Module) -> dict[str, str]:
    """Every further name of a weight or buffer that ``model`` holds under several names (tied
    weights) -> the name ``named_parameters`` / ``named_buffers`` give it."""
    aliases: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        first = {id(t): k for k, t in named()}
        aliases |= {k: first[id(t)] for k, t in named(remove_duplicate=False) if first[id(t)] != k}
    return aliases


def _name(node: fx.Node) -> str:
    """The target of a ``call_module``, ``call_method`` or ``get_attr`` node: a qualified name
    (fx types every target as a callable or a name)."""
    if not isinstance(node.target, str):
        raise UnsupportedModel(f"node {node.name}: {node.op} of {node.target!r}, not of a name")
    return node.target


def _attribute(module: nn.Module, name: str) -> Any:
    """``module.a.b`` for ``name`` ``"a.b"``."""
    return functools.reduce(getattr, name.split("."), module)


def _own(tensors: dict[str, Tensor], module_name: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` that belong to module ``module_name``, the prefix removed."""
    prefix = f"{module_name}."
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _prefixed(tensors: dict[str, Tensor], module_name: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` that belong to module ``module_name``, names kept."""
    return {k: v for k, v in tensors.items() if k.startswith(f"{module_name}.")}


def _weighted(
    module: nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d,
    v: Tensor,
    d: Tensor | None,
    t: Tensor | None,
    own_update: dict[str, Tensor],
    weight: Tensor,
    finite: bool,
    linear: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """A linear or convolution layer (``weight`` ``W``, update ``U``, ``u_b``): the change
    ``W d + U (v + d) + u_b`` and the tangent ``W t + U v + u_b`` (``d``, ``t`` None: zero), each if
    wanted. The change needs no copy ``W + U`` of the weights, and under ``vmap`` the products
    ``W d`` of all updates are one product at shared weights; ``v + d`` rounds by ``eps * |v|``,
    which ``U`` turns into the rounding of ``U v`` itself. Both wanted, they share ``U v``: the
    change is then ``(W + U) d + U v + u_b``."""
    u_weight = own_update["weight"] if "weight" in own_update else torch.zeros_like(weight)
    u_bias = own_update.get("bias")
    call = F.linear if isinstance(module, nn.Linear) else module._conv_forward
    change = tangent = None
    if linear:
        shared = call(v, u_weight, u_bias)  # U v + u_b
        if finite:
            change = shared if d is None else call(d, weight + u_weight, None).add_(shared)
        tangent = shared if t is None else call(t, weight, None).add_(shared)
    elif finite:
        if d is None:
            change = call(v, u_weight, u_bias)
        else:
            change = call(d, weight, None).add_(call(v + d, u_weight, u_bias))
    return change, tangent


def _relu(v: Tensor, d: Tensor) -> Tensor:
    """``relu(v + d) - relu(v) = max(d + min(v, 0), -relu(v))``: where ``v > 0`` that is
    ``max(d, -v)``, with no rounding at all; elsewhere ``relu(v + d)``, whose rounding is below
    ``eps * |d|``."""
    return (d + v.clamp_max(0)).clamp_min_(-v.clamp_min(0))


def _sum(node: fx.Node, base: BaseState, changes: dict[str, Tensor | None]) -> Tensor | None:
    """The change of ``a + b`` / ``a - b``: the sum of the changes, broadcast like the result."""
    sign = _SUMS[node.target]
    a, b = (changes[x.name] if isinstance(x, fx.Node) else None for x in node.args[:2])
    if b is not None and sign < 0:
        b = -b
    total = b if a is None else a if b is None else a + b
    return None if total is None else total.expand_as(base.values[f"{node.name}/work"])

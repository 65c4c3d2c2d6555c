"""Effects of fx nodes on their arguments: which arguments a node writes in place, and
which arguments its value may share storage with.

The region analysis treats a graph as pure data flow; an in-place write (``x.mul_(3)``,
``torch.add(a, b, out=x)``, ``x[:, 0] = 0``, ``F.relu(x, inplace=True)``, an
``nn.ReLU(inplace=True)`` call, a write through a view of ``x``) breaks that. This module
answers, per node:

* :func:`mutated_args`: the argument nodes the node may write. Decided from torch's op
  schemas where the target resolves to an ATen operator (a method name, a ``torch.*`` or
  ``torch.nn.functional`` function of the same name, an ``OpOverload``): an argument whose
  alias annotation is a write (``Tensor(a!)``), counted only when the call supplies it
  (``out=`` only when given). ``operator.setitem`` and the in-place operators
  (``+=`` ...) write their first argument; an ``inplace=True`` keyword writes the first;
  a method name ending in ``_`` with no schema is taken as writing its object. A module
  call writes its input when the module has ``inplace=True``; a leaf module that is
  neither a ``torch.nn`` module nor one with a lowering rule, or that has forward hooks,
  may write any argument.
* :func:`aliased_args`: the argument nodes whose storage the node's value may share
  (views, ``getitem``, the result of an in-place op, identity calls). Unknown functions
  and unknown leaf modules are assumed to alias every argument: over-approximating
  aliases only makes more writes count, never fewer.

:class:`Effects` puts them together for one graph: alias classes (union of every node
with the arguments it may alias) and, per class, the positions of the nodes writing it.
A value is **stable** over a span of the graph when no node in the span writes its class.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch import nn

__all__ = ["mutated_args", "aliased_args", "mutates", "Effects"]

_INPLACE_OPERATORS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                      operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul}
_FRESH_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
                    operator.pow, operator.neg, operator.matmul, operator.and_, operator.or_, operator.xor,
                    operator.lt, operator.le, operator.gt, operator.ge, operator.eq, operator.ne, operator.pos,
                    operator.abs, operator.invert}
_TORCH_NAMESPACES = ("torch", "torch.functional", "torch.nn.functional", "torch._C._nn", "torch._C._VariableFunctions",
                     "torch._tensor", "torch._C._TensorBase", "torch._C.TensorBase")


_PACKETS: dict[tuple[str, Any], Any] = {}
_SCHEMAS: dict[int, list[Any]] = {}


def _packet(op: str, target: Any) -> Any:
    """The ATen operator overload packet a node's target resolves to, or ``None`` (cached)."""
    try:
        return _PACKETS[(op, target)]
    except KeyError:
        pass
    except TypeError:  # an unhashable callable
        return _resolve(op, target)
    _PACKETS[(op, target)] = found = _resolve(op, target)
    return found


def _resolve(op: str, target: Any) -> Any:
    if op == "call_method":
        name = str(target)
    elif isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return target
    else:
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", None)
        if name is None or not (mod in _TORCH_NAMESPACES or mod.startswith("torch.nn.functional")
                                or getattr(torch, name, None) is target
                                or getattr(torch.Tensor, name, None) is target):
            return None
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


def _schemas(packet: Any) -> list[Any]:
    if isinstance(packet, torch._ops.OpOverload):
        return [packet._schema]
    if id(packet) in _SCHEMAS:
        return _SCHEMAS[id(packet)]
    out: list[Any] = []
    for o in packet.overloads():
        try:
            out.append(getattr(packet, o)._schema)
        except (AttributeError, RuntimeError):  # pragma: no cover - overloads torch lists but cannot load
            continue
    _SCHEMAS[id(packet)] = out  # packets live as long as torch.ops.aten
    return out


def _arg(node_args: tuple, kwargs: dict, i: int, name: str, kwarg_only: bool) -> Any:
    if name in kwargs:
        return kwargs[name]
    if not kwarg_only and i < len(node_args):
        return node_args[i]
    return None


def _nodes(values: Iterable[Any]) -> list[fx.Node]:
    out: list[fx.Node] = []
    for v in values:
        fx.node.map_arg(v, out.append)
    return list(dict.fromkeys(out))


def _module_of(n: fx.Node, root: nn.Module | None) -> nn.Module | None:
    if root is None:
        return None
    try:
        return root.get_submodule(str(n.target))
    except AttributeError:
        return None


def _known_module(m: nn.Module, has_rule: Callable[[nn.Module], bool]) -> bool:
    """A module whose effects are known: a ``torch.nn`` module (writes its input only with
    ``inplace=True``) or one whose lowering rule describes it (a pure function), without
    hooks of its own (a hook may write anything it is given)."""
    hooks = m._forward_hooks or m._forward_pre_hooks
    return not hooks and (type(m).__module__.startswith("torch.nn") or has_rule(m))


def mutates(op: str, target: Any, args: tuple, kwargs: dict) -> list[Any]:
    """The arguments (values of ``args``/``kwargs``, nodes or proxies) a
    ``call_function``/``call_method`` call writes in place (see the module docstring)."""
    if op not in ("call_function", "call_method"):
        return []
    if op == "call_function" and target in _INPLACE_OPERATORS:
        return list(args[:1])
    out: list[Any] = []
    packet = _packet(op, target)
    if packet is not None:
        for schema in _schemas(packet):
            for i, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    v = _arg(args, kwargs, i, a.name, a.kwarg_only)
                    if v is not None and not any(v is o for o in out):
                        out.append(v)
    elif op == "call_method" and str(target).endswith("_") and not str(target).endswith("__") and args:
        out.append(args[0])
    if kwargs.get("inplace") is True and args and not any(args[0] is o for o in out):
        out.append(args[0])
    if "out" in kwargs and kwargs["out"] is not None and not any(kwargs["out"] is o for o in out):
        out.append(kwargs["out"])
    return out


def mutated_args(n: fx.Node, root: nn.Module | None = None,
                 has_rule: Callable[[nn.Module], bool] = lambda m: False) -> list[fx.Node]:
    """The argument nodes ``n`` may write in place. ``root``: the module the graph's
    ``call_module`` targets resolve in; ``has_rule``: whether a module's lowering rule
    describes it (such a module is a pure function of its input)."""
    if n.op == "call_module":
        m = _module_of(n, root)
        if m is None or not _known_module(m, has_rule):
            return _nodes((n.args, n.kwargs))
        return _nodes(n.args[:1]) if getattr(m, "inplace", False) is True else []
    return _nodes(mutates(n.op, n.target, n.args, n.kwargs))


def aliased_args(n: fx.Node, root: nn.Module | None = None,
                 has_rule: Callable[[nn.Module], bool] = lambda m: False) -> list[fx.Node]:
    """The argument nodes whose storage ``n``'s value may share."""
    if n.op == "call_module":
        m = _module_of(n, root)
        if m is None or not _known_module(m, has_rule):
            return _nodes((n.args, n.kwargs))
        if has_rule(m) and type(m) is not nn.Identity:
            return []
        if type(m).__module__.startswith("torch.nn.modules.activation") and getattr(m, "inplace", False) is not True:
            return []
        return _nodes(n.args[:1])
    if n.op == "call_function" and n.target in _FRESH_OPERATORS:
        return []
    if n.op == "call_function" and (n.target in _INPLACE_OPERATORS or n.target is operator.getitem):
        return _nodes(n.args[:1])
    if n.op not in ("call_function", "call_method"):
        return []
    packet = _packet(n.op, n.target)
    if packet is None:
        return _nodes((n.args, n.kwargs))
    out: list[fx.Node] = []
    for schema in _schemas(packet):
        sets = [r.alias_info.before_set for r in schema.returns if r.alias_info is not None]
        if not sets:
            continue
        for i, a in enumerate(schema.arguments):
            if a.alias_info is not None and any(a.alias_info.before_set & s for s in sets):
                out += _nodes([_arg(n.args, n.kwargs, i, a.name, a.kwarg_only)])
    return list(dict.fromkeys(out))


class Effects:
    """Alias classes and in-place writes of one graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, has_rule: Callable[[nn.Module], bool] = lambda m: False) -> None:
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self._parent: dict[fx.Node, fx.Node] = {}
        writes: list[tuple[fx.Node, fx.Node]] = []
        for n in gm.graph.nodes:
            for a in aliased_args(n, gm, has_rule):
                self._union(n, a)
            for a in mutated_args(n, gm, has_rule):
                writes.append((n, a))
        self.writes: dict[fx.Node, list[fx.Node]] = {}
        """Alias-class representative -> the nodes writing that class, in graph order."""
        for w, a in writes:
            self.writes.setdefault(self._find(a), []).append(w)
        self.writers = {w for w, _ in writes}
        """Every node that writes one of its arguments in place."""

    def _find(self, n: fx.Node) -> fx.Node:
        while self._parent.get(n, n) is not n:
            n = self._parent[n]
        return n

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra is not rb:
            self._parent[ra] = rb

    def written(self, n: fx.Node) -> list[fx.Node]:
        """The nodes that write ``n``'s value or a value sharing its storage."""
        return self.writes.get(self._find(n), [])

    def writer_between(self, values: Iterable[fx.Node], start: int, end: int,
                       exclude: Iterable[fx.Node] = ()) -> fx.Node | None:
        """A node at a graph position in ``[start, end]`` (not in ``exclude``) that writes
        one of ``values`` (or an alias of one), or ``None``."""
        skip = set(exclude)
        for v in values:
            for w in self.written(v):
                if start <= self.order[w] <= end and w not in skip:
                    return w
        return None

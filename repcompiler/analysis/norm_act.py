"""Norm-plus-activation modules: a per-channel norm followed by elementwise ops.

timm's ``BatchNormAct2d``, ``SyncBatchNormAct`` and ``FrozenBatchNormAct2d`` (and any
user module written the same way) own a BatchNorm's tensors and apply, in one
``forward``, the norm and then an activation (and a drop). In eval mode the norm is a
per-channel affine map that folds into the conv before it; the activation does not
and stays after it.

What such a module computes is read from its code, not from its class name:
:func:`match_norm_act` traces the module **alone in eval mode** with the compiler's
tracer (activations stay leaves; a built-in BatchNorm's input-rank check is recorded
as a rank read) and accepts it only when the traced graph is exactly

* reads of the input's number of dimensions and asserts on them (no data use);
* a chain of nodes the rule registry lowers to per-channel leaves
  (:class:`~repcompiler.algebra.BatchNorm`, :class:`~repcompiler.algebra.Affine`,
  identity) - ``F.batch_norm`` with the module's running statistics, or
  ``x * scale + shift`` from its buffers - containing at least one norm, reading only
  the module's **own** parameters and buffers;
* then a chain of elementwise ops (activations, dropouts, identities: the *tail*)
  ending at the output;

and nothing else (no in-place effect, no other use of the input). The match holds
``tail``, a ``GraphModule`` computing the tail alone (it holds the module's own
children, e.g. ``act`` and ``drop``), and ``activation``, a readable name of the tail.

Uses:

* ``fold`` / ``deploy`` trace into such a module (its rule declines it) and fold its
  norm into the conv before it; afterwards the module holds tensors nothing reads:
  :func:`strip_folded_norms` replaces it by its tail, so the folded model has no
  BatchNorm left and the plain parameter count;
* ``orepa_transform`` (:mod:`repcompiler.analysis.pairing`) takes a conv whose only user is such
  a module as a conv with a post-BN (the module is the block's existing post-BN; no
  second BN is inserted), and ``post_bn=False`` replaces it by its tail (the
  activation stays).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Container, Iterable

import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..errors import RuleError
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry

__all__ = ["NormAct", "match_norm_act", "norm_owner", "owned_nodes", "folded_norms", "strip_folded_norms", "leaf_uses",
           "unused_modules"]

log = logging.getLogger(__name__)

_NORM_TENSORS = ("running_mean", "running_var")


@dataclass
class NormAct:
    """A module recognised as ``tail(norm(x))`` (see the module docstring)."""

    module: nn.Module
    tail: fx.GraphModule
    activation: str
    num_features: int

    def tail_of(self, module: nn.Module) -> fx.GraphModule:
        """The tail as a module holding ``module``'s children as they are now (a fold may
        have replaced a folded identity child by another identity)."""
        return fx.GraphModule(module, self.tail.graph, type(self.tail).__name__)


def _owns_norm_tensors(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, "_buffers", {}).get(t), torch.Tensor) for t in _NORM_TENSORS)


def match_norm_act(module: nn.Module, rules: RuleRegistry | None = None) -> NormAct | None:
    """``module`` as a norm followed by elementwise ops, or ``None`` (see the module
    docstring). ``module`` is traced in eval mode (its and its children's training
    flags are put back); nothing is run."""
    if not isinstance(module, nn.Module) or not _owns_norm_tensors(module):
        return None
    if type(module) in _PLAIN_BNS or module._forward_hooks or module._forward_pre_hooks:
        return None  # a plain BN is a leaf with its own rule; hooks change what it computes
    rules = rules if rules is not None else default_rules()
    key = (_state_key(module), id(rules))
    cached = _CACHE.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    _CACHE[module] = (key, None)  # tracing it alone asks the tracer about it: not (yet) a match
    found = _match(module, rules)
    _CACHE[module] = (key, found)
    return found


_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, NormAct | None]]" = weakref.WeakKeyDictionary()


_PLAIN_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _state_key(m: nn.Module) -> tuple:
    # children by type: a fold replacing a folded identity drop by a new identity keeps the match
    return (type(m), tuple((n, type(c)) for n, c in m._modules.items()),
            tuple(sorted(m._parameters)), tuple(sorted(m._buffers)))


def _match(module: nn.Module, rules: RuleRegistry) -> NormAct | None:
    """``module`` traced alone, then read as norm chain -> elementwise tail -> output."""
    gm = _trace_alone(module, rules)
    if gm is None:
        return None
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(places) != 1:
        return None
    x = places[0]
    channels = int(module.running_mean.numel())
    g = _lowered(gm, module, x, channels, rules)
    found = _norm_chain(g, x, module)
    if found is None:
        return None
    chain, cur = found
    found_tail = _elementwise_tail(g, gm, cur)
    if found_tail is None:
        return None
    tail, cur = found_tail
    # nothing else: constants, rank reads and what only they feed
    allowed = set(chain) | set(tail) | {x}
    if any(not (n in allowed or n.op == "output" or g.constant(n) or _under_rank_read(n)) for n in gm.graph.nodes):
        return None
    return NormAct(module, _tail_module(gm, x, cur, tail, type(module).__name__), _describe(gm, tail),
                   channels)


def _trace_alone(module: nn.Module, rules: RuleRegistry) -> fx.GraphModule | None:
    """``module`` traced alone in eval mode (its flags put back), or ``None`` where it
    does not trace."""
    from .isolation import preserved_state
    from ..capture.rule_tracer import RuleTracer

    flags = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        tracer = RuleTracer(rules)
        with preserved_state(module):  # the capture evaluates parameter-only code: nothing may stay
            graph = tracer.trace(module)
    except RuleError:  # a rule that raised while tracing is a bug to report, not "not recognised"
        raise
    except Exception as exc:  # tracing runs the module's own forward (user code): any failure means not recognised
        log.debug("%s does not trace alone: %s", type(module).__name__, exc)
        return None
    finally:
        for m, f in flags:
            m.training = f
    return fx.GraphModule(module, graph, type(module).__name__)


def _lowered(gm: fx.GraphModule, module: nn.Module, x: fx.Node, channels: int, rules: RuleRegistry) -> Any:
    """The lowered graph of ``gm`` with its input ``x`` of ``channels`` channels (dims
    from the class name, 2 by default)."""
    from ..passes.regions.lowering import LoweredGraph

    g = LoweredGraph(gm, rules, frozenset())
    g.classify()
    g.chan[x] = channels
    g.dims[x] = next((int(c.__name__[-2]) for c in type(module).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d")), 2)
    g.infer_shapes()
    return g


def _data_users(n: fx.Node) -> list[fx.Node]:
    """The users of ``n`` other than reads of its dims that only feed asserts."""
    from ..passes.regions.lowering import is_rank_read

    return [u for u in n.users if not (is_rank_read(u) and all(_pure_rank_use(v) for v in u.users))]


def _norm_chain(g: Any, x: fx.Node, module: nn.Module) -> tuple[list[fx.Node], fx.Node] | None:
    """The chain of per-channel norm nodes from ``x`` reading only ``module``'s own
    tensors, and its last node; ``None`` without a norm, or where a node of it reads a
    child's tensors or has another data use."""
    own = {name for name, _ in module.named_parameters(recurse=False)} | \
          {name for name, _ in module.named_buffers(recurse=False)}
    chain: list[fx.Node] = []
    cur, norms = x, 0
    while True:
        users = _data_users(cur)
        if len(users) != 1:
            return None
        u = users[0]
        expr = g.lowered.get(u)
        if g.kind.get(u) != "unary" or expr is None or g.data_in.get(u) != [cur]:
            break
        leaves = list(_leaves(expr))
        if not leaves or not all(isinstance(e, (A.BatchNorm, A.Affine, A.Identity)) for e in leaves):
            break
        if u.op == "call_module":
            break  # a child module (an identity drop goes with the tail): not this module's norm
        if any(a.op == "get_attr" and str(a.target).split(".")[0] not in own
               and not str(a.target).startswith("_tensor_constant") for a in _constants(g, u)):
            return None  # reads a child's tensors
        norms += sum(isinstance(e, (A.BatchNorm, A.Affine)) for e in leaves)
        chain.append(u)
        cur = u
    return (chain, cur) if norms else None


def _elementwise_tail(g: Any, gm: fx.GraphModule, cur: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """The chain of elementwise ops from ``cur`` to the output, and its last node; ``None``
    where something else comes first."""
    from ..passes.regions.lowering import ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, \
        is_identity_call

    tail: list[fx.Node] = []
    while True:
        users = _data_users(cur)
        if len(users) != 1:
            return None
        u = users[0]
        if u.op == "output":
            return tail, cur
        elementwise = (
            (u.op == "call_module" and (isinstance(gm.get_submodule(str(u.target)), ELEMENTWISE_MODULES)
                                        or is_identity_call(gm, u)))
            or (u.op == "call_function" and u.target in ELEMENTWISE_FUNCS)
            or (u.op == "call_method" and u.target in ELEMENTWISE_METHODS)
        )
        if not elementwise or [a for a in u.all_input_nodes if not g.constant(a)] != [cur]:
            return None
        tail.append(u)
        cur = u


def _leaves(expr: A.Expr) -> Iterable[A.Expr]:
    if isinstance(expr, A.Seq):
        for t in expr.terms:
            yield from _leaves(t)
    else:
        yield expr


def _constants(g: "object", n: fx.Node) -> list[fx.Node]:
    """Every ``get_attr`` node the constant operands of ``n`` are computed from."""
    out: list[fx.Node] = []
    stack = [a for a in n.all_input_nodes if g.constant(a)]  # type: ignore[attr-defined]
    seen: set[fx.Node] = set()
    while stack:
        a = stack.pop()
        if a in seen:
            continue
        seen.add(a)
        if a.op == "get_attr":
            out.append(a)
        stack += a.all_input_nodes
    return out


def _pure_rank_use(n: fx.Node) -> bool:
    """A node computed from a rank read that has no effect but an assert."""
    if n.op == "call_function" and n.target in (torch._assert, getattr) or n.op == "call_function" and \
            getattr(n.target, "__module__", "") == "_operator":
        return all(_pure_rank_use(u) for u in n.users)
    return n.op == "call_function" and n.target is torch._assert


def _under_rank_read(n: fx.Node) -> bool:
    """``n`` is a rank read or computed only from rank reads and constants."""
    from ..passes.regions.lowering import is_rank_read

    if is_rank_read(n):
        return True
    ins = n.all_input_nodes
    return bool(ins) and n.op == "call_function" and all(_under_rank_read(a) or a.op == "get_attr" for a in ins)


def _tail_module(gm: fx.GraphModule, x: fx.Node, last: fx.Node, tail: list[fx.Node], name: str) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inp = graph.placeholder(x.name)
    cur = inp
    for n in tail:
        env[n] = graph.node_copy(n, lambda a: cur if a not in env else env[a])
        cur = env[n]
    graph.output(cur)
    return fx.GraphModule(gm, graph, f"{name}Tail")


def _describe(gm: fx.GraphModule, tail: list[fx.Node]) -> str:
    parts = []
    for n in tail:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if type(m) is nn.Identity:
                continue
            parts.append(f"{type(m).__name__} ({n.target})")
        else:
            parts.append(getattr(n.target, "__name__", str(n.target)))
    return ", ".join(parts) or "no activation (identity)"


def norm_owner(n: fx.Node) -> str | None:
    """The path of the module whose ``forward`` created ``n`` (innermost), if any."""
    stack = n.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return paths[-1] if paths else None


def owned_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """For each module path in the traced graph ``gm``, the nodes its own ``forward``
    created that compute data, elementwise ops (an activation) aside: not a child's
    call, a constant, or a read of dims.
    Taken before a fold rewrites the graph, for :func:`folded_norms`."""
    from ..passes.regions.lowering import constant_nodes, is_rank_read

    constant = constant_nodes(gm.graph).__contains__

    def dims_only(n: fx.Node) -> bool:
        return is_rank_read(n) or (n.op == "call_function" and bool(n.all_input_nodes)
                                   and all(dims_only(a) or constant(a) for a in n.all_input_nodes))

    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method") or constant(n) or dims_only(n) or _elementwise_call(n):
            continue
        owner = norm_owner(n)
        if owner:
            out.setdefault(owner, []).append(n)
    return out


def leaf_uses(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """For each module path in the traced graph ``gm`` whose ``forward`` was traced
    into, the data nodes that compute with it: those its ``forward`` created and the
    first data users of its parameters and buffers (through constant computations,
    e.g. ``self.weight + self.id_tensor``). When a fold replaced all of them, nothing
    computes with the module any more (:func:`unused_modules`). Taken before the
    rewrite edits the graph."""
    from ..passes.regions.lowering import constant_nodes, is_rank_read

    constant = constant_nodes(gm.graph).__contains__

    out: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op in ("call_function", "call_method") and not constant(n) and not is_rank_read(n):
            owner = norm_owner(n)
            if owner:
                out.setdefault(owner, []).append(n)
        elif n.op == "get_attr" and "." in str(n.target):
            path = str(n.target).rsplit(".", 1)[0]
            stack, seen = [n], set()
            while stack:
                a = stack.pop()
                for u in a.users:
                    if u in seen:
                        continue
                    seen.add(u)
                    if constant(u):
                        stack.append(u)
                    else:
                        out.setdefault(path, []).append(u)
    return out


def unused_modules(model: nn.Module, uses: dict[str, list[fx.Node]], prefix: str,
                   replaced: Container[fx.Node]) -> list[str]:
    """Paths (with ``prefix``) of conv and BatchNorm modules without children that
    nothing computes with after a fold: every node of ``uses`` (:func:`leaf_uses`)
    was folded (is in ``replaced``). E.g. DBB's identity-based 1x1, a conv subclass
    computing its kernel in ``forward``, traced into and folded into its block's conv."""
    out = []
    for p, nodes in uses.items():
        path = prefix + p
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(m, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) and not m._modules \
                and nodes and all(n in replaced for n in nodes):
            out.append(path)
    return out


def _elementwise_call(n: fx.Node) -> bool:
    from ..passes.regions.lowering import ELEMENTWISE_FUNCS, ELEMENTWISE_METHODS

    return (n.op == "call_function" and n.target in ELEMENTWISE_FUNCS) or (
        n.op == "call_method" and n.target in ELEMENTWISE_METHODS)


def folded_norms(owned: dict[str, list[fx.Node]], prefix: str, replaced: Container[fx.Node]) -> set[str]:
    """Paths (with ``prefix``) of the modules whose own computation (``owned``, see
    :func:`owned_nodes`) is entirely in folded regions (``replaced``)."""
    return {prefix + p for p, nodes in owned.items() if all(n in replaced for n in nodes)}


def strip_folded_norms(model: nn.Module, paths: Iterable[str],
                       rules: RuleRegistry | None = None) -> list[tuple[str, NormAct]]:
    """Replace each norm-plus-activation module at one of ``paths`` (modules whose own
    computation was folded away, :func:`folded_norms`) by its tail: the activation and
    drop (same children), so no BatchNorm and none of its tensors stay. Returns
    ``(path, match)`` for each module replaced; other paths are left alone."""
    out: list[tuple[str, NormAct]] = []
    for path in sorted(set(paths)):
        try:
            m = model.get_submodule(path)
        except AttributeError:
            continue
        match = match_norm_act(m, rules)
        if match is None:
            continue
        *parent, last = path.split(".")
        owner = model.get_submodule(".".join(parent)) if parent else model
        setattr(owner, last, match.tail_of(m))
        out.append((path, match))
    return out

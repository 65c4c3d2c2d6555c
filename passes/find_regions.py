"""Find linear regions in an fx graph and lower them into the kernel algebra.

A **region** is a single-entry single-exit subgraph made only of linear ops: one data
value ``entry`` flows in, one node ``exit`` produces the only value used outside, and
every node in between has a lowering (module rule, function rule, or is a sum /
channel concat of branches). It is found with dominators: for a linear node ``e``, the
entries it could have are its dominators ``idom(e), idom(idom(e)), ...``; the region of
``(d, e)`` is every node on a path from ``d`` to ``e``. It is valid when all those nodes
are linear and none of their values (except ``e``'s) is used outside. Validity is
monotone along the dominator chain, so the walk stops at the first invalid entry. Exits
are visited in reverse topological order, so each region is maximal; when the maximal
region is not exact the largest exact sub-region ending at ``e`` is taken instead (and
the refusal of the larger one is recorded with the algebra's reason).

Boundaries: a module called more than once in the graph, or registered at more than
one path in the model (shared weights), is **opaque**, so a shared conv is never fused
into one of its uses (``torch.fx.experimental.optimization.fuse`` gets that wrong).
``nn.Identity`` has no weights, so a shared one stays linear.

Identity calls are **aliases**: a chain of ``nn.Identity`` calls starting at the entry
computes the entry's value, so it may be used outside the region too (e.g. a skip
branch's identity that another block also reads). Such a chain is left out of the
region's body, listed in ``Region.aliases`` and kept in the graph; the region reads it
as its entry. The rewrite drops identity calls (:class:`passes.cleanup.Cleanup`), so
without this the region would only become valid after folding, and one pass of
``fold`` would not reach a fixpoint.

Channel counts for parameter-free leaves (identity, average pooling, padding) come
from ``ShapeProp`` metadata when the graph was shape-propagated, otherwise they are
inferred from neighbouring convs and BNs (forward and backward through linear ops,
sums, concats and elementwise activations). No input shape is required.

Lowering:

* ``call_module``: the module rule (``lower(module, LowerInfo) -> Expr | None``);
* ``call_function`` / ``call_method`` with one data input: the function rule, see
  :mod:`repcompiler.rules` (``lower(FunctionCall, LowerInfo) -> Expr | None``;
  ``x.add(y)`` is looked up as ``torch.add``);
* ``a + b`` / ``torch.add`` / ``a - b`` of two data values: parallel sum;
  ``torch.cat([...], dim=1)``: channel concat.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import algebra as A
from ..rules import INPUT, FunctionCall, LowerInfo, RuleRegistry, default_rules

from .base import META_REGIONS, GraphPass, PassResult, graph_meta

__all__ = ["Region", "find_regions", "FindRegions", "node_owner", "CONV_FUNCTIONS"]

log = logging.getLogger(__name__)

CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
_SUM_FUNCS = {operator.add: 1.0, torch.add: 1.0, operator.iadd: 1.0, operator.sub: -1.0, torch.sub: -1.0,
              operator.isub: -1.0}
_CAT_FUNCS = (torch.cat, torch.concat)
_METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
_PLAIN_LEAVES = (A.Affine, A.BatchNorm, A.Identity, A.AvgPool, A.ZeroPad)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.PReLU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus,
)
_ELEMENTWISE_FUNCS = {
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
    torch.tanh, F.leaky_relu, F.elu, F.dropout, F.mish, F.hardtanh,
}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_"}


@dataclass
class Region:
    """A single-entry single-exit linear subgraph and its algebra expression."""

    entry: fx.Node
    exit: fx.Node
    nodes: list[fx.Node]
    expr: A.Expr | None
    reasons: tuple[str, ...]
    kind: str
    dims: int
    in_channels: int
    has_conv: bool
    name: str = ""
    worth: bool = True
    notes: list[str] = field(default_factory=list)
    aliases: list[fx.Node] = field(default_factory=list)
    """Identity calls of the entry's value that the region reads but that are used
    outside it too: not part of the region, they stay in the graph (see the module
    docstring)."""

    @property
    def entry_values(self) -> list[fx.Node]:
        """The nodes whose value is the region's input: the entry and its aliases."""
        return [self.entry, *self.aliases]

    @property
    def exact(self) -> bool:
        return self.expr is not None and not self.reasons

    @property
    def foldable(self) -> bool:
        """Exact, and folding it removes work (it holds a conv and is not one already)."""
        return self.exact and self.has_conv and self.worth

    @property
    def all_modules(self) -> bool:
        return all(n.op == "call_module" for n in self.nodes)

    def module_targets(self) -> list[str]:
        return [str(n.target) for n in self.nodes if n.op == "call_module"]

    def __repr__(self) -> str:
        state = "exact" if self.exact else "inexact"
        return f"Region({self.name!r}, {self.kind}, {len(self.nodes)} ops, {state})"


def node_owner(node: fx.Node) -> list[str]:
    """The chain of module paths whose forward created ``node`` (outermost first,
    the node's own module excluded for ``call_module`` nodes)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths = paths[:-1]
    return paths


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class _Graph:
    """Per-graph analysis state."""

    def __init__(self, gm: fx.GraphModule, rules: RuleRegistry, shared: frozenset[int]) -> None:
        self.gm = gm
        self.rules = rules
        self.nodes = [n for n in gm.graph.nodes]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.const: dict[fx.Node, Any] = {}
        self.is_const: dict[fx.Node, bool] = {}
        self.kind: dict[fx.Node, str] = {}
        self.data_in: dict[fx.Node, list[fx.Node]] = {}
        self.chan: dict[fx.Node, int] = {}
        self.dims: dict[fx.Node, int] = {}
        self.lowered: dict[fx.Node, A.Expr] = {}
        self.sign: dict[fx.Node, float] = {}
        self.identity_in: dict[fx.Node, fx.Node] = {}
        calls: dict[str, int] = {}
        for n in self.nodes:
            if n.op == "call_module":
                calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        self.calls = calls
        self.shared = shared

    # -- constants ---------------------------------------------------------------
    def constant(self, n: fx.Node) -> bool:
        if n in self.is_const:
            return self.is_const[n]
        if n.op == "get_attr":
            res = True
        elif n.op in ("call_function", "call_method") and n.all_input_nodes:
            res = all(self.constant(a) for a in n.all_input_nodes)
        else:
            res = False
        self.is_const[n] = res
        return res

    def value(self, n: fx.Node) -> Any:
        if n not in self.const:
            if n.op == "get_attr":
                v = _fetch_attr(self.gm, str(n.target))
            else:
                args = fx.node.map_arg(n.args, self.value)
                kwargs = fx.node.map_arg(n.kwargs, self.value)
                with torch.no_grad():
                    if n.op == "call_function":
                        v = n.target(*args, **kwargs)  # type: ignore[operator]
                    else:
                        v = getattr(args[0], str(n.target))(*args[1:], **kwargs)
            self.const[n] = v
        return self.const[n]

    # -- classification -------------------------------------------------------------
    def classify(self) -> None:
        for n in self.nodes:
            if n.op in ("output", "placeholder") or self.constant(n):
                continue
            data = [a for a in n.all_input_nodes if not self.constant(a)]
            self.data_in[n] = data
            self.kind[n] = self._kind(n, data)
            if self.kind[n] == "unary" and _is_identity_call(self.gm, n):
                self.identity_in[n] = data[0]

    def _kind(self, n: fx.Node, data: list[fx.Node]) -> str:
        if n.op == "call_module":
            m = _fetch_attr(self.gm, str(n.target))
            if len(data) != 1 or n.kwargs or len(n.args) != 1:
                return "opaque"
            if self.rules.lookup(m) is None:
                return "elementwise" if isinstance(m, _ELEMENTWISE_MODULES) else "opaque"
            if (self.calls[str(n.target)] > 1 or id(m) in self.shared) and type(m) is not nn.Identity:
                return "shared"
            return "unary"
        if n.op not in ("call_function", "call_method"):
            return "opaque"
        target = n.target
        if n.op == "call_method":
            if target in _ELEMENTWISE_METHODS and len(data) == 1:
                return "elementwise"
            target = _METHODS.get(str(target))
            if target is None:
                return "opaque"
        if target in _SUM_FUNCS and len(data) == 2 and len(n.args) == 2 and not n.kwargs:
            if all(isinstance(a, fx.Node) for a in n.args):
                self.sign[n] = _SUM_FUNCS[target]
                return "sum"
        if target in _CAT_FUNCS:
            seq = n.args[0] if n.args else n.kwargs.get("tensors")
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if isinstance(seq, (list, tuple)) and all(isinstance(a, fx.Node) and not self.constant(a) for a in seq):
                if len(seq) >= 1 and isinstance(dim, int):
                    self.sign[n] = float(dim)
                    return "cat"
            return "opaque"
        if target in _ELEMENTWISE_FUNCS and len(data) == 1:
            return "elementwise"
        if len(data) == 1 and self.rules.lookup(target) is not None:
            return "unary"
        return "opaque"

    # -- channels and dims -------------------------------------------------------
    def _set(self, table: dict[fx.Node, int], n: fx.Node, v: int | None) -> bool:
        if v is None or n in table:
            return False
        table[n] = int(v)
        return True

    def infer_shapes(self) -> None:
        for n in self.nodes:
            tm = n.meta.get("tensor_meta")
            shape = getattr(tm, "shape", None)
            if shape is not None and len(shape) >= 3:
                self.chan[n] = int(shape[1])
                self.dims[n] = len(shape) - 2
        for n, k in self.kind.items():
            if n.op == "call_module" and k in ("unary", "shared"):
                m = _fetch_attr(self.gm, str(n.target))
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    self._set(self.chan, self.data_in[n][0], m.in_channels)
                    self._set(self.chan, n, m.out_channels)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    self._set(self.chan, self.data_in[n][0], m.num_features)
                    self._set(self.chan, n, m.num_features)
                try:
                    d = A.dims_of(m)
                except Exception:
                    d = None
                if d is not None:
                    self._set(self.dims, self.data_in[n][0], d)
                    self._set(self.dims, n, d)
            elif n.op == "call_function" and k == "unary" and n.target in CONV_FUNCTIONS:
                w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
                if isinstance(w, fx.Node) and self.constant(w):
                    wv = self.value(w)
                    if isinstance(wv, torch.Tensor) and wv.dim() in (3, 4, 5):
                        g = n.args[6] if len(n.args) > 6 else n.kwargs.get("groups", 1)
                        self._set(self.chan, self.data_in[n][0], wv.shape[1] * int(g))
                        self._set(self.chan, n, wv.shape[0])
                        self._set(self.dims, self.data_in[n][0], wv.dim() - 2)
                        self._set(self.dims, n, wv.dim() - 2)
        for _ in range(20):
            changed = False
            for n in self.nodes:
                k = self.kind.get(n)
                if k is None:
                    continue
                data = self.data_in[n]
                if k in ("unary", "elementwise", "sum", "cat"):
                    for a in data:  # dims flow along every linear/elementwise edge
                        if a in self.dims:
                            changed |= self._set(self.dims, n, self.dims[a])
                        if n in self.dims:
                            changed |= self._set(self.dims, a, self.dims[n])
                if k == "unary" and n not in self.lowered:
                    changed |= self._try_lower(n)
                elif k in ("elementwise", "sum"):
                    group = [n] + data
                    known = [self.chan[x] for x in group if x in self.chan]
                    if known:
                        for x in group:
                            changed |= self._set(self.chan, x, known[0])
                elif k == "cat" and self.sign.get(n) == 1.0:
                    ins = list(n.args[0] if n.args else n.kwargs["tensors"])  # type: ignore[arg-type]
                    unknown = [x for x in ins if x not in self.chan]
                    if not unknown:
                        changed |= self._set(self.chan, n, sum(self.chan[x] for x in ins))
                    elif len(unknown) == 1 and n in self.chan and len(set(ins)) == len(ins):
                        rest = self.chan[n] - sum(self.chan[x] for x in ins if x in self.chan)
                        if rest > 0:
                            changed |= self._set(self.chan, unknown[0], rest)
            if not changed:
                break
        for n, k in self.kind.items():
            if k == "unary" and n not in self.lowered:
                self._try_lower(n, final=True)

    def _try_lower(self, n: fx.Node, final: bool = False) -> bool:
        inp = self.data_in[n][0]
        cin = self.chan.get(inp)
        dims = self.dims.get(n) or self.dims.get(inp)
        if n.op == "call_module":
            m = _fetch_attr(self.gm, str(n.target))
            if cin is None:
                cin = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
            if dims is None:
                try:
                    dims = A.dims_of(m)
                except Exception:
                    dims = None
            if cin is None or dims is None:
                # probe: a rule that does not need the input's channels (a conv-like
                # block) lowers with a meaningless channel count; parameter-free
                # leaves refuse it (they need a positive count)
                try:
                    probe = self.rules.lower_module(m, LowerInfo(-1, dims or 2, str(n.target)))
                    pspec = None if probe is None else probe.plan()[0]
                except Exception:
                    pspec = None
                if pspec is not None and pspec.in_channels > 0:
                    cin = cin if cin is not None else pspec.in_channels
                    dims = dims if dims is not None else pspec.dims
        guessed = False
        if cin is None and n in self.chan and dims is not None:
            # a parameter-free op whose output channels are known: try "same channels"
            cin, guessed = self.chan[n], True
        if cin is None or dims is None:
            return False
        info = LowerInfo(int(cin), int(dims), str(n.target) if n.op == "call_module" else n.name)
        try:
            if n.op == "call_module":
                expr = self.rules.lower_module(_fetch_attr(self.gm, str(n.target)), info)
            else:
                target = n.target if n.op == "call_function" else _METHODS[str(n.target)]
                rule = self.rules.lookup(target)
                args = fx.node.map_arg(n.args, lambda a: INPUT if a is inp else self.value(a))
                kwargs = fx.node.map_arg(n.kwargs, lambda a: INPUT if a is inp else self.value(a))
                expr = None if rule is None else rule(FunctionCall(target, tuple(args), dict(kwargs)), info)
            spec = None if expr is None else expr.plan()[0]
        except Exception as exc:  # a rule that cannot lower this instance: opaque
            log.debug("lowering %s failed: %s", n, exc)
            expr, spec = None, None
        if guessed and (spec is None or spec.out_channels != cin):
            return False
        if expr is None or spec is None or spec.in_channels != cin or spec.dims != dims:
            if final or expr is not None:
                self.kind[n] = "opaque"
            return False
        self.lowered[n] = expr
        if guessed:
            self._set(self.chan, inp, cin)
        self._set(self.chan, n, spec.out_channels)
        self._set(self.chan, inp, spec.in_channels)  # e.g. an online block whose cin came from its rule
        self._set(self.dims, n, spec.dims)
        return True

    def alias_chain(self, n: fx.Node, d: fx.Node) -> list[fx.Node] | None:
        """The identity calls from ``n`` back to ``d`` (``n`` first, ``d`` excluded) if
        ``n``'s value is ``d``'s through identity calls only, else ``None``."""
        chain: list[fx.Node] = []
        while n is not d:
            src = self.identity_in.get(n)
            if src is None:
                return None
            chain.append(n)
            n = src
        return chain

    def linear(self, n: fx.Node) -> bool:
        k = self.kind.get(n)
        if k == "unary":
            return n in self.lowered
        if k == "sum":
            return n in self.chan and n in self.dims
        if k == "cat":
            dim = self.sign.get(n)
            return (n in self.chan and n in self.dims
                    and (dim == 1.0 or dim == -(self.dims[n] + 1.0)))
        return False


def _users(n: fx.Node) -> Iterable[fx.Node]:
    return n.users.keys()


def find_regions(
    gm: fx.GraphModule,
    rules: RuleRegistry | None = None,
    *,
    shared_modules: Iterable[nn.Module] = (),
    merge_convs: bool = False,
) -> list[Region]:
    """All maximal linear regions of ``gm`` (exact or not), in graph order.

    ``shared_modules``: modules known to be used elsewhere too (e.g. registered at
    several paths of the enclosing model); they are treated as opaque.

    Which regions are worth folding (``Region.foldable``): exact, holding a conv,
    not a lone plain conv already, not making the conv bigger than the convs it
    replaces (a low-rank ``1x1 -> 1x1`` bottleneck or a depthwise-separable pair stays
    factorized), and - unless ``merge_convs`` - not a plain *chain* of two or more
    convs: a model's own consecutive convs (e.g. a MobileNet projection followed by
    the next block's expansion) keep their layout, so a plain model keeps its conv
    count. Branches (sums / concats), BNs, scales, pads and pools always fold.
    When the largest region ending at a node is not worth folding, the largest
    sub-region that is (ending at the same node) is taken, without separating a
    BN/affine from the conv before it.
    """
    rules = rules if rules is not None else default_rules
    g = _Graph(gm, rules, frozenset(id(m) for m in shared_modules))
    g.classify()
    g.infer_shapes()

    root = "__root__"
    dg = nx.DiGraph()
    dg.add_node(root)
    for n, data in g.data_in.items():
        dg.add_node(n)
        if not data:
            dg.add_edge(root, n)
        for a in data:
            dg.add_edge(a, n)
    for n in g.nodes:
        if n.op == "placeholder":
            dg.add_edge(root, n)
    idom = nx.immediate_dominators(dg, root)

    assigned: set[fx.Node] = set()
    regions: list[Region] = []
    for e in reversed(g.nodes):
        if e in assigned or not g.linear(e):
            continue
        cands: list[tuple[fx.Node, set[fx.Node], list[fx.Node]]] = []
        d = idom.get(e)
        while d is not None and d != root:
            found = _closure(g, e, d, assigned)
            if found is None:
                break
            if not cands or found[0] != cands[-1][1]:  # same body from further up: d is an alias
                cands.append((d, *found))
            nd = idom.get(d)
            d = None if nd is d else nd
        if not cands:
            continue
        refused: Region | None = None
        chosen: Region | None = None
        for idx, (d, body, aliases) in enumerate(reversed(cands)):
            reg = _build(g, d, e, body, aliases)
            if len(body) == 1:
                chosen = reg
                break
            if reg.exact:
                before, after = _cost(g, reg)
                if after > before:
                    reg.worth = False
                    reg.notes.append(
                        f"folding would make the convolution bigger ({before:,} -> {after:,} weights): "
                        "the region is a factorized (low-rank or separable) conv, kept as it is"
                    )
                elif reg.kind == "chain" and _n_convs(g, reg) > 1 and not merge_convs:
                    reg.worth = False
                    reg.notes.append(
                        "a chain of convolutions is kept as separate convs (merge_convs=True merges it)"
                    )
                elif idx > 0 and _cuts_pair(g, d, body):
                    continue
                else:
                    chosen = reg
                    break
            if refused is None and reg.has_conv:
                refused = reg
        if refused is not None:
            regions.append(refused)
        if chosen is None:
            continue
        assigned |= set(chosen.nodes)
        effective = [n for n in chosen.nodes if not _is_identity_call(gm, n)]
        if len(effective) <= 1:
            only = effective[0] if effective else chosen.nodes[0]
            chosen.worth = not (
                (only.op == "call_module" and type(_fetch_attr(gm, str(only.target))) in (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                or (only.op == "call_function" and only.target in CONV_FUNCTIONS)
            )
            if not chosen.worth or not chosen.has_conv:
                continue
        regions.append(chosen)
        if refused is not None:
            chosen.notes.append(f"part of the larger refused region {refused.name}")
    regions.sort(key=lambda r: g.order[r.exit])
    return regions


def _conv_cost(spec: Any) -> int:
    k = 1
    for v in spec.kernel_size:
        k *= v
    return spec.out_channels * (spec.in_channels // spec.groups) * k


def _cost(g: _Graph, reg: Region) -> tuple[int, int]:
    """Weights of the region's conv-like ops (plain per-channel leaves count 0) and of
    the folded conv."""
    before = 0
    for n in reg.nodes:
        if g.kind[n] == "unary" and not isinstance(g.lowered[n], _PLAIN_LEAVES):
            before += _conv_cost(g.lowered[n].spec)
    after = _conv_cost(reg.expr.spec) if reg.expr is not None else 0
    return before, after


def _n_convs(g: _Graph, reg: Region) -> int:
    return sum(1 for n in reg.nodes if g.kind[n] == "unary" and not isinstance(g.lowered[n], _PLAIN_LEAVES))


def _cuts_pair(g: _Graph, d: fx.Node, body: set[fx.Node]) -> bool:
    """True if the region would start with per-channel ops that belong with the linear
    op before them (e.g. take a BN away from its conv)."""
    if not g.linear(d) or any(u not in body for u in _users(d)):
        return False
    first = [u for u in _users(d)]
    return all(g.kind.get(u) == "unary" and isinstance(g.lowered.get(u), _PLAIN_LEAVES) for u in first)


def _is_identity_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    return n.op == "call_module" and type(_fetch_attr(gm, str(n.target))) is nn.Identity


def _closure(
    g: _Graph, e: fx.Node, d: fx.Node, assigned: set[fx.Node]
) -> tuple[set[fx.Node], list[fx.Node]] | None:
    """Nodes on paths from ``d`` to ``e`` (``d`` excluded) if they form a valid region,
    and the region's aliases of ``d`` (taken out of the body, see :func:`_split_aliases`)."""
    body = {e}
    stack = [e]
    while stack:
        n = stack.pop()
        for p in g.data_in.get(n, ()):
            if p is d or p in body:
                continue
            if p in assigned or not g.linear(p) or p not in g.data_in:
                return None
            body.add(p)
            stack.append(p)
    leaks = [n for n in body if n is not e and any(u not in body for u in _users(n))]
    aliases = _split_aliases(g, d, body, leaks) if leaks else []
    if aliases is None:
        return None
    return body, aliases


def _split_aliases(g: _Graph, d: fx.Node, body: set[fx.Node], leaks: list[fx.Node]) -> list[fx.Node] | None:
    """Take the identity chains from ``d`` to each of ``leaks`` (body nodes used outside
    the body) out of ``body`` and return them, in graph order; ``None`` if a leak's value
    is not ``d``'s (the region would drop a value used elsewhere)."""
    out: set[fx.Node] = set()
    for n in leaks:
        chain = g.alias_chain(n, d)
        if chain is None:
            return None
        out.update(chain)
    body -= out
    return sorted(out, key=g.order.__getitem__)


def _build(g: _Graph, d: fx.Node, e: fx.Node, body: set[fx.Node], aliases: list[fx.Node]) -> Region:
    same = {d, *aliases}  # values equal to the entry's
    nodes = sorted(body, key=g.order.__getitem__)
    dims = g.dims.get(e) or g.dims.get(d) or 2
    cin = g.chan.get(d)
    memo: dict[fx.Node, A.Expr | None] = {}
    reasons: list[str] = []

    def identity() -> A.Expr:
        if cin is None:
            raise _NoChannels()
        return A.Identity(cin, dims)

    def build(n: fx.Node) -> A.Expr | None:
        if n in same:
            return None
        if n in memo:
            return memo[n]
        k = g.kind[n]
        if k == "unary":
            prev = build(g.data_in[n][0])
            out = g.lowered[n] if prev is None else A.Seq(prev, g.lowered[n])
        else:
            if k == "cat":
                args = list(n.args[0] if n.args else n.kwargs["tensors"])  # type: ignore[arg-type]
            else:
                args = list(n.args)
            terms = [build(a) or identity() for a in args]
            if k == "sum":
                if g.sign[n] < 0:
                    terms[1] = A.Seq(terms[1], A.Constant(terms[1].spec.out_channels, dims, -1.0, name="neg"))
                out = A.Sum(*terms)
            else:
                out = A.Concat(*terms)
        memo[n] = out
        return out

    expr: A.Expr | None
    try:
        expr = build(e)
        if expr is None:  # pragma: no cover - e is never d
            expr = identity()
        _match_dtype(expr, _region_dtype(g, nodes, d))
        spec, rs = expr.plan()
        reasons.extend(rs)
        if spec is None and not rs:
            reasons.append("the branches have no common folded form")
    except _NoChannels:
        expr = None
        reasons.append(f"channel count of {d.name} unknown (pass example_inputs to fold)")
    except Exception as exc:  # IncompatibleError and friends
        expr = None
        reasons.append(f"{type(exc).__name__}: {exc}")
    kinds = {g.kind[n] for n in nodes}
    kind = "concat" if "cat" in kinds else "branches" if "sum" in kinds else "chain"
    has_conv = any(g.kind[n] == "unary" and not isinstance(g.lowered[n], _PLAIN_LEAVES) for n in nodes)
    return Region(
        entry=d,
        exit=e,
        nodes=nodes,
        expr=expr,
        reasons=tuple(reasons),
        kind=kind,
        dims=dims,
        in_channels=cin or 0,
        has_conv=has_conv,
        name=_region_name(nodes),
        aliases=list(aliases),
    )


def _region_dtype(g: _Graph, nodes: list[fx.Node], entry: fx.Node) -> torch.dtype:
    """The floating dtype the region computes in (its modules' or the input's)."""
    for n in [entry] + nodes:
        tm = n.meta.get("tensor_meta")
        dt = getattr(tm, "dtype", None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point:
            return dt
    for n in nodes:
        if n.op == "call_module":
            m = _fetch_attr(g.gm, str(n.target))
            for t in list(m.parameters()) + list(m.buffers()):
                if t.is_floating_point():
                    return t.dtype
        for a in n.all_input_nodes:
            if g.constant(a):
                try:
                    v = g.value(a)
                except Exception:
                    continue
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    return v.dtype
    return torch.get_default_dtype()


def _match_dtype(expr: A.Expr, dtype: torch.dtype) -> None:
    """Cast the expression leaves' *own* floating buffers (constants made by rules,
    identity/pool anchors) to ``dtype``; the user's modules are never touched."""
    for leaf in expr.modules():
        if not isinstance(leaf, A.Expr):
            continue
        for name, b in list(leaf._buffers.items()):
            if b is not None and b.is_floating_point() and b.dtype != dtype:
                leaf._buffers[name] = b.to(dtype)


class _NoChannels(Exception):
    pass


def _region_name(nodes: list[fx.Node], prefix: str = "") -> str:
    labels = [prefix + str(n.target) if n.op == "call_module" else n.name for n in nodes]
    if len(labels) <= 3:
        return " -> ".join(labels)
    return f"{labels[0]} .. {labels[-1]} ({len(labels)} ops)"


class FindRegions(GraphPass):
    """Analysis pass: stores :func:`find_regions`'s result in ``gm.meta[META_REGIONS]``.

    Never modifies the graph (``PassResult.modified`` is ``False``).
    """

    def __init__(self, rules: RuleRegistry | None = None, shared_modules: Iterable[nn.Module] = (),
                 merge_convs: bool = False) -> None:
        self.rules = rules
        self.shared_modules = tuple(shared_modules)
        self.merge_convs = merge_convs

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph_meta(graph_module)[META_REGIONS] = find_regions(
            graph_module, self.rules, shared_modules=self.shared_modules, merge_convs=self.merge_convs
        )
        return PassResult(graph_module, False)

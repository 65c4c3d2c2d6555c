"""Lowering of fx nodes into the kernel algebra, for the region analysis.

:class:`LoweredGraph` owns the per-graph facts the region finder needs about each
node: whether it is a constant (computed from parameters and buffers only), its
**kind** (``unary`` - a module/function with a lowering rule; ``sum``/``cat`` - a
parallel sum or channel concat of branches; ``elementwise`` - an activation the
region stops at; ``shared`` - a module called or registered more than once;
``pinned`` - a module whose tensors or submodules something else uses
(:mod:`repcompiler.analysis.uses`), the reason in ``why``; ``opaque`` - anything else), its
channel count and dimensionality, and for ``unary`` nodes the algebra expression its
rule lowers it to.

Lowering:

* ``call_module``: the module rule (``lower(module, LowerInfo) -> Expr | None``);
* ``call_function`` / ``call_method`` with one data input: the function rule, see
  :mod:`repcompiler.rules.registry` (``lower(FunctionCall, LowerInfo) -> Expr | None``;
  ``x.add(y)`` is looked up as ``torch.add``);
* ``a + b`` / ``torch.add`` / ``a - b`` of two data values: parallel sum;
  ``torch.cat([...], dim=1)``: channel concat.

Effects: :class:`~repcompiler.analysis.effects.Effects` of the graph (in-place writes and the
values they reach through aliases). A value written in place is not a constant (nor is
a node that writes), and a region whose entry is written between its reads is invalid
(:mod:`~repcompiler.passes.regions.dominance`).

Channel counts for parameter-free leaves (identity, average pooling, padding) come
from ``ShapeProp`` metadata when the graph was shape-propagated, otherwise they are
inferred from neighbouring convs and BNs (forward and backward through linear ops,
sums, concats and elementwise activations). No input shape is required.
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ... import algebra as A
from ...errors import RepCompilerError, RuleError, UnsupportedError
from ...analysis.effects import Effects
from ...rules.base import INPUT, FunctionCall, LowerInfo
from ...rules.registry import RuleRegistry, call_rule
from ...analysis.uses import graph_pins

__all__ = [
    "LoweredGraph",
    "CONV_FUNCTIONS",
    "SUM_FUNCS",
    "CAT_FUNCS",
    "PLAIN_LEAVES",
    "ELEMENTWISE_MODULES",
    "ELEMENTWISE_FUNCS",
    "ELEMENTWISE_METHODS",
    "METHODS",
    "fetch_attr",
    "is_identity_call",
    "is_rank_read",
    "constant_nodes",
]

log = logging.getLogger(__name__)

# node targets the analysis recognises without a rule: convs called as functions (for
# channel inference), parallel sums (value: the sign of the second term), channel
# concats, methods looked up as their torch functions, the algebra's per-channel leaves
# (no conv weight), and elementwise ops a region stops at (no lowering, but channels
# and dims flow through them)
CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)
SUM_FUNCS = {operator.add: 1.0, torch.add: 1.0, operator.iadd: 1.0, operator.sub: -1.0, torch.sub: -1.0,
             operator.isub: -1.0}
CAT_FUNCS = (torch.cat, torch.concat)
METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
PLAIN_LEAVES = (A.Affine, A.BatchNorm, A.Identity, A.AvgPool, A.ZeroPad)
ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.PReLU, nn.Mish, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus,
)
ELEMENTWISE_FUNCS = {
    F.relu, torch.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
    torch.tanh, F.leaky_relu, F.elu, F.dropout, F.mish, F.hardtanh,
}
ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "relu_", "sigmoid_"}


def fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    """The attribute at dotted path ``target`` under ``gm``."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class LoweredGraph:
    """Per-graph analysis state: constants, node kinds, channels/dims and lowerings
    (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, rules: RuleRegistry, shared: frozenset[int],
                 pinned: Mapping[str, str] | None = None) -> None:
        self.gm = gm
        self.rules = rules
        self.nodes = [n for n in gm.graph.nodes]
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.const: dict[fx.Node, Any] = {}
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
        self.pinned: dict[str, str] = {**graph_pins(gm), **(pinned or {})}
        """Module targets used other than by their call (:mod:`repcompiler.analysis.uses`) -> reason."""
        self.why: dict[fx.Node, str] = {}
        """Why a module call with a rule is not linear here (``pinned`` nodes)."""
        self.effects = Effects(gm, rules.describes)
        self._constants: set[fx.Node] | None = None
        self.refusals: dict[fx.Node, tuple[fx.Node, set[fx.Node], list[fx.Node], str]] = {}
        """Exit -> the first larger region ending there that in-place writes made invalid:
        ``(entry, body, aliases, reason)`` (:mod:`~repcompiler.passes.regions.dominance`)."""

    # -- constants ---------------------------------------------------------------
    def constant(self, n: fx.Node) -> bool:
        """Whether ``n`` is computed from parameters and buffers alone
        (:func:`constant_nodes`): a value written in place (a buffer updated in forward,
        or anything sharing its storage) is not, nor is a node that writes (evaluating
        it would write)."""
        if self._constants is None:
            self._constants = constant_nodes(
                self.gm.graph, never=lambda m: m in self.effects.writers or self.effects.written(m))
        return n in self._constants

    def value(self, n: fx.Node) -> Any:
        if n not in self.const:
            if n.op == "get_attr":
                v = fetch_attr(self.gm, str(n.target))
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
            if self.kind[n] == "unary" and is_identity_call(self.gm, n):
                self.identity_in[n] = data[0]

    def _kind(self, n: fx.Node, data: list[fx.Node]) -> str:
        if n.op == "call_module":
            m = fetch_attr(self.gm, str(n.target))
            if len(data) != 1 or n.kwargs or len(n.args) != 1:
                return "opaque"
            if self.rules.lookup(m) is None:
                return "elementwise" if isinstance(m, ELEMENTWISE_MODULES) else "opaque"
            if (self.calls[str(n.target)] > 1 or id(m) in self.shared) and type(m) is not nn.Identity:
                return "shared"
            if str(n.target) in self.pinned:
                self.why[n] = f"{n.target} is kept: {self.pinned[str(n.target)]}"
                return "pinned"
            return "unary"
        if n.op not in ("call_function", "call_method"):
            return "opaque"
        target = n.target
        if n.op == "call_method":
            if target in ELEMENTWISE_METHODS and len(data) == 1:
                return "elementwise"
            target = METHODS.get(str(target))
            if target is None:
                return "opaque"
        if target in SUM_FUNCS and len(data) == 2 and len(n.args) == 2 and not n.kwargs:
            if all(isinstance(a, fx.Node) for a in n.args):
                self.sign[n] = SUM_FUNCS[target]
                return "sum"
        if target in CAT_FUNCS:
            seq = n.args[0] if n.args else n.kwargs.get("tensors")
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            if isinstance(seq, (list, tuple)) and all(isinstance(a, fx.Node) and not self.constant(a) for a in seq):
                if len(seq) >= 1 and isinstance(dim, int):
                    self.sign[n] = float(dim)
                    return "cat"
            return "opaque"
        if target in ELEMENTWISE_FUNCS and len(data) == 1:
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
            if n.op == "call_module" and k in ("unary", "shared", "pinned"):
                m = fetch_attr(self.gm, str(n.target))
                if isinstance(m, A.CONV_TYPES):
                    self._set(self.chan, self.data_in[n][0], m.in_channels)
                    self._set(self.chan, n, m.out_channels)
                elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                    self._set(self.chan, self.data_in[n][0], m.num_features)
                    self._set(self.chan, n, m.num_features)
                try:
                    d = A.dims_of(m)
                except UnsupportedError:  # not a conv, BN or pool: no declared dims
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

    def _lower(self, n: fx.Node, inp: fx.Node, info: LowerInfo) -> A.Expr | None:
        """``n``'s expression by its rule (``None``: no rule or the rule declines); a rule
        that raises anything but a :class:`~repcompiler.errors.RepCompilerError` is a bug,
        raised as one naming the rule and the module or node."""
        if n.op == "call_module":
            m = fetch_attr(self.gm, str(n.target))
            expr = self.rules.lower_module(m, info)
            if expr is not None:
                expr.plan()
            return expr
        target = n.target if n.op == "call_function" else METHODS[str(n.target)]
        rule = self.rules.lookup(target)
        if rule is None:
            return None
        try:
            args = fx.node.map_arg(n.args, lambda a: INPUT if a is inp else self.value(a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a: INPUT if a is inp else self.value(a))
        except Exception as exc:  # evaluating the graph's constant operands runs the user's code
            log.debug("constant operands of %s not evaluated: %s", n, exc)
            return None
        calls = self._split_weight(n, target, tuple(args), dict(kwargs))
        exprs = [call_rule(rule, c, info) for c in calls]
        expr = None if any(e is None for e in exprs) else exprs[0] if len(exprs) == 1 else A.Sum(*exprs)
        if expr is not None:
            expr.plan()
        return expr

    def _try_lower(self, n: fx.Node, final: bool = False) -> bool:
        inp = self.data_in[n][0]
        cin = self.chan.get(inp)
        dims = self.dims.get(n) or self.dims.get(inp)
        if n.op == "call_module":
            m = fetch_attr(self.gm, str(n.target))
            if cin is None:
                cin = getattr(m, "in_channels", None) or getattr(m, "num_features", None)
            if dims is None:
                try:
                    dims = A.dims_of(m)
                except UnsupportedError:  # not a conv, BN or pool: no declared dims
                    dims = None
            if cin is None or dims is None:
                # probe: a rule that does not need the input's channels (a conv-like
                # block) lowers with a meaningless channel count; parameter-free
                # leaves refuse it (they need a positive count)
                try:
                    probe = self.rules.lower_module(m, LowerInfo(-1, dims or 2, str(n.target)))
                    pspec = None if probe is None else probe.plan()[0]
                except RuleError:  # a bug in a rule, not a refusal
                    raise
                except RepCompilerError:  # the rule refuses the meaningless channel count
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
            expr = self._lower(n, inp, info)
            spec = None if expr is None else expr.plan()[0]
        except RuleError:  # a bug in a rule, not a refusal
            raise
        except RepCompilerError as exc:  # a rule that refuses this instance (IncompatibleError, ...): opaque
            log.debug("lowering %s refused: %s", n, exc)
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

    def _weight_terms(self, w: Any) -> list[fx.Node] | None:
        """The terms of a constant conv weight computed as a sum (``p + c``, nested) of
        same-shape tensors, one of them an ``nn.Parameter``; ``None`` otherwise."""
        if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target in (operator.add, torch.add)
                and len(w.args) == 2 and not w.kwargs and all(isinstance(a, fx.Node) for a in w.args)
                and self.constant(w)):
            return None
        terms: list[fx.Node] = []
        for a in w.args:
            terms += self._weight_terms(a) or [a]
        values = [self.value(t) for t in terms]
        if not all(isinstance(v, torch.Tensor) and v.shape == values[0].shape for v in values):
            return None
        return terms if any(isinstance(v, nn.Parameter) for v in values) else None

    def _split_weight(self, n: fx.Node, target: Any, args: tuple, kwargs: dict) -> list[FunctionCall]:
        """A conv call whose weight is a sum with a parameter term (DBB's identity-based
        1x1: ``F.conv2d(x, weight + id_tensor)``) as one call per term (a conv is linear
        in its weight; the bias goes with the first): lowered as their ``Sum``, the
        parameter stays live in the expression, so an online block made from it trains
        it (the evaluated sum would be a snapshot). Otherwise the call as it is."""
        call = FunctionCall(target, args, kwargs)
        if target not in CONV_FUNCTIONS:
            return [call]
        in_kwargs = "weight" in n.kwargs
        terms = self._weight_terms(n.kwargs["weight"] if in_kwargs else (n.args[1] if len(n.args) > 1 else None))
        if terms is None:
            return [call]
        out = []
        for i, t in enumerate(terms):
            a, k = list(args), dict(kwargs)
            if in_kwargs:
                k["weight"] = self.value(t)
            else:
                a[1] = self.value(t)
            if i:  # the bias once
                if "bias" in k:
                    k["bias"] = None
                elif len(a) > 2:
                    a[2] = None
            out.append(FunctionCall(target, tuple(a), k))
        return out

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


def is_identity_call(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Whether ``n`` calls an ``nn.Identity`` (exactly that type) of ``gm``."""
    return n.op == "call_module" and type(fetch_attr(gm, str(n.target))) is nn.Identity


_RANK_METHODS = ("dim", "ndimension")


def constant_nodes(graph: fx.Graph, never: Callable[[fx.Node], bool] | None = None) -> set[fx.Node]:
    """The nodes of ``graph`` computed from its parameters and buffers alone:
    ``get_attr`` reads and function or method calls whose inputs are all such nodes
    (one pass in topological order). ``never``: nodes that are not constants whatever
    their inputs (e.g. values written in place)."""
    const: set[fx.Node] = set()
    for n in graph.nodes:
        if never is not None and never(n):
            continue
        if n.op == "get_attr" or (n.op in ("call_function", "call_method") and n.all_input_nodes
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
    return const


def is_rank_read(n: fx.Node) -> bool:
    """Whether ``n`` only reads the number of dimensions of its one tensor input
    (``x.ndim``, ``x.dim()``, ``x.ndimension()``; timm's norm layers assert it). Every
    value of a region has its dims, so such a read of a value inside a region may read
    the folded region's output instead: it is not a use that keeps the value alive."""
    if n.op == "call_function" and n.target is getattr:
        return len(n.args) == 2 and n.args[1] == "ndim" and not n.kwargs
    return n.op == "call_method" and n.target in _RANK_METHODS and len(n.args) == 1 and not n.kwargs

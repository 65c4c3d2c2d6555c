"""Capture of Python that plain ``torch.fx`` symbolic tracing rejects.

This module owns :class:`CaptureTracerMixin`, the part of the compiler's tracer that
handles the constructs real re-parameterization code uses and ``fx.Tracer`` refuses,
plus :func:`capture_info` (what a trace needed); :func:`repcompiler.capture.tracing.trace_model`
traces a module with it. It is a mixin so that the compiler's one tracer
(:class:`repcompiler.capture.rule_tracer.RuleTracer`) can put it first in its bases: on code plain
``fx`` traces it produces **the same graph** (except that augmented assignments stay
in place, below); it only acts at the exact operations
where plain ``fx`` raises, so capture happens at the granularity of the failing
*operation* (finer than the smallest failing submodule), and every module with a
rule stays a ``call_module`` leaf for the fold machinery.

What it adds (each seen in real code, see ``tests/fixtures_thirdparty.py``):

* **Augmented assignments** (``x += y``, ``x *= s``): plain ``fx`` records them as
  ``x + y`` (its proxies have no ``__iadd__``), so the write into ``x`` is lost and a
  later read of ``x`` through another name sees the old value in the graph but the new
  one in eager code. They are recorded as ``operator.iadd`` ... nodes, which write their
  first operand (:mod:`repcompiler.analysis.effects`) and evaluate to it, as in eager code.
* **In-place slice writes into proxies** (DBB's BN-and-pad layer:
  ``out[:, :, 0:p, :] = v``): ``Proxy.__setitem__`` records an
  ``operator.setitem`` node, which ``torch.fx`` treats as side-effectful, so dead-code
  elimination keeps it; later reads of ``out`` come after it in graph order.
* **Python arithmetic on parameter shapes** (the official OREPA weight generator:
  ``int(t / g)``, ``view(*shape)``, ``t, i, h, w = w.size()``): every value computed
  from parameters and buffers only (no graph input) is also evaluated **eagerly** on
  the concrete tensors while tracing (under ``no_grad``, in-place ops excluded, the
  model's tensors never written). The graph keeps the symbolic nodes (so it stays
  exact when the parameters change, and training through it is unaffected); only
  where Python needs a value (``int()``, ``float()``, ``bool()``, ``len()``,
  iteration, indexing) the concrete value is used, which is exact because parameter
  shapes (and, in eval mode, parameter-only values) are fixed for the captured graph.
* **Module instances shared across the tree** (ultralytics' class-level
  ``default_act``): ``fx.Tracer.path_of_module`` names a module by its *first*
  qualified name, so a shared activation called in block ``b`` appears as
  ``a.act`` (block ``a``'s): the node points into another block, and the block traced
  alone differs from its trace inside the parent ("traces differently alone").
  :meth:`CaptureTracerMixin.path_of_module` names a call by the path through which
  the calling module reaches the callee, so each call site keeps its own name.
* **DBB's BN-and-pad pattern**: ``F.pad(bn(x), [p]*4)`` followed by writes of
  per-channel constants into exactly the ``p``-wide border equals zero-pad then the
  BN (``ZeroPad >> BatchNorm`` in the algebra) when the written values are the BN's
  eval output for 0. With the BN in eval mode, the trace checks this numerically
  (random inputs, two sizes) and rewrites the nodes to ``bn(F.pad(x))`` (a plain
  ``F.pad`` then the BN leaf, which the fold rules lower); otherwise the nodes stay
  and the reason is recorded in :func:`capture_info`. In training mode the pattern is
  left alone (batch statistics make the two differ), unless the tracer has
  ``bns_become_scales`` (``linearize``: the BN becomes a learnable affine, for which
  the rewritten form is exact in both modes; see :mod:`repcompiler.capture.patterns`).

* **Assert statements on input-dependent values** (``assert x.ndim == 4, "NCHW"``): the
  test of an ``assert`` (recognised by its bytecode: the conditional jump over
  ``LOAD_ASSERTION_ERROR``) is recorded as a ``torch._assert(cond, message)`` node,
  which ``torch.fx`` keeps as side-effectful, and tracing continues on the branch where
  the assertion holds. The graph raises where the eager code raises; a value the
  assertion reads is a use like any other, so a fold that would remove it is not made.
  Any other truth test of an input-dependent value (``if x.ndim == 3:``) still stops
  the trace.

Input-shape arithmetic (``x.shape[0]`` used as a Python int) is **not** captured:
that would specialise the graph on one input size; such modules stay untraced.

Why this extends ``fx.Tracer`` rather than using ``torch.export``: see ``docs/architecture.md``.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import Attribute, Proxy

from .patterns import rewrite_bn_pad_borders

__all__ = ["CaptureTracerMixin", "CaptureProxy", "CaptureInfo", "capture_info"]

log = logging.getLogger(__name__)

_MISSING = object()
_INPLACE_FUNCS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                  operator.ifloordiv, operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                  operator.ilshift, operator.irshift, operator.imatmul}
_INFO_ATTR = "_repcompiler_capture"


@dataclass
class CaptureInfo:
    """What a trace needed beyond plain ``torch.fx``.

    ``used``: ``(module path, construct)`` for every place capture acted (``""`` is the
    traced root), e.g. ``("dbb_avg.bn", "setitem")`` or ``("", "int() of a
    parameter-derived value")``. ``rewrites``: patterns rewritten (e.g. the DBB
    BN-and-pad border, with its module path). ``declined``: patterns found but not
    rewritten, with the reason (the fold report shows them).
    """

    used: list[tuple[str, str]] = field(default_factory=list)
    rewrites: list[str] = field(default_factory=list)
    declined: list[str] = field(default_factory=list)
    opaque_calls: list[tuple[str, str]] = field(default_factory=list)
    """``(path, reason)`` of submodules kept as opaque calls because their own
    ``forward`` does not trace (:func:`repcompiler.capture.tracing.trace_model`)."""
    scaled_bns: list[str] = field(default_factory=list)
    """Targets of training-mode BNs whose BN-and-pad layer was rewritten because they
    become learnable affines (``bns_become_scales``): the rewritten graph is exact only
    where they do."""

    @property
    def needed(self) -> bool:
        """True if plain ``torch.fx`` would not have traced this graph."""
        return bool(self.used)


def capture_info(graph_or_gm: fx.Graph | fx.GraphModule) -> CaptureInfo:
    """The :class:`CaptureInfo` of a graph traced with the mixin (empty otherwise)."""
    graph = graph_or_gm.graph if isinstance(graph_or_gm, fx.GraphModule) else graph_or_gm
    info = getattr(graph, _INFO_ATTR, None)
    return info if isinstance(info, CaptureInfo) else CaptureInfo()


class CaptureProxy(Proxy):
    """A ``Proxy`` that supports item assignment and, for values computed from
    parameters and buffers only, the Python conversions plain proxies refuse."""

    def __setitem__(self, key: Any, value: Any) -> None:
        tracer = self.tracer
        tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})  # type: ignore[attr-defined]
        _note(tracer, "setitem (in-place slice write)")

    def __getattr__(self, k: str) -> "CaptureAttribute":
        return CaptureAttribute(self, k)

    def _concrete(self, what: str) -> Any:
        """The eager value of a parameter-derived proxy (``_MISSING`` for values that
        depend on the model's inputs: the caller then fails as plain fx does)."""
        value = getattr(self.tracer, "_concrete", {}).get(self.node, _MISSING)
        if value is not _MISSING:
            _note(self.tracer, f"{what} of a parameter-derived value")
        return value

    def _no_value(self, what: str) -> TypeError:
        return TypeError(f"{what} of a traced value that depends on the model's inputs "
                         f"({self.node.format_node()}): only values computed from parameters and buffers "
                         "have a Python value while tracing")

    def __bool__(self) -> bool:
        v = self._concrete("bool()")
        if v is not _MISSING:
            return bool(v)
        asserted = _assert_statement(inspect.currentframe())
        if asserted is None:
            return self.tracer.to_bool(self)
        holds_when, message = asserted
        cond = self if holds_when else self.tracer.create_proxy(  # type: ignore[attr-defined]
            "call_function", operator.not_, (self,), {})
        self.tracer.create_proxy("call_function", torch._assert, (cond, message), {})  # type: ignore[attr-defined]
        _note(self.tracer, "assert on a value that depends on the inputs (recorded as torch._assert)")
        return holds_when

    def __int__(self) -> int:
        v = self._concrete("int()")
        if v is _MISSING:
            raise self._no_value("int()")
        return int(v)

    def __index__(self) -> int:
        v = self._concrete("index")
        if v is _MISSING:
            raise self._no_value("use as an index")
        return operator.index(v)

    def __float__(self) -> float:
        v = self._concrete("float()")
        if v is _MISSING:
            raise self._no_value("float()")
        return float(v)

    def __len__(self) -> int:
        v = self._concrete("len()")
        return Proxy.__len__(self) if v is _MISSING else len(v)

    def __iter__(self) -> Iterator[Proxy]:
        # ``a, b = proxy``: plain fx unpacks by index (same graph as without capture)
        n = _unpack_count(inspect.currentframe())
        if n is None:
            v = self._concrete("iteration")
            if v is _MISSING:
                return self.tracer.iter(self)
            n = len(v)
        return iter([self[i] for i in range(n)])


def _calling_instructions(frame: Any) -> tuple[list[dis.Instruction], int] | None:
    """The instructions of the code that called ``frame``'s function (``CACHE`` and
    ``NOT_TAKEN`` left out) and the index of the one that made the call, or ``None``."""
    caller = frame.f_back if frame is not None else None
    if caller is None:
        return None
    insts = [i for i in dis.get_instructions(caller.f_code) if i.opname not in ("CACHE", "NOT_TAKEN")]
    at = next((k for k, i in enumerate(insts) if i.offset >= caller.f_lasti), None)
    return None if at is None else (insts, at)


def _unpack_count(frame: Any) -> int | None:
    """The ``UNPACK_SEQUENCE`` count at the instruction that called ``frame``'s
    function (``a, b = value``), or ``None``."""
    calling = _calling_instructions(frame)
    if calling is None:
        return None
    insts, at = calling
    return int(insts[at].argval) if insts[at].opname == "UNPACK_SEQUENCE" else None


_JUMPS_IF_TRUE = ("POP_JUMP_IF_TRUE", "POP_JUMP_FORWARD_IF_TRUE")
_JUMPS_IF_FALSE = ("POP_JUMP_IF_FALSE", "POP_JUMP_FORWARD_IF_FALSE")


def _assert_statement(frame: Any) -> tuple[bool, str] | None:
    """If the truth test that called ``frame``'s function is the test of an ``assert``
    statement, ``(value for which the assertion holds, its message)``; else ``None``.

    An ``assert c, msg`` compiles to the test of ``c`` (a conditional jump past the
    raise, possibly preceded by ``TO_BOOL``) followed directly by
    ``LOAD_ASSERTION_ERROR``; ``assert not c`` jumps on false instead."""
    calling = _calling_instructions(frame)
    if calling is None:
        return None
    insts, at = calling
    if insts[at].opname == "TO_BOOL":
        at += 1
    if at + 1 >= len(insts) or insts[at + 1].opname != "LOAD_ASSERTION_ERROR":
        return None
    jump = insts[at].opname
    if jump not in _JUMPS_IF_TRUE and jump not in _JUMPS_IF_FALSE:
        return None
    after = insts[at + 2] if at + 2 < len(insts) else None
    message = after.argval if after is not None and after.opname == "LOAD_CONST" and isinstance(
        after.argval, str) else f"assertion in {frame.f_back.f_code.co_qualname} failed"
    return jump in _JUMPS_IF_TRUE, message


def _augmented(op: Callable[[Any, Any], Any]) -> Callable[[CaptureProxy, Any], Proxy]:
    def impl(self: CaptureProxy, other: Any) -> Proxy:
        return self.tracer.create_proxy("call_function", op, (self, other), {})  # type: ignore[attr-defined]

    impl.__name__ = f"__{op.__name__}__"
    return impl


# ``x += y`` on a tensor writes ``x``: recorded as ``operator.iadd`` (an in-place node, seen
# by repcompiler.analysis.effects), not as the ``x + y`` plain fx falls back to, which loses the write
for _op in (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
            operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift,
            operator.imatmul):
    setattr(CaptureProxy, f"__{_op.__name__}__", _augmented(_op))


class CaptureAttribute(Attribute, CaptureProxy):
    """``proxy.attr`` (lazy, as :class:`torch.fx.proxy.Attribute`) with capture's
    conversions."""


def _note(tracer: Any, what: str) -> None:
    info = getattr(tracer, "capture", None)
    if isinstance(info, CaptureInfo):
        path = tracer.scope.module_path if getattr(tracer, "scope", None) is not None else ""
        if (path, what) not in info.used:
            info.used.append((path, what))


def _is_inplace(kind: str, target: Any) -> bool:
    if kind == "call_function":
        return target in _INPLACE_FUNCS
    return kind == "call_method" and isinstance(target, str) and target.endswith("_") and not target.endswith("__")


class CaptureTracerMixin:
    """Mix into an ``fx.Tracer`` subclass (first in the bases) to capture what plain
    tracing rejects; see the module docstring. Adds ``self.capture``
    (:class:`CaptureInfo` of the last trace, also attached to the returned graph)."""

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._concrete: dict[fx.Node, Any] = {}
        self.capture = CaptureInfo()
        try:
            with _bn_checks_recorded(root):
                graph = super().trace(root, concrete_args)  # type: ignore[misc]
        finally:
            self._concrete = {}
        if isinstance(self.root, nn.Module):  # type: ignore[attr-defined]
            rewrite_bn_pad_borders(graph, self.root, self.capture.rewrites, self.capture.declined,  # type: ignore[attr-defined]
                                   scaled=self.capture.scaled_bns if getattr(self, "bns_become_scales", False) else None)
        setattr(graph, _INFO_ATTR, self.capture)
        return graph

    def proxy(self, node: fx.Node) -> Proxy:
        return CaptureProxy(node, self)  # type: ignore[arg-type]

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Callable[[fx.Node], Proxy] | None = None) -> Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)  # type: ignore[misc]
        concrete = getattr(self, "_concrete", None)
        if concrete is None or not isinstance(p, Proxy):
            return p
        if kind == "get_attr":
            value = _fetch(self.root, str(target))  # type: ignore[attr-defined]
            if value is not _MISSING:
                concrete[p.node] = value
        elif kind in ("call_function", "call_method") and not _is_inplace(kind, target):
            value = self._evaluate(kind, target, args, kwargs, concrete)
            if value is not _MISSING:
                concrete[p.node] = value
        return p

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict, concrete: dict) -> Any:
        """The concrete value of a call whose proxy operands are all concrete."""
        seen = [False]
        missing = [False]

        def sub(a: Any) -> Any:
            if isinstance(a, Proxy):
                seen[0] = True
                v = concrete.get(a.node, _MISSING)
                if v is _MISSING:
                    missing[0] = True
                return v
            return a

        cargs = fx.node.map_aggregate(args, sub)
        ckwargs = fx.node.map_aggregate(kwargs, sub)
        if missing[0] or not seen[0]:
            return _MISSING
        try:
            with torch.no_grad():
                if kind == "call_function":
                    return target(*cargs, **ckwargs)
                return getattr(cargs[0], target)(*cargs[1:], **ckwargs)
        except Exception as exc:  # the model's own code, run eagerly: a value Python may never need stays symbolic
            log.debug("no concrete value for %s %s: %s", kind, target, exc)
            return _MISSING

    def path_of_module(self, mod: nn.Module) -> str:
        """The qualified name through which the module being traced reaches ``mod``
        (its direct child if it is one), not the first name ``mod`` has in the tree:
        a module shared across the tree gets one name per call site."""
        scope = getattr(self, "scope", None)
        root = getattr(self, "root", None)
        if scope is not None and isinstance(root, nn.Module):
            parent_path = scope.module_path
            parent: Any = root
            for part in parent_path.split(".") if parent_path else ():
                parent = parent._modules.get(part) if isinstance(parent, nn.Module) else None
            if isinstance(parent, nn.Module) and parent is not mod:
                for name, child in parent._modules.items():
                    if child is mod:
                        return f"{parent_path}.{name}" if parent_path else name
        return super().path_of_module(mod)  # type: ignore[misc]


def _bn_ranks() -> dict[Any, tuple[int, int | None]]:
    bn = nn.modules.batchnorm
    out: dict[Any, tuple[int, int | None]] = {}
    for cls, ranks in ((bn.BatchNorm1d, (2, 3)), (bn.BatchNorm2d, (4, 4)), (bn.BatchNorm3d, (5, 5)),
                       (bn.LazyBatchNorm1d, (2, 3)), (bn.LazyBatchNorm2d, (4, 4)), (bn.LazyBatchNorm3d, (5, 5)),
                       (nn.SyncBatchNorm, (2, None))):
        out[cls._check_input_dim] = ranks
    return out


_BN_RANKS = _bn_ranks()


def _rank_check(lo: int, hi: int | None, name: str) -> Callable[[Any], None]:
    """A BatchNorm's input check as graph nodes: ``torch._assert`` on ``input.dim()``."""

    def check(input: Any) -> None:
        if not isinstance(input, Proxy):
            d = input.dim()
            if d < lo or (hi is not None and d > hi):
                raise ValueError(f"{name}: expected {lo}{'' if hi == lo else '+' if hi is None else f'..{hi}'}D "
                                 f"input (got {d}D input)")
            return
        d = input.dim()
        ok = (d >= lo) if hi is None else (d >= lo) & (d <= hi)
        torch._assert(ok, f"{name}: unexpected input rank")

    return check


@contextlib.contextmanager
def _bn_checks_recorded(root: Any) -> Iterator[None]:
    """While tracing, a built-in BatchNorm's input checks (``_check_input_dim``, which
    branches on ``input.dim()``, and SyncBatchNorm's non-empty channel check) do not
    stop the trace of a BatchNorm subclass's own ``forward`` (``super().forward(x)``:
    timm's ``SyncBatchNormAct``): the rank check becomes an assert on ``input.dim()``
    in the graph; the channel check is dropped (a zero-channel input fails in the
    BatchNorm's own call anyway)."""
    patched: list[nn.Module] = []
    if isinstance(root, nn.Module):
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and "_check_input_dim" not in m.__dict__:
                ranks = _BN_RANKS.get(type(m)._check_input_dim)
                if ranks is not None:
                    m.__dict__["_check_input_dim"] = _rank_check(*ranks, type(m).__name__)
                    if isinstance(m, nn.SyncBatchNorm):
                        m.__dict__["_check_non_zero_input_channels"] = lambda input: None
                    patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("_check_input_dim", None)
            m.__dict__.pop("_check_non_zero_input_channels", None)


def _fetch(root: nn.Module, target: str) -> Any:
    """``root``'s parameter/buffer/attribute at ``target``, read without
    ``Module.__getattr__`` (which the tracer patches while tracing)."""
    *mods, last = target.split(".")
    obj: Any = root
    for part in mods:
        obj = obj._modules.get(part, _MISSING) if isinstance(obj, nn.Module) else _MISSING
        if obj is _MISSING:
            return _MISSING
    if not isinstance(obj, nn.Module):
        return _MISSING
    for table in (obj._parameters, obj._buffers, obj.__dict__):
        if last in table:
            return table[last]
    return _MISSING
